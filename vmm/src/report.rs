//! The end-of-run report: outcome, KVM's mapping statistics beside the THP
//! mirror's prediction, test-guest reports; printed and written as JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::balloon_backend::BalloonStatus;
use crate::config::RunConfig;
use crate::devices::console::ConsoleStats;
use crate::emulation;
use crate::machine::MirrorPoint;
use crate::machine::{Checkpoint, GuestKind, Machine, Report};
use crate::mirror::{Prediction, Verdict};
use crate::outcome::Outcome;
use crate::snapshot::{self, HostMemory, PoolReport};
use crate::stats::MappingStats;
use crate::testguest::ReportKey;
use crate::unmap_stats::UnmapMetrics;
use crate::vm::Vm;

pub use crate::snapshot::FrameCounts;

/// Everything known at the end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// How the run ended.
    pub outcome: String,
    /// Process exit code.
    pub exit_code: i32,
    /// Seconds the vCPUs ran.
    pub seconds: f64,
    /// Backing of guest RAM.
    pub backing: String,
    /// Guest RAM bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Test guest name, if one ran.
    pub test_guest: Option<String>,
    /// Guest page size of the test guest.
    pub guest_pages: Option<String>,
    /// Host kind.
    pub host: crate::host::HostInfo,
    /// KVM's counters at the end.
    pub kvm: MappingStats,
    /// KVM's counters sampled while the guest ran (every
    /// [`crate::run::KVM_SAMPLE_INTERVAL`], the first at the start).
    pub kvm_samples: Vec<crate::stats::KvmSample>,
    /// Every KVM VM statistic by name.
    pub kvm_all: BTreeMap<String, u64>,
    /// Host frame states.
    pub frames: FrameCounts,
    /// Guest RAM's memslots at the end: host frames and the mirror's
    /// mappings per slot.
    pub slots: Vec<SlotReport>,
    /// The mirror's prediction.
    pub mirror: Option<Prediction>,
    /// Test-guest reports.
    pub reports: Vec<Report>,
    /// Test-guest reports by key name (last value per key, summed over vCPUs
    /// for counters).
    pub report_totals: BTreeMap<String, u64>,
    /// KVM counters at checkpoints.
    pub checkpoints: Vec<Checkpoint>,
    /// Rejected test-device accesses.
    pub test_device_rejected: u64,
    /// Pool accounting at the end.
    pub pool: PoolReport,
    /// Host memory of guest RAM (smaps) once populated, before the guest ran.
    pub host_memory_start: Option<HostMemory>,
    /// Host memory of guest RAM (smaps) at the end.
    pub host_memory_end: Option<HostMemory>,
    /// The balloon at the end, if the run had one.
    pub balloon: Option<BalloonStatus>,
    /// Splits and collapses: counts, latencies, pause times, collapse rate.
    pub unmap: UnmapMetrics,
    /// The guest console: bytes written out and dropped (slow or gone reader).
    pub console: ConsoleStats,
    /// Instructions the emulation quirk layer handled, by kind
    /// ([`crate::emulation::Quirk`]; every kind listed, zeros included).
    pub emulation_quirks: BTreeMap<String, u64>,
    #[serde(skip)]
    outcome_value: Option<Outcome>,
}

impl RunReport {
    /// The outcome.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome_value.as_ref()
    }
}

/// Gather the report after the vCPUs stopped.
pub fn collect(
    m: &Machine,
    _vm: &Vm,
    args: &RunConfig,
    outcome: Outcome,
    elapsed: Duration,
    host_memory_start: Option<HostMemory>,
) -> RunReport {
    let (kvm, kvm_all) = match &m.stats {
        Some(s) => (
            s.mapping().unwrap_or_else(|e| {
                log::warn!("reading KVM stats: {e}");
                MappingStats::default()
            }),
            s.all().unwrap_or_default(),
        ),
        None => (MappingStats::default(), BTreeMap::new()),
    };
    let balloon = m.balloon().map(|b| b.status());
    let mut ram = m.ram();
    let prediction = m.predict(&mut ram, MirrorPoint::End);
    let states = ram.frame_states();
    let mut frames = FrameCounts::of(&states, ram.layout());
    frames.released = ram.released_frames().len();
    let slots = slot_reports(&ram, &states, prediction.as_ref());
    let pool = snapshot::pool_report(&ram);
    let host_memory_end = HostMemory::read(&ram);
    drop(ram);
    let outcome = match mirror_mismatch(m, &kvm, &prediction) {
        Some(why) if outcome.exit_code() == 0 && m.kind == GuestKind::TestGuest => {
            log::error!("KVM disagrees with the mirror: {why}");
            Outcome::MirrorMismatch(why)
        }
        _ => outcome,
    };
    let reports = m.reports();
    let mut totals = BTreeMap::new();
    for r in &reports {
        let name = ReportKey::from_raw(r.key)
            .map_or_else(|| format!("key_{}", r.key), |k| k.name().to_string());
        *totals.entry(name).or_insert(0u64) += r.value;
    }
    let emulation_quirks = emulation::counts().snapshot();
    let quirks = quirks_text(&emulation_quirks);
    if !quirks.is_empty() {
        log::info!("{}", quirks.trim());
    }
    RunReport {
        outcome: outcome.describe(),
        exit_code: outcome.exit_code(),
        seconds: elapsed.as_secs_f64(),
        backing: args.backing.to_string(),
        memory: args.memory,
        vcpus: args.vcpus,
        test_guest: args.test_guest.map(|n| n.to_string()),
        guest_pages: args.test_guest.map(|_| args.guest_pages.to_string()),
        host: m.host,
        kvm,
        kvm_samples: Vec::new(),
        kvm_all,
        frames,
        slots,
        mirror: prediction,
        reports,
        report_totals: totals,
        checkpoints: m.checkpoints(),
        test_device_rejected: m.test_device.as_ref().map_or(0, |d| d.rejected()),
        pool,
        host_memory_start,
        host_memory_end,
        balloon,
        unmap: m.unmap.snapshot(),
        console: ConsoleStats::default(),
        emulation_quirks,
        outcome_value: Some(outcome),
    }
}

/// The first disagreement between KVM and a comparable prediction, at a
/// checkpoint or at the end.
fn mirror_mismatch(m: &Machine, kvm: &MappingStats, end: &Option<Prediction>) -> Option<String> {
    let check = |p: &Prediction, k: &MappingStats| match k.counts() {
        Some(k) => match p.verdict(k) {
            Verdict::Mismatch(w) | Verdict::Informative(Some(w)) => Some(w),
            Verdict::Match | Verdict::Informative(None) => None,
        },
        None => None,
    };
    for c in m.checkpoints() {
        if let Some(w) = c.mirror.as_ref().and_then(|p| check(p, &c.kvm)) {
            return Some(format!("checkpoint {} (vCPU {}): {w}", c.phase, c.vcpu));
        }
    }
    end.as_ref()
        .and_then(|p| check(p, kvm))
        .map(|w| format!("at the end: {w}"))
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| v.to_string())
}

/// One memslot of guest RAM in the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotReport {
    /// Slot id.
    pub id: u32,
    /// First guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Host states of the frames overlapping the slot.
    pub frames: FrameCounts,
    /// The mirror's 4K mappings in the slot (`None` without a mirror).
    pub mirror_pages_4k: Option<u64>,
    /// The mirror's 2M mappings in the slot.
    pub mirror_pages_2m: Option<u64>,
    /// The mirror's 1G mappings in the slot.
    pub mirror_pages_1g: Option<u64>,
}

fn slot_reports(
    ram: &guest_mem::GuestRam,
    states: &[guest_mem::FrameView],
    p: Option<&Prediction>,
) -> Vec<SlotReport> {
    ram.memslots()
        .iter()
        .map(|s| {
            let m = p.and_then(|p| p.per_slot.iter().find(|x| x.id == s.id));
            SlotReport {
                id: s.id,
                gpa: s.gpa,
                size: s.size,
                frames: FrameCounts::of_range(states, ram.layout(), s.range()),
                mirror_pages_4k: m.map(|m| m.pages_4k),
                mirror_pages_2m: m.map(|m| m.pages_2m),
                mirror_pages_1g: m.map(|m| m.pages_1g),
            }
        })
        .collect()
}

/// The per-memslot lines of the statistics table (KVM counts per VM only).
fn slots_text(slots: &[SlotReport]) -> String {
    let mut s = format!(
        "  memslots ({}; KVM counts per VM, the mirror per slot):\n    {:>4} {:>28} {:>10}  {:>11} {:>10} {:>10} {:>10}\n",
        slots.len(),
        "slot",
        "guest-physical",
        "MiB",
        "huge/small",
        "mirror 1g",
        "mirror 2m",
        "mirror 4k"
    );
    for x in slots {
        s.push_str(&format!(
            "    {:>4} {:>28} {:>10}  {:>11} {:>10} {:>10} {:>10}\n",
            x.id,
            format!("[{:#x}, {:#x})", x.gpa, x.gpa + x.size),
            x.size >> 20,
            x.frames.huge_small(),
            opt(x.mirror_pages_1g),
            opt(x.mirror_pages_2m),
            opt(x.mirror_pages_4k)
        ));
    }
    s
}

/// The human-readable statistics table.
pub fn stats_text(r: &RunReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "KVM stats ({} backing, {} MiB, frames: {}{} huge, {} small, {} unpopulated):\n",
        r.backing,
        r.memory >> 20,
        match r.frames.gig {
            0 => String::new(),
            g => format!("{g} in {} 1G pages, ", g / guest_mem::FRAMES_PER_GIG),
        },
        r.frames.huge,
        r.frames.small,
        r.frames.unpopulated
    ));
    s.push_str(&format!(
        "  {:<10} {:>10} {:>16}\n",
        "", "KVM", "mirror predicts"
    ));
    let (p4, p2, p1) = r.mirror.as_ref().map_or((None, None, None), |p| {
        (Some(p.pages_4k), Some(p.pages_2m), Some(p.pages_1g))
    });
    s.push_str(&format!(
        "  {:<10} {:>10} {:>16}\n",
        "pages_4k",
        opt(r.kvm.pages_4k),
        opt(p4)
    ));
    s.push_str(&format!(
        "  {:<10} {:>10} {:>16}\n",
        "pages_2m",
        opt(r.kvm.pages_2m),
        opt(p2)
    ));
    s.push_str(&format!(
        "  {:<10} {:>10} {:>16}\n",
        "pages_1g",
        opt(r.kvm.pages_1g),
        opt(p1)
    ));
    if let Some(p) = &r.mirror {
        let line = match r.kvm.counts() {
            Some(k) => p.describe(k),
            None => "KVM has no pages_4k / pages_2m statistics".to_string(),
        };
        s.push_str(&format!("  mirror: {line}\n"));
    }
    if !r.slots.is_empty() {
        s.push_str(&slots_text(&r.slots));
    }
    if !r.checkpoints.is_empty() {
        s.push_str(&checkpoints_text(&r.checkpoints));
    }
    s.push_str(&unmap_text(r));
    for (k, v) in &r.report_totals {
        s.push_str(&format!("  guest {k} = {v}\n"));
    }
    s.push_str(&quirks_text(&r.emulation_quirks));
    s
}

/// The quirk layer's counts, when it handled anything.
fn quirks_text(q: &BTreeMap<String, u64>) -> String {
    let handled: Vec<String> = q
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if handled.is_empty() {
        String::new()
    } else {
        format!("  emulation quirks handled: {}\n", handled.join(", "))
    }
}

fn us(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.0} us"))
}

/// KVM's and the mirror's counters at each test-guest checkpoint.
fn checkpoints_text(cps: &[Checkpoint]) -> String {
    let mut s = String::from(
        "  checkpoints (KVM vs mirror; frames huge/small on the host; collapsed right after):\n",
    );
    s.push_str(&format!(
        "    {:>5} {:>4} {:>7} {:>9} {:>10} {:>10} {:>10} {:>12} {:>13} {:>9}  {}\n",
        "phase",
        "vcpu",
        "KVM 1g",
        "mirror 1g",
        "KVM 2m",
        "mirror 2m",
        "KVM 4k",
        "mirror 4k",
        "huge/small",
        "collapsed",
        "verdict"
    ));
    for c in cps {
        let m4 = match &c.mirror {
            Some(p) if p.pages_4k_max != p.pages_4k => {
                format!("{}..{}", p.pages_4k, p.pages_4k_max)
            }
            _ => opt(c.mirror_pages_4k),
        };
        let verdict = match (&c.mirror, c.kvm.counts()) {
            (Some(p), Some(k)) => match p.verdict(k) {
                Verdict::Match => "match".to_string(),
                Verdict::Mismatch(w) => format!("MISMATCH: {w}"),
                Verdict::Informative(None) => "informative".to_string(),
                Verdict::Informative(Some(w)) => format!("VIOLATION: {w}"),
            },
            _ => "n/a".to_string(),
        };
        s.push_str(&format!(
            "    {:>5} {:>4} {:>7} {:>9} {:>10} {:>10} {:>10} {:>12} {:>13} {:>9}  {}\n",
            c.phase,
            c.vcpu,
            opt(c.kvm.pages_1g),
            opt(c.mirror_pages_1g),
            opt(c.kvm.pages_2m),
            opt(c.mirror_pages_2m),
            opt(c.kvm.pages_4k),
            m4,
            c.frames.huge_small(),
            c.collapsed_after,
            verdict
        ));
    }
    s
}

fn unmap_text(r: &RunReport) -> String {
    let u = &r.unmap;
    let mut s = String::new();
    if u.frames_split + u.huge_frames_freed + u.frames_collapsed + u.pages_refilled > 0 {
        s.push_str(&format!(
            "  unmap: {} frames split, {} whole frames freed, {} pages given back, {} taken back, \
             {} frames collapsed ({} refused)\n",
            u.frames_split,
            u.huge_frames_freed,
            u.pages_discarded,
            u.pages_refilled,
            u.frames_collapsed,
            u.collapse_refused
        ));
        s.push_str(&format!(
            "  split latency (request to 4K-mapped) median {}, vCPU pause per split median {} ({} pauses), \
             writes to the frame held median {} ({} splits without a pause, {} onto pages allocated ahead), \
             collapse median {} (vCPU pause median {}, {} pauses; writes to the frame held median {}, \
             {} collapses without a pause, {} onto a huge page allocated ahead), collapse rate {}\n",
            us(u.split_latency.median_us),
            us(u.split_pause.median_us),
            u.split_pause.count,
            us(u.split_write_hold.median_us),
            u.split_write_hold.count,
            u.splits_onto_reserve,
            us(u.collapse_time.median_us),
            us(u.collapse_pause.median_us),
            u.collapse_pause.count,
            us(u.collapse_write_hold.median_us),
            u.collapse_write_hold.count,
            u.collapses_onto_reserve,
            u.collapse_rate_frames_per_s
                .map_or_else(|| "n/a".to_string(), |r| format!("{r:.0} frames/s"))
        ));
    }
    if let Some(b) = &r.balloon {
        s.push_str(&format!(
            "  balloon: driver {}, target {} pages, actual {} pages, inflated {} pages now ({} in total, \
             {} deflated), {} free runs reported, {} rejected\n",
            if b.driver_active { "active" } else { "not active" },
            b.target_pages,
            b.actual_pages,
            b.inflated_pages,
            b.inflated_total,
            b.deflated_total,
            b.reported_runs,
            b.rejected
        ));
        let g = &b.give_back;
        s.push_str(&format!(
            "  balloon give-back ({}{}): {} whole frames freed, {} frames split, {} deferred \
             ({} left whole), {} pages freed, {} still queued; give-back to host memory freed \
             median {}, max {} ({} frames); vCPU pauses {} (median {})\n",
            g.split_policy,
            match (g.split_delay_ms, g.split_max_wait_ms) {
                (Some(d), Some(w)) => format!(", quiet {d} ms, max wait {w} ms"),
                _ => String::new(),
            },
            g.whole_frames_freed,
            g.frames_split,
            g.frames_deferred,
            g.frames_completed,
            g.pages_freed,
            g.pages_queued,
            us(g.give_back_to_freed.median_us),
            us(g.give_back_to_freed.max_us),
            g.give_back_to_freed.count,
            g.split_pause.count,
            us(g.split_pause.median_us)
        ));
    }
    if let (Some(a), Some(b)) = (&r.host_memory_start, &r.host_memory_end) {
        s.push_str(&format!(
            "  host memory of guest RAM: {} KiB at start, {} KiB at end (hugetlb {} KiB, small {} KiB)\n",
            a.total_bytes >> 10,
            b.total_bytes >> 10,
            b.hugetlb_bytes >> 10,
            b.rss_bytes >> 10
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quirks_text_lists_only_what_was_handled() {
        let mut q = BTreeMap::new();
        q.insert("fwait".to_string(), 3);
        q.insert("int3".to_string(), 1);
        q.insert("ud".to_string(), 0);
        assert_eq!(
            quirks_text(&q),
            "  emulation quirks handled: fwait 3, int3 1\n"
        );
        q.values_mut().for_each(|v| *v = 0);
        assert_eq!(quirks_text(&q), "");
    }
}
