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

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

const MAX_TOLERANCE_FRAMES: u64 = 4;

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Free 2M hugetlb pages, if the default huge page size is 2M.
fn hugetlb_free() -> u64 {
    if meminfo("Hugepagesize:") != Some(2048) {
        return 0;
    }
    meminfo("HugePages_Free:").unwrap_or(0)
}

fn shmem_thp_enabled() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .map(|s| {
            ["[always]", "[advise]", "[within_size]", "[force]"]
                .iter()
                .any(|m| s.contains(m))
        })
        .unwrap_or(false)
}

/// Why this test cannot run here, if it cannot.
fn skip_reason(backing: &str, memory_mib: u64) -> Option<String> {
    if !kvm_usable() {
        return Some("/dev/kvm is not usable".into());
    }
    match backing {
        "hugetlb" => {
            let free = hugetlb_free();
            (free < memory_mib / 2).then(|| {
                format!(
                    "hugetlb: {free} free 2M pages, need {} (echo N > /proc/sys/vm/nr_hugepages)",
                    memory_mib / 2
                )
            })
        }
        "thp" => (!shmem_thp_enabled()).then(|| {
            "shmem THP disabled (echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled)".into()
        }),
        _ => None,
    }
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
    let o = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(&args)
        .output()
        .expect("running vmm");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let report = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let _ = std::fs::remove_file(&json);
    Run {
        code: o.status.code(),
        report,
        stderr,
    }
}

fn num(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("no number at {path:?} in {v:#}"))
}

fn check_hello_huge(backing: &str) {
    let mib = 256;
    if let Some(why) = skip_reason(backing, mib) {
        eprintln!("skip: {why}");
        return;
    }
    let r = run_guest("hello", backing, mib, &["--guest-pages", "2m"]);
    assert_eq!(
        r.code,
        Some(0),
        "stderr: {}\nreport: {:#}",
        r.stderr,
        r.report
    );
    let kvm_2m = num(&r.report, &["kvm", "pages_2m"]);
    let kvm_4k = num(&r.report, &["kvm", "pages_4k"]);
    assert!(kvm_2m > 0, "KVM mapped no 2M pages: {:#}", r.report);
    // hello writes every page of its work region.
    let frames = mib / 2;
    let work_frames = frames - num(&r.report, &["mirror", "tolerance_frames"]);
    assert!(num(&r.report, &["report_totals", "pages_touched"]) >= work_frames * 512);
    let tol = num(&r.report, &["mirror", "tolerance_frames"]);
    assert!(
        tol <= MAX_TOLERANCE_FRAMES,
        "tolerance {tol} frames is too loose"
    );
    let pred_2m = num(&r.report, &["mirror", "pages_2m"]);
    let pred_4k = num(&r.report, &["mirror", "pages_4k"]);
    assert!(
        kvm_2m.abs_diff(pred_2m) <= tol,
        "KVM pages_2m {kvm_2m} vs mirror {pred_2m} (tolerance {tol} frames)"
    );
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
    if let Some(why) = skip_reason("4k", mib) {
        eprintln!("skip: {why}");
        return;
    }
    let r = run_guest("hello", "4k", mib, &["--guest-pages", "2m"]);
    assert_eq!(
        r.code,
        Some(0),
        "stderr: {}\nreport: {:#}",
        r.stderr,
        r.report
    );
    assert_eq!(num(&r.report, &["kvm", "pages_2m"]), 0, "{:#}", r.report);
    assert_eq!(num(&r.report, &["mirror", "pages_2m"]), 0);
    assert!(num(&r.report, &["kvm", "pages_4k"]) > 0);
}

#[test]
fn verify_two_vcpus_hugetlb_no_mismatches() {
    let mib = 128;
    if let Some(why) = skip_reason("hugetlb", mib) {
        eprintln!("skip: {why}");
        return;
    }
    let r = run_guest(
        "verify",
        "hugetlb",
        mib,
        &["--vcpus", "2", "--generations", "2"],
    );
    assert_eq!(
        r.code,
        Some(0),
        "stderr: {}\nreport: {:#}",
        r.stderr,
        r.report
    );
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
    if let Some(why) = skip_reason("4k", mib) {
        eprintln!("skip: {why}");
        return;
    }
    let r = run_guest("fault", "4k", mib, &[]);
    assert_eq!(r.code, Some(4), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("exception"), "{}", r.stderr);
}

#[test]
fn unmap_two_vcpus_hugetlb_splits_with_vcpus_paused() {
    let mib = 64;
    if let Some(why) = skip_reason("hugetlb", mib) {
        eprintln!("skip: {why}");
        return;
    }
    let r = run_guest(
        "unmap",
        "hugetlb",
        mib,
        &["--vcpus", "2", "--generations", "2"],
    );
    assert_eq!(
        r.code,
        Some(0),
        "stderr: {}\nreport: {:#}",
        r.stderr,
        r.report
    );
    assert_eq!(num(&r.report, &["report_totals", "mismatches"]), 0);
    assert_eq!(num(&r.report, &["report_totals", "nonzero_discarded"]), 0);
    assert!(num(&r.report, &["report_totals", "pages_discarded"]) > 0);
    // Frames that lost a page are split to small pages on the host...
    assert!(num(&r.report, &["frames", "small"]) > 0, "{:#}", r.report);
    // ...and KVM maps them at 4K, as the mirror predicts.
    let tol = num(&r.report, &["mirror", "tolerance_frames"]);
    let kvm_2m = num(&r.report, &["kvm", "pages_2m"]);
    let pred_2m = num(&r.report, &["mirror", "pages_2m"]);
    assert!(
        kvm_2m.abs_diff(pred_2m) <= tol,
        "KVM {kvm_2m} vs mirror {pred_2m}"
    );
    assert_eq!(r.report["test_device_rejected"].as_u64(), Some(0));
}
