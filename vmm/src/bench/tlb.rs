//! The driver of `vmm bench tlb`: every configuration, repeats interleaved
//! (the repeat loop is outermost so drift hits all configurations alike),
//! checksums checked, progress on stderr, results as a table, JSON and SVG.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use guest_mem::Backing;

use crate::host::{HostInfo, HostKind};
use crate::testguest::guests::tlb::{self as guest_tlb, TlbParams, MAX_ACCESSES};

use super::args::{GuestChoice, GuestThp, TlbConfig};
use super::error::BenchError;
use super::hostdesc::HostDesc;
use super::plan::{self, Config};
use super::summary::{self, Samples, TlbResults};
use super::{chart, fit, guest, native, tsc, workload};
use crate::testguest::GuestPageSize;

/// Why `--guest linux` cannot run on this host.
pub fn linux_guest_unavailable(info: &HostInfo) -> String {
    match info.kind {
        HostKind::ParavirtShadow => "--guest linux is not available on this host: its KVM is paravirtual \
             shadow paging (no vmx/svm in /proc/cpuinfo), where a Linux guest boots its kernel but the \
             first SYSCALL from guest user space is not delivered to the guest kernel, so the static \
             benchmark binary cannot run. Use --guest test: the built-in CPL3 test guest runs natively here."
            .to_string(),
        HostKind::HardwareVirt => "--guest linux needs --kernel and --initrd: a guest kernel and an \
             initramfs following the guest init protocol with /bin/chase and /bin/gups \
             (`resources/initramfs/build.sh workload`)."
            .to_string(),
    }
}

fn check(a: &TlbConfig) -> Result<(), BenchError> {
    plan::check_working_sets(&a.working_set)?;
    if a.accesses == 0 || a.accesses > MAX_ACCESSES {
        return Err(BenchError::Usage(format!(
            "--accesses {} must be in 1..={MAX_ACCESSES}",
            a.accesses
        )));
    }
    if a.seed == 0 {
        return Err(BenchError::Usage(
            "--seed must be non-zero (xorshift)".into(),
        ));
    }
    if !(a.timeout > 0.0 && a.timeout.is_finite()) {
        return Err(BenchError::Usage(format!(
            "--timeout {} must be positive",
            a.timeout
        )));
    }
    if a.backing.is_empty() || a.guest_pages.is_empty() {
        return Err(BenchError::Usage(
            "--backing and --guest-pages need at least one value".into(),
        ));
    }
    if a.guest == GuestChoice::Linux && a.guest_pages.contains(&GuestPageSize::Size1G) {
        return Err(BenchError::Usage(
            "--guest-pages 1g needs --guest test: a Linux guest maps its program with THP, 2M \
             pages at most"
                .into(),
        ));
    }
    Ok(())
}

/// Guest RAM of a `--guest linux` run: the working set plus room for the
/// kernel, the initramfs and the program's page tables.
pub const LINUX_GUEST_OVERHEAD: u64 = 192 << 20;

/// Guest RAM of a `--guest linux` run for working set `ws` (a multiple of 2M).
pub fn linux_guest_memory(ws: u64) -> u64 {
    ws.div_ceil(guest_mem::HPAGE_SIZE) * guest_mem::HPAGE_SIZE + LINUX_GUEST_OVERHEAD
}

fn check_hugetlb_pool(cfgs: &[Config], linux: bool) -> Result<(), BenchError> {
    let guest_huge: Vec<Config> = cfgs
        .iter()
        .copied()
        .filter(|c| c.backing == Some(Backing::Hugetlb))
        .collect();
    let need = if linux {
        let guest = guest_huge
            .iter()
            .map(|c| linux_guest_memory(c.working_set) / guest_mem::HPAGE_SIZE)
            .max()
            .unwrap_or(0);
        let native: Vec<Config> = cfgs
            .iter()
            .copied()
            .filter(|c| c.backing.is_none())
            .collect();
        guest.max(plan::hugetlb_pages_needed(&native))
    } else {
        plan::hugetlb_pages_needed(&guest_huge)
    };
    if need == 0 {
        return Ok(());
    }
    // No hugetlb support in the kernel: an empty pool.
    let m = guest_mem::smaps::read_meminfo().unwrap_or_default();
    let free = m.free_2m();
    if free < need {
        let total = m.total;
        return Err(BenchError::HostPrerequisite(format!(
            "hugetlb pool too small: the largest hugetlb run needs {need} free 2M pages \
             (guest RAM = working set + reserved region + slack), the host has {free} free \
             ({total} reserved). Reserve more with `echo {} > /proc/sys/vm/nr_hugepages`, \
             or drop hugetlb from --backing, or use a smaller --working-set.",
            total + (need - free)
        )));
    }
    Ok(())
}

fn params(a: &TlbConfig, ws: u64) -> TlbParams {
    TlbParams {
        ws,
        accesses: a.accesses,
        mode: a.mode.guest_arg(),
        seed: a.seed,
    }
}

fn one(
    a: &TlbConfig,
    c: &Config,
    p: &TlbParams,
    tsc: &tsc::TscFreq,
    want: u64,
    s: &mut Samples,
) -> Result<String, BenchError> {
    let checksum_ok = |got: u64| {
        if got == want {
            Ok(())
        } else {
            Err(BenchError::Checksum {
                config: c.name(),
                got,
                want,
            })
        }
    };
    let started = Instant::now();
    if let (Some(b), GuestChoice::Linux) = (c.backing, a.guest) {
        return one_linux(a, c, b, p, want, s);
    }
    match c.backing {
        None => {
            let r = native::run(p, c.guest_pages)?;
            checksum_ok(r.checksum)?;
            let ns = tsc.ns_per(r.cycles, p.accesses);
            s.ns.push(ns);
            s.native_backing = Some(r.backing.name());
            Ok(format!(
                "{ns:.2} ns/access (host memory: {}; {:.2} s)",
                r.backing.name(),
                started.elapsed().as_secs_f64()
            ))
        }
        Some(_) => {
            let r = guest::run(c, p, a.timeout, &a.kvm_dev)?;
            checksum_ok(r.checksum)?;
            let ns = tsc.ns_per(r.cycles, r.accesses);
            let setup = tsc.ns_per(r.setup_cycles, 1) / 1e9;
            s.ns.push(ns);
            s.kvm.push(r.kvm);
            s.setup_seconds.push(setup);
            s.memory = Some(r.memory);
            let o = |v: Option<u64>| v.map_or_else(|| "n/a".into(), |v| v.to_string());
            Ok(format!(
                "{ns:.2} ns/access (KVM pages_1g {}, pages_2m {}, pages_4k {}; guest set-up {setup:.2} s, run {:.2} s)",
                o(r.kvm.pages_1g),
                o(r.kvm.pages_2m),
                o(r.kvm.pages_4k),
                r.seconds
            ))
        }
    }
}

/// The guest command of a `--guest linux` run: the static program of the same loop.
pub fn linux_command(p: &TlbParams) -> String {
    let prog = if p.mode == guest_tlb::MODE_GUPS {
        "gups"
    } else {
        "chase"
    };
    format!("{prog} {} {} {:#x}", p.ws, p.accesses, p.seed)
}

/// One `--guest linux` run: the workload path ([`workload`]) with guest THP
/// `never` for guest pages 4k, `always` for 2m.
fn one_linux(
    a: &TlbConfig,
    c: &Config,
    b: Backing,
    p: &TlbParams,
    want: u64,
    s: &mut Samples,
) -> Result<String, BenchError> {
    let (Some(kernel), Some(initrd)) = (&a.kernel, &a.initrd) else {
        return Err(BenchError::Usage(
            "--guest linux needs --kernel and --initrd".into(),
        ));
    };
    let spec = super::args::Spec {
        kernel: kernel.clone(),
        initrd: initrd.clone(),
        run: linux_command(p),
        backings: vec![b],
        guest_thp: Some(match c.guest_pages {
            GuestPageSize::Size4K => GuestThp::Never,
            // 1g is refused for Linux guests before any run (`check`).
            GuestPageSize::Size2M | GuestPageSize::Size1G => GuestThp::Always,
        }),
        memory: linux_guest_memory(p.ws),
        repeat: 1,
        cmdline: None,
        timeout: a.timeout,
        kvm_dev: a.kvm_dev.clone(),
    };
    let r = workload::one(&spec, b, 0)?;
    let missing = |key: &'static str| BenchError::MissingReport {
        config: c.name(),
        key,
    };
    let num = |k: &'static str| {
        r.result
            .get(k)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| missing(k))
    };
    let ns = num("ns_per_access")?;
    let setup = num("setup_seconds")?;
    let got = r
        .result
        .get("checksum")
        .and_then(|v| v.as_str())
        .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
        .ok_or_else(|| missing("checksum"))?;
    if got != want {
        return Err(BenchError::Checksum {
            config: c.name(),
            got,
            want,
        });
    }
    s.ns.push(ns);
    s.kvm.push(r.kvm_peak);
    s.setup_seconds.push(setup);
    s.memory = Some(spec.memory);
    let o = |v: Option<u64>| v.map_or_else(|| "n/a".into(), |v| v.to_string());
    Ok(format!(
        "{ns:.2} ns/access in a Linux guest (KVM peak pages_2m {}, pages_4k {}; guest THP {}; set-up {setup:.2} s, vmm {:.1} s)",
        o(r.kvm_peak.pages_2m),
        o(r.kvm_peak.pages_4k),
        spec.guest_thp.map_or("-", GuestThp::name),
        r.vmm_seconds
    ))
}

/// Whether KVM at `kvm_dev` offers 1G pages to guests (`pdpe1gb` in its
/// supported CPUID); `false` when it cannot be asked (the runs then fail
/// with their own error).
fn guest_gig_pages(kvm_dev: &std::path::Path) -> bool {
    crate::vm::open_kvm(kvm_dev)
        .ok()
        .and_then(|k| crate::cpuid::supported(&k).ok())
        .is_some_and(|c| crate::cpuid::has_pdpe1gb(&c))
}

/// Runs the benchmark; `progress` gets one line per run.
pub fn run(a: &TlbConfig, progress: &mut dyn FnMut(&str)) -> Result<TlbResults, BenchError> {
    let info = HostInfo::detect();
    let linux = a.guest == GuestChoice::Linux;
    if linux && (info.kind == HostKind::ParavirtShadow || a.kernel.is_none() || a.initrd.is_none())
    {
        return Err(BenchError::HostPrerequisite(linux_guest_unavailable(&info)));
    }
    check(a)?;
    let mut cfgs = plan::configs(&a.working_set, &a.guest_pages, &a.backing, a.native);
    let default_sets: Vec<u64> = fit::SMALL_SETS
        .iter()
        .chain(&fit::LARGE_SETS)
        .copied()
        .collect();
    if a.working_set == default_sets {
        let m = guest_mem::smaps::read_meminfo().unwrap_or_default();
        let room = fit::HostRoom {
            free_huge: m.free_2m(),
            available: guest_mem::smaps::read_mem_available().unwrap_or(0),
        };
        let (run, skipped) = fit::default_matrix(cfgs, room);
        for (c, why) in skipped {
            progress(&format!("skip: {}: {why}", c.name()));
        }
        cfgs = run;
    }
    // Guest 1G pages need pdpe1gb in the CPUID KVM offers (a shadow-paging
    // KVM may not offer it): those rows are skipped with the reason, the
    // native 1G rows still run.
    if cfgs
        .iter()
        .any(|c| c.backing.is_some() && c.guest_pages == GuestPageSize::Size1G)
        && !guest_gig_pages(&a.kvm_dev)
    {
        cfgs.retain(|c| {
            let skip = c.backing.is_some() && c.guest_pages == GuestPageSize::Size1G;
            if skip {
                progress(&format!(
                    "skip: {}: this KVM offers no pdpe1gb to guests (no 1 GiB guest pages)",
                    c.name()
                ));
            }
            !skip
        });
    }
    check_hugetlb_pool(&cfgs, linux)?;
    let host = HostDesc::detect(&info);
    let tsc = tsc::detect(&a.kvm_dev);
    progress(&format!("host: {}", host.line()));
    progress(&format!(
        "TSC {} kHz from {} (host TSC calibrated: {} kHz)",
        tsc.khz, tsc.source, tsc.calibrated_khz
    ));
    let started = Instant::now();
    let mut want = BTreeMap::new();
    for c in &cfgs {
        want.entry(c.working_set)
            .or_insert_with(|| guest_tlb::expected_checksum(&params(a, c.working_set)));
    }
    let mut samples: Vec<Samples> = cfgs.iter().map(|c| Samples::new(*c)).collect();
    let total = cfgs.len() * a.repeat as usize;
    let mut done = 0;
    for rep in 0..a.repeat {
        for (c, s) in cfgs.iter().zip(samples.iter_mut()) {
            let p = params(a, c.working_set);
            let line = one(a, c, &p, &tsc, want[&c.working_set], s)?;
            done += 1;
            progress(&format!(
                "[repeat {}/{} run {done}/{total}] {}: {line}",
                rep + 1,
                a.repeat,
                c.name()
            ));
        }
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    Ok(TlbResults {
        command,
        host,
        tsc,
        mode: a.mode,
        guest: if linux { "linux" } else { "test" }.into(),
        accesses: a.accesses,
        repeat: a.repeat,
        seed: a.seed,
        seconds: started.elapsed().as_secs_f64(),
        configs: summary::results(&samples),
    })
}

fn write(path: &Path, text: &str) -> Result<(), BenchError> {
    std::fs::write(path, text).map_err(|e| BenchError::Output {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// `vmm bench tlb`: run, print the table, write JSON / SVG.
pub fn run_cli(a: &TlbConfig) -> Result<(), BenchError> {
    crate::output_path::check_all([
        ("--json", a.json.as_deref()),
        ("--markdown", a.markdown.as_deref()),
        ("--svg", a.svg.as_deref()),
    ])
    .map_err(|e| BenchError::Usage(e.to_string()))?;
    let r = run(a, &mut |l| eprintln!("{l}"))?;
    // Files first: stdout may be a closed pipe.
    let written = write_outputs(a, &r);
    crate::stdout::print(&format!(
        "vmm bench tlb: mode {:?}, {} accesses, {} repeats, TSC {} kHz ({}), {:.1} s\n{}",
        r.mode,
        r.accesses,
        r.repeat,
        r.tsc.khz,
        r.tsc.source,
        r.seconds,
        summary::table(&r.configs)
    ));
    written
}

/// Write `--json`, `--markdown`, `--svg`.
fn write_outputs(a: &TlbConfig, r: &TlbResults) -> Result<(), BenchError> {
    if let Some(p) = &a.json {
        let text = serde_json::to_string_pretty(r).map_err(|e| BenchError::Output {
            path: p.clone(),
            why: e.to_string(),
        })?;
        write(p, &text)?;
    }
    if let Some(p) = &a.markdown {
        write(p, &summary::markdown_table(&r.configs))?;
    }
    if let Some(p) = &a.svg {
        let title = format!(
            "vmm bench tlb ({:?}, {} accesses, {} repeats): ns per access",
            r.mode, r.accesses, r.repeat
        )
        .to_lowercase();
        let svg = chart::svg(&r.configs, &title).map_err(|why| BenchError::Output {
            path: p.clone(),
            why,
        })?;
        write(p, &svg)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_guest_message_names_the_reason() {
        let pv = HostInfo::from_texts("flags : fpu\n", "N");
        assert!(linux_guest_unavailable(&pv).contains("paravirtual"));
        let hw = HostInfo::from_texts("flags : vmx\n", "Y");
        assert!(linux_guest_unavailable(&hw).contains("--kernel and --initrd"));
        let p = TlbParams {
            ws: 64 << 20,
            accesses: 1000,
            mode: guest_tlb::MODE_GUPS,
            seed: 5,
        };
        assert_eq!(linux_command(&p), "gups 67108864 1000 0x5");
        assert_eq!(linux_guest_memory(63 << 20), (64 + 192) << 20);
    }
}
