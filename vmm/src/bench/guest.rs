//! One guest run of the `tlb` test guest through [`crate::run::run`].

use std::path::Path;
use std::time::Instant;

use guest_mem::Backing;

use crate::config::RunConfig;
use crate::exit_code;
use crate::stats::MappingStats;
use crate::testguest::device::ReportKey;
use crate::testguest::guests::tlb::{self, TlbParams};
use crate::testguest::{GuestPageSize, TestGuestName};

use super::error::BenchError;
use super::plan::{guest_memory, Config};

/// What one guest run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuestRun {
    /// TSC cycles of the timed loop.
    pub cycles: u64,
    /// Timed accesses the guest reports.
    pub accesses: u64,
    /// TSC cycles of set-up and warm-up.
    pub setup_cycles: u64,
    /// The guest's checksum.
    pub checksum: u64,
    /// KVM's mapping counters at the end of the run.
    pub kvm: MappingStats,
    /// Guest RAM size.
    pub memory: u64,
    /// Wall seconds of the whole run (VM creation to exit).
    pub seconds: f64,
}

/// The run configuration of a guest run (`vmm run`'s defaults otherwise).
pub fn run_config(
    p: &TlbParams,
    backing: Backing,
    pages: GuestPageSize,
    timeout: f64,
    kvm_dev: &Path,
) -> Result<RunConfig, BenchError> {
    Ok(RunConfig {
        test_guest: Some(TestGuestName::Tlb),
        memory: guest_memory(p.ws, pages)?,
        backing,
        guest_pages: pages,
        guest_args: vec![
            ("ws".into(), p.ws),
            ("accesses".into(), p.accesses),
            ("mode".into(), p.mode),
            ("seed".into(), p.seed),
        ],
        timeout: Some(timeout),
        kvm_dev: kvm_dev.to_path_buf(),
        ..RunConfig::default()
    })
}

/// Runs configuration `c` (which must have a backing) once.
pub fn run(
    c: &Config,
    p: &TlbParams,
    timeout: f64,
    kvm_dev: &Path,
) -> Result<GuestRun, BenchError> {
    let backing = c
        .backing
        .ok_or_else(|| BenchError::Usage("internal: a guest run needs a backing".into()))?;
    let args = run_config(p, backing, c.guest_pages, timeout, kvm_dev)?;
    let started = Instant::now();
    let rep = crate::run::run(&args).map_err(|source| BenchError::Run {
        config: c.name(),
        source,
    })?;
    let seconds = started.elapsed().as_secs_f64();
    if rep.exit_code != exit_code::OK {
        return Err(BenchError::GuestFailed {
            config: c.name(),
            outcome: rep.outcome.clone(),
            code: rep.exit_code,
        });
    }
    let get = |key: u64, name: &'static str| {
        rep.reports
            .iter()
            .rev()
            .find(|r| r.key == key)
            .map(|r| r.value)
            .ok_or_else(|| BenchError::MissingReport {
                config: c.name(),
                key: name,
            })
    };
    let run = GuestRun {
        cycles: get(ReportKey::Cycles as u64, "cycles")?,
        checksum: get(ReportKey::Checksum as u64, "checksum")?,
        accesses: get(tlb::KEY_ACCESSES, "accesses")?,
        setup_cycles: get(tlb::KEY_SETUP_CYCLES, "setup cycles")?,
        kvm: rep.kvm,
        memory: args.memory,
        seconds,
    };
    if run.accesses != p.accesses {
        return Err(BenchError::Checksum {
            config: format!("{} (accesses)", c.name()),
            got: run.accesses,
            want: p.accesses,
        });
    }
    Ok(run)
}
