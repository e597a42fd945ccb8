//! The end-of-run report of `vmm stress`: events by kind, rate, latency
//! percentiles, guest pages verified, quiescent points and violations.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::events::{EventKind, HostKind};
use super::inject::{Effect, Extra, QuiescePoint};
use super::shared::GuestCounters;

/// Everything measured for one event kind.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KindReport {
    /// Events fired.
    pub fired: u64,
    /// Events that acted on the machine.
    pub done: u64,
    /// Events with nothing to do.
    pub noop: u64,
    /// Events the host refused.
    pub refused: u64,
    /// First refusal reason.
    pub refused_reason: Option<String>,
    /// Median latency, microseconds.
    pub p50_us: u64,
    /// 99th percentile latency, microseconds.
    pub p99_us: u64,
    /// Largest latency, microseconds.
    pub max_us: u64,
    /// Time spent in events of this kind, microseconds (the sum of their
    /// latencies: where the run's time went).
    pub total_us: u64,
    /// The injector thread's CPU time in events of this kind, microseconds
    /// (`CLOCK_THREAD_CPUTIME_ID`, user and kernel): the part of
    /// `total_us` spent working; the rest it waited.
    pub cpu_us: u64,
    /// Sums of the per-kind measurements.
    pub totals: Extra,
    /// `dirtylog`: events in which KVM's pages_2m fell while logging.
    pub pages_2m_fell: u64,
    /// `slot`: deletes after which KVM mapped nothing.
    pub unmapped_after_delete: u64,
    /// `wrprotect`: episodes in which at least one vCPU write faulted.
    pub faulted: u64,
    /// Events per memslot they acted in (slot id -> count).
    pub per_slot: BTreeMap<u32, u64>,
    #[serde(skip)]
    latencies: Vec<u64>,
}

/// Accumulates per-kind figures.
#[derive(Debug, Default)]
pub struct Tally {
    /// By kind.
    pub kinds: BTreeMap<EventKind, KindReport>,
}

impl Tally {
    /// Record one event: its latency `took`, of which the injector was
    /// `on_cpu` on a CPU.
    pub fn add(
        &mut self,
        kind: EventKind,
        effect: &Effect,
        x: &Extra,
        took: Duration,
        on_cpu: Duration,
    ) {
        let k = self.kinds.entry(kind).or_default();
        k.fired += 1;
        k.cpu_us += on_cpu.as_micros() as u64;
        match effect {
            Effect::Done => k.done += 1,
            Effect::Noop => k.noop += 1,
            Effect::Refused(r) => {
                k.refused += 1;
                k.refused_reason.get_or_insert_with(|| r.clone());
            }
        }
        k.latencies.push(took.as_micros() as u64);
        if let Some(s) = x.slot {
            *k.per_slot.entry(s).or_default() += 1;
        }
        let t = &mut k.totals;
        t.faults += x.faults;
        t.pages_2m_before += x.pages_2m_before;
        t.pages_2m_during += x.pages_2m_during;
        t.dirty_pages += x.dirty_pages;
        t.mapped_after_delete += x.mapped_after_delete;
        t.resident_before += x.resident_before;
        t.resident_after += x.resident_after;
        if kind == EventKind::Host(HostKind::Dirtylog) && x.pages_2m_during < x.pages_2m_before {
            k.pages_2m_fell += 1;
        }
        if kind == EventKind::Host(HostKind::Slot) && x.mapped_after_delete == 0 {
            k.unmapped_after_delete += 1;
        }
        if kind == EventKind::Host(HostKind::Wrprotect) && x.faults > 0 {
            k.faulted += 1;
        }
    }

    /// Finish: compute percentiles.
    pub fn finish(mut self) -> BTreeMap<String, KindReport> {
        for k in self.kinds.values_mut() {
            k.latencies.sort_unstable();
            let pct = |p: f64| -> u64 {
                if k.latencies.is_empty() {
                    return 0;
                }
                let i =
                    ((k.latencies.len() as f64 * p).ceil() as usize).clamp(1, k.latencies.len());
                k.latencies[i - 1]
            };
            k.p50_us = pct(0.50);
            k.p99_us = pct(0.99);
            k.max_us = k.latencies.last().copied().unwrap_or(0);
            k.total_us = k.latencies.iter().sum();
        }
        self.kinds
            .into_iter()
            .map(|(k, v)| (k.as_str().to_string(), v))
            .collect()
    }
}

/// The report of a stress run.
#[derive(Debug, Clone, Serialize)]
pub struct StressReport {
    /// Seed.
    pub seed: u64,
    /// Backing.
    pub backing: String,
    /// Guest RAM bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Whether this was a replay.
    pub replay: bool,
    /// Deliberate bug, if any.
    pub inject_bug: Option<String>,
    /// Event kinds that apply to this backing.
    pub applicable_kinds: Vec<String>,
    /// Seconds of event injection.
    pub seconds: f64,
    /// Events fired (quiescent points excluded).
    pub events: u64,
    /// Events per second.
    pub events_per_second: f64,
    /// The injector's CPU time per event (quiescent points excluded),
    /// microseconds: what bounds the rate on this host.
    pub injector_cpu_per_event_us: f64,
    /// The rate an injector that never waited would reach:
    /// 1 s / `injector_cpu_per_event_us` (0 when not measured).
    pub injector_ceiling_events_per_second: f64,
    /// The injector's user and system CPU time over the run (quiescent
    /// points included; `getrusage(RUSAGE_THREAD)`), milliseconds.
    pub injector_user_ms: Option<f64>,
    /// See `injector_user_ms`.
    pub injector_system_ms: Option<f64>,
    /// By kind (quiescent points included).
    pub kinds: BTreeMap<String, KindReport>,
    /// Guest pages checked (read, compared, restamped) by all vCPUs.
    pub pages_verified: u64,
    /// Passes over their slices by all vCPUs.
    pub passes: u64,
    /// Steps the guest restarted because a discard hit the page it was on.
    pub guest_retries: u64,
    /// Per vCPU.
    pub per_vcpu: Vec<GuestCounters>,
    /// vCPU write faults taken on write-protected frames (all waited out).
    pub wrprotect_faults: u64,
    /// hugetlb splits made without a vCPU pause (only writers of the frame
    /// waited, while it was copied and remapped).
    pub unpaused_splits: u64,
    /// Of those: splits onto small pages allocated ahead (`--split-reserve`).
    pub splits_onto_reserve: u64,
    /// Their median write-hold window, microseconds.
    pub split_write_hold_median_us: Option<f64>,
    /// hugetlb collapses made without a vCPU pause (every page of the
    /// frame present: only writers of the frame waited).
    pub unpaused_collapses: u64,
    /// Of those: collapses onto a huge page allocated ahead
    /// (`--collapse-reserve`).
    pub collapses_onto_reserve: u64,
    /// The unpaused collapses' median write-hold window, microseconds.
    pub collapse_write_hold_median_us: Option<f64>,
    /// Quiescent points.
    pub quiescent_points: Vec<QuiescePoint>,
    /// Violations (stale reads, lost writes, guest-visible errors, KVM
    /// disagreeing with the mirror), in words.
    pub violations: Vec<String>,
    /// Guest frame number of the first bad page.
    pub first_bad_gfn: Option<u64>,
    /// Replay file written (on a violation).
    pub replay_file: Option<String>,
    /// How the guest ended.
    pub outcome: String,
    /// The process exit code.
    pub exit_code: i32,
    /// Notes (what a kind means on this host).
    pub notes: Vec<String>,
}

impl StressReport {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "stress: backing {}, {} MiB, {} vCPUs, seed {}{}{}",
            self.backing,
            self.memory >> 20,
            self.vcpus,
            self.seed,
            if self.replay { ", replay" } else { "" },
            self.inject_bug
                .as_deref()
                .map(|b| format!(", INJECTED BUG {b}"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "{} events in {:.1} s = {:.1} events/s; guest pages verified {}, passes {}, retries {}",
            self.events,
            self.seconds,
            self.events_per_second,
            self.pages_verified,
            self.passes,
            self.guest_retries
        );
        if self.injector_cpu_per_event_us > 0.0 {
            let split = match (self.injector_user_ms, self.injector_system_ms) {
                (Some(u), Some(k)) => format!("; in all user {u:.0} ms, system {k:.0} ms"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "injector on a CPU {:.0} us per event{split}: at most {:.0} events/s on this host \
                 even if it never waited (the rest of an event's time it waits: for vCPUs to \
                 park, for guest progress, for a CPU)",
                self.injector_cpu_per_event_us, self.injector_ceiling_events_per_second
            );
        }
        let _ = writeln!(
            s,
            "{:<13} {:>7} {:>7} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}  notes",
            "kind",
            "fired",
            "done",
            "noop",
            "refused",
            "p50 us",
            "p99 us",
            "max us",
            "total ms",
            "cpu ms"
        );
        for (name, k) in &self.kinds {
            let note = match name.as_str() {
                "wrprotect" => format!(
                    "{} vCPU write faults waited out in {} episodes",
                    k.totals.faults, k.faulted
                ),
                "split" if self.unpaused_splits > 0 => format!(
                    "{} splits without a vCPU pause (writes to the frame held median {:.0} us), \
                     {} onto pages allocated ahead",
                    self.unpaused_splits,
                    self.split_write_hold_median_us.unwrap_or(0.0),
                    self.splits_onto_reserve
                ),
                "collapse" if self.unpaused_collapses > 0 => format!(
                    "{} collapses without a vCPU pause (writes to the frame held median {:.0} us), \
                     {} of them onto a huge page allocated ahead",
                    self.unpaused_collapses,
                    self.collapse_write_hold_median_us.unwrap_or(0.0),
                    self.collapses_onto_reserve
                ),
                "dirtylog" => format!(
                    "pages_2m fell in {} of {}; {} dirty pages logged",
                    k.pages_2m_fell, k.fired, k.totals.dirty_pages
                ),
                "slot" => format!(
                    "KVM mapped nothing after {} of {} deletes",
                    k.unmapped_after_delete, k.fired
                ),
                "pageout" => format!(
                    "resident pages {} -> {} (no swap: shmem stays resident)",
                    k.totals.resident_before, k.totals.resident_after
                ),
                _ => k
                    .refused_reason
                    .clone()
                    .map(|r| format!("refused: {r}"))
                    .unwrap_or_default(),
            };
            let note = if k.per_slot.len() > 1 {
                let per: Vec<String> = k
                    .per_slot
                    .iter()
                    .map(|(id, n)| format!("{id}:{n}"))
                    .collect();
                format!(
                    "{note}{}by slot {}",
                    if note.is_empty() { "" } else { "; " },
                    per.join(" ")
                )
            } else {
                note
            };
            let _ = writeln!(
                s,
                "{:<13} {:>7} {:>7} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
                name,
                k.fired,
                k.done,
                k.noop,
                k.refused,
                k.p50_us,
                k.p99_us,
                k.max_us,
                k.total_us / 1000,
                k.cpu_us / 1000,
                note
            );
        }
        for q in &self.quiescent_points {
            let verdict = match (q.agrees, q.explained_by_host_moves) {
                (true, _) => "agree",
                (false, true) => "explained by the host's page moves",
                (false, false) => "DISAGREE",
            };
            let _ = writeln!(s, "{q}: {verdict}");
            if let Some(d) = q.books_vs_host.as_ref().filter(|d| !d.is_empty()) {
                let _ = writeln!(
                    s,
                    "  finding: guest-mem's books and the host's page tables disagree on {} frames {:?} \
                     (books huge {}, host PMD-mapped {}); the mirror was fed the host's truth",
                    d.len(),
                    &d[..d.len().min(8)],
                    q.huge_frames,
                    q.host_pmd_frames.unwrap_or(0)
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        let _ = writeln!(s, "violations: {}", self.violations.len());
        for v in &self.violations {
            let _ = writeln!(s, "  VIOLATION: {v}");
        }
        let _ = writeln!(s, "outcome: {}", self.outcome);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut t = Tally::default();
        for us in 1..=100u64 {
            t.add(
                EventKind::Host(HostKind::Slot),
                &Effect::Done,
                &Extra::default(),
                Duration::from_micros(us),
                Duration::from_micros(us / 2),
            );
        }
        t.add(
            EventKind::Host(HostKind::Split),
            &Effect::Refused("busy".into()),
            &Extra::default(),
            Duration::from_micros(7),
            Duration::from_micros(3),
        );
        let r = t.finish();
        let s = &r["slot"];
        assert_eq!(
            (s.fired, s.done, s.p50_us, s.p99_us, s.max_us, s.total_us),
            (100, 100, 50, 99, 100, 5050)
        );
        assert_eq!(s.cpu_us, (1..=100u64).map(|us| us / 2).sum::<u64>());
        assert_eq!(s.unmapped_after_delete, 100);
        let sp = &r["split"];
        assert_eq!((sp.refused, sp.p50_us), (1, 7));
        assert_eq!(sp.refused_reason.as_deref(), Some("busy"));
    }
}
