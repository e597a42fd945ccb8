//! virtio memory balloon (device ID 5) over the virtio-mmio transport; pure
//! device logic, no KVM. The VMM supplies a [`BalloonBackend`] that gives
//! guest pages back to the host and takes them back.
//!
//! * `device` — [`Balloon`]: config space, queue roles, dispatch
//! * `pages` — inflate/deflate PFN arrays, per-element validation
//! * `pfn_set` — the set of inflated pages (bitmap over guest RAM)
//! * `stats` — the statistics queue payload
//! * `backend` — the [`BalloonBackend`] trait

pub mod backend;
pub mod device;
pub mod pages;
pub mod pfn_set;
pub mod stats;

pub use backend::BalloonBackend;
pub use device::{queue_roles, Balloon, QueueRole};
pub use pfn_set::{PfnError, PfnSet};
pub use stats::{tag, tag_name, BalloonStats};

/// Balloon page size: PFNs in the inflate/deflate queues are in 4K units
/// whatever the guest's page size (VIRTIO_BALLOON_PFN_SHIFT = 12).
pub const PAGE_SIZE: u64 = 4096;
/// Size offered for every balloon virtqueue.
pub const QUEUE_SIZE: u16 = 256;

/// VIRTIO_BALLOON_F_MUST_TELL_HOST: the guest tells the host before reusing
/// deflated pages (the backend must refill them first).
pub const F_MUST_TELL_HOST: u64 = 1 << 0;
/// VIRTIO_BALLOON_F_STATS_VQ: memory statistics queue.
pub const F_STATS_VQ: u64 = 1 << 1;
/// VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest deflates under memory pressure.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// VIRTIO_BALLOON_F_FREE_PAGE_HINT (never offered).
pub const F_FREE_PAGE_HINT: u64 = 1 << 3;
/// VIRTIO_BALLOON_F_PAGE_POISON (never offered).
pub const F_PAGE_POISON: u64 = 1 << 4;
/// VIRTIO_BALLOON_F_REPORTING: free page reporting queue.
pub const F_REPORTING: u64 = 1 << 5;

/// What the balloon offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Guest RAM lies in gpa `0..ram_size` (4K multiple) ...
    pub ram_size: u64,
    /// ... except in this gpa range `[start, end)` (the 32-bit MMIO hole
    /// when RAM goes above it; 4K aligned): PFNs there are rejected.
    pub hole: Option<(u64, u64)>,
    /// Offer the statistics queue.
    pub stats: bool,
    /// Offer free page reporting.
    pub reporting: bool,
    /// Offer deflate-on-OOM.
    pub deflate_on_oom: bool,
}

impl BalloonConfig {
    /// Stats and free page reporting on, deflate-on-OOM off.
    pub fn new(ram_size: u64) -> Self {
        BalloonConfig {
            ram_size,
            hole: None,
            stats: true,
            reporting: true,
            deflate_on_oom: false,
        }
    }
}

/// Invalid balloon configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalloonError {
    /// RAM size unusable for a balloon.
    #[error(
        "guest RAM size {ram_size:#x} must be a non-zero multiple of 4 KiB and at most 16 TiB"
    )]
    BadRamSize {
        /// The size given.
        ram_size: u64,
    },
}

/// Running totals of what the balloon did and refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonCounters {
    /// PFNs handed to `BalloonBackend::inflate`.
    pub inflated_pfns: u64,
    /// PFNs handed to `BalloonBackend::deflate` (including at reset).
    pub deflated_pfns: u64,
    /// Elements naming a page outside guest RAM.
    pub pfn_out_of_range: u64,
    /// Inflates of a page already inflated.
    pub pfn_already_inflated: u64,
    /// Deflates of a page that was not inflated.
    pub pfn_not_inflated: u64,
    /// Descriptor chains rejected whole (loop, too long, outside memory...).
    pub chains_rejected: u64,
    /// Free runs handed to `BalloonBackend::report_free`.
    pub reported_runs: u64,
    /// Bytes in those runs.
    pub reported_bytes: u64,
    /// Reported runs refused (not 4K aligned).
    pub runs_rejected: u64,
}
