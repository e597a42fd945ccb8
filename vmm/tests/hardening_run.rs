//! A run whose stdout is gone or that is interrupted still ends with its
//! real exit code, its report file written and its API socket removed.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_or_skip, read_json};

/// Run `vmm args` with stdout a pipe whose read end is already closed
/// (`vmm ... | head -0`): every write to stdout fails with EPIPE.
fn with_closed_stdout(args: &[&str]) -> (Option<i32>, String) {
    let mut c = common::spawn_vmm(args);
    drop(c.stdout.take());
    let o = c.wait_with_output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn run_with_closed_stdout_keeps_exit_code_and_report() {
    if !kvm_or_skip() {
        return;
    }
    let d = common::out_dir("vmm-hard-run", "epipe");
    let report = d.join("report.json");
    let (code, err) = with_closed_stdout(&[
        "run",
        "--test-guest",
        "hello",
        "--backing",
        "4k",
        "--memory",
        "64M",
        "--stats",
        "--stats-json",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(read_json(&report)["exit_code"], 0);
}

#[test]
fn stress_violation_with_closed_stdout_still_exits_4() {
    if !kvm_or_skip() {
        return;
    }
    let d = common::out_dir("vmm-hard-run", "epipe-stress");
    let json = d.join("stress.json");
    let replay = d.join("replay.json");
    let (code, err) = with_closed_stdout(&[
        "stress",
        "--backing",
        "4k",
        "--memory",
        "64M",
        "--vcpus",
        "1",
        "--seconds",
        "10",
        "--ops-mix",
        "discard4k=1",
        "--inject-bug",
        "skip-log",
        "--json",
        json.to_str().unwrap(),
        "--replay-out",
        replay.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(4), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(read_json(&json)["exit_code"], 4);
    assert!(replay.exists());
}

/// Start an endless `verify` run with an API socket and a report, send
/// `sig` once the socket is up, and return the exit code.
fn interrupted(sig: libc::c_int, name: &str) -> Option<i32> {
    let d = common::out_dir("vmm-hard-sig", name);
    let sock = d.join("api.sock");
    let report = d.join("report.json");
    let _ = std::fs::remove_file(&report);
    let mut c = Command::new(common::vmm_bin())
        .args([
            "run",
            "--test-guest",
            "verify",
            "--generations",
            "1000000",
            "--backing",
            "4k",
            "--memory",
            "64M",
            "--api-socket",
            sock.to_str().unwrap(),
            "--stats-json",
            report.to_str().unwrap(),
        ])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            c.try_wait().unwrap().is_none(),
            "vmm ended before its socket was up"
        );
        assert!(start.elapsed() < Duration::from_secs(120), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill with the pid of our own child.
    assert_eq!(unsafe { libc::kill(c.id() as libc::pid_t, sig) }, 0);
    let code = c.wait().unwrap().code();
    assert!(!sock.exists(), "{name}: the API socket was left behind");
    let r = read_json(&report);
    assert_eq!(r["exit_code"].as_i64().map(|c| c as i32), code, "{r:#}");
    assert!(
        r["outcome"].as_str().unwrap().contains(name),
        "{name}: {}",
        r["outcome"]
    );
    code
}

#[test]
fn signals_stop_the_run_write_the_report_and_remove_the_socket() {
    if !kvm_or_skip() {
        return;
    }
    assert_eq!(interrupted(libc::SIGTERM, "SIGTERM"), Some(143));
    assert_eq!(interrupted(libc::SIGINT, "SIGINT"), Some(130));
    assert_eq!(interrupted(libc::SIGHUP, "SIGHUP"), Some(129));
}
