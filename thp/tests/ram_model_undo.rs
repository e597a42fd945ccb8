//! `RamModel::checkpoint` / `rollback`: after any operation (successful or
//! not) rolled back, the model is exactly the model before it, down to the
//! pools' free lists, the folio arena's free ids and the counters (compared
//! through the full `Debug` dump); and operations after a rollback run as
//! they would have without the rolled-back one.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use thp::policy::ThpPolicy;
use thp::units::PAGES_PER_HPAGE;
use thp::RamModel;

#[derive(Debug, Clone)]
enum Op {
    Populate(usize),
    Discard(u64, u64),
    DiscardFrame(usize, u16, u16, bool),
    Refill(u64, u64),
    Split(usize),
    Collapse(usize),
    Pin(usize),
    Unpin(usize),
    InjectHuge(u32),
}

const FRAMES: usize = 4;

fn op() -> impl Strategy<Value = Op> {
    let f = 0..FRAMES;
    let pages = FRAMES as u64 * PAGES_PER_HPAGE;
    prop_oneof![
        3 => f.clone().prop_map(Op::Populate),
        2 => (0..pages, prop_oneof![Just(1u64), Just(512), 1..700u64]).prop_map(|(a, n)| Op::Discard(a, n)),
        2 => (f.clone(), 0..512u16, 1..512u16, any::<bool>()).prop_map(|(f, a, n, k)| Op::DiscardFrame(f, a, n, k)),
        2 => (0..pages, 1..600u64).prop_map(|(a, n)| Op::Refill(a, n)),
        2 => f.clone().prop_map(Op::Split),
        2 => f.clone().prop_map(Op::Collapse),
        1 => f.clone().prop_map(Op::Pin),
        1 => f.prop_map(Op::Unpin),
        1 => (0..3u32).prop_map(Op::InjectHuge),
    ]
}

/// Runs `op`; `false` for pin, unpin and fault injection, which
/// transactions do not cover.
fn apply(m: &mut RamModel, op: &Op) -> bool {
    let pages = m.pages();
    match *op {
        Op::Populate(f) => drop(m.populate(f)),
        Op::Discard(a, n) => drop(m.discard(a, n.min(pages - a))),
        Op::DiscardFrame(f, a, n, keep) => {
            let pages: Vec<u16> = (a..(a + n).min(512)).collect();
            drop(m.discard_frame_pages(f, &pages, keep))
        }
        Op::Refill(a, n) => drop(m.refill(a, n.min(pages - a))),
        Op::Split(f) => drop(m.split(f)),
        Op::Collapse(f) => drop(m.collapse(f)),
        Op::Pin(_) | Op::Unpin(_) | Op::InjectHuge(_) => return false,
    }
    true
}

fn run(ops: &[Op], policy: ThpPolicy, shmem: bool) -> Result<(), TestCaseError> {
    let mut m = if shmem {
        RamModel::shmem(FRAMES, 2, policy)
    } else {
        RamModel::with_small_limit(FRAMES, 2, policy, Some(1400))
    };
    for op in ops {
        match op {
            Op::Pin(f) => drop(m.pin(*f)),
            Op::Unpin(f) => drop(m.unpin(*f)),
            Op::InjectHuge(n) => m.inject_huge_failures(*n),
            _ => {}
        }
        let before = format!("{m:?}");
        m.checkpoint();
        if apply(&mut m, op) {
            m.rollback();
            prop_assert_eq!(&before, &format!("{m:?}"), "rollback of {:?}", op);
            // The same operation, committed, on the restored model.
            let mut twin = m.clone();
            apply(&mut twin, op);
            m.checkpoint();
            apply(&mut m, op);
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
fn rollback_restores_the_model_exactly_after_any_operation() {
    for (policy, shmem) in [
        (ThpPolicy::always(), false),
        (ThpPolicy::never(), false),
        (ThpPolicy::always(), true),
    ] {
        TestRunner::new(Config {
            cases: 60,
            failure_persistence: None,
            ..Config::default()
        })
        .run(&prop::collection::vec(op(), 1..40), |ops| {
            run(&ops, policy, shmem)
        })
        .unwrap();
    }
}
