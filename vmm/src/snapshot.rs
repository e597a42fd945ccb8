//! A live view of a running VM's memory: KVM's mapping counters beside the
//! mirror's prediction, frame states (from `GuestRam`), pool and host memory,
//! balloon and split/collapse measurements. Used by `vmm ctl stats` and by the
//! end-of-run report.

use serde::Serialize;

use crate::balloon_backend::BalloonStatus;
use crate::machine::Machine;
use crate::machine::MirrorPoint;
use crate::mirror::Prediction;
use crate::stats::MappingStats;
use crate::unmap_stats::UnmapMetrics;

pub use crate::machine::FrameCounts;

/// Pool accounting (our books and the host's truth).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PoolReport {
    /// Huge slots of the pool.
    pub capacity: usize,
    /// Slots in use.
    pub used: usize,
    /// Slots free.
    pub free: usize,
    /// Bytes of the hugetlb pool memfd backed now.
    pub pool_memfd_bytes: u64,
    /// Bytes of the small-page / RAM memfd backed now.
    pub data_memfd_bytes: u64,
    /// Of those: split blocks allocated ahead (`--split-reserve`).
    pub split_reserve_bytes: u64,
    /// Of `pool_memfd_bytes`: huge pages allocated ahead for collapses
    /// (`--collapse-reserve`).
    pub collapse_reserve_bytes: u64,
    /// The host's free 2M hugetlb pages (`HugePages_Free`).
    pub host_hugepages_free: Option<u64>,
}

/// What the host maps for guest RAM, from `/proc/self/smaps`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HostMemory {
    /// Hugetlb bytes mapped (`Private_Hugetlb + Shared_Hugetlb`).
    pub hugetlb_bytes: u64,
    /// `Rss` (small pages; hugetlb is not in Rss).
    pub rss_bytes: u64,
    /// Both: host memory guest RAM uses now.
    pub total_bytes: u64,
    /// Bytes mapped with PMDs (hugetlb + THP).
    pub pmd_mapped_bytes: u64,
}

impl HostMemory {
    /// Read it for `ram` (`None` when smaps is unreadable).
    pub fn read(ram: &guest_mem::GuestRam) -> Option<HostMemory> {
        match ram.host_view() {
            Ok(v) => Some(HostMemory {
                hugetlb_bytes: v.smaps.hugetlb(),
                rss_bytes: v.smaps.rss,
                total_bytes: v.smaps.hugetlb() + v.smaps.rss,
                pmd_mapped_bytes: v.pmd_mapped_bytes(),
            }),
            Err(e) => {
                log::warn!("reading the host's view of guest RAM: {e}");
                None
            }
        }
    }
}

/// Everything `vmm ctl stats` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// KVM's mapping counters now.
    pub kvm: MappingStats,
    /// The mirror's prediction for the current frame states.
    pub mirror: Option<Prediction>,
    /// Frame states by backing kind.
    pub frames: FrameCounts,
    /// The backing.
    pub backing: String,
    /// Pool accounting.
    pub pool: PoolReport,
    /// Host memory of guest RAM.
    pub host_memory: Option<HostMemory>,
    /// The balloon, if the run has one.
    pub balloon: Option<BalloonStatus>,
    /// Split / collapse measurements (without sample lists).
    pub unmap: UnmapMetrics,
}

/// Pool accounting of `ram`.
pub fn pool_report(ram: &guest_mem::GuestRam) -> PoolReport {
    let p = ram.pool_stats();
    PoolReport {
        capacity: p.capacity,
        used: p.used,
        free: p.free,
        pool_memfd_bytes: p.pool_memfd_bytes,
        data_memfd_bytes: p.data_memfd_bytes,
        split_reserve_bytes: p.split_reserve_bytes,
        collapse_reserve_bytes: p.collapse_reserve_bytes,
        host_hugepages_free: p.host.map(|h| h.free),
    }
}

/// Take a snapshot of `m` (safe on any thread that is not a vCPU's in
/// `KVM_RUN`; on a vCPU thread call it inside `VcpuControl::parked_while`).
pub fn take(m: &Machine) -> Snapshot {
    let balloon = m.balloon().map(|b| b.status());
    let mut ram = m.ram();
    // With guest RAM locked no host change runs between KVM's counters and
    // the prediction.
    let kvm = m
        .stats
        .as_ref()
        .and_then(|s| s.mapping().ok())
        .unwrap_or_default();
    let mirror = m.predict(&mut ram, MirrorPoint::Snapshot);
    let states = ram.frame_states();
    let mut frames = FrameCounts::of(&states, ram.layout());
    frames.released = ram.released_frames().len();
    let snap = Snapshot {
        kvm,
        mirror,
        frames,
        backing: ram.backing().to_string(),
        pool: pool_report(&ram),
        host_memory: HostMemory::read(&ram),
        balloon,
        unmap: m.unmap.snapshot().summary(),
    };
    drop(ram);
    snap
}
