//! The `vmm` binary under test.
//!
//! `$VMM_BIN` names it when set. Otherwise it is built (once per test process) with the
//! cargo that runs the tests, into the same target directory and profile as the test
//! executable itself, so `cargo test --workspace --release` tests the release `vmm`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The path of the `vmm` binary, built if needed. Panics (failing the test) when it
/// cannot be built: that is a broken workspace, not a host limitation.
pub fn vmm_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("VMM_BIN") {
        Some(p) => PathBuf::from(p),
        None => build_vmm(),
    })
    .clone()
}

fn build_vmm() -> PathBuf {
    // The test executable is <target>/<profile>/deps/<name>-<hash>.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is not in <target>/<profile>/deps");
    let target_dir = profile_dir.parent().expect("profile dir has a parent");
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", "vmm", "--bin", "vmm"])
        .env("CARGO_TARGET_DIR", target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let status = cmd.status().expect("running cargo build -p vmm");
    assert!(status.success(), "cargo build -p vmm failed: {status}");
    let bin = profile_dir.join("vmm");
    assert!(bin.is_file(), "{} missing after cargo build", bin.display());
    bin
}

/// One finished `vmm` run.
#[derive(Debug)]
pub struct Run {
    pub output: Output,
    pub elapsed: Duration,
}

impl Run {
    /// Exit code, `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
}

/// Run `vmm` with `args`, no stdin, capturing stdout and stderr.
pub fn run_vmm<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let start = Instant::now();
    let output = Command::new(vmm_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("spawning vmm");
    Run {
        output,
        elapsed: start.elapsed(),
    }
}

/// The last `n` lines of `text`, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::tail;

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 3), "");
    }
}
