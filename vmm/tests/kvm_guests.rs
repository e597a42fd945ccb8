//! Built-in test guests on real KVM, checked against KVM's own statistics
//! (`--stats-json`) and the THP mirror's prediction.
//!
//! No tolerance: the mirror knows the host's MMU (TDP or shadow), the gfns
//! holding guest page tables (write-tracked on the shadow MMU, so their frame
//! maps 4K) and what the guest touches; KVM's `pages_2m` must equal the
//! prediction and its `pages_4k` must lie in `[mirror.pages_4k,
//! mirror.pages_4k_max]` (equal for these guests: the bound is for `vmm stress`).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::num;
use serde_json::Value;

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

/// KVM's counters equal the mirror's prediction: `pages_2m` exactly,
/// `pages_4k` exactly (the prediction is exact for a finished test guest).
fn assert_as_predicted(report: &Value) {
    let kvm = (
        num(report, &["kvm", "pages_4k"]),
        num(report, &["kvm", "pages_2m"]),
    );
    let pred = (
        num(report, &["mirror", "pages_4k"]),
        num(report, &["mirror", "pages_2m"]),
    );
    assert_eq!(
        num(report, &["mirror", "pages_4k_max"]),
        pred.0,
        "a finished test guest's prediction is exact: {report:#}"
    );
    assert_eq!(
        kvm, pred,
        "KVM (pages_4k, pages_2m) vs the mirror: {report:#}"
    );
}

fn check_hello_huge(backing: &str) {
    let mib = 256;
    let Some(r) = run_ok("hello", backing, mib, &["--guest-pages", "2m"]) else {
        return;
    };
    assert!(
        num(&r.report, &["kvm", "pages_2m"]) > 0,
        "KVM mapped no 2M pages: {:#}",
        r.report
    );
    // hello writes every page of its work region (all frames but frame 0).
    let frames = mib / 2;
    assert_eq!(
        num(&r.report, &["report_totals", "pages_touched"]),
        (frames - 1) * 512
    );
    assert_as_predicted(&r.report);
    // The frame holding the guest's page tables maps 2M only on a TDP host.
    let shadow = r.report["host"]["kind"] == "ParavirtShadow";
    let expect_2m = if shadow { frames - 1 } else { frames };
    assert_eq!(
        num(&r.report, &["kvm", "pages_2m"]),
        expect_2m,
        "{:#}",
        r.report
    );
}

/// 4K guest pages: on the shadow MMU every leaf is 4K, and the reserved
/// region's code, data and stacks are mapped through two guest tables.
#[test]
fn hello_4k_guest_pages_hugetlb_as_predicted() {
    let Some(r) = run_ok(
        "hello",
        "hugetlb",
        128,
        &["--guest-pages", "4k", "--vcpus", "2"],
    ) else {
        return;
    };
    assert_as_predicted(&r.report);
}

/// 4K guest pages with the guest's 4K tables past the first 2M frame
/// (512 MiB and more: 1 MiB of tables per 512 MiB of RAM): vCPU 0 writes
/// them through the bootstrap 2M map before they are page tables, so on the
/// shadow MMU KVM maps each frame holding only such tables with one 2M
/// SPTE, which shadowing them later write-protects but keeps
/// (`account_shadowed`). The mirror must replay that order.
#[test]
fn hello_4k_guest_pages_with_tables_past_frame_0_as_predicted() {
    for mib in [512, 1024] {
        let Some(r) = run_ok("hello", "hugetlb", mib, &["--guest-pages", "4k"]) else {
            return;
        };
        assert_as_predicted(&r.report);
    }
}

/// 4K guest pages on the shadow MMU: code, data and stacks are mapped a
/// second time through the guest's 4K tables, but only the pages CPL3 runs
/// (not a page holding only CPL0 code: `unmap`'s exception stubs spill past
/// the first code page), and the IDT and TSS pages only once a later fault
/// next to them prefetches them (with one vCPU, the write of its status
/// after the workload: after every checkpoint). One vCPU: every checkpoint
/// is compared; two: the end.
#[test]
fn verify_and_unmap_4k_guest_pages_exact_at_every_checkpoint() {
    for (guest, vcpus) in [("verify", "1"), ("unmap", "1"), ("unmap", "2")] {
        let Some(r) = run_ok(
            guest,
            "hugetlb",
            256,
            &["--guest-pages", "4k", "--vcpus", vcpus],
        ) else {
            return;
        };
        if vcpus == "1" {
            common::assert_checkpoints_match_mirror(&r.report);
        }
        assert_as_predicted(&r.report);
    }
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
    assert!(num(&r.report, &["kvm", "pages_4k"]) > 0);
    assert_as_predicted(&r.report);
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

/// The `fault` guest ends in its exception (exit 4 whatever the mirror
/// says, so only its report can tell): with 4K guest pages the IDT and TSS
/// pages get their accessed bits from that exception, but no later fault
/// next to them prefetches them (no status write follows), so KVM never
/// maps them a second time. Both page sizes, exact.
#[test]
fn fault_guest_as_predicted_with_4k_and_2m_guest_pages() {
    for pages in ["4k", "2m"] {
        let Some(r) = run_or_skip("fault", "hugetlb", 256, &["--guest-pages", pages]) else {
            return;
        };
        assert_eq!(r.code, Some(4), "stderr: {}", r.stderr);
        assert_as_predicted(&r.report);
    }
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
        &["--vcpus", "2", "--no-collapser"],
    ) else {
        return;
    };
    assert_eq!(num(&r.report, &["report_totals", "mismatches"]), 0);
    assert_eq!(num(&r.report, &["report_totals", "nonzero_discarded"]), 0);
    assert!(num(&r.report, &["report_totals", "pages_discarded"]) > 0);
    // Frames that lost a page are split to small pages on the host...
    assert!(num(&r.report, &["frames", "small"]) > 0, "{:#}", r.report);
    // ...and KVM maps them at 4K, as the mirror predicts.
    assert_as_predicted(&r.report);
    assert_eq!(r.report["test_device_rejected"].as_u64(), Some(0));
}
