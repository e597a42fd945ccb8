//! Every `vmm stress` event kind against the whole KVM fault path:
//! exhaustive one-fault-vs-one-event schedules (counted independently),
//! negative tests per safety mechanism, and a seeded random long run.

mod common;

use thp::interleave::{
    random_event_scenario, run_exhaustive, run_random, Actor, Event, EventKind, HostOp, Report,
    Scenario,
};
use thp::policy::ThpPolicy;
use thp::primary::{MmError, Primary};
use thp::units::{Level, PAGES_PER_HPAGE};

/// Per step of an event kind, whether it runs under `mmu_lock`: an
/// invalidation is start (zap, locked), host change (unlocked), end
/// (locked); a memslot update is one locked step.
fn lock_pattern(kind: EventKind) -> Vec<bool> {
    let inv = [true, false, true];
    match kind {
        EventKind::Discard4k
        | EventKind::Discard2m
        | EventKind::Split
        | EventKind::Collapse
        | EventKind::Pageout => inv.to_vec(),
        EventKind::Wrprotect => [inv, inv].concat(),
        EventKind::Dirtylog | EventKind::Slot => vec![true, true],
    }
}

/// Schedules of one 5-step fault against one event with step pattern
/// `locked`: the event's steps are distributed over the 6 gaps around the
/// fault's steps (C(n+5, 5) compositions); the fault holds `mmu_lock` from
/// its 3rd step to its 5th, so gaps 3 and 4 may hold only unlocked steps.
fn expected_schedules(locked: &[bool]) -> u64 {
    fn go(locked: &[bool], gap: usize, at: usize) -> u64 {
        if gap == 5 {
            return 1; // the rest goes after the fault's last step
        }
        // Put k more event steps into this gap, then move on.
        (0..=locked.len() - at)
            .filter(|&k| !((gap == 3 || gap == 4) && locked[at..at + k].iter().any(|l| *l)))
            .map(|k| go(locked, gap + 1, at + k))
            .sum()
    }
    go(locked, 0, 0)
}

fn binomial(n: u64, k: u64) -> u64 {
    (0..k).fold(1, |acc, i| acc * (n - i) / (i + 1))
}

/// One frame mapped by a PMD (exclusive, writable), a fault and an event.
fn pmd_world(fault: Actor, ev: Event) -> Scenario {
    let mut s = Scenario::new(1, 2);
    s.setup = vec![HostOp::WriteFault { page: 0 }];
    s.actors = vec![fault, Actor::Event(ev)];
    s
}

/// One frame of 512 small pages (the pool was empty at fault time).
fn small_world(fault: Actor, ev: Event) -> Scenario {
    let mut s = Scenario::new(1, 2);
    // Two failures: the fault retries the pool once after direct reclaim.
    s.setup = vec![HostOp::InjectHugeFailures { n: 2 }];
    s.setup
        .extend((0..PAGES_PER_HPAGE).map(|page| HostOp::WriteFault { page }));
    s.setup.push(HostOp::InjectHugeFailures { n: 0 });
    s.actors = vec![fault, Actor::Event(ev)];
    s
}

fn fault(gfn: u64, write: bool) -> Actor {
    Actor::VcpuFault {
        gfn,
        guest_max_level: Level::M2,
        write,
    }
}

/// Runs the scenario for a read and a write fault, asserts the schedule
/// count, prints it, and returns the merged report.
fn exhaustive(kind: EventKind, make: impl Fn(Actor) -> Scenario, gfn: u64) -> Report {
    let expected = expected_schedules(&lock_pattern(kind));
    let n = lock_pattern(kind).len() as u64;
    let mut total = Report::default();
    for write in [false, true] {
        let r = run_exhaustive(&make(fault(gfn, write)))
            .unwrap_or_else(|e| panic!("{kind} (write={write}): {e}"));
        assert_eq!(r.schedules, expected, "{kind} write={write}: {r:?}");
        total.merge(&r);
    }
    println!(
        "{kind}: {expected} schedules per fault kind (of C({}, 5) = {} unconstrained), {:?}",
        n + 5,
        binomial(n + 5, 5),
        total.outcomes
    );
    total
}

#[test]
fn interleave_schedule_counts_are_derived_independently() {
    // Cross-check the composition count with hand-derived numbers:
    // 3-step invalidation: 20 with nothing in the locked window + 3 * 2
    // with the host change inside it = 26 (of C(8,5) = 56).
    assert_eq!(expected_schedules(&[true, false, true]), 26);
    // Two locked steps: C(5,3) = 10 compositions over the 4 free gaps.
    assert_eq!(expected_schedules(&[true, true]), 10);
    // Two invalidations: C(9,3) = 84 + 3*2 (first change in the window)
    // + C(6,2)*2 (second change in the window) = 120.
    assert_eq!(
        expected_schedules(&[true, false, true, true, false, true]),
        120
    );
    // Nothing locked: every interleaving, C(n+5, 5).
    assert_eq!(expected_schedules(&[false; 4]), binomial(9, 5));
}

#[test]
fn interleave_exhaustive_discard4k() {
    let ev = Event {
        kind: EventKind::Discard4k,
        frame: 0,
        page: 100,
    };
    let r = exhaustive(EventKind::Discard4k, |f| pmd_world(f, ev), 100);
    assert_eq!(r.schedules, 52);
    let o = r.outcomes;
    assert!(o.installed > 0 && o.retries > 0, "{o:?}");
    assert!(
        o.host_fault_ins > 0,
        "faults after the discard fault the page back in: {o:?}"
    );
}

#[test]
fn interleave_exhaustive_discard2m() {
    let ev = Event::new(EventKind::Discard2m, 0);
    let r = exhaustive(EventKind::Discard2m, |f| pmd_world(f, ev), 3);
    let o = r.outcomes;
    assert!(
        o.installed > 0 && o.retries > 0 && o.host_fault_ins > 0,
        "{o:?}"
    );
}

#[test]
fn interleave_exhaustive_split() {
    let ev = Event::new(EventKind::Split, 0);
    let r = exhaustive(EventKind::Split, |f| pmd_world(f, ev), 3);
    let o = r.outcomes;
    assert!(o.installed > 0 && o.retries > 0, "{o:?}");
    assert!(
        o.host_op_failures > 0,
        "split-by-copy must fail while the fault holds its GUP reference: {o:?}"
    );
}

#[test]
fn interleave_exhaustive_collapse() {
    let ev = Event::new(EventKind::Collapse, 0);
    let r = exhaustive(EventKind::Collapse, |f| small_world(f, ev), 3);
    let o = r.outcomes;
    assert!(o.installed > 0 && o.retries > 0, "{o:?}");
    assert!(
        o.host_op_failures > 0,
        "khugepaged must refuse while the fault holds its GUP reference: {o:?}"
    );
    assert!(
        o.host_op_failures < r.schedules,
        "some collapses must succeed: {o:?}"
    );
}

#[test]
fn interleave_exhaustive_wrprotect() {
    let ev = Event::new(EventKind::Wrprotect, 0);
    let r = exhaustive(EventKind::Wrprotect, |f| pmd_world(f, ev), 3);
    let o = r.outcomes;
    assert_eq!(r.schedules, 240);
    assert!(o.installed > 0 && o.retries > 0, "{o:?}");
    assert!(
        o.efaults > 0,
        "a write fault between protect and restore must get -EFAULT: {o:?}"
    );
}

#[test]
fn interleave_exhaustive_dirtylog() {
    let ev = Event::new(EventKind::Dirtylog, 0);
    let r = exhaustive(EventKind::Dirtylog, |f| pmd_world(f, ev), 3);
    let o = r.outcomes;
    assert_eq!(r.schedules, 20);
    assert!(
        o.installed_2m > 0,
        "2M before logging on or after off: {o:?}"
    );
    assert!(
        o.installed > o.installed_2m,
        "4K while logging is on: {o:?}"
    );
    assert!(
        o.stale_slot_retries > 0,
        "a fault that read the slot before a toggle must retry: {o:?}"
    );
}

#[test]
fn interleave_exhaustive_slot() {
    let ev = Event::new(EventKind::Slot, 0);
    let r = exhaustive(EventKind::Slot, |f| pmd_world(f, ev), 3);
    let o = r.outcomes;
    assert!(o.installed > 0, "{o:?}");
    assert!(
        o.mmio_exits > 0,
        "a fault while the slot is deleted exits to MMIO: {o:?}"
    );
    assert!(o.stale_slot_retries > 0, "{o:?}");
}

#[test]
fn interleave_exhaustive_pageout() {
    let ev = Event::new(EventKind::Pageout, 0);
    let r = exhaustive(EventKind::Pageout, |f| pmd_world(f, ev), 3);
    let o = r.outcomes;
    assert!(o.installed > 0 && o.retries > 0, "{o:?}");
    assert!(
        o.host_fault_ins > 0,
        "a fault after the pageout faults the page back in: {o:?}"
    );
}

#[test]
fn interleave_negative_dirtylog_without_generation_check_installs_2m_under_logging() {
    let mut s = pmd_world(fault(3, false), Event::new(EventKind::Dirtylog, 0));
    s.model_generation_check = false;
    let err = run_exhaustive(&s).unwrap_err();
    assert!(err.violation.what.contains("dirty logging"), "{err}");
}

#[test]
fn interleave_negative_slot_without_generation_check_maps_deleted_slot() {
    let mut s = pmd_world(fault(3, false), Event::new(EventKind::Slot, 0));
    s.model_generation_check = false;
    let err = run_exhaustive(&s).unwrap_err();
    assert!(
        err.violation.what.contains("outside every memslot"),
        "{err}"
    );
}

#[test]
fn interleave_negative_wrprotect_without_retry_check_keeps_write_permission() {
    // A read fault takes map_writable before the mprotect; without the
    // retry check its writable entry lands over the read-only page.
    let mut s = pmd_world(fault(3, false), Event::new(EventKind::Wrprotect, 0));
    s.model_retry_check = false;
    let err = run_exhaustive(&s).unwrap_err();
    assert!(err.violation.what.contains("write-protected"), "{err}");
}

#[test]
fn interleave_negative_wrprotect_without_write_check_maps_writable() {
    let mut s = pmd_world(fault(3, true), Event::new(EventKind::Wrprotect, 0));
    s.model_write_check = false;
    let err = run_exhaustive(&s).unwrap_err();
    assert!(err.violation.what.contains("write-protected"), "{err}");
}

#[test]
fn interleave_negative_discard_pageout_split_without_retry_check_map_stale_pfn() {
    for kind in [
        EventKind::Discard4k,
        EventKind::Discard2m,
        EventKind::Split,
        EventKind::Pageout,
    ] {
        let mut s = pmd_world(fault(3, false), Event::new(kind, 0));
        s.model_retry_check = false;
        let err = run_exhaustive(&s).unwrap_err();
        assert!(err.violation.what.contains("stale"), "{kind}: {err}");
    }
    let mut s = small_world(fault(3, false), Event::new(EventKind::Collapse, 0));
    s.model_retry_check = false;
    let err = run_exhaustive(&s).unwrap_err();
    assert!(err.violation.what.contains("stale"), "collapse: {err}");
}

#[test]
fn interleave_random_all_event_kinds_with_concurrent_faults() {
    let mut total = Report::default();
    let mut kinds = std::collections::BTreeSet::new();
    for seed in 0..50u64 {
        let s = random_event_scenario(seed, 2, 4, 8);
        for a in &s.actors {
            if let Actor::Event(e) = a {
                kinds.insert(e.kind);
            }
        }
        let r = run_random(&s, seed, 10).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        total.merge(&r);
    }
    println!("random: {total:?}");
    assert_eq!(kinds.len(), EventKind::ALL.len(), "{kinds:?}");
    assert_eq!(total.schedules, 500);
    assert!(total.steps >= 10_000, "{total:?}");
    let o = total.outcomes;
    assert!(o.installed > 0 && o.retries > 0, "{o:?}");
    assert!(o.installed_2m > 0 && o.installed_2m < o.installed, "{o:?}");
    assert!(o.efaults > 0 && o.mmio_exits > 0, "{o:?}");
    assert!(o.stale_slot_retries > 0 && o.host_fault_ins > 0, "{o:?}");
}

#[test]
fn interleave_random_event_scenarios_are_deterministic_per_seed() {
    let s = random_event_scenario(11, 2, 3, 6);
    assert_eq!(run_random(&s, 5, 4).unwrap(), run_random(&s, 5, 4).unwrap());
    assert_eq!(random_event_scenario(11, 2, 3, 6).actors, s.actors);
}

#[test]
fn event_kind_names_round_trip() {
    let names: Vec<String> = EventKind::ALL.iter().map(|k| k.to_string()).collect();
    assert_eq!(
        names,
        [
            "discard4k",
            "discard2m",
            "split",
            "collapse",
            "wrprotect",
            "dirtylog",
            "slot",
            "pageout"
        ]
    );
    for k in EventKind::ALL {
        assert_eq!(k.to_string().parse::<EventKind>(), Ok(k));
    }
    let err = "discard".parse::<EventKind>().unwrap_err();
    assert!(err.to_string().contains("pageout"), "{err}");
}

#[test]
fn primary_mprotect_refuses_host_write_and_restores() {
    let mut p = Primary::new(1, None, ThpPolicy::always());
    let mm = p.new_mm(1, common::HVA, true);
    p.fault(mm, 0, true).unwrap();
    assert!(p.mprotect(mm, 0, false).unwrap());
    assert!(!p.mm(mm).unwrap().lookup(5).unwrap().3);
    assert_eq!(
        p.fault(mm, 5, true),
        Err(MmError::WriteProtected { page: 5 })
    );
    assert!(p.fault(mm, 5, false).is_ok(), "reads still work");
    assert!(p.mprotect(mm, 0, true).unwrap());
    assert!(
        !p.mprotect(mm, 0, true).unwrap(),
        "no change the second time"
    );
    assert!(p.mm(mm).unwrap().lookup(5).unwrap().3);
    assert!(p.mprotect(mm, 1, false).is_err(), "frame out of range");
    common::ok(&p);
}

#[test]
fn primary_pageout_unmaps_unless_pinned() {
    let mut p = Primary::new(2, None, ThpPolicy::always());
    let mm = p.new_mm(2, common::HVA, true);
    p.fault(mm, 0, true).unwrap();
    p.fault(mm, 512, true).unwrap();
    let pinned = p.pin(mm, 600).unwrap();
    assert_eq!(p.pageout(mm, 0).unwrap(), 512);
    assert!(p.mm(mm).unwrap().lookup(3).is_none());
    assert_eq!(p.pageout(mm, 1).unwrap(), 0, "pinned folio stays");
    assert!(p.mm(mm).unwrap().lookup(600).is_some());
    common::ok(&p);
    p.unpin(pinned).unwrap();
    assert_eq!(p.pageout(mm, 1).unwrap(), 512);
    assert_eq!(p.huge_pool().used_count(), 0);
    common::ok(&p);
}
