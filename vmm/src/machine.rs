//! State shared by the vCPU threads and the main thread: devices, guest RAM,
//! the pause/stop control and the outcome of the run.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use guest_mem::{GuestRam, SplitWindows};
use vm_memory::GuestMemoryMmap;

use crate::balloon_backend::BalloonDevice;
use crate::collapser::Collapser;
use crate::control::VcpuControl;
use crate::devices::serial::{SerialDevice, SerialFlags};
use crate::halt::HaltWatch;
use crate::host::HostInfo;
use crate::mirror::{self, LiveMirror, MirrorContext, PhaseTouches, Prediction};
use crate::outcome::Outcome;
use crate::ram_handle::RamHandle;
use crate::split_reserve::SplitReserve;
use crate::stats::{KvmStats, MappingStats};
use crate::testguest::device::TestDevice;
use crate::unmap_stats::UnmapRecorder;

/// How long a checkpoint waits for the split-reserve worker to catch up
/// before its collapse pass (it takes a few ms; more on a loaded host).
const RESERVE_CATCH_UP: Duration = Duration::from_secs(5);

/// What runs in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    /// A Linux kernel.
    Linux,
    /// A built-in test guest.
    TestGuest,
}

/// A value a test guest reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// vCPU that reported.
    pub vcpu: usize,
    /// Raw key (`testguest::device::ReportKey`).
    pub key: u64,
    /// Value.
    pub value: u64,
}

/// KVM's counters at a test guest's CHECKPOINT.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Checkpoint {
    /// vCPU that asked.
    pub vcpu: usize,
    /// Guest-defined phase.
    pub phase: u64,
    /// KVM's mapping counters then.
    pub kvm: MappingStats,
    /// The mirror's prediction then (`None` without a mirror context).
    pub mirror_pages_4k: Option<u64>,
    /// The mirror's predicted 2M mappings then.
    pub mirror_pages_2m: Option<u64>,
    /// The mirror's predicted 1G mappings then.
    pub mirror_pages_1g: Option<u64>,
    /// The whole prediction then.
    pub mirror: Option<Prediction>,
    /// Whether KVM agreed with it (exactly, or within the printed bound).
    pub mirror_agrees: bool,
    /// Host frame states then (from `GuestRam`).
    pub frames: FrameCounts,
    /// Frames the collapser collapsed right after this checkpoint.
    pub collapsed_after: u64,
}

/// When the mirror is asked for a prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorPoint {
    /// A test guest's CHECKPOINT `phase` from `vcpu`.
    Checkpoint {
        /// vCPU.
        vcpu: usize,
        /// Phase.
        phase: u64,
    },
    /// The end of the run (every vCPU stopped).
    End,
    /// A live look in the middle of a phase (`vmm ctl stats`): informative.
    Snapshot,
}

/// Everything the vCPU threads share.
pub struct Machine {
    /// The balloon holds a vm-memory view of guest RAM: declared (so
    /// dropped) before `mem` and `ram`, or guest RAM would be dropped while
    /// a view is alive (and leak its address range).
    balloon: OnceLock<Arc<BalloonDevice>>,
    /// Pause / stop of the vCPU threads.
    pub control: VcpuControl,
    /// The probe for a guest that halted for good (Linux guests).
    pub halt: HaltWatch,
    /// COM1.
    pub serial: Mutex<SerialDevice>,
    /// What the serial watcher saw.
    pub serial_flags: Arc<SerialFlags>,
    /// The vm-memory view of guest RAM (declared before `ram`: dropped first).
    pub mem: GuestMemoryMmap,
    /// Guest RAM (discard / refill go through here).
    pub ram: Mutex<GuestRam>,
    /// How long each split without a pause held back writes to its frame.
    pub split_windows: Arc<SplitWindows>,
    /// The test device (test guests only).
    pub test_device: Option<TestDevice>,
    /// Host facts.
    pub host: HostInfo,
    /// Linux or test guest.
    pub kind: GuestKind,
    /// KVM statistics of the VM.
    pub stats: Option<KvmStats>,
    /// Values reported by a test guest.
    pub reports: Mutex<Vec<Report>>,
    /// Stats taken at test-guest checkpoints.
    pub checkpoints: Mutex<Vec<Checkpoint>>,
    /// Split / collapse measurements.
    pub unmap: UnmapRecorder,
    collapser: OnceLock<Arc<Collapser>>,
    split_reserve: OnceLock<Arc<SplitReserve>>,
    mirror_ctx: OnceLock<MirrorContext>,
    live_mirror: Mutex<Option<LiveMirror>>,
    outcome: Mutex<Option<Outcome>>,
    outcome_cv: Condvar,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("kind", &self.kind)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Parts of a [`Machine`].
pub struct MachineParts {
    /// vCPU count.
    pub vcpus: usize,
    /// COM1.
    pub serial: SerialDevice,
    /// Its watcher's flags.
    pub serial_flags: Arc<SerialFlags>,
    /// Guest RAM.
    pub ram: GuestRam,
    /// The test device.
    pub test_device: Option<TestDevice>,
    /// Host facts.
    pub host: HostInfo,
    /// Linux or test guest.
    pub kind: GuestKind,
    /// KVM statistics.
    pub stats: Option<KvmStats>,
}

impl Machine {
    /// Assemble the shared state.
    pub fn new(p: MachineParts) -> Machine {
        let mem = p.ram.memory();
        let split_windows = p.ram.split_windows();
        Machine {
            control: VcpuControl::new(p.vcpus).with_split_holds(split_windows.clone()),
            halt: HaltWatch::new(p.vcpus),
            serial: Mutex::new(p.serial),
            serial_flags: p.serial_flags,
            mem,
            ram: Mutex::new(p.ram),
            split_windows: split_windows.clone(),
            test_device: p.test_device,
            host: p.host,
            kind: p.kind,
            stats: p.stats,
            reports: Mutex::new(Vec::new()),
            checkpoints: Mutex::new(Vec::new()),
            unmap: UnmapRecorder::with_split_windows(split_windows),
            balloon: OnceLock::new(),
            collapser: OnceLock::new(),
            split_reserve: OnceLock::new(),
            mirror_ctx: OnceLock::new(),
            live_mirror: Mutex::new(None),
            outcome: Mutex::new(None),
            outcome_cv: Condvar::new(),
        }
    }

    /// Record the end of the run (the first one wins).
    pub fn finish(&self, o: Outcome) {
        let mut g = lock(&self.outcome);
        if g.is_none() {
            log::debug!("run ends: {}", o.describe());
            *g = Some(o);
        }
        self.outcome_cv.notify_all();
    }

    /// The outcome, waiting at most `timeout` for one.
    pub fn wait_outcome(&self, timeout: Duration) -> Option<Outcome> {
        let g = lock(&self.outcome);
        let (g, _) = self
            .outcome_cv
            .wait_timeout_while(g, timeout, |o| o.is_none())
            .unwrap_or_else(|p| p.into_inner());
        g.clone()
    }

    /// The outcome if there is one.
    pub fn outcome(&self) -> Option<Outcome> {
        lock(&self.outcome).clone()
    }

    /// Guest RAM.
    pub fn ram(&self) -> MutexGuard<'_, GuestRam> {
        lock(&self.ram)
    }

    /// COM1.
    pub fn serial(&self) -> MutexGuard<'_, SerialDevice> {
        lock(&self.serial)
    }

    /// Write a line of VMM-side text (test-guest PRINT) to the serial sink.
    pub fn print_line(&self, text: &str) {
        let mut s = self.serial();
        let w = s.writer_mut();
        let r = w
            .write_all(text.as_bytes())
            .and_then(|_| {
                if text.ends_with('\n') {
                    Ok(())
                } else {
                    w.write_all(b"\n")
                }
            })
            .and_then(|_| w.flush());
        if let Err(e) = r {
            log::warn!("writing guest output failed: {e}");
        }
    }

    /// Record a test-guest report.
    pub fn report(&self, r: Report) {
        lock(&self.reports).push(r);
    }

    /// Reports so far.
    pub fn reports(&self) -> Vec<Report> {
        lock(&self.reports).clone()
    }

    /// Attach the virtio-balloon (once, before the vCPUs run).
    pub fn set_balloon(&self, b: Arc<BalloonDevice>) {
        if self.balloon.set(b).is_err() {
            log::warn!("a balloon is already attached; ignoring the second one");
        }
    }

    /// The virtio-balloon, if the run has one.
    pub fn balloon(&self) -> Option<&Arc<BalloonDevice>> {
        self.balloon.get()
    }

    /// Attach the collapser (once).
    pub fn set_collapser(&self, c: Arc<Collapser>) {
        if self.collapser.set(c).is_err() {
            log::warn!("a collapser is already attached; ignoring the second one");
        }
    }

    /// The collapser, if the run has one.
    pub fn collapser(&self) -> Option<&Arc<Collapser>> {
        self.collapser.get()
    }

    /// Attach the split-reserve worker (once): a checkpoint's collapse pass
    /// waits until it caught up.
    pub fn set_split_reserve(&self, r: Arc<SplitReserve>) {
        if self.split_reserve.set(r).is_err() {
            log::warn!("a split reserve is already attached; ignoring the second one");
        }
    }

    /// Set what the mirror needs to predict KVM's counters during the run.
    pub fn set_mirror_context(&self, ctx: MirrorContext) {
        let _ = self.mirror_ctx.set(ctx);
    }

    /// The mirror context, if set.
    pub fn mirror_context(&self) -> Option<&MirrorContext> {
        self.mirror_ctx.get()
    }

    /// The mirror's prediction at `at`, with `ram` locked by the caller
    /// (`None` without a mirror context or when the mirror refuses). For a
    /// test guest the run's [`LiveMirror`] first replays the host changes
    /// since its last look, then the guest's accesses of the phase.
    pub fn predict(&self, ram: &mut GuestRam, at: MirrorPoint) -> Option<Prediction> {
        let ctx = self.mirror_ctx.get()?;
        let states = ram.frame_states();
        let r = match &ctx.guest {
            None => {
                mirror::predict_quiescent(ctx, ram, mirror::frame_levels(&states, None), false, 0)
            }
            Some(g) => {
                let mut live = lock(&self.live_mirror);
                let l = match live.as_mut() {
                    Some(l) => l,
                    None => match LiveMirror::new(ctx, ram.host_addr(), ram.memslots()) {
                        Ok(l) => live.insert(l),
                        Err(e) => {
                            log::warn!("the KVM mirror could not start: {e}");
                            return None;
                        }
                    },
                };
                let changed = ram.take_changed_frames();
                let pages = ram.take_changed_pages();
                let single = g.work.len() <= 1;
                let phase = match at {
                    MirrorPoint::Checkpoint { vcpu, phase } => PhaseTouches {
                        work: g.work_touched_before(Some(phase)),
                        stack: g.stack_touched_before(Some(phase)),
                        vcpu: (!single).then_some(vcpu),
                        comparable: single,
                        checkpoint: Some(phase),
                    },
                    MirrorPoint::End => PhaseTouches {
                        work: g.work_touched_before(None),
                        stack: g.stack_touched_before(None),
                        vcpu: None,
                        comparable: true,
                        checkpoint: None,
                    },
                    MirrorPoint::Snapshot => PhaseTouches {
                        work: false,
                        stack: true,
                        vcpu: None,
                        comparable: false,
                        checkpoint: None,
                    },
                };
                l.invalidate_frames(&changed)
                    .and_then(|()| l.invalidate_pages(&pages))
                    .and_then(|()| l.observe(ctx, &states, phase))
            }
        };
        match r {
            Ok(p) => Some(p),
            Err(e) => {
                log::warn!("the KVM mirror could not predict: {e}");
                None
            }
        }
    }

    /// Record KVM's counters, the mirror's prediction and the frame states at
    /// a checkpoint; then, if the run has a collapser, let it collapse every
    /// frame its policy allows (so the next checkpoint sees the result
    /// deterministically). Called on a vCPU thread, outside `KVM_RUN`.
    pub fn checkpoint(&self, vcpu: usize, phase: u64) {
        // Another thread may hold guest RAM while it pauses every vCPU. KVM's
        // counters are read with guest RAM locked: no host change can run
        // between them and the prediction.
        let (kvm, frames, predicted) = self.control.parked_while(|| {
            let mut ram = self.ram();
            let kvm = match self.stats.as_ref().map(KvmStats::mapping) {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    log::warn!("checkpoint {phase}: reading KVM stats failed: {e}");
                    MappingStats::default()
                }
                None => MappingStats::default(),
            };
            let p = self.predict(&mut ram, MirrorPoint::Checkpoint { vcpu, phase });
            (kvm, FrameCounts::of(&ram.frame_states(), ram.layout()), p)
        });
        let agrees = match (&predicted, kvm.counts()) {
            (Some(p), Some(k)) => p.agrees(k),
            _ => true,
        };
        if let (Some(p), Some(k)) = (&predicted, kvm.counts()) {
            let line = format!(
                "checkpoint {phase} (vCPU {vcpu}): KVM {}/{}/{}, mirror {}/{}/{} \
                 (pages_4k/2m/1g): {}",
                k.pages_4k,
                k.pages_2m,
                k.pages_1g,
                p.pages_4k,
                p.pages_2m,
                p.pages_1g,
                p.describe(k)
            );
            if agrees {
                log::info!("{line}");
            } else {
                log::error!("{line}");
            }
        }
        let collapsed_after = match self.collapser.get() {
            Some(c) => {
                self.reserve_caught_up(phase);
                self.control.parked_while(|| c.pass_all(self))
            }
            None => 0,
        };
        lock(&self.checkpoints).push(Checkpoint {
            vcpu,
            phase,
            kvm,
            mirror_pages_4k: predicted.as_ref().map(|p| p.pages_4k),
            mirror_pages_2m: predicted.as_ref().map(|p| p.pages_2m),
            mirror_pages_1g: predicted.as_ref().map(|p| p.pages_1g),
            mirror: predicted,
            mirror_agrees: agrees,
            frames,
            collapsed_after,
        });
    }

    /// Before a checkpoint's collapse pass: the split-reserve worker (if
    /// any) has replaced the huge pages and blocks taken so far, so the
    /// pass finds what it would find in a guest that did not checkpoint
    /// right after its splits (at most [`RESERVE_CATCH_UP`], with the vCPUs
    /// running).
    fn reserve_caught_up(&self, phase: u64) {
        if let Some(r) = self.split_reserve.get() {
            if !r.wait_caught_up(RESERVE_CATCH_UP) {
                log::warn!(
                    "checkpoint {phase}: the split-reserve worker did not catch up within \
                     {RESERVE_CATCH_UP:?}; the collapse pass runs without it"
                );
            }
        }
    }

    /// Checkpoints so far.
    pub fn checkpoints(&self) -> Vec<Checkpoint> {
        lock(&self.checkpoints).clone()
    }
}

impl RamHandle for Machine {
    fn ram(&self) -> MutexGuard<'_, GuestRam> {
        Machine::ram(self)
    }
    fn with_ram_after_balloon(&self, f: &mut dyn FnMut(&mut GuestRam)) {
        let _device = self.balloon().map(|b| b.lock());
        f(&mut Machine::ram(self));
    }
    fn with_balloon_ram(
        &self,
        f: &mut dyn FnMut(&mut GuestRam, &crate::give_back_stats::GiveBackRecorder),
    ) -> bool {
        let Some(b) = self.balloon() else {
            return false;
        };
        let _device = b.lock();
        f(&mut Machine::ram(self), b.metrics());
        true
    }
    fn vcpus(&self) -> &VcpuControl {
        &self.control
    }
    fn recorder(&self) -> &UnmapRecorder {
        &self.unmap
    }
}

/// Frame states of guest RAM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FrameCounts {
    /// Frames mapped by one 2M page on the host.
    pub huge: usize,
    /// Frames mapped by small pages.
    pub small: usize,
    /// Frames not populated.
    pub unpopulated: usize,
    /// Frames that are part of a 1G page on the host.
    pub gig: usize,
    /// Of `huge`: frames the balloon gave back whole, their huge page freed
    /// on the host until the guest touches them again (then a fresh huge
    /// page of the pool is faulted in).
    pub released: usize,
}

impl FrameCounts {
    /// `huge/small` for the reports, led by the 1G pages when there are any
    /// (`2x1G+500/12`: two 1G pages, 500 2M frames, 12 small frames).
    pub fn huge_small(&self) -> String {
        let gigs = self.gig / guest_mem::FRAMES_PER_GIG;
        if gigs > 0 {
            format!("{gigs}x1G+{}/{}", self.huge, self.small)
        } else {
            format!("{}/{}", self.huge, self.small)
        }
    }

    /// Count the RAM frames of `states` (indexed by frame; the 32-bit MMIO
    /// hole's frames are not RAM and not counted).
    pub fn of(states: &[guest_mem::FrameView], layout: guest_mem::RamLayout) -> FrameCounts {
        Self::of_range(states, layout, 0..u64::MAX)
    }

    /// Count the RAM frames of `states` that overlap guest-physical `range`.
    pub fn of_range(
        states: &[guest_mem::FrameView],
        layout: guest_mem::RamLayout,
        range: std::ops::Range<u64>,
    ) -> FrameCounts {
        let hpage = guest_mem::HPAGE_SIZE;
        let mut c = FrameCounts::default();
        let frames = layout
            .ram_frame_indices()
            .filter(|f| {
                let gpa = *f as u64 * hpage;
                gpa < range.end && gpa + hpage > range.start
            })
            .filter_map(|f| states.get(f));
        for f in frames {
            match f {
                guest_mem::FrameView::Huge { .. } => c.huge += 1,
                guest_mem::FrameView::Small { .. } => c.small += 1,
                guest_mem::FrameView::Unpopulated => c.unpopulated += 1,
                guest_mem::FrameView::Gig { .. } => c.gig += 1,
            }
        }
        c
    }
}
