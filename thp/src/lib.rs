//! Pure model of the THP allocator, folios, the primary (host) mapping and
//! x86 KVM's secondary MMU. No syscalls: it decides, callers act
//! (`guest-mem` applies the plans of [`RamModel`] to real memory; `vmm`
//! compares [`kvm_mirror::predict`] with `KVM_GET_STATS_FD`).
//!
//! # What is mirrored: Linux 6.18, by behaviour
//!
//! Every rule follows one kernel version, **Linux 6.18** (the host kernel of
//! this project's machines, [`kvm_mirror::KERNEL`]); each KVM rule is one
//! function named for the kernel function, its doc comment citing file and
//! function. The x86 MMU is either the TDP MMU (EPT/NPT) or the shadow MMU,
//! with the module parameters that change what it maps
//! ([`kvm_mirror::MmuParams`]).
//!
//! | here | kernel |
//! |---|---|
//! | [`folio::Folio`] refcount / `entire_mapcount` / per-page mapcounts / pins | `struct folio` after the THP refcount redesign and the folio mapcount work; `folio_maybe_dma_pinned` |
//! | [`folio::Folio::folio_maybe_mapped_shared`], [`folio::Folio::folio_add_return_large_mapcount`] / `folio_sub_return_large_mapcount` | `folio_maybe_mapped_shared` (include/linux/mm.h) over the CONFIG_MM_ID tracking of include/linux/rmap.h (6.15+): two MM-id slots with per-MM mapcounts and the maybe-shared bit; never a false negative |
//! | [`policy`] | `transparent_hugepage/{enabled,defrag}`, `khugepaged/{max_ptes_none,max_ptes_shared,max_ptes_swap,pages_to_scan,scan_sleep_millisecs}` |
//! | [`primary::Primary::fault`] | `do_anonymous_page` / `do_huge_pmd_anonymous_page` with THP fallback (`thp_fault_fallback`), `do_wp_page` / `do_huge_pmd_wp_page` (COW) |
//! | [`primary::Primary::unmap`], [`primary::Primary::split_huge_pmd`] | `zap_page_range_single` (`MADV_DONTNEED`), `__split_huge_pmd` (never fails) |
//! | [`primary::Primary::split_folio`], [`primary::Primary::shrink_deferred_split`] | `split_folio` (`-EBUSY` with extra pins/references), `deferred_split_folio` (6.12+: every new PMD THP queued at its fault; `partially_mapped` flag, `thp_deferred_split_page` counted once when part of it is unmapped) + `deferred_split_scan` (fully mapped and not `thp_underused`: dequeued; partial: split, or kept queued while pinned) |
//! | [`primary::Primary::new_shmem_mm`], [`RamModel::shmem`] | the `thp` backing is shmem: page-cache folios (`!folio_test_anon`) never go on the deferred-split queue; collapse is `hpage_collapse_scan_file` + `collapse_file` (no writable PTE needed) |
//! | [`primary::Primary::madvise_collapse`] | `madvise_collapse`: `cc->is_khugepaged` false, khugepaged's `max_ptes_*` limits ignored |
//! | [`primary::Primary::collapse`] | khugepaged `hpage_collapse_scan_pmd` + `collapse_huge_page` (`SCAN_EXCEED_NONE_PTE`, `SCAN_EXCEED_SHARED_PTE` counted per PTE whose folio `folio_maybe_mapped_shared` (6.10+), `SCAN_PAGE_COUNT`, `SCAN_PAGE_RO`, `SCAN_ALLOC_HUGE_PAGE_FAIL`) |
//! | [`primary::Primary::fork`] | `copy_page_range` (COW sharing; eager copy of pinned pages, `copy_huge_pmd` split of a pinned PMD) |
//! | [`kvm_mirror::SecondaryMmu::kvm_mmu_hugepage_adjust`], [`kvm_mirror::SecondaryMmu::kvm_mmu_max_mapping_level`], [`kvm_mirror::SecondaryMmu::host_pfn_mapping_level`] | the same functions of arch/x86/kvm/mmu/mmu.c, per level (2M and 1G, `max_huge_page_level`); `lpage_info` per level from `kvm_alloc_memslot_metadata` (x86.c), `update_gfn_disallow_lpage_count` |
//! | `disallowed_hugepage_adjust`, NX exec faults ([`kvm_mirror::Access::exec`]) | `nx_huge_pages`: an exec fault maps 4K and its table stays 4K (`nx_lpage_splits`) |
//! | [`kvm_mirror::SecondaryMmu::fault_begin`] ... `fault_install` | `kvm_faultin_pfn` (reads `mmu_invalidate_seq`), `is_page_fault_stale` / `mmu_invalidate_retry_gfn` (gfn range), `kvm_tdp_mmu_map` (a 4K fault under a huge leaf: `tdp_mmu_split_huge_page`) / `direct_map` + `FNAME(fetch)` (`drop_large_spte`, `direct_pte_prefetch` of up to `PTE_PREFETCH_NUM` = 8) |
//! | [`kvm_mirror::SecondaryMmu::invalidate_range_start`] / `_end` | `kvm_mmu_notifier_invalidate_range_start` / `_end`: `kvm_mmu_invalidate_begin` / `_range_add` / `_end` only when the range hits a memslot; memslot updates wait for invalidations (`mn_active_invalidate_count`) |
//! | [`kvm_mirror::SecondaryMmu::account_shadowed`] / `unaccount_shadowed` | shadow MMU write tracking of guest page tables: `kvm_mmu_gfn_disallow_lpage` + `kvm_mmu_slot_gfn_write_protect` (huge leaves write-protected, kept) |
//! | [`primary::Primary::mprotect`], [`primary::Mm::write_protected`] | `mprotect` / `change_protection` (a read-only VMA: effective PTE permission, host write faults fail; restore keeps COW-shared pages read-only as `can_change_pte_writable`) |
//! | [`primary::Primary::pageout`] | `MADV_PAGEOUT` (`madvise_cold_or_pageout_pte_range` + reclaim; pinned and shared folios stay) |
//! | [`kvm_mirror::SecondaryMmu::access_begin`] ... `access_install` | `kvm_faultin_pfn` with `fault->slot`, `fault->write`, `fault->map_writable` (`hva_to_pfn`, `KVM_PFN_ERR_FAULT` / `-EFAULT` for a write to a read-only host page), leaf SPTE write permission |
//! | [`kvm_mirror::SecondaryMmu::memslot_generation`], [`kvm_mirror::SecondaryMmu::access_must_retry`] | memslot generation; a fault whose memslot is stale retries (stands for SRCU-protected memslots + `KVM_MEMSLOT_INVALID`) |
//! | [`kvm_mirror::SecondaryMmu::set_dirty_logging`], `remove_slot`, `add_slot` | `KVM_SET_USER_MEMORY_REGION`: `kvm_mmu_slot_apply_flags` (on: `kvm_mmu_slot_try_split_huge_pages` on the TDP MMU with `eager_page_split`, `kvm_mmu_slot_remove_write_access`, nothing with `KVM_DIRTY_LOG_INITIALLY_SET`; off: `kvm_mmu_recover_huge_pages`: TDP in place, shadow `kvm_rmap_zap_collapsible_sptes`), `kvm_arch_flush_shadow_memslot` (= `kvm_mmu_zap_all_fast` with the default `KVM_X86_QUIRK_SLOT_ZAP_ALL`) |
//! | [`interleave::EventKind`] (`discard4k`, `discard2m`, `split`, `collapse`, `wrprotect`, `dirtylog`, `slot`, `pageout`) | the events of `vmm stress --ops-mix`, each racing [`interleave::Actor::VcpuFault`] (whole KVM fault incl. GUP fault-in / COW break) at every interleaving point |
//! | `pages_4k` / `pages_2m` / `pages_1g` / `nx_lpage_splits` | KVM's binary stats: present leaf SPTEs per level (keyed by gfn: on the shadow MMU a gfn mapped through two guest page tables is two SPTEs, which the mirror counts once) |
//!
//! Not modelled: swap contents (`MADV_PAGEOUT` unmaps; the page comes back
//! as a fresh folio; `max_ptes_swap` is carried but unused), the dirty
//! bitmap itself, 1G host pages inside the primary model's address spaces (1G frames
//! live one level up, in [`RamModel`]'s 1G layer, as hugetlb 1G pages are not THP), the huge zero page, NX huge page recovery (the worker
//! that zaps NX-split tables), shadow pages keyed by guest address
//! (unsync pages, one SPTE per guest mapping), prefetch through indirect
//! shadow pages (guest accessed bits), mremap (a folio never moves frame),
//! page contents (`thp_underused` answers false, as the kernel does with the
//! default `max_ptes_none`), the page cache of a shmem mapping (a shmem
//! `split_huge_pmd` that only clears the PMD and a refault that maps the
//! page-cache folio with a PMD again; the model keeps PTE mappings), fork of a
//! shmem mapping (modelled as COW).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod folio;
pub mod give_back;
pub mod interleave;
pub mod invariants;
pub mod kvm_mirror;
pub mod policy;
pub mod pool;
pub mod primary;
pub mod ram_model;
pub mod units;

pub use ram_model::{
    CollapsePlan, DiscardStep, FrameView, GigCollapsePlan, GigPopulatePlan, GigSource,
    GigSplitPlan, ModelError, PopulatePlan, RamModel, RefillStep, SplitPlan, FRAMES_PER_GIG,
};
