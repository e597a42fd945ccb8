//! Mirror of x86 KVM's secondary MMU (EPT/NPT or shadow page tables) at the
//! level of what it maps where: memslots with `lpage_info`, the choice of
//! mapping level (`kvm_mmu_hugepage_adjust`, `kvm_mmu_max_mapping_level`,
//! `host_pfn_mapping_level`), the fault path against the mmu-notifier
//! protocol (`mmu_invalidate_seq`, `mmu_invalidate_in_progress`,
//! `mmu_invalidate_retry_gfn`), range invalidation, and the `pages_4k` /
//! `pages_2m` statistics as KVM counts them. Which MMU (TDP or shadow) and
//! which module parameters: [`MmuParams`]. Every rule follows [`KERNEL`].

mod access;
mod direct_role;
mod dirty_log;
mod hash;
mod host;
mod mmu;
mod params;
mod predict;
mod slots;
mod track;

pub use access::{AccessFault, Translation};
pub use host::{HostMap, LevelMap};
pub use mmu::{Access, FaultResult, PendingFault, SecondaryMmu};
pub use params::{HugePageCpu, MmuKind, MmuParams, TdpVendor, KERNEL, PTE_PREFETCH_NUM};
pub use predict::{predict, predict_with, Touch};
pub use slots::Memslot;

/// Errors of the mirror.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    /// No memslot contains the gfn (KVM would exit to userspace with MMIO).
    #[error("gfn {gfn:#x} is in no memslot")]
    NoSlot {
        /// The gfn.
        gfn: u64,
    },
    /// A memslot overlaps an existing one or reuses its id.
    #[error(
        "memslot {id} (gfn {base_gfn:#x}+{npages:#x}) overlaps memslot {other} or reuses its id"
    )]
    SlotOverlap {
        /// New slot id.
        id: u32,
        /// New slot base.
        base_gfn: u64,
        /// New slot size.
        npages: u64,
        /// Conflicting slot id.
        other: u32,
    },
    /// A memslot with zero pages, an unaligned host address or a gfn overflow.
    #[error("memslot {id} invalid: {why}")]
    BadSlot {
        /// Slot id.
        id: u32,
        /// Why.
        why: &'static str,
    },
    /// No memslot with that id.
    #[error("no memslot {0}")]
    UnknownSlot(u32),
    /// `invalidate_range_end` without a matching start.
    #[error("invalidate_range_end without invalidate_range_start")]
    UnbalancedInvalidate,
    /// A memslot update while an mmu-notifier invalidation is in progress
    /// (KVM makes it wait for `mn_active_invalidate_count` to drop to 0).
    #[error("memslot update while an mmu-notifier invalidation is in progress")]
    InvalidationActive,
    /// Write tracking of shadowed guest page tables asked of the TDP MMU.
    #[error("the TDP MMU shadows no guest page tables")]
    NotShadowMmu,
    /// `unaccount_shadowed` of a gfn that is not write-tracked.
    #[error("gfn {gfn:#x} is not write-tracked")]
    NotTracked {
        /// The gfn.
        gfn: u64,
    },
}
