//! Accounting types: the pool, the host's view of guest RAM, discard reports.

use crate::backing::Backing;
use crate::smaps::{HugeMeminfo, SmapsTotals};

/// Pool accounting: our books next to the host's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// The backing.
    pub backing: Backing,
    /// Huge slots the guest RAM asked for (one per frame unless capped).
    pub requested: usize,
    /// Huge slots of our pool (what fitted on the host at start-up).
    pub capacity: usize,
    /// Our books: slots in use.
    pub used: usize,
    /// Our books: slots free.
    pub free: usize,
    /// Bytes of the hugetlb pool memfd backed by huge pages now (host truth, `st_blocks`).
    pub pool_memfd_bytes: u64,
    /// Bytes of the small-page / RAM memfd backed by memory now (host truth).
    pub data_memfd_bytes: u64,
    /// Of `data_memfd_bytes`: split blocks allocated ahead (the split
    /// reserve, `hugetlb` backings), backing no guest page yet.
    pub split_reserve_bytes: u64,
    /// Of `pool_memfd_bytes`: huge pages allocated ahead for collapses
    /// (the collapse reserve, `hugetlb`), backing no guest frame yet.
    pub collapse_reserve_bytes: u64,
    /// The host's 2M hugetlb counters (`HugePages_*`), when readable.
    pub host: Option<HugeMeminfo>,
    /// `hugetlb-1g`: 1G pages of our 1G pool (0 for the other backings).
    pub gig_capacity: usize,
    /// Our books: 1G pages in use.
    pub gig_used: usize,
    /// Bytes of the 1G memfd backed by 1G pages now (host truth).
    pub gig_memfd_bytes: u64,
}

/// What the host really maps for guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// `/proc/self/smaps` summed over every VMA inside `[host_addr, host_addr + size)`.
    pub smaps: SmapsTotals,
    /// Per frame: mapped by one PMD on the host (`PAGEMAP_SCAN`'s `PAGE_IS_HUGE`);
    /// `None` when the kernel lacks `PAGEMAP_SCAN`.
    pub pmd_mapped: Option<Vec<bool>>,
}

impl HostView {
    /// Bytes of guest RAM the host maps with PMDs, from smaps: hugetlb
    /// (`Private_Hugetlb + Shared_Hugetlb`) plus shmem/file/anon THP.
    pub fn pmd_mapped_bytes(&self) -> u64 {
        self.smaps.hugetlb()
            + self.smaps.shmem_pmd_mapped
            + self.smaps.file_pmd_mapped
            + self.smaps.anon_huge_pages
    }

    /// Number of frames the per-frame view reports PMD-mapped.
    pub fn pmd_mapped_frames(&self) -> Option<usize> {
        self.pmd_mapped
            .as_ref()
            .map(|v| v.iter().filter(|b| **b).count())
    }
}

/// What a discard did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiscardReport {
    /// Whole huge frames given back to the pool.
    pub huge_frames_freed: usize,
    /// Huge frames split because part of them was given back.
    pub frames_split: usize,
    /// 4K pages given back (that were backed before).
    pub pages_freed: u64,
}
