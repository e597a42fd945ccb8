//! Fault-vs-invalidation interleavings: exhaustive for small scenarios,
//! seeded random for long ones.

use thp::interleave::{random_scenario, run_exhaustive, run_random, Actor, HostOp, Scenario};
use thp::units::Level;

/// Number of schedules of one 5-step fault against one 3-step invalidation,
/// counted independently by dynamic programming: with the mmu_lock modelled,
/// the invalidation's start and end steps (which zap under mmu_lock) cannot
/// run while the fault holds the lock (after "take lock", before "install").
fn expected_schedules(model_lock: bool) -> u64 {
    fn f(i: usize, j: usize, lock: bool, memo: &mut [[Option<u64>; 4]; 6]) -> u64 {
        if i == 5 && j == 3 {
            return 1;
        }
        if let Some(v) = memo[i][j] {
            return v;
        }
        let holding = lock && (i == 3 || i == 4);
        let mut n = 0;
        if i < 5 {
            n += f(i + 1, j, lock, memo);
        }
        if j < 3 && !(holding && (j == 0 || j == 2)) {
            n += f(i, j + 1, lock, memo);
        }
        memo[i][j] = Some(n);
        n
    }
    f(0, 0, model_lock, &mut [[None; 4]; 6])
}

fn one_fault_one_unmap(fault_gfn: u64, unmap_first: u64, lock: bool) -> Scenario {
    let mut s = Scenario::new(2, 2);
    s.setup = vec![
        HostOp::WriteFault { page: 0 },
        HostOp::WriteFault { page: 512 },
    ];
    s.actors = vec![
        Actor::KvmFault {
            gfn: fault_gfn,
            guest_max_level: Level::M2,
        },
        Actor::Host(HostOp::Unmap {
            first: unmap_first,
            npages: 1,
        }),
    ];
    s.model_mmu_lock = lock;
    s
}

#[test]
fn exhaustive_interleaving_covers_all_schedules_with_mmu_lock() {
    // The fault on page 100 races a 4K unmap of page 100 of the same
    // PMD-mapped frame (split_huge_pmd + zap).
    let r = run_exhaustive(&one_fault_one_unmap(100, 100, true)).unwrap();
    assert_eq!(expected_schedules(true), 26);
    assert_eq!(r.schedules, 26);
    assert!(r.outcomes.retries > 0, "some schedules must retry");
    assert!(r.outcomes.installed > 0, "some schedules must install");
    assert!(
        r.outcomes.no_host_page > 0,
        "some schedules translate after the unmap"
    );
}

#[test]
fn exhaustive_interleaving_without_lock_counts_binomial_schedules() {
    // Disjoint frames: no race, so every one of C(8,3) = 56 schedules is valid.
    let r = run_exhaustive(&one_fault_one_unmap(5, 600, false)).unwrap();
    assert_eq!(expected_schedules(false), 56);
    assert_eq!(r.schedules, 56);
    let r = run_exhaustive(&one_fault_one_unmap(5, 600, true)).unwrap();
    assert_eq!(r.schedules, 26);
}

#[test]
fn retry_protocol_without_mmu_lock_is_caught_as_stale_pfn() {
    // Without mmu_lock the zap can slip between retry check and install:
    // the checker must find the stale 2M entry.
    let err = run_exhaustive(&one_fault_one_unmap(100, 100, false)).unwrap_err();
    assert!(err.violation.what.contains("stale"), "{err}");
}

#[test]
fn exhaustive_collapse_and_migrate_against_two_faults_never_stale() {
    let mut s = Scenario::new(1, 2);
    s.setup = vec![HostOp::InjectHugeFailures { n: 2 }];
    s.setup
        .extend((0..512).map(|page| HostOp::WriteFault { page }));
    s.setup.push(HostOp::InjectHugeFailures { n: 0 });
    s.actors = vec![
        Actor::KvmFault {
            gfn: 3,
            guest_max_level: Level::M2,
        },
        Actor::Host(HostOp::Collapse { frame: 0 }),
        Actor::KvmFault {
            gfn: 300,
            guest_max_level: Level::M2,
        },
    ];
    let r = run_exhaustive(&s).unwrap();
    assert!(r.schedules > 100, "{r:?}");
    let mut s2 = Scenario::new(1, 1);
    s2.setup = vec![HostOp::WriteFault { page: 0 }];
    s2.actors = vec![
        Actor::KvmFault {
            gfn: 3,
            guest_max_level: Level::M2,
        },
        Actor::Host(HostOp::Migrate { frame: 0 }),
        Actor::Host(HostOp::Pin { page: 9 }),
    ];
    let r2 = run_exhaustive(&s2).unwrap();
    assert!(
        r2.outcomes.host_op_failures > 0,
        "migrate of a pinned folio must fail in some schedules"
    );
}

#[test]
fn random_long_interleavings_never_map_stale_pfn() {
    let mut total = thp::interleave::Report::default();
    for seed in 0..40u64 {
        let s = random_scenario(seed, 3, 40);
        let r = run_random(&s, seed, 5).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        total.schedules += r.schedules;
        total.steps += r.steps;
        total.outcomes.installed += r.outcomes.installed;
        total.outcomes.retries += r.outcomes.retries;
        total.outcomes.host_op_failures += r.outcomes.host_op_failures;
        total.outcomes.nested_invalidations += r.outcomes.nested_invalidations;
    }
    assert_eq!(total.schedules, 200);
    assert!(total.steps > 10_000, "{total:?}");
    assert!(
        total.outcomes.installed > 0 && total.outcomes.retries > 0,
        "{total:?}"
    );
    assert!(
        total.outcomes.host_op_failures > 0,
        "injected failures must show: {total:?}"
    );
}

#[test]
fn random_scenarios_are_deterministic_per_seed() {
    let s = random_scenario(7, 2, 30);
    assert_eq!(
        run_random(&s, 99, 3).unwrap(),
        run_random(&s, 99, 3).unwrap()
    );
    assert_eq!(random_scenario(7, 2, 30).actors, s.actors);
}

#[test]
fn injected_pool_empty_fallback_under_races_stays_consistent() {
    let mut s = Scenario::new(2, 1);
    s.setup = vec![HostOp::WriteFault { page: 0 }];
    s.actors = vec![
        Actor::Host(HostOp::InjectHugeFailures { n: 1 }),
        Actor::Host(HostOp::ReadFault { page: 600 }),
        Actor::KvmFault {
            gfn: 600,
            guest_max_level: Level::M2,
        },
        Actor::Host(HostOp::InjectSmallFailures { n: 1 }),
    ];
    let r = run_exhaustive(&s).unwrap();
    assert!(
        r.outcomes.no_host_page > 0 && r.outcomes.installed > 0,
        "{r:?}"
    );
    assert!(
        r.outcomes.host_op_failures > 0,
        "small allocation failure must hit some schedules"
    );
}
