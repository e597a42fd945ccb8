//! Property tests: random operation sequences on RamModel, on the primary
//! model (fork/COW/pin/split/collapse/shrinker) and on the mirror with
//! invalidations; invariants checked after every operation. The number of
//! operations run is counted and asserted per test: 30,000 (RamModel) +
//! 45,000 (primary) + 30,000 (mirror) = 105,000 in total, plus 4,800
//! RamModel operations each rolled back and replayed in a transaction.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::cell::Cell;
use thp::folio::FolioId;
use thp::invariants::{check_primary, check_secondary};
use thp::kvm_mirror::{HostMap, Memslot, MmuParams, PendingFault, SecondaryMmu};
use thp::policy::{Defrag, Enabled, ThpPolicy};
use thp::primary::{FrameMap, MmId, Primary};
use thp::units::{Level, PAGES_PER_HPAGE, PAGE_SIZE};
use thp::{CollapsePlan, DiscardStep, FrameView, PopulatePlan, RamModel, SplitPlan};

const HVA: u64 = 0x7f00_0000_0000;

/// Run `check` on `cases` inputs drawn from `strategy` (failures are not
/// persisted), then assert that at least `min_ops` operations ran in all
/// (`ops_in` counts those of one input).
fn run_counted<S: Strategy>(
    cases: u32,
    strategy: S,
    ops_in: impl Fn(&S::Value) -> usize,
    min_ops: u64,
    what: &str,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let count = Cell::new(0u64);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
    .run(&strategy, |v| {
        count.set(count.get() + ops_in(&v) as u64);
        check(v)
    })
    .unwrap();
    assert!(
        count.get() >= min_ops,
        "ran {} {what} operations",
        count.get()
    );
}

/// The `i`-th (modulo their count) large folio of `p`, if it has any.
fn nth_large_folio(p: &Primary, i: usize) -> Option<FolioId> {
    let large: Vec<FolioId> = p
        .folios()
        .iter()
        .filter(|(_, f)| f.is_large())
        .map(|(id, _)| id)
        .collect();
    (!large.is_empty()).then(|| large[i % large.len()])
}

/// Pages biased toward interesting offsets in `frames` frames.
fn page(frames: u64) -> impl Strategy<Value = u64> {
    (
        0..frames,
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(255),
            Just(256),
            Just(511),
            0..512u64
        ],
    )
        .prop_map(|(f, i)| f * PAGES_PER_HPAGE + i)
}

// ---------------------------------------------------------------- RamModel

#[derive(Debug, Clone)]
enum RamOp {
    Populate(usize),
    Discard(u64, u64),
    Refill(u64, u64),
    Split(usize),
    Collapse(usize),
    Pin(usize),
    Unpin(usize),
    InjectHuge(u32),
}

const RAM_FRAMES: usize = 4;

fn ram_op() -> impl Strategy<Value = RamOp> {
    let f = 0..RAM_FRAMES;
    let pages = RAM_FRAMES as u64;
    prop_oneof![
        3 => f.clone().prop_map(RamOp::Populate),
        3 => (page(pages), prop_oneof![Just(1u64), Just(512), 1..700u64]).prop_map(|(a, n)| RamOp::Discard(a, n)),
        2 => (page(pages), 1..600u64).prop_map(|(a, n)| RamOp::Refill(a, n)),
        1 => f.clone().prop_map(RamOp::Split),
        2 => f.clone().prop_map(RamOp::Collapse),
        1 => f.clone().prop_map(RamOp::Pin),
        1 => f.prop_map(RamOp::Unpin),
        1 => (0..3u32).prop_map(RamOp::InjectHuge),
    ]
}

fn run_ram(ops: &[RamOp], policy: ThpPolicy) -> Result<(), TestCaseError> {
    let mut m = RamModel::with_small_limit(RAM_FRAMES, 2, policy, Some(1400));
    let pages = m.pages();
    let mut present = vec![false; pages as usize];
    for op in ops {
        let before = (
            m.frame_views(),
            m.huge_pool().free_count(),
            m.small_pool().used_count(),
        );
        let res: Result<(), thp::ModelError> = match *op {
            RamOp::Populate(f) => m.populate(f).map(|plan| {
                let base = f * 512;
                match plan {
                    PopulatePlan::AlreadyPopulated => {}
                    PopulatePlan::Huge { .. } => present[base..base + 512].fill(true),
                    PopulatePlan::Small { slots } => {
                        assert_eq!(slots.len(), 512);
                        present[base..base + 512].fill(true);
                    }
                }
            }),
            RamOp::Discard(a, n) => {
                let n = n.min(pages - a);
                m.discard(a, n).map(|steps| {
                    for st in &steps {
                        match st {
                            DiscardStep::WholeHuge { .. } => {}
                            DiscardStep::SplitHuge { kept, dropped, .. } => {
                                assert_eq!(kept.len() + dropped.len(), 512)
                            }
                            DiscardStep::Small { freed, .. } => {
                                assert!(freed.len() as u64 <= n)
                            }
                        }
                    }
                    present[a as usize..(a + n) as usize].fill(false);
                })
            }
            RamOp::Refill(a, n) => {
                let n = n.min(pages - a);
                m.refill(a, n).map(|steps| {
                    let filled: usize = steps.iter().map(|s| s.filled.len()).sum();
                    let missing = present[a as usize..(a + n) as usize]
                        .iter()
                        .filter(|p| !**p)
                        .count();
                    assert_eq!(filled, missing);
                    present[a as usize..(a + n) as usize].fill(true);
                })
            }
            RamOp::Split(f) => m.split(f).map(|plan| {
                if let SplitPlan::Split { copied, .. } = plan {
                    assert_eq!(copied.len(), 512);
                }
            }),
            RamOp::Collapse(f) => m.collapse(f).map(|plan| {
                if let CollapsePlan::Collapse {
                    copy,
                    zero,
                    free_small,
                    ..
                } = plan
                {
                    assert_eq!(copy.len() + zero.len(), 512);
                    assert_eq!(copy.len(), free_small.len());
                    present[f * 512..f * 512 + 512].fill(true);
                }
            }),
            RamOp::Pin(f) => m.pin(f),
            RamOp::Unpin(f) => m.unpin(f),
            RamOp::InjectHuge(n) => {
                m.inject_huge_failures(n);
                Ok(())
            }
        };
        if res.is_err() {
            let after = (
                m.frame_views(),
                m.huge_pool().free_count(),
                m.small_pool().used_count(),
            );
            prop_assert_eq!(&before, &after, "error {:?} changed the model", res);
        }
        if let Err(e) = m.check_invariants() {
            return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
        }
        for f in 0..RAM_FRAMES {
            let n = present[f * 512..f * 512 + 512]
                .iter()
                .filter(|p| **p)
                .count() as u32;
            match m.frame(f) {
                FrameView::Unpopulated => prop_assert_eq!(n, 0),
                FrameView::Huge { .. } => prop_assert_eq!(n, 512),
                FrameView::Small { present } => prop_assert_eq!(n, present),
                FrameView::Gig { .. } => prop_assert!(false, "frame {} is 1G with no 1G pool", f),
            }
        }
    }
    Ok(())
}

#[test]
fn proptest_ram_model_random_operations_keep_invariants() {
    let policy = (0..3usize).prop_map(|i| match i {
        0 => ThpPolicy::always(),
        1 => ThpPolicy {
            enabled: Enabled::Madvise,
            defrag: Defrag::Never,
            ..Default::default()
        },
        _ => ThpPolicy::never(),
    });
    run_counted(
        200,
        (prop::collection::vec(ram_op(), 150), policy),
        |(ops, _)| ops.len(),
        30_000,
        "RamModel",
        |(ops, policy)| run_ram(&ops, policy),
    );
}

/// Runs `op` for [`run_undo`]; `false` for pin, unpin and fault injection,
/// which transactions do not cover. An odd-length discard goes through
/// `discard_frame_pages` (the give-back path) on its first frame.
fn apply_undoable(m: &mut RamModel, op: &RamOp) -> bool {
    let pages = m.pages();
    match *op {
        RamOp::Populate(f) => drop(m.populate(f)),
        RamOp::Discard(a, n) if n % 2 == 1 => {
            let (f, lo) = ((a / PAGES_PER_HPAGE) as usize, a % PAGES_PER_HPAGE);
            let idx: Vec<u16> = (lo..(lo + n).min(PAGES_PER_HPAGE))
                .map(|i| i as u16)
                .collect();
            drop(m.discard_frame_pages(f, &idx, a % 4 == 1))
        }
        RamOp::Discard(a, n) => drop(m.discard(a, n.min(pages - a))),
        RamOp::Refill(a, n) => drop(m.refill(a, n.min(pages - a))),
        RamOp::Split(f) => drop(m.split(f)),
        RamOp::Collapse(f) => drop(m.collapse(f)),
        RamOp::Pin(_) | RamOp::Unpin(_) | RamOp::InjectHuge(_) => return false,
    }
    true
}

/// `RamModel::checkpoint` / `rollback`: every operation (successful or not)
/// rolled back leaves the model exactly as before, down to the pools' free
/// lists, the arena's free ids and the counters (full `Debug` dumps
/// compared); the same operation committed on the restored model matches
/// a run without transaction.
fn run_undo(ops: &[RamOp], policy: ThpPolicy, shmem: bool) -> Result<(), TestCaseError> {
    let mut m = if shmem {
        RamModel::shmem(RAM_FRAMES, 2, policy)
    } else {
        RamModel::with_small_limit(RAM_FRAMES, 2, policy, Some(1400))
    };
    for op in ops {
        match *op {
            RamOp::Pin(f) => drop(m.pin(f)),
            RamOp::Unpin(f) => drop(m.unpin(f)),
            RamOp::InjectHuge(n) => m.inject_huge_failures(n),
            _ => {}
        }
        let before = format!("{m:?}");
        m.checkpoint();
        if apply_undoable(&mut m, op) {
            m.rollback();
            prop_assert_eq!(&before, &format!("{m:?}"), "rollback of {:?}", op);
            let mut twin = m.clone();
            apply_undoable(&mut twin, op);
            m.checkpoint();
            apply_undoable(&mut m, op);
            m.commit();
            prop_assert_eq!(format!("{twin:?}"), format!("{m:?}"), "commit of {:?}", op);
        } else {
            m.commit();
        }
        if let Err(e) = m.check_invariants() {
            return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
        }
    }
    Ok(())
}

#[test]
fn proptest_ram_model_rollback_restores_the_model_exactly() {
    let setup = (0..3usize).prop_map(|i| match i {
        0 => (ThpPolicy::always(), false),
        1 => (ThpPolicy::never(), false),
        _ => (ThpPolicy::always(), true),
    });
    run_counted(
        120,
        (prop::collection::vec(ram_op(), 40), setup),
        |(ops, _)| ops.len(),
        4_800,
        "RamModel transaction",
        |(ops, (policy, shmem))| run_undo(&ops, policy, shmem),
    );
}

// ---------------------------------------------------------------- Primary

#[derive(Debug, Clone)]
enum MmOp {
    Fault(usize, u64, bool),
    FaultNoHuge(usize, u64),
    Unmap(usize, u64, u64),
    Fork(usize),
    Destroy(usize),
    Pin(usize, u64),
    Unpin(usize),
    SplitFolio(usize),
    Shrink,
    Collapse(usize, usize),
    Migrate(usize, usize),
    SplitPmd(usize, usize),
    InjectHuge(u32),
}

const MM_FRAMES: usize = 3;

fn mm_op() -> impl Strategy<Value = MmOp> {
    let pages = MM_FRAMES as u64;
    let mm = 0..4usize;
    let fr = 0..MM_FRAMES;
    prop_oneof![
        6 => (mm.clone(), page(pages), any::<bool>()).prop_map(|(m, p, w)| MmOp::Fault(m, p, w)),
        2 => (mm.clone(), page(pages)).prop_map(|(m, p)| MmOp::FaultNoHuge(m, p)),
        3 => (mm.clone(), page(pages), prop_oneof![Just(1u64), Just(512), 1..600u64]).prop_map(|(m, p, n)| MmOp::Unmap(m, p, n)),
        1 => mm.clone().prop_map(MmOp::Fork),
        1 => mm.clone().prop_map(MmOp::Destroy),
        1 => (mm.clone(), page(pages)).prop_map(|(m, p)| MmOp::Pin(m, p)),
        1 => (0..8usize).prop_map(MmOp::Unpin),
        1 => (0..8usize).prop_map(MmOp::SplitFolio),
        1 => Just(MmOp::Shrink),
        2 => (mm.clone(), fr.clone()).prop_map(|(m, f)| MmOp::Collapse(m, f)),
        1 => (mm.clone(), fr.clone()).prop_map(|(m, f)| MmOp::Migrate(m, f)),
        1 => (mm, fr).prop_map(|(m, f)| MmOp::SplitPmd(m, f)),
        1 => (0..3u32).prop_map(MmOp::InjectHuge),
    ]
}

fn run_mm(ops: &[MmOp]) -> Result<(), TestCaseError> {
    let mut policy = ThpPolicy::always();
    policy.khugepaged.max_ptes_none = 300;
    let mut p = Primary::new(2, Some(3000), policy);
    p.new_mm(MM_FRAMES, HVA, true);
    let mut pins = Vec::new();
    for op in ops {
        let ids = p.mm_ids();
        let pick = |i: usize| ids[i % ids.len()];
        let live_before = p.folios().live();
        let r = match *op {
            MmOp::Fault(m, pg, w) => p.fault(pick(m), pg, w).map(|_| ()),
            MmOp::FaultNoHuge(m, pg) => p.fault_nohuge(pick(m), pg, true).map(|_| ()),
            MmOp::Unmap(m, pg, n) => p.unmap(pick(m), pg, n.min(MM_FRAMES as u64 * 512 - pg)),
            MmOp::Fork(m) if ids.len() < 4 => p.fork(pick(m)).map(|_| ()),
            MmOp::Destroy(m) if ids.len() > 1 => {
                let id = pick(m);
                // Pins stay valid: a pinned folio survives its unmapping.
                p.destroy_mm(id)
            }
            MmOp::Pin(m, pg) => p.pin(pick(m), pg).map(|f| pins.push(f)),
            MmOp::Unpin(i) if !pins.is_empty() => {
                let f = pins.swap_remove(i % pins.len());
                p.unpin(f)
            }
            MmOp::SplitFolio(i) => {
                if let Some(id) = nth_large_folio(&p, i) {
                    let pinned = p.folio(id).unwrap().pincount > 0;
                    let r = p.split_folio(id).map(|_| ());
                    prop_assert_eq!(r.is_err(), pinned);
                    if pinned {
                        prop_assert_eq!(
                            p.folios().live(),
                            live_before,
                            "busy split changed nothing"
                        );
                    }
                    r
                } else {
                    Ok(())
                }
            }
            MmOp::Shrink => {
                p.shrink_deferred_split();
                Ok(())
            }
            MmOp::Collapse(m, f) => p.collapse(pick(m), f).map(|r| {
                assert_eq!(r.copied.len() + r.zeroed.len(), 512);
            }),
            MmOp::Migrate(m, f) => p.migrate_frame_to_small(pick(m), f).map(|_| ()),
            MmOp::SplitPmd(m, f) => p.split_huge_pmd(pick(m), f).map(|_| ()),
            MmOp::InjectHuge(n) => {
                p.huge_pool_mut().inject_failures(n);
                Ok(())
            }
            _ => Ok(()),
        };
        let _ = r;
        if let Err(e) = check_primary(&p) {
            return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
        }
        // Pinned folios are never freed.
        for f in &pins {
            prop_assert!(p.folio(*f).is_ok_and(|f| f.pincount > 0));
        }
    }
    Ok(())
}

#[test]
fn proptest_primary_fork_cow_pin_split_collapse_shrink_keep_invariants() {
    run_counted(
        150,
        prop::collection::vec(mm_op(), 300),
        Vec::len,
        45_000,
        "primary",
        |ops| run_mm(&ops),
    );
}

// ---------------------------------------------------------------- Mirror

#[derive(Debug, Clone)]
enum MirOp {
    Host(MmOp),
    KvmFault(u64, bool),
    BeginFault(u64),
    FinishFault(usize),
    Invalidate(u64, u64),
    Track(u64),
    Untrack(u64),
    DirtyLog(bool),
}

fn mir_op() -> impl Strategy<Value = MirOp> {
    let pages = MM_FRAMES as u64;
    prop_oneof![
        5 => mm_op().prop_map(MirOp::Host),
        5 => (page(pages), any::<bool>()).prop_map(|(g, h)| MirOp::KvmFault(g, h)),
        2 => page(pages).prop_map(MirOp::BeginFault),
        2 => (0..4usize).prop_map(MirOp::FinishFault),
        1 => (page(pages), 1..1100u64).prop_map(|(g, n)| MirOp::Invalidate(g, n)),
        1 => page(pages).prop_map(MirOp::Track),
        1 => page(pages).prop_map(MirOp::Untrack),
        1 => any::<bool>().prop_map(MirOp::DirtyLog),
    ]
}

/// Notifier range (pages) a host op needs: its frames, whole (a superset of
/// the kernel's ranges), or everything for fork/shrink/destroy/split_folio.
fn host_range(op: &MmOp) -> (u64, u64) {
    let all = (0, MM_FRAMES as u64 * 512);
    let fr = |f: usize| (f as u64 * 512, f as u64 * 512 + 512);
    match *op {
        MmOp::Fault(_, pg, _) | MmOp::FaultNoHuge(_, pg) => fr((pg / 512) as usize),
        MmOp::Unmap(_, pg, n) => {
            let end = (pg + n).min(all.1);
            (pg / 512 * 512, end.div_ceil(512) * 512)
        }
        MmOp::Collapse(_, f) | MmOp::Migrate(_, f) | MmOp::SplitPmd(_, f) => fr(f),
        MmOp::Pin(..) | MmOp::Unpin(_) | MmOp::InjectHuge(_) => (0, 0),
        _ => all,
    }
}

fn run_mirror(ops: &[MirOp]) -> Result<(), TestCaseError> {
    let mut p = Primary::new(2, Some(3000), ThpPolicy::always());
    let mm: MmId = p.new_mm(MM_FRAMES, HVA, true);
    // Odd-length sequences run on the shadow MMU, even ones on the TDP MMU.
    let shadow = ops.len() % 2 == 1;
    let mut s = SecondaryMmu::with_params(if shadow {
        MmuParams::shadow()
    } else {
        MmuParams::tdp()
    });
    s.add_slot(Memslot {
        id: 0,
        base_gfn: 0,
        npages: MM_FRAMES as u64 * 512,
        userspace_addr: HVA,
        dirty_logging: false,
    })
    .unwrap();
    let mut pending: Vec<PendingFault> = Vec::new();
    let mut pins = Vec::new();
    let hva = |pg: u64| HVA + pg * PAGE_SIZE;
    for op in ops {
        match op {
            MirOp::Host(h) => {
                // The mirror's primary is mm 0 only; fork/destroy act on it.
                let (a, b) = host_range(h);
                if a < b {
                    s.invalidate_range_start(hva(a), hva(b));
                }
                let _ = match *h {
                    MmOp::Fault(_, pg, w) => p.fault(mm, pg, w).map(|_| ()),
                    MmOp::FaultNoHuge(_, pg) => p.fault_nohuge(mm, pg, true).map(|_| ()),
                    MmOp::Unmap(_, pg, n) => p.unmap(mm, pg, n.min(MM_FRAMES as u64 * 512 - pg)),
                    MmOp::Fork(_) if p.mm_ids().len() < 3 => p.fork(mm).map(|_| ()),
                    MmOp::Pin(_, pg) => p.pin(mm, pg).map(|f| pins.push(f)),
                    MmOp::Unpin(i) if !pins.is_empty() => {
                        let f = pins.swap_remove(i % pins.len());
                        p.unpin(f)
                    }
                    MmOp::SplitFolio(i) => match nth_large_folio(&p, i) {
                        Some(id) => p.split_folio(id).map(|_| ()),
                        None => Ok(()),
                    },
                    MmOp::Shrink => {
                        p.shrink_deferred_split();
                        Ok(())
                    }
                    MmOp::Collapse(_, f) => p.collapse(mm, f).map(|_| ()),
                    MmOp::Migrate(_, f) => p.migrate_frame_to_small(mm, f).map(|_| ()),
                    MmOp::SplitPmd(_, f) => p.split_huge_pmd(mm, f).map(|_| ()),
                    MmOp::InjectHuge(n) => {
                        p.huge_pool_mut().inject_failures(n);
                        Ok(())
                    }
                    _ => Ok(()),
                };
                if a < b {
                    s.invalidate_range_end(hva(a), hva(b)).unwrap();
                }
            }
            MirOp::KvmFault(g, huge) => {
                let lvl = if *huge { Level::M2 } else { Level::K4 };
                s.fault(*g, lvl, p.mm(mm).unwrap()).unwrap();
            }
            MirOp::BeginFault(g) => {
                if pending.len() < 4 {
                    let mut f = s.fault_begin(*g, Level::M2).unwrap();
                    s.fault_translate(&mut f, p.mm(mm).unwrap());
                    pending.push(f);
                }
            }
            MirOp::FinishFault(i) => {
                if !pending.is_empty() {
                    let f = pending.swap_remove(i % pending.len());
                    let host = p.mm(mm).unwrap();
                    let still_same = f.pfn == host.pfn(f.hva);
                    if !s.fault_must_retry(&f) {
                        prop_assert!(still_same, "retry check passed for a changed translation");
                        s.fault_install(&f, host).unwrap();
                    }
                }
            }
            MirOp::Invalidate(g, n) => {
                let end = (g + n).min(MM_FRAMES as u64 * 512);
                let zapped_before = (s.pages_4k(), s.pages_2m());
                s.invalidate_range_start(hva(*g), hva(end));
                for x in [*g, end - 1] {
                    prop_assert!(
                        s.lookup(x).is_none(),
                        "gfn {} still mapped inside the invalidated range",
                        x
                    );
                }
                let _ = zapped_before;
                s.invalidate_range_end(hva(*g), hva(end)).unwrap();
            }
            MirOp::Track(g) => {
                if shadow {
                    s.account_shadowed(*g).unwrap();
                } else {
                    prop_assert!(s.account_shadowed(*g).is_err());
                }
            }
            MirOp::Untrack(g) => {
                let _ = s.unaccount_shadowed(*g);
            }
            MirOp::DirtyLog(on) => s.set_dirty_logging(0, *on, p.mm(mm).unwrap()).unwrap(),
        }
        if let Err(e) = check_primary(&p).and_then(|_| check_secondary(&s, p.mm(mm).unwrap())) {
            return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
        }
        // A 2M leaf implies a PMD-mapped host frame.
        for f in 0..MM_FRAMES as u64 {
            if let Some((Level::M2, _)) = s.lookup(f * 512) {
                prop_assert!(matches!(
                    p.mm(mm).unwrap().frame(f as usize),
                    FrameMap::Pmd(_)
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn proptest_mirror_faults_with_invalidations_never_stale() {
    run_counted(
        100,
        prop::collection::vec(mir_op(), 300),
        Vec::len,
        30_000,
        "mirror",
        |ops| run_mirror(&ops),
    );
}
