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

/// Whether a [`probe`] shows the emulator's lost interrupt: L1's CPU halted
/// (`HLT=1` in every register snapshot) with interrupts enabled (`IF`, bit 9 of
/// `RFL`/`EFL`), nothing in service (ISR empty) and a vector waiting in the local
/// APIC's IRR above the processor priority (PPR). A real CPU never stays halted
/// so: it takes the interrupt. Seen with QEMU's nested SVM (docs/ARCHITECTURE.md,
/// the emulated host): L1 then waits for good for a timer interrupt.
pub fn lost_interrupt(probe: &str) -> bool {
    let words = || probe.lines().flat_map(str::split_whitespace);
    let halted: Vec<bool> = words()
        .filter_map(|w| w.strip_prefix("HLT="))
        .map(|v| v == "1")
        .collect();
    let if_set: Vec<bool> = words()
        .filter_map(|w| w.strip_prefix("RFL=").or_else(|| w.strip_prefix("EFL=")))
        .map(|v| u64::from_str_radix(v, 16).is_ok_and(|f| f & 0x200 != 0))
        .collect();
    // `info lapic`: "ISR\t (none)", "IRR\t 236 ", "APR 0x00 TPR 0x10 ... PPR 0x10".
    let apic_line = |name: &str| {
        probe
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>())
    };
    let highest_pending =
        apic_line("IRR").and_then(|v| v.iter().filter_map(|x| x.parse::<u32>().ok()).max());
    let none_in_service = apic_line("ISR").is_some_and(|v| v == ["(none)"]);
    let ppr = probe.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        let at = w.iter().position(|&x| x == "PPR")?;
        u32::from_str_radix(w.get(at + 1)?.trim_start_matches("0x"), 16).ok()
    });
    let deliverable = matches!((highest_pending, ppr), (Some(v), Some(p)) if v >> 4 > p >> 4);
    !halted.is_empty()
        && halted.iter().all(|&h| h)
        && !if_set.is_empty()
        && if_set.iter().all(|&i| i)
        && none_in_service
        && deliverable
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

#[cfg(test)]
mod tests {
    use super::lost_interrupt;

    /// Trimmed from the probe of a real freeze (stop 23's CI run, QEMU 10.0.2).
    const FROZEN: &str = "--- info registers #1\n\
        CPU#0\n\
        RAX=ffffffffb1e178a0 RBX=0000000000000000 RCX=0000000000000000 RDX=4000000000000000\n\
        RIP=ffffffffb1e17a0b RFL=00000206 [-----P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n\
        --- info registers #2\n\
        RIP=ffffffffb1e17a0b RFL=00000206 [-----P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n\
        --- info lapic\n\
        Timer\t DCR=0x3 (divide by 16) initial_count = 239669 current_count = 0\n\
        ISR\t (none)\n\
        IRR\t 236 \n\
        APR 0x00 TPR 0x10 DFR 0x0f LDR 0x01 PPR 0x10\n\
        QEMU used 0.13 s of CPU in 4.87 s (3%)\n";

    #[test]
    fn a_halted_cpu_with_a_pending_vector_is_the_lost_interrupt() {
        // 64-bit mode prints RFL=, 32-bit EFL=: both are read.
        assert!(lost_interrupt(FROZEN));
        assert!(lost_interrupt(&FROZEN.replace("RFL=", "EFL=")));
        let probe = FROZEN;
        // Not halted in one snapshot: the CPU runs (a spin, not this freeze).
        assert!(!lost_interrupt(&probe.replacen("HLT=1", "HLT=0", 1)));
        // Interrupts disabled: a halt the guest asked for.
        assert!(!lost_interrupt(&probe.replace("00000206", "00000006")));
        // Nothing pending, or one in service: the CPU waits for good reason.
        assert!(!lost_interrupt(
            &probe.replace("IRR\t 236 ", "IRR\t (none)")
        ));
        assert!(!lost_interrupt(&probe.replace("ISR\t (none)", "ISR\t 236")));
        // Masked by the processor priority.
        assert!(!lost_interrupt(&probe.replace("PPR 0x10", "PPR 0xe0")));
        // No monitor: nothing is known.
        assert!(!lost_interrupt("no QEMU monitor at /x: refused\n"));
    }
}
