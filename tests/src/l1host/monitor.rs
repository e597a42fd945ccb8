//! What QEMU itself says about an L1 that went silent: its human monitor (HMP, on a
//! unix socket) for the emulated CPU's registers, and QEMU's own CPU time from
//! `/proc`. Registers that do not move while QEMU burns a CPU mean the emulated CPU
//! spins in one place (in L1's kernel, or in the nested guest: its RIP and CR3 tell
//! which); a QEMU at 0% CPU waits on something outside.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// QEMU's `-monitor` argument for a monitor on socket `path`.
pub fn arg(path: &Path) -> String {
    format!("unix:{},server=on,wait=off", path.display())
}

/// How many register snapshots [`probe`] takes, and how far apart.
const SNAPSHOTS: usize = 3;
const APART: Duration = Duration::from_secs(1);

/// A report on QEMU (process `pid`, monitor socket `sock`): its CPU use over the
/// probe and a few `info registers` snapshots. Never fails: what it cannot get, it
/// says.
pub fn probe(pid: u32, sock: &Path) -> String {
    let mut out = String::new();
    let cpu0 = cpu_ticks(pid);
    let t0 = Instant::now();
    match UnixStream::connect(sock) {
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
            let _ = drain(&mut s);
            out.push_str(&command(&mut s, "info cpus"));
            for i in 0..SNAPSHOTS {
                if i > 0 {
                    std::thread::sleep(APART);
                }
                out.push_str(&format!("--- info registers #{}\n", i + 1));
                out.push_str(&command(&mut s, "info registers"));
            }
            // The local APIC: its timer (armed? TSC deadline?) and pending vectors.
            out.push_str("--- info lapic\n");
            out.push_str(&command(&mut s, "info lapic"));
        }
        Err(e) => out.push_str(&format!("no QEMU monitor at {}: {e}\n", sock.display())),
    }
    let secs = t0.elapsed().as_secs_f64();
    match (cpu0, cpu_ticks(pid)) {
        (Some(a), Some(b)) => {
            // USER_HZ is 100 on Linux.
            let used = (b.saturating_sub(a)) as f64 / 100.0;
            out.push_str(&format!(
                "QEMU used {used:.2} s of CPU in {secs:.2} s ({:.0}%)\n",
                100.0 * used / secs.max(0.01)
            ));
        }
        _ => out.push_str("QEMU's CPU time: unreadable\n"),
    }
    out
}

/// Send one HMP command and read its answer (until the socket is quiet).
fn command(s: &mut UnixStream, cmd: &str) -> String {
    if let Err(e) = s.write_all(format!("{cmd}\n").as_bytes()) {
        return format!("({cmd}: {e})\n");
    }
    std::thread::sleep(Duration::from_millis(200));
    let text = drain(s);
    // The monitor echoes the command with terminal escapes; keep readable lines.
    text.lines()
        .filter(|l| !l.contains("(qemu)") && !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Everything the socket has now (up to its read timeout).
fn drain(s: &mut UnixStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while buf.len() < 1 << 20 {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// utime + stime of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}
