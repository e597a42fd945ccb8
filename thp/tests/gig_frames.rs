//! The PUD level of [`RamModel`]: 1G frames from a 1G pool, split 1G -> 2M
//! (-> 4K where pages are given back) and collapsed back, with exact pool
//! accounting; scenarios, then random sequences with invariants checked after
//! every operation and every error proven to change nothing.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use std::cell::Cell;
use thp::kvm_mirror::{LevelMap, Memslot, MmuParams, SecondaryMmu};
use thp::policy::ThpPolicy;
use thp::ram_model::host_levels;
use thp::units::{Level, PAGES_PER_GPAGE, PAGES_PER_HPAGE};
use thp::{
    DiscardStep, FrameView, GigCollapsePlan, GigPopulatePlan, GigSource, GigSplitPlan, ModelError,
    PopulatePlan, RamModel, FRAMES_PER_GIG,
};

/// Two whole 1G frames and 10 frames more (a partial 1G frame is never 1G).
const FRAMES: usize = 2 * FRAMES_PER_GIG + 10;

fn model(huge: usize, gigs: usize) -> RamModel {
    RamModel::new(FRAMES, huge, ThpPolicy::always()).with_gig_pool(gigs)
}

fn ok(m: &RamModel) {
    m.check_invariants().unwrap();
}

#[test]
fn a_1g_frame_is_one_1g_page_and_the_host_maps_it_1g() {
    let mut m = model(8, 1);
    assert_eq!(m.gigs(), 2, "the 10 frames past 2G are no 1G frame");
    assert_eq!(m.populate_gig(0).unwrap(), GigPopulatePlan::Gig { slot: 0 });
    assert_eq!(m.gig(0), Some(0));
    assert_eq!(m.gig_pool().free_count(), 0);
    assert_eq!(m.frame(0), FrameView::Gig { slot: 0, index: 0 });
    assert_eq!(
        m.frame(511),
        FrameView::Gig {
            slot: 0,
            index: 511
        }
    );
    assert_eq!(m.frame(512), FrameView::Unpopulated);
    assert_eq!(
        m.populate_gig(0).unwrap(),
        GigPopulatePlan::AlreadyPopulated
    );
    assert_eq!(m.populate_gig(1).unwrap(), GigPopulatePlan::NoGigPage);
    assert!(matches!(
        m.populate_gig(2),
        Err(ModelError::GigOutOfRange { gig: 2, gigs: 2 })
    ));
    // The 2M model leaves it alone.
    assert_eq!(m.populate(7).unwrap(), PopulatePlan::AlreadyPopulated);
    let page = 7 * PAGES_PER_HPAGE + 3;
    for e in [
        m.discard(page, 1).unwrap_err(),
        m.split(7).unwrap_err(),
        m.collapse(7).unwrap_err(),
        m.pin(7).unwrap_err(),
    ] {
        assert_eq!(e, ModelError::InGig { frame: 7, gig: 0 });
    }
    // Every page of it is present: a refill there has nothing to do.
    assert!(m.refill(page, 1).unwrap().is_empty());
    ok(&m);
    // KVM's mirror sees a 1G host leaf behind every frame of it: a fault there
    // maps 1G (TDP, memslot 1G aligned in gpa and hva).
    let base = 0x7f00_0000_0000u64;
    let mut s = SecondaryMmu::with_params(MmuParams::tdp());
    s.add_slot(Memslot {
        id: 0,
        base_gfn: 0,
        npages: m.pages(),
        userspace_addr: base,
        dirty_logging: false,
    })
    .unwrap();
    let levels = host_levels(&m.frame_views());
    assert!(levels[..FRAMES_PER_GIG]
        .iter()
        .all(|l| *l == Some(Level::G1)));
    let host = LevelMap::new(base, levels);
    assert_eq!(s.kvm_mmu_max_mapping_level(5, &host), Level::G1);
    s.fault(5, Level::G1, &host).unwrap();
    assert_eq!((s.pages_4k(), s.pages_2m(), s.pages_1g()), (0, 0, 1));
}

#[test]
fn a_give_back_splits_1g_to_2m_and_only_its_2m_frame_to_4k_then_all_collapses_back() {
    let mut m = model(FRAMES_PER_GIG + 8, 1);
    m.populate_gig(0).unwrap();
    let GigSplitPlan::Split {
        gig,
        gig_slot,
        frames,
        block,
    } = m.split_gig(0).unwrap()
    else {
        panic!("not split")
    };
    assert_eq!((gig, gig_slot, frames.len()), (0, 0, FRAMES_PER_GIG));
    // One block of the 2M pool, frame i on slot i: one mapping replaces the 1G page.
    assert_eq!(block, Some(0));
    assert!(frames
        .iter()
        .enumerate()
        .all(|(i, (f, p))| *f == i && *p == PopulatePlan::Huge { slot: i as u32 }));
    assert_eq!(m.gig(0), None);
    assert_eq!(m.gig_pool().free_count(), 1, "the 1G page is free again");
    assert_eq!(m.huge_pool().used_count(), FRAMES_PER_GIG);
    ok(&m);
    // The guest gives back 4K of frame 5: only that frame goes to 4K.
    let steps = m.discard(5 * PAGES_PER_HPAGE + 9, 1).unwrap();
    assert!(matches!(
        steps[..],
        [DiscardStep::SplitHuge { frame: 5, .. }]
    ));
    let views = m.frame_views();
    assert_eq!(views[5], FrameView::Small { present: 511 });
    assert_eq!(
        views[..FRAMES_PER_GIG]
            .iter()
            .filter(|v| matches!(v, FrameView::Huge { .. }))
            .count(),
        511
    );
    ok(&m);
    // Collapse climbs back: 4K -> 1G in one step (the 511 2M frames and the
    // small frame's 511 pages are copied, the given-back page is zero).
    let GigCollapsePlan::Collapse {
        gig_slot,
        sources,
        freed,
        ..
    } = m.collapse_gig(0).unwrap()
    else {
        panic!("not collapsed")
    };
    assert_eq!(gig_slot, 0);
    assert_eq!(sources.len(), FRAMES_PER_GIG);
    match &sources[5] {
        GigSource::Small { pages } => {
            assert_eq!(pages.len(), 511);
            assert!(pages.iter().all(|(i, _)| *i != 9));
        }
        other => panic!("frame 5 source {other:?}"),
    }
    assert_eq!(
        sources
            .iter()
            .filter(|s| matches!(s, GigSource::Huge { .. }))
            .count(),
        511
    );
    assert_eq!(freed.len(), FRAMES_PER_GIG);
    assert_eq!(m.huge_pool().used_count(), 0);
    assert_eq!(m.small_pool().used_count(), 0);
    assert_eq!(m.frame(5), FrameView::Gig { slot: 0, index: 5 });
    assert_eq!(m.collapse_gig(0).unwrap(), GigCollapsePlan::AlreadyGig);
    ok(&m);
}

#[test]
fn a_split_with_a_short_2m_pool_falls_back_to_small_pages_or_changes_nothing() {
    // 100 2M pages: 100 frames get one, 412 get small pages.
    let mut m = model(100, 1);
    m.populate_gig(0).unwrap();
    let GigSplitPlan::Split { frames, block, .. } = m.split_gig(0).unwrap() else {
        panic!("not split")
    };
    assert_eq!(block, None, "no block of 512 free 2M pages");
    let huge = frames
        .iter()
        .filter(|(_, p)| matches!(p, PopulatePlan::Huge { .. }))
        .count();
    assert_eq!(huge, 100);
    assert_eq!(m.small_pool().used_count(), 412 * 512);
    ok(&m);
    // Too few small pages as well: refused, nothing changed.
    let mut m =
        RamModel::with_small_limit(FRAMES, 100, ThpPolicy::always(), Some(1000)).with_gig_pool(1);
    m.populate_gig(0).unwrap();
    let before = (m.frame_views(), m.huge_pool().free_count(), m.gig(0));
    assert!(matches!(
        m.split_gig(0),
        Err(ModelError::SmallPoolExhausted { .. })
    ));
    assert_eq!(
        before,
        (m.frame_views(), m.huge_pool().free_count(), m.gig(0))
    );
    ok(&m);
}

#[test]
fn a_collapse_to_1g_is_refused_while_pinned_or_with_no_1g_page() {
    let mut m = model(16, 1);
    m.populate_gig(1).unwrap();
    for f in 0..3 {
        m.populate(f).unwrap();
    }
    m.pin(1).unwrap();
    assert_eq!(
        m.collapse_gig(0).unwrap_err(),
        ModelError::Busy { frame: 1, pins: 1 }
    );
    m.unpin(1).unwrap();
    assert_eq!(
        m.collapse_gig(0).unwrap_err(),
        ModelError::GigPoolEmpty {
            gig: 0,
            capacity: 1
        }
    );
    ok(&m);
    // Its 1G page freed (split), 1G frame 0 can have it.
    m.split_gig(1).unwrap();
    let GigCollapsePlan::Collapse { sources, .. } = m.collapse_gig(0).unwrap() else {
        panic!("not collapsed")
    };
    assert!(sources[..3]
        .iter()
        .all(|s| matches!(s, GigSource::Huge { .. })));
    assert!(sources[3..].iter().all(|s| *s == GigSource::Unpopulated));
    ok(&m);
}

#[test]
fn a_rolled_back_1g_split_or_collapse_restores_the_model() {
    let mut m = model(FRAMES_PER_GIG, 1);
    m.populate_gig(0).unwrap();
    let before = format!("{m:?}");
    m.checkpoint();
    m.split_gig(0).unwrap();
    m.rollback();
    assert_eq!(before, format!("{m:?}"));
    m.split_gig(0).unwrap();
    let before = format!("{m:?}");
    m.checkpoint();
    m.collapse_gig(0).unwrap();
    m.rollback();
    assert_eq!(before, format!("{m:?}"));
    ok(&m);
}

// ------------------------------------------------------------ random sequences

#[derive(Debug, Clone)]
enum GigOp {
    PopulateGig(usize),
    SplitGig(usize),
    CollapseGig(usize),
    Populate(usize),
    Discard(u64, u64),
    Collapse(usize),
    Pin(usize),
    Unpin(usize),
    InjectGig(u32),
}

/// Frames near the edges of the 1G frames, where off-by-ones hide.
fn frame() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(511),
        Just(512),
        Just(1023),
        Just(1024),
        0..FRAMES
    ]
}

fn gig_op() -> impl Strategy<Value = GigOp> {
    let g = 0..3usize; // 2 is out of range
    prop_oneof![
        3 => g.clone().prop_map(GigOp::PopulateGig),
        3 => g.clone().prop_map(GigOp::SplitGig),
        3 => g.prop_map(GigOp::CollapseGig),
        2 => frame().prop_map(GigOp::Populate),
        3 => (frame(), 0..512u64, prop_oneof![Just(1u64), Just(512), 1..2000u64])
            .prop_map(|(f, i, n)| GigOp::Discard(f as u64 * PAGES_PER_HPAGE + i, n)),
        1 => frame().prop_map(GigOp::Collapse),
        1 => frame().prop_map(GigOp::Pin),
        1 => frame().prop_map(GigOp::Unpin),
        1 => (0..2u32).prop_map(GigOp::InjectGig),
    ]
}

/// Successful 1G populates, splits and collapses (each must happen in the run).
type Done = Cell<[u32; 3]>;

fn count(done: &Done, i: usize) {
    let mut d = done.get();
    d[i] += 1;
    done.set(d);
}

fn run_gig(ops: &[GigOp], done: &Done) -> Result<(), TestCaseError> {
    // 600 2M pages: a 1G split takes 512, so a second one falls back in part.
    let mut m = RamModel::with_small_limit(FRAMES, 600, ThpPolicy::always(), Some(200_000))
        .with_gig_pool(1);
    let pages = m.pages();
    let mut present = vec![false; pages as usize];
    for op in ops {
        let before = (
            m.frame_views(),
            m.huge_pool().free_count(),
            m.small_pool().used_count(),
            m.gig_pool().free_count(),
        );
        let res: Result<(), ModelError> = match *op {
            GigOp::PopulateGig(g) => m.populate_gig(g).map(|p| {
                if let GigPopulatePlan::Gig { .. } = p {
                    count(done, 0);
                    let first = g * FRAMES_PER_GIG * 512;
                    present[first..first + PAGES_PER_GPAGE as usize].fill(true);
                }
            }),
            GigOp::SplitGig(g) => m.split_gig(g).map(|p| {
                if let GigSplitPlan::Split { frames, .. } = p {
                    count(done, 1);
                    assert_eq!(frames.len(), FRAMES_PER_GIG);
                }
            }),
            GigOp::CollapseGig(g) => m.collapse_gig(g).map(|p| {
                if let GigCollapsePlan::Collapse { sources, .. } = p {
                    count(done, 2);
                    for (i, s) in sources.iter().enumerate() {
                        let f = g * FRAMES_PER_GIG + i;
                        let n = present[f * 512..f * 512 + 512]
                            .iter()
                            .filter(|p| **p)
                            .count();
                        let from = match s {
                            GigSource::Huge { .. } => 512,
                            GigSource::Small { pages } => pages.len(),
                            GigSource::Unpopulated => 0,
                        };
                        assert_eq!(n, from, "frame {f}");
                    }
                    let first = g * FRAMES_PER_GIG * 512;
                    present[first..first + PAGES_PER_GPAGE as usize].fill(true);
                }
            }),
            GigOp::Populate(f) => m.populate(f).map(|p| {
                if p != PopulatePlan::AlreadyPopulated {
                    present[f * 512..f * 512 + 512].fill(true);
                }
            }),
            GigOp::Discard(a, n) => {
                let n = n.min(pages - a);
                m.discard(a, n)
                    .map(|_| present[a as usize..(a + n) as usize].fill(false))
            }
            GigOp::Collapse(f) => m.collapse(f).map(|p| {
                if p != thp::CollapsePlan::AlreadyHuge {
                    present[f * 512..f * 512 + 512].fill(true);
                }
            }),
            GigOp::Pin(f) => m.pin(f),
            GigOp::Unpin(f) => m.unpin(f),
            GigOp::InjectGig(n) => {
                m.inject_gig_failures(n);
                Ok(())
            }
        };
        if res.is_err() {
            let after = (
                m.frame_views(),
                m.huge_pool().free_count(),
                m.small_pool().used_count(),
                m.gig_pool().free_count(),
            );
            prop_assert_eq!(&before, &after, "error {:?} changed the model", res);
        }
        if let Err(e) = m.check_invariants() {
            return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
        }
        for f in 0..FRAMES {
            let n = present[f * 512..f * 512 + 512]
                .iter()
                .filter(|p| **p)
                .count() as u32;
            match m.frame(f) {
                FrameView::Unpopulated => prop_assert_eq!(n, 0, "frame {}", f),
                FrameView::Huge { .. } | FrameView::Gig { .. } => {
                    prop_assert_eq!(n, 512, "frame {}", f)
                }
                FrameView::Small { present } => prop_assert_eq!(n, present, "frame {}", f),
            }
        }
    }
    Ok(())
}

#[test]
fn proptest_1g_frames_random_operations_keep_invariants() {
    let ran = Cell::new(0u64);
    let done = Done::default();
    // A fixed seed: the coverage check below (each 1G operation done at
    // least 10 times) held for most random seeds but not all (CI once saw
    // 9 populates); deterministic, it can fail only on a real change.
    TestRunner::new_with_rng(
        Config {
            cases: 48,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    )
    .run(&prop::collection::vec(gig_op(), 40), |ops| {
        ran.set(ran.get() + ops.len() as u64);
        run_gig(&ops, &done)
    })
    .unwrap();
    assert!(ran.get() >= 1920, "ran {} operations", ran.get());
    eprintln!("1G populates, splits, collapses done: {:?}", done.get());
    assert!(done.get().iter().all(|n| *n >= 10), "{:?}", done.get());
}
