//! Per-configuration statistics, the results file and the text table.

use std::collections::BTreeMap;

use crate::stats::MappingStats;

use super::args::Mode;
use super::hostdesc::HostDesc;
use super::plan::{size_name, Config};
use super::tsc::TscFreq;

/// The runs of one backing, summarized.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BackingResult {
    /// Host backing.
    pub backing: String,
    /// Runs.
    pub runs: usize,
    /// CMD's wall seconds in the guest.
    pub wall_seconds: Option<Spread>,
    /// Every numeric `RESULT` key's spread over the runs.
    pub result: BTreeMap<String, Spread>,
    /// Median wall time over the `4k` backing's median (same invocation).
    pub wall_ratio_to_4k: Option<f64>,
    /// Median ns_per_access over the `4k` backing's (when CMD reports it).
    pub ns_per_access_ratio_to_4k: Option<f64>,
    /// Largest KVM pages_2m over every sample of every run.
    pub kvm_pages_2m_peak: Option<u64>,
    /// Largest KVM pages_4k over every sample of every run.
    pub kvm_pages_4k_peak: Option<u64>,
}

/// Median and spread of the samples of one configuration.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Spread {
    /// From samples (`None` if empty).
    pub fn of(samples: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// The measurements of one configuration so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    /// The configuration.
    pub config: Config,
    /// ns per access of each run.
    pub ns: Vec<f64>,
    /// KVM's counters at the end of each guest run.
    pub kvm: Vec<MappingStats>,
    /// Set-up + warm-up seconds inside the guest / native thread, per run.
    pub setup_seconds: Vec<f64>,
    /// Guest RAM (guest runs).
    pub memory: Option<u64>,
    /// What backed the native table.
    pub native_backing: Option<&'static str>,
}

impl Samples {
    /// No samples yet.
    pub fn new(config: Config) -> Samples {
        Samples {
            config,
            ns: Vec::new(),
            kvm: Vec::new(),
            setup_seconds: Vec::new(),
            memory: None,
            native_backing: None,
        }
    }
}

/// One configuration in the results file.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConfigResult {
    /// Working set in bytes.
    pub working_set: u64,
    /// Working set, e.g. `512M`.
    pub working_set_name: String,
    /// Guest page size (`4k` / `2m`); for native the host page size.
    pub guest_pages: String,
    /// `4k`, `thp`, `hugetlb` or `native`.
    pub backing: String,
    /// For native: `4k`, `hugetlb` or `thp`.
    pub native_backing: Option<String>,
    /// Guest RAM in bytes (guest runs).
    pub guest_memory: Option<u64>,
    /// ns per access of every run, in run order.
    pub samples_ns: Vec<f64>,
    /// ns per access: median, min, max.
    pub ns_per_access: Option<Spread>,
    /// Median / median of native with the same working set and page size.
    pub slowdown_vs_native: Option<f64>,
    /// Best (min) / best of native: less sensitive to a noisy host.
    pub slowdown_best_vs_native: Option<f64>,
    /// KVM `pages_1g` at the end of the last run (`--guest linux`: its peak).
    pub kvm_pages_1g: Option<u64>,
    /// KVM `pages_2m` at the end of the last run (`--guest linux`: its peak).
    pub kvm_pages_2m: Option<u64>,
    /// KVM `pages_4k` at the end of the last run.
    pub kvm_pages_4k: Option<u64>,
    /// KVM counters at the end of every run.
    pub kvm_runs: Vec<MappingStats>,
    /// Seconds of set-up and warm-up before each timed loop.
    pub setup_seconds: Vec<f64>,
}

/// The results file of `vmm bench tlb`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TlbResults {
    /// The command line.
    pub command: String,
    /// The host.
    pub host: HostDesc,
    /// The TSC frequency used for ns.
    pub tsc: TscFreq,
    /// Workload.
    pub mode: Mode,
    /// Where the loop ran: `test` (the `tlb` test guest) or `linux` (the static
    /// program in a Linux guest; its KVM counts are the peaks sampled during the run).
    pub guest: String,
    /// Timed accesses per run.
    pub accesses: u64,
    /// Repeats.
    pub repeat: u32,
    /// PRNG seed.
    pub seed: u64,
    /// Wall seconds of the whole benchmark.
    pub seconds: f64,
    /// Every configuration.
    pub configs: Vec<ConfigResult>,
}

fn native_spread(all: &[Samples], c: &Config) -> Option<Spread> {
    all.iter()
        .find(|s| {
            s.config.backing.is_none()
                && s.config.working_set == c.working_set
                && s.config.guest_pages == c.guest_pages
        })
        .and_then(|s| Spread::of(&s.ns))
}

/// Results per configuration, in plan order.
pub fn results(all: &[Samples]) -> Vec<ConfigResult> {
    all.iter()
        .map(|s| {
            let spread = Spread::of(&s.ns);
            let native = native_spread(all, &s.config);
            let slowdown = match (spread, native) {
                (Some(g), Some(n)) if n.median > 0.0 => Some(g.median / n.median),
                _ => None,
            };
            let slowdown_best = match (spread, native) {
                (Some(g), Some(n)) if n.min > 0.0 => Some(g.min / n.min),
                _ => None,
            };
            let last = s.kvm.last().copied();
            ConfigResult {
                working_set: s.config.working_set,
                working_set_name: size_name(s.config.working_set),
                guest_pages: s.config.guest_pages.to_string(),
                backing: s
                    .config
                    .backing
                    .map_or_else(|| "native".to_string(), |b| b.to_string()),
                native_backing: s.native_backing.map(str::to_string),
                guest_memory: s.memory,
                samples_ns: s.ns.clone(),
                ns_per_access: spread,
                slowdown_vs_native: slowdown,
                slowdown_best_vs_native: slowdown_best,
                kvm_pages_1g: last.and_then(|k| k.pages_1g),
                kvm_pages_2m: last.and_then(|k| k.pages_2m),
                kvm_pages_4k: last.and_then(|k| k.pages_4k),
                kvm_runs: s.kvm.clone(),
                setup_seconds: s.setup_seconds.clone(),
            }
        })
        .collect()
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.2}x"))
}

fn opt_u(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The ten cells of one row of [`table`] / [`markdown_table`]: working
/// set, guest pages, backing, median ns/access, `min<dash>max`, the two
/// ratios against native and KVM's pages_1g / pages_2m / pages_4k.
fn row_cells(c: &ConfigResult, dash: &str) -> [String; 10] {
    let backing = match &c.native_backing {
        Some(n) => format!("native ({n})"),
        None => c.backing.clone(),
    };
    let (med, range) = c.ns_per_access.map_or_else(
        || ("-".to_string(), "-".to_string()),
        |p| {
            (
                format!("{:.2}", p.median),
                format!("{:.2}{dash}{:.2}", p.min, p.max),
            )
        },
    );
    [
        c.working_set_name.clone(),
        c.guest_pages.clone(),
        backing,
        med,
        range,
        ratio(c.slowdown_vs_native),
        ratio(c.slowdown_best_vs_native),
        opt_u(c.kvm_pages_1g),
        opt_u(c.kvm_pages_2m),
        opt_u(c.kvm_pages_4k),
    ]
}

/// The human-readable table.
pub fn table(r: &[ConfigResult]) -> String {
    let head = [
        "ws",
        "gpages",
        "backing",
        "ns/access",
        "min-max",
        "vs native",
        "best vs",
        "pages_1g",
        "pages_2m",
        "pages_4k",
    ]
    .map(String::from);
    let line = |[ws, gp, b, med, range, vs, best, p1, p2, p4]: [String; 10]| {
        format!(
            "{ws:<8} {gp:<6} {b:<16} {med:>10} {range:>17} {vs:>9} {best:>9} {p1:>8} {p2:>9} {p4:>9}\n"
        )
    };
    let mut s = line(head);
    for c in r {
        s.push_str(&line(row_cells(c, "-")));
    }
    s
}

/// The same table in Markdown.
pub fn markdown_table(r: &[ConfigResult]) -> String {
    let mut s = String::from(
        "| working set | guest pages | backing | ns/access (median) | min–max | vs native (median) | vs native (best) | pages_1g | pages_2m | pages_4k |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in r {
        s.push_str(&format!("| {} |\n", row_cells(c, "–").join(" | ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testguest::GuestPageSize;
    use guest_mem::Backing;

    #[test]
    fn spread_median() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[1.0, 4.0]).unwrap().median, 2.5);
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn slowdown_uses_native_of_same_page_size() {
        let c = |backing, gp| Config {
            working_set: 64 << 20,
            guest_pages: gp,
            backing,
        };
        let mut n2 = Samples::new(c(None, GuestPageSize::Size2M));
        n2.ns = vec![10.0, 10.0];
        let mut n4 = Samples::new(c(None, GuestPageSize::Size4K));
        n4.ns = vec![20.0];
        let mut g = Samples::new(c(Some(Backing::Hugetlb), GuestPageSize::Size2M));
        g.ns = vec![11.0, 12.0, 13.0];
        g.kvm.push(MappingStats {
            pages_4k: Some(3),
            pages_2m: Some(32),
            pages_1g: Some(0),
        });
        let r = results(&[n2, n4, g]);
        assert_eq!(r[2].slowdown_vs_native, Some(1.2));
        assert_eq!(r[2].slowdown_best_vs_native, Some(1.1));
        assert_eq!(r[2].kvm_pages_2m, Some(32));
        assert_eq!(r[0].slowdown_vs_native, Some(1.0));
        let t = table(&r);
        assert!(t.contains("1.20x"), "{t}");
        assert!(markdown_table(&r).contains("| 64M | 2m | hugetlb | 12.00 |"));
        // Whole rows, header and a native row included.
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "ws       gpages backing           ns/access           min-max vs native   best vs pages_1g  pages_2m  pages_4k"
        );
        assert_eq!(
            lines[3],
            "64M      2m     hugetlb               12.00       11.00-13.00     1.20x     1.10x        0        32         3"
        );
        assert!(lines[1].starts_with("64M      2m     native  "), "{t}");
        let md: Vec<String> = markdown_table(&r).lines().map(String::from).collect();
        assert_eq!(
            md[4],
            "| 64M | 2m | hugetlb | 12.00 | 11.00–13.00 | 1.20x | 1.10x | 0 | 32 | 3 |"
        );
        assert_eq!(md.len(), 2 + r.len());
    }
}
