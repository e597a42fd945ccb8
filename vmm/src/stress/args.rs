//! Options of `vmm stress`.

use std::path::PathBuf;
use std::str::FromStr;

use clap::Args;
use guest_mem::Backing;
use serde::{Deserialize, Serialize};

use super::events::{OpsMix, DEFAULT_MIX};
use crate::cli::KvmDevArg;

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
}

impl FromStr for InjectBug {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "skip-log" => Ok(InjectBug::SkipLog),
            "skip-discard" => Ok(InjectBug::SkipDiscard),
            _ => Err(format!("unknown bug {s:?}; valid: skip-log, skip-discard")),
        }
    }
}

/// Options of `vmm stress`.
#[derive(Debug, Clone, Args)]
#[command(after_help = EXIT_CODES)]
pub struct StressArgs {
    /// Guest RAM size: bytes, or with a K, M or G suffix.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = crate::cli::parse_size)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub vcpus: u8,
    /// What backs guest RAM on the host.
    #[arg(long, value_name = "hugetlb|thp|4k", default_value = "hugetlb", value_parser = crate::cli::parse_backing)]
    pub backing: Backing,
    /// Fire events for this many seconds (default 10 when --ops is not given).
    #[arg(long, value_name = "SECS", conflicts_with = "ops", value_parser = crate::cli::parse_secs)]
    pub seconds: Option<f64>,
    /// Fire this many events.
    #[arg(long, value_name = "N")]
    pub ops: Option<u64>,
    /// Seed of the event sequence.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Weights per event kind, KIND=WEIGHT,... (kinds: discard4k, discard2m,
    /// split, collapse, wrprotect, dirtylog, slot, pageout). Split and
    /// collapse do not apply to --backing 4k.
    #[arg(long, value_name = "MIX", default_value = DEFAULT_MIX, value_parser = parse_mix)]
    pub ops_mix: OpsMix,
    /// Seconds between quiescent points (KVM's counters against the mirror).
    #[arg(long, value_name = "SECS", default_value_t = 2.5, value_parser = crate::cli::parse_secs)]
    pub quiesce_every: f64,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Re-run the host-side event sequence of a replay file.
    #[arg(long, value_name = "FILE")]
    pub replay: Option<PathBuf>,
    /// Where to write the replay file on a violation (default
    /// `stress-replay-seed<SEED>.json` in the current directory).
    #[arg(long, value_name = "PATH")]
    pub replay_out: Option<PathBuf>,
    /// Test only: a deliberate bug (skip-log, skip-discard).
    #[arg(long, value_name = "BUG", hide = true)]
    pub inject_bug: Option<InjectBug>,
    /// KVM device node (hidden, for tests).
    #[command(flatten)]
    pub kvm: KvmDevArg,
}

fn parse_mix(s: &str) -> Result<OpsMix, String> {
    s.parse()
}
