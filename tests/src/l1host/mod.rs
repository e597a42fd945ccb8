//! The emulated hardware-virtualization host ("L1"): QEMU in software (TCG) mode
//! with `-cpu max` (AMD-V + NPT) boots a Debian cloud kernel that loads KVM, so
//! `vmm` runs on KVM's TDP MMU, the MMU every real user has.
//!
//! One QEMU boot runs a [`Batch`] of shell commands (usually `vmm ...`) one after
//! another and hands back each command's output and exit code. The batch travels
//! as a second cpio archive appended to the L1 image's base initramfs
//! (`resources/l1host/build.sh`): the `vmm` binary, its shared libraries, guest
//! images and `/batch/run.sh`. Results come back on L1's second serial port, framed
//! by a tag unique to the batch ([`protocol`]); L1's console (first serial port) is
//! kept for failure messages and for commands run in [`Mode::Console`]. Every
//! command has a time limit inside L1, and the whole boot a deadline outside it:
//! a batch never hangs a test.
//!
//! Why serial ports rather than a 9p share or a disk: they need no driver beyond
//! the 8250 UART built into every x86 kernel, no image tooling on the host, and
//! the transcript is readable as it grows (progress lines while the batch runs).

pub mod cpio;
pub mod monitor;
pub mod protocol;

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

pub use protocol::{CommandResult, Transcript};

/// Test-env key of the L1 image directory (`resources/l1host/build.sh`).
pub const L1HOST: &str = "VMM_TEST_L1HOST";
/// What L1 gets of the machine.
pub const DEFAULT_MEMORY_MIB: u32 = 3072;
/// Hugetlb 2M pages L1 reserves for its guests.
pub const DEFAULT_HUGEPAGES: u32 = 640;
/// Time L1 gets to boot to its /init, on top of the commands' own limits.
const BOOT_ALLOWANCE: Duration = Duration::from_secs(180);
/// How long past a command's own limit the driver waits for its end (L1 kills it at
/// the limit; 20 s later L1's watchdog reports what still holds it, see `init`).
const COMMAND_GRACE: Duration = Duration::from_secs(60);
/// L1 sends a heartbeat every 30 s while a command runs; none for this long means
/// L1 itself is frozen.
const HEARTBEAT_LOST: Duration = Duration::from_secs(100);
/// How many fresh L1 boots run what is left of a batch after the emulator lost an
/// interrupt ([`monitor::lost_interrupt`]).
const BOOTS_AFTER_A_LOST_INTERRUPT: usize = 2;

/// The L1 image: kernel and base initramfs.
#[derive(Debug, Clone)]
pub struct Image {
    /// `vmlinuz` of the L1 kernel.
    pub kernel: PathBuf,
    /// `base.cpio.gz`: busybox, KVM modules, /init.
    pub base_initrd: PathBuf,
}

impl Image {
    /// The image built by `resources/setup-host.sh` (or named by `$VMM_TEST_L1HOST`),
    /// or why there is none.
    pub fn locate() -> Result<Image, String> {
        let dir = crate::images::image(L1HOST)?;
        let img = Image {
            kernel: dir.join("vmlinuz"),
            base_initrd: dir.join("base.cpio.gz"),
        };
        for p in [&img.kernel, &img.base_initrd] {
            if !p.is_file() {
                return Err(format!(
                    "{} missing; rebuild with `bash resources/l1host/build.sh`",
                    p.display()
                ));
            }
        }
        Ok(img)
    }
}

/// Where a command's stdout goes inside L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Captured and sent back with the result.
    Capture,
    /// L1's own console (a slow emulated serial line, kept in
    /// [`BatchOutcome::console`]); stderr is still captured.
    Console,
}

/// One command of a batch.
#[derive(Debug, Clone)]
pub struct Command {
    /// Unique id (letters, digits, `-`, `_`).
    pub id: String,
    /// A `sh -c` command line run inside L1 (`/bin/vmm` is the VMM).
    pub shell: String,
    /// Killed (rc 137) when it runs longer.
    pub limit: Duration,
    /// Where its stdout goes.
    pub mode: Mode,
}

/// Commands and the files they need, for one L1 boot.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Run in order.
    pub commands: Vec<Command>,
    /// Files copied into L1: (path in L1, host path).
    pub files: Vec<(String, PathBuf)>,
    /// L1 RAM in MiB.
    pub memory_mib: u32,
    /// 2M hugetlb pages L1 reserves.
    pub hugepages: u32,
    /// 1G hugetlb pages L1 reserves at boot (kernel command line
    /// `hugepagesz=1G hugepages=N`: before its memory fragments).
    pub gigpages: u32,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            commands: Vec::new(),
            files: Vec::new(),
            memory_mib: DEFAULT_MEMORY_MIB,
            hugepages: DEFAULT_HUGEPAGES,
            gigpages: 0,
        }
    }
}

impl Batch {
    /// Add a command.
    pub fn command(&mut self, id: &str, limit_s: u64, mode: Mode, shell: impl Into<String>) {
        assert!(
            !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "command id {id:?}: letters, digits, - and _ only"
        );
        self.commands.push(Command {
            id: id.to_string(),
            shell: shell.into(),
            limit: Duration::from_secs(limit_s),
            mode,
        });
    }

    /// Copy `host` into L1 at `l1_path` (absolute).
    pub fn file(&mut self, l1_path: &str, host: impl Into<PathBuf>) {
        self.files.push((l1_path.to_string(), host.into()));
    }

    /// The deadline of the whole boot.
    pub fn deadline(&self) -> Duration {
        BOOT_ALLOWANCE
            + self.commands.iter().map(|c| c.limit).sum::<Duration>()
            + Duration::from_secs(30)
    }

    /// The commands of this batch that `t` has no result for, with the same files
    /// and L1 size.
    pub fn unfinished(&self, t: &Transcript) -> Batch {
        Batch {
            commands: self
                .commands
                .iter()
                .filter(|c| t.result(&c.id).is_none())
                .cloned()
                .collect(),
            ..self.clone()
        }
    }

    fn run_script(&self) -> String {
        let mut s = String::from("# generated by tests/src/l1host\n");
        for c in &self.commands {
            let mode = match c.mode {
                Mode::Capture => "capture",
                Mode::Console => "console",
            };
            let _ = writeln!(
                s,
                "run_cmd {} {} {mode} {}",
                c.id,
                c.limit.as_secs().max(1),
                sh_quote(&c.shell)
            );
        }
        s
    }
}

/// L1's kernel command line for `batch`.
fn kernel_command_line(batch: &Batch) -> String {
    let mut c = String::from("console=ttyS0 panic=-1 rdinit=/init quiet");
    if batch.gigpages > 0 {
        let _ = write!(c, " hugepagesz=1G hugepages={}", batch.gigpages);
    }
    c
}

/// Quote `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What a batch produced.
#[derive(Debug)]
pub struct BatchOutcome {
    /// The results channel, parsed.
    pub transcript: Transcript,
    /// L1's console (its kernel log and [`Mode::Console`] output).
    pub console: String,
    /// QEMU's own stdout/stderr.
    pub qemu_log: String,
    /// Wall time of the boot.
    pub wall: Duration,
    /// QEMU was killed at the deadline.
    pub timed_out: bool,
    /// It was because L1 froze: no heartbeat from L1 while a command ran (not merely
    /// a command that outlived its limit in a living L1).
    pub frozen: bool,
    /// When it was: QEMU's CPU use and the emulated CPU's registers just before
    /// ([`monitor::probe`]).
    pub qemu_probe: String,
    /// Earlier boots of this batch that froze because the emulator lost an
    /// interrupt, each as "command that was running: QEMU's probe"; what they left
    /// unfinished ran in a fresh L1 ([`run`]).
    pub lost_interrupts: Vec<String>,
}

impl BatchOutcome {
    /// Whether every command ran and L1 powered off.
    pub fn complete(&self) -> bool {
        self.transcript.done && !self.timed_out
    }

    /// This outcome followed by `next`, the boot that ran what this one left
    /// unfinished after it froze on a lost interrupt.
    fn then(self, next: BatchOutcome) -> BatchOutcome {
        let mut lost = self.lost_interrupts;
        lost.push(format!(
            "{}: {}",
            self.transcript
                .running
                .as_deref()
                .unwrap_or("(between commands)"),
            self.qemu_probe
        ));
        lost.extend(next.lost_interrupts);
        let (a, b) = (self.transcript, next.transcript);
        let mut errors = a.errors;
        errors.extend(b.errors);
        let mut results = a.results;
        results.extend(b.results);
        let mut diag = a.diag;
        diag.extend(b.diag);
        let again = "\n--- L1 booted again: the one above froze on a lost interrupt ---\n";
        BatchOutcome {
            transcript: Transcript {
                booted: a.booted && b.booted,
                host: if b.host.is_empty() { a.host } else { b.host },
                errors,
                results,
                running: b.running,
                done: b.done,
                alive: b.alive,
                diag,
            },
            console: format!("{}{again}{}", self.console, next.console),
            qemu_log: format!("{}{again}{}", self.qemu_log, next.qemu_log),
            wall: self.wall + next.wall,
            timed_out: next.timed_out,
            frozen: next.frozen,
            qemu_probe: next.qemu_probe,
            lost_interrupts: lost,
        }
    }

    /// What went wrong, for a failure message: state, L1's last console lines,
    /// QEMU's messages.
    pub fn diagnosis(&self) -> String {
        let t = &self.transcript;
        let mut d = format!(
            "L1 batch: booted {}, done {}, frozen {}, timed out {} after {:.0} s, running {:?}, errors {:?}, \
             finished {:?}, last heartbeat {:?}",
            t.booted,
            t.done,
            self.frozen,
            self.timed_out,
            self.wall.as_secs_f64(),
            t.running,
            t.errors,
            t.results
                .iter()
                .map(|r| format!("{}={}", r.id, r.rc))
                .collect::<Vec<_>>(),
            t.alive,
        );
        if !t.diag.is_empty() {
            // The watchdog in L1 ran: L1 lived, the command outlived its KILL.
            let _ = write!(
                d,
                "\n--- L1's watchdog (tasks, kernel stacks, kernel log):\n{}",
                t.diag.join("\n")
            );
        }
        if !self.qemu_probe.is_empty() {
            let _ = write!(d, "\n--- QEMU when stopped:\n{}", self.qemu_probe);
        }
        for l in &self.lost_interrupts {
            let _ = write!(
                d,
                "\n--- an earlier boot froze on a lost interrupt while running {l}"
            );
        }
        let _ = write!(
            d,
            "\n--- last L1 console lines:\n{}\n--- qemu:\n{}",
            crate::vmm_bin::tail(&self.console, 40),
            crate::vmm_bin::tail(&self.qemu_log, 10)
        );
        d
    }
}

/// Why a batch could not be started.
#[derive(Debug, thiserror::Error)]
pub enum L1Error {
    /// A file of the batch could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What the file is.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// `ldd` could not list the binary's libraries.
    #[error("ldd {0}: {1}")]
    Ldd(PathBuf, String),
    /// QEMU could not be started.
    #[error("cannot start {0} (install qemu-system-x86, or run resources/setup-host.sh): {1}")]
    Qemu(String, std::io::Error),
    /// The QEMU the test env names is not there.
    #[error("{0}")]
    NoQemu(String),
}

/// Test-env key of the QEMU that runs L1 (`resources/setup-host.sh` installs one
/// whose nested SVM does not lose L1's timer interrupt, see `resources/l1host/qemu.sh`); default:
/// `qemu-system-x86_64` from `$PATH`.
pub const QEMU_KEY: &str = "VMM_TEST_QEMU";

/// The QEMU to run L1 with: the one the test env names (it must exist), else the
/// one on `$PATH`.
fn qemu() -> Result<String, L1Error> {
    match crate::images::env_value(QEMU_KEY) {
        None => Ok("qemu-system-x86_64".to_string()),
        Some(_) => crate::images::image(QEMU_KEY)
            .map(|p| p.display().to_string())
            .map_err(L1Error::NoQemu),
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> L1Error + 'a {
    move |source| L1Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The shared libraries `ldd` lists for `bin` (absolute paths).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>, L1Error> {
    let out = Process::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| L1Error::Ldd(bin.to_path_buf(), e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: "not a dynamic executable".
        return Ok(Vec::new());
    }
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// `bin` without debug information when `strip` is there (smaller initramfs), else as is.
fn stripped(bin: &Path, work: &Path) -> PathBuf {
    let out = work.join("vmm.stripped");
    let ok = Process::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        out
    } else {
        bin.to_path_buf()
    }
}

/// Add `path`'s parent directories (once each) to the archive.
fn parents(a: &mut cpio::Archive, seen: &mut Vec<String>, path: &str) {
    let mut acc = String::new();
    let comps: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        acc.push('/');
        acc.push_str(c);
        if !seen.contains(&acc) {
            seen.push(acc.clone());
            a.dir(&acc);
        }
    }
}

/// Boot L1 and run `batch`, with `vmm` at `/bin/vmm`. When L1 freezes because the
/// emulator lost an interrupt ([`monitor::lost_interrupt`]: QEMU's fault, not L1's
/// nor the VMM's), the commands it left unfinished (the one it froze in too) run
/// again in a fresh L1, at most [`BOOTS_AFTER_A_LOST_INTERRUPT`] times; the outcome
/// lists each freeze ([`BatchOutcome::lost_interrupts`]). Any other freeze or
/// timeout ends the batch there.
pub fn run(img: &Image, vmm: &Path, batch: &Batch) -> Result<BatchOutcome, L1Error> {
    let mut out = boot_once(img, vmm, batch)?;
    for _ in 0..BOOTS_AFTER_A_LOST_INTERRUPT {
        if !(out.frozen && monitor::lost_interrupt(&out.qemu_probe)) {
            break;
        }
        let rest = batch.unfinished(&out.transcript);
        if rest.commands.is_empty() {
            break;
        }
        eprintln!(
            "[l1host] L1 froze on a lost interrupt (halted, interrupts on, vector pending: \
             QEMU's nested SVM); running the {} unfinished commands ({}) in a fresh L1",
            rest.commands.len(),
            rest.commands
                .iter()
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let next = boot_once(img, vmm, &rest)?;
        out = out.then(next);
    }
    Ok(out)
}

/// Boot L1 once and run `batch`.
fn boot_once(img: &Image, vmm: &Path, batch: &Batch) -> Result<BatchOutcome, L1Error> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let work = std::env::temp_dir().join(format!("vmm-l1-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(io("work directory", &work))?;
    let tag = format!(
        "@@L1-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
            ^ u128::from(std::process::id())
    );

    let mut a = cpio::Archive::new();
    let mut seen = Vec::new();
    let mut files: Vec<(String, PathBuf, u32)> =
        vec![("/bin/vmm".into(), stripped(vmm, &work), 0o755)];
    for lib in shared_libraries(vmm)? {
        let real = fs::canonicalize(&lib).map_err(io("shared library", &lib))?;
        files.push((lib.display().to_string(), real, 0o755));
    }
    for (l1, host) in &batch.files {
        files.push((l1.clone(), host.clone(), 0o644));
    }
    for (l1, host, perm) in &files {
        let data = fs::read(host).map_err(io("batch file", host))?;
        parents(&mut a, &mut seen, l1);
        a.file(l1, *perm, &data);
    }
    parents(&mut a, &mut seen, "/batch/run.sh");
    a.file(
        "/batch/env",
        0o644,
        format!("L1_TAG={tag}\nL1_HUGEPAGES={}\n", batch.hugepages).as_bytes(),
    );
    a.file("/batch/run.sh", 0o644, batch.run_script().as_bytes());

    let initrd = work.join("l1.cpio");
    {
        let mut base =
            fs::read(&img.base_initrd).map_err(io("L1 base initramfs", &img.base_initrd))?;
        // An uncompressed archive must start 4-byte aligned; the kernel skips zeros.
        base.resize(base.len().div_ceil(4) * 4, 0);
        let mut f = fs::File::create(&initrd).map_err(io("L1 initramfs", &initrd))?;
        f.write_all(&base).map_err(io("L1 initramfs", &initrd))?;
        a.finish(&mut f).map_err(io("L1 initramfs", &initrd))?;
    }

    let console = work.join("console.log");
    let results = work.join("results.log");
    let qemu_log = work.join("qemu.log");
    let monitor_sock = work.join("monitor.sock");
    let log_file = fs::File::create(&qemu_log).map_err(io("QEMU log", &qemu_log))?;
    let log_err = log_file.try_clone().map_err(io("QEMU log", &qemu_log))?;
    let start = Instant::now();
    let qemu = qemu()?;
    let mut child = Process::new(&qemu)
        .args(["-accel", "tcg,thread=single", "-cpu", "max", "-smp", "1"])
        .args(["-m", &format!("{}M", batch.memory_mib)])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            &monitor::arg(&monitor_sock),
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &kernel_command_line(batch)])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .spawn()
        .map_err(|e| L1Error::Qemu(qemu.clone(), e))?;

    let deadline = batch.deadline();
    let mut reported = 0;
    let mut timed_out = false;
    // What QEMU said about L1 when the driver gave up on it.
    let mut qemu_probe = String::new();
    // The command L1 runs now and when the driver saw it begin.
    let mut current: Option<(String, Instant)> = None;
    // The running command's last heartbeat and when the driver read it.
    let mut last_alive: Option<(String, u64)> = None;
    let mut heard = Instant::now();
    let mut stopped_frozen = false;
    loop {
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        let text = fs::read_to_string(&results).unwrap_or_default();
        let t = protocol::parse(&tag, &text);
        for r in t.results.iter().skip(reported) {
            eprintln!(
                "[l1host {:>4.0} s] {} exited {} ({} s in L1)",
                start.elapsed().as_secs_f64(),
                r.id,
                r.rc,
                r.secs
            );
        }
        reported = t.results.len();
        if exited {
            break;
        }
        if current.as_ref().map(|(id, _)| id) != t.running.as_ref() {
            current = t.running.clone().map(|id| (id, Instant::now()));
        }
        if t.alive != last_alive {
            last_alive = t.alive.clone();
            heard = Instant::now();
        }
        let overdue = current.as_ref().is_some_and(|(id, since)| {
            let limit = batch
                .commands
                .iter()
                .find(|c| &c.id == id)
                .map_or(Duration::ZERO, |c| c.limit);
            since.elapsed() > limit + COMMAND_GRACE
        });
        // No heartbeat for a while, though L1 sends one every 30 s: L1 is frozen.
        let frozen = current
            .as_ref()
            .is_some_and(|(_, since)| since.elapsed().min(heard.elapsed()) > HEARTBEAT_LOST);
        if overdue || frozen {
            eprintln!(
                "[l1host {:>4.0} s] {} {:?}: stopping QEMU",
                start.elapsed().as_secs_f64(),
                if frozen {
                    "L1 frozen (no heartbeat) while running"
                } else {
                    "L1 did not end past the limit of"
                },
                t.running
            );
        }
        if overdue || frozen || start.elapsed() > deadline {
            timed_out = true;
            stopped_frozen = frozen;
            qemu_probe = monitor::probe(child.id(), &monitor_sock);
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let read = |p: &Path| {
        fs::read(p)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let outcome = BatchOutcome {
        transcript: protocol::parse(&tag, &read(&results)),
        console: read(&console),
        qemu_log: read(&qemu_log),
        wall: start.elapsed(),
        timed_out,
        frozen: stopped_frozen,
        qemu_probe,
        lost_interrupts: Vec::new(),
    };
    if std::env::var_os("VMM_L1_KEEP").is_none() {
        let _ = fs::remove_dir_all(&work);
    } else {
        eprintln!("[l1host] kept {}", work.display());
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_script_quotes_commands() {
        let mut b = Batch::default();
        b.command("a", 10, Mode::Capture, "echo 'x' && /bin/vmm run");
        b.command("b", 0, Mode::Console, "true");
        let s = b.run_script();
        assert!(s.contains(r"run_cmd a 10 capture 'echo '\''x'\'' && /bin/vmm run'"));
        assert!(s.contains("run_cmd b 1 console 'true'"));
        assert!(b.deadline() > Duration::from_secs(200));
        assert!(!kernel_command_line(&b).contains("hugepagesz"));
        b.gigpages = 2;
        assert!(kernel_command_line(&b).ends_with(" hugepagesz=1G hugepages=2"));
    }

    fn outcome(text: &str, frozen: bool) -> BatchOutcome {
        BatchOutcome {
            transcript: protocol::parse("T", text),
            console: format!("console {frozen}"),
            qemu_log: String::new(),
            wall: Duration::from_secs(10),
            timed_out: frozen,
            frozen,
            qemu_probe: if frozen {
                "probe".into()
            } else {
                String::new()
            },
            lost_interrupts: Vec::new(),
        }
    }

    #[test]
    fn a_fresh_boot_runs_what_a_frozen_one_left_and_the_outcomes_join() {
        let mut b = Batch::default();
        for id in ["a", "b", "c"] {
            b.command(id, 10, Mode::Capture, "true");
        }
        b.file("/x", "/tmp/x");
        let first = outcome(
            "T BOOTED\nT HOST kvm=yes\nT BEGIN a\nT END a rc=0 secs=1\nT BEGIN b\n",
            true,
        );
        let rest = b.unfinished(&first.transcript);
        let ids: Vec<&str> = rest.commands.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        assert_eq!((rest.files.len(), rest.memory_mib), (1, b.memory_mib));
        let second = outcome(
            "T BOOTED\nT HOST kvm=yes\nT BEGIN b\nT END b rc=0 secs=1\nT BEGIN c\nT END c rc=3 secs=1\nT DONE\n",
            false,
        );
        let all = first.then(second);
        assert!(all.complete() && !all.frozen);
        let rcs: Vec<(&str, i32)> = all
            .transcript
            .results
            .iter()
            .map(|r| (r.id.as_str(), r.rc))
            .collect();
        assert_eq!(rcs, [("a", 0), ("b", 0), ("c", 3)]);
        assert_eq!(all.lost_interrupts, ["b: probe"]);
        assert!(all.console.starts_with("console true") && all.console.ends_with("console false"));
        assert_eq!(all.wall, Duration::from_secs(20));
        assert!(all
            .diagnosis()
            .contains("froze on a lost interrupt while running b: probe"));
        assert!(b.unfinished(&all.transcript).commands.is_empty());
    }

    #[test]
    #[should_panic(expected = "letters, digits")]
    fn command_ids_are_checked() {
        Batch::default().command("a b", 1, Mode::Capture, "true");
    }
}
