//! SSE integer instructions (and LDMXCSR/STMXCSR) executed by the VMM for a
//! guest whose CPL0 code the host cannot emulate them in. Linux runs them in
//! kernel mode between `kernel_fpu_begin()` (which does LDMXCSR,
//! `arch/x86/kernel/fpu/core.c`) and `kernel_fpu_end()`: the random driver's
//! BLAKE2s (`arch/x86/crypto/blake2s-core.S`, `blake2s_compress_ssse3`) is
//! built into distribution kernels. Pure: registers in a [`SimdRegs`], guest
//! memory behind [`Memory`]; unit-tested on instruction bytes.

use iced_x86::{Code, Instruction, OpKind, Register};

use super::rules;

/// The registers these instructions read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimdRegs {
    /// XMM0..XMM15.
    pub xmm: [u128; 16],
    /// MXCSR.
    pub mxcsr: u32,
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15 (encoding order).
    pub gpr: [u64; 16],
}

/// Why a guest memory access failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest address {addr:#x} ({len} bytes) is not mapped{}", if *write { " writable" } else { "" })]
pub struct MemError {
    /// Guest virtual address.
    pub addr: u64,
    /// Access size.
    pub len: usize,
    /// A write.
    pub write: bool,
}

/// Guest virtual memory as the instruction sees it.
pub trait Memory {
    /// Read `buf.len()` bytes at `addr`.
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Write `buf` at `addr`.
    fn write(&mut self, addr: u64, buf: &[u8]) -> Result<(), MemError>;
}

/// Why an instruction did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SimdError {
    /// The processor raises this exception (a fault: RIP stays).
    #[error("raises vector {vector}")]
    Fault {
        /// Vector.
        vector: u8,
        /// Error code.
        error_code: Option<u32>,
    },
    /// Guest memory could not be accessed.
    #[error(transparent)]
    Memory(#[from] MemError),
    /// Not an instruction this module executes, or an operand it cannot reach.
    #[error("not executable here")]
    Unsupported,
}

/// Whether [`execute`] runs `code`.
pub fn supported(code: Code) -> bool {
    use Code::*;
    matches!(
        code,
        Pxor_xmm_xmmm128
            | Por_xmm_xmmm128
            | Pand_xmm_xmmm128
            | Pandn_xmm_xmmm128
            | Paddd_xmm_xmmm128
            | Paddq_xmm_xmmm128
            | Psubd_xmm_xmmm128
            | Psubq_xmm_xmmm128
            | Pshufd_xmm_xmmm128_imm8
            | Pshufb_xmm_xmmm128
            | Psrld_xmm_imm8
            | Pslld_xmm_imm8
            | Psrlq_xmm_imm8
            | Psllq_xmm_imm8
            | Psrldq_xmm_imm8
            | Pslldq_xmm_imm8
            | Punpckldq_xmm_xmmm128
            | Punpcklqdq_xmm_xmmm128
            | Punpckhdq_xmm_xmmm128
            | Punpckhqdq_xmm_xmmm128
            | Movdqa_xmm_xmmm128
            | Movdqa_xmmm128_xmm
            | Movdqu_xmm_xmmm128
            | Movdqu_xmmm128_xmm
            | Movd_xmm_rm32
            | Movd_rm32_xmm
            | Movq_xmm_rm64
            | Movq_rm64_xmm
            | Movq_xmm_xmmm64
            | Movq_xmmm64_xmm
            | Ldmxcsr_m32
            | Stmxcsr_m32
    )
}

/// The guest virtual address of `insn`'s memory operand, if it has one:
/// base + index × scale + displacement (RIP-relative from the instruction's
/// next IP, so decode with the guest's RIP) plus the segment base, which in
/// 64-bit mode is non-zero only for FS and GS (SDM Vol. 3A 3.4.4).
pub fn memory_address(
    insn: &Instruction,
    gpr: &[u64; 16],
    fs_base: u64,
    gs_base: u64,
) -> Option<u64> {
    let op = (0..insn.op_count()).find(|&i| insn.op_kind(i) == OpKind::Memory)?;
    insn.virtual_address(op, 0, |reg, _, _| match reg {
        Register::FS => Some(fs_base),
        Register::GS => Some(gs_base),
        Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
        r => gpr_reg(r).map(|(i, width)| match width {
            4 => gpr[i] & 0xffff_ffff,
            2 => gpr[i] & 0xffff,
            _ => gpr[i],
        }),
    })
}

/// Index in [`SimdRegs::gpr`] and width in bytes of a 16-, 32- or 64-bit
/// general-purpose register (iced lists each width in encoding order).
fn gpr_reg(r: Register) -> Option<(usize, u8)> {
    [(Register::RAX, 8), (Register::EAX, 4), (Register::AX, 2)]
        .into_iter()
        .find_map(|(first, width)| {
            let i = (r as u32).checked_sub(first as u32)? as usize;
            (i < 16).then_some((i, width))
        })
}

/// Index of a 32- or 64-bit general-purpose register.
fn gpr_index(r: Register) -> Option<usize> {
    gpr_reg(r).filter(|&(_, w)| w >= 4).map(|(i, _)| i)
}

fn xmm_index(r: Register) -> Option<usize> {
    let i = (r as u32).checked_sub(Register::XMM0 as u32)? as usize;
    (i < 16).then_some(i)
}

fn xmm(insn: &Instruction, op: u32) -> Result<usize, SimdError> {
    xmm_index(insn.op_register(op)).ok_or(SimdError::Unsupported)
}

fn read(mem: &mut dyn Memory, addr: Option<u64>, len: usize) -> Result<u128, SimdError> {
    let addr = addr.ok_or(SimdError::Unsupported)?;
    let mut b = [0u8; 16];
    mem.read(addr, &mut b[..len])?;
    Ok(u128::from_le_bytes(b))
}

fn write(mem: &mut dyn Memory, addr: Option<u64>, v: u128, len: usize) -> Result<(), SimdError> {
    let addr = addr.ok_or(SimdError::Unsupported)?;
    mem.write(addr, &v.to_le_bytes()[..len])?;
    Ok(())
}

/// Operand `op` (an XMM register or memory of `len` bytes) as a value.
fn source(
    insn: &Instruction,
    op: u32,
    r: &SimdRegs,
    mem: &mut dyn Memory,
    addr: Option<u64>,
    len: usize,
) -> Result<u128, SimdError> {
    match insn.op_kind(op) {
        OpKind::Register => Ok(r.xmm[xmm(insn, op)?]),
        OpKind::Memory => {
            if len == 16 && !matches!(insn.code(), Code::Movdqu_xmm_xmmm128) {
                check_aligned(addr)?;
            }
            read(mem, addr, len)
        }
        _ => Err(SimdError::Unsupported),
    }
}

/// Legacy SSE 128-bit memory operands must be 16-byte aligned, else #GP(0)
/// (SDM Vol. 1 11.4.1 "Guidelines for... 128-bit SIMD data"; MOVDQU is the
/// unaligned exception).
fn check_aligned(addr: Option<u64>) -> Result<(), SimdError> {
    match addr {
        Some(a) if a % 16 != 0 => Err(SimdError::Fault {
            vector: rules::GP_VECTOR,
            error_code: Some(0),
        }),
        _ => Ok(()),
    }
}

fn dwords(v: u128) -> [u32; 4] {
    [
        v as u32,
        (v >> 32) as u32,
        (v >> 64) as u32,
        (v >> 96) as u32,
    ]
}

fn from_dwords(d: [u32; 4]) -> u128 {
    u128::from(d[0]) | u128::from(d[1]) << 32 | u128::from(d[2]) << 64 | u128::from(d[3]) << 96
}

fn qwords(v: u128) -> [u64; 2] {
    [v as u64, (v >> 64) as u64]
}

fn from_qwords(q: [u64; 2]) -> u128 {
    u128::from(q[0]) | u128::from(q[1]) << 64
}

fn map_dwords(a: u128, b: u128, f: impl Fn(u32, u32) -> u32) -> u128 {
    let (a, b) = (dwords(a), dwords(b));
    from_dwords([f(a[0], b[0]), f(a[1], b[1]), f(a[2], b[2]), f(a[3], b[3])])
}

fn map_qwords(a: u128, b: u128, f: impl Fn(u64, u64) -> u64) -> u128 {
    let (a, b) = (qwords(a), qwords(b));
    from_qwords([f(a[0], b[0]), f(a[1], b[1])])
}

/// PSHUFB (SDM Vol. 2B "PSHUFB—Packed Shuffle Bytes"): byte i of the result
/// is 0 if bit 7 of mask byte i is set, else byte (mask[i] & 15) of `a`.
pub fn pshufb(a: u128, mask: u128) -> u128 {
    let (a, m) = (a.to_le_bytes(), mask.to_le_bytes());
    let mut out = [0u8; 16];
    for (o, &k) in out.iter_mut().zip(m.iter()) {
        if k & 0x80 == 0 {
            *o = a[usize::from(k & 0x0f)];
        }
    }
    u128::from_le_bytes(out)
}

/// PSHUFD (SDM Vol. 2B "PSHUFD—Shuffle Packed Doublewords"): dword i of the
/// result is dword `(imm >> 2i) & 3` of the source.
pub fn pshufd(src: u128, imm: u8) -> u128 {
    let s = dwords(src);
    let pick = |i: u32| s[usize::from((imm >> (2 * i)) & 3)];
    from_dwords([pick(0), pick(1), pick(2), pick(3)])
}

/// A two-operand SSE integer operation on `a` (destination) and `b`
/// (source), with `imm` for the immediate forms (SDM Vol. 2 entries of
/// PXOR, POR, PAND, PANDN, PADDD/Q, PSUBD/Q, PSHUFD, PSHUFB, PSRLD/Q,
/// PSLLD/Q, PSRLDQ, PSLLDQ, PUNPCKL/HDQ, PUNPCKL/HQDQ; shift counts past the
/// element width give 0).
pub fn binary(code: Code, a: u128, b: u128, imm: u8) -> Option<u128> {
    use Code::*;
    let n = u32::from(imm);
    Some(match code {
        Pxor_xmm_xmmm128 => a ^ b,
        Por_xmm_xmmm128 => a | b,
        Pand_xmm_xmmm128 => a & b,
        Pandn_xmm_xmmm128 => !a & b,
        Paddd_xmm_xmmm128 => map_dwords(a, b, u32::wrapping_add),
        Paddq_xmm_xmmm128 => map_qwords(a, b, u64::wrapping_add),
        Psubd_xmm_xmmm128 => map_dwords(a, b, u32::wrapping_sub),
        Psubq_xmm_xmmm128 => map_qwords(a, b, u64::wrapping_sub),
        Pshufd_xmm_xmmm128_imm8 => pshufd(b, imm),
        Pshufb_xmm_xmmm128 => pshufb(a, b),
        Psrld_xmm_imm8 => map_dwords(a, 0, |x, _| x.checked_shr(n).unwrap_or(0)),
        Pslld_xmm_imm8 => map_dwords(a, 0, |x, _| x.checked_shl(n).unwrap_or(0)),
        Psrlq_xmm_imm8 => map_qwords(a, 0, |x, _| x.checked_shr(n).unwrap_or(0)),
        Psllq_xmm_imm8 => map_qwords(a, 0, |x, _| x.checked_shl(n).unwrap_or(0)),
        Psrldq_xmm_imm8 => a.checked_shr(8 * n).unwrap_or(0),
        Pslldq_xmm_imm8 => a.checked_shl(8 * n).unwrap_or(0),
        Punpckldq_xmm_xmmm128 => {
            let (x, y) = (dwords(a), dwords(b));
            from_dwords([x[0], y[0], x[1], y[1]])
        }
        Punpckhdq_xmm_xmmm128 => {
            let (x, y) = (dwords(a), dwords(b));
            from_dwords([x[2], y[2], x[3], y[3]])
        }
        Punpcklqdq_xmm_xmmm128 => from_qwords([qwords(a)[0], qwords(b)[0]]),
        Punpckhqdq_xmm_xmmm128 => from_qwords([qwords(a)[1], qwords(b)[1]]),
        Movdqa_xmm_xmmm128 | Movdqu_xmm_xmmm128 => b,
        _ => return None,
    })
}

/// Run `insn` (for which [`supported`] holds) on `r` and `mem`; `addr` is
/// its memory operand's address ([`memory_address`]). On an error nothing
/// has been written.
pub fn execute(
    insn: &Instruction,
    r: &mut SimdRegs,
    addr: Option<u64>,
    mem: &mut dyn Memory,
) -> Result<(), SimdError> {
    use Code::*;
    let code = insn.code();
    match code {
        Ldmxcsr_m32 => {
            let v = read(mem, addr, 4)? as u32;
            r.mxcsr = rules::ldmxcsr(v).map_err(|vector| SimdError::Fault {
                vector,
                error_code: Some(0),
            })?;
        }
        Stmxcsr_m32 => write(mem, addr, u128::from(r.mxcsr), 4)?,
        Movd_xmm_rm32 | Movq_xmm_rm64 => {
            let len = if code == Movd_xmm_rm32 { 4 } else { 8 };
            let v = match insn.op_kind(1) {
                OpKind::Register => {
                    let i = gpr_index(insn.op_register(1)).ok_or(SimdError::Unsupported)?;
                    if len == 4 {
                        u128::from(r.gpr[i] as u32)
                    } else {
                        u128::from(r.gpr[i])
                    }
                }
                OpKind::Memory => read(mem, addr, len)?,
                _ => return Err(SimdError::Unsupported),
            };
            r.xmm[xmm(insn, 0)?] = v;
        }
        Movd_rm32_xmm | Movq_rm64_xmm => {
            let v = r.xmm[xmm(insn, 1)?];
            let len = if code == Movd_rm32_xmm { 4 } else { 8 };
            match insn.op_kind(0) {
                // A 32-bit register write zero-extends (SDM Vol. 1 3.4.1.1).
                OpKind::Register => {
                    let i = gpr_index(insn.op_register(0)).ok_or(SimdError::Unsupported)?;
                    r.gpr[i] = if len == 4 {
                        u64::from(v as u32)
                    } else {
                        v as u64
                    };
                }
                OpKind::Memory => write(mem, addr, v, len)?,
                _ => return Err(SimdError::Unsupported),
            }
        }
        Movq_xmm_xmmm64 => {
            let v = source(insn, 1, r, mem, addr, 8)?;
            r.xmm[xmm(insn, 0)?] = u128::from(v as u64);
        }
        Movq_xmmm64_xmm => {
            let v = u128::from(r.xmm[xmm(insn, 1)?] as u64);
            match insn.op_kind(0) {
                OpKind::Register => r.xmm[xmm(insn, 0)?] = v,
                _ => write(mem, addr, v, 8)?,
            }
        }
        Movdqa_xmmm128_xmm | Movdqu_xmmm128_xmm => {
            let v = r.xmm[xmm(insn, 1)?];
            match insn.op_kind(0) {
                OpKind::Register => r.xmm[xmm(insn, 0)?] = v,
                _ => {
                    if code == Movdqa_xmmm128_xmm {
                        check_aligned(addr)?;
                    }
                    write(mem, addr, v, 16)?;
                }
            }
        }
        _ => {
            let d = xmm(insn, 0)?;
            let (b, imm) = match insn.op_kind(1) {
                OpKind::Immediate8 => (0, insn.immediate8()),
                _ => {
                    let imm = if insn.op_count() > 2 {
                        insn.immediate8()
                    } else {
                        0
                    };
                    (source(insn, 1, r, mem, addr, 16)?, imm)
                }
            };
            r.xmm[d] = binary(code, r.xmm[d], b, imm).ok_or(SimdError::Unsupported)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Mem(BTreeMap<u64, u8>);

    impl Memory for Mem {
        fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
            let err = MemError {
                addr,
                len: buf.len(),
                write: false,
            };
            for (i, b) in buf.iter_mut().enumerate() {
                *b = *self.0.get(&(addr + i as u64)).ok_or(err)?;
            }
            Ok(())
        }
        fn write(&mut self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
            for (i, &b) in buf.iter().enumerate() {
                self.0.insert(addr + i as u64, b);
            }
            Ok(())
        }
    }

    fn decode(bytes: &[u8], rip: u64) -> Instruction {
        let insn = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE).decode();
        assert!(supported(insn.code()), "{bytes:x?}: {:?}", insn.code());
        insn
    }

    fn run(bytes: &[u8], r: &mut SimdRegs, mem: &mut Mem) -> Result<(), SimdError> {
        let insn = decode(bytes, 0x1000);
        let addr = memory_address(&insn, &r.gpr, 0, 0);
        execute(&insn, r, addr, mem)
    }

    const A: u128 = 0x0f0e0d0c_0b0a0908_07060504_03020100;
    const B: u128 = 0xffffffff_80000000_00000001_fffffffe;

    #[test]
    fn blake2s_round_ops_from_their_bytes() {
        let mut r = SimdRegs::default();
        let mut m = Mem::default();
        // paddd %xmm4,%xmm0
        r.xmm[0] = B;
        r.xmm[4] = from_dwords([3, 1, 0x8000_0000, 2]);
        run(&[0x66, 0x0f, 0xfe, 0xc4], &mut r, &mut m).unwrap();
        assert_eq!(dwords(r.xmm[0]), [1, 2, 0, 1]);
        // pxor %xmm0,%xmm3
        r.xmm[3] = A;
        let x0 = r.xmm[0];
        run(&[0x66, 0x0f, 0xef, 0xd8], &mut r, &mut m).unwrap();
        assert_eq!(r.xmm[3], A ^ x0);
        // pshufb %xmm12,%xmm3: BLAKE2s's rotate-right-16 mask.
        r.xmm[3] = from_dwords([0x1122_3344, 0x5566_7788, 0x99aa_bbcc, 0xddee_ff00]);
        r.xmm[12] = 0x0d0c0f0e_09080b0a_05040706_01000302;
        run(&[0x66, 0x41, 0x0f, 0x38, 0x00, 0xdc], &mut r, &mut m).unwrap();
        assert_eq!(
            dwords(r.xmm[3]),
            [0x3344_1122, 0x7788_5566, 0xbbcc_99aa, 0xff00_ddee]
        );
        // psrld $0xc,%xmm1 ; pslld $0x14,%xmm8 ; por %xmm8,%xmm1 = rotr 12.
        let v = from_dwords([0x1234_5678, 1, 0x8000_0000, 0xffff_0000]);
        r.xmm[1] = v;
        r.xmm[8] = v;
        run(&[0x66, 0x0f, 0x72, 0xd1, 0x0c], &mut r, &mut m).unwrap();
        run(&[0x66, 0x41, 0x0f, 0x72, 0xf0, 0x14], &mut r, &mut m).unwrap();
        run(&[0x66, 0x41, 0x0f, 0xeb, 0xc8], &mut r, &mut m).unwrap();
        assert_eq!(dwords(r.xmm[1]), dwords(v).map(|d| d.rotate_right(12)));
        // pshufd $0x93,%xmm0,%xmm0
        r.xmm[0] = from_dwords([10, 11, 12, 13]);
        run(&[0x66, 0x0f, 0x70, 0xc0, 0x93], &mut r, &mut m).unwrap();
        assert_eq!(dwords(r.xmm[0]), [13, 10, 11, 12]);
        // punpckldq %xmm5,%xmm4 ; punpcklqdq %xmm6,%xmm4
        r.xmm[4] = from_dwords([1, 2, 3, 4]);
        r.xmm[5] = from_dwords([5, 6, 7, 8]);
        r.xmm[6] = from_dwords([9, 10, 11, 12]);
        run(&[0x66, 0x0f, 0x62, 0xe5], &mut r, &mut m).unwrap();
        assert_eq!(dwords(r.xmm[4]), [1, 5, 2, 6]);
        run(&[0x66, 0x0f, 0x6c, 0xe6], &mut r, &mut m).unwrap();
        assert_eq!(dwords(r.xmm[4]), [1, 5, 9, 10]);
        // paddq %xmm15,%xmm14
        r.xmm[14] = from_qwords([u64::MAX, 7]);
        r.xmm[15] = from_qwords([2, 1]);
        run(&[0x66, 0x45, 0x0f, 0xd4, 0xf7], &mut r, &mut m).unwrap();
        assert_eq!(qwords(r.xmm[14]), [1, 8]);
    }

    #[test]
    fn movd_movdqu_movdqa_with_memory_and_registers() {
        let mut r = SimdRegs::default();
        let mut m = Mem::default();
        // movd (%rsi,%rax,4),%xmm4 with rsi=0x2000, rax=3.
        r.gpr[6] = 0x2000;
        r.gpr[0] = 3;
        m.write(0x200c, &0xdead_beefu32.to_le_bytes()).unwrap();
        r.xmm[4] = u128::MAX;
        run(&[0x66, 0x0f, 0x6e, 0x24, 0x86], &mut r, &mut m).unwrap();
        assert_eq!(r.xmm[4], 0xdead_beef);
        // movd %ecx,%xmm15
        r.gpr[1] = 0xffff_ffff_0000_0040;
        run(&[0x66, 0x44, 0x0f, 0x6e, 0xf9], &mut r, &mut m).unwrap();
        assert_eq!(r.xmm[15], 0x40);
        // movd %xmm4,%eax zero-extends RAX.
        r.gpr[0] = u64::MAX;
        run(&[0x66, 0x0f, 0x7e, 0xe0], &mut r, &mut m).unwrap();
        assert_eq!(r.gpr[0], 0xdead_beef);
        // movdqu %xmm1,0x10(%rdi) then movdqu 0x10(%rdi),%xmm0 (unaligned ok).
        r.gpr[7] = 0x3001;
        r.xmm[1] = A;
        run(&[0xf3, 0x0f, 0x7f, 0x4f, 0x10], &mut r, &mut m).unwrap();
        run(&[0xf3, 0x0f, 0x6f, 0x47, 0x10], &mut r, &mut m).unwrap();
        assert_eq!(r.xmm[0], A);
        // movdqa 0x10(%rdi),%xmm2 on an unaligned address: #GP(0), nothing written.
        r.xmm[2] = 5;
        let gp = Err(SimdError::Fault {
            vector: rules::GP_VECTOR,
            error_code: Some(0),
        });
        assert_eq!(run(&[0x66, 0x0f, 0x6f, 0x57, 0x10], &mut r, &mut m), gp);
        assert_eq!(r.xmm[2], 5);
        // pxor from unaligned memory: #GP(0) too.
        assert_eq!(run(&[0x66, 0x0f, 0xef, 0x57, 0x10], &mut r, &mut m), gp);
    }

    #[test]
    fn rip_relative_operands_use_the_next_ip() {
        // movdqa 0x100(%rip),%xmm12 at 0x1000: 9 bytes, operand at 0x1109.
        let insn = decode(
            &[0x66, 0x44, 0x0f, 0x6f, 0x25, 0x00, 0x01, 0x00, 0x00],
            0x1000,
        );
        assert_eq!(memory_address(&insn, &[0; 16], 0, 0), Some(0x1109));
        // %gs:0x28 adds the GS base.
        let insn = Decoder::with_ip(
            64,
            &[0x65, 0x48, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0],
            0,
            DecoderOptions::NONE,
        )
        .decode();
        assert_eq!(memory_address(&insn, &[0; 16], 0, 0x5000), Some(0x5028));
    }

    #[test]
    fn ldmxcsr_and_stmxcsr() {
        let mut r = SimdRegs::default();
        let mut m = Mem::default();
        // kernel_fpu_begin: movl $0x1f80,0x4(%rsp); ldmxcsr 0x4(%rsp)
        r.gpr[4] = 0x8000;
        m.write(0x8004, &0x1f80u32.to_le_bytes()).unwrap();
        run(&[0x0f, 0xae, 0x54, 0x24, 0x04], &mut r, &mut m).unwrap();
        assert_eq!(r.mxcsr, 0x1f80);
        // stmxcsr 0x8(%rsp)
        run(&[0x0f, 0xae, 0x5c, 0x24, 0x08], &mut r, &mut m).unwrap();
        let mut b = [0u8; 4];
        m.read(0x8008, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x1f80);
        // Reserved bits: #GP(0), MXCSR unchanged.
        m.write(0x8004, &0x1_0000u32.to_le_bytes()).unwrap();
        assert!(matches!(
            run(&[0x0f, 0xae, 0x54, 0x24, 0x04], &mut r, &mut m),
            Err(SimdError::Fault { vector: 13, .. })
        ));
        assert_eq!(r.mxcsr, 0x1f80);
    }

    #[test]
    fn unmapped_memory_is_an_error_not_a_panic() {
        let mut r = SimdRegs::default();
        let mut m = Mem::default();
        assert!(matches!(
            run(&[0x66, 0x0f, 0x6e, 0x06], &mut r, &mut m),
            Err(SimdError::Memory(_))
        ));
    }

    /// The host CPU's own result for `code` on `a`, `b`, `imm` (the
    /// reference the emulation must match), `None` if the host lacks SSSE3.
    #[cfg(target_arch = "x86_64")]
    fn host(code: Code, a: u128, b: u128, imm: u8) -> Option<u128> {
        use std::arch::x86_64::*;
        if !is_x86_feature_detected!("ssse3") {
            return None;
        }
        // SAFETY: SSE2 is part of x86-64 and SSSE3 was detected above; the
        // intrinsics only read and write the values passed.
        unsafe {
            let (x, y) = (
                _mm_loadu_si128(a.to_le_bytes().as_ptr().cast()),
                _mm_loadu_si128(b.to_le_bytes().as_ptr().cast()),
            );
            let cnt = _mm_cvtsi32_si128(i32::from(imm));
            let r = match code {
                Code::Pxor_xmm_xmmm128 => _mm_xor_si128(x, y),
                Code::Por_xmm_xmmm128 => _mm_or_si128(x, y),
                Code::Pand_xmm_xmmm128 => _mm_and_si128(x, y),
                Code::Pandn_xmm_xmmm128 => _mm_andnot_si128(x, y),
                Code::Paddd_xmm_xmmm128 => _mm_add_epi32(x, y),
                Code::Paddq_xmm_xmmm128 => _mm_add_epi64(x, y),
                Code::Psubd_xmm_xmmm128 => _mm_sub_epi32(x, y),
                Code::Psubq_xmm_xmmm128 => _mm_sub_epi64(x, y),
                Code::Pshufb_xmm_xmmm128 => _mm_shuffle_epi8(x, y),
                Code::Psrld_xmm_imm8 => _mm_srl_epi32(x, cnt),
                Code::Pslld_xmm_imm8 => _mm_sll_epi32(x, cnt),
                Code::Psrlq_xmm_imm8 => _mm_srl_epi64(x, cnt),
                Code::Psllq_xmm_imm8 => _mm_sll_epi64(x, cnt),
                Code::Punpckldq_xmm_xmmm128 => _mm_unpacklo_epi32(x, y),
                Code::Punpckhdq_xmm_xmmm128 => _mm_unpackhi_epi32(x, y),
                Code::Punpcklqdq_xmm_xmmm128 => _mm_unpacklo_epi64(x, y),
                Code::Punpckhqdq_xmm_xmmm128 => _mm_unpackhi_epi64(x, y),
                _ => return None,
            };
            let mut out = [0u8; 16];
            _mm_storeu_si128(out.as_mut_ptr().cast(), r);
            Some(u128::from_le_bytes(out))
        }
    }

    /// A small deterministic generator (xorshift) for operand values.
    fn values(n: usize) -> Vec<u128> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut v = vec![
            0,
            u128::MAX,
            1 << 127,
            0x8080_8080_8080_8080_8080_8080_8080_8080,
        ];
        while v.len() < n {
            v.push(u128::from(next()) << 64 | u128::from(next()));
        }
        v
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_lane_operation_matches_the_host_cpu() {
        use Code::*;
        let codes = [
            Pxor_xmm_xmmm128,
            Por_xmm_xmmm128,
            Pand_xmm_xmmm128,
            Pandn_xmm_xmmm128,
            Paddd_xmm_xmmm128,
            Paddq_xmm_xmmm128,
            Psubd_xmm_xmmm128,
            Psubq_xmm_xmmm128,
            Pshufb_xmm_xmmm128,
            Psrld_xmm_imm8,
            Pslld_xmm_imm8,
            Psrlq_xmm_imm8,
            Psllq_xmm_imm8,
            Punpckldq_xmm_xmmm128,
            Punpckhdq_xmm_xmmm128,
            Punpcklqdq_xmm_xmmm128,
            Punpckhqdq_xmm_xmmm128,
        ];
        let vals = values(40);
        for code in codes {
            for (i, &a) in vals.iter().enumerate() {
                let b = vals[(i * 7 + 3) % vals.len()];
                for imm in [0u8, 1, 7, 12, 20, 25, 31, 32, 63, 64, 200] {
                    let Some(want) = host(code, a, b, imm) else {
                        return;
                    };
                    assert_eq!(
                        binary(code, a, b, imm),
                        Some(want),
                        "{code:?} a={a:#x} b={b:#x} imm={imm}"
                    );
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn pshufd_and_byte_shifts_match_the_host_cpu() {
        use std::arch::x86_64::*;
        for &a in &values(40) {
            // SAFETY: SSE2 is part of x86-64; the intrinsics only touch the
            // values passed. The immediates must be constants.
            let (want_d, want_r, want_l) = unsafe {
                let x = _mm_loadu_si128(a.to_le_bytes().as_ptr().cast());
                let mut d = [0u8; 16];
                _mm_storeu_si128(d.as_mut_ptr().cast(), _mm_shuffle_epi32(x, 0x93));
                let mut r = [0u8; 16];
                _mm_storeu_si128(r.as_mut_ptr().cast(), _mm_srli_si128(x, 5));
                let mut l = [0u8; 16];
                _mm_storeu_si128(l.as_mut_ptr().cast(), _mm_slli_si128(x, 9));
                (
                    u128::from_le_bytes(d),
                    u128::from_le_bytes(r),
                    u128::from_le_bytes(l),
                )
            };
            assert_eq!(
                binary(Code::Pshufd_xmm_xmmm128_imm8, 0, a, 0x93),
                Some(want_d)
            );
            assert_eq!(binary(Code::Psrldq_xmm_imm8, a, 0, 5), Some(want_r));
            assert_eq!(binary(Code::Pslldq_xmm_imm8, a, 0, 9), Some(want_l));
        }
    }

    #[test]
    fn gpr_widths_and_indexes() {
        assert_eq!(gpr_reg(Register::RAX), Some((0, 8)));
        assert_eq!(gpr_reg(Register::R15), Some((15, 8)));
        assert_eq!(gpr_reg(Register::ESI), Some((6, 4)));
        assert_eq!(gpr_reg(Register::R8W), Some((8, 2)));
        assert_eq!(gpr_reg(Register::XMM0), None);
        assert_eq!(gpr_index(Register::AX), None);
        assert_eq!(xmm_index(Register::XMM15), Some(15));
        assert_eq!(xmm_index(Register::XMM16), None);
    }

    #[test]
    fn shifts_past_the_width_give_zero() {
        assert_eq!(binary(Code::Psrld_xmm_imm8, u128::MAX, 0, 32), Some(0));
        assert_eq!(binary(Code::Psllq_xmm_imm8, u128::MAX, 0, 64), Some(0));
        assert_eq!(binary(Code::Psrldq_xmm_imm8, u128::MAX, 0, 16), Some(0));
        assert_eq!(binary(Code::Pslldq_xmm_imm8, 1, 0, 1), Some(0x100));
        assert_eq!(
            binary(Code::Pandn_xmm_xmmm128, 0b1100, 0b1010, 0),
            Some(0b0010)
        );
        assert_eq!(binary(Code::Nopd, 0, 0, 0), None);
    }
}
