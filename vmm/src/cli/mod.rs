//! Command-line interface of the `vmm` binary (clap).

pub mod bench;
pub mod ctl;
pub mod stress;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use guest_mem::Backing;

use vmm::config::RunConfig;
use vmm::exit_code;
pub use vmm::parse::{parse_secs, parse_size};
use vmm::testguest::{GuestPageSize, TestGuestName};

/// A minimal KVM VMM whose guest RAM lives on 2M huge pages it manages itself.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a Linux kernel or run a built-in test guest.
    Run(RunArgs),
    /// Benchmarks (`vmm bench tlb`).
    Bench(bench::BenchArgs),
    /// mmu-notifier fault injection: host invalidations fired at a running
    /// checker guest; exits 4 on a stale read, lost write or mirror mismatch.
    Stress(stress::StressArgs),
    /// Control a running VM through its API socket (`vmm run --api-socket`).
    Ctl(ctl::CtlArgs),
}

/// Options of `vmm run`.
#[derive(Debug, Clone, Args)]
#[command(after_help = exit_code::TABLE)]
pub struct RunArgs {
    /// Kernel to boot: an x86-64 ELF vmlinux or a bzImage.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "test_guest",
        conflicts_with = "test_guest"
    )]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command-line entries, added after the defaults.
    #[arg(long, value_name = "STR", requires = "kernel")]
    pub cmdline: Option<String>,
    /// Guest RAM size: bytes, or with a K, M or G suffix (e.g. 512M, 2G,
    /// 16G). Up to 3 GiB lies below the 32-bit MMIO hole, the rest from
    /// 4 GiB up. Limit: what the host can back, since every page is
    /// populated at start (MemAvailable, plus free 2M hugetlb pages with
    /// --backing hugetlb), and at most 511 GiB (RAM ends at 512 GiB, what
    /// one page-directory pointer table of the test guests maps).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    pub memory: u64,
    /// Cut guest RAM into KVM memslots of at most SIZE (a 4K multiple; for
    /// tests). Default: one memslot per RAM region (below and above the
    /// hole), each 2M-aligned in guest-physical and host space. A size that
    /// is not a 2M multiple leaves partial 2M frames at slot edges, which
    /// KVM (and the mirror) map with 4K pages only.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memslot_size: Option<u64>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub vcpus: u8,
    /// What backs guest RAM on the host.
    #[arg(long, value_name = "hugetlb|thp|4k", default_value = "hugetlb", value_parser = parse_backing)]
    pub backing: Backing,
    /// Where the guest's serial console goes: `stdout` or a file path.
    #[arg(long, value_name = "stdout|PATH", default_value = "stdout")]
    pub serial: String,
    /// At exit, print KVM's pages_4k / pages_2m / pages_1g beside the THP
    /// mirror's prediction.
    #[arg(long)]
    pub stats: bool,
    /// Write the run's outcome and statistics as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub stats_json: Option<PathBuf>,
    /// Stop the guest after this many seconds (exit code 5; at most 1e9).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<f64>,
    /// Run a built-in test guest instead of a kernel (hello, verify, unmap, fault).
    #[arg(long, value_name = "NAME", value_parser = parse_test_guest)]
    pub test_guest: Option<TestGuestName>,
    /// Page size of the test guest's own page tables (1g: 1G pages for every
    /// whole GiB of RAM, 2M for the rest; the CPU must offer pdpe1gb).
    #[arg(long, value_name = "4k|2m|1g", default_value = "2m", value_parser = parse_guest_pages)]
    pub guest_pages: GuestPageSize,
    /// Generations of the `verify` test guest (default 2; the other guests
    /// take none).
    #[arg(long, value_name = "N", requires = "test_guest")]
    pub generations: Option<u32>,
    /// A test-guest argument KEY=VALUE (repeatable).
    #[arg(long = "guest-arg", value_name = "KEY=VALUE", value_parser = parse_guest_arg)]
    pub guest_args: Vec<(String, u64)>,
    /// Add a virtio-balloon (virtio-mmio at 0xd0000000, IRQ 5; Linux guests):
    /// pages the guest gives back split exactly their 2M frame.
    #[arg(long, requires = "kernel")]
    pub balloon: bool,
    /// Initial balloon target, set once the guest's driver is ready (e.g.
    /// 32M; 0, the default: start empty and inflate later with `vmm ctl balloon`).
    #[arg(long, value_name = "SIZE", requires = "balloon", value_parser = vmm::parse::parse_size_or_zero)]
    pub balloon_target: Option<u64>,
    /// Do not offer free page reporting (VIRTIO_BALLOON_F_REPORTING): only
    /// inflate/deflate give pages back.
    #[arg(long, requires = "balloon")]
    pub no_free_page_reporting: bool,
    /// When a 2M frame the guest gave back only in part is split: `deferred`
    /// (default) waits for later inflate buffers to complete it (then it is
    /// freed whole, without a split), see the two options below; `eager`
    /// splits it at once.
    #[arg(long, value_name = "eager|deferred", default_value = "deferred", value_parser = parse_balloon_split, requires = "balloon")]
    pub balloon_split: BalloonSplit,
    /// Deferred split: partly given-back frames are split once the guest has
    /// given nothing back for this long (its inflate paused or ended).
    #[arg(long, value_name = "MS", default_value_t = 500, value_parser = clap::value_parser!(u32).range(0..=600_000), requires = "balloon")]
    pub balloon_split_delay_ms: u32,
    /// Deferred split: the longest a given-back page stays backed on the host
    /// before its frame is split, whatever the guest does (default 1000:
    /// every page freed within about 1 s).
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=600_000), requires = "balloon")]
    pub balloon_split_max_wait_ms: u32,
    /// Serve runtime control on this Unix socket (`vmm ctl --api-socket PATH ...`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// No collapser: split frames stay split (test guests: no collapse at checkpoints).
    #[arg(long)]
    pub no_collapser: bool,
    /// Collapser wake-up interval (khugepaged's scan_sleep_millisecs; 0 = no
    /// background thread, test guests still collapse at checkpoints).
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub collapse_interval_ms: u32,
    /// Pages the collapser scans per wake-up, 512 per frame (khugepaged's pages_to_scan).
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub collapse_pages_to_scan: u32,
    /// Most pages of a frame that may be missing for a collapse (khugepaged's
    /// max_ptes_none; 0 = only frames whose pages are all present again; the
    /// kernel's 511 would refill every page the guest gave back).
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=511))]
    pub collapse_max_ptes_none: u32,
    /// The split reserve.
    #[command(flatten)]
    pub reserve: SplitReserveArg,
    /// The hidden `--kvm-dev`.
    #[command(flatten)]
    pub kvm: KvmDevArg,
}

/// `--split-reserve BLOCKS` and `--collapse-reserve PAGES` of the
/// subcommands that split and collapse frames.
#[derive(Debug, Clone, Args)]
pub struct SplitReserveArg {
    /// Blocks of small pages (2 MiB each) kept allocated ahead for splits
    /// on hugetlb backings, by a background thread, so a split does not
    /// allocate on its path (0 = none).
    #[arg(long, value_name = "BLOCKS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub split_reserve: u32,
    /// Huge pages kept allocated ahead for collapses on the hugetlb
    /// backing, by the same thread, at most one per split frame, so a
    /// collapse does not take (and the kernel zero) a huge page on its
    /// path (0 = none).
    #[arg(long, value_name = "PAGES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub collapse_reserve: u32,
}

/// The hidden `--kvm-dev PATH` option (env `VMM_KVM_DEV`) of the
/// subcommands that open KVM, flattened into their options.
#[derive(Debug, Clone, Args)]
pub struct KvmDevArg {
    /// KVM device node (for tests).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/dev/kvm",
        env = "VMM_KVM_DEV",
        hide = true
    )]
    pub kvm_dev: PathBuf,
}

pub use vmm::config::BalloonSplit;

impl From<RunArgs> for RunConfig {
    fn from(a: RunArgs) -> Self {
        RunConfig {
            kernel: a.kernel,
            initrd: a.initrd,
            cmdline: a.cmdline,
            memory: a.memory,
            memslot_size: a.memslot_size,
            vcpus: a.vcpus,
            backing: a.backing,
            serial: a.serial,
            stats: a.stats,
            stats_json: a.stats_json,
            timeout: a.timeout,
            test_guest: a.test_guest,
            guest_pages: a.guest_pages,
            generations: a.generations,
            guest_args: a.guest_args,
            balloon: a.balloon,
            balloon_target: a.balloon_target,
            no_free_page_reporting: a.no_free_page_reporting,
            balloon_split: a.balloon_split,
            balloon_split_delay_ms: a.balloon_split_delay_ms,
            balloon_split_max_wait_ms: a.balloon_split_max_wait_ms,
            api_socket: a.api_socket,
            no_collapser: a.no_collapser,
            collapse_interval_ms: a.collapse_interval_ms,
            collapse_pages_to_scan: a.collapse_pages_to_scan,
            collapse_max_ptes_none: a.collapse_max_ptes_none,
            split_reserve: a.reserve.split_reserve,
            collapse_reserve: a.reserve.collapse_reserve,
            kvm_dev: a.kvm.kvm_dev,
        }
    }
}

/// Parse `--balloon-split`.
pub fn parse_balloon_split(s: &str) -> Result<BalloonSplit, String> {
    match s.trim() {
        "eager" => Ok(BalloonSplit::Eager),
        "deferred" => Ok(BalloonSplit::Deferred),
        other => Err(format!(
            "unknown split policy {:?}: expected eager or deferred",
            vmm::api::protocol::prefix(other, 32)
        )),
    }
}

pub(crate) fn parse_backing(s: &str) -> Result<Backing, String> {
    s.parse::<Backing>().map_err(|e| e.to_string())
}

fn parse_test_guest(s: &str) -> Result<TestGuestName, String> {
    s.parse::<TestGuestName>().map_err(|e| e.to_string())
}

pub(crate) fn parse_guest_pages(s: &str) -> Result<GuestPageSize, String> {
    s.parse::<GuestPageSize>().map_err(|e| e.to_string())
}

fn parse_guest_arg(s: &str) -> Result<(String, u64), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("guest argument {s:?} must be KEY=VALUE"))?;
    let v = v.trim();
    let n = if let Some(h) = v.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else {
        v.parse().ok()
    };
    let n = n.ok_or_else(|| format!("guest argument {k}: value {v:?} is not a number"))?;
    Ok((k.trim().to_string(), n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn guest_args() {
        assert_eq!(parse_guest_arg("frames=3").unwrap(), ("frames".into(), 3));
        assert_eq!(parse_guest_arg("x=0x10").unwrap(), ("x".into(), 16));
        assert!(parse_guest_arg("x").is_err());
        assert!(parse_guest_arg("x=y").is_err());
    }

    fn run_config(argv: &[&str]) -> RunConfig {
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => RunConfig::from(a),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn run_config_defaults_are_the_cli_defaults() {
        let c = run_config(&[
            "vmm",
            "run",
            "--test-guest",
            "hello",
            "--kvm-dev",
            "/dev/kvm",
        ]);
        assert_eq!(
            c,
            RunConfig {
                test_guest: Some(TestGuestName::Hello),
                ..RunConfig::default()
            }
        );
        let k = run_config(&["vmm", "run", "--kernel", "/k", "--kvm-dev", "/dev/kvm"]);
        assert_eq!(
            k,
            RunConfig {
                kernel: Some("/k".into()),
                ..RunConfig::default()
            }
        );
    }

    #[test]
    fn guest_pages_1g_parses_and_a_bad_value_lists_the_choices() {
        let c = run_config(&["vmm", "run", "--test-guest", "hello", "--guest-pages", "1g"]);
        assert_eq!(c.guest_pages, GuestPageSize::Size1G);
        let e = Cli::try_parse_from(["vmm", "run", "--test-guest", "hello", "--guest-pages", "3m"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("valid: 4k, 2m, 1g"), "{e}");
    }

    #[test]
    fn cli_is_consistent_and_help_has_exit_codes() {
        Cli::command().debug_assert();
        let mut c = Cli::command();
        let run = c.find_subcommand_mut("run").unwrap();
        let help = run.render_long_help().to_string();
        assert!(help.contains("Exit codes"), "{help}");
        assert!(help.contains("5  timeout"));
    }
}
