//! The balloon device model (virtio 1.x section 5.5): configuration space,
//! queue roles and dispatch of each queue's buffers.

use std::sync::Arc;

use crate::devices::warn_limit::guest_warn;
use log::info;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::backend::BalloonBackend;
use super::pages::{self, PageOp};
use super::pfn_set::PfnSet;
use super::stats::BalloonStats;
use super::{
    BalloonConfig, BalloonCounters, BalloonError, F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT,
    F_MUST_TELL_HOST, F_REPORTING, F_STATS_VQ, PAGE_SIZE, QUEUE_SIZE,
};
use crate::devices::virtio_mmio::chain::{add_used, drain_queue, Completion, Drained};
use crate::devices::virtio_mmio::{ActivateError, InterruptState, VirtioDevice};

/// Size of `struct virtio_balloon_config` (num_pages, actual,
/// free_page_hint_cmd_id, poison_val).
const CONFIG_SIZE: usize = 16;
/// Largest stats buffer read (the Linux driver sends 10 entries, 100 bytes).
const MAX_STATS_BYTES: usize = 4096;

/// What a virtqueue is for; the index of each depends on the negotiated
/// features (virtio 1.x 5.5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    /// inflateq: PFNs the guest gives up.
    Inflate,
    /// deflateq: PFNs the guest takes back.
    Deflate,
    /// statsq: memory statistics.
    Stats,
    /// free_page_vq (never negotiated: the device does not offer it).
    FreePageHint,
    /// reporting_vq: free page runs.
    Reporting,
}

impl QueueRole {
    fn name(self) -> &'static str {
        match self {
            QueueRole::Inflate => "balloon inflate",
            QueueRole::Deflate => "balloon deflate",
            QueueRole::Stats => "balloon stats",
            QueueRole::FreePageHint => "balloon free-page-hint",
            QueueRole::Reporting => "balloon reporting",
        }
    }
}

/// Queue roles by index for the negotiated `features`.
pub fn queue_roles(features: u64) -> Vec<QueueRole> {
    let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
    if features & F_STATS_VQ != 0 {
        roles.push(QueueRole::Stats);
    }
    if features & F_FREE_PAGE_HINT != 0 {
        roles.push(QueueRole::FreePageHint);
    }
    if features & F_REPORTING != 0 {
        roles.push(QueueRole::Reporting);
    }
    roles
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Option<Queue>>,
    roles: Vec<QueueRole>,
    /// The stats buffer the device holds until it wants fresh statistics.
    stats_head: Option<u16>,
}

/// A virtio memory balloon over guest RAM `0..ram_size`.
pub struct Balloon<B: BalloonBackend> {
    backend: B,
    features: u64,
    queue_max: Vec<u16>,
    inflated: PfnSet,
    num_pages: u32,
    actual: u32,
    irq: Option<Arc<InterruptState>>,
    active: Option<Active>,
    stats: BalloonStats,
    counters: BalloonCounters,
}

impl<B: BalloonBackend> Balloon<B> {
    /// A balloon for `cfg.ram_size` bytes of guest RAM acting through `backend`.
    pub fn new(cfg: BalloonConfig, backend: B) -> Result<Self, BalloonError> {
        let max = u64::from(u32::MAX) + 1;
        if cfg.ram_size == 0
            || cfg.ram_size & (PAGE_SIZE - 1) != 0
            || cfg.ram_size / PAGE_SIZE > max
        {
            return Err(BalloonError::BadRamSize {
                ram_size: cfg.ram_size,
            });
        }
        let mut features = (1u64 << VIRTIO_F_VERSION_1) | F_MUST_TELL_HOST;
        let mut queues = 2;
        if cfg.stats {
            features |= F_STATS_VQ;
            queues += 1;
        }
        if cfg.reporting {
            features |= F_REPORTING;
            queues += 1;
        }
        if cfg.deflate_on_oom {
            features |= F_DEFLATE_ON_OOM;
        }
        Ok(Balloon {
            backend,
            features,
            queue_max: vec![QUEUE_SIZE; queues],
            inflated: PfnSet::new(cfg.ram_size / PAGE_SIZE)
                .with_hole(cfg.hole.map_or(0..0, |(s, e)| s / PAGE_SIZE..e / PAGE_SIZE)),
            num_pages: 0,
            actual: 0,
            irq: None,
            active: None,
            stats: BalloonStats::default(),
            counters: BalloonCounters::default(),
        })
    }

    /// Ask the guest to hold `pages` 4K pages in the balloon (clamped to
    /// guest RAM). Raises a configuration-change interrupt if the driver is
    /// running. Returns the target set.
    pub fn set_target(&mut self, pages: u64) -> u32 {
        let clamped = pages.min(self.inflated.pages()).min(u64::from(u32::MAX));
        if clamped != pages {
            guest_warn!("balloon: target of {pages} pages clamped to {clamped} (guest RAM)");
        }
        self.num_pages = clamped as u32;
        info!("balloon: target {} pages", self.num_pages);
        if let Some(irq) = &self.irq {
            if self.active.is_some() {
                irq.signal_config_change();
            } else {
                irq.bump_config_generation();
            }
        }
        self.num_pages
    }

    /// The target (`num_pages` in config space).
    pub fn target(&self) -> u32 {
        self.num_pages
    }

    /// What the driver last reported as its balloon size (`actual`).
    pub fn actual(&self) -> u32 {
        self.actual
    }

    /// 2M frames every page of which is inflated, and frames inflated in part.
    pub fn inflated_frames(&self) -> (u64, u64) {
        (self.inflated.full_frames(), self.inflated.partial_frames())
    }

    /// Pages currently inflated according to the device's own books.
    pub fn inflated_pages(&self) -> u64 {
        self.inflated.count()
    }

    /// Whether `pfn` is inflated.
    pub fn is_inflated(&self, pfn: u64) -> bool {
        self.inflated.contains(pfn)
    }

    /// Last statistics the guest reported.
    pub fn stats(&self) -> &BalloonStats {
        &self.stats
    }

    /// What the device has done and rejected so far.
    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Whether the driver activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Ask the guest for fresh statistics by returning the stats buffer it
    /// left with the device (virtio 1.x 5.5.6.3). Returns false if there is
    /// no such buffer (stats not negotiated, or the guest has not refilled it
    /// yet).
    pub fn request_stats(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let Some(index) = active.roles.iter().position(|r| *r == QueueRole::Stats) else {
            return false;
        };
        let Some(head) = active.stats_head else {
            return false;
        };
        let Some(queue) = active.queues.get_mut(index).and_then(Option::as_mut) else {
            return false;
        };
        active.stats_head = None;
        if !add_used(queue, &active.mem, head, 0, QueueRole::Stats.name()) {
            return false;
        }
        if let Some(irq) = &self.irq {
            irq.signal_used_queue();
        }
        true
    }

    fn give_back_all(&mut self) {
        let pfns = self.inflated.take_all();
        if !pfns.is_empty() {
            info!(
                "balloon: reset with {} pages inflated; deflating them",
                pfns.len()
            );
            self.counters.deflated_pfns += pfns.len() as u64;
            self.backend.deflate(&pfns);
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        c[4..8].copy_from_slice(&self.actual.to_le_bytes());
        c
    }
}

impl<B: BalloonBackend> VirtioDevice for Balloon<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut c = self.config_bytes();
        for (i, &b) in data.iter().enumerate() {
            let o = offset.saturating_add(i as u64);
            if (4..8).contains(&o) {
                c[o as usize] = b;
            } else {
                guest_warn!("balloon: driver write to read-only config byte {o:#x} ignored");
            }
        }
        self.actual = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
    }

    fn attach_interrupt(&mut self, irq: Arc<InterruptState>) {
        self.irq = Some(irq);
    }

    fn activate(
        &mut self,
        acked_features: u64,
        queues: Vec<Option<Queue>>,
        mem: GuestMemoryMmap,
    ) -> Result<(), ActivateError> {
        let roles = queue_roles(acked_features);
        for (index, role) in roles.iter().enumerate() {
            let present = queues.get(index).is_some_and(Option::is_some);
            match role {
                QueueRole::Inflate | QueueRole::Deflate if !present => {
                    return Err(ActivateError::MissingQueue {
                        index,
                        name: role.name(),
                    });
                }
                _ if !present => guest_warn!(
                    "balloon: {} queue {index} negotiated but not set up; it stays idle",
                    role.name()
                ),
                _ => {}
            }
        }
        info!(
            "balloon: active, features {acked_features:#x}, queues {roles:?}, {} pages of RAM",
            self.inflated.pages()
        );
        self.active = Some(Active {
            mem,
            queues,
            roles,
            stats_head: None,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> bool {
        let Balloon {
            backend,
            inflated,
            active,
            stats,
            counters,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            guest_warn!("balloon: notify for queue {index} before activation ignored");
            return false;
        };
        let Some(&role) = active.roles.get(index) else {
            guest_warn!(
                "balloon: notify for queue {index}, which has no role with the negotiated features"
            );
            return false;
        };
        let Some(queue) = active.queues.get_mut(index).and_then(Option::as_mut) else {
            guest_warn!(
                "balloon: notify for {} queue {index}, which is not set up",
                role.name()
            );
            return false;
        };
        let mem = &active.mem;
        let drained = match role {
            QueueRole::Inflate | QueueRole::Deflate => {
                let op = if role == QueueRole::Inflate {
                    PageOp::Inflate
                } else {
                    PageOp::Deflate
                };
                drain_queue(queue, mem, role.name(), |_, descs| {
                    let pfns = pages::read_pfns(mem, descs, op);
                    let accepted = pages::apply(inflated, op, &pfns, counters);
                    if !accepted.is_empty() {
                        match op {
                            PageOp::Inflate => backend.inflate(&accepted),
                            PageOp::Deflate => backend.deflate(&accepted),
                        }
                    }
                    Completion::Used(0)
                })
            }
            QueueRole::Stats => {
                let mut displaced = Vec::new();
                let stats_head = &mut active.stats_head;
                let mut d = drain_queue(queue, mem, role.name(), |head, descs| {
                    let bytes = read_readable(mem, descs, MAX_STATS_BYTES, role.name());
                    let rest = stats.update(&bytes);
                    if rest != 0 {
                        guest_warn!("balloon stats queue: ignoring {rest} trailing bytes");
                    }
                    if let Some(old) = stats_head.replace(head) {
                        displaced.push(old);
                    }
                    Completion::Hold
                });
                for old in displaced {
                    guest_warn!("balloon stats queue: driver queued a second stats buffer; returning the old one");
                    d.notify |= add_used(queue, mem, old, 0, role.name());
                }
                d
            }
            QueueRole::Reporting => drain_queue(queue, mem, role.name(), |_, descs| {
                for d in descs {
                    report_run(backend, counters, inflated, d);
                }
                Completion::Used(0)
            }),
            QueueRole::FreePageHint => {
                guest_warn!("balloon: free page hinting is not offered; queue {index} ignored");
                Drained::default()
            }
        };
        counters.chains_rejected += drained.rejected;
        drained.notify
    }

    fn reset(&mut self) {
        self.give_back_all();
        self.actual = 0;
        self.active = None;
    }
}

/// Hand one reported free run to the backend if it is page aligned guest
/// RAM (`ram`: the PFNs that are).
fn report_run<B: BalloonBackend>(
    backend: &mut B,
    counters: &mut BalloonCounters,
    ram: &PfnSet,
    d: &Descriptor,
) {
    let (gpa, len) = (d.addr().0, u64::from(d.len()));
    if len == 0 {
        return;
    }
    if (gpa | len) & (PAGE_SIZE - 1) != 0 {
        guest_warn!("balloon reporting queue: run {gpa:#x}+{len:#x} is not 4K aligned; ignored");
        counters.runs_rejected += 1;
        return;
    }
    if !ram.covers(gpa / PAGE_SIZE, len / PAGE_SIZE) {
        guest_warn!(
            "balloon reporting queue: run {gpa:#x}+{len:#x} is not guest RAM (past its end or \
             in the 32-bit MMIO hole); ignored"
        );
        counters.runs_rejected += 1;
        return;
    }
    counters.reported_runs += 1;
    counters.reported_bytes += len;
    backend.report_free(gpa, len);
}

/// Concatenate up to `max` bytes of the device-readable buffers of a chain.
fn read_readable(mem: &GuestMemoryMmap, descs: &[Descriptor], max: usize, label: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    for d in descs.iter().filter(|d| !d.is_write_only()) {
        let take = (d.len() as usize).min(max - bytes.len());
        let start = bytes.len();
        bytes.resize(start + take, 0);
        if let Err(e) = mem.read_slice(&mut bytes[start..], d.addr()) {
            guest_warn!("{label} queue: cannot read buffer {:#x}: {e}", d.addr().0);
            bytes.truncate(start);
        }
    }
    bytes
}
