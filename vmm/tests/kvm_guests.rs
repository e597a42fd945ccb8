//! Built-in test guests on real KVM, checked against KVM's own statistics
//! (`--stats-json`) and the THP mirror's prediction.
//!
//! Tolerance: the mirror predicts KVM's mappings for memslot 0 with every gfn
//! touched. It may differ only in the frames of the test guest's reserved
//! region `[0, reserved_end)` (VMM boot page tables and GDT, the guest's code,
//! page tables and stacks: partly touched, and on shadow-paging hosts KVM
//! write-protects guest page-table pages so those frames map at 4K). The
//! report carries that frame count as `mirror.tolerance_frames`; the tests
//! assert it is small (at most 4 frames) and that KVM's `pages_2m` is within
//! it of the prediction.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::num;
use serde_json::Value;

const MAX_TOLERANCE_FRAMES: u64 = 4;

/// Why a guest of `memory_mib` MiB on `backing` cannot run here, if it cannot.
fn skip_reason(backing: &str, memory_mib: u64) -> Option<String> {
    common::skip_reason(backing, memory_mib / 2)
}

struct Run {
    code: Option<i32>,
    report: Value,
    stderr: String,
}

fn run_guest(name: &str, backing: &str, memory_mib: u64, extra: &[&str]) -> Run {
    let json: PathBuf = std::env::temp_dir().join(format!(
        "vmm-test-{}-{name}-{backing}-{}.json",
        std::process::id(),
        extra.join("_").replace(['/', '-'], "")
    ));
    let mem = format!("{memory_mib}M");
    let mut args = vec![
        "run",
        "--test-guest",
        name,
        "--backing",
        backing,
        "--memory",
        &mem,
        "--timeout",
        "120",
        "--serial",
        "/dev/null",
        "--stats-json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = Command::new(common::vmm_bin())
        .args(&args)
        .output()
        .expect("running vmm");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let report = common::read_json_or_null(&json);
    let _ = std::fs::remove_file(&json);
    Run {
        code: o.status.code(),
        report,
        stderr,
    }
}

/// Run the guest, or `None` (after saying why) when the host cannot.
fn run_or_skip(name: &str, backing: &str, memory_mib: u64, extra: &[&str]) -> Option<Run> {
    if let Some(why) = skip_reason(backing, memory_mib) {
        common::skip(&why);
        return None;
    }
    Some(run_guest(name, backing, memory_mib, extra))
}

/// [`run_or_skip`], and the run must exit 0.
fn run_ok(name: &str, backing: &str, memory_mib: u64, extra: &[&str]) -> Option<Run> {
    let r = run_or_skip(name, backing, memory_mib, extra)?;
    assert_eq!(
        r.code,
        Some(0),
        "stderr: {}\nreport: {:#}",
        r.stderr,
        r.report
    );
    Some(r)
}

/// KVM's `pages_2m` is within the mirror's tolerance of its prediction;
/// returns that tolerance (frames).
fn assert_2m_as_predicted(report: &Value) -> u64 {
    let tol = num(report, &["mirror", "tolerance_frames"]);
    let kvm_2m = num(report, &["kvm", "pages_2m"]);
    let pred_2m = num(report, &["mirror", "pages_2m"]);
    assert!(
        kvm_2m.abs_diff(pred_2m) <= tol,
        "KVM pages_2m {kvm_2m} vs mirror {pred_2m} (tolerance {tol} frames)"
    );
    tol
}

fn check_hello_huge(backing: &str) {
    let mib = 256;
    let Some(r) = run_ok("hello", backing, mib, &["--guest-pages", "2m"]) else {
        return;
    };
    let kvm_2m = num(&r.report, &["kvm", "pages_2m"]);
    let kvm_4k = num(&r.report, &["kvm", "pages_4k"]);
    assert!(kvm_2m > 0, "KVM mapped no 2M pages: {:#}", r.report);
    // hello writes every page of its work region.
    let frames = mib / 2;
    let work_frames = frames - num(&r.report, &["mirror", "tolerance_frames"]);
    assert!(num(&r.report, &["report_totals", "pages_touched"]) >= work_frames * 512);
    let tol = assert_2m_as_predicted(&r.report);
    assert!(
        tol <= MAX_TOLERANCE_FRAMES,
        "tolerance {tol} frames is too loose"
    );
    let pred_4k = num(&r.report, &["mirror", "pages_4k"]);
    assert!(
        kvm_4k <= pred_4k + 512 * tol,
        "KVM pages_4k {kvm_4k} vs mirror {pred_4k} (+512 x {tol})"
    );
}

#[test]
fn hello_hugetlb_maps_2m_as_the_mirror_predicts() {
    check_hello_huge("hugetlb");
}

#[test]
fn hello_thp_maps_2m_as_the_mirror_predicts() {
    check_hello_huge("thp");
}

#[test]
fn hello_4k_maps_no_2m() {
    let mib = 128;
    let Some(r) = run_ok("hello", "4k", mib, &["--guest-pages", "2m"]) else {
        return;
    };
    assert_eq!(num(&r.report, &["kvm", "pages_2m"]), 0, "{:#}", r.report);
    assert_eq!(num(&r.report, &["mirror", "pages_2m"]), 0);
    assert!(num(&r.report, &["kvm", "pages_4k"]) > 0);
}

#[test]
fn verify_two_vcpus_hugetlb_no_mismatches() {
    let mib = 128;
    let Some(r) = run_ok(
        "verify",
        "hugetlb",
        mib,
        &["--vcpus", "2", "--generations", "2"],
    ) else {
        return;
    };
    assert_eq!(num(&r.report, &["report_totals", "mismatches"]), 0);
    assert!(num(&r.report, &["report_totals", "pages_checked"]) > 0);
    // Both vCPUs checked their own slice.
    let checked_by: std::collections::BTreeSet<u64> = r.report["reports"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["key"].as_u64() == Some(3) && x["value"].as_u64() > Some(0))
        .map(|x| x["vcpu"].as_u64().unwrap())
        .collect();
    assert_eq!(checked_by, [0, 1].into_iter().collect(), "{:#}", r.report);
}

#[test]
fn fault_guest_is_a_test_failure() {
    let mib = 64;
    let Some(r) = run_or_skip("fault", "4k", mib, &[]) else {
        return;
    };
    assert_eq!(r.code, Some(4), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("exception"), "{}", r.stderr);
}

#[test]
fn unmap_two_vcpus_hugetlb_splits_with_vcpus_paused() {
    let mib = 64;
    let Some(r) = run_ok(
        "unmap",
        "hugetlb",
        mib,
        // Without the collapser the split frames stay split until the end
        // (vmm/tests/unmap_guest.rs covers split-then-collapse).
        &["--vcpus", "2", "--generations", "2", "--no-collapser"],
    ) else {
        return;
    };
    assert_eq!(num(&r.report, &["report_totals", "mismatches"]), 0);
    assert_eq!(num(&r.report, &["report_totals", "nonzero_discarded"]), 0);
    assert!(num(&r.report, &["report_totals", "pages_discarded"]) > 0);
    // Frames that lost a page are split to small pages on the host...
    assert!(num(&r.report, &["frames", "small"]) > 0, "{:#}", r.report);
    // ...and KVM maps them at 4K, as the mirror predicts.
    assert_2m_as_predicted(&r.report);
    assert_eq!(r.report["test_device_rejected"].as_u64(), Some(0));
}
