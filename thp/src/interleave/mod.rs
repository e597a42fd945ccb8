//! Deterministic fault-injection scheduler: runs KVM's fault path as explicit
//! steps (read `mmu_invalidate_seq`, translate through the primary with a GUP
//! reference, take `mmu_lock`, retry check, install + unlock + release)
//! against host operations wrapped in mmu-notifier invalidations
//! (range start/zap, primary change, range end), at every interleaving point:
//! exhaustively for small scenarios, randomly (seeded [`SplitMix64`]) for
//! long ones. Host operations include pool-empty, pinned-folio and
//! allocation-failure injection. After every step and every schedule the
//! invariant checker must pass: no secondary entry maps a stale pfn, no 2M
//! entry while dirty logging is on or where `lpage_info` forbids it, no
//! writable entry over a write-protected host page, no entry outside a
//! memslot.
//!
//! Every event kind of `vmm stress` ([`EventKind`], `--ops-mix` names) runs
//! as an [`Actor::Event`] against [`Actor::VcpuFault`]s, which model the
//! whole KVM fault: memslot + generation + `mmu_invalidate_seq` read, GUP
//! (faulting the page in on the host, breaking COW for a write, `-EFAULT`
//! for a write to a write-protected VMA), `mmu_lock`, retry check
//! (invalidation and stale memslot generation), install with the write
//! permission GUP gave.
//!
//! `mmu_lock` is modelled: range start/end and memslot updates (which zap
//! under the lock) cannot run while a fault holds it between "take lock"
//! and "install". Each safety mechanism can be switched off in a
//! [`Scenario`] to show the checker catches the race it prevents.

mod event;
mod fault;
mod prng;
mod random;
mod world;

pub use event::{Event, EventKind, KvmOp, UnknownEventKind};
pub use prng::SplitMix64;
pub use random::{random_event_scenario, random_scenario};
pub use world::{Outcomes, BASE_HVA};

use crate::invariants::InvariantViolation;
use crate::policy::ThpPolicy;
use crate::units::Level;
use world::World;

/// A host-side (primary) operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostOp {
    /// `MADV_DONTNEED` of pages `[first, first+npages)` (splits a PMD partially covered).
    Unmap {
        /// First page.
        first: u64,
        /// Pages.
        npages: u64,
    },
    /// Read fault on the host (populates a none page; no invalidation).
    ReadFault {
        /// Page.
        page: u64,
    },
    /// Write fault on the host (populate, or COW a shared page).
    WriteFault {
        /// Page.
        page: u64,
    },
    /// khugepaged collapse of a frame.
    Collapse {
        /// Frame.
        frame: usize,
    },
    /// Split-by-copy of a frame's huge pages into small ones.
    Migrate {
        /// Frame.
        frame: usize,
    },
    /// `split_folio` of the large folio at a frame.
    SplitFolio {
        /// Frame.
        frame: usize,
    },
    /// Deferred-split shrinker.
    Shrink,
    /// Fork (child not mirrored; parent loses write permission).
    Fork,
    /// Pin the folio at a page.
    Pin {
        /// Page.
        page: u64,
    },
    /// Drop the most recent pin.
    Unpin,
    /// Next `n` huge allocations fail (pool empty).
    InjectHugeFailures {
        /// Count.
        n: u32,
    },
    /// Next `n` small allocations fail.
    InjectSmallFailures {
        /// Count.
        n: u32,
    },
    /// `mprotect` of a frame: read-only (`writable == false`) or back to
    /// read-write.
    Mprotect {
        /// Frame.
        frame: usize,
        /// New write permission.
        writable: bool,
    },
    /// `MADV_PAGEOUT` of a frame.
    Pageout {
        /// Frame.
        frame: usize,
    },
}

impl HostOp {
    /// Whether the operation changes existing mappings and so runs inside an
    /// mmu-notifier invalidation (3 steps); otherwise it is one step.
    pub fn invalidates(&self) -> bool {
        matches!(
            self,
            HostOp::Unmap { .. }
                | HostOp::WriteFault { .. }
                | HostOp::Collapse { .. }
                | HostOp::Migrate { .. }
                | HostOp::SplitFolio { .. }
                | HostOp::Shrink
                | HostOp::Fork
                | HostOp::Mprotect { .. }
                | HostOp::Pageout { .. }
        )
    }
}

/// A concurrent actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A vCPU fault on `gfn` (5 steps).
    KvmFault {
        /// Faulting gfn.
        gfn: u64,
        /// The fault's max level (guest page size on shadow paging).
        guest_max_level: Level,
    },
    /// A host operation (3 steps if it invalidates, else 1).
    Host(HostOp),
    /// A whole vCPU fault (5 steps): read the memslot, its generation and
    /// `mmu_invalidate_seq` (no memslot: MMIO exit, nothing installed); GUP
    /// (faults the page in on the host, breaks COW for a write; a write to a
    /// write-protected VMA ends with `-EFAULT`); take `mmu_lock`; retry
    /// check (invalidation or stale memslot generation); install with the
    /// write permission GUP gave, unlock, release the page.
    VcpuFault {
        /// Faulting gfn.
        gfn: u64,
        /// The fault's max level (guest page size on shadow paging).
        guest_max_level: Level,
        /// A write access.
        write: bool,
    },
    /// A `vmm stress` event: its phases in order (3 steps per invalidation,
    /// 1 per memslot operation).
    Event(Event),
}

/// A scenario: initial state plus concurrent actors.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Frames of guest RAM (one memslot at gfn 0 over [`BASE_HVA`]).
    pub frames: usize,
    /// Huge pool capacity.
    pub huge_capacity: usize,
    /// Small pool limit.
    pub small_limit: Option<usize>,
    /// THP policy.
    pub policy: ThpPolicy,
    /// Host operations applied before any actor runs (no secondary yet).
    pub setup: Vec<HostOp>,
    /// Secondary faults completed before any actor runs.
    pub prefault_secondary: Vec<(u64, Level)>,
    /// The concurrent actors.
    pub actors: Vec<Actor>,
    /// Model `mmu_lock` (disable only to show the checker catches the race).
    pub model_mmu_lock: bool,
    /// Faults retry when an invalidation covers them or
    /// `mmu_invalidate_seq` moved (disable only to show the checker catches
    /// stale pfns and stale write permission).
    pub model_retry_check: bool,
    /// Faults retry when the memslot generation moved (disable only to show
    /// the checker catches a 2M entry under dirty logging or an entry of a
    /// deleted memslot).
    pub model_generation_check: bool,
    /// GUP refuses a write to a write-protected VMA (`-EFAULT`) (disable
    /// only to show the checker catches a writable entry over a read-only
    /// page).
    pub model_write_check: bool,
    /// How many times an [`Actor::VcpuFault`] that had to retry faults
    /// again from the start (0: a retry ends it, which keeps the schedule
    /// count of exhaustive runs independent of outcomes).
    pub fault_retries: u8,
}

impl Scenario {
    /// An empty scenario of `frames` frames with a pool of `huge_capacity`.
    pub fn new(frames: usize, huge_capacity: usize) -> Self {
        Scenario {
            frames,
            huge_capacity,
            small_limit: None,
            policy: ThpPolicy::always(),
            setup: Vec::new(),
            prefault_secondary: Vec::new(),
            actors: Vec::new(),
            model_mmu_lock: true,
            model_retry_check: true,
            model_generation_check: true,
            model_write_check: true,
            fault_retries: 0,
        }
    }
}

/// A schedule that broke an invariant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schedule {schedule:?} (actor per step) broke an invariant: {violation}")]
pub struct InterleaveFailure {
    /// Actor index per executed step.
    pub schedule: Vec<usize>,
    /// What broke.
    pub violation: InvariantViolation,
}

/// Result of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Complete schedules executed.
    pub schedules: u64,
    /// Steps executed in total.
    pub steps: u64,
    /// Outcomes summed over schedules.
    pub outcomes: Outcomes,
}

impl Report {
    fn add(&mut self, o: &Outcomes) {
        self.schedules += 1;
        self.outcomes.installed += o.installed;
        self.outcomes.retries += o.retries;
        self.outcomes.no_host_page += o.no_host_page;
        self.outcomes.host_op_failures += o.host_op_failures;
        self.outcomes.nested_invalidations += o.nested_invalidations;
        self.outcomes.mmio_exits += o.mmio_exits;
        self.outcomes.efaults += o.efaults;
        self.outcomes.host_fault_ins += o.host_fault_ins;
        self.outcomes.stale_slot_retries += o.stale_slot_retries;
        self.outcomes.installed_2m += o.installed_2m;
    }

    /// Adds another report (schedules, steps, outcomes).
    pub fn merge(&mut self, other: &Report) {
        let schedules = self.schedules;
        self.add(&other.outcomes);
        self.schedules = schedules + other.schedules;
        self.steps += other.steps;
    }
}

fn setup_failure(e: String) -> InterleaveFailure {
    InterleaveFailure {
        schedule: Vec::new(),
        violation: InvariantViolation::new(format!("scenario setup failed: {e}")),
    }
}

/// Runs every schedule of the scenario (depth-first, cloning the world at
/// each branch), checking invariants after every step.
pub fn run_exhaustive(s: &Scenario) -> Result<Report, InterleaveFailure> {
    let w = World::new(s).map_err(setup_failure)?;
    w.check().map_err(|violation| InterleaveFailure {
        schedule: Vec::new(),
        violation,
    })?;
    let mut report = Report::default();
    let mut path = Vec::new();
    dfs(w, &mut path, &mut report)?;
    Ok(report)
}

fn dfs(w: World, path: &mut Vec<usize>, report: &mut Report) -> Result<(), InterleaveFailure> {
    let enabled = w.enabled_actors();
    if enabled.is_empty() {
        return finish(&w, path, report);
    }
    for &i in &enabled {
        let mut next = w.clone();
        step_checked(&mut next, i, path, report)?;
        dfs(next, path, report)?;
        path.pop();
    }
    Ok(())
}

/// Step actor `i` of `w`, extend the schedule `path`, and check the invariants;
/// a violation carries the schedule that led to it.
fn step_checked(
    w: &mut World,
    i: usize,
    path: &mut Vec<usize>,
    report: &mut Report,
) -> Result<(), InterleaveFailure> {
    w.step(i);
    report.steps += 1;
    path.push(i);
    w.check().map_err(|violation| InterleaveFailure {
        schedule: path.clone(),
        violation,
    })
}

/// The end of a schedule (no actor enabled): every actor must have finished,
/// else the schedule deadlocked; the outcomes are counted.
fn finish(w: &World, path: &[usize], report: &mut Report) -> Result<(), InterleaveFailure> {
    if !w.all_done() {
        return Err(InterleaveFailure {
            schedule: path.to_vec(),
            violation: InvariantViolation::new("deadlock: actors left, none enabled"),
        });
    }
    report.add(&w.outcomes);
    Ok(())
}

/// Runs `schedules` random schedules of the scenario, the schedule with
/// index `k` drawn from `SplitMix64::new(seed ^ k)`.
pub fn run_random(s: &Scenario, seed: u64, schedules: u64) -> Result<Report, InterleaveFailure> {
    let base = World::new(s).map_err(setup_failure)?;
    let mut report = Report::default();
    for k in 0..schedules {
        let mut rng = SplitMix64::new(seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut w = base.clone();
        let mut path = Vec::new();
        loop {
            let enabled = w.enabled_actors();
            if enabled.is_empty() {
                break;
            }
            let i = enabled[rng.below(enabled.len() as u64) as usize];
            step_checked(&mut w, i, &mut path, &mut report)?;
        }
        finish(&w, &path, &mut report)?;
    }
    Ok(report)
}
