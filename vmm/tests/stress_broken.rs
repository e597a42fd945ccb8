//! The checker can fail: deliberately broken modes of `vmm stress` are
//! caught as violations (exit code 4, the violation text, the seed, the
//! first bad gfn, a replay file), and the replay file re-runs the host-side
//! event sequence and is caught again.

use std::path::PathBuf;
use std::process::{Command, Output};

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-stress-bug-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("running vmm")
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs the broken mode; `None` when the host cannot run it.
fn broken(bug: &str, dir: &std::path::Path) -> Option<(Output, PathBuf)> {
    let replay = dir.join("replay.json");
    let r = replay.to_str().unwrap();
    let o = vmm(&[
        "stress",
        "--backing",
        "4k",
        "--memory",
        "64M",
        "--vcpus",
        "2",
        "--seconds",
        "10",
        "--seed",
        "5",
        "--ops-mix",
        "discard4k=3,discard2m=1,wrprotect=1",
        "--inject-bug",
        bug,
        "--replay-out",
        r,
    ]);
    if o.status.code() == Some(2) {
        eprintln!("skip: {}", text(&o));
        return None;
    }
    Some((o, replay))
}

#[test]
fn skipping_the_discard_is_caught_as_a_stale_read_and_replays() {
    if !kvm_usable() {
        eprintln!("skip: /dev/kvm is not usable here");
        return;
    }
    let dir = out_dir("skip-discard");
    let Some((o, replay)) = broken("skip-discard", &dir) else {
        return;
    };
    let t = text(&o);
    assert_eq!(o.status.code(), Some(4), "{t}");
    assert!(t.contains("VIOLATION: stale read"), "{t}");
    assert!(t.contains("seed 5"), "{t}");
    assert!(t.contains("first bad gfn 0x"), "{t}");
    assert!(t.contains("discard"), "last events listed: {t}");
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&replay).unwrap()).unwrap();
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
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["replay"], true);
    let f2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&again).unwrap()).unwrap();
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
    if !kvm_usable() {
        eprintln!("skip: /dev/kvm is not usable here");
        return;
    }
    let dir = out_dir("skip-log");
    let Some((o, replay)) = broken("skip-log", &dir) else {
        return;
    };
    let t = text(&o);
    assert_eq!(o.status.code(), Some(4), "{t}");
    assert!(t.contains("VIOLATION: lost write"), "{t}");
    assert!(t.contains("read 0x0"), "{t}");
    assert!(replay.exists());
    std::fs::remove_dir_all(&dir).ok();
}
