//! A Linux test guest running under `vmm run --api-socket` in the background,
//! followed and stopped through `vmm ctl`.
//!
//! The guest boots the test kernel with the `spin` initramfs: its /init spins at CPL3
//! without system calls, so the kernel and its drivers keep running on either kind of
//! host (on a paravirtual shadow-paging host guest user space cannot make system calls).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::host::{hugepages_free, kvm_unavailable, shmem_thp_unavailable};
use crate::images::{self, INITRD_SPIN, KERNEL, RUN_INIT_MARKER};
use crate::vmm_bin::{run_vmm, tail, vmm_bin};

/// Guest RAM of these guests: 256 MiB = 128 frames of 2M.
pub const MEMORY: &str = "256M";
/// [`MEMORY`] in 2M frames.
pub const MEMORY_FRAMES: u64 = 128;
/// [`MEMORY`] in bytes.
pub const MEMORY_BYTES: u64 = MEMORY_FRAMES * FRAME;
/// A 2M frame in bytes.
pub const FRAME: u64 = 2 * 1024 * 1024;

/// A running `vmm run`; killed (and its files removed) when dropped.
pub struct LinuxVm {
    child: Child,
    name: String,
    sock: PathBuf,
    serial: PathBuf,
    json: PathBuf,
    stderr: PathBuf,
    started: Instant,
}

fn read_lossy(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

impl LinuxVm {
    /// Start the test kernel with the `spin` initramfs on `backing`, with `extra`
    /// `vmm run` options; `Err` is why this host cannot (a reason to skip).
    pub fn start(name: &str, backing: &str, extra: &[&str]) -> Result<LinuxVm, String> {
        if let Some(why) = kvm_unavailable() {
            return Err(why);
        }
        let kernel = images::image(KERNEL).map_err(|w| format!("no test kernel: {w}"))?;
        let initrd = images::image(INITRD_SPIN).map_err(|w| format!("no spin initramfs: {w}"))?;
        let free = hugepages_free();
        if backing == "hugetlb" && free < MEMORY_FRAMES {
            return Err(format!(
                "{free} free hugetlb pages, {MEMORY_FRAMES} needed \
                 (echo 2048 > /proc/sys/vm/nr_hugepages, or run resources/setup-host.sh)"
            ));
        }
        if backing == "thp" {
            if let Some(why) = shmem_thp_unavailable() {
                return Err(why);
            }
        }
        let tmp = std::env::temp_dir();
        let base = format!("vmm-{name}-{backing}-{}", std::process::id());
        let path = |ext: &str| tmp.join(format!("{base}.{ext}"));
        let (sock, serial, json, stderr) =
            (path("sock"), path("serial"), path("json"), path("stderr"));
        for p in [&sock, &serial, &json, &stderr] {
            let _ = std::fs::remove_file(p);
        }
        let child = Command::new(vmm_bin())
            .arg("run")
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd)
            .args(["--memory", MEMORY, "--backing", backing])
            .args(extra)
            .arg("--api-socket")
            .arg(&sock)
            .arg("--serial")
            .arg(&serial)
            .arg("--stats-json")
            .arg(&json)
            .args(["--timeout", "900"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).map_err(|e| format!("creating {stderr:?}: {e}"))?)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", vmm_bin().display()))?;
        Ok(LinuxVm {
            child,
            name: format!("{name} ({backing})"),
            sock,
            serial,
            json,
            stderr,
            started: Instant::now(),
        })
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// `why` with the last serial lines and vmm's stderr, for a failure message.
    pub fn diag(&self, why: &str) -> String {
        format!(
            "{}: {why}\n--- last serial lines:\n{}\n--- vmm stderr:\n{}",
            self.name,
            tail(&read_lossy(&self.serial), 20),
            tail(&read_lossy(&self.stderr), 20)
        )
    }

    /// Whether the kernel has started /init.
    pub fn at_init(&self) -> bool {
        read_lossy(&self.serial).contains(RUN_INIT_MARKER)
    }

    /// `vmm ctl ARGS` against this VM: exit code and stdout + stderr.
    pub fn ctl(&self, args: &[&str]) -> (Option<i32>, String) {
        let mut all: Vec<&std::ffi::OsStr> = vec!["ctl".as_ref(), "--api-socket".as_ref()];
        all.push(self.sock.as_os_str());
        all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        let r = run_vmm(all);
        (r.code(), r.stdout() + &r.stderr())
    }

    /// `vmm ctl --json stats`, `None` while the socket is not up.
    pub fn stats(&self) -> Option<Value> {
        let (code, out) = self.ctl(&["--json", "stats"]);
        if code != Some(0) {
            return None;
        }
        serde_json::from_str(out.trim()).ok()
    }

    /// Poll the stats every `every` until `done(stats, at_init)` holds and return
    /// those stats; panics (with the console and stderr) when the VM ends or
    /// `limit` passes first. `what` names what is awaited, in messages and in the
    /// progress lines printed every 30 s.
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        every: Duration,
        mut done: impl FnMut(&Value, bool) -> bool,
    ) -> Value {
        let since = Instant::now();
        let mut said = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{}",
                    self.diag(&format!(
                        "vmm run ended ({status}) while waiting for {what}"
                    ))
                );
            }
            assert!(
                since.elapsed() < limit,
                "{}",
                self.diag(&format!("no {what} within {limit:?}"))
            );
            std::thread::sleep(every);
            let Some(stats) = self.stats() else { continue };
            let at_init = self.at_init();
            if done(&stats, at_init) {
                eprintln!("{}: {what} after {:.1} s", self.name, self.elapsed());
                return stats;
            }
            if said.elapsed() > Duration::from_secs(30) {
                eprintln!(
                    "{}: {:.0} s, waiting for {what}; /init started: {at_init}; balloon {}",
                    self.name,
                    self.elapsed(),
                    stats["balloon"]
                );
                said = Instant::now();
            }
        }
    }

    /// `vmm ctl stop`; checks that `vmm run` exits 0 and removes its socket, and
    /// returns its run report (`--stats-json`).
    pub fn stop(mut self) -> Value {
        let (code, out) = self.ctl(&["stop"]);
        assert_eq!(code, Some(0), "vmm ctl stop: {out}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("waiting for vmm") {
                break st;
            }
            assert!(Instant::now() < deadline, "{}", self.diag("did not stop"));
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(status.code(), Some(0), "{}", self.diag("after ctl stop"));
        assert!(!self.sock.exists(), "the API socket outlived the VM");
        serde_json::from_str(&read_lossy(&self.json))
            .unwrap_or_else(|e| panic!("{}", self.diag(&format!("run report unreadable: {e}"))))
    }
}

impl Drop for LinuxVm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for p in [&self.sock, &self.serial, &self.json, &self.stderr] {
            let _ = std::fs::remove_file(p);
        }
    }
}
