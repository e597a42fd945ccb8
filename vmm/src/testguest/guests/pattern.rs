//! The page stamp used by `verify` and `unmap`: qword 0 = gfn, qword 1 =
//! generation, qword `i >= 2` = `(gfn * GOLDEN ^ generation) + i`.

use iced_x86::code_asm::*;

use crate::testguest::TestGuestError;

/// Multiplier of the pattern.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Qword `i` of the stamp of the page at `gpa` in generation `generation`.
pub fn stamp_qword(gpa: u64, generation: u64, i: usize) -> u64 {
    let gfn = gpa >> 12;
    match i {
        0 => gfn,
        1 => generation,
        _ => (gfn.wrapping_mul(GOLDEN) ^ generation).wrapping_add(i as u64),
    }
}

/// Stamps the page at `rdi` with generation `rbx`; `r10` must hold
/// [`GOLDEN`]. Clobbers rax, rcx.
pub fn emit_stamp(a: &mut CodeAssembler) -> Result<(), TestGuestError> {
    let mut q = a.create_label();
    a.mov(rax, rdi)?;
    a.shr(rax, 12)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(qword_ptr(rdi + 8), rbx)?;
    a.imul_2(rax, r10)?;
    a.xor(rax, rbx)?;
    a.add(rax, 2)?;
    a.mov(ecx, 2)?;
    a.set_label(&mut q)?;
    a.mov(qword_ptr(rdi + rcx * 8), rax)?;
    a.inc(rax)?;
    a.inc(ecx)?;
    a.cmp(ecx, 512)?;
    a.jb(q)?;
    Ok(())
}

/// Checks the page at `rdi` against generation `rbx` (`r10` = [`GOLDEN`]);
/// jumps to `bad` on the first mismatch, falls through if all match.
/// Clobbers rax, rcx.
pub fn emit_check(a: &mut CodeAssembler, bad: CodeLabel) -> Result<(), TestGuestError> {
    let mut q = a.create_label();
    a.mov(rax, rdi)?;
    a.shr(rax, 12)?;
    a.cmp(qword_ptr(rdi), rax)?;
    a.jne(bad)?;
    a.cmp(qword_ptr(rdi + 8), rbx)?;
    a.jne(bad)?;
    a.imul_2(rax, r10)?;
    a.xor(rax, rbx)?;
    a.add(rax, 2)?;
    a.mov(ecx, 2)?;
    a.set_label(&mut q)?;
    a.cmp(qword_ptr(rdi + rcx * 8), rax)?;
    a.jne(bad)?;
    a.inc(rax)?;
    a.inc(ecx)?;
    a.cmp(ecx, 512)?;
    a.jb(q)?;
    Ok(())
}

/// Jumps to `bad` unless the page at `rdi` is all zero. Clobbers rcx.
pub fn emit_check_zero(a: &mut CodeAssembler, bad: CodeLabel) -> Result<(), TestGuestError> {
    let mut q = a.create_label();
    a.xor(ecx, ecx)?;
    a.set_label(&mut q)?;
    a.cmp(qword_ptr(rdi + rcx * 8), 0)?;
    a.jne(bad)?;
    a.inc(ecx)?;
    a.cmp(ecx, 512)?;
    a.jb(q)?;
    Ok(())
}
