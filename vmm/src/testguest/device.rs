//! The port-I/O test device through which test guests talk to the VMM.
//!
//! # Register map (ports `0x0f00..0x0f10`)
//!
//! | port | dir | width | meaning |
//! |---|---|---|---|
//! | `0x0f00` | out | 4 | DOORBELL: gpa (below 4 GiB) of a command block; the device reads and executes it |
//! | `0x0f04` | in | 4 | the index of the vCPU that reads |
//! | `0x0f08` | out | 1, 2, 4 | EXIT with this status, no memory involved |
//! | `0x0f0c` | in | 4 | [`TEST_DEVICE_MAGIC`] |
//!
//! Other ports read as all ones and ignore writes.
//!
//! # Command block (64 bytes, 8-byte aligned, little endian u64 fields)
//!
//! | offset | field |
//! |---|---|
//! | 0 | command ([`CMD_PRINT`] ...) |
//! | 8..48 | arg0 .. arg4 |
//! | 56 | status, written by the device: [`STATUS_OK`] or [`STATUS_REJECTED`] |
//!
//! | command | args |
//! |---|---|
//! | PRINT (1) | arg0 = gpa of the text, arg1 = length (at most [`MAX_PRINT_LEN`]) |
//! | REPORT (2) | arg0 = key ([`ReportKey`]), arg1 = value |
//! | DISCARD (3) | arg0 = gpa, arg1 = length, both 4K aligned, outside the reserved region |
//! | REFILL (4) | as DISCARD |
//! | EXIT (5) | arg0 = status (0 = success) |
//! | FAULT (6) | arg0 = vector, arg1 = error code, arg2 = RIP, arg3 = CR2 |
//! | CHECKPOINT (7) | arg0 = phase; the VMM resumes the vCPU after its own work (e.g. reading stats) |
//!
//! Each vCPU uses its own block, so vCPUs never race on one. Invalid input
//! (bad gpa, length, alignment, command) is logged, counted, answered with
//! [`STATUS_REJECTED`] where the block is readable, and otherwise ignored.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// First port of the device.
pub const TEST_DEVICE_PORT_BASE: u16 = 0x0f00;
/// Number of ports.
pub const TEST_DEVICE_PORT_COUNT: u16 = 0x10;
/// DOORBELL port.
pub const PORT_DOORBELL: u16 = 0x0f00;
/// vCPU index port.
pub const PORT_VCPU_ID: u16 = 0x0f04;
/// Direct EXIT port.
pub const PORT_EXIT: u16 = 0x0f08;
/// Magic port.
pub const PORT_MAGIC: u16 = 0x0f0c;
/// Value read from [`PORT_MAGIC`] ("TGST").
pub const TEST_DEVICE_MAGIC: u32 = 0x5453_4754;

/// Size of a command block.
pub const CMD_BLOCK_SIZE: u64 = 64;
/// Offset of the status field.
pub const CMD_STATUS_OFFSET: u64 = 56;
/// PRINT.
pub const CMD_PRINT: u64 = 1;
/// REPORT.
pub const CMD_REPORT: u64 = 2;
/// DISCARD.
pub const CMD_DISCARD: u64 = 3;
/// REFILL.
pub const CMD_REFILL: u64 = 4;
/// EXIT.
pub const CMD_EXIT: u64 = 5;
/// FAULT.
pub const CMD_FAULT: u64 = 6;
/// CHECKPOINT.
pub const CMD_CHECKPOINT: u64 = 7;
/// Status: command accepted.
pub const STATUS_OK: u64 = 1;
/// Status: command rejected (see the VMM's log).
pub const STATUS_REJECTED: u64 = 2;
/// Longest PRINT.
pub const MAX_PRINT_LEN: u64 = 4096;

/// Keys of REPORT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum ReportKey {
    /// Pages written by `hello`.
    PagesTouched = 1,
    /// Mismatching pages found by a checker.
    Mismatches = 2,
    /// Pages checked by a checker (all generations).
    PagesChecked = 3,
    /// Generations completed.
    Generations = 4,
    /// TSC cycles of a measured phase.
    Cycles = 5,
    /// A checksum.
    Checksum = 6,
    /// Pages discarded.
    PagesDiscarded = 7,
    /// Discarded pages that did not read back as zero.
    NonZeroDiscarded = 8,
}

impl ReportKey {
    /// All keys.
    pub const ALL: [ReportKey; 8] = [
        ReportKey::PagesTouched,
        ReportKey::Mismatches,
        ReportKey::PagesChecked,
        ReportKey::Generations,
        ReportKey::Cycles,
        ReportKey::Checksum,
        ReportKey::PagesDiscarded,
        ReportKey::NonZeroDiscarded,
    ];

    /// The key for a raw value, if known.
    pub fn from_raw(raw: u64) -> Option<ReportKey> {
        Self::ALL.into_iter().find(|k| *k as u64 == raw)
    }

    /// Snake-case name.
    pub fn name(self) -> &'static str {
        match self {
            ReportKey::PagesTouched => "pages_touched",
            ReportKey::Mismatches => "mismatches",
            ReportKey::PagesChecked => "pages_checked",
            ReportKey::Generations => "generations",
            ReportKey::Cycles => "cycles",
            ReportKey::Checksum => "checksum",
            ReportKey::PagesDiscarded => "pages_discarded",
            ReportKey::NonZeroDiscarded => "nonzero_discarded",
        }
    }
}

/// What the VMM must do after a port access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestDeviceAction {
    /// Nothing; resume the vCPU.
    None,
    /// Print this line.
    Print(String),
    /// A result value ([`ReportKey`] as raw u64, unknown keys passed through).
    Report {
        /// Key.
        key: u64,
        /// Value.
        value: u64,
    },
    /// Give back guest RAM `[gpa, gpa + len)`, then resume.
    Discard {
        /// Start (4K aligned).
        gpa: u64,
        /// Length (4K multiple, non-zero).
        len: u64,
    },
    /// Take back guest RAM `[gpa, gpa + len)` (zero filled), then resume.
    Refill {
        /// Start (4K aligned).
        gpa: u64,
        /// Length (4K multiple, non-zero).
        len: u64,
    },
    /// Read what you need (stats), then resume.
    Checkpoint {
        /// Guest-defined phase number.
        phase: u64,
    },
    /// The guest is done; 0 = success.
    Exit(u64),
    /// The guest took an unexpected exception; stop it, it failed.
    Fault {
        /// Exception vector.
        vector: u64,
        /// Error code (0 if the vector has none).
        error_code: u64,
        /// Faulting RIP.
        rip: u64,
        /// CR2 at the time of the exception.
        cr2: u64,
    },
}

/// The test device. Stateless apart from a counter of rejected accesses,
/// so one instance serves all vCPUs (`&self`, `Sync`).
#[derive(Debug)]
pub struct TestDevice {
    reserved: Range<u64>,
    rejected: AtomicU64,
}

impl TestDevice {
    /// A device that refuses DISCARD/REFILL inside `reserved` (the test
    /// guest's code, tables and stacks).
    pub fn new(reserved: Range<u64>) -> TestDevice {
        TestDevice {
            reserved,
            rejected: AtomicU64::new(0),
        }
    }

    /// Whether `port` belongs to the device.
    pub fn handles(port: u16) -> bool {
        (TEST_DEVICE_PORT_BASE..TEST_DEVICE_PORT_BASE + TEST_DEVICE_PORT_COUNT).contains(&port)
    }

    /// Number of rejected accesses so far.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    fn reject(&self, vcpu: usize, why: std::fmt::Arguments<'_>) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        log::warn!("test device: vCPU {vcpu}: ignored: {why}");
    }

    /// Handles a guest `in`.
    pub fn io_in(&self, vcpu: usize, port: u16, data: &mut [u8]) -> TestDeviceAction {
        let value: u32 = match port {
            PORT_VCPU_ID => u32::try_from(vcpu).unwrap_or(u32::MAX),
            PORT_MAGIC => TEST_DEVICE_MAGIC,
            _ => u32::MAX,
        };
        let bytes = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(i).copied().unwrap_or(0xff);
        }
        TestDeviceAction::None
    }

    /// Handles a guest `out`.
    pub fn io_out(
        &self,
        vcpu: usize,
        port: u16,
        data: &[u8],
        mem: &GuestMemoryMmap,
    ) -> TestDeviceAction {
        match port {
            PORT_DOORBELL => {
                let Ok(raw) = <[u8; 4]>::try_from(data) else {
                    self.reject(
                        vcpu,
                        format_args!("doorbell write of {} bytes (need 4)", data.len()),
                    );
                    return TestDeviceAction::None;
                };
                self.command(vcpu, u64::from(u32::from_le_bytes(raw)), mem)
            }
            PORT_EXIT if matches!(data.len(), 1 | 2 | 4) => {
                let mut raw = [0u8; 8];
                raw[..data.len()].copy_from_slice(data);
                TestDeviceAction::Exit(u64::from_le_bytes(raw))
            }
            _ => {
                self.reject(
                    vcpu,
                    format_args!("write of {} bytes to port {port:#x}", data.len()),
                );
                TestDeviceAction::None
            }
        }
    }

    fn in_ram(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        len > 0 && mem.check_range(GuestAddress(gpa), len as usize) && end <= mem_end(mem)
    }

    fn command(&self, vcpu: usize, block: u64, mem: &GuestMemoryMmap) -> TestDeviceAction {
        if !block.is_multiple_of(8) || !Self::in_ram(mem, block, CMD_BLOCK_SIZE) {
            self.reject(
                vcpu,
                format_args!("command block at {block:#x} not 8-byte aligned in RAM"),
            );
            return TestDeviceAction::None;
        }
        let mut raw = [0u8; 48];
        if let Err(e) = mem.read_slice(&mut raw, GuestAddress(block)) {
            self.reject(
                vcpu,
                format_args!("reading command block at {block:#x}: {e}"),
            );
            return TestDeviceAction::None;
        }
        let f = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let (cmd, a0, a1, a2, a3) = (f(0), f(1), f(2), f(3), f(4));
        let action = match cmd {
            CMD_PRINT => self.print(vcpu, a0, a1, mem),
            CMD_REPORT => Some(TestDeviceAction::Report { key: a0, value: a1 }),
            CMD_DISCARD | CMD_REFILL => self.range(vcpu, cmd, a0, a1, mem),
            CMD_EXIT => Some(TestDeviceAction::Exit(a0)),
            CMD_FAULT => Some(TestDeviceAction::Fault {
                vector: a0,
                error_code: a1,
                rip: a2,
                cr2: a3,
            }),
            CMD_CHECKPOINT => Some(TestDeviceAction::Checkpoint { phase: a0 }),
            _ => {
                self.reject(
                    vcpu,
                    format_args!("unknown command {cmd} in block {block:#x}"),
                );
                None
            }
        };
        let status = if action.is_some() {
            STATUS_OK
        } else {
            STATUS_REJECTED
        };
        if let Err(e) = mem.write_obj(status, GuestAddress(block + CMD_STATUS_OFFSET)) {
            log::warn!("test device: vCPU {vcpu}: writing status at {block:#x}: {e}");
        }
        action.unwrap_or(TestDeviceAction::None)
    }

    fn print(
        &self,
        vcpu: usize,
        gpa: u64,
        len: u64,
        mem: &GuestMemoryMmap,
    ) -> Option<TestDeviceAction> {
        if len > MAX_PRINT_LEN || (len > 0 && !Self::in_ram(mem, gpa, len)) {
            self.reject(
                vcpu,
                format_args!("PRINT of {len} bytes at {gpa:#x} (max {MAX_PRINT_LEN}, in RAM)"),
            );
            return None;
        }
        let mut buf = vec![0u8; len as usize];
        if let Err(e) = mem.read_slice(&mut buf, GuestAddress(gpa)) {
            self.reject(vcpu, format_args!("PRINT reading {gpa:#x}: {e}"));
            return None;
        }
        Some(TestDeviceAction::Print(
            String::from_utf8_lossy(&buf).into_owned(),
        ))
    }

    fn range(
        &self,
        vcpu: usize,
        cmd: u64,
        gpa: u64,
        len: u64,
        mem: &GuestMemoryMmap,
    ) -> Option<TestDeviceAction> {
        let page = super::layout::PAGE;
        let overlaps_reserved =
            gpa < self.reserved.end && gpa.saturating_add(len) > self.reserved.start;
        if !gpa.is_multiple_of(page)
            || !len.is_multiple_of(page)
            || !Self::in_ram(mem, gpa, len)
            || overlaps_reserved
        {
            let what = if cmd == CMD_DISCARD {
                "DISCARD"
            } else {
                "REFILL"
            };
            self.reject(
                vcpu,
                format_args!(
                    "{what} [{gpa:#x}, +{len:#x}): needs 4K alignment, non-zero length, RAM outside reserved {:#x?}",
                    self.reserved
                ),
            );
            return None;
        }
        Some(if cmd == CMD_DISCARD {
            TestDeviceAction::Discard { gpa, len }
        } else {
            TestDeviceAction::Refill { gpa, len }
        })
    }
}

/// End of the highest guest memory region.
fn mem_end(mem: &GuestMemoryMmap) -> u64 {
    mem.last_addr().0.saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    fn block(mem: &GuestMemoryMmap, at: u64, fields: &[u64]) {
        let mut raw = [0u64; 8];
        raw[..fields.len()].copy_from_slice(fields);
        for (i, v) in raw.iter().enumerate() {
            mem.write_obj(*v, GuestAddress(at + 8 * i as u64)).unwrap();
        }
    }

    fn ring(dev: &TestDevice, mem: &GuestMemoryMmap, at: u64) -> TestDeviceAction {
        dev.io_out(0, PORT_DOORBELL, &(at as u32).to_le_bytes(), mem)
    }

    fn status(mem: &GuestMemoryMmap, at: u64) -> u64 {
        mem.read_obj(GuestAddress(at + CMD_STATUS_OFFSET)).unwrap()
    }

    #[test]
    fn commands_decode() {
        let m = mem();
        let dev = TestDevice::new(0..2 << 20);
        m.write_slice(b"hi there", GuestAddress(0x5000)).unwrap();
        block(&m, 0x1000, &[CMD_PRINT, 0x5000, 8]);
        assert_eq!(
            ring(&dev, &m, 0x1000),
            TestDeviceAction::Print("hi there".into())
        );
        assert_eq!(status(&m, 0x1000), STATUS_OK);
        block(&m, 0x1000, &[CMD_REPORT, ReportKey::Mismatches as u64, 7]);
        assert_eq!(
            ring(&dev, &m, 0x1000),
            TestDeviceAction::Report { key: 2, value: 7 }
        );
        block(&m, 0x1000, &[CMD_DISCARD, 4 << 20, 0x1000]);
        assert_eq!(
            ring(&dev, &m, 0x1000),
            TestDeviceAction::Discard {
                gpa: 4 << 20,
                len: 0x1000
            }
        );
        block(&m, 0x1000, &[CMD_REFILL, 6 << 20, 2 << 20]);
        assert_eq!(
            ring(&dev, &m, 0x1000),
            TestDeviceAction::Refill {
                gpa: 6 << 20,
                len: 2 << 20
            }
        );
        block(&m, 0x1000, &[CMD_FAULT, 14, 4, 0x1234, 0xdead000]);
        assert_eq!(
            ring(&dev, &m, 0x1000),
            TestDeviceAction::Fault {
                vector: 14,
                error_code: 4,
                rip: 0x1234,
                cr2: 0xdead000
            }
        );
        block(&m, 0x1000, &[CMD_CHECKPOINT, 3]);
        assert_eq!(
            ring(&dev, &m, 0x1000),
            TestDeviceAction::Checkpoint { phase: 3 }
        );
        block(&m, 0x1000, &[CMD_EXIT, 0]);
        assert_eq!(ring(&dev, &m, 0x1000), TestDeviceAction::Exit(0));
        assert_eq!(
            dev.io_out(1, PORT_EXIT, &[3], &m),
            TestDeviceAction::Exit(3)
        );
        assert_eq!(dev.rejected(), 0);
        let mut d = [0u8; 4];
        dev.io_in(5, PORT_VCPU_ID, &mut d);
        assert_eq!(u32::from_le_bytes(d), 5);
        dev.io_in(0, PORT_MAGIC, &mut d);
        assert_eq!(u32::from_le_bytes(d), TEST_DEVICE_MAGIC);
        assert_eq!(ReportKey::from_raw(3), Some(ReportKey::PagesChecked));
        assert_eq!(ReportKey::from_raw(99), None);
    }

    #[test]
    fn bad_input_is_rejected_not_acted_on() {
        let m = mem();
        let dev = TestDevice::new(0..2 << 20);
        // Block outside RAM, unaligned, straddling the end; short doorbell writes.
        assert_eq!(ring(&dev, &m, 64 << 20), TestDeviceAction::None);
        assert_eq!(ring(&dev, &m, 0x1004), TestDeviceAction::None);
        assert_eq!(ring(&dev, &m, (8 << 20) - 32), TestDeviceAction::None);
        assert_eq!(
            dev.io_out(0, PORT_DOORBELL, &[0, 0x10], &m),
            TestDeviceAction::None
        );
        assert_eq!(dev.io_out(0, 0x0f02, &[1], &m), TestDeviceAction::None);
        assert_eq!(dev.rejected(), 5);
        let bad: &[[u64; 3]] = &[
            [CMD_PRINT, 0x5000, MAX_PRINT_LEN + 1],
            [CMD_PRINT, (8 << 20) - 4, 8],
            [CMD_PRINT, u64::MAX - 2, 8],
            [CMD_DISCARD, (4 << 20) + 1, 0x1000],
            [CMD_DISCARD, 4 << 20, 0x800],
            [CMD_DISCARD, 4 << 20, 0],
            [CMD_DISCARD, 1 << 20, 0x1000],
            [CMD_REFILL, (2 << 20) - 0x1000, 0x2000],
            [CMD_REFILL, 6 << 20, 4 << 20],
            [CMD_REFILL, 0xffff_ffff_ffff_f000, 0x2000],
            [99, 0, 0],
        ];
        for (i, b) in bad.iter().enumerate() {
            block(&m, 0x1000, b);
            assert_eq!(
                ring(&dev, &m, 0x1000),
                TestDeviceAction::None,
                "case {i}: {b:x?}"
            );
            assert_eq!(status(&m, 0x1000), STATUS_REJECTED, "case {i}");
        }
        assert_eq!(dev.rejected(), 5 + bad.len() as u64);
        let mut d = [0u8; 2];
        dev.io_in(0, 0x0f01, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }
}
