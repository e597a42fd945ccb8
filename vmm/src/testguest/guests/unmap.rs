//! `unmap`: partial give-back of 2M frames.
//!
//! Every vCPU, on its slice, with `K = min(frames, ceil(frames in the
//! slice / stride))`, gives back a page of each of the K frames `0, stride,
//! 2 * stride, ...` of its slice (`stride` spreads them over the slice, e.g.
//! to both sides of the 32-bit MMIO hole):
//!
//! | phase (CHECKPOINT) | what happened before it |
//! |---|---|
//! | 1 | every page stamped with generation 1 |
//! | 2 | DISCARD of page `page` (4K) of each of the first K frames (`whole=1`: of all of each frame, 2M) |
//! | 3 | every kept page checked against generation 1, every discarded page checked to read zero |
//! | 4 | REFILL of each discarded page, which must read zero again |
//! | 5 | every page stamped with generation 2 and checked |
//!
//! Reports `pages_discarded` (K), `nonzero_discarded`, `mismatches` (kept or
//! re-stamped pages that differed) and `pages_checked`; succeeds iff both
//! counts of bad pages are zero.

use iced_x86::code_asm::*;

use super::pattern::{emit_check, emit_check_zero, emit_stamp, GOLDEN};
use crate::testguest::builder::{Arg, GuestBuilder};
use crate::testguest::device::ReportKey;
use crate::testguest::{TestGuestError, TestGuestParams};

/// Frames each vCPU gives a page of back unless `frames` says otherwise.
pub const DEFAULT_FRAMES: u64 = 8;

/// Arguments: `frames` (K, default [`DEFAULT_FRAMES`]), `page` (index of
/// the 4K page given back in each frame, 0..512, default 1), `whole` (1:
/// give back and take back each of the K frames whole, 2M; default 0),
/// `stride` (frames from one given-back frame to the next, a power of two,
/// default 1).
pub const ARGS: &[&str] = &["frames", "page", "whole", "stride"];

fn arg(
    params: &TestGuestParams,
    name: &'static str,
    default: u64,
    max: u64,
) -> Result<u64, TestGuestError> {
    let v = params.args.get(name).copied().unwrap_or(default);
    if v > max {
        return Err(TestGuestError::BadArg {
            guest: params.name,
            arg: name,
            value: v,
            why: format!("at most {max}"),
        });
    }
    Ok(v)
}

/// rdi loops over the slice; calls `body` per page; rdi preserved for it.
fn for_each_page(
    b: &mut GuestBuilder,
    body: &mut dyn FnMut(&mut GuestBuilder) -> Result<(), TestGuestError>,
) -> Result<(), TestGuestError> {
    let mut lp = b.a.create_label();
    let mut done = b.a.create_label();
    b.a.mov(rdi, r12)?;
    b.a.set_label(&mut lp)?;
    b.a.cmp(rdi, r13)?;
    b.a.jae(done)?;
    body(b)?;
    b.a.add(rdi, 0x1000)?;
    b.a.jmp(lp)?;
    b.a.set_label(&mut done)?;
    Ok(())
}

/// Jumps to `discarded` if the page at rdi is one of the K given back
/// (r11 = K, rbp = page index, frames `stride = 1 << shift` apart; `whole`:
/// every page of the K frames). Clobbers rax.
fn emit_is_discarded(
    a: &mut CodeAssembler,
    discarded: CodeLabel,
    whole: bool,
    shift: u32,
) -> Result<(), TestGuestError> {
    let mut no = a.create_label();
    a.mov(rax, rdi)?;
    a.sub(rax, r12)?;
    a.shr(rax, 21)?;
    if shift > 0 {
        a.test(eax, (1u32 << shift) as i32 - 1)?;
        a.jnz(no)?;
        a.shr(rax, shift)?;
    }
    a.cmp(rax, r11)?;
    a.jae(no)?;
    if whole {
        a.jmp(discarded)?;
    }
    a.mov(rax, rdi)?;
    a.shr(rax, 12)?;
    a.and(eax, 511)?;
    a.cmp(rax, rbp)?;
    a.je(discarded)?;
    a.set_label(&mut no)?;
    a.nop()?;
    Ok(())
}

/// For each discarded page (address in rsi), runs `body`. Clobbers rcx? no:
/// uses rsi and r9 as loop registers; `body` must preserve them.
fn for_each_discarded(
    b: &mut GuestBuilder,
    shift: u32,
    body: &mut dyn FnMut(&mut GuestBuilder) -> Result<(), TestGuestError>,
) -> Result<(), TestGuestError> {
    let mut lp = b.a.create_label();
    let mut done = b.a.create_label();
    b.a.mov(rsi, rbp)?;
    b.a.shl(rsi, 12)?;
    b.a.add(rsi, r12)?;
    b.a.xor(r9d, r9d)?;
    b.a.set_label(&mut lp)?;
    b.a.cmp(r9, r11)?;
    b.a.jae(done)?;
    body(b)?;
    b.a.mov(rax, 0x20_0000u64 << shift)?;
    b.a.add(rsi, rax)?;
    b.a.inc(r9)?;
    b.a.jmp(lp)?;
    b.a.set_label(&mut done)?;
    Ok(())
}

/// Emits the workload.
pub fn emit(b: &mut GuestBuilder, params: &TestGuestParams) -> Result<(), TestGuestError> {
    let frames = arg(params, "frames", DEFAULT_FRAMES, u64::from(u32::MAX))?;
    let whole = arg(params, "whole", 0, 1)? == 1;
    // Whole frames: rsi walks frame bases (page 0); one DISCARD/REFILL of 2M each.
    let page = if whole {
        0
    } else {
        arg(params, "page", 1, 511)?
    };
    let len: i32 = if whole { 0x20_0000 } else { 0x1000 };
    let stride = arg(params, "stride", 1, 1 << 20)?;
    if !stride.is_power_of_two() {
        return Err(TestGuestError::BadArg {
            guest: params.name,
            arg: "stride",
            value: stride,
            why: "a power of two".into(),
        });
    }
    let shift = stride.trailing_zeros();
    // r8 = bad kept pages, r15/r14 reserved, r10 = GOLDEN, r11 = K, rbp = page,
    // rbx = generation, r9/rsi loop registers, [rsp] = pages checked,
    // [rsp + 8] = non-zero discarded pages.
    let a = &mut b.a;
    a.sub(rsp, 16)?;
    a.mov(qword_ptr(rsp), 0)?;
    a.mov(qword_ptr(rsp + 8), 0)?;
    a.xor(r8d, r8d)?;
    a.mov(r10, GOLDEN)?;
    a.mov(r11, r13)?;
    a.sub(r11, r12)?;
    a.shr(r11, 21)?;
    if shift > 0 {
        // ceil(frames in the slice / stride)
        a.add(r11, (1u32 << shift) as i32 - 1)?;
        a.shr(r11, shift)?;
    }
    a.mov(rax, frames)?;
    a.cmp(r11, rax)?;
    a.cmova(r11, rax)?;
    a.mov(ebp, page as u32)?;
    // Phase 1: stamp generation 1.
    a.mov(ebx, 1)?;
    for_each_page(b, &mut |b| emit_stamp(&mut b.a))?;
    b.checkpoint(Arg::Imm(1))?;
    // Phase 2: give back one page per frame.
    for_each_discarded(b, shift, &mut |b| b.discard(Arg::Reg(rsi), Arg::Imm(len)))?;
    b.report(ReportKey::PagesDiscarded, r11)?;
    b.checkpoint(Arg::Imm(2))?;
    // Phase 3: kept pages hold generation 1, discarded ones read zero.
    for_each_page(b, &mut |b| {
        let a = &mut b.a;
        let mut discarded = a.create_label();
        let mut bad_kept = a.create_label();
        let mut bad_zero = a.create_label();
        let mut next = a.create_label();
        a.inc(qword_ptr(rsp))?;
        emit_is_discarded(a, discarded, whole, shift)?;
        emit_check(a, bad_kept)?;
        a.jmp(next)?;
        a.set_label(&mut bad_kept)?;
        a.inc(r8)?;
        a.jmp(next)?;
        a.set_label(&mut discarded)?;
        emit_check_zero(a, bad_zero)?;
        a.jmp(next)?;
        a.set_label(&mut bad_zero)?;
        a.inc(qword_ptr(rsp + 8))?;
        a.set_label(&mut next)?;
        a.nop()?;
        Ok(())
    })?;
    b.checkpoint(Arg::Imm(3))?;
    // Phase 4: take the pages back; they must read zero.
    for_each_discarded(b, shift, &mut |b| {
        b.refill(Arg::Reg(rsi), Arg::Imm(len))?;
        let a = &mut b.a;
        let mut bad = a.create_label();
        let mut ok = a.create_label();
        a.mov(rdi, rsi)?;
        emit_check_zero(a, bad)?;
        a.jmp(ok)?;
        a.set_label(&mut bad)?;
        a.inc(qword_ptr(rsp + 8))?;
        a.set_label(&mut ok)?;
        a.nop()?;
        Ok(())
    })?;
    b.checkpoint(Arg::Imm(4))?;
    // Phase 5: stamp generation 2 everywhere and check it.
    b.a.mov(ebx, 2)?;
    for_each_page(b, &mut |b| emit_stamp(&mut b.a))?;
    for_each_page(b, &mut |b| {
        let a = &mut b.a;
        let mut bad = a.create_label();
        let mut next = a.create_label();
        a.inc(qword_ptr(rsp))?;
        emit_check(a, bad)?;
        a.jmp(next)?;
        a.set_label(&mut bad)?;
        a.inc(r8)?;
        a.set_label(&mut next)?;
        a.nop()?;
        Ok(())
    })?;
    b.checkpoint(Arg::Imm(5))?;
    b.a.mov(rbx, qword_ptr(rsp + 8))?;
    b.report(ReportKey::NonZeroDiscarded, rbx)?;
    b.report(ReportKey::Mismatches, r8)?;
    b.a.mov(rbx, qword_ptr(rsp))?;
    b.report(ReportKey::PagesChecked, rbx)?;
    let a = &mut b.a;
    a.or(r8, qword_ptr(rsp + 8))?;
    a.add(rsp, 16)?;
    b.status_from(r8)?;
    b.a.ret()?;
    Ok(())
}
