//! `hello`: vCPU 0 prints [`GREETING`]; every vCPU writes
//! [`hello_stamp`]`(gpa)` into the first 8 bytes of every 4K page of its
//! slice, reports `pages_touched` and succeeds.

use iced_x86::code_asm::*;

use crate::testguest::builder::GuestBuilder;
use crate::testguest::device::ReportKey;
use crate::testguest::TestGuestError;

/// What `hello` prints.
pub const GREETING: &str = "hello from test guest";
/// XORed into each page's address.
pub const HELLO_MAGIC: u64 = 0x4845_4c4c_4f00_0000;

/// The qword `hello` writes at the start of the page at `gpa`.
pub fn hello_stamp(gpa: u64) -> u64 {
    gpa ^ HELLO_MAGIC
}

/// Emits the workload.
pub fn emit(b: &mut GuestBuilder) -> Result<(), TestGuestError> {
    let mut quiet = b.a.create_label();
    b.a.test(r15, r15)?;
    b.a.jnz(quiet)?;
    b.print(GREETING)?;
    let a = &mut b.a;
    a.set_label(&mut quiet)?;
    let mut lp = a.create_label();
    let mut done = a.create_label();
    a.mov(rbx, HELLO_MAGIC)?;
    a.xor(r8d, r8d)?;
    a.mov(rdi, r12)?;
    a.set_label(&mut lp)?;
    a.cmp(rdi, r13)?;
    a.jae(done)?;
    a.mov(rax, rdi)?;
    a.xor(rax, rbx)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.inc(r8)?;
    a.add(rdi, 0x1000)?;
    a.jmp(lp)?;
    a.set_label(&mut done)?;
    b.report(ReportKey::PagesTouched, r8)?;
    b.a.xor(eax, eax)?;
    b.a.ret()?;
    Ok(())
}
