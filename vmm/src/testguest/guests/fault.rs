//! `fault`: vCPU 0 reads the first byte past guest RAM, which its page
//! tables do not map: the IDT stub must report FAULT with vector 14 and CR2
//! = `ram_size`. Other vCPUs succeed. Should the read not fault, the guest
//! exits with status 1.

use iced_x86::code_asm::*;

use crate::testguest::builder::GuestBuilder;
use crate::testguest::TestGuestError;

/// Emits the workload.
pub fn emit(b: &mut GuestBuilder) -> Result<(), TestGuestError> {
    let ram = b.layout.ram_size;
    let mut other = b.a.create_label();
    b.a.test(r15, r15)?;
    b.a.jnz(other)?;
    b.print(&format!("fault: reading unmapped gpa {ram:#x}"))?;
    let a = &mut b.a;
    a.mov(rbx, ram)?;
    a.mov(rax, qword_ptr(rbx))?;
    a.mov(eax, 1)?;
    a.ret()?;
    a.set_label(&mut other)?;
    a.xor(eax, eax)?;
    a.ret()?;
    Ok(())
}
