//! The assembler wrapper guest generators use.
//!
//! # Workload contract
//!
//! A guest generator emits one function, entered with `call` at CPL3 on the
//! final page tables with:
//!
//! | register | value |
//! |---|---|
//! | `r12` | start of this vCPU's slice (2M aligned) |
//! | `r13` | end of this vCPU's slice |
//! | `r14` | gpa of this vCPU's command block (helpers use it) |
//! | `r15` | vCPU index |
//! | `rsp` | 8 KiB CPL3 stack |
//!
//! It must preserve `r14`, `r15` and `rsp`, may clobber everything else and
//! returns its status in `rax` (0 = success). Helpers that talk to the device
//! ([`GuestBuilder::command`] and friends) clobber `rax` and `rdx` only.

use iced_x86::code_asm::*;

use super::device::{
    ReportKey, CMD_CHECKPOINT, CMD_DISCARD, CMD_EXIT, CMD_PRINT, CMD_REFILL, CMD_REPORT,
    PORT_DOORBELL,
};
use super::layout::{Layout, HOLE_SIZE, HOLE_START, STRINGS_ADDR, STRINGS_END};
use super::TestGuestError;

/// An argument of a device command.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// Value of a register.
    Reg(AsmRegister64),
    /// A constant (sign-extended imm32).
    Imm(i32),
}

/// The assembler plus the guest's layout and string area.
pub struct GuestBuilder {
    /// The assembler; emit workload code directly on it.
    pub a: CodeAssembler,
    /// The guest's layout (RAM size, slices, page size ...).
    pub layout: Layout,
    pub(crate) strings: Vec<u8>,
}

impl GuestBuilder {
    /// A builder with an empty 64-bit assembler.
    pub fn new(layout: Layout) -> Result<GuestBuilder, TestGuestError> {
        Ok(GuestBuilder {
            a: CodeAssembler::new(64)?,
            layout,
            strings: Vec::new(),
        })
    }

    /// Places `s` in the string area; returns its gpa and length.
    pub fn string(&mut self, s: &str) -> Result<(u64, u64), TestGuestError> {
        let gpa = STRINGS_ADDR + self.strings.len() as u64;
        let size = self.strings.len() as u64 + s.len() as u64;
        if size > STRINGS_END - STRINGS_ADDR {
            return Err(TestGuestError::TooLarge {
                what: "strings",
                size,
                max: STRINGS_END - STRINGS_ADDR,
            });
        }
        self.strings.extend_from_slice(s.as_bytes());
        Ok((gpa, s.len() as u64))
    }

    /// Emits a device command from this vCPU's block (`r14`): stores the
    /// arguments, the command, then rings the doorbell. Clobbers rax, rdx.
    pub fn command(&mut self, cmd: u64, args: &[Arg]) -> Result<(), TestGuestError> {
        for (i, arg) in args.iter().enumerate() {
            let slot = qword_ptr(r14 + 8 * (i as i32 + 1));
            match *arg {
                Arg::Reg(r) => self.a.mov(slot, r)?,
                Arg::Imm(v) => self.a.mov(slot, v)?,
            }
        }
        self.a.mov(qword_ptr(r14), cmd as i32)?;
        self.a.mov(eax, r14d)?;
        self.a.mov(edx, u32::from(PORT_DOORBELL))?;
        self.a.out(dx, eax)?;
        Ok(())
    }

    /// PRINT a constant string.
    pub fn print(&mut self, s: &str) -> Result<(), TestGuestError> {
        let (gpa, len) = self.string(s)?;
        self.command(CMD_PRINT, &[Arg::Imm(gpa as i32), Arg::Imm(len as i32)])
    }

    /// REPORT `key` = `value`.
    pub fn report(&mut self, key: ReportKey, value: AsmRegister64) -> Result<(), TestGuestError> {
        self.command(CMD_REPORT, &[Arg::Imm(key as i32), Arg::Reg(value)])
    }

    /// CHECKPOINT `phase`.
    pub fn checkpoint(&mut self, phase: Arg) -> Result<(), TestGuestError> {
        self.command(CMD_CHECKPOINT, &[phase])
    }

    /// DISCARD `[va, va + len)` (a range of one 2M page or less; the VMM is
    /// sent its guest-physical address, [`Self::gpa_arg`]).
    pub fn discard(&mut self, va: Arg, len: Arg) -> Result<(), TestGuestError> {
        let gpa = self.gpa_arg(va)?;
        self.command(CMD_DISCARD, &[gpa, len])
    }

    /// REFILL `[va, va + len)` (as [`Self::discard`]).
    pub fn refill(&mut self, va: Arg, len: Arg) -> Result<(), TestGuestError> {
        let gpa = self.gpa_arg(va)?;
        self.command(CMD_REFILL, &[gpa, len])
    }

    /// The guest-physical address of virtual address `va` as a command
    /// argument: `va` itself below the 32-bit MMIO hole; above it (RAM past
    /// 3 GiB, see `layout`) `va` + the hole's size, computed in `rax`.
    /// Clobbers rax and rdx; `len` must not be in them.
    fn gpa_arg(&mut self, va: Arg) -> Result<Arg, TestGuestError> {
        let Arg::Reg(r) = va else {
            // Constants are below the hole (reserved region).
            return Ok(va);
        };
        if !self.layout.has_high_ram() {
            return Ok(va);
        }
        let mut below = self.a.create_label();
        self.a.mov(rax, r)?;
        self.a.mov(rdx, HOLE_START)?;
        self.a.cmp(rax, rdx)?;
        self.a.jb(below)?;
        self.a.add(rax, HOLE_SIZE as i32)?;
        self.a.set_label(&mut below)?;
        self.a.nop()?;
        Ok(Arg::Reg(rax))
    }

    /// EXIT with `status`.
    pub fn exit(&mut self, status: Arg) -> Result<(), TestGuestError> {
        self.command(CMD_EXIT, &[status])
    }

    /// `rax = 1` if `reg != 0` else 0.
    pub fn status_from(&mut self, reg: AsmRegister64) -> Result<(), TestGuestError> {
        self.a.xor(eax, eax)?;
        self.a.test(reg, reg)?;
        self.a.setne(al)?;
        Ok(())
    }
}
