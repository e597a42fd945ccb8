//! Guest-driven partial unmap end to end: the `unmap` test guest gives one 4K
//! page of each of K = 8 frames back, checks every byte, takes the pages back
//! and re-stamps. At the checkpoint after the take-back the VMM's collapser
//! runs one full pass (deterministic), so:
//!
//! * phase 1 → 2: KVM's `pages_2m` drops by exactly K (each split frame is
//!   mapped with 4K pages on the host), every other frame stays 2M, and the
//!   THP mirror predicts the same drop;
//! * phase 4: the collapser collapses exactly the K frames;
//! * phase 5: `pages_2m` is back at its phase-1 value;
//! * the guest saw no changed byte in the pages it kept (mismatches = 0).
//!
//! Also: the API socket (`vmm ctl`) against a running guest.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::num;
use serde_json::Value;

const K: u64 = 8;
const MIB: u64 = 64;

fn skip_reason(backing: &str) -> Option<String> {
    common::skip_reason(backing, MIB / 2)
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-unmap-{}-{name}", std::process::id()))
}

fn run_unmap(backing: &str, reserve: &str) -> Value {
    let memory = format!("{MIB}M");
    let (report, stdout) = common::run_with_report(
        &format!("unmap-{backing}-reserve{reserve}"),
        &[
            "run",
            "--split-reserve",
            reserve,
            "--collapse-reserve",
            reserve,
            "--test-guest",
            "unmap",
            "--backing",
            backing,
            "--memory",
            &memory,
            "--serial",
            "/dev/null",
            "--timeout",
            "120",
            "--stats",
        ],
    );
    assert!(
        stdout.contains("checkpoints"),
        "--stats shows the checkpoints:\n{stdout}"
    );
    report
}

fn phase(r: &Value, p: u64) -> &Value {
    r["checkpoints"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["phase"].as_u64() == Some(p)))
        .unwrap_or_else(|| panic!("no checkpoint {p} in {r:#}"))
}

/// `reserve`: `--split-reserve` and `--collapse-reserve` (blocks and huge
/// pages allocated ahead for splits and collapses).
fn check_split_and_collapse(backing: &str, reserve: u64) {
    if let Some(why) = skip_reason(backing) {
        common::skip(&why);
        return;
    }
    let r = run_unmap(backing, &reserve.to_string());
    // The guest verified every kept byte and every given-back page.
    assert_eq!(num(&r, &["report_totals", "mismatches"]), 0, "{r:#}");
    assert_eq!(num(&r, &["report_totals", "nonzero_discarded"]), 0);
    assert_eq!(num(&r, &["report_totals", "pages_discarded"]), K);
    let frames = MIB / 2;

    let (c1, c2, c3, c4, c5) = (
        phase(&r, 1),
        phase(&r, 2),
        phase(&r, 3),
        phase(&r, 4),
        phase(&r, 5),
    );
    let kvm2m = |c: &Value| num(c, &["kvm", "pages_2m"]);
    let mir2m = |c: &Value| num(c, &["mirror_pages_2m"]);
    let base = kvm2m(c1);
    assert!(
        base >= frames - 2,
        "phase 1: KVM maps {base} frames at 2M of {frames}"
    );
    // Give-back: exactly K frames lose their 2M mapping, the others keep it.
    assert_eq!(kvm2m(c2), base - K, "after give-back: {r:#}");
    assert_eq!(kvm2m(c3), base - K, "after the guest re-read everything");
    assert_eq!(num(c2, &["frames", "small"]), K);
    assert_eq!(num(c2, &["frames", "huge"]), frames - K);
    // The mirror predicts the same drop, and every checkpoint exactly:
    // pages_2m and pages_4k (at checkpoint 2 the split frames have no 4K
    // leaves yet: the guest has not touched them since the give-back).
    assert_eq!(mir2m(c1) - mir2m(c2), K, "mirror: {r:#}");
    let kvm4k = |c: &Value| num(c, &["kvm", "pages_4k"]);
    let mir4k = |c: &Value| num(c, &["mirror_pages_4k"]);
    for c in [c1, c2, c3, c4, c5] {
        assert_eq!(
            (kvm4k(c), kvm2m(c)),
            (mir4k(c), mir2m(c)),
            "phase {}: KVM vs mirror (pages_4k, pages_2m): {r:#}",
            c["phase"]
        );
        assert_eq!(c["mirror_agrees"], true, "{c:#}");
    }
    assert_eq!(kvm4k(c2), kvm4k(c1), "no 4K leaves in the split frames yet");
    assert_eq!(kvm4k(c3), kvm4k(c1) + K * 512);
    // Take-back: still split until the collapser's pass at checkpoint 4.
    assert_eq!(num(c4, &["frames", "small"]), K);
    assert_eq!(num(c4, &["collapsed_after"]), K, "{r:#}");
    assert_eq!(num(c5, &["frames", "small"]), 0);
    assert_eq!(kvm2m(c5), base, "after take-back and collapse: {r:#}");
    assert_eq!(mir2m(c5), mir2m(c1));

    assert_eq!(num(&r, &["unmap", "frames_split"]), K);
    assert_eq!(num(&r, &["unmap", "frames_collapsed"]), K);
    assert_eq!(num(&r, &["unmap", "split_latency", "count"]), K);
    let split_pauses = num(&r, &["unmap", "split_pause", "count"]);
    assert_eq!(split_pauses, 0, "a split pauses no vCPU: {:#}", r["unmap"]);
    match backing {
        // hugetlb copies the kept pages with the vCPUs running, the frame
        // write-protected, then swaps the mapping in one `mmap`: one
        // write-hold window per split. A collapse of a frame with every
        // page present (all taken back) the same way: no pause either.
        "hugetlb" => {
            assert_eq!(num(&r, &["unmap", "split_write_hold", "count"]), K);
            assert_eq!(num(&r, &["unmap", "collapse_pause", "count"]), 0);
            assert_eq!(num(&r, &["unmap", "collapse_write_hold", "count"]), K);
            // The worker makes huge pages warm once frames are split, one
            // per split frame up to the reserve, and the checkpoint's pass
            // runs once it has caught up: at least the first `reserve`
            // collapses find one; none without a collapse reserve.
            let onto = num(&r, &["unmap", "collapses_onto_reserve"]);
            assert!(
                (reserve == 0 && onto == 0)
                    || (reserve > 0 && (reserve.min(K)..=K).contains(&onto)),
                "{onto} collapses onto the reserve of {reserve}: {:#}",
                r["unmap"]
            );
            // The reserve is allocated before the vCPUs start: at least the
            // first `reserve` splits find their pages there (the thread
            // tops it up meanwhile); none without one.
            let onto = num(&r, &["unmap", "splits_onto_reserve"]);
            assert!(
                onto >= reserve.min(K) && onto <= K && (reserve > 0 || onto == 0),
                "{onto} splits onto the reserve of {reserve}: {:#}",
                r["unmap"]
            );
        }
        // thp: the kernel splits in place on the punch.
        _ => assert_eq!(num(&r, &["unmap", "split_write_hold", "count"]), 0),
    }
    assert!(
        r["unmap"]["collapse_rate_frames_per_s"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    );
}

#[test]
fn unmap_k8_hugetlb_splits_exactly_k_frames_and_collapses_them() {
    check_split_and_collapse("hugetlb", 4);
}

#[test]
fn unmap_k8_hugetlb_without_a_split_reserve_is_as_exact() {
    check_split_and_collapse("hugetlb", 0);
}

#[test]
fn unmap_k8_thp_splits_exactly_k_frames_and_collapses_them() {
    check_split_and_collapse("thp", 4);
}

fn ctl(sock: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(common::vmm_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("running vmm ctl");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn ctl_without_a_vm_says_which_socket_it_tried() {
    let sock = tmp("absent.sock");
    let (code, _, err) = ctl(&sock, &["stats"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no VM is running"), "{err}");
    assert!(err.contains(&sock.display().to_string()), "{err}");
}

#[test]
fn api_socket_stats_pause_resume_stop_and_errors() {
    if let Some(why) = skip_reason("hugetlb") {
        common::skip(&why);
        return;
    }
    let sock = tmp("api.sock");
    let _ = std::fs::remove_file(&sock);
    let log = tmp("api-vmm.log");
    let log_file = std::fs::File::create(&log).expect("creating the vmm log");
    // A guest that runs long enough to be talked to; killed at the end.
    let mut child = Command::new(common::vmm_bin())
        .args([
            "run",
            "--test-guest",
            "tlb",
            "--guest-arg",
            "accesses=1099511627776",
            "--memory",
            &format!("{MIB}M"),
            "--serial",
            "/dev/null",
            "--timeout",
            "60",
            "--api-socket",
        ])
        .arg(&sock)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("starting vmm");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (code, out, err) = ctl(&sock, &["--json", "stats"]);
        assert_eq!(code, Some(0), "{err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(num(&v, &["frames", "huge"]), MIB / 2, "{v:#}");
        assert!(v["kvm"]["pages_2m"].is_u64(), "{v:#}");
        assert!(v["mirror"]["pages_2m"].is_u64(), "{v:#}");
        assert_eq!(num(&v, &["pool", "capacity"]), MIB / 2);
        assert_eq!(v["paused"], false);

        let (code, _, err) = ctl(&sock, &["pause"]);
        assert_eq!(code, Some(0), "{err}");
        let (code, _, err) = ctl(&sock, &["pause"]);
        assert_eq!(code, Some(1), "second pause must be refused");
        assert!(err.contains("already paused"), "{err}");
        let (_, out, _) = ctl(&sock, &["--json", "stats"]);
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["paused"], true);
        let (code, _, err) = ctl(&sock, &["resume"]);
        assert_eq!(code, Some(0), "{err}");
        let (code, _, err) = ctl(&sock, &["resume"]);
        assert_eq!(code, Some(1));
        assert!(err.contains("not paused"), "{err}");

        // A test guest has no balloon.
        let (code, _, err) = ctl(&sock, &["balloon", "8M"]);
        assert_eq!(code, Some(1));
        assert!(err.contains("--balloon"), "{err}");
        // Human-readable stats show KVM beside the mirror.
        let (code, out, _) = ctl(&sock, &["stats"]);
        assert_eq!(code, Some(0));
        assert!(
            out.contains("mirror predicts") && out.contains("pages_2m"),
            "{out}"
        );
        // Stop: the VM ends with exit code 0 (not the timeout's 5) and removes the socket.
        let (code, _, err) = ctl(&sock, &["stop"]);
        assert_eq!(code, Some(0), "{err}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().expect("waiting for vmm") {
                break Some(st);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let status = status.expect("vmm run still running 30 s after `vmm ctl stop`");
        assert_eq!(status.code(), Some(0), "vmm run after ctl stop");
        assert!(!sock.exists(), "the API socket outlived the VM");
        let (code, _, err) = ctl(&sock, &["stats"]);
        assert_eq!(code, Some(2), "no VM any more: {err}");
        assert!(err.contains("no VM is running"), "{err}");
    }));
    let exited = child.try_wait().ok().flatten();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    let vmm_log = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    if let Err(e) = result {
        eprintln!("the VMM (exited: {exited:?}) logged:\n{vmm_log}");
        std::panic::resume_unwind(e);
    }
}

/// `--guest-arg whole=1`: the guest gives each of K frames back whole (one 2M
/// DISCARD). The test device's give-back frees a whole frame without a split:
/// its huge page goes back to the host, the frame stays mapped to its pool
/// slot, and the guest's next touch faults a fresh huge page in, which KVM
/// maps 2M again (exact at every checkpoint, mirror included).
#[test]
fn unmap_whole_frames_hugetlb_come_back_huge_and_kvm_maps_them_2m() {
    if let Some(why) = skip_reason("hugetlb") {
        common::skip(&why);
        return;
    }
    let json = tmp("whole.json");
    let o = Command::new(common::vmm_bin())
        .args([
            "run",
            "--test-guest",
            "unmap",
            "--guest-arg",
            "whole=1",
            "--backing",
            "hugetlb",
            "--memory",
            &format!("{MIB}M"),
            "--serial",
            "/dev/null",
            "--timeout",
            "120",
            "--stats-json",
        ])
        .arg(&json)
        .output()
        .expect("running vmm");
    let r = common::read_json_or_null(&json);
    let _ = std::fs::remove_file(&json);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stderr:\n{}\n{r:#}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The guest read zero in every page of the given-back frames, and its kept
    // pages were intact.
    assert_eq!(num(&r, &["report_totals", "mismatches"]), 0, "{r:#}");
    assert_eq!(num(&r, &["report_totals", "nonzero_discarded"]), 0);
    let frames = MIB / 2;
    let (c1, c2, c3, c4, c5) = (
        phase(&r, 1),
        phase(&r, 2),
        phase(&r, 3),
        phase(&r, 4),
        phase(&r, 5),
    );
    let kvm2m = |c: &Value| num(c, &["kvm", "pages_2m"]);
    let base = kvm2m(c1);
    // Given back: K frames lose their 2M mapping (their huge page is gone), no
    // frame is split, the books keep them huge on their slots.
    assert_eq!(kvm2m(c2), base - K, "after give-back: {r:#}");
    assert_eq!(num(c2, &["frames", "huge"]), frames, "{c2:#}");
    assert_eq!(num(c2, &["frames", "small"]), 0, "{c2:#}");
    // The guest touched them (reads): fresh huge pages, mapped 2M by KVM.
    assert_eq!(kvm2m(c3), base, "after the guest re-read everything: {r:#}");
    assert_eq!(kvm2m(c4), base);
    assert_eq!(kvm2m(c5), base);
    for c in [c1, c2, c3, c4, c5] {
        assert_eq!(c["mirror_agrees"], true, "{c:#}");
        assert_eq!(
            num(c, &["kvm", "pages_4k"]),
            num(c1, &["kvm", "pages_4k"]),
            "no 4K leaves anywhere: {c:#}"
        );
    }
    assert_eq!(num(&r, &["unmap", "frames_split"]), 0, "{r:#}");
    assert_eq!(num(&r, &["unmap", "huge_frames_freed"]), K, "{r:#}");
    assert_eq!(num(&r, &["unmap", "frames_collapsed"]), 0, "{r:#}");
    assert_eq!(num(&r, &["unmap", "split_pause", "count"]), 0, "{r:#}");
    assert_eq!(num(&r, &["frames", "released"]), 0, "{r:#}");
}
