//! What `vmm stress` runs: [`StressConfig`] (plain; clap's `StressArgs` is
//! in `cli::stress`), the deliberate bugs and the exit codes.

use std::path::PathBuf;
use std::str::FromStr;

use guest_mem::Backing;
use serde::{Deserialize, Serialize};

use super::events::OpsMix;

/// Exit codes of `vmm stress`.
pub const EXIT_CODES: &str = "Exit codes:
  0  no violation: every check held
  1  internal VMM error
  2  bad input (CLI, files, host prerequisites)
  4  violation: stale read, lost write, guest-visible error, or KVM disagreeing with the mirror
     (the seed, the last events, the first bad gfn and a replay file are printed)";

/// A deliberate bug, to prove the checker catches it (tests only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InjectBug {
    /// Discard without writing the shared log first: the guest finds zeros
    /// where its data should be (a lost write, as far as it can tell).
    SkipLog,
    /// Write the shared log but skip the discard: the guest reads data from
    /// before the "discard" where zeros are due (a stale read).
    SkipDiscard,
    /// hugetlb: split a frame by copying it with the vCPUs running but
    /// without write-protecting it first: a guest write during the copy is
    /// lost with the huge page (a lost write).
    NoWriteHold,
}

impl FromStr for InjectBug {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "skip-log" => Ok(InjectBug::SkipLog),
            "skip-discard" => Ok(InjectBug::SkipDiscard),
            "no-write-hold" => Ok(InjectBug::NoWriteHold),
            _ => Err(format!(
                "unknown bug {s:?}; valid: skip-log, skip-discard, no-write-hold"
            )),
        }
    }
}

/// What `vmm stress` runs (the options of `vmm stress --help`, same names
/// and meaning; the CLI layer builds it from its clap struct).
#[derive(Debug, Clone)]
pub struct StressConfig {
    /// Guest RAM size in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// What backs guest RAM on the host.
    pub backing: Backing,
    /// Fire events for this many seconds (default 10 when --ops is not given).
    pub seconds: Option<f64>,
    /// Fire this many events.
    pub ops: Option<u64>,
    /// Seed of the event sequence.
    pub seed: u64,
    /// Weights per event kind, KIND=WEIGHT,... (kinds: discard4k, discard2m,
    /// split, collapse, wrprotect, dirtylog, slot, pageout). Split and
    /// collapse do not apply to --backing 4k.
    pub ops_mix: OpsMix,
    /// Seconds between quiescent points (KVM's counters against the mirror).
    pub quiesce_every: f64,
    /// Write the report as JSON to this file.
    pub json: Option<PathBuf>,
    /// Re-run the host-side event sequence of a replay file.
    pub replay: Option<PathBuf>,
    /// Where to write the replay file on a violation (default
    /// `stress-replay-seed<SEED>.json` in the current directory).
    pub replay_out: Option<PathBuf>,
    /// Test only: a deliberate bug (skip-log, skip-discard).
    pub inject_bug: Option<InjectBug>,
    /// Split blocks kept allocated ahead (`hugetlb` backings; 0 = none).
    pub split_reserve: u32,
    /// Huge pages kept allocated ahead for collapses (`hugetlb`; 0 = none).
    pub collapse_reserve: u32,
    /// KVM device node.
    pub kvm_dev: PathBuf,
}
