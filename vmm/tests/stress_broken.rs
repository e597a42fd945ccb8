//! The checker can fail: deliberately broken modes of `vmm stress` are
//! caught as violations (exit code 4, the violation text, the seed, the
//! first bad gfn, a replay file), and the replay file re-runs the host-side
//! event sequence and is caught again.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{read_json, text, vmm};

/// Backing and event mix of each broken mode.
fn setup(bug: &str) -> (&'static str, &'static str) {
    match bug {
        // Only a hugetlb split copies a frame with the vCPUs running.
        "no-write-hold" => ("hugetlb", "split=3,collapse=1"),
        _ => ("4k", "discard4k=3,discard2m=1,wrprotect=1"),
    }
}

/// Runs the broken mode; `None` when the host cannot run it.
fn broken(bug: &str, dir: &Path) -> Option<(Output, PathBuf)> {
    let replay = dir.join("replay.json");
    let r = replay.to_str().unwrap();
    let (backing, mix) = setup(bug);
    let o = vmm(&[
        "stress",
        "--backing",
        backing,
        "--memory",
        "64M",
        "--vcpus",
        "2",
        "--seconds",
        "10",
        "--seed",
        "5",
        "--ops-mix",
        mix,
        "--inject-bug",
        bug,
        "--replay-out",
        r,
    ]);
    if o.status.code() == Some(2) {
        common::skip(&text(&o));
        return None;
    }
    Some((o, replay))
}

/// Runs the broken mode `bug` in a fresh directory and checks it is caught:
/// exit code 4 and `violation` in the output. Returns the directory, the
/// output text and the replay file path; `None` when the host cannot run it.
fn caught(bug: &str, violation: &str) -> Option<(PathBuf, String, PathBuf)> {
    if !common::kvm_or_skip() {
        return None;
    }
    let dir = common::out_dir("vmm-stress-bug", bug);
    let (o, replay) = broken(bug, &dir)?;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(4), "{t}");
    assert!(t.contains(violation), "{t}");
    Some((dir, t, replay))
}

#[test]
fn skipping_the_discard_is_caught_as_a_stale_read_and_replays() {
    let Some((dir, t, replay)) = caught("skip-discard", "VIOLATION: stale read") else {
        return;
    };
    assert!(t.contains("seed 5"), "{t}");
    assert!(t.contains("first bad gfn 0x"), "{t}");
    assert!(t.contains("discard"), "last events listed: {t}");
    let f = read_json(&replay);
    assert_eq!(f["inject_bug"], "skip-discard");
    assert_eq!(f["seed"], 5);
    let events = f["events"].as_array().unwrap();
    assert!(!events.is_empty());
    // The replay fires the same host-side sequence and is caught again.
    let again = dir.join("again.json");
    let o2 = vmm(&[
        "stress",
        "--replay",
        replay.to_str().unwrap(),
        "--replay-out",
        again.to_str().unwrap(),
        "--json",
        dir.join("report.json").to_str().unwrap(),
    ]);
    let t2 = text(&o2);
    assert_eq!(o2.status.code(), Some(4), "{t2}");
    assert!(t2.contains("stale read"), "{t2}");
    let r = read_json(&dir.join("report.json"));
    assert_eq!(r["replay"], true);
    let f2 = read_json(&again);
    let e2 = f2["events"].as_array().unwrap();
    assert!(e2.len() <= events.len());
    assert_eq!(
        &events[..e2.len()],
        &e2[..],
        "the replay fired another sequence"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn skipping_the_log_is_caught_as_a_lost_write() {
    let Some((dir, t, replay)) = caught("skip-log", "VIOLATION: lost write") else {
        return;
    };
    assert!(t.contains("read 0x0"), "{t}");
    assert!(replay.exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn splitting_without_the_write_hold_is_caught_as_a_lost_write() {
    // The copy runs with the vCPUs running; without the write-protect a
    // guest write that lands in the huge page after its copy is lost.
    let Some((dir, t, _)) = caught("no-write-hold", "VIOLATION: lost write") else {
        return;
    };
    assert!(t.contains("INJECTED BUG NoWriteHold"), "{t}");
    std::fs::remove_dir_all(&dir).ok();
}
