//! Hostile files and numbers on the command line: each exits 2 with a
//! message that names the problem, before anything runs, without a panic
//! and without hanging (a FIFO is refused, never opened for a blocking read).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{kvm_or_skip, stderr};

fn dir(name: &str) -> PathBuf {
    common::out_dir("vmm-hard-cli", name)
}

/// Run `vmm args` with a watchdog: a run that hangs (the old FIFO bug) is
/// killed and reported as such instead of hanging the test suite.
fn vmm(args: &[&str]) -> Output {
    let mut c = common::spawn_vmm(args);
    let start = Instant::now();
    while c.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(120) {
            c.kill().unwrap();
            panic!("vmm {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    c.wait_with_output().unwrap()
}

fn assert_bad_input(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {e}");
    assert!(!e.contains("panicked"), "panic: {e}");
    for n in needles {
        assert!(e.contains(n), "expected {n:?} in: {e}");
    }
}

fn mkfifo(p: &Path) {
    let _ = std::fs::remove_file(p);
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// A replay file for a 64M `4k` run with `events` (JSON array text).
fn replay_file(d: &Path, events: &str) -> PathBuf {
    let p = d.join("replay.json");
    std::fs::write(
        &p,
        format!(
            r#"{{"version":1,"seed":1,"backing":"4k","memory":67108864,"vcpus":1,
               "ops_mix":{{"weights":[["wrprotect",1]]}},"inject_bug":null,"events":{events}}}"#
        ),
    )
    .unwrap();
    p
}

#[test]
fn replay_frame_outside_guest_ram_exits_2_naming_the_event() {
    let d = dir("replay-range");
    // Frame 34 of a 64M guest (frames 0..32): SIGSEGV before the fix.
    let p = replay_file(
        &d,
        r#"[{"seq":0,"kind":"quiesce","frame":null,"page":0},
            {"seq":1,"kind":"wrprotect","frame":34,"page":0}]"#,
    );
    let o = vmm(&["stress", "--replay", p.to_str().unwrap()]);
    assert_bad_input(&o, &["event 1 (#1 wrprotect frame 34", "is outside"]);
    let p = replay_file(
        &d,
        r#"[{"seq":0,"kind":"discard4k","frame":3,"page":4096}]"#,
    );
    let o = vmm(&["stress", "--replay", p.to_str().unwrap()]);
    assert_bad_input(
        &o,
        &["event 0 (#0 discard4k frame 3", "page 4096 is outside"],
    );
}

#[test]
fn replay_frame_in_the_reserved_region_exits_2() {
    if !kvm_or_skip() {
        return;
    }
    let d = dir("replay-reserved");
    // Frame 0 holds the checker guest's code and tables: no event acts there.
    let p = replay_file(&d, r#"[{"seq":0,"kind":"discard2m","frame":0,"page":0}]"#);
    let o = vmm(&["stress", "--replay", p.to_str().unwrap()]);
    assert_bad_input(
        &o,
        &["event 0 (#0 discard2m frame 0", "is outside the frames"],
    );
}

#[test]
fn fifos_are_refused_for_every_input() {
    let d = dir("fifo");
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    let kernel = d.join("kernel");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let k = kernel.to_str().unwrap();
    let o = vmm(&["stress", "--replay", f]);
    assert_bad_input(&o, &["--replay", "is a FIFO"]);
    let o = vmm(&["run", "--kernel", f, "--backing", "4k", "--memory", "64M"]);
    assert_bad_input(&o, &["--kernel", "is a FIFO"]);
    let o = vmm(&["run", "--kernel", k, "--initrd", f, "--backing", "4k"]);
    assert_bad_input(&o, &["--initrd", "is a FIFO"]);
    if kvm_or_skip() {
        let o = vmm(&[
            "run",
            "--test-guest",
            "hello",
            "--backing",
            "4k",
            "--memory",
            "64M",
            "--serial",
            f,
        ]);
        assert_bad_input(&o, &["--serial", "is a FIFO"]);
    }
}

#[test]
fn initrd_dev_null_is_named_for_what_it_is() {
    let d = dir("devnull");
    let kernel = d.join("kernel");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let k = kernel.to_str().unwrap();
    let o = vmm(&[
        "run",
        "--kernel",
        k,
        "--initrd",
        "/dev/null",
        "--backing",
        "4k",
    ]);
    assert_bad_input(&o, &["--initrd /dev/null is a character device"]);
    let empty = d.join("empty.cpio");
    std::fs::write(&empty, b"").unwrap();
    let o = vmm(&["run", "--kernel", k, "--initrd", empty.to_str().unwrap()]);
    assert_bad_input(&o, &["is empty"]);
}

#[test]
fn huge_numbers_are_refused_at_parse_time() {
    for args in [
        &[
            "run",
            "--test-guest",
            "hello",
            "--backing",
            "4k",
            "--timeout",
            "1e300",
        ][..],
        &["stress", "--backing", "4k", "--seconds", "1e300"][..],
        &["stress", "--backing", "4k", "--quiesce-every", "1e19"][..],
        &["bench", "tlb", "--timeout", "1e300"][..],
    ] {
        let o = vmm(args);
        assert_bad_input(&o, &["too large", "at most"]);
    }
}

#[test]
fn stress_on_1g_frames_is_refused_with_what_to_use() {
    let o = vmm(&["stress", "--backing", "hugetlb-1g", "--seconds", "1"]);
    assert_bad_input(&o, &["hugetlb-1g", "use hugetlb, thp or 4k"]);
}

#[test]
fn output_paths_are_checked_before_the_run() {
    let d = dir("outputs");
    let missing = d.join("no-such-dir").join("out.json");
    let m = missing.to_str().unwrap();
    let dd = d.to_str().unwrap();
    // A KVM device that does not exist: the output check must come first.
    let no_kvm = ["--kvm-dev", "/nonexistent/kvm"];
    let mut run = vec![
        "run",
        "--test-guest",
        "hello",
        "--backing",
        "4k",
        "--stats-json",
        m,
    ];
    run.extend(no_kvm);
    assert_bad_input(
        &vmm(&run),
        &["--stats-json", "checked before the run starts"],
    );
    let mut stress = vec!["stress", "--backing", "4k", "--json", dd];
    stress.extend(no_kvm);
    assert_bad_input(&vmm(&stress), &["--json", "is a directory"]);
    let mut stress = vec!["stress", "--backing", "4k", "--replay-out", m];
    stress.extend(no_kvm);
    assert_bad_input(&vmm(&stress), &["--replay-out"]);
    let mut bench = vec!["bench", "tlb", "--svg", m];
    bench.extend(no_kvm);
    assert_bad_input(&vmm(&bench), &["--svg", "checked before the run starts"]);
    assert!(!missing.exists());
}

#[test]
fn duplicate_guest_args_and_stray_generations_are_refused() {
    let o = vmm(&[
        "run",
        "--test-guest",
        "unmap",
        "--guest-arg",
        "frames=2",
        "--guest-arg",
        "frames=3",
        "--kvm-dev",
        "/nonexistent/kvm",
    ]);
    assert_bad_input(&o, &["--guest-arg frames is given more than once"]);
    let o = vmm(&[
        "run",
        "--test-guest",
        "unmap",
        "--generations",
        "5",
        "--backing",
        "4k",
        "--memory",
        "64M",
    ]);
    assert_bad_input(&o, &["only the verify test guest takes generations"]);
}
