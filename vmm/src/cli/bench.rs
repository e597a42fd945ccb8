//! Options of `vmm bench` (clap), turned into a [`Bench`] configuration.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use guest_mem::Backing;

use super::KvmDevArg;
use vmm::bench::args::{
    Bench, GuestChoice, GuestThp, Mode, Spec, TlbConfig, WorkloadConfig, DEFAULT_ACCESSES,
};
use vmm::testguest::guests::tlb;
use vmm::testguest::GuestPageSize;

/// `vmm bench <kind>`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub bench: BenchKind,
}

/// The benchmarks.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchKind {
    /// TLB-heavy guest workloads by host backing and guest page size, against native.
    Tlb(TlbArgs),
    /// A user's command in a Linux guest, by host backing (guest init protocol:
    /// docs/ARCHITECTURE.md), with KVM's mapping counts sampled during each run.
    Workload(WorkloadArgs),
}

/// Options of `vmm bench workload`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "The initramfs must follow the guest init protocol (docs/ARCHITECTURE.md): CMD reaches it as vmm.run=<base64> on the kernel command line; it prints VMM-RESULT-BEGIN, CMD's output (RESULT key=value lines), VMM-RESULT-END rc=N wall_ns=N, then powers off. resources/initramfs/build.sh workload builds one with /bin/chase and /bin/gups.\n\nExit codes: 0 done, 1 internal error, 2 bad input or host prerequisite missing (e.g. a paravirtual shadow-paging host, where guest user space cannot make system calls; hugetlb pool too small), 4 the guest did not report (protocol) or CMD failed, 5 a run timed out"
)]
pub struct WorkloadArgs {
    /// Guest kernel (ELF vmlinux or bzImage).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initramfs following the guest init protocol.
    #[arg(long, value_name = "PATH")]
    pub initrd: PathBuf,
    /// The command the guest runs (a `sh -c` string), e.g. 'chase 64M 4000000'.
    #[arg(long, value_name = "CMD")]
    pub run: String,
    /// Host backings of guest RAM (comma-separated: 4k, thp, hugetlb).
    #[arg(long, value_name = "B,...", value_delimiter = ',', default_value = "4k,thp,hugetlb", value_parser = parse_backing)]
    pub backing: Vec<Backing>,
    /// The guest's THP mode (default: the guest kernel's own).
    #[arg(long, value_enum, value_name = "MODE")]
    pub guest_thp: Option<GuestThpArg>,
    /// Guest RAM size (K, M or G suffix; a multiple of 2M).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = super::parse_size)]
    pub memory: u64,
    /// Repeats of every backing (interleaved: the repeat loop is outermost).
    #[arg(long, value_name = "R", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
    /// Extra kernel command-line entries.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Write an SVG bar chart (medians relative to the `4k` backing) to this file.
    #[arg(long, value_name = "PATH")]
    pub svg: Option<PathBuf>,
    /// Stop a guest run (boot included) after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600.0, value_parser = super::parse_secs)]
    pub timeout: f64,
    /// KVM device node (hidden, for tests).
    #[command(flatten)]
    pub kvm: KvmDevArg,
}

/// Options of `vmm bench tlb`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Exit codes: 0 done, 1 internal error, 2 bad input or host prerequisite \
missing (e.g. hugetlb pool too small, --guest linux on a paravirtual host), \
4 a run returned a wrong checksum or failed, 5 a run timed out"
)]
pub struct TlbArgs {
    /// Working sets (comma-separated sizes with K, M or G suffix). In the
    /// default list, 4G, 8G and 16G run only where the host can back them
    /// (hugetlb pool for hugetlb guests and native 2M, available memory for
    /// the others); the rest are skipped with the reason.
    #[arg(long, value_name = "SIZE,...", value_delimiter = ',', default_value = "64M,512M,2G,4G,8G,16G", value_parser = super::parse_size)]
    pub working_set: Vec<u64>,
    /// Timed accesses per run.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_ACCESSES)]
    pub accesses: u64,
    /// Workload.
    #[arg(long, value_enum, default_value_t = ModeArg::Chase)]
    pub mode: ModeArg,
    /// Host backings of guest RAM (comma-separated: 4k, thp, hugetlb).
    #[arg(long, value_name = "B,...", value_delimiter = ',', default_value = "4k,thp,hugetlb", value_parser = parse_backing)]
    pub backing: Vec<Backing>,
    /// Guest page sizes (comma-separated: 4k, 2m, 1g; 1g with --guest test
    /// on a CPU with pdpe1gb).
    #[arg(long, value_name = "P,...", value_delimiter = ',', default_value = "4k,2m", value_parser = parse_guest_pages)]
    pub guest_pages: Vec<GuestPageSize>,
    /// Repeats of every configuration (interleaved: the repeat loop is outermost).
    #[arg(long, value_name = "R", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
    /// Also run the loop in a host thread on host memory of the same page size
    /// (4K: anonymous + MADV_NOHUGEPAGE; 2M: MAP_HUGETLB, else MADV_HUGEPAGE;
    /// 1G: MAP_HUGETLB of 1G pages, else as 2M).
    #[arg(long)]
    pub native: bool,
    /// Write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Write an SVG bar chart to this file.
    #[arg(long, value_name = "PATH")]
    pub svg: Option<PathBuf>,
    /// Write the table in Markdown to this file.
    #[arg(long, value_name = "PATH")]
    pub markdown: Option<PathBuf>,
    /// Where the loop runs.
    #[arg(long, value_enum, default_value_t = GuestChoiceArg::Test)]
    pub guest: GuestChoiceArg,
    /// Guest kernel of `--guest linux`.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs of `--guest linux`: the guest init protocol with /bin/chase and
    /// /bin/gups (`resources/initramfs/build.sh workload`).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// PRNG seed of the permutation / update stream (non-zero).
    #[arg(long, value_name = "N", default_value_t = tlb::DEFAULT_SEED)]
    pub seed: u64,
    /// Stop a guest run after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300.0, value_parser = super::parse_secs)]
    pub timeout: f64,
    /// KVM device node (hidden, for tests).
    #[command(flatten)]
    pub kvm: KvmDevArg,
}

impl From<BenchArgs> for Bench {
    fn from(a: BenchArgs) -> Self {
        match a.bench {
            BenchKind::Tlb(t) => Bench::Tlb(t.into()),
            BenchKind::Workload(w) => Bench::Workload(w.into()),
        }
    }
}

impl From<WorkloadArgs> for WorkloadConfig {
    fn from(a: WorkloadArgs) -> Self {
        WorkloadConfig {
            spec: Spec {
                kernel: a.kernel,
                initrd: a.initrd,
                run: a.run,
                backings: a.backing,
                guest_thp: a.guest_thp.map(Into::into),
                memory: a.memory,
                repeat: a.repeat,
                cmdline: a.cmdline,
                timeout: a.timeout,
                kvm_dev: a.kvm.kvm_dev,
            },
            json: a.json,
            svg: a.svg,
        }
    }
}

impl From<TlbArgs> for TlbConfig {
    fn from(a: TlbArgs) -> Self {
        TlbConfig {
            working_set: a.working_set,
            accesses: a.accesses,
            mode: a.mode.into(),
            backing: a.backing,
            guest_pages: a.guest_pages,
            repeat: a.repeat,
            native: a.native,
            json: a.json,
            svg: a.svg,
            markdown: a.markdown,
            guest: a.guest.into(),
            kernel: a.kernel,
            initrd: a.initrd,
            seed: a.seed,
            timeout: a.timeout,
            kvm_dev: a.kvm.kvm_dev,
        }
    }
}

// The value enums live with the benchmark (plain); their command-line
// spellings and help are these clap twins.

/// `--guest-thp` ([`GuestThp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuestThpArg {
    /// THP for every anonymous mapping.
    Always,
    /// THP only where the program asks (madvise).
    Madvise,
    /// No THP.
    Never,
}

impl From<GuestThpArg> for GuestThp {
    fn from(a: GuestThpArg) -> Self {
        match a {
            GuestThpArg::Always => GuestThp::Always,
            GuestThpArg::Madvise => GuestThp::Madvise,
            GuestThpArg::Never => GuestThp::Never,
        }
    }
}

/// `--mode` ([`Mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Dependent loads through a random cycle over all pages (latency).
    Chase,
    /// Random 8-byte XOR updates (GUPS-style, throughput).
    Gups,
}

impl From<ModeArg> for Mode {
    fn from(a: ModeArg) -> Self {
        match a {
            ModeArg::Chase => Mode::Chase,
            ModeArg::Gups => Mode::Gups,
        }
    }
}

/// `--guest` ([`GuestChoice`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuestChoiceArg {
    /// The built-in `tlb` test guest (no OS).
    Test,
    /// The static chase / gups programs in a Linux guest (needs guest user space;
    /// `--kernel`, `--initrd`; guest pages 4k / 2m = guest THP never / always).
    Linux,
}

impl From<GuestChoiceArg> for GuestChoice {
    fn from(a: GuestChoiceArg) -> Self {
        match a {
            GuestChoiceArg::Test => GuestChoice::Test,
            GuestChoiceArg::Linux => GuestChoice::Linux,
        }
    }
}

/// One item of a comma-separated `--backing` list (spaces allowed).
fn parse_backing(s: &str) -> Result<Backing, String> {
    super::parse_backing(s.trim())
}

/// One item of a comma-separated `--guest-pages` list (spaces allowed).
fn parse_guest_pages(s: &str) -> Result<GuestPageSize, String> {
    super::parse_guest_pages(s.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use vmm::testguest::GuestPageSize;

    fn tlb_args(extra: &[&str]) -> TlbArgs {
        let mut v = vec!["vmm", "bench", "tlb"];
        v.extend_from_slice(extra);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Bench(BenchArgs {
                bench: BenchKind::Tlb(t),
            }) => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_and_lists() {
        let t = tlb_args(&[]);
        assert_eq!(
            t.working_set,
            vec![64 << 20, 512 << 20, 2 << 30, 4 << 30, 8 << 30, 16 << 30]
        );
        assert_eq!(
            t.backing,
            vec![Backing::Small4k, Backing::Thp, Backing::Hugetlb]
        );
        assert_eq!(t.guest_pages.len(), 2);
        assert_eq!(t.repeat, 3);
        assert!(!t.native);
        let t = tlb_args(&[
            "--working-set",
            "16M",
            "--backing",
            "hugetlb,4k",
            "--guest-pages",
            "2m",
            "--native",
        ]);
        assert_eq!(t.working_set, vec![16 << 20]);
        assert_eq!(t.backing, vec![Backing::Hugetlb, Backing::Small4k]);
        assert_eq!(t.guest_pages, vec![GuestPageSize::Size2M]);
        assert!(t.native);
        assert!(Cli::try_parse_from(["vmm", "bench", "tlb", "--backing", "1g"]).is_err());
        assert!(Cli::try_parse_from(["vmm", "bench", "tlb", "--repeat", "0"]).is_err());
    }
}
