//! The driver of `vmm bench workload`: a user's command in a Linux guest, once
//! per host backing and repeat (repeats interleaved, the repeat loop outermost),
//! through the guest init protocol ([`super::protocol`]). Each run boots the
//! guest with `vmm.run=<base64 CMD>` on its command line, its console in a
//! temporary file, and collects CMD's `RESULT key=value`s, CMD's wall time
//! measured inside the guest, the guest's THP counters (`VMM-GUEST`), KVM's
//! pages_4k / pages_2m sampled during the run ([`crate::run::KVM_SAMPLE_INTERVAL`])
//! and the host's smaps of guest RAM at the end.
//!
//! A paravirtual shadow-paging host cannot run it: guest user space cannot make
//! system calls there (docs), so it stops with exit code 2 before booting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use guest_mem::Backing;
use serde::Serialize;
use serde_json::Value;

use crate::config::RunConfig;
use crate::exit_code;
use crate::host::{HostInfo, HostKind};
use crate::snapshot::HostMemory;
use crate::stats::{self, KvmSample, MappingStats};

use super::args::{GuestThp, Spec, WorkloadConfig};
use super::error::BenchError;
use super::hostdesc::HostDesc;
use super::protocol::{self, GuestOutput};
use super::summary::{BackingResult, Spread};

/// Why a Linux guest's user space cannot run benchmarks on this host, if it cannot.
pub fn user_space_unavailable(info: &HostInfo) -> Option<String> {
    (info.kind == HostKind::ParavirtShadow).then(|| {
        "a Linux guest's user space cannot run on this host: its KVM is paravirtual shadow \
         paging (no vmx/svm in /proc/cpuinfo), where the guest kernel boots but the first \
         SYSCALL from guest user space is not delivered to the guest kernel\
         /work/shared/PLATFORM.md), so the guest's init cannot run the command. Run it on a \
         VT-x/AMD-V host (or the emulated AMD-V host of the tests, tests/src/l1host); \
         `vmm bench tlb --guest test` runs the built-in CPL3 loops here."
            .to_string()
    })
}

/// One guest run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadRun {
    /// Host backing.
    pub backing: String,
    /// Repeat (0-based).
    pub repeat: u32,
    /// CMD's exit status in the guest.
    pub rc: i32,
    /// CMD's wall seconds, measured inside the guest.
    pub wall_seconds: f64,
    /// Every `RESULT` key=value (numbers as numbers).
    pub result: BTreeMap<String, Value>,
    /// The guest's THP counters (`VMM-GUEST` line; numbers as numbers).
    pub guest: BTreeMap<String, Value>,
    /// KVM's counters sampled during the run.
    pub kvm_samples: Vec<KvmSample>,
    /// The largest pages_2m / pages_4k / pages_1g over the samples and the end.
    pub kvm_peak: MappingStats,
    /// KVM's counters at the end (after the guest powered off).
    pub kvm_end: MappingStats,
    /// Host smaps of guest RAM before the guest ran and at the end.
    pub host_memory_start: Option<HostMemory>,
    /// At the end.
    pub host_memory_end: Option<HostMemory>,
    /// Wall seconds of the whole run on the host (boot, CMD, power-off).
    pub vmm_seconds: f64,
}

/// Everything `vmm bench workload` measured (the `--json` file).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadResults {
    /// The command line of vmm.
    pub command: String,
    /// The host.
    pub host: HostDesc,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// CMD.
    pub run: String,
    /// The guest's THP mode (`None`: the kernel's default).
    pub guest_thp: Option<GuestThp>,
    /// Guest RAM bytes.
    pub memory: u64,
    /// Repeats.
    pub repeat: u32,
    /// Seconds of the whole benchmark.
    pub seconds: f64,
    /// Every run, in run order.
    pub runs: Vec<WorkloadRun>,
    /// Per backing, in `--backing` order.
    pub backings: Vec<BackingResult>,
}

/// JSON value of a reported string: a number when it is one (decimal or 0x hex
/// up to 2^53 stays a string beyond), else the string.
fn value(s: &str) -> Value {
    if let Ok(i) = s.parse::<i64>() {
        return Value::from(i);
    }
    if let Ok(f) = s.parse::<f64>() {
        if f.is_finite() {
            return Value::from(f);
        }
    }
    Value::from(s)
}

fn values(m: &BTreeMap<String, String>) -> BTreeMap<String, Value> {
    m.iter().map(|(k, v)| (k.clone(), value(v))).collect()
}

fn config_name(b: Backing, rep: u32) -> String {
    format!("backing {} (repeat {})", b, rep + 1)
}

/// A temporary file for the guest console of one run.
fn console_path(b: Backing, rep: u32) -> PathBuf {
    std::env::temp_dir().join(format!(
        "vmm-bench-workload-{}-{}-{rep}.console",
        std::process::id(),
        b
    ))
}

/// The run configuration of one run (`vmm run`'s defaults otherwise).
pub fn run_config(s: &Spec, b: Backing, console: &Path) -> RunConfig {
    let mut cmdline = protocol::cmdline(&s.run, s.guest_thp.map(GuestThp::name));
    if let Some(extra) = &s.cmdline {
        cmdline = format!("{extra} {cmdline}");
    }
    RunConfig {
        kernel: Some(s.kernel.clone()),
        initrd: Some(s.initrd.clone()),
        cmdline: Some(cmdline),
        memory: s.memory,
        backing: b,
        serial: console.display().to_string(),
        timeout: Some(s.timeout),
        kvm_dev: s.kvm_dev.clone(),
        ..RunConfig::default()
    }
}

/// Boots the guest once on backing `b` and collects what it reported.
pub fn one(s: &Spec, b: Backing, rep: u32) -> Result<WorkloadRun, BenchError> {
    let config = config_name(b, rep);
    let console = console_path(b, rep);
    let args = run_config(s, b, &console);
    let started = Instant::now();
    let r = crate::run::run(&args);
    let vmm_seconds = started.elapsed().as_secs_f64();
    let text = std::fs::read(&console).map(|t| String::from_utf8_lossy(&t).into_owned());
    if let Err(e) = std::fs::remove_file(&console) {
        log::debug!("removing {}: {e}", console.display());
    }
    let rep_ = r.map_err(|source| BenchError::Run {
        config: config.clone(),
        source,
    })?;
    let text = text.unwrap_or_default();
    let last = |n: usize| {
        let l: Vec<&str> = text.lines().collect();
        l[l.len().saturating_sub(n)..].join("\n")
    };
    if rep_.exit_code != exit_code::OK {
        return Err(BenchError::GuestFailed {
            config,
            outcome: format!("{}; last console lines:\n{}", rep_.outcome, last(15)),
            code: rep_.exit_code,
        });
    }
    let g: GuestOutput = protocol::parse(&text).map_err(|e| BenchError::Workload {
        config: config.clone(),
        why: format!("{e}; last console lines:\n{}", last(15)),
    })?;
    if g.rc != 0 {
        return Err(BenchError::Workload {
            config,
            why: format!(
                "the command exited {} in the guest; its output:\n{}",
                g.rc,
                g.output.join("\n")
            ),
        });
    }
    let mut samples = rep_.kvm_samples.clone();
    samples.push(KvmSample {
        seconds: rep_.seconds,
        kvm: rep_.kvm,
    });
    let kvm_peak = MappingStats {
        pages_4k: stats::peak(&samples, |m| m.pages_4k),
        pages_2m: stats::peak(&samples, |m| m.pages_2m),
        pages_1g: stats::peak(&samples, |m| m.pages_1g),
    };
    Ok(WorkloadRun {
        backing: b.to_string(),
        repeat: rep,
        rc: g.rc,
        wall_seconds: g.wall_ns as f64 / 1e9,
        result: values(&g.result),
        guest: values(&g.guest),
        kvm_samples: rep_.kvm_samples,
        kvm_peak,
        kvm_end: rep_.kvm,
        host_memory_start: rep_.host_memory_start,
        host_memory_end: rep_.host_memory_end,
        vmm_seconds,
    })
}

/// Per-backing summaries of `runs`, in `backings` order.
pub fn summarize(backings: &[Backing], runs: &[WorkloadRun]) -> Vec<BackingResult> {
    let mut out: Vec<BackingResult> = backings
        .iter()
        .map(|&b| {
            let name = b.to_string();
            let mine: Vec<&WorkloadRun> = runs.iter().filter(|r| r.backing == name).collect();
            let wall: Vec<f64> = mine.iter().map(|r| r.wall_seconds).collect();
            let mut keys: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for r in &mine {
                for (k, v) in &r.result {
                    if let Some(f) = v.as_f64() {
                        keys.entry(k.clone()).or_default().push(f);
                    }
                }
            }
            BackingResult {
                backing: name,
                runs: mine.len(),
                wall_seconds: Spread::of(&wall),
                result: keys
                    .iter()
                    .filter_map(|(k, v)| Spread::of(v).map(|s| (k.clone(), s)))
                    .collect(),
                wall_ratio_to_4k: None,
                ns_per_access_ratio_to_4k: None,
                kvm_pages_2m_peak: mine.iter().filter_map(|r| r.kvm_peak.pages_2m).max(),
                kvm_pages_4k_peak: mine.iter().filter_map(|r| r.kvm_peak.pages_4k).max(),
            }
        })
        .collect();
    let base = out.iter().find(|r| r.backing == "4k").cloned();
    if let Some(base) = base {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let ns = |r: &BackingResult| r.result.get("ns_per_access").map(|s| s.median);
        for r in &mut out {
            r.wall_ratio_to_4k = ratio(
                r.wall_seconds.map(|s| s.median),
                base.wall_seconds.map(|s| s.median),
            );
            r.ns_per_access_ratio_to_4k = ratio(ns(r), ns(&base));
        }
    }
    out
}

/// The text table.
pub fn table(r: &[BackingResult]) -> String {
    let o = |v: Option<u64>| v.map_or_else(|| "n/a".into(), |v| v.to_string());
    let f = |v: Option<f64>, p: usize| v.map_or_else(|| "-".into(), |v| format!("{v:.p$}"));
    let mut s = format!(
        "{:<8} {:>4} {:>10} {:>14} {:>8} {:>8} {:>13} {:>13}\n",
        "backing", "runs", "wall s", "ns/access", "x 4k", "wall x4k", "KVM 2m peak", "KVM 4k peak"
    );
    for b in r {
        s.push_str(&format!(
            "{:<8} {:>4} {:>10} {:>14} {:>8} {:>8} {:>13} {:>13}\n",
            b.backing,
            b.runs,
            f(b.wall_seconds.map(|w| w.median), 3),
            f(b.result.get("ns_per_access").map(|w| w.median), 2),
            f(b.ns_per_access_ratio_to_4k, 2),
            f(b.wall_ratio_to_4k, 2),
            o(b.kvm_pages_2m_peak),
            o(b.kvm_pages_4k_peak),
        ));
    }
    s
}

fn check(s: &Spec) -> Result<(), BenchError> {
    if s.backings.is_empty() {
        return Err(BenchError::Usage(
            "--backing needs at least one value".into(),
        ));
    }
    if s.run.trim().is_empty() {
        return Err(BenchError::Usage("--run needs a command".into()));
    }
    Ok(())
}

/// Runs the benchmark; `progress` gets one line per run.
pub fn run(s: &Spec, progress: &mut dyn FnMut(&str)) -> Result<WorkloadResults, BenchError> {
    let info = HostInfo::detect();
    if let Some(why) = user_space_unavailable(&info) {
        return Err(BenchError::HostPrerequisite(why));
    }
    check(s)?;
    let host = HostDesc::detect(&info);
    progress(&format!("host: {}", host.line()));
    let started = Instant::now();
    let total = s.backings.len() * s.repeat as usize;
    let mut runs = Vec::with_capacity(total);
    for rep in 0..s.repeat {
        for &b in &s.backings {
            let r = one(s, b, rep)?;
            let o = |v: Option<u64>| v.map_or_else(|| "n/a".into(), |v| v.to_string());
            progress(&format!(
                "[run {}/{total}] {}: wall {:.3} s in the guest, {} (KVM peak pages_2m {}, pages_4k {}; vmm {:.1} s)",
                runs.len() + 1,
                config_name(b, rep),
                r.wall_seconds,
                r.result
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                o(r.kvm_peak.pages_2m),
                o(r.kvm_peak.pages_4k),
                r.vmm_seconds
            ));
            runs.push(r);
        }
    }
    Ok(WorkloadResults {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        host,
        kernel: s.kernel.clone(),
        initrd: s.initrd.clone(),
        run: s.run.clone(),
        guest_thp: s.guest_thp,
        memory: s.memory,
        repeat: s.repeat,
        seconds: started.elapsed().as_secs_f64(),
        backings: summarize(&s.backings, &runs),
        runs,
    })
}

/// Writes the JSON results file.
pub fn write_json(path: &Path, r: &WorkloadResults) -> Result<(), BenchError> {
    let out = |why: String| BenchError::Output {
        path: path.to_path_buf(),
        why,
    };
    let text = serde_json::to_string_pretty(r).map_err(|e| out(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| out(e.to_string()))
}

/// Writes the SVG chart (medians relative to the `4k` backing).
pub fn write_svg(path: &Path, r: &WorkloadResults) -> Result<(), BenchError> {
    let out = |why: String| BenchError::Output {
        path: path.to_path_buf(),
        why,
    };
    let title = format!(
        "vmm bench workload {:?} ({} repeats): relative to 4k",
        r.run, r.repeat
    );
    let svg = super::chart::workload_svg(&r.backings, &title).map_err(out)?;
    std::fs::write(path, svg).map_err(|e| out(e.to_string()))
}

/// `vmm bench workload`: run, print the table, write JSON / SVG.
pub fn run_cli(a: &WorkloadConfig) -> Result<(), BenchError> {
    crate::output_path::check_all([("--json", a.json.as_deref()), ("--svg", a.svg.as_deref())])
        .map_err(|e| BenchError::Usage(e.to_string()))?;
    let r = run(&a.spec, &mut |l| eprintln!("{l}"))?;
    // The files first: stdout may be a closed pipe.
    let written = a
        .json
        .as_deref()
        .map(|p| write_json(p, &r))
        .unwrap_or(Ok(()))
        .and(a.svg.as_deref().map(|p| write_svg(p, &r)).unwrap_or(Ok(())));
    crate::stdout::print(&format!(
        "vmm bench workload: {:?}, {} MiB guest RAM, guest THP {}, {} repeats, {:.1} s\n{}",
        r.run,
        r.memory >> 20,
        r.guest_thp.map_or("(kernel default)", GuestThp::name),
        r.repeat,
        r.seconds,
        table(&r.backings)
    ));
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(backing: &str, wall: f64, ns: f64, p2m: u64) -> WorkloadRun {
        WorkloadRun {
            backing: backing.into(),
            repeat: 0,
            rc: 0,
            wall_seconds: wall,
            result: [("ns_per_access".to_string(), value(&ns.to_string()))].into(),
            guest: BTreeMap::new(),
            kvm_samples: Vec::new(),
            kvm_peak: MappingStats {
                pages_4k: Some(10),
                pages_2m: Some(p2m),
                pages_1g: Some(0),
            },
            kvm_end: MappingStats::default(),
            host_memory_start: None,
            host_memory_end: None,
            vmm_seconds: 1.0,
        }
    }

    #[test]
    fn ratios_are_to_the_4k_backing() {
        let runs = [
            run_of("4k", 2.0, 100.0, 0),
            run_of("hugetlb", 1.0, 50.0, 128),
            run_of("4k", 4.0, 100.0, 0),
        ];
        let r = summarize(&[Backing::Small4k, Backing::Hugetlb], &runs);
        assert_eq!(r[0].runs, 2);
        assert_eq!(r[0].wall_seconds.unwrap().median, 3.0);
        assert_eq!(r[1].ns_per_access_ratio_to_4k, Some(0.5));
        assert_eq!(r[1].wall_ratio_to_4k, Some(1.0 / 3.0));
        assert_eq!(r[1].kvm_pages_2m_peak, Some(128));
        assert_eq!(r[0].kvm_pages_2m_peak, Some(0));
        let t = table(&r);
        assert!(t.contains("hugetlb") && t.contains("0.50"), "{t}");
        // Without 4k there is no ratio.
        let r = summarize(&[Backing::Hugetlb], &runs);
        assert_eq!(r[0].ns_per_access_ratio_to_4k, None);
    }

    #[test]
    fn values_become_numbers_when_they_are() {
        assert_eq!(value("12"), Value::from(12));
        assert_eq!(value("87.5"), Value::from(87.5));
        assert_eq!(value("0x2c0ab40"), Value::from("0x2c0ab40"));
        assert_eq!(value("always"), Value::from("always"));
    }

    #[test]
    fn paravirtual_hosts_are_refused_with_the_reason() {
        let pv = HostInfo::from_texts("flags : fpu\n", "N");
        assert!(user_space_unavailable(&pv).unwrap().contains("SYSCALL"));
        let hw = HostInfo::from_texts("flags : svm\n", "Y");
        assert_eq!(user_space_unavailable(&hw), None);
    }

    #[test]
    fn the_command_goes_on_the_kernel_command_line() {
        let s = Spec {
            kernel: "/k".into(),
            initrd: "/i".into(),
            run: "chase 64M 1000".into(),
            backings: vec![Backing::Hugetlb],
            guest_thp: Some(GuestThp::Always),
            memory: 256 << 20,
            repeat: 1,
            cmdline: Some("quiet".into()),
            timeout: 60.0,
            kvm_dev: "/dev/kvm".into(),
        };
        let a = run_config(&s, Backing::Hugetlb, Path::new("/tmp/c"));
        assert_eq!(
            a.cmdline.as_deref(),
            Some("quiet vmm.run=Y2hhc2UgNjRNIDEwMDA= vmm.thp=always")
        );
        assert_eq!(a.memory, 256 << 20);
        assert_eq!(a.serial, "/tmp/c");
    }
}
