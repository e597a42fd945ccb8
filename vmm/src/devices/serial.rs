//! The 16550 UART at 0x3f8 (vm-superio) with its interrupt on IRQ 4 through an
//! irqfd, and a watcher of the output for the guest's panic, reboot and halt
//! lines. The bytes go on to a [`super::console::ConsoleWriter`] in `vmm run`,
//! which never blocks the vCPU.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports of a 16550.
pub const COM1_LEN: u16 = 8;
/// Legacy IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// Line printed by Linux when it panics.
pub const PANIC_MARKER: &str = "Kernel panic";
/// Lines Linux prints on an orderly restart / power-off.
pub const REBOOT_MARKERS: [&str; 2] = ["reboot: Restarting system", "reboot: Power down"];
/// Line Linux prints when it halts (a power-off without a power-off method).
pub const HALT_MARKER: &str = "reboot: System halted";

/// An `EventFd` raising the UART's interrupt.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// What the watcher saw in the guest's serial output.
#[derive(Debug, Default)]
pub struct SerialFlags {
    /// A panic line appeared.
    pub panicked: AtomicBool,
    /// An orderly restart / power-off line appeared.
    pub rebooting: AtomicBool,
    /// The kernel said it halts ([`HALT_MARKER`]).
    pub halting: AtomicBool,
}

/// The serial sink: forwards bytes and scans each line for markers.
pub struct SerialOut {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    flags: Arc<SerialFlags>,
}

impl std::fmt::Debug for SerialOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialOut")
            .field("flags", &self.flags)
            .finish()
    }
}

impl SerialOut {
    /// A sink writing to `out` and reporting markers to `flags`.
    pub fn new(out: Box<dyn Write + Send>, flags: Arc<SerialFlags>) -> Self {
        SerialOut {
            out,
            line: Vec::with_capacity(256),
            flags,
        }
    }

    fn scan_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        if text.contains(PANIC_MARKER) {
            self.flags.panicked.store(true, Ordering::SeqCst);
        }
        if REBOOT_MARKERS.iter().any(|m| text.contains(m)) {
            self.flags.rebooting.store(true, Ordering::SeqCst);
        }
        if text.contains(HALT_MARKER) {
            self.flags.halting.store(true, Ordering::SeqCst);
        }
        self.line.clear();
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.scan_line();
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        if self.line.len() >= PANIC_MARKER.len() {
            // A panic line may be the last thing the guest prints before it resets.
            let text = String::from_utf8_lossy(&self.line);
            if text.contains(PANIC_MARKER) {
                self.flags.panicked.store(true, Ordering::SeqCst);
            }
        }
        self.out.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The UART device.
pub type SerialDevice = Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOut>;

/// A UART writing to `out`, interrupting through `irq`.
pub fn new_serial(irq: EventFd, out: SerialOut) -> SerialDevice {
    Serial::new(IrqTrigger(irq), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_panic_and_reboot_lines() {
        let flags = Arc::new(SerialFlags::default());
        let mut o = SerialOut::new(Box::new(io::sink()), flags.clone());
        o.write_all(b"[ 1.0] hello\n").unwrap();
        assert!(!flags.panicked.load(Ordering::SeqCst));
        o.write_all(b"[ 2.0] Kernel pa").unwrap();
        o.write_all(b"nic - not syncing: Attempted to kill init!\n")
            .unwrap();
        assert!(flags.panicked.load(Ordering::SeqCst));
        assert!(!flags.rebooting.load(Ordering::SeqCst));
        o.write_all(b"reboot: Restarting system\n").unwrap();
        assert!(flags.rebooting.load(Ordering::SeqCst));
        assert!(!flags.halting.load(Ordering::SeqCst));
        o.write_all(b"[ 9.9] reboot: System halted\n").unwrap();
        assert!(flags.halting.load(Ordering::SeqCst));
    }

    #[test]
    fn uart_transmits_to_sink() {
        let flags = Arc::new(SerialFlags::default());
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = new_serial(
            evt.try_clone().unwrap(),
            SerialOut::new(Box::new(io::sink()), flags.clone()),
        );
        for b in b"Kernel panic\n" {
            s.write(0, *b).unwrap();
        }
        assert!(flags.panicked.load(Ordering::SeqCst));
    }
}
