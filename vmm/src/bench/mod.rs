//! `vmm bench`: benchmarks of guest workloads against native.
//!
//! `vmm bench tlb` runs the `tlb` test guest (a CPL3 pointer chase or GUPS
//! loop, see [`crate::testguest::guests::tlb`]) for every combination of
//! working set, host backing and guest page size, optionally the same loop in
//! a host thread on host memory of the guest's page size (`--native`), and
//! reports ns per access, slowdown versus native and KVM's `pages_2m` /
//! `pages_4k` at the end of each run.
//!
//! | module | job |
//! |---|---|
//! | [`args`] | the command-line options |
//! | [`error`] | [`BenchError`] and its exit codes |
//! | [`plan`] | configurations, guest memory sizing, run order |
//! | [`guest`] | one guest run through [`crate::run::run`] |
//! | [`native`] | the same loop on host memory |
//! | [`tsc`] | TSC frequency (KVM_GET_TSC_KHZ, calibrated fallback) |
//! | [`hostdesc`] | host description for the results |
//! | [`summary`] | statistics, the results file and the text table |
//! | [`chart`] | the SVG bar charts of `tlb` and `workload` (plotters) |
//! | [`tlb`] | the `tlb` benchmark driver |
//! | [`protocol`] | the guest init protocol (command in, results out) |
//! | [`workload`] | the `workload` benchmark driver (a Linux guest's own command) |

pub mod args;
pub mod chart;
pub mod error;
pub mod fit;
pub mod guest;
pub mod hostdesc;
pub mod native;
pub mod plan;
pub mod protocol;
pub mod summary;
pub mod tlb;
pub mod tsc;
pub mod workload;

pub use args::{Bench, TlbConfig, WorkloadConfig};
pub use error::BenchError;

/// Runs `vmm bench ...`; prints results and errors; returns the exit code.
pub fn run_cli(bench: &Bench) -> i32 {
    let r = match bench {
        Bench::Tlb(t) => tlb::run_cli(t),
        Bench::Workload(w) => workload::run_cli(w),
    };
    match r {
        Ok(()) => crate::exit_code::OK,
        Err(e) => {
            eprintln!("vmm bench: error: {e}");
            e.exit_code()
        }
    }
}
