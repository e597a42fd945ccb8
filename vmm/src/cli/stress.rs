//! Options of `vmm stress` (clap), turned into a [`StressConfig`].

use std::path::PathBuf;

use clap::Args;
use guest_mem::Backing;

use super::{parse_backing, parse_secs, parse_size, KvmDevArg, SplitReserveArg};
use vmm::stress::events::{OpsMix, DEFAULT_MIX};
use vmm::stress::{InjectBug, StressConfig, EXIT_CODES};

/// Options of `vmm stress`.
#[derive(Debug, Clone, Args)]
#[command(after_help = EXIT_CODES)]
pub struct StressArgs {
    /// Guest RAM size: bytes, or with a K, M or G suffix.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub vcpus: u8,
    /// What backs guest RAM on the host.
    #[arg(long, value_name = "hugetlb|thp|4k", default_value = "hugetlb", value_parser = parse_backing)]
    pub backing: Backing,
    /// Fire events for this many seconds (default 10 when --ops is not given).
    #[arg(long, value_name = "SECS", conflicts_with = "ops", value_parser = parse_secs)]
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
    #[arg(long, value_name = "SECS", default_value_t = 2.5, value_parser = parse_secs)]
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
    /// Test only: a deliberate bug (skip-log, skip-discard, no-write-hold).
    #[arg(long, value_name = "BUG", hide = true)]
    pub inject_bug: Option<InjectBug>,
    /// The split reserve.
    #[command(flatten)]
    pub reserve: SplitReserveArg,
    /// KVM device node (hidden, for tests).
    #[command(flatten)]
    pub kvm: KvmDevArg,
}

fn parse_mix(s: &str) -> Result<OpsMix, String> {
    s.parse()
}

impl From<StressArgs> for StressConfig {
    fn from(a: StressArgs) -> Self {
        StressConfig {
            memory: a.memory,
            vcpus: a.vcpus,
            backing: a.backing,
            seconds: a.seconds,
            ops: a.ops,
            seed: a.seed,
            ops_mix: a.ops_mix,
            quiesce_every: a.quiesce_every,
            json: a.json,
            replay: a.replay,
            replay_out: a.replay_out,
            inject_bug: a.inject_bug,
            split_reserve: a.reserve.split_reserve,
            collapse_reserve: a.reserve.collapse_reserve,
            kvm_dev: a.kvm.kvm_dev,
        }
    }
}
