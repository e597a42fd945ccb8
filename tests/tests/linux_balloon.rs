//! A Linux guest's virtio-balloon driver gives back guest RAM that lives on 2M frames
//! (`hugetlb` and `thp` backings): each 4K page it inflates splits exactly its frame,
//! and the host gets the memory back (smaps); after the deflate the collapser makes
//! every frame huge again.
//!
//! The guest boots with `--balloon --balloon-target 32M` and the `spin` initramfs
//! ([`integration_tests::linux_vm`]). The test follows the VM through its API socket
//! (`vmm ctl stats`) until the driver's `actual` reaches the target and checks the live
//! stats; then sets the target to 0 (`vmm ctl balloon 0`), waits for the deflate and for
//! the background collapser to make every frame huge again, stops the VM with
//! `vmm ctl stop` and checks the run report.
//! Boot takes 1-3 minutes on the paravirtual host (the kernel's CPL0 code is emulated).

use std::time::Duration;

use integration_tests::json::num;
use integration_tests::linux_vm::{LinuxVm, FRAME, MEMORY_BYTES, MEMORY_FRAMES};
use integration_tests::skip;

/// The balloon target, and the same in 4K pages.
const TARGET: &str = "32M";
const TARGET_PAGES: u64 = 32 * 256;
const PAGE: u64 = 4096;

#[test]
fn linux_balloon_splits_hugetlb_frames_and_frees_host_memory() {
    balloon_cycle("hugetlb");
}

#[test]
fn linux_balloon_splits_thp_frames_and_frees_host_memory() {
    balloon_cycle("thp");
}

fn balloon_cycle(backing: &str) {
    let extra = [
        "--balloon",
        "--balloon-target",
        TARGET,
        "--collapse-interval-ms",
        "200",
        "--no-free-page-reporting",
    ];
    let mut vm = match LinuxVm::start("linux-balloon", backing, &extra) {
        Ok(vm) => vm,
        Err(why) => skip!("{why}"),
    };
    // The whole target inflated, and the kernel has started /init (so the spin loop
    // keeps the guest alive).
    let settled = vm.wait_for(
        "the balloon at its target",
        Duration::from_secs(600),
        Duration::from_secs(2),
        |st, at_init| at_init && st["balloon"]["actual_pages"].as_u64() >= Some(TARGET_PAGES),
    );
    eprintln!("settled: {settled:#}");

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
        MEMORY_FRAMES,
        "{f:#}"
    );
    assert!(
        num(f, &["huge"]) <= MEMORY_FRAMES - split + num(u, &["frames_collapsed"]),
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
    let full = MEMORY_BYTES;
    assert_eq!(
        num(hm, &["total_bytes"]),
        full - TARGET_PAGES * PAGE,
        "smaps while inflated: {hm:#}"
    );
    // The frames that are not huge any more are not PMD-mapped on the host either
    // (smaps: Private_Hugetlb / ShmemPmdMapped).
    let not_huge = MEMORY_FRAMES - num(f, &["huge"]);
    assert_eq!(
        num(hm, &["pmd_mapped_bytes"]),
        full - not_huge * FRAME,
        "smaps while inflated: {hm:#} with {not_huge} frames not huge"
    );

    // Deflate: the driver takes every page back, the collapser makes the frames huge.
    let (code, out) = vm.ctl(&["balloon", "0"]);
    assert_eq!(code, Some(0), "vmm ctl balloon 0: {out}");
    let deflate_started = vm.elapsed();
    let deflated = vm.wait_for(
        "the deflate and the collapse of every frame",
        Duration::from_secs(300),
        Duration::from_secs(1),
        |st, _| {
            st["balloon"]["actual_pages"].as_u64() == Some(0)
                && st["frames"]["huge"].as_u64() == Some(MEMORY_FRAMES)
        },
    );
    eprintln!(
        "deflated and collapsed in {:.1} s: {}",
        vm.elapsed() - deflate_started,
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
    let report = vm.stop();
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
}
