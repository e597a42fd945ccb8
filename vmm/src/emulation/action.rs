//! What the VMM does in the emulator's place for one instruction: the outcome of
//! the quirk rules ([`super::rules`]) that [`super::decide`] hands to the vCPU loop.

use std::fmt;

use iced_x86::Instruction;

/// What the VMM does in the emulator's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The instruction has no effect here: move RIP past its `len` bytes.
    Skip {
        /// Instruction length.
        len: u8,
    },
    /// Raise exception `vector` as the processor would, RIP first moved by
    /// `advance` bytes (0 for a fault, the length for a trap).
    Raise {
        /// Exception vector.
        vector: u8,
        /// Error code, for the vectors that push one.
        error_code: Option<u32>,
        /// Bytes RIP moves before the exception is delivered.
        advance: u8,
    },
    /// Execute the instruction in the VMM ([`super::simd::execute`]), then move RIP
    /// past it.
    Execute {
        /// The decoded instruction (decoded at the guest's RIP).
        insn: Instruction,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Skip { len } => write!(f, "skipped ({len} bytes)"),
            Action::Raise {
                vector,
                error_code,
                advance,
            } => {
                write!(f, "injected vector {vector}")?;
                if let Some(e) = error_code {
                    write!(f, " (error code {e:#x})")?;
                }
                if *advance > 0 {
                    write!(f, " after {advance} bytes")?;
                }
                Ok(())
            }
            Action::Execute { insn } => write!(f, "executed ({:?})", insn.code()),
        }
    }
}
