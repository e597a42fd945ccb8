//! The architectural rules the quirk layer applies: one function per
//! instruction, each citing where the Intel SDM (and AMD APM) defines what
//! the processor does. All pure: they take the instruction length and the
//! relevant vCPU state and return what to do.

use super::action::Action;

/// #BP, breakpoint.
pub const BP_VECTOR: u8 = 3;
/// #UD, invalid opcode.
pub const UD_VECTOR: u8 = 6;
/// #NM, device not available.
pub const NM_VECTOR: u8 = 7;
/// #GP, general protection.
pub const GP_VECTOR: u8 = 13;
/// #MF, x87 floating-point error.
pub const MF_VECTOR: u8 = 16;

/// CR0.MP (monitor coprocessor).
pub const CR0_MP: u64 = 1 << 1;
/// CR0.EM (x87 emulation).
pub const CR0_EM: u64 = 1 << 2;
/// CR0.TS (task switched).
pub const CR0_TS: u64 = 1 << 3;
/// CR0.NE (native x87 error reporting).
pub const CR0_NE: u64 = 1 << 5;
/// CR4.OSFXSR (OS supports FXSAVE/FXRSTOR and SSE).
pub const CR4_OSFXSR: u64 = 1 << 9;
/// The MXCSR bits LDMXCSR accepts: MXCSR_MASK 0xFFFF, the value of every
/// x86-64 processor with DAZ (SDM Vol. 1 11.6.6 "Guidelines for Writing to
/// the MXCSR Register"). AMD's optional MM bit (17) counts as reserved.
pub const MXCSR_MASK: u32 = 0xffff;
/// x87 status word ES (error summary): some unmasked exception flag is set.
pub const FSW_ES: u16 = 1 << 7;

/// INT3 (`CC`): SDM Vol. 2A "INT n/INTO/INT3/INT1—Call to Interrupt
/// Procedure" and Vol. 3A 6.5 "Exception Classifications": #BP is a trap,
/// so the saved RIP points past the instruction. Linux relies on this for
/// its int3 self-test and text patching (`arch/x86/kernel/alternative.c`).
pub fn int3(len: u8) -> Action {
    Action::Raise {
        vector: BP_VECTOR,
        error_code: None,
        advance: len,
    }
}

/// Why a WAIT could not be completed here.
pub const WAIT_FERR: &str = "a pending unmasked x87 exception with CR0.NE=0 is reported through \
     the external FERR# pin (SDM Vol. 1 8.7, \"MS-DOS compatibility\" mode), which this VMM \
     does not model";

/// WAIT/FWAIT (`9B`): SDM Vol. 2B "WAIT/FWAIT—Wait" (APM Vol. 5 "FWAIT"):
/// "#NM if CR0.MP[bit 1] = 1 and CR0.TS[bit 3] = 1"; otherwise the processor
/// checks for pending unmasked x87 exceptions (FSW.ES, SDM Vol. 1 8.1.3.1)
/// and, with CR0.NE = 1, raises #MF, a fault whose saved RIP points at the
/// WAIT (SDM Vol. 3A 6.15 "Interrupt 16"). With nothing pending it has no
/// effect at all: RIP moves past it. Linux executes one in `fpu__drop()`
/// (`arch/x86/kernel/fpu/core.c`) whenever a task exits or execs.
///
/// `fsw` is the x87 status word; `None` when it could not be read, which is
/// only an error when CR0 leaves the decision to it.
pub fn fwait(len: u8, cr0: u64, fsw: Option<u16>) -> Result<Action, &'static str> {
    if cr0 & (CR0_MP | CR0_TS) == (CR0_MP | CR0_TS) {
        return Ok(Action::Raise {
            vector: NM_VECTOR,
            error_code: None,
            advance: 0,
        });
    }
    let Some(fsw) = fsw else {
        return Err("the x87 status word could not be read (KVM_GET_FPU failed)");
    };
    if fsw & FSW_ES == 0 {
        return Ok(Action::Skip { len });
    }
    if cr0 & CR0_NE == 0 {
        return Err(WAIT_FERR);
    }
    Ok(Action::Raise {
        vector: MF_VECTOR,
        error_code: None,
        advance: 0,
    })
}

/// UD0 (`0F FF`), UD1 (`0F B9`), UD2 (`0F 0B`): SDM Vol. 2B "UD—Undefined
/// Instruction": "Generates an invalid opcode exception", always; #UD is a
/// fault, so the saved RIP points at the instruction. Linux's `BUG()` and
/// `WARN()` are UD2 (`arch/x86/include/asm/bug.h`) and its #UD handler
/// looks the RIP up in the bug table, then skips the UD2 itself for a WARN.
pub fn ud() -> Action {
    Action::Raise {
        vector: UD_VECTOR,
        error_code: None,
        advance: 0,
    }
}

/// Whether an SSE instruction (LDMXCSR and STMXCSR included) may run: the
/// exceptions of SDM Vol. 2A 2.5 "Exception Type 4/5" checked in order:
/// #UD if CR0.EM = 1 or CR4.OSFXSR = 0, then #NM if CR0.TS = 1. `None` when
/// it runs.
pub fn sse_fault(cr0: u64, cr4: u64) -> Option<Action> {
    let vector = if cr0 & CR0_EM != 0 || cr4 & CR4_OSFXSR == 0 {
        UD_VECTOR
    } else if cr0 & CR0_TS != 0 {
        NM_VECTOR
    } else {
        return None;
    };
    Some(Action::Raise {
        vector,
        error_code: None,
        advance: 0,
    })
}

/// LDMXCSR (SDM Vol. 2A "LDMXCSR—Load MXCSR Register"): "#GP(0) For an
/// attempt to set reserved bits in MXCSR" ([`MXCSR_MASK`]). The new MXCSR,
/// or the vector to raise (error code 0). Linux loads 0x1f80
/// (`MXCSR_DEFAULT`) in `kernel_fpu_begin_mask()`.
pub fn ldmxcsr(value: u32) -> Result<u32, u8> {
    if value & !MXCSR_MASK != 0 {
        Err(GP_VECTOR)
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int3_is_a_trap_past_the_instruction() {
        assert_eq!(
            int3(1),
            Action::Raise {
                vector: 3,
                error_code: None,
                advance: 1
            }
        );
    }

    #[test]
    fn fwait_without_pending_exception_is_a_no_op() {
        // Linux's CR0 (PE, MP, ET, NE, WP, AM, PG), clean x87 status.
        let cr0 = 0x8005_0033;
        assert_eq!(fwait(1, cr0, Some(0)), Ok(Action::Skip { len: 1 }));
        // Masked exception flags (PE) without ES: still nothing pending.
        assert_eq!(fwait(1, cr0, Some(0x0020)), Ok(Action::Skip { len: 1 }));
        // TS alone (MP clear) does not fault a WAIT.
        assert_eq!(
            fwait(2, (cr0 & !CR0_MP) | CR0_TS, Some(0)),
            Ok(Action::Skip { len: 2 })
        );
    }

    #[test]
    fn fwait_with_mp_and_ts_raises_nm_before_anything_else() {
        let cr0 = 0x8005_0033 | CR0_TS;
        let nm = Ok(Action::Raise {
            vector: NM_VECTOR,
            error_code: None,
            advance: 0,
        });
        assert_eq!(fwait(1, cr0, Some(FSW_ES)), nm);
        assert_eq!(fwait(1, cr0, None), nm);
    }

    #[test]
    fn fwait_with_pending_unmasked_exception_raises_mf_at_the_wait() {
        let cr0 = 0x8005_0033;
        assert_eq!(
            fwait(1, cr0, Some(FSW_ES | 0x1)),
            Ok(Action::Raise {
                vector: MF_VECTOR,
                error_code: None,
                advance: 0
            })
        );
        assert_eq!(fwait(1, cr0 & !CR0_NE, Some(FSW_ES)), Err(WAIT_FERR));
        assert!(fwait(1, cr0, None).is_err());
    }

    #[test]
    fn sse_faults_ud_before_nm() {
        let cr0 = 0x8005_0033;
        let cr4 = CR4_OSFXSR | (1 << 10);
        assert_eq!(sse_fault(cr0, cr4), None);
        let raise = |vector| {
            Some(Action::Raise {
                vector,
                error_code: None,
                advance: 0,
            })
        };
        assert_eq!(sse_fault(cr0 | CR0_TS, cr4), raise(NM_VECTOR));
        assert_eq!(sse_fault(cr0 | CR0_TS | CR0_EM, cr4), raise(UD_VECTOR));
        assert_eq!(sse_fault(cr0 | CR0_TS, 0), raise(UD_VECTOR));
    }

    #[test]
    fn ldmxcsr_refuses_reserved_bits() {
        assert_eq!(ldmxcsr(0x1f80), Ok(0x1f80));
        assert_eq!(ldmxcsr(0xffff), Ok(0xffff));
        assert_eq!(ldmxcsr(0x1_1f80), Err(GP_VECTOR));
        assert_eq!(ldmxcsr(0x8000_0000), Err(GP_VECTOR));
    }

    #[test]
    fn ud_faults_at_the_instruction() {
        assert_eq!(
            ud(),
            Action::Raise {
                vector: 6,
                error_code: None,
                advance: 0
            }
        );
    }
}
