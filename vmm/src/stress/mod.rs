//! `vmm stress`: mmu-notifier fault injection. A host thread fires
//! primary-MMU events (discards, split/collapse, write protection, memslot
//! changes, page-out) at a running stress guest, from a seeded PRNG, and the
//! run proves nothing was lost or stale:
//!
//! * the guest ([`crate::testguest::guests::stress`]) checks and restamps
//!   every page of its slice, pass after pass, at CPL3; discarded pages are
//!   announced through a shared log written with the vCPUs paused, in the
//!   same pause as the discard, so the guest expects zeros exactly there;
//! * write-protected frames make `KVM_RUN` fail with `EFAULT`: the vCPU
//!   thread waits until the frame is writable again and re-runs, so the
//!   guest sees nothing ([`gate`]);
//! * at quiescent points (every vCPU completed a whole pass since the last
//!   event) KVM's `pages_4k` / `pages_2m` are compared with the THP mirror's
//!   prediction, once in a while with dirty logging on (no 2M then).
//!
//! Which kinds apply: all eight on `hugetlb` and `thp`; on `4k` there are no
//! huge frames, so no `split` / `collapse`. `pageout` on `hugetlb` targets
//! split frames (small shmem pages): hugetlb mappings refuse `MADV_PAGEOUT`.
//! With no swap configured, page-out unmaps shmem pages (KVM sees the
//! invalidation) but they stay resident; the report says how many left.
//!
//! On a violation the run exits with 4, prints the seed, the last events and
//! the first bad gfn, and writes a replay file ([`replay`]).

pub mod args;
pub mod events;
pub mod gate;
pub mod inject;
pub mod priority;
pub mod progress;
pub mod replay;
pub mod report;
pub mod setup;
pub mod shared;
pub mod slot;
pub mod thread_cpu;
pub mod vcpu;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mem::{Backing, HPAGE_SIZE};

use crate::builder::RunError;
use crate::exit_code;
use crate::outcome::Outcome;
use crate::split_reserve::{ReserveSizes, SplitReserve};
use crate::testguest::guests::stress::SharedArea;

pub use args::{InjectBug, StressConfig, EXIT_CODES};
use events::{Event, EventKind, Generator, OpsMix};
use inject::{Effect, Extra, Injector};
use progress::Progress;
use replay::{ReplayError, ReplayFile, REPLAY_VERSION};
pub use report::StressReport;
use report::Tally;
use shared::SharedLog;
use slot::Slots;
use vcpu::StressVcpuShared;

/// Events printed with a violation.
const LAST_EVENTS: usize = 20;
/// How long the guest gets to finish its pass after the stop request.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the vCPU threads get to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Every how many quiescent points one runs with dirty logging on.
const DIRTY_QUIESCE_EVERY: u64 = 3;

/// Errors before the stress run starts.
#[derive(Debug, thiserror::Error)]
pub enum StressError {
    /// Setting up the machine.
    #[error(transparent)]
    Setup(#[from] RunError),
    /// The replay file.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// Bad options.
    #[error("{0}")]
    Usage(String),
    /// An output path that cannot be written.
    #[error(transparent)]
    Output(#[from] crate::output_path::OutputPathError),
    /// Spawning a vCPU thread.
    #[error("spawning a vCPU thread: {0}")]
    Thread(std::io::Error),
}

impl StressError {
    /// Process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            StressError::Setup(e) => e.exit_code(),
            StressError::Replay(_) | StressError::Usage(_) | StressError::Output(_) => {
                exit_code::BAD_INPUT
            }
            StressError::Thread(_) => exit_code::INTERNAL,
        }
    }
}

/// The parameters in force (from the CLI or the replay file).
#[derive(Debug, Clone)]
struct Params {
    memory: u64,
    vcpus: u8,
    backing: Backing,
    seed: u64,
    mix: OpsMix,
    bug: Option<InjectBug>,
}

enum Source {
    Live {
        gen: Generator,
        deadline: Option<Instant>,
        ops: Option<u64>,
    },
    Replay {
        events: Vec<Event>,
        next: usize,
    },
}

fn params(a: &StressConfig) -> Result<(Params, Option<ReplayFile>), StressError> {
    if let Some(s) = a.seconds {
        if !(s > 0.0 && s.is_finite()) {
            return Err(StressError::Usage(format!(
                "--seconds {s} must be a positive number"
            )));
        }
    }
    if !(a.quiesce_every > 0.0 && a.quiesce_every.is_finite()) {
        return Err(StressError::Usage(format!(
            "--quiesce-every {} must be a positive number of seconds",
            a.quiesce_every
        )));
    }
    if let Some(path) = &a.replay {
        let f = ReplayFile::load(path)?;
        let backing: Backing = f.backing.parse().map_err(|e| ReplayError::Invalid {
            path: path.clone(),
            why: format!("{e}"),
        })?;
        let p = Params {
            memory: f.memory,
            vcpus: f.vcpus,
            backing,
            seed: f.seed,
            mix: f.ops_mix.clone(),
            bug: f.inject_bug,
        };
        return Ok((p, Some(f)));
    }
    let mix = a
        .ops_mix
        .for_backing(a.backing)
        .map_err(StressError::Usage)?;
    Ok((
        Params {
            memory: a.memory,
            vcpus: a.vcpus,
            backing: a.backing,
            seed: a.seed,
            mix,
            bug: a.inject_bug,
        },
        None,
    ))
}

/// Run `vmm stress`: check the options, build the VM, start the vCPUs, fire
/// events until the end, stop the guest, report.
pub fn run(a: &StressConfig) -> Result<StressReport, StressError> {
    run_with_progress(a, &mut |_| {})
}

/// [`run`], telling `progress` how the run goes every [`progress::INTERVAL`].
pub fn run_with_progress(
    a: &StressConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<StressReport, StressError> {
    let (p, replay) = params(a)?;
    if p.backing == Backing::Hugetlb1g {
        // Its events and quiescent points are per 2M frame; a 1G frame's
        // operations are not among them yet.
        return Err(StressError::Usage(
            "vmm stress does not run on --backing hugetlb-1g yet: use hugetlb, thp or 4k".into(),
        ));
    }
    crate::output_path::check_all([
        ("--json", a.json.as_deref()),
        ("--replay-out", a.replay_out.as_deref()),
    ])?;
    let setup::Built {
        mut vm,
        machine: m,
        image,
    } = setup::build(&a.kvm_dev, p.memory, p.vcpus, p.backing)?;
    if p.bug == Some(InjectBug::NoWriteHold) {
        m.ram().inject_split_without_write_hold();
    }
    let work_frames = image.reserved.end / HPAGE_SIZE..p.memory / HPAGE_SIZE;
    // Before any vCPU runs: a replayed event acts only where live ones do.
    if let (Some(f), Some(path)) = (&replay, &a.replay) {
        f.check_frames(path, &work_frames)?;
    }
    let area = SharedArea::new(&image.layout).map_err(StressError::Usage)?;
    let log = SharedLog::new(area, image.slices.clone());
    let vshared = Arc::new(StressVcpuShared::default());
    let reserve = SplitReserve::start_for(
        ReserveSizes {
            split_blocks: a.split_reserve as usize,
            huge_pages: a.collapse_reserve as usize,
        },
        p.backing,
        &m,
    )
    .map_err(StressError::Thread)?;
    let (m2, s2) = (m.clone(), vshared.clone());
    let body = move |i, fd| vcpu::run_vcpu(i, fd, m2.clone(), s2.clone());
    let handles = crate::builder::spawn_vcpus(&mut vm, &m.control, STOP_TIMEOUT, body)
        .map_err(StressError::Thread)?;

    let inj = Injector {
        m: &m,
        vm: &vm.fd,
        slot: Slots::new(start_slots(&m)),
        log: log.clone(),
        vshared: &vshared,
        backing: p.backing,
        bug: p.bug,
        work_frames,
        reserved_end: image.reserved.end,
        clean_small: std::sync::Mutex::new(std::collections::BTreeSet::new()),
    };
    inj.note_start();
    let source = event_source(a, &p, replay.map(|f| f.events));
    // After the vCPU threads started: they keep their priority.
    let raised = priority::raise_injector();
    let started = Instant::now();
    let cpu_start = thread_cpu::user_system();
    let mut prog = Progress::new(a.ops, progress);
    let every = Duration::from_secs_f64(a.quiesce_every);
    let mut lp = fire_events(&inj, source, every, &mut prog);
    let seconds = started.elapsed().as_secs_f64();
    lp.cpu = cpu_start
        .zip(thread_cpu::user_system())
        .map(|((u0, s0), (u1, s1))| (u1.saturating_sub(u0), s1.saturating_sub(s0)));
    drop(raised);

    // Stop the guest at the end of its pass, then the vCPU threads.
    if let Err(e) = log.request_stop(&m.mem) {
        lp.internal.get_or_insert(e.to_string());
    }
    let outcome = m.wait_outcome(FINISH_TIMEOUT);
    if let Some(r) = reserve {
        r.shutdown();
    }
    stop_vcpus(&m, handles);
    let mut end = judge(&mut lp, &log, &m, &vshared, outcome);
    if end.exit == exit_code::TEST_FAILURE {
        end.replay_file = write_replay(a, &p, &lp.events);
    }
    end.notes = notes(&p, &lp, &end, m.stats.is_none());
    let rep = report(a, &p, lp, end, seconds, &vshared, &m.split_windows);
    drop(inj);
    drop(vm);
    Ok(rep)
}

/// The memslots at the start (populating guest RAM is no remap of a
/// mapping KVM had: the changes so far are dropped).
fn start_slots(m: &crate::machine::Machine) -> Vec<guest_mem::RamSlot> {
    let mut ram = m.ram();
    ram.take_changed_frames();
    ram.take_changed_pages();
    ram.memslots().to_vec()
}

/// Where events come from: the replay file's, or the seeded generator's
/// until `--seconds` (10 by default) or `--ops`.
fn event_source(a: &StressConfig, p: &Params, replay: Option<Vec<Event>>) -> Source {
    if let Some(events) = replay {
        return Source::Replay { events, next: 0 };
    }
    let started = Instant::now();
    let secs = match (a.seconds, a.ops) {
        (Some(s), _) => Some(s),
        (None, None) => Some(10.0),
        (None, Some(_)) => None,
    };
    Source::Live {
        gen: Generator::new(p.seed, p.mix.clone()),
        // Bounded at parse time; a deadline past the clock's range is none.
        deadline: secs.and_then(|s| started.checked_add(Duration::from_secs_f64(s))),
        ops: a.ops,
    }
}

/// Fire events from `source` (a quiescent point every `every`, and one to
/// close every live run) until it ends or a step says stop.
fn fire_events(
    inj: &Injector<'_>,
    mut source: Source,
    every: Duration,
    prog: &mut Progress<'_>,
) -> Loop {
    let mut lp = Loop::default();
    let mut next_q = Instant::now()
        .checked_add(every)
        .unwrap_or_else(Instant::now);
    let mut q_count = 0u64;
    loop {
        let ev = match &mut source {
            Source::Replay { events, next } => match events.get(*next) {
                Some(e) => {
                    *next += 1;
                    e.clone()
                }
                None => {
                    // Like the closing quiescent point of a live run (not
                    // recorded: the replay fires the file's events only):
                    // the guest checks every page after the last event.
                    if let Err(e) = inj.wait_whole_pass() {
                        lp.internal = Some(e.to_string());
                    }
                    break;
                }
            },
            Source::Live { gen, deadline, ops } => {
                let over = deadline.is_some_and(|d| Instant::now() >= d)
                    || ops.is_some_and(|n| lp.fired >= n);
                if over {
                    // A last quiescent point closes every live run.
                    q_count += 1;
                    let ev = quiesce_event(lp.seq, q_count);
                    lp.step(inj, ev);
                    break;
                }
                if Instant::now() >= next_q {
                    q_count += 1;
                    quiesce_event(lp.seq, q_count)
                } else {
                    match inj.resolve(gen.draw(), lp.seq) {
                        Ok(e) => e,
                        Err(e) => {
                            lp.internal = Some(e.to_string());
                            break;
                        }
                    }
                }
            }
        };
        let was_q = matches!(ev.kind, EventKind::Quiesce | EventKind::QuiesceDirty);
        if !lp.step(inj, ev) {
            break;
        }
        if was_q {
            next_q = Instant::now().checked_add(every).unwrap_or(next_q);
        }
        prog.tick(lp.fired, lp.points.len(), lp.violations.len());
    }
    lp
}

/// Stop the vCPU threads and join them.
fn stop_vcpus(m: &crate::machine::Machine, handles: Vec<std::thread::JoinHandle<()>>) {
    if !m.control.stop(STOP_TIMEOUT) {
        log::error!("vCPU threads did not stop within {STOP_TIMEOUT:?}");
    } else {
        for h in handles {
            if h.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }
}

/// How the run ended, judged.
struct End {
    violations: Vec<String>,
    first_bad_gfn: Option<u64>,
    outcome_text: String,
    counters: Vec<shared::GuestCounters>,
    exit: i32,
    /// The replay file written, if any.
    replay_file: Option<String>,
    notes: Vec<String>,
}

/// Gather the violations (the loop's, the guest's, the vCPUs'), read how
/// the guest ended and choose the exit code.
fn judge(
    lp: &mut Loop,
    log: &SharedLog,
    m: &crate::machine::Machine,
    vshared: &StressVcpuShared,
    outcome: Option<Outcome>,
) -> End {
    let mut violations = lp.violations.clone();
    let guest = log.violations(&m.mem).unwrap_or_default();
    let first_bad_gfn = guest.first().map(|v| v.gfn);
    violations.extend(guest.iter().map(|v| v.describe()));
    violations.extend(vshared.errors());
    let outcome_text = match &outcome {
        Some(o) => o.describe(),
        None => "the guest did not finish its pass after the stop request".into(),
    };
    match &outcome {
        Some(Outcome::TestExit(_)) | Some(Outcome::TestFault { .. }) => {}
        Some(Outcome::GuestPanic(w)) => violations.push(format!("guest-visible error: {w}")),
        Some(Outcome::Internal(w)) => {
            lp.internal.get_or_insert(w.clone());
        }
        Some(o) => violations.push(format!("unexpected end of the guest: {}", o.describe())),
        None => {
            lp.internal.get_or_insert(outcome_text.clone());
        }
    }
    if let Some(Outcome::TestExit(s)) = outcome {
        if s != 0 && violations.is_empty() {
            violations.push(format!("the guest reported failure (status {s:#x})"));
        }
    }
    let exit = if !violations.is_empty() {
        exit_code::TEST_FAILURE
    } else if lp.internal.is_some() {
        exit_code::INTERNAL
    } else {
        exit_code::OK
    };
    End {
        violations,
        first_bad_gfn,
        outcome_text,
        counters: log.all_counters(&m.mem).unwrap_or_default(),
        exit,
        replay_file: None,
        notes: Vec::new(),
    }
}

/// Write the replay file of a failed run; its path, if written.
fn write_replay(a: &StressConfig, p: &Params, events: &[Event]) -> Option<String> {
    let path = a
        .replay_out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("stress-replay-seed{}.json", p.seed)));
    let f = ReplayFile {
        version: REPLAY_VERSION,
        seed: p.seed,
        backing: p.backing.to_string(),
        memory: p.memory,
        vcpus: p.vcpus,
        ops_mix: p.mix.clone(),
        inject_bug: p.bug,
        events: events.to_vec(),
    };
    match f.save(&path) {
        Ok(()) => Some(path.display().to_string()),
        Err(e) => {
            log::error!("{e}");
            None
        }
    }
}

/// The report's notes: what page-out does, what does not apply, and for a
/// failed run the seed, the last events and the first bad gfn.
fn notes(p: &Params, lp: &Loop, end: &End, no_stats: bool) -> Vec<String> {
    let mut notes = vec![format!(
        "pageout: MADV_PAGEOUT unmaps shmem pages (KVM sees the invalidation); with no swap they stay \
         resident (the resident counts say how many left); {}",
        if p.backing == Backing::Hugetlb {
            "on hugetlb it targets split frames (small shmem pages): hugetlb mappings refuse it"
        } else {
            "it targets any frame"
        }
    )];
    if p.backing == Backing::Small4k {
        notes.push("split and collapse do not apply to the 4k backing (no huge frames)".into());
    }
    if no_stats {
        notes.push("KVM statistics unavailable: quiescent points compared nothing".into());
    }
    let retaken: Vec<&inject::QuiescePoint> = lp.points.iter().filter(|q| q.retakes > 0).collect();
    if !retaken.is_empty() {
        notes.push(format!(
            "{} quiescent points taken again ({} times in all): KVM disagreed with the mirror while \
             the host kernel migrated pages (/proc/vmstat pgmigrate_success), an invalidation no \
             event caused; the point counts as its last take",
            retaken.len(),
            retaken.iter().map(|q| u64::from(q.retakes)).sum::<u64>()
        ));
    }
    let explained = lp
        .points
        .iter()
        .filter(|q| q.explained_by_host_moves)
        .count();
    if explained > 0 {
        notes.push(format!(
            "{explained} quiescent points found KVM short of the mirror after every retake while \
             the host kept moving this guest's pages (pagemap frame numbers changed): short by no \
             more than those moves explain (each takes at most one mapping away), so not \
             violations; KVM above the mirror, or short by more, is one"
        ));
    }
    if let Some(i) = &lp.internal {
        notes.push(format!("internal error: {i}"));
    }
    if end.exit == exit_code::TEST_FAILURE {
        let n = lp.events.len();
        let last: Vec<String> = lp.events[n.saturating_sub(LAST_EVENTS)..]
            .iter()
            .map(|e| e.to_string())
            .collect();
        notes.push(format!(
            "seed {}; last {} events:\n    {}",
            p.seed,
            last.len(),
            last.join("\n    ")
        ));
        if let Some(g) = end.first_bad_gfn {
            notes.push(format!("first bad gfn {g:#x} (gpa {:#x})", g << 12));
        }
    }
    notes
}

/// The report of the run.
fn report(
    a: &StressConfig,
    p: &Params,
    lp: Loop,
    end: End,
    seconds: f64,
    vshared: &StressVcpuShared,
    split_windows: &guest_mem::SplitWindows,
) -> StressReport {
    let kinds = lp.tally.finish();
    let (events, event_cpu_us) = kinds
        .iter()
        .filter(|(k, _)| !k.starts_with("quiesce"))
        .fold((0u64, 0u64), |(n, c), (_, v)| (n + v.fired, c + v.cpu_us));
    let cpu_per_event_us = if events > 0 {
        event_cpu_us as f64 / events as f64
    } else {
        0.0
    };
    let (collapses, splits): (Vec<_>, Vec<_>) =
        split_windows.take().into_iter().partition(|w| w.collapse);
    let held_us = |ws: &[guest_mem::SplitWindow]| -> Vec<f64> {
        ws.iter()
            .map(|w| w.write_hold.as_secs_f64() * 1e6)
            .collect()
    };
    let (held, collapse_held) = (held_us(&splits), held_us(&collapses));
    StressReport {
        seed: p.seed,
        backing: p.backing.to_string(),
        memory: p.memory,
        vcpus: p.vcpus,
        replay: a.replay.is_some(),
        inject_bug: p.bug.map(|b| format!("{b:?}")),
        applicable_kinds: EventKind::RANDOM
            .iter()
            .filter(|k| k.applies_to(p.backing))
            .map(|k| k.as_str().to_string())
            .collect(),
        seconds,
        events,
        events_per_second: if seconds > 0.0 {
            events as f64 / seconds
        } else {
            0.0
        },
        injector_cpu_per_event_us: cpu_per_event_us,
        injector_ceiling_events_per_second: if cpu_per_event_us > 0.0 {
            1e6 / cpu_per_event_us
        } else {
            0.0
        },
        injector_user_ms: lp.cpu.map(|(u, _)| u.as_secs_f64() * 1e3),
        injector_system_ms: lp.cpu.map(|(_, k)| k.as_secs_f64() * 1e3),
        kinds,
        pages_verified: end.counters.iter().map(|c| c.pages).sum(),
        passes: end.counters.iter().map(|c| c.passes).sum(),
        guest_retries: end.counters.iter().map(|c| c.retries).sum(),
        per_vcpu: end.counters,
        wrprotect_faults: vshared.gate.faults(),
        unpaused_splits: held.len() as u64,
        splits_onto_reserve: splits.iter().filter(|w| w.prepared).count() as u64,
        split_write_hold_median_us: crate::unmap_stats::median(&held),
        unpaused_collapses: collapse_held.len() as u64,
        collapses_onto_reserve: collapses.iter().filter(|w| w.prepared).count() as u64,
        collapse_write_hold_median_us: crate::unmap_stats::median(&collapse_held),
        quiescent_points: lp.points,
        violations: end.violations,
        first_bad_gfn: end.first_bad_gfn,
        replay_file: end.replay_file,
        outcome: end.outcome_text,
        exit_code: end.exit,
        notes: end.notes,
    }
}

fn quiesce_event(seq: u64, n: u64) -> Event {
    Event {
        seq,
        kind: if n % DIRTY_QUIESCE_EVERY == 2 {
            EventKind::QuiesceDirty
        } else {
            EventKind::Quiesce
        },
        frame: None,
        page: 0,
    }
}

/// State of the injection loop.
#[derive(Default)]
struct Loop {
    seq: u64,
    fired: u64,
    tally: Tally,
    events: Vec<Event>,
    points: Vec<inject::QuiescePoint>,
    violations: Vec<String>,
    internal: Option<String>,
    /// The injector's user and system CPU time over the whole loop.
    cpu: Option<(Duration, Duration)>,
}

impl Loop {
    /// Fire one event; `false` when the run must end.
    fn step(&mut self, inj: &Injector<'_>, mut ev: Event) -> bool {
        ev.seq = self.seq;
        self.seq += 1;
        let t = Instant::now();
        let cpu = thread_cpu::now();
        let r = match ev.kind {
            EventKind::Quiesce | EventKind::QuiesceDirty => inj
                .quiesce_point(ev.seq, ev.kind == EventKind::QuiesceDirty)
                .map(|q| {
                    if !q.agrees && !q.explained_by_host_moves {
                        self.violations
                            .push(format!("{q}: KVM disagrees with the mirror"));
                    }
                    self.points.push(q);
                    (Effect::Done, Extra::default())
                }),
            _ => {
                self.fired += 1;
                inj.fire(&ev)
            }
        };
        let took = t.elapsed();
        let on_cpu = thread_cpu::since(cpu);
        log::debug!("{ev}: {r:?} in {took:?} ({on_cpu:?} on the CPU)");
        self.events.push(ev.clone());
        match r {
            Ok((e, x)) => self.tally.add(ev.kind, &e, &x, took, on_cpu),
            Err(e) => {
                self.internal = Some(format!("event {ev}: {e}"));
                return false;
            }
        }
        if !self.violations.is_empty() || inj.m.outcome().is_some() {
            return false;
        }
        match inj.log.violations(&inj.m.mem) {
            Ok(v) => v.is_empty(),
            Err(e) => {
                self.internal = Some(e.to_string());
                false
            }
        }
    }
}

/// `vmm stress` for the binary: run, print the report, write `--json`;
/// returns the process exit code.
pub fn run_cli(a: &StressConfig) -> i32 {
    match run_with_progress(a, &mut |l| eprintln!("vmm stress: {l}")) {
        Ok(rep) => {
            crate::stdout::print(&rep.text());
            if let Some(f) = &rep.replay_file {
                eprintln!(
                    "vmm stress: VIOLATION (seed {}); replay file written to {f}",
                    rep.seed
                );
            }
            if let Some(path) = &a.json {
                let written = serde_json::to_string_pretty(&rep)
                    .map_err(|e| e.to_string())
                    .and_then(|t| std::fs::write(path, t).map_err(|e| e.to_string()));
                if let Err(e) = written {
                    eprintln!("vmm stress: writing {}: {e}", path.display());
                    // A violation's exit 4 stays 4.
                    if rep.exit_code == exit_code::OK {
                        return exit_code::INTERNAL;
                    }
                }
            }
            rep.exit_code
        }
        Err(e) => {
            eprintln!("vmm stress: error: {e}");
            e.exit_code()
        }
    }
}
