//! Named scenarios for the RamModel façade used by guest-mem.

use thp::policy::{Defrag, Enabled, ThpPolicy};
use thp::primary::CollapseRefusal;
use thp::{CollapsePlan, DiscardStep, FrameView, ModelError, PopulatePlan, RamModel, SplitPlan};

fn ok(m: &RamModel) {
    if let Err(e) = m.check_invariants() {
        panic!("{e}");
    }
}

#[test]
fn populate_huge_then_whole_discard_returns_slot_to_pool() {
    let mut m = RamModel::new(2, 2, ThpPolicy::always());
    assert_eq!(m.populate(0).unwrap(), PopulatePlan::Huge { slot: 0 });
    assert_eq!(m.populate(0).unwrap(), PopulatePlan::AlreadyPopulated);
    assert_eq!(m.vmstat().thp_fault_alloc, 1);
    ok(&m);
    let steps = m.discard(0, 512).unwrap();
    assert_eq!(steps, vec![DiscardStep::WholeHuge { frame: 0, slot: 0 }]);
    assert_eq!(m.frame(0), FrameView::Unpopulated);
    assert_eq!(m.huge_pool().free_count(), 2);
    ok(&m);
}

#[test]
fn partial_discard_of_huge_frame_split_pmd_copies_kept_pages_and_frees_slot() {
    let mut m = RamModel::new(2, 2, ThpPolicy::always());
    m.populate(0).unwrap();
    m.populate(1).unwrap();
    // Give back the last page of frame 0 and the first two of frame 1.
    let steps = m.discard(511, 3).unwrap();
    ok(&m);
    assert_eq!(steps.len(), 2);
    match &steps[0] {
        DiscardStep::SplitHuge {
            frame,
            huge_slot,
            kept,
            dropped,
        } => {
            assert_eq!((*frame, *huge_slot), (0, 0));
            assert_eq!(kept.len(), 511);
            assert_eq!(dropped, &vec![511]);
            assert!(kept
                .iter()
                .enumerate()
                .all(|(i, (idx, _))| *idx as usize == i));
        }
        s => panic!("unexpected {s:?}"),
    }
    match &steps[1] {
        DiscardStep::SplitHuge {
            frame,
            kept,
            dropped,
            ..
        } => {
            assert_eq!(*frame, 1);
            assert_eq!(kept.len(), 510);
            assert_eq!(dropped, &vec![0, 1]);
        }
        s => panic!("unexpected {s:?}"),
    }
    assert_eq!(m.frame(0), FrameView::Small { present: 511 });
    assert_eq!(m.huge_pool().free_count(), 2);
    assert_eq!(m.small_pool().used_count(), 1021);
    assert_eq!(m.vmstat().thp_split_pmd, 2);
    assert_eq!(m.vmstat().thp_split_page, 2);
}

#[test]
fn discard_in_small_frame_frees_exactly_those_slots_and_refill_brings_zeroed_pages() {
    let mut m = RamModel::new(1, 0, ThpPolicy::always());
    let PopulatePlan::Small { slots } = m.populate(0).unwrap() else {
        panic!("small expected with an empty pool");
    };
    assert_eq!(slots.len(), 512);
    let steps = m.discard(10, 2).unwrap();
    assert_eq!(
        steps,
        vec![DiscardStep::Small {
            frame: 0,
            freed: vec![(10, slots[10]), (11, slots[11])]
        }]
    );
    assert_eq!(m.frame(0), FrameView::Small { present: 510 });
    ok(&m);
    let r = m.refill(0, 20).unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].filled.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![10, 11]
    );
    assert_eq!(m.frame(0), FrameView::Small { present: 512 });
    ok(&m);
}

#[test]
fn pool_exhaustion_fallback_to_small_then_collapse_restores_2m() {
    let mut m = RamModel::new(2, 1, ThpPolicy::always());
    m.populate(0).unwrap();
    assert!(matches!(m.populate(1).unwrap(), PopulatePlan::Small { .. }));
    assert_eq!(m.vmstat().thp_fault_fallback, 1);
    assert_eq!(
        m.collapse(1).unwrap_err(),
        ModelError::HugePoolEmpty {
            frame: 1,
            capacity: 1
        }
    );
    ok(&m);
    m.discard(0, 512).unwrap();
    let CollapsePlan::Collapse {
        frame,
        huge_slot,
        copy,
        zero,
        free_small,
    } = m.collapse(1).unwrap()
    else {
        panic!("collapse expected");
    };
    assert_eq!(
        (frame, huge_slot, copy.len(), zero.len(), free_small.len()),
        (1, 0, 512, 0, 512)
    );
    assert_eq!(m.frame(1), FrameView::Huge { slot: 0 });
    assert_eq!(m.small_pool().used_count(), 0);
    assert_eq!(m.vmstat().thp_collapse_alloc, 1);
    assert_eq!(m.collapse(1).unwrap(), CollapsePlan::AlreadyHuge);
    ok(&m);
}

#[test]
fn pinned_frame_split_returns_busy_and_changes_nothing() {
    let mut m = RamModel::new(1, 1, ThpPolicy::always());
    m.populate(0).unwrap();
    m.pin(0).unwrap();
    let before = (
        m.frame(0),
        m.huge_pool().free_count(),
        m.small_pool().used_count(),
    );
    assert_eq!(
        m.split(0).unwrap_err(),
        ModelError::Busy { frame: 0, pins: 1 }
    );
    assert_eq!(
        m.discard(3, 1).unwrap_err(),
        ModelError::Busy { frame: 0, pins: 1 }
    );
    assert_eq!(
        before,
        (
            m.frame(0),
            m.huge_pool().free_count(),
            m.small_pool().used_count()
        )
    );
    ok(&m);
    m.unpin(0).unwrap();
    assert_eq!(m.unpin(0).unwrap_err(), ModelError::NotPinned { frame: 0 });
    let SplitPlan::Split {
        copied, huge_slot, ..
    } = m.split(0).unwrap()
    else {
        panic!("split expected");
    };
    assert_eq!((copied.len(), huge_slot), (512, 0));
    assert_eq!(m.frame(0), FrameView::Small { present: 512 });
    assert_eq!(m.split(0).unwrap(), SplitPlan::NotHuge);
    ok(&m);
}

#[test]
fn collapse_counts_discarded_pages_against_max_ptes_none() {
    let mut policy = ThpPolicy::always();
    policy.khugepaged.max_ptes_none = 100;
    let mut m = RamModel::new(1, 1, policy);
    m.populate(0).unwrap();
    m.discard(0, 101).unwrap();
    assert_eq!(
        m.collapse(0).unwrap_err(),
        ModelError::CollapseRefused {
            frame: 0,
            reason: CollapseRefusal::ExceedNonePte {
                none: 101,
                max: 100
            }
        }
    );
    m.refill(0, 1).unwrap();
    let CollapsePlan::Collapse {
        copy,
        zero,
        free_small,
        ..
    } = m.collapse(0).unwrap()
    else {
        panic!("collapse expected");
    };
    assert_eq!((copy.len(), zero.len(), free_small.len()), (412, 100, 412));
    assert_eq!(zero[0], 1);
    ok(&m);
}

#[test]
fn small_pool_limit_refuses_partial_discard_of_huge_without_change() {
    let mut m = RamModel::with_small_limit(1, 1, ThpPolicy::always(), Some(100));
    m.populate(0).unwrap();
    let err = m.discard(0, 1).unwrap_err();
    assert_eq!(
        err,
        ModelError::SmallPoolExhausted {
            needed: 511,
            available: 100
        }
    );
    assert_eq!(m.frame(0), FrameView::Huge { slot: 0 });
    ok(&m);
}

#[test]
fn policy_never_populates_small_without_fallback_count() {
    let mut m = RamModel::new(1, 4, ThpPolicy::never());
    assert!(matches!(m.populate(0).unwrap(), PopulatePlan::Small { .. }));
    assert_eq!(m.vmstat().thp_fault_fallback, 0);
    assert_eq!(m.vmstat().thp_fault_alloc, 0);
    assert_eq!(
        m.collapse(0).unwrap_err(),
        ModelError::CollapseRefused {
            frame: 0,
            reason: CollapseRefusal::Disabled
        }
    );
    ok(&m);
}

#[test]
fn injected_huge_failure_with_defrag_never_falls_back() {
    let policy = ThpPolicy {
        enabled: Enabled::Madvise,
        defrag: Defrag::Never,
        ..Default::default()
    };
    let mut m = RamModel::new(1, 1, policy);
    m.inject_huge_failures(1);
    assert!(matches!(m.populate(0).unwrap(), PopulatePlan::Small { .. }));
    assert_eq!(m.vmstat().thp_fault_fallback, 1);
    assert_eq!(m.huge_pool().free_count(), 1);
    ok(&m);
}

#[test]
fn out_of_range_requests_are_typed_errors() {
    let mut m = RamModel::new(1, 1, ThpPolicy::always());
    assert!(matches!(
        m.populate(1),
        Err(ModelError::FrameOutOfRange { .. })
    ));
    assert!(matches!(
        m.discard(500, 13),
        Err(ModelError::PagesOutOfRange { .. })
    ));
    assert!(matches!(
        m.refill(u64::MAX, 2),
        Err(ModelError::PagesOutOfRange { .. })
    ));
    assert!(matches!(
        m.pin(0),
        Err(ModelError::NotPopulated { frame: 0 })
    ));
    assert_eq!(m.frame(9), FrameView::Unpopulated);
    ok(&m);
}

/// The `thp` backing (shmem): collapse is `MADV_COLLAPSE` of a file, which
/// ignores khugepaged's `max_ptes_none` (the VMM's collapser applies its own
/// policy before asking).
#[test]
fn shmem_collapse_is_madvise_collapse_without_max_ptes_none() {
    let mut policy = ThpPolicy::always();
    policy.khugepaged.max_ptes_none = 100;
    let mut m = RamModel::shmem(1, 1, policy);
    m.populate(0).unwrap();
    m.discard(0, 101).unwrap();
    let CollapsePlan::Collapse { zero, .. } = m.collapse(0).unwrap() else {
        panic!("collapse expected");
    };
    assert_eq!(zero.len(), 101);
    ok(&m);
}

#[test]
fn scattered_pages_of_a_huge_frame_are_given_back_with_one_split() {
    let mut m = RamModel::new(2, 2, ThpPolicy::always());
    m.populate(1).unwrap();
    let pages: Vec<u16> = (0..256).chain(300..310).chain([511]).collect();
    let step = m.discard_frame_pages(1, &pages, true).unwrap();
    ok(&m);
    let DiscardStep::SplitHuge {
        frame,
        kept,
        dropped,
        ..
    } = step
    else {
        panic!("expected one split, got {step:?}");
    };
    assert_eq!(frame, 1);
    assert_eq!(dropped, pages);
    assert_eq!(kept.len(), 512 - pages.len());
    assert_eq!(
        m.frame(1),
        FrameView::Small {
            present: (512 - pages.len()) as u32
        }
    );
    assert_eq!(m.huge_pool().free_count(), 2);
    // A second give-back in the now small frame frees small slots only.
    let step = m.discard_frame_pages(1, &[256, 257], true).unwrap();
    assert!(matches!(step, DiscardStep::Small { ref freed, .. } if freed.len() == 2));
    ok(&m);
}

#[test]
fn a_frame_given_back_whole_stays_huge_on_its_slot_when_asked() {
    let mut m = RamModel::new(2, 2, ThpPolicy::always());
    m.populate(0).unwrap();
    let all: Vec<u16> = (0..512).collect();
    let step = m.discard_frame_pages(0, &all, true).unwrap();
    assert_eq!(step, DiscardStep::WholeHuge { frame: 0, slot: 0 });
    // The same slot, mapped again: the next touch faults a fresh huge page.
    assert_eq!(m.frame(0), FrameView::Huge { slot: 0 });
    assert_eq!(m.huge_pool().used_count(), 1);
    ok(&m);
    // Without keep_huge the frame is unpopulated, as `discard` leaves it.
    let step = m.discard_frame_pages(0, &all, false).unwrap();
    assert_eq!(step, DiscardStep::WholeHuge { frame: 0, slot: 0 });
    assert_eq!(m.frame(0), FrameView::Unpopulated);
    assert_eq!(m.huge_pool().free_count(), 2);
    ok(&m);
}

#[test]
fn discard_frame_pages_refuses_unsorted_or_out_of_frame_pages() {
    let mut m = RamModel::new(1, 1, ThpPolicy::always());
    m.populate(0).unwrap();
    assert!(m.discard_frame_pages(0, &[3, 2], true).is_err());
    assert!(m.discard_frame_pages(0, &[512], true).is_err());
    assert!(m.discard_frame_pages(1, &[0], true).is_err());
    assert_eq!(m.frame(0), FrameView::Huge { slot: 0 });
}

/// `FrameView::host_level` (per frame, what the VMM feeds its KVM mirror)
/// agrees with `RamModel::host_map` (per page, the model's page table) on
/// every present page, and differs only where the model has no page: there
/// guest-mem maps a zero page, so the frame level is the right one.
#[test]
fn frame_host_levels_agree_with_host_map_on_present_pages() {
    use thp::kvm_mirror::HostMap;
    use thp::units::Level;
    const HPAGE: u64 = 2 << 20;
    let mut m = RamModel::new(4, 4, ThpPolicy::always());
    for f in 0..3 {
        m.populate(f).unwrap();
    }
    m.split(1).unwrap();
    // Frame 2: give back page 7 (a split) -> small, 511 present.
    m.discard(2 * 512 + 7, 1).unwrap();
    ok(&m);
    let frames: Vec<FrameView> = (0..4).map(|f| m.frame(f)).collect();
    let levels = thp::ram_model::host_levels(&frames);
    assert_eq!(
        levels,
        vec![Some(Level::M2), Some(Level::K4), Some(Level::K4), None]
    );
    let host = m.host_map();
    for (f, level) in levels.iter().enumerate() {
        for page in 0..512u64 {
            let hva = f as u64 * HPAGE + page * 4096;
            match host.pfn(hva) {
                Some(_) => assert_eq!(Some(host.host_level(hva)), *level, "frame {f} page {page}"),
                None => assert!(
                    (f, page) == (2, 7) || f == 3,
                    "frame {f} page {page} unexpectedly absent"
                ),
            }
        }
    }
}
