//! `verify`: for each generation `g` in `1..=G`, every vCPU stamps every 4K
//! page of its slice ([`super::pattern`]), sends CHECKPOINT(g) (the VMM may
//! read stats, or tests may disturb memory), then checks every page of its
//! slice. Reports `mismatches` (pages that differed, over all generations)
//! and `pages_checked`; succeeds iff there were no mismatches.

use iced_x86::code_asm::*;

use super::pattern::{emit_check, emit_stamp, GOLDEN};
use crate::testguest::builder::{Arg, GuestBuilder};
use crate::testguest::device::ReportKey;
use crate::testguest::TestGuestError;

/// Emits the workload.
pub fn emit(b: &mut GuestBuilder, generations: u32) -> Result<(), TestGuestError> {
    let a = &mut b.a;
    let mut gen_loop = a.create_label();
    let mut wp = a.create_label();
    let mut wp_done = a.create_label();
    a.mov(ebx, 1)?;
    a.xor(r8d, r8d)?;
    a.xor(r9d, r9d)?;
    a.mov(r10, GOLDEN)?;
    a.set_label(&mut gen_loop)?;
    a.mov(rdi, r12)?;
    a.set_label(&mut wp)?;
    a.cmp(rdi, r13)?;
    a.jae(wp_done)?;
    emit_stamp(a)?;
    a.add(rdi, 0x1000)?;
    a.jmp(wp)?;
    a.set_label(&mut wp_done)?;
    b.checkpoint(Arg::Reg(rbx))?;
    let a = &mut b.a;
    let mut rp = a.create_label();
    let mut bad = a.create_label();
    let mut next = a.create_label();
    let mut rp_done = a.create_label();
    a.mov(rdi, r12)?;
    a.set_label(&mut rp)?;
    a.cmp(rdi, r13)?;
    a.jae(rp_done)?;
    a.inc(r9)?;
    emit_check(a, bad)?;
    a.jmp(next)?;
    a.set_label(&mut bad)?;
    a.inc(r8)?;
    a.set_label(&mut next)?;
    a.add(rdi, 0x1000)?;
    a.jmp(rp)?;
    a.set_label(&mut rp_done)?;
    a.inc(rbx)?;
    a.cmp(rbx, generations as i32 + 1)?;
    a.jb(gen_loop)?;
    b.report(ReportKey::Mismatches, r8)?;
    b.report(ReportKey::PagesChecked, r9)?;
    b.status_from(r8)?;
    b.a.ret()?;
    Ok(())
}
