//! A Linux guest's virtio-balloon driver gives back guest RAM that lives on 2M frames
//! (`hugetlb` and `thp` backings): each 4K page it inflates splits exactly its frame,
//! and the host gets the memory back (smaps); after the deflate the collapser makes
//! every frame huge again.
//!
//! The guest boots with `--balloon --balloon-target 32M` and the `spin` initramfs, whose
//! /init spins at CPL3 without system calls, so the kernel (and its balloon driver) keeps
//! running on either kind of host: on a paravirtual shadow-paging host guest user space
//! cannot make system calls (docs/ARCHITECTURE.md). The test follows the VM through its
//! API socket (`vmm ctl stats`) until the driver's `actual` reaches the target and checks
//! the live stats; then sets the target to 0 (`vmm ctl balloon 0`), waits for the deflate
//! and for the background collapser to make every frame huge again, stops the VM with
//! `vmm ctl stop` and checks the run report.
//! Boot takes ~2-3 minutes on the paravirtual host (the kernel's CPL0 code is emulated).

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::host::{hugepages_free, kvm_unavailable, shmem_thp_unavailable};
use integration_tests::images::{self, INITRD_SPIN, KERNEL, RUN_INIT_MARKER};
use integration_tests::json::num;
use integration_tests::skip;
use integration_tests::vmm_bin::{run_vmm, tail, vmm_bin};
use serde_json::Value;
use vmm::api::client::request;
use vmm::api::protocol::Request;

/// Guest RAM: 256 MiB = 128 frames of 2M.
const MEMORY: &str = "256M";
const MEMORY_HPAGES: u64 = 128;
/// The balloon target, and the same in 4K pages.
const TARGET: &str = "32M";
const TARGET_PAGES: u64 = 32 * 256;
/// How long the guest may take to boot and inflate.
const DEADLINE: Duration = Duration::from_secs(600);
const PAGE: u64 = 4096;

fn read_lossy(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// `vmm ctl ARGS` against the socket; its exit code and stdout.
fn ctl(sock: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut all: Vec<&std::ffi::OsStr> = vec!["ctl".as_ref(), "--api-socket".as_ref()];
    all.push(sock.as_os_str());
    all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    let r = run_vmm(all);
    (r.code(), r.stdout() + &r.stderr())
}

/// Kills the VM if the test fails before stopping it.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn linux_balloon_splits_hugetlb_frames_and_frees_host_memory() {
    balloon_cycle("hugetlb");
}

#[test]
fn linux_balloon_splits_thp_frames_and_frees_host_memory() {
    balloon_cycle("thp");
}

fn balloon_cycle(backing: &str) {
    if let Some(why) = kvm_unavailable() {
        skip!("{why}");
    }
    let kernel = match images::image(KERNEL) {
        Ok(p) => p,
        Err(why) => skip!("no test kernel: {why}"),
    };
    let initrd = match images::image(INITRD_SPIN) {
        Ok(p) => p,
        Err(why) => skip!("no spin initramfs: {why}"),
    };
    let free = hugepages_free();
    if backing == "hugetlb" && free < MEMORY_HPAGES {
        skip!(
            "{free} free hugetlb pages, {MEMORY_HPAGES} needed \
             (echo 1280 > /proc/sys/vm/nr_hugepages, or run resources/setup-host.sh)"
        );
    }
    if let Some(why) = shmem_thp_unavailable().filter(|_| backing == "thp") {
        skip!("{why}");
    }

    let tmp = std::env::temp_dir();
    let id = std::process::id();
    let sock = tmp.join(format!("vmm-linux-balloon-{backing}-{id}.sock"));
    let serial = tmp.join(format!("vmm-linux-balloon-{backing}-{id}.serial"));
    let json = tmp.join(format!("vmm-linux-balloon-{backing}-{id}.json"));
    let stderr_path = tmp.join(format!("vmm-linux-balloon-{backing}-{id}.stderr"));
    for p in [&sock, &serial, &json, &stderr_path] {
        let _ = std::fs::remove_file(p);
    }
    let started = Instant::now();
    let child = Command::new(vmm_bin())
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--memory", MEMORY, "--backing", backing])
        .args(["--balloon", "--balloon-target", TARGET])
        .args(["--collapse-interval-ms", "200"])
        .arg("--no-free-page-reporting")
        .arg("--api-socket")
        .arg(&sock)
        .arg("--serial")
        .arg(&serial)
        .arg("--stats-json")
        .arg(&json)
        .args(["--timeout", "900"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&stderr_path).expect("creating the stderr file"))
        .spawn()
        .expect("spawning vmm run");
    let mut vm = Vm(child);
    let diag = |why: &str| -> String {
        format!(
            "{why}\n--- last serial lines:\n{}\n--- vmm stderr:\n{}",
            tail(&read_lossy(&serial), 20),
            tail(&read_lossy(&stderr_path), 20)
        )
    };

    // Follow the VM until the driver reports the whole target inflated and the
    // kernel has started /init (so the spin loop keeps the guest alive).
    let mut last_progress = Instant::now();
    let settled: Value = loop {
        if let Ok(Some(status)) = vm.0.try_wait() {
            panic!("{}", diag(&format!("vmm run ended early: {status}")));
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{}",
            diag(&format!("balloon not at its target after {DEADLINE:?}"))
        );
        std::thread::sleep(Duration::from_secs(2));
        let Ok(stats) = request(&sock, &Request::Stats) else {
            continue; // the socket is not up yet
        };
        let stats = Value::Object(stats);
        let actual = stats["balloon"]["actual_pages"].as_u64().unwrap_or(0);
        let at_init = read_lossy(&serial).contains(RUN_INIT_MARKER);
        if last_progress.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "{:.0} s: balloon actual {actual} of {TARGET_PAGES} pages, /init started: {at_init}",
                started.elapsed().as_secs_f64()
            );
            last_progress = Instant::now();
        }
        if actual >= TARGET_PAGES && at_init {
            break stats;
        }
    };
    eprintln!(
        "settled after {:.1} s: {settled:#}",
        started.elapsed().as_secs_f64()
    );

    // The device and the driver agree; no guest input was rejected.
    let b = &settled["balloon"];
    assert_eq!(b["driver_active"], true, "{b:#}");
    assert_eq!(num(b, &["target_pages"]), TARGET_PAGES, "{b:#}");
    assert_eq!(num(b, &["actual_pages"]), TARGET_PAGES, "{b:#}");
    assert_eq!(num(b, &["inflated_pages"]), TARGET_PAGES, "{b:#}");
    assert_eq!(num(b, &["rejected"]), 0, "{b:#}");
    // Every inflated page was discarded on the host; frames were split for them and
    // each split frame is no longer a huge frame.
    let u = &settled["unmap"];
    assert_eq!(num(u, &["pages_discarded"]), TARGET_PAGES, "{u:#}");
    let split = num(u, &["frames_split"]);
    assert!(
        split > 0,
        "no frame split for {TARGET_PAGES} inflated pages: {u:#}"
    );
    let f = &settled["frames"];
    assert_eq!(
        num(f, &["huge"]) + num(f, &["small"]) + num(f, &["unpopulated"]),
        MEMORY_HPAGES,
        "{f:#}"
    );
    assert!(
        num(f, &["huge"]) <= MEMORY_HPAGES - split + num(u, &["frames_collapsed"]),
        "{f:#} {u:#}"
    );
    // The mirror never predicts a 2M mapping over a frame that is not huge on the host.
    if settled["mirror"].is_object() {
        assert!(
            num(&settled, &["mirror", "pages_2m"]) <= num(f, &["huge"]),
            "{settled:#}"
        );
    }

    // smaps while inflated: exactly the inflated pages left the host.
    let hm = &settled["host_memory"];
    let full = MEMORY_HPAGES * 2 * 1024 * 1024;
    assert_eq!(
        num(hm, &["total_bytes"]),
        full - TARGET_PAGES * PAGE,
        "smaps while inflated: {hm:#}"
    );
    // The frames that are not huge any more are not PMD-mapped on the host either
    // (smaps: Private_Hugetlb / ShmemPmdMapped).
    let not_huge = MEMORY_HPAGES - num(f, &["huge"]);
    assert_eq!(
        num(hm, &["pmd_mapped_bytes"]),
        full - not_huge * 2 * 1024 * 1024,
        "smaps while inflated: {hm:#} with {not_huge} frames not huge"
    );

    // Deflate: the driver takes every page back, the collapser makes the frames huge.
    let (code, out) = ctl(&sock, &["balloon", "0"]);
    assert_eq!(code, Some(0), "vmm ctl balloon 0: {out}");
    let deflate_started = Instant::now();
    let deflated: Value = loop {
        if let Ok(Some(status)) = vm.0.try_wait() {
            panic!(
                "{}",
                diag(&format!("vmm run ended during the deflate: {status}"))
            );
        }
        assert!(
            deflate_started.elapsed() < Duration::from_secs(300),
            "{}",
            diag("balloon not deflated and collapsed within 300 s")
        );
        std::thread::sleep(Duration::from_secs(1));
        let Ok(stats) = request(&sock, &Request::Stats) else {
            continue;
        };
        let stats = Value::Object(stats);
        if stats["balloon"]["actual_pages"].as_u64() == Some(0)
            && stats["frames"]["huge"].as_u64() == Some(MEMORY_HPAGES)
        {
            break stats;
        }
    };
    eprintln!(
        "deflated and collapsed in {:.1} s: {}",
        deflate_started.elapsed().as_secs_f64(),
        deflated["unmap"]
    );
    let u = &deflated["unmap"];
    assert_eq!(num(u, &["pages_refilled"]), TARGET_PAGES, "{u:#}");
    assert_eq!(num(u, &["frames_collapsed"]), split, "{u:#}");
    assert_eq!(num(&deflated, &["balloon", "rejected"]), 0);
    assert_eq!(
        num(&deflated, &["host_memory", "pmd_mapped_bytes"]),
        full,
        "every frame is on a huge page again: {:#}",
        deflated["host_memory"]
    );

    // Stop the VM through `vmm ctl`; the run report holds the host's view (smaps).
    let (code, out) = ctl(&sock, &["stop"]);
    assert_eq!(code, Some(0), "vmm ctl stop: {out}");
    let mut status = None;
    let stop_deadline = Instant::now() + Duration::from_secs(60);
    while status.is_none() && Instant::now() < stop_deadline {
        status = vm.0.try_wait().expect("waiting for vmm");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = status.unwrap_or_else(|| panic!("{}", diag("vmm run did not stop")));
    assert_eq!(status.code(), Some(0), "{}", diag("vmm run after ctl stop"));
    assert!(!sock.exists(), "the API socket was not removed");

    let report: Value = serde_json::from_str(&read_lossy(&json))
        .unwrap_or_else(|e| panic!("{}", diag(&format!("run report unreadable: {e}"))));
    let start = num(&report, &["host_memory_start", "total_bytes"]);
    let end = num(&report, &["host_memory_end", "total_bytes"]);
    eprintln!(
        "smaps: guest RAM {start} bytes at start, {} inflated, {end} at the end; {split} frames \
         split; split latency median {} us, vCPU pause median {} us, collapse median {} us",
        num(&settled, &["host_memory", "total_bytes"]),
        report["unmap"]["split_latency"]["median_us"],
        report["unmap"]["split_pause"]["median_us"],
        report["unmap"]["collapse_time"]["median_us"]
    );
    assert_eq!(start, full, "{:#}", report["host_memory_start"]);
    assert_eq!(end, full, "{:#}", report["host_memory_end"]);
    assert_eq!(num(&report, &["balloon", "inflated_total"]), TARGET_PAGES);
    assert_eq!(num(&report, &["balloon", "deflated_total"]), TARGET_PAGES);
    for p in [&serial, &json, &stderr_path] {
        let _ = std::fs::remove_file(p);
    }
}
