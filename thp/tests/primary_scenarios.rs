//! Named scenarios for the primary mapping model (folios, split, collapse, fork).

mod common;
use common::{ok, HVA};
use thp::folio::Backing;
use thp::policy::{Defrag, ThpPolicy};
use thp::primary::{CollapseRefusal, FaultOutcome, FrameMap, MmError, Primary};
use thp::units::Level;

fn huge_mm(frames: usize, pool: usize) -> (Primary, usize) {
    let mut p = Primary::new(pool, None, ThpPolicy::always());
    let mm = p.new_mm(frames, HVA, true);
    (p, mm)
}

#[test]
fn partial_unmap_split_pmd_keeps_folio_then_shrinker_frees_exactly_unmapped_pages() {
    let (mut p, mm) = huge_mm(2, 2);
    let FaultOutcome::MappedHuge(id) = p.fault(mm, 0, true).unwrap() else {
        panic!("expected a huge fault");
    };
    ok(&p);
    p.unmap(mm, 100, 12).unwrap();
    ok(&p);
    assert_eq!(p.stat().thp_split_pmd, 1);
    // The folio survives, PTE-mapped, minus 12 pages, and is queued.
    let f = p.folio(id).unwrap();
    assert_eq!(
        (f.entire_mapcount, f.total_mapcount(), f.refcount),
        (0, 500, 500)
    );
    assert!(f.on_deferred_split);
    assert_eq!(p.stat().thp_deferred_split_page, 1);
    assert!(matches!(p.mm(mm).unwrap().frame(0), FrameMap::Table(t) if t.present() == 500));
    assert_eq!(p.huge_pool().used_count(), 1);
    let r = p.shrink_deferred_split();
    ok(&p);
    assert_eq!((r.split, r.freed_pages), (1, 12));
    assert!(
        p.folios().iter().all(|(_, f)| !f.is_large()),
        "the huge folio is split into small ones"
    );
    assert_eq!(p.folios().live(), 500);
    assert_eq!(p.parts_live(0), 500);
    // The slot stays used until every part is freed.
    assert_eq!(p.huge_pool().used_count(), 1);
    p.unmap(mm, 0, 512).unwrap();
    ok(&p);
    assert_eq!((p.huge_pool().used_count(), p.folios().live()), (0, 0));
}

#[test]
fn pinned_folio_refuses_split_and_nothing_changes() {
    let (mut p, mm) = huge_mm(1, 1);
    p.fault(mm, 0, true).unwrap();
    p.unmap(mm, 0, 1).unwrap();
    let id = p.pin(mm, 5).unwrap();
    ok(&p);
    let before = (
        p.folio(id).unwrap().clone(),
        p.mm(mm).unwrap().frame(0).clone(),
        p.folios().live(),
    );
    let err = p.split_folio(id).unwrap_err();
    assert_eq!(
        err,
        MmError::Busy {
            folio: id,
            pins: 1,
            held: 0
        }
    );
    let after = (
        p.folio(id).unwrap().clone(),
        p.mm(mm).unwrap().frame(0).clone(),
        p.folios().live(),
    );
    assert_eq!(before, after);
    // The shrinker leaves it queued.
    let r = p.shrink_deferred_split();
    assert_eq!((r.split, r.busy), (0, 1));
    assert!(p.folio(id).unwrap().on_deferred_split);
    ok(&p);
    p.unpin(id).unwrap();
    assert_eq!(p.split_folio(id).unwrap(), 1);
    ok(&p);
}

#[test]
fn pinned_pages_refuse_collapse() {
    let mut p = Primary::new(1, None, ThpPolicy::always());
    let mm = p.new_mm(1, HVA, true);
    for i in 0..512 {
        p.fault_nohuge(mm, i, true).unwrap();
    }
    let id = p.pin(mm, 7).unwrap();
    let err = p.collapse(mm, 0).unwrap_err();
    assert_eq!(err, MmError::Collapse(CollapseRefusal::Pinned { page: 7 }));
    ok(&p);
    p.unpin(id).unwrap();
    p.collapse(mm, 0).unwrap();
    ok(&p);
}

/// tools/testing/selftests/mm/khugepaged.c collapse_max_ptes_shared: share a
/// huge page over fork; the child COWs `512 - max_ptes_shared - 1` pages
/// (page 255 of 512 with the default 256), so 257 PTEs stay shared and
/// collapse is refused; one more COW leaves exactly 256 shared and collapse
/// succeeds.
#[test]
fn collapse_max_ptes_shared_kernel_selftest_sequence() {
    let (mut p, parent) = huge_mm(1, 2);
    let max_shared = p.policy().khugepaged.max_ptes_shared as u64;
    assert_eq!(max_shared, 256);
    let FaultOutcome::MappedHuge(huge) = p.fault(parent, 0, true).unwrap() else {
        panic!("parent must get a huge page");
    };
    let child = p.fork(parent).unwrap();
    ok(&p);
    assert!(
        matches!(p.mm(child).unwrap().frame(0), FrameMap::Pmd(_)),
        "check_huge_anon in child"
    );
    let first_cow = 512 - max_shared - 1;
    for page in 0..first_cow {
        p.fault(child, page, true).unwrap();
        ok(&p);
    }
    assert_eq!(p.stat().cow_copies, 255);
    assert!(matches!(p.mm(child).unwrap().frame(0), FrameMap::Table(_)));
    let err = p.collapse(child, 0).unwrap_err();
    assert_eq!(
        err,
        MmError::Collapse(CollapseRefusal::ExceedSharedPte {
            shared: 257,
            max: 256
        })
    );
    ok(&p);
    p.fault(child, first_cow, true).unwrap();
    let r = p.collapse(child, 0).unwrap();
    ok(&p);
    assert_eq!(r.copied.len(), 512);
    assert!(matches!(p.mm(child).unwrap().frame(0), FrameMap::Pmd(x) if x.folio == r.folio));
    // The parent's huge page is intact and exclusive again.
    let f = p.folio(huge).unwrap();
    assert_eq!((f.entire_mapcount, f.total_mapcount()), (1, 1));
    assert!(matches!(p.mm(parent).unwrap().frame(0), FrameMap::Pmd(x) if x.folio == huge));
    assert_eq!(p.stat().thp_collapse_alloc, 1);
}

/// `folio_maybe_mapped_shared` (6.18, CONFIG_MM_ID) has no false negative
/// where `folio_likely_mapped_shared` (6.7-6.10, first page only) had one:
/// 255 pages of a 2M folio shared with a child, the first page unmapped.
#[test]
fn maybe_mapped_shared_has_no_false_negative_when_first_page_unmapped() {
    let (mut p, parent) = huge_mm(1, 1);
    let FaultOutcome::MappedHuge(id) = p.fault(parent, 0, true).unwrap() else {
        panic!("huge");
    };
    // Keep pages 1..=256 in the parent (page 0 and 257.. unmapped).
    p.unmap(parent, 0, 1).unwrap();
    p.unmap(parent, 257, 255).unwrap();
    assert!(!p.folio(id).unwrap().folio_maybe_mapped_shared(), "one mm");
    let child = p.fork(parent).unwrap();
    // One writable PTE to another page: the child COWs page 256.
    p.fault(child, 256, true).unwrap();
    ok(&p);
    let f = p.folio(id).unwrap();
    let shared_pages = (0..512).filter(|&i| f.page_mapcount(i) > 1).count();
    assert_eq!(shared_pages, 255, "255 pages mapped by parent and child");
    assert_eq!(f.page_mapcount(0), 0);
    assert!(f.folio_maybe_mapped_shared(), "two mms map it");
}

/// khugepaged 6.10+ (`hpage_collapse_scan_pmd`): a PTE counts against
/// `max_ptes_shared` when its *folio* may be mapped shared, even if that
/// page itself is mapped once (the per-page rule of older kernels counted
/// one less here).
#[test]
fn max_ptes_shared_counts_every_pte_of_a_maybe_shared_folio() {
    let (mut p, parent) = huge_mm(1, 1);
    p.fault(parent, 0, true).unwrap();
    p.unmap(parent, 0, 1).unwrap();
    p.unmap(parent, 257, 255).unwrap();
    let child = p.fork(parent).unwrap();
    p.fault(child, 256, true).unwrap(); // COW: the child's page 256 is its own
    p.unmap(parent, 10, 1).unwrap(); // page 10: mapped by the child only
    ok(&p);
    let (none, shared) = p.collapse_scan(child, 0).unwrap();
    assert_eq!(none, 256);
    assert_eq!(
        shared, 255,
        "pages 1..=255 of the shared folio, page 10 included"
    );
}

/// 6.12+ (`deferred_split_folio(folio, false)` at the huge fault): every new
/// PMD THP is queued; the shrinker drops a fully mapped one (not underused
/// with max_ptes_none 511); `thp_deferred_split_page` counts only partial ones.
#[test]
fn new_pmd_thp_is_queued_for_deferred_split() {
    let (mut p, mm) = huge_mm(1, 1);
    let FaultOutcome::MappedHuge(id) = p.fault(mm, 0, true).unwrap() else {
        panic!("huge");
    };
    assert!(p.folio(id).unwrap().on_deferred_split);
    assert_eq!(p.stat().thp_deferred_split_page, 0);
    ok(&p);
    let r = p.shrink_deferred_split();
    assert_eq!((r.dequeued, r.split), (1, 0));
    assert!(!p.folio(id).unwrap().on_deferred_split);
    p.unmap(mm, 5, 1).unwrap();
    assert!(p.folio(id).unwrap().partially_mapped_flag);
    assert_eq!(p.stat().thp_deferred_split_page, 1);
    ok(&p);
}

/// Two address spaces map it: shared; the second unmaps everything:
/// exclusive again (its MM-id slot freed, the other holds every mapping).
#[test]
fn maybe_mapped_shared_follows_the_mm_id_slots() {
    let (mut p, parent) = huge_mm(1, 1);
    let FaultOutcome::MappedHuge(id) = p.fault(parent, 0, true).unwrap() else {
        panic!("huge");
    };
    assert!(!p.folio(id).unwrap().folio_maybe_mapped_shared());
    let child = p.fork(parent).unwrap();
    assert!(
        p.folio(id).unwrap().folio_maybe_mapped_shared(),
        "entire mapcount 2, two mms"
    );
    p.unmap(child, 0, 512).unwrap();
    assert!(!p.folio(id).unwrap().folio_maybe_mapped_shared());
    ok(&p);
}

#[test]
fn maybe_mapped_shared_small_folio_is_exact() {
    let mut p = Primary::new(0, None, ThpPolicy::never());
    let mm = p.new_mm(1, HVA, true);
    let FaultOutcome::MappedSmall { folio, fallback } = p.fault(mm, 3, true).unwrap() else {
        panic!("small");
    };
    assert!(!fallback);
    assert!(!p.folio(folio).unwrap().folio_maybe_mapped_shared());
    let child = p.fork(mm).unwrap();
    assert!(p.folio(folio).unwrap().folio_maybe_mapped_shared());
    p.fault(child, 3, true).unwrap();
    assert!(!p.folio(folio).unwrap().folio_maybe_mapped_shared());
    ok(&p);
}

#[test]
fn cow_on_shared_pmd_split_pmd_then_copies_one_page() {
    let (mut p, parent) = huge_mm(1, 1);
    p.fault(parent, 0, true).unwrap();
    let child = p.fork(parent).unwrap();
    let (l0, pfn0, ..) = p.mm(child).unwrap().lookup(9).unwrap();
    assert_eq!(l0, Level::M2);
    let out = p.fault(child, 9, true).unwrap();
    assert!(matches!(out, FaultOutcome::Copied(_)));
    ok(&p);
    assert_eq!(p.stat().thp_split_pmd, 1);
    let (l, pfn, _, w) = p.mm(child).unwrap().lookup(9).unwrap();
    assert_eq!(l, Level::K4);
    assert!(w);
    assert_ne!(pfn, pfn0);
    // Other pages still map the shared folio.
    assert_eq!(p.mm(child).unwrap().lookup(10).unwrap().1, pfn0 + 1);
    // Parent keeps its PMD, write-protected; its write reuses nothing: it splits and copies too.
    assert_eq!(p.mm(parent).unwrap().lookup(9).unwrap().0, Level::M2);
}

#[test]
fn write_after_child_exit_reuses_exclusive_huge_folio() {
    let (mut p, parent) = huge_mm(1, 1);
    p.fault(parent, 0, true).unwrap();
    let child = p.fork(parent).unwrap();
    p.destroy_mm(child).unwrap();
    ok(&p);
    assert_eq!(p.fault(parent, 4, true).unwrap(), FaultOutcome::Reused);
    assert_eq!(p.stat().thp_split_pmd, 0);
    ok(&p);
}

#[test]
fn fork_with_pinned_folio_copies_eagerly_for_child() {
    let mut p = Primary::new(0, None, ThpPolicy::never());
    let mm = p.new_mm(1, HVA, true);
    p.fault(mm, 1, true).unwrap();
    p.fault(mm, 2, true).unwrap();
    let pinned = p.pin(mm, 1).unwrap();
    let child = p.fork(mm).unwrap();
    ok(&p);
    let (_, _, cf, cw) = p.mm(child).unwrap().lookup(1).unwrap();
    assert_ne!(cf, pinned, "pinned page copied for the child");
    assert!(cw);
    let (_, _, f2, w2) = p.mm(child).unwrap().lookup(2).unwrap();
    assert_eq!(
        f2,
        p.mm(mm).unwrap().lookup(2).unwrap().2,
        "unpinned page shared"
    );
    assert!(!w2);
    assert!(
        p.mm(mm).unwrap().lookup(1).unwrap().3,
        "parent keeps write access to the pinned page"
    );
}

#[test]
fn fork_with_pinned_pmd_splits_parent_pmd_first() {
    let (mut p, mm) = huge_mm(1, 1);
    p.fault(mm, 0, true).unwrap();
    let id = p.pin(mm, 0).unwrap();
    let child = p.fork(mm).unwrap();
    ok(&p);
    assert_eq!(p.stat().thp_split_pmd, 1);
    assert!(matches!(p.mm(child).unwrap().frame(0), FrameMap::Table(t) if t.present() == 512));
    assert_eq!(p.folio(id).unwrap().total_mapcount(), 512);
}

#[test]
fn collapse_refused_when_none_ptes_exceed_max_ptes_none() {
    let mut policy = ThpPolicy::always();
    policy.khugepaged.max_ptes_none = 64;
    let mut p = Primary::new(1, None, policy);
    let mm = p.new_mm(1, HVA, true);
    for i in 0..447 {
        p.fault_nohuge(mm, i, true).unwrap();
    }
    assert_eq!(
        p.collapse(mm, 0).unwrap_err(),
        MmError::Collapse(CollapseRefusal::ExceedNonePte { none: 65, max: 64 })
    );
    p.fault(mm, 447, true).unwrap();
    let r = p.collapse(mm, 0).unwrap();
    assert_eq!((r.copied.len(), r.zeroed.len()), (448, 64));
    ok(&p);
}

#[test]
fn collapse_refused_when_pool_empty_then_succeeds_after_free() {
    let (mut p, mm) = huge_mm(2, 1);
    p.fault(mm, 0, true).unwrap();
    let out = p.fault(mm, 512, true).unwrap();
    assert!(matches!(
        out,
        FaultOutcome::MappedSmall { fallback: true, .. }
    ));
    assert_eq!(p.stat().thp_fault_fallback, 1);
    for i in 513..1024 {
        p.fault(mm, i, true).unwrap();
    }
    assert_eq!(
        p.collapse(mm, 1).unwrap_err(),
        MmError::Collapse(CollapseRefusal::PoolEmpty)
    );
    assert_eq!(p.stat().thp_collapse_alloc_failed, 1);
    p.unmap(mm, 0, 512).unwrap();
    p.collapse(mm, 1).unwrap();
    assert_eq!(p.mm(mm).unwrap().lookup(700).unwrap().0, Level::M2);
    ok(&p);
}

#[test]
fn defrag_always_fallback_after_reclaim_frees_split_huge_slot() {
    let mut policy = ThpPolicy::always();
    policy.defrag = Defrag::Always;
    let mut p = Primary::new(1, None, policy);
    let mm = p.new_mm(2, HVA, true);
    p.fault(mm, 0, true).unwrap();
    // Unmap everything but one page: the folio is queued for deferred split.
    p.unmap(mm, 1, 511).unwrap();
    let out = p.fault(mm, 512, true).unwrap();
    // Reclaim split the folio, but its last page still holds the slot: fallback.
    assert!(matches!(
        out,
        FaultOutcome::MappedSmall { fallback: true, .. }
    ));
    assert_eq!(p.stat().thp_split_page, 1);
    p.unmap(mm, 0, 1).unwrap();
    assert_eq!(p.huge_pool().free_count(), 1);
    ok(&p);
}

#[test]
fn unmap_whole_pmd_frees_huge_slot_without_split() {
    let (mut p, mm) = huge_mm(1, 1);
    p.fault(mm, 0, false).unwrap();
    p.unmap(mm, 0, 512).unwrap();
    assert_eq!(p.huge_pool().free_count(), 1);
    assert_eq!(p.stat().thp_split_pmd, 0);
    assert_eq!(p.folios().live(), 0);
    ok(&p);
}

#[test]
fn split_folio_of_pmd_mapped_folio_splits_mappings_in_every_mm() {
    let (mut p, mm) = huge_mm(1, 1);
    let FaultOutcome::MappedHuge(id) = p.fault(mm, 0, true).unwrap() else {
        panic!("huge");
    };
    let child = p.fork(mm).unwrap();
    assert_eq!(p.split_folio(id).unwrap(), 0);
    ok(&p);
    assert_eq!(p.stat().thp_split_pmd, 2);
    for m in [mm, child] {
        let (l, pfn, f, _) = p.mm(m).unwrap().lookup(3).unwrap();
        assert_eq!(l, Level::K4);
        assert_eq!(
            p.folio(f).unwrap().backing,
            Backing::HugePart { slot: 0, idx: 3 }
        );
        assert_eq!(pfn, thp::folio::HUGE_PFN_BASE + 3);
    }
}

fn strict_policy() -> ThpPolicy {
    let mut pol = ThpPolicy::always();
    pol.khugepaged.max_ptes_none = 0;
    pol
}

/// The `thp` backing is shmem: its folios are page-cache folios and never go
/// on the deferred-split queue (anonymous ones do, at the fault since 6.12
/// and when partially unmapped).
#[test]
fn shmem_folios_are_never_queued_for_deferred_split() {
    let mut p = Primary::new(2, None, ThpPolicy::always());
    let anon = p.new_mm(1, HVA, true);
    let shm = p.new_shmem_mm(1, HVA + (2 << 20), true);
    let FaultOutcome::MappedHuge(a) = p.fault(anon, 0, true).unwrap() else {
        panic!("huge");
    };
    let FaultOutcome::MappedHuge(s) = p.fault(shm, 0, true).unwrap() else {
        panic!("huge");
    };
    assert!(p.folio(a).unwrap().on_deferred_split);
    assert!(!p.folio(s).unwrap().on_deferred_split);
    p.unmap(shm, 7, 1).unwrap();
    assert!(!p.folio(s).unwrap().on_deferred_split);
    assert_eq!(p.stat().thp_deferred_split_page, 0);
    ok(&p);
}

/// `MADV_COLLAPSE` (`cc->is_khugepaged` false) ignores `max_ptes_none`;
/// khugepaged refuses. `collapse_file` (shmem) needs no writable PTE.
#[test]
fn madvise_collapse_ignores_khugepaged_limits_and_file_collapse_needs_no_writable_pte() {
    let mut p = Primary::new(4, None, strict_policy());
    let anon = p.new_mm(1, HVA, true);
    let shm = p.new_shmem_mm(1, HVA + (2 << 20), true);
    for mm in [anon, shm] {
        for pg in (0..512).filter(|pg| *pg != 10) {
            p.fault_nohuge(mm, pg, true).unwrap();
        }
        assert!(matches!(
            p.collapse(mm, 0),
            Err(MmError::Collapse(CollapseRefusal::ExceedNonePte {
                none: 1,
                max: 0
            }))
        ));
    }
    p.mprotect(anon, 0, false).unwrap();
    p.mprotect(shm, 0, false).unwrap();
    assert!(matches!(
        p.madvise_collapse(anon, 0),
        Err(MmError::Collapse(CollapseRefusal::NoWritablePte))
    ));
    let r = p.madvise_collapse(shm, 0).unwrap();
    assert_eq!(r.zeroed, vec![10]);
    p.mprotect(anon, 0, true).unwrap();
    p.madvise_collapse(anon, 0).unwrap();
    ok(&p);
}
