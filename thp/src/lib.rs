//! Pure model of the THP allocator, folios, the primary (host) mapping and
//! x86 KVM's secondary MMU. No syscalls: it decides, callers act
//! (`guest-mem` applies the plans of [`RamModel`] to real memory; `vmm`
//! compares [`kvm_mirror::predict`] with `KVM_GET_STATS_FD`).
//!
//! # What is mirrored (Linux 6.x, by behaviour)
//!
//! | here | kernel |
//! |---|---|
//! | [`folio::Folio`] refcount / `entire_mapcount` / per-page mapcounts / pins | `struct folio` after the THP refcount redesign and the folio mapcount work; `folio_maybe_dma_pinned` |
//! | [`folio::Folio::likely_mapped_shared`] | `folio_likely_mapped_shared` (6.7-6.10: `page_mapcount(first page) > 1`, with its documented false negatives) |
//! | [`policy`] | `transparent_hugepage/{enabled,defrag}`, `khugepaged/{max_ptes_none,max_ptes_shared,max_ptes_swap,pages_to_scan,scan_sleep_millisecs}` |
//! | [`primary::Primary::fault`] | `do_anonymous_page` / `do_huge_pmd_anonymous_page` with THP fallback (`thp_fault_fallback`), `do_wp_page` / `do_huge_pmd_wp_page` (COW) |
//! | [`primary::Primary::unmap`], [`primary::Primary::split_huge_pmd`] | `zap_page_range_single` (`MADV_DONTNEED`), `__split_huge_pmd` (never fails) |
//! | [`primary::Primary::split_folio`], [`primary::Primary::shrink_deferred_split`] | `split_folio` (`-EBUSY` with extra pins/references), `deferred_split_folio` + `deferred_split_scan` |
//! | [`primary::Primary::collapse`] | khugepaged `hpage_collapse_scan_pmd` + `collapse_huge_page` (`SCAN_EXCEED_NONE_PTE`, `SCAN_EXCEED_SHARED_PTE`, `SCAN_PAGE_COUNT`, `SCAN_PAGE_RO`, `SCAN_ALLOC_HUGE_PAGE_FAIL`) |
//! | [`primary::Primary::fork`] | `copy_page_range` (COW sharing; eager copy of pinned pages, `copy_huge_pmd` split of a pinned PMD) |
//! | [`kvm_mirror::SecondaryMmu::max_mapping_level`] | `kvm_mmu_hugepage_adjust`, `kvm_mmu_max_mapping_level`, `host_pfn_mapping_level`, `lpage_info` / `kvm_mmu_gfn_disallow_lpage` |
//! | [`kvm_mirror::SecondaryMmu::fault_begin`] ... `fault_install` | `kvm_faultin_pfn` (reads `mmu_invalidate_seq`), `is_page_fault_stale` / `mmu_invalidate_retry_gfn`, `direct_map` |
//! | [`kvm_mirror::SecondaryMmu::invalidate_range_start`] / `_end` | `kvm_mmu_notifier_invalidate_range_start` / `_end` (`mmu_invalidate_in_progress`, `mmu_invalidate_seq`) |
//! | [`primary::Primary::mprotect`], [`primary::Mm::write_protected`] | `mprotect` / `change_protection` (a read-only VMA: effective PTE permission, host write faults fail; restore keeps COW-shared pages read-only as `can_change_pte_writable`) |
//! | [`primary::Primary::pageout`] | `MADV_PAGEOUT` (`madvise_cold_or_pageout_pte_range` + reclaim; pinned and shared folios stay) |
//! | [`kvm_mirror::SecondaryMmu::access_begin`] ... `access_install` | `kvm_faultin_pfn` with `fault->slot`, `fault->write`, `fault->map_writable` (`hva_to_pfn`, `KVM_PFN_ERR_FAULT` / `-EFAULT` for a write to a read-only host page), leaf SPTE write permission |
//! | [`kvm_mirror::SecondaryMmu::memslot_generation`], [`kvm_mirror::SecondaryMmu::access_must_retry`] | memslot generation; a fault whose memslot is stale retries (stands for SRCU-protected memslots + `KVM_MEMSLOT_INVALID`) |
//! | [`kvm_mirror::SecondaryMmu::set_dirty_logging`], `remove_slot`, `add_slot` | `KVM_SET_USER_MEMORY_REGION`: `kvm_mmu_slot_apply_flags` (2M dropped, 4K write-protected / collapsible 4K zapped), `kvm_arch_flush_shadow_memslot` |
//! | [`interleave::EventKind`] (`discard4k`, `discard2m`, `split`, `collapse`, `wrprotect`, `dirtylog`, `slot`, `pageout`) | the events of `vmm stress --ops-mix`, each racing [`interleave::Actor::VcpuFault`] (whole KVM fault incl. GUP fault-in / COW break) at every interleaving point |
//! | `pages_4k` / `pages_2m` | KVM's binary stats: present leaf SPTEs per level |
//!
//! Not modelled: swap contents (`MADV_PAGEOUT` unmaps; the page comes back
//! as a fresh folio; `max_ptes_swap` is carried but unused), the dirty
//! bitmap itself, eager page splitting of 2M leaves into 4K ones (2M leaves
//! are dropped), 1G pages, the huge zero page, NX huge pages, mremap (a
//! folio never moves frame).
#![deny(missing_docs)]

pub mod folio;
pub mod interleave;
pub mod invariants;
pub mod kvm_mirror;
pub mod policy;
pub mod pool;
pub mod primary;
pub mod ram_model;
pub mod units;

pub use ram_model::{
    CollapsePlan, DiscardStep, FrameView, ModelError, PopulatePlan, RamModel, RefillStep, SplitPlan,
};
