//! The virtio-balloon of `vmm run --balloon`: the device model
//! (`devices::virtio_balloon`) behind a virtio-mmio transport at
//! [`BALLOON_SLOT`], wired to an irqfd, with a [`BalloonBackend`] that gives
//! guest pages back through `guest_mem::GuestRam::give_back` (pages coalesced
//! per 2M frame across inflate buffers: a frame given back whole is freed
//! without a split, a frame given back in part waits on the deferred-split
//! queue, see `deferred_split`) and `report_free`, and takes them back with
//! `refill`.
//!
//! Locking: a vCPU's MMIO access takes the transport lock, and the backend
//! then takes guest RAM; the collapser takes them in the same order. Callers
//! on vCPU threads hold the transport only inside
//! `VcpuControl::parked_while`, so a split that pauses the other vCPUs never
//! waits for the calling one (it is not in `KVM_RUN`) nor for one blocked on
//! the transport.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use guest_mem::{GiveBackReport, SplitPolicy, HPAGE_SIZE, PAGE_SIZE};
use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio_balloon::{
    tag_name, Balloon, BalloonBackend, BalloonConfig, BalloonError,
};
use crate::devices::virtio_mmio::{Interrupt, MmioSlot, MmioTransport};
use crate::give_back_stats::{GiveBackMetrics, GiveBackRecorder};
use crate::ram_handle::RamHandle;
use crate::unmap_stats::{GiveBack, TimedQuiesce};

/// Where the balloon lives: 4K of registers at 0xd000_0000 (in the 32-bit MMIO
/// hole), GSI 5.
pub const BALLOON_SLOT: MmioSlot = MmioSlot {
    base: 0xd000_0000,
    size: 0x1000,
    irq: 5,
};

/// An interrupt line backed by an irqfd registered with KVM.
pub struct IrqfdLine(pub EventFd);

impl Interrupt for IrqfdLine {
    fn trigger(&self, _status_bits: u32) {
        if let Err(e) = self.0.write(1) {
            log::warn!("balloon: raising the interrupt (irqfd write) failed: {e}");
        }
    }
}

/// Sorted, de-duplicated runs `(first_pfn, count)` of `pfns`.
pub fn pfn_runs(pfns: &[u64]) -> Vec<(u64, u64)> {
    let mut v = pfns.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in v {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

/// The whole 2M frames inside `[gpa, gpa + len)`, as `(gpa, len)`.
pub fn whole_frames(gpa: u64, len: u64) -> Option<(u64, u64)> {
    let end = gpa.checked_add(len)?;
    let start = gpa.checked_next_multiple_of(HPAGE_SIZE)?;
    let end = end - end % HPAGE_SIZE;
    (end > start).then_some((start, end - start))
}

/// The balloon's backend over the machine's guest RAM.
pub struct RamBackend {
    machine: Weak<dyn RamHandle>,
    /// When the guest's current request (its MMIO exit) arrived.
    requested: Option<Instant>,
    /// When a partly given-back frame is split.
    policy: SplitPolicy,
    /// What the give-backs did.
    metrics: Arc<GiveBackRecorder>,
}

/// Record a give-back's outcome in the machine's unmap metrics and the
/// balloon's own.
pub(crate) fn record(
    m: &dyn RamHandle,
    metrics: &GiveBackRecorder,
    rep: &GiveBackReport,
    requested: Option<Instant>,
    pauses: &[std::time::Duration],
) {
    metrics.record(rep, pauses);
    m.recorder().give_back(
        GiveBack {
            frames_split: rep.frames_split,
            huge_frames_freed: rep.whole_frames_freed,
            pages: rep.pages_freed,
        },
        requested,
        pauses,
    );
}

impl RamBackend {
    fn give_back(&self, m: &dyn RamHandle, gpa: u64, len: u64, report: bool) {
        let what = if report {
            "free page report"
        } else {
            "inflate"
        };
        let timed = TimedQuiesce::new(m.vcpus());
        let r = if report {
            m.ram().report_free(gpa, len, &timed)
        } else {
            m.ram().give_back(gpa, len, self.policy, &timed)
        };
        match r {
            Ok(rep) => {
                if rep.frames_split > 0 || rep.whole_frames_freed > 0 {
                    log::debug!(
                        "balloon {what}: [{gpa:#x}, +{len:#x}) split {} frame(s), freed {} whole",
                        rep.frames_split,
                        rep.whole_frames_freed
                    );
                }
                record(m, &self.metrics, &rep, self.requested, &timed.windows());
            }
            Err(e) => log::warn!(
                "balloon {what}: giving back [{gpa:#x}, +{len:#x}) failed: {e}; the pages stay backed"
            ),
        }
    }
}

impl BalloonBackend for RamBackend {
    fn inflate(&mut self, pfns: &[u64]) {
        let Some(m) = self.machine.upgrade() else {
            return;
        };
        for (first, n) in pfn_runs(pfns) {
            self.give_back(m.as_ref(), first * PAGE_SIZE, n * PAGE_SIZE, false);
        }
    }

    fn deflate(&mut self, pfns: &[u64]) {
        let Some(m) = self.machine.upgrade() else {
            return;
        };
        for (first, n) in pfn_runs(pfns) {
            let (gpa, len) = (first * PAGE_SIZE, n * PAGE_SIZE);
            let r = m.ram().refill(gpa, len, m.vcpus());
            match r {
                Ok(()) => m.recorder().refilled(n),
                Err(e) => log::warn!(
                    "balloon deflate: taking back [{gpa:#x}, +{len:#x}) failed: {e}; \
                     the pages read as zero pages"
                ),
            }
        }
    }

    fn report_free(&mut self, gpa: u64, len: u64) {
        let Some(m) = self.machine.upgrade() else {
            return;
        };
        // Whole frames, and frames the run completes with pages queued by
        // inflates: splitting a frame for a free run the guest may reuse any
        // moment would cost a copy for nothing.
        self.give_back(m.as_ref(), gpa, len, true);
    }
}

/// What `vmm ctl stats` and the run report show of the balloon.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BalloonStatus {
    /// Whether the guest's driver activated the device.
    pub driver_active: bool,
    /// The target in 4K pages (`num_pages`).
    pub target_pages: u32,
    /// The driver's last reported balloon size in 4K pages (`actual`).
    pub actual_pages: u32,
    /// Pages inflated now, by the device's own books.
    pub inflated_pages: u64,
    /// 2M frames whose every page is inflated now.
    pub inflated_whole_frames: u64,
    /// 2M frames inflated in part now.
    pub inflated_partial_frames: u64,
    /// PFNs handed to the backend's inflate so far.
    pub inflated_total: u64,
    /// PFNs handed to the backend's deflate so far.
    pub deflated_total: u64,
    /// Free page runs reported by the guest.
    pub reported_runs: u64,
    /// Bytes in those runs.
    pub reported_bytes: u64,
    /// Rejected guest input: PFNs outside RAM, double inflates, deflates of
    /// pages not inflated, bad chains, unaligned runs.
    pub rejected: u64,
    /// The guest's last memory statistics by name.
    pub guest_stats: std::collections::BTreeMap<String, u64>,
    /// Give-backs: whole frames freed, frames split and deferred, pauses,
    /// time from give-back to host memory freed.
    pub give_back: GiveBackMetrics,
}

/// The balloon device as the VMM runs it.
pub struct BalloonDevice {
    slot: MmioSlot,
    transport: Mutex<MmioTransport<Balloon<RamBackend>>>,
    /// A target to (re)announce once the driver is ready.
    pending_target: Mutex<Option<u64>>,
    /// What the give-backs did (shared with the backend).
    metrics: Arc<GiveBackRecorder>,
}

impl std::fmt::Debug for BalloonDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonDevice")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl BalloonDevice {
    /// A balloon over `m`'s guest RAM (as `layout` places it, view `mem`) raising
    /// `line`; `initial_target` bytes are asked for once the driver is ready;
    /// free page reporting is offered if `free_page_reporting`.
    pub fn new(
        m: Weak<impl RamHandle + 'static>,
        mem: vm_memory::GuestMemoryMmap,
        layout: guest_mem::RamLayout,
        line: Arc<dyn Interrupt>,
        initial_target: Option<u64>,
        free_page_reporting: bool,
    ) -> Result<BalloonDevice, BalloonError> {
        let metrics = Arc::new(GiveBackRecorder::new(SplitPolicy::default()));
        let backend = RamBackend {
            machine: m as Weak<dyn RamHandle>,
            requested: None,
            policy: SplitPolicy::default(),
            metrics: metrics.clone(),
        };
        let cfg = BalloonConfig {
            reporting: free_page_reporting,
            hole: (layout.high_size() > 0)
                .then_some((guest_mem::MMIO_HOLE_START, guest_mem::HIGH_RAM_START)),
            ..BalloonConfig::new(layout.span())
        };
        let balloon = Balloon::new(cfg, backend)?;
        let mut transport = MmioTransport::new(balloon, mem, line);
        if let Some(t) = initial_target {
            transport.device_mut().set_target(t / PAGE_SIZE);
        }
        Ok(BalloonDevice {
            slot: BALLOON_SLOT,
            transport: Mutex::new(transport),
            pending_target: Mutex::new(initial_target),
            metrics,
        })
    }

    /// When partly given-back frames are split (default: deferred, 500 ms).
    pub fn set_split_policy(&mut self, policy: SplitPolicy) {
        self.metrics = Arc::new(GiveBackRecorder::new(policy));
        let mut t = self.lock();
        let b = t.device_mut().backend_mut();
        b.policy = policy;
        b.metrics = self.metrics.clone();
    }

    /// When partly given-back frames are split.
    pub fn split_policy(&self) -> SplitPolicy {
        self.lock().device_mut().backend_mut().policy
    }

    /// The give-back recorder.
    pub fn metrics(&self) -> &GiveBackRecorder {
        &self.metrics
    }

    /// Where the device lives.
    pub fn slot(&self) -> MmioSlot {
        self.slot
    }

    /// The transport (lock order: transport, then guest RAM).
    pub fn lock(&self) -> MutexGuard<'_, MmioTransport<Balloon<RamBackend>>> {
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending(&self) -> MutexGuard<'_, Option<u64>> {
        self.pending_target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Guest MMIO read at `addr`; false if it is not the balloon's.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some(off) = self.slot.offset_of(addr) else {
            return false;
        };
        self.lock().read(off, data);
        true
    }

    /// Guest MMIO write at `addr` that exited at `exit_at`; false if it is
    /// not the balloon's.
    pub fn mmio_write(&self, addr: u64, data: &[u8], exit_at: Instant) -> bool {
        let Some(off) = self.slot.offset_of(addr) else {
            return false;
        };
        let mut t = self.lock();
        t.device_mut().backend_mut().requested = Some(exit_at);
        t.write(off, data);
        t.device_mut().backend_mut().requested = None;
        if t.device().is_active() {
            if let Some(bytes) = self.pending().take() {
                let pages = t.device_mut().set_target(bytes / PAGE_SIZE);
                log::info!("balloon: driver ready; target {pages} pages announced");
            }
        }
        true
    }

    /// Ask the guest to hold `bytes` in the balloon; returns the target in
    /// 4K pages (clamped to guest RAM).
    pub fn set_target_bytes(&self, bytes: u64) -> u32 {
        let mut t = self.lock();
        let pages = t.device_mut().set_target(bytes / PAGE_SIZE);
        *self.pending() = if t.device().is_active() {
            None
        } else {
            Some(bytes)
        };
        pages
    }

    /// The balloon's state (takes guest RAM after the transport).
    pub fn status(&self) -> BalloonStatus {
        let t = self.lock();
        let give_back = {
            let st = t
                .device()
                .backend()
                .machine
                .upgrade()
                .map(|m| m.ram().give_back_status());
            self.metrics.snapshot(st.as_ref())
        };
        let d = t.device();
        let c = d.counters();
        BalloonStatus {
            driver_active: d.is_active(),
            target_pages: d.target(),
            actual_pages: d.actual(),
            inflated_pages: d.inflated_pages(),
            inflated_whole_frames: d.inflated_frames().0,
            inflated_partial_frames: d.inflated_frames().1,
            inflated_total: c.inflated_pfns,
            deflated_total: c.deflated_pfns,
            reported_runs: c.reported_runs,
            reported_bytes: c.reported_bytes,
            rejected: c.pfn_out_of_range
                + c.pfn_already_inflated
                + c.pfn_not_inflated
                + c.chains_rejected
                + c.runs_rejected,
            guest_stats: d
                .stats()
                .values
                .iter()
                .map(|(k, v)| (tag_name(*k).to_string(), *v))
                .collect(),
            give_back,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_sorted_pfns() {
        assert_eq!(pfn_runs(&[5, 3, 4, 9, 9, 10]), vec![(3, 3), (9, 2)]);
        assert!(pfn_runs(&[]).is_empty());
    }

    #[test]
    fn whole_frames_inside_a_run() {
        let m = HPAGE_SIZE;
        assert_eq!(whole_frames(0, m), Some((0, m)));
        assert_eq!(whole_frames(4096, m), None);
        assert_eq!(whole_frames(4096, 3 * m), Some((m, 2 * m)));
        assert_eq!(whole_frames(4096, 2 * m), Some((m, m)));
        assert_eq!(whole_frames(m - 4096, 2 * m + 8192), Some((m, 2 * m)));
        assert_eq!(whole_frames(u64::MAX - 4095, 4096), None);
    }
}
