//! `tdp-host`: run one `vmm` command on the emulated AMD-V + NPT host (KVM's TDP MMU),
//! booted for this command with QEMU in software mode (`integration_tests::l1host`).
//!
//! ```sh
//! cargo run --release -p integration-tests --bin tdp-host -- run --test-guest hello --stats
//! ```
//!
//! Every argument that names an existing file on this machine (a kernel, an initramfs)
//! is copied into L1 at the same absolute path. The command's output is printed, and
//! `tdp-host` exits with the command's exit code (2 when the host lacks the L1 image
//! or QEMU, 1 when L1 did not finish).

use std::path::{Path, PathBuf};

use clap::Parser;
use integration_tests::l1host::{self, Batch, Image, Mode};

/// Run a `vmm` command on the emulated AMD-V + NPT host.
#[derive(Debug, Parser)]
#[command(name = "tdp-host", version)]
struct Args {
    /// The `vmm` binary to run inside L1 (default: the one next to this program, else
    /// `$VMM_BIN`).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Seconds the command may run inside L1 (emulated time is slow: a Linux guest
    /// needs about a minute to reach its /init).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Send the command's stdout to L1's own (slow, serial) console instead of
    /// capturing it; the console is printed at the end.
    #[arg(long)]
    console: bool,
    /// L1's RAM in MiB.
    #[arg(long, default_value_t = l1host::DEFAULT_MEMORY_MIB)]
    l1_memory: u32,
    /// 2M hugetlb pages L1 reserves for its guests.
    #[arg(long, default_value_t = l1host::DEFAULT_HUGEPAGES)]
    l1_hugepages: u32,
    /// 1G hugetlb pages L1 reserves at boot (for `--backing hugetlb-1g`).
    #[arg(long, default_value_t = 0)]
    l1_gigpages: u32,
    /// Take the arguments after `--` as one shell command line run in L1 (where
    /// `vmm` is `/bin/vmm`), instead of `vmm` arguments.
    #[arg(long)]
    shell: bool,
    /// The `vmm` arguments (after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    vmm_args: Vec<String>,
}

fn vmm_path(args: &Args) -> Option<PathBuf> {
    if let Some(p) = &args.vmm {
        return Some(p.clone());
    }
    if let Some(p) = std::env::var_os("VMM_BIN") {
        return Some(PathBuf::from(p));
    }
    let next_to_me = std::env::current_exe().ok()?.with_file_name("vmm");
    next_to_me.is_file().then_some(next_to_me)
}

fn main() {
    let args = Args::parse();
    let img = match Image::locate() {
        Ok(i) => i,
        Err(why) => {
            eprintln!("tdp-host: no L1 image: {why}");
            std::process::exit(2);
        }
    };
    let Some(vmm) = vmm_path(&args) else {
        eprintln!(
            "tdp-host: no vmm binary: build it (cargo build --release -p vmm) or pass --vmm PATH"
        );
        std::process::exit(2);
    };
    let mut batch = Batch {
        memory_mib: args.l1_memory,
        hugepages: args.l1_hugepages,
        gigpages: args.l1_gigpages,
        ..Batch::default()
    };
    for a in &args.vmm_args {
        let p = Path::new(a);
        if p.is_absolute() && p.is_file() {
            batch.file(a, p);
        } else if p.is_file() {
            if let Ok(abs) = std::fs::canonicalize(p) {
                eprintln!(
                    "tdp-host: pass {a} as an absolute path ({}) to copy it into L1",
                    abs.display()
                );
            }
        }
    }
    let mode = if args.console {
        Mode::Console
    } else {
        Mode::Capture
    };
    let line = if args.shell {
        args.vmm_args.join(" ")
    } else {
        std::iter::once("/bin/vmm".to_string())
            .chain(args.vmm_args.iter().map(|a| l1host::sh_quote(a)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    batch.command("cmd", args.timeout, mode, line);
    eprintln!(
        "tdp-host: booting L1 (QEMU TCG, -cpu max: AMD-V + NPT); deadline {} s",
        batch.deadline().as_secs()
    );
    let out = match l1host::run(&img, &vmm, &batch) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("tdp-host: {e}");
            std::process::exit(2);
        }
    };
    let t = &out.transcript;
    eprintln!(
        "tdp-host: L1 {} (kernel {}, npt={}, tdp_mmu={}); {:.0} s wall",
        if out.complete() {
            "finished"
        } else {
            "did not finish"
        },
        t.host_value("kernel").unwrap_or("?"),
        t.host_value("npt").unwrap_or("?"),
        t.host_value("tdp_mmu").unwrap_or("?"),
        out.wall.as_secs_f64()
    );
    if args.console {
        print!("{}", out.console);
    }
    match t.result("cmd") {
        Some(r) => {
            print!("{}", r.output);
            std::process::exit(r.rc.clamp(0, 255));
        }
        None => {
            eprintln!("tdp-host: the command did not finish.\n{}", out.diagnosis());
            std::process::exit(1);
        }
    }
}
