//! Free page reporting of a Linux guest on `hugetlb`: the guest's balloon driver reports
//! free runs of 2M and more (page_reporting, order >= pageblock_order); the VMM gives
//! each whole 2M frame of a run back to the host without a split: its hugetlb page goes
//! back to the host (smaps `Private_Hugetlb` drops by exactly 2M a frame) and no frame is
//! split. The frame stays mapped to its pool slot, so a frame the guest reuses faults a
//! fresh huge page in (counted huge again, not "released"). The guest boots with `--balloon` (no target) and the `spin` initramfs
//! ([`integration_tests::linux_vm`]), and is stopped with `vmm ctl stop`.

use std::time::Duration;

use integration_tests::json::num;
use integration_tests::linux_vm::{LinuxVm, FRAME, MEMORY_BYTES, MEMORY_FRAMES};
use integration_tests::skip;

#[test]
fn linux_free_page_reporting_frees_whole_hugetlb_frames_without_split() {
    let mut vm = match LinuxVm::start("linux-fpr", "hugetlb", &["--balloon"]) {
        Ok(vm) => vm,
        Err(why) => skip!("{why}"),
    };
    // Reports arrive ~2 s after free memory builds up; wait until /init runs and the
    // number of reported runs has not moved for two polls.
    let mut last = u64::MAX;
    let mut same = 0;
    let st = vm.wait_for(
        "free page reports to settle",
        Duration::from_secs(600),
        Duration::from_secs(3),
        |st, at_init| {
            let runs = st["balloon"]["reported_runs"].as_u64().unwrap_or(0);
            same = if runs == last { same + 1 } else { 0 };
            last = runs;
            at_init && runs > 0 && same >= 2
        },
    );
    eprintln!(
        "balloon {}\nunmap {}\nframes {}\nhost memory {}",
        st["balloon"], st["unmap"], st["frames"], st["host_memory"]
    );
    let b = &st["balloon"];
    assert_eq!(b["driver_active"], true, "{b:#}");
    assert_eq!(num(b, &["rejected"]), 0, "{b:#}");
    assert_eq!(
        num(b, &["inflated_total"]),
        0,
        "no target, no inflate: {b:#}"
    );
    let reported = num(b, &["reported_bytes"]);

    // Whole frames went back; none was split for it.
    let u = &st["unmap"];
    let freed = num(u, &["huge_frames_freed"]);
    assert!(
        freed > 0,
        "{reported} bytes reported, no frame freed: {u:#}"
    );
    assert!(freed * FRAME <= reported, "{u:#} {b:#}");
    assert_eq!(
        num(u, &["frames_split"]),
        0,
        "a report split a frame: {u:#}"
    );
    // A frame freed whole stays huge in the books, on its pool slot: its huge page
    // left the host ("released") until the guest touches the frame again, which
    // faults a fresh huge page in (so a reused frame is PMD-mapped again).
    let f = &st["frames"];
    assert_eq!(num(f, &["small"]), 0, "{f:#}");
    assert_eq!(num(f, &["unpopulated"]), 0, "{f:#}");
    assert_eq!(num(f, &["huge"]), MEMORY_FRAMES, "{f:#}");
    let released = num(f, &["released"]);
    assert!(released > 0 && released <= freed, "{f:#} {u:#}");
    // smaps: the hugetlb pages of exactly the released frames are off the host.
    let hm = &st["host_memory"];
    assert_eq!(
        num(hm, &["hugetlb_bytes"]),
        MEMORY_BYTES - released * FRAME,
        "{hm:#}"
    );
    // The pool's books keep every slot (the frames are mapped to them); its memfd
    // holds the pages on the host.
    let pool = &st["pool"];
    assert_eq!(num(pool, &["used"]), MEMORY_FRAMES, "{pool:#}");
    assert_eq!(
        num(pool, &["pool_memfd_bytes"]),
        MEMORY_BYTES - released * FRAME,
        "{pool:#}"
    );
    let g = &st["balloon"]["give_back"];
    assert_eq!(num(g, &["whole_frames_freed"]), freed, "{g:#}");
    assert_eq!(num(g, &["frames_split"]), 0, "{g:#}");

    let report = vm.stop();
    assert_eq!(
        num(&report, &["host_memory_start", "hugetlb_bytes"]),
        MEMORY_BYTES
    );
}
