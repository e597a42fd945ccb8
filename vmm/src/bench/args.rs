//! What `vmm bench` runs: plain configurations (no clap; the CLI layer's
//! `cli::bench` builds them from its options) and their value enums.

use std::path::PathBuf;

use guest_mem::Backing;

use crate::testguest::guests::tlb;
use crate::testguest::GuestPageSize;

/// What `vmm bench workload` runs, whoever asked (`vmm bench workload`, or
/// `vmm bench tlb --guest linux`).
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Initramfs following the guest init protocol.
    pub initrd: PathBuf,
    /// The command (`sh -c` string).
    pub run: String,
    /// Host backings, in run order.
    pub backings: Vec<Backing>,
    /// The guest's THP mode, if set.
    pub guest_thp: Option<GuestThp>,
    /// Guest RAM bytes.
    pub memory: u64,
    /// Repeats.
    pub repeat: u32,
    /// Extra kernel command-line entries.
    pub cmdline: Option<String>,
    /// Seconds per run.
    pub timeout: f64,
    /// KVM device node.
    pub kvm_dev: PathBuf,
}

/// Default timed accesses per run of `vmm bench tlb`.
pub const DEFAULT_ACCESSES: u64 = 4_000_000;

/// Which benchmark `vmm bench` runs.
#[derive(Debug, Clone)]
pub enum Bench {
    /// `vmm bench tlb`.
    Tlb(TlbConfig),
    /// `vmm bench workload`.
    Workload(WorkloadConfig),
}

/// The guest's transparent huge page mode (`vmm.thp=`, written to
/// /sys/kernel/mm/transparent_hugepage/enabled by the guest's init).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestThp {
    /// THP for every anonymous mapping.
    Always,
    /// THP only where the program asks (madvise).
    Madvise,
    /// No THP.
    Never,
}

impl GuestThp {
    /// The sysfs word.
    pub fn name(self) -> &'static str {
        match self {
            GuestThp::Always => "always",
            GuestThp::Madvise => "madvise",
            GuestThp::Never => "never",
        }
    }
}

/// Workload of `vmm bench tlb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Dependent loads through a random cycle over all pages (latency).
    Chase,
    /// Random 8-byte XOR updates (GUPS-style, throughput).
    Gups,
}

impl Mode {
    /// The guest's `mode` argument.
    pub fn guest_arg(self) -> u64 {
        match self {
            Mode::Chase => tlb::MODE_CHASE,
            Mode::Gups => tlb::MODE_GUPS,
        }
    }
}

/// Where the loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestChoice {
    /// The built-in `tlb` test guest (no OS).
    Test,
    /// The static chase / gups programs in a Linux guest (needs guest user space;
    /// `--kernel`, `--initrd`; guest pages 4k / 2m = guest THP never / always).
    Linux,
}

/// What `vmm bench workload` runs: the runs ([`Spec`]) and where the
/// results go.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// The runs.
    pub spec: Spec,
    /// Write the results as JSON to this file.
    pub json: Option<PathBuf>,
    /// Write an SVG bar chart (medians relative to the `4k` backing) to this file.
    pub svg: Option<PathBuf>,
}

/// What `vmm bench tlb` runs (its options, same names and meaning).
#[derive(Debug, Clone)]
pub struct TlbConfig {
    /// Working sets in bytes.
    pub working_set: Vec<u64>,
    /// Timed accesses per run.
    pub accesses: u64,
    /// Workload.
    pub mode: Mode,
    /// Host backings of guest RAM, in run order.
    pub backing: Vec<Backing>,
    /// Guest page sizes.
    pub guest_pages: Vec<GuestPageSize>,
    /// Repeats of every configuration (interleaved: the repeat loop is outermost).
    pub repeat: u32,
    /// Also run the loop in a host thread on host memory of the same page size
    /// (4K: anonymous + MADV_NOHUGEPAGE; 2M: MAP_HUGETLB, else MADV_HUGEPAGE).
    pub native: bool,
    /// Write the results as JSON to this file.
    pub json: Option<PathBuf>,
    /// Write an SVG bar chart to this file.
    pub svg: Option<PathBuf>,
    /// Write the table in Markdown to this file.
    pub markdown: Option<PathBuf>,
    /// Where the loop runs.
    pub guest: GuestChoice,
    /// Guest kernel of `--guest linux`.
    pub kernel: Option<PathBuf>,
    /// Initramfs of `--guest linux`: the guest init protocol with /bin/chase and
    /// /bin/gups (`resources/initramfs/build.sh workload`).
    pub initrd: Option<PathBuf>,
    /// PRNG seed of the permutation / update stream (non-zero).
    pub seed: u64,
    /// Stop a guest run after this many seconds.
    pub timeout: f64,
    /// KVM device node.
    pub kvm_dev: PathBuf,
}
