//! The quirk decision: from the bytes at RIP and the vCPU state that matters,
//! what to do about an instruction the host's emulator could not run. Pure
//! (no KVM), so every rule is unit-tested on instruction bytes.

use std::fmt;

use iced_x86::{Decoder, DecoderError, DecoderOptions, Mnemonic};

use super::action::Action;
use super::hint;
use super::rules;
use super::simd;

/// The vCPU state the rules look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuState {
    /// Code size: 16, 32 or 64 ([`bitness`]).
    pub bitness: u32,
    /// RIP (RIP-relative operands are computed from it).
    pub rip: u64,
    /// CR0.
    pub cr0: u64,
    /// CR4.
    pub cr4: u64,
    /// x87 status word; `None` when it could not be read.
    pub fsw: Option<u16>,
}

/// The code size the CPU decodes with: 64 in long mode with CS.L set, else
/// CS.D selects 32 or 16 (SDM Vol. 3A 5.2.1 "Code-Segment Descriptor",
/// "L (64-bit code segment) flag"; Vol. 1 3.6.1 "Operand Size and Address
/// Size in 64-Bit Mode").
pub fn bitness(efer_lma: bool, cs_l: bool, cs_db: bool) -> u32 {
    match (efer_lma && cs_l, cs_db) {
        (true, _) => 64,
        (false, true) => 32,
        (false, false) => 16,
    }
}

/// The kinds of instruction the quirk layer handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Quirk {
    /// INT3: #BP injected past it.
    Int3,
    /// WAIT/FWAIT: a no-op unless #NM/#MF is due.
    Fwait,
    /// UD0/UD1/UD2: #UD injected.
    Ud,
    /// SSE integer instructions, LDMXCSR/STMXCSR: executed by the VMM
    /// ([`simd`]).
    Sse,
}

impl Quirk {
    /// Every kind, in report order.
    pub const ALL: [Quirk; 4] = [Quirk::Int3, Quirk::Fwait, Quirk::Ud, Quirk::Sse];

    /// Name in logs and the run report.
    pub fn name(self) -> &'static str {
        match self {
            Quirk::Int3 => "int3",
            Quirk::Fwait => "fwait",
            Quirk::Ud => "ud",
            Quirk::Sse => "sse",
        }
    }

    /// Position in [`Quirk::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Quirk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the quirk layer decided about a handled instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Which kind of instruction.
    pub quirk: Quirk,
    /// What to do.
    pub action: Action,
}

/// Why an instruction is left unhandled (the VM stops).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unhandled {
    /// No bytes could be read at RIP.
    Unreadable,
    /// The bytes read end inside the instruction.
    Truncated,
    /// Not an instruction the decoder knows.
    Invalid,
    /// A known instruction the quirk layer does not handle.
    Unknown {
        /// Its mnemonic.
        mnemonic: Mnemonic,
        /// Its length.
        len: usize,
    },
    /// A handled kind whose rule cannot complete in this state.
    Refused {
        /// The kind.
        quirk: Quirk,
        /// Why.
        reason: &'static str,
    },
}

impl fmt::Display for Unhandled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unhandled::Unreadable => {
                f.write_str("the instruction bytes could not be read (RIP not mapped)")
            }
            Unhandled::Truncated => f.write_str("the instruction bytes read end mid-instruction"),
            Unhandled::Invalid => f.write_str("the bytes do not decode as an x86 instruction"),
            Unhandled::Unknown { mnemonic, len } => write!(
                f,
                "{} ({len} bytes) is not handled by the quirk layer: {}",
                format!("{mnemonic:?}").to_lowercase(),
                hint::for_mnemonic(*mnemonic)
            ),
            Unhandled::Refused { quirk, reason } => write!(f, "{quirk}: {reason}"),
        }
    }
}

/// Decide what to do about the instruction at the start of `bytes` that the
/// host's emulator failed on, given the vCPU state `cpu`. Never panics on
/// guest bytes.
pub fn decide(bytes: &[u8], cpu: &CpuState) -> Result<Decision, Unhandled> {
    if bytes.is_empty() {
        return Err(Unhandled::Unreadable);
    }
    let bitness = match cpu.bitness {
        16 | 32 | 64 => cpu.bitness,
        _ => 64,
    };
    let mut decoder = Decoder::with_ip(bitness, bytes, cpu.rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(match decoder.last_error() {
            DecoderError::NoMoreBytes => Unhandled::Truncated,
            _ => Unhandled::Invalid,
        });
    }
    // At most 15 bytes: always fits.
    let len = u8::try_from(insn.len()).unwrap_or(u8::MAX);
    let mnemonic = insn.mnemonic();
    let (quirk, action) = match mnemonic {
        Mnemonic::Int3 => (Quirk::Int3, rules::int3(len)),
        Mnemonic::Wait => (Quirk::Fwait, wait(len, cpu)?),
        Mnemonic::Ud0 | Mnemonic::Ud1 | Mnemonic::Ud2 => (Quirk::Ud, rules::ud()),
        _ if simd::supported(insn.code()) => (
            Quirk::Sse,
            rules::sse_fault(cpu.cr0, cpu.cr4).unwrap_or(Action::Execute { insn }),
        ),
        m if is_wait_form(m) => {
            // The decoder merges a WAIT with the x87 instruction after it
            // (`9B DB E2` = FCLEX); the CPU runs them as two instructions:
            // run the WAIT (its prefixes and the 9B) and leave the rest to
            // the next exit.
            let wait_len = bytes
                .iter()
                .take(insn.len())
                .position(|&b| b == 0x9b)
                .map_or(1, |p| p + 1);
            let wait_len = u8::try_from(wait_len).unwrap_or(1);
            (Quirk::Fwait, wait(wait_len, cpu)?)
        }
        _ => {
            return Err(Unhandled::Unknown {
                mnemonic,
                len: insn.len(),
            })
        }
    };
    Ok(Decision { quirk, action })
}

fn wait(len: u8, cpu: &CpuState) -> Result<Action, Unhandled> {
    rules::fwait(len, cpu.cr0, cpu.fsw).map_err(|reason| Unhandled::Refused {
        quirk: Quirk::Fwait,
        reason,
    })
}

/// The x87 mnemonics the decoder gives a `9B`-prefixed control instruction
/// (the "wait" forms of FNCLEX, FNINIT, FNSTSW, ...).
fn is_wait_form(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Fclex
            | Mnemonic::Finit
            | Mnemonic::Fstsw
            | Mnemonic::Fstcw
            | Mnemonic::Fstenv
            | Mnemonic::Fsave
            | Mnemonic::Feni
            | Mnemonic::Fdisi
            | Mnemonic::Fsetpm
            | Mnemonic::Frstpm
            | Mnemonic::Fstdw
            | Mnemonic::Fstsg
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's CR0 once paging is on: PE MP ET NE WP AM PG.
    const LINUX_CR0: u64 = 0x8005_0033;

    fn linux() -> CpuState {
        CpuState {
            bitness: 64,
            rip: 0xffff_ffff_8100_0000,
            cr0: LINUX_CR0,
            cr4: 0x3006f0,
            fsw: Some(0),
        }
    }

    #[test]
    fn bitness_follows_efer_lma_and_cs() {
        assert_eq!(bitness(true, true, false), 64);
        assert_eq!(bitness(true, false, true), 32);
        assert_eq!(bitness(false, false, true), 32);
        assert_eq!(bitness(false, false, false), 16);
        assert_eq!(bitness(false, true, false), 16);
    }

    #[test]
    fn int3_injects_bp_past_it() {
        let d = decide(&[0xcc, 0x90, 0x90], &linux()).unwrap();
        assert_eq!(d.quirk, Quirk::Int3);
        assert_eq!(d.action, rules::int3(1));
    }

    #[test]
    fn fwait_is_skipped() {
        // fpu__drop in the Debian 6.1 cloud kernel: fwait; movq $0, %gs:...
        let bytes = [
            0x9b, 0x65, 0x48, 0xc7, 0x05, 0x4d, 0x14, 0xfe, 0x7e, 0, 0, 0, 0,
        ];
        let d = decide(&bytes, &linux()).unwrap();
        assert_eq!(d.quirk, Quirk::Fwait);
        assert_eq!(d.action, Action::Skip { len: 1 });
        // The same byte decodes alike in 32- and 16-bit code.
        for bitness in [16, 32] {
            let cpu = CpuState { bitness, ..linux() };
            assert_eq!(
                decide(&[0x9b, 0x90], &cpu).unwrap().action,
                Action::Skip { len: 1 }
            );
        }
    }

    #[test]
    fn fwait_with_pending_exception_raises_mf() {
        let cpu = CpuState {
            fsw: Some(rules::FSW_ES | 1),
            ..linux()
        };
        let d = decide(&[0x9b], &cpu).unwrap();
        assert_eq!(
            d.action,
            Action::Raise {
                vector: rules::MF_VECTOR,
                error_code: None,
                advance: 0
            }
        );
    }

    #[test]
    fn fwait_with_ts_and_mp_raises_nm() {
        let cpu = CpuState {
            cr0: LINUX_CR0 | rules::CR0_TS,
            fsw: None,
            ..linux()
        };
        let d = decide(&[0x9b], &cpu).unwrap();
        assert_eq!(
            d.action,
            Action::Raise {
                vector: rules::NM_VECTOR,
                error_code: None,
                advance: 0
            }
        );
    }

    #[test]
    fn wait_merged_with_the_next_x87_instruction_runs_only_the_wait() {
        // FCLEX = WAIT; FNCLEX. FSTSW AX = WAIT; FNSTSW AX. With a prefix.
        for bytes in [
            &[0x9b, 0xdb, 0xe2][..],
            &[0x9b, 0xdf, 0xe0],
            &[0x9b, 0xd9, 0x7c, 0x24, 0x04],
        ] {
            let d = decide(bytes, &linux()).unwrap();
            assert_eq!(d.quirk, Quirk::Fwait, "{bytes:x?}");
            assert_eq!(d.action, Action::Skip { len: 1 }, "{bytes:x?}");
        }
        let d = decide(&[0x66, 0x9b, 0xdb, 0xe2], &linux()).unwrap();
        assert_eq!(d.action, Action::Skip { len: 2 });
    }

    #[test]
    fn ud_forms_inject_ud_at_rip() {
        for bytes in [
            &[0x0f, 0x0b][..],
            &[0x0f, 0xb9, 0x40, 0x10],
            &[0x0f, 0xff, 0xc0],
        ] {
            let d = decide(bytes, &linux()).unwrap();
            assert_eq!(d.quirk, Quirk::Ud, "{bytes:x?}");
            assert_eq!(d.action, rules::ud(), "{bytes:x?}");
        }
    }

    #[test]
    fn sse_instructions_are_executed_unless_cr0_cr4_forbid() {
        // ldmxcsr 0x4(%rsp); pshufb %xmm12,%xmm3; movdqa 0x10(%rip),%xmm2
        for bytes in [
            &[0x0f, 0xae, 0x54, 0x24, 0x04][..],
            &[0x66, 0x41, 0x0f, 0x38, 0x00, 0xdc],
            &[0x66, 0x0f, 0x6f, 0x15, 0x10, 0, 0, 0],
        ] {
            let d = decide(bytes, &linux()).unwrap();
            assert_eq!(d.quirk, Quirk::Sse);
            let Action::Execute { insn } = d.action else {
                panic!("{bytes:x?}: {:?}", d.action)
            };
            assert_eq!(insn.len(), bytes.len());
            assert_eq!(insn.ip(), linux().rip);
            let ts = CpuState {
                cr0: LINUX_CR0 | rules::CR0_TS,
                ..linux()
            };
            assert_eq!(
                decide(bytes, &ts).unwrap().action,
                Action::Raise {
                    vector: rules::NM_VECTOR,
                    error_code: None,
                    advance: 0
                }
            );
        }
    }

    #[test]
    fn unknown_instructions_stay_fatal_with_a_hint() {
        let e = decide(&[0x0f, 0x01, 0xca], &linux()).unwrap_err();
        assert!(matches!(
            e,
            Unhandled::Unknown {
                mnemonic: Mnemonic::Clac,
                len: 3
            }
        ));
        assert!(e.to_string().contains("clearcpuid=smap"), "{e}");
        let e = decide(&[0xf3, 0x48, 0x0f, 0xb8, 0xc0], &linux()).unwrap_err();
        assert!(e.to_string().contains("popcnt"), "{e}");
        let e = decide(&[0x90], &linux()).unwrap_err();
        assert!(e.to_string().contains("nop"), "{e}");
    }

    #[test]
    fn unreadable_truncated_and_invalid_bytes_are_fatal() {
        assert_eq!(decide(&[], &linux()), Err(Unhandled::Unreadable));
        // MOV RAX, imm64 cut short.
        assert_eq!(
            decide(&[0x48, 0xb8, 1, 2], &linux()),
            Err(Unhandled::Truncated)
        );
        // Sixteen prefixes: longer than any instruction.
        assert_eq!(decide(&[0x66; 16], &linux()), Err(Unhandled::Invalid));
    }

    #[test]
    fn a_nonsense_bitness_is_read_as_64() {
        let cpu = CpuState {
            bitness: 7,
            ..linux()
        };
        assert_eq!(decide(&[0xcc], &cpu).unwrap().quirk, Quirk::Int3);
    }

    #[test]
    fn any_bytes_decide_without_panicking() {
        // Every one- and two-byte opcode with a fixed tail, in every mode.
        for bitness in [16, 32, 64] {
            let cpu = CpuState { bitness, ..linux() };
            for a in 0..=255u8 {
                for b in 0..=255u8 {
                    let _ = decide(&[a, b, 0x44, 0x24, 0x08, 0, 0, 0, 0], &cpu);
                    let _ = decide(&[a, b], &cpu);
                }
            }
        }
    }
}
