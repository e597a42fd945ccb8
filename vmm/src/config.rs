//! What a `vmm run` builds and runs: a plain configuration, no clap.
//!
//! The CLI layer (`cli/` in the binary) parses `vmm run` options into its clap struct
//! and turns them into a [`RunConfig`] (`From<RunArgs>`); `bench` builds one
//! directly. Everything below takes this struct or plain values, never the
//! clap struct.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use guest_mem::{Backing, SplitPolicy};

use crate::testguest::{GuestPageSize, TestGuestName};

/// When a 2M frame the guest gave back only in part is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalloonSplit {
    /// Split a partly given-back frame at once.
    Eager,
    /// Queue it; split it after the delay (or the longest wait).
    Deferred,
}

/// Everything `run::run` needs (the fields of `vmm run --help`, same names
/// and meaning). [`Default`] is `vmm run`'s defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// Kernel to boot (ELF vmlinux or bzImage); `None` with a test guest.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command-line entries, added after the defaults.
    pub cmdline: Option<String>,
    /// Guest RAM size in bytes (checked by `guest_mem::check_ram_size`).
    pub memory: u64,
    /// Cut guest RAM into KVM memslots of at most this many bytes (tests);
    /// `None`: one memslot per RAM region.
    pub memslot_size: Option<u64>,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// What backs guest RAM on the host.
    pub backing: Backing,
    /// Where the guest's serial console goes: `stdout` or a file path.
    pub serial: String,
    /// Print KVM's counters beside the mirror's prediction at exit.
    pub stats: bool,
    /// Write the run report as JSON to this file.
    pub stats_json: Option<PathBuf>,
    /// Stop the guest after this many seconds.
    pub timeout: Option<f64>,
    /// Run this built-in test guest instead of a kernel.
    pub test_guest: Option<TestGuestName>,
    /// Page size of the test guest's own page tables.
    pub guest_pages: GuestPageSize,
    /// Generations of the `verify` test guest.
    pub generations: Option<u32>,
    /// Test-guest arguments KEY=VALUE, in the order given (a key given twice
    /// is refused by the run's checks).
    pub guest_args: Vec<(String, u64)>,
    /// Add a virtio-balloon.
    pub balloon: bool,
    /// Initial balloon target in bytes.
    pub balloon_target: Option<u64>,
    /// Do not offer free page reporting.
    pub no_free_page_reporting: bool,
    /// When a partly given-back frame is split.
    pub balloon_split: BalloonSplit,
    /// Deferred split: quiet time before a split, in ms.
    pub balloon_split_delay_ms: u32,
    /// Deferred split: longest wait before a split, in ms.
    pub balloon_split_max_wait_ms: u32,
    /// Serve runtime control on this Unix socket.
    pub api_socket: Option<PathBuf>,
    /// No collapser.
    pub no_collapser: bool,
    /// Collapser wake-up interval in ms (0 = no background thread).
    pub collapse_interval_ms: u32,
    /// Pages the collapser scans per wake-up.
    pub collapse_pages_to_scan: u32,
    /// Most pages of a frame that may be missing for a collapse.
    pub collapse_max_ptes_none: u32,
    /// Split blocks (2 MiB of small pages each) kept allocated ahead on
    /// `hugetlb` backings (0 = none: a split allocates its pages itself).
    pub split_reserve: u32,
    /// Huge pages kept allocated ahead for collapses on `hugetlb` (at most
    /// one per split frame; 0 = none: a collapse allocates its page).
    pub collapse_reserve: u32,
    /// KVM device node.
    pub kvm_dev: PathBuf,
}

impl Default for RunConfig {
    /// `vmm run`'s defaults (a test in the binary's `cli` keeps the two equal).
    fn default() -> Self {
        RunConfig {
            kernel: None,
            initrd: None,
            cmdline: None,
            memory: 512 << 20,
            memslot_size: None,
            vcpus: 1,
            backing: Backing::Hugetlb,
            serial: "stdout".into(),
            stats: false,
            stats_json: None,
            timeout: None,
            test_guest: None,
            guest_pages: GuestPageSize::Size2M,
            generations: None,
            guest_args: Vec::new(),
            balloon: false,
            balloon_target: None,
            no_free_page_reporting: false,
            balloon_split: BalloonSplit::Deferred,
            balloon_split_delay_ms: 500,
            balloon_split_max_wait_ms: 1000,
            api_socket: None,
            no_collapser: false,
            collapse_interval_ms: 10_000,
            collapse_pages_to_scan: 4096,
            collapse_max_ptes_none: 0,
            split_reserve: 4,
            collapse_reserve: 1,
            kvm_dev: "/dev/kvm".into(),
        }
    }
}

impl RunConfig {
    /// The balloon's split policy from `balloon_split` and its delays.
    pub fn split_policy(&self) -> SplitPolicy {
        match self.balloon_split {
            BalloonSplit::Eager => SplitPolicy::Eager,
            BalloonSplit::Deferred => SplitPolicy::Deferred {
                delay: Duration::from_millis(u64::from(self.balloon_split_delay_ms)),
                max_wait: Duration::from_millis(u64::from(self.balloon_split_max_wait_ms)),
            },
        }
    }

    /// The guest arguments as a map.
    pub fn guest_arg_map(&self) -> BTreeMap<String, u64> {
        self.guest_args.iter().cloned().collect()
    }
}
