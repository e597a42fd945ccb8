//! Helpers shared by the integration tests of `vmm`: running the built
//! binary, host checks that decide whether a test can run here (skip
//! reasons), scratch directories and reading JSON reports.
//!
//! Every test crate uses only some of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

// The same helper the workspace-level integration tests use, one source file.
#[path = "../../../tests/src/json.rs"]
mod json;
#[allow(unused_imports)] // not every test crate reads numbers
pub use json::num;

/// The `vmm` binary Cargo built for these tests.
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmm")
}

/// Run `vmm args...` with `RUST_LOG=error` and capture its output.
pub fn vmm(args: &[&str]) -> Output {
    Command::new(vmm_bin())
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("running vmm")
}

/// Run `vmm args... --stats-json <tmp>/<name>.json`, which must exit 0
/// (else the panic shows its output); its JSON report and its stdout.
pub fn run_with_report(name: &str, args: &[&str]) -> (Value, String) {
    let json = std::env::temp_dir().join(format!("vmm-{}-{name}.json", std::process::id()));
    let o = Command::new(vmm_bin())
        .args(args)
        .arg("--stats-json")
        .arg(&json)
        .output()
        .expect("running vmm");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let report = read_json_or_null(&json);
    let _ = std::fs::remove_file(&json);
    assert_eq!(
        o.status.code(),
        Some(0),
        "vmm {args:?}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    (report, stdout)
}

/// Start `vmm args...` with `RUST_LOG=error`, stdout and stderr piped.
pub fn spawn_vmm(args: &[&str]) -> std::process::Child {
    Command::new(vmm_bin())
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting vmm")
}

/// The captured stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The captured stdout, a newline, then stderr, as text.
pub fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A fresh scratch directory `<tmp>/<prefix>-<pid>-<name>`.
pub fn out_dir(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("{prefix}-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Parse the JSON file at `path` (panics with the path if it is missing or
/// not JSON).
pub fn read_json(path: &Path) -> Value {
    let t =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The JSON file at `path`, or `Value::Null` if it is missing or not JSON
/// (a run that failed before writing its report).
pub fn read_json_or_null(path: &Path) -> Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// Whether `/dev/kvm` opens read-write.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Skipping a test the host cannot run: one policy for every test crate.
#[path = "../../../tests/src/skip.rs"]
mod skip_policy;
pub use skip_policy::skip;

/// `true` if KVM is usable; otherwise prints why the test skips and
/// returns `false`.
pub fn kvm_or_skip() -> bool {
    let ok = kvm_usable();
    if !ok {
        skip("/dev/kvm is not usable here");
    }
    ok
}

/// Free 2M hugetlb pages, as the VMM's allocator reads them (0 when unreadable).
pub fn hugetlb_free() -> u64 {
    guest_mem::backing::hugetlb_2m_counters(&guest_mem::HostPaths::default()).map_or(0, |c| c.free)
}

/// Why fewer than `pages` free 2M hugetlb pages stop a test here, if they
/// do (no KVM needed).
pub fn hugetlb_skip_reason(pages: u64) -> Option<String> {
    let free = hugetlb_free();
    (free < pages).then(|| {
        format!("hugetlb: {free} free 2M pages, need {pages} (echo N > /proc/sys/vm/nr_hugepages)")
    })
}

/// Why a run on `backing` cannot happen here, if it cannot: no KVM, fewer
/// than `hugetlb_pages` free 2M pages (hugetlb), or shmem THP disabled (thp).
pub fn skip_reason(backing: &str, hugetlb_pages: u64) -> Option<String> {
    if !kvm_usable() {
        return Some("/dev/kvm is not usable".into());
    }
    match backing {
        "hugetlb" => hugetlb_skip_reason(hugetlb_pages),
        "thp" => guest_mem::backing::check_shmem_thp(&guest_mem::HostPaths::default())
            .err()
            .map(|e| e.to_string()),
        // One 1G page, and the 2M pages a split of it takes.
        "hugetlb-1g" => {
            let gig = guest_mem::backing::hugetlb_1g_counters(&guest_mem::HostPaths::default())
                .map_or(0, |c| c.available());
            let free = hugetlb_free();
            (gig < 1 || free < hugetlb_pages).then(|| {
                format!(
                    "hugetlb-1g: {gig} free 1G pages (need 1: bash resources/setup-host.sh \
                     --gigpages 1), {free} free 2M pages (need {hugetlb_pages})"
                )
            })
        }
        _ => None,
    }
}

/// Asserts that KVM's (pages_4k, pages_2m, pages_1g) equal the mirror's at
/// every checkpoint of a `vmm run --stats-json` report.
pub fn assert_checkpoints_match_mirror(r: &Value) {
    for c in r["checkpoints"]
        .as_array()
        .expect("checkpoints in the report")
    {
        let kvm = |k: &str| num(c, &["kvm", k]);
        assert_eq!(
            (kvm("pages_4k"), kvm("pages_2m"), kvm("pages_1g")),
            (
                num(c, &["mirror_pages_4k"]),
                num(c, &["mirror_pages_2m"]),
                num(c, &["mirror_pages_1g"])
            ),
            "phase {}: KVM vs mirror (pages_4k, pages_2m, pages_1g): {r:#}",
            c["phase"]
        );
    }
}
