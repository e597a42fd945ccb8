//! The guest generators. Each emits one workload function (see
//! [`super::builder`] for the register contract) and returns its label.

pub mod fault;
pub mod hello;
pub mod pattern;
pub mod stress;
pub mod tlb;
pub mod unmap;
pub mod verify;

use iced_x86::code_asm::CodeLabel;

use super::builder::GuestBuilder;
use super::{TestGuestError, TestGuestName, TestGuestParams};

/// Arguments (`TestGuestParams::args` keys) each guest accepts.
pub fn valid_args(name: TestGuestName) -> &'static [&'static str] {
    match name {
        TestGuestName::Hello | TestGuestName::Verify | TestGuestName::Fault => &[],
        TestGuestName::Unmap => unmap::ARGS,
        TestGuestName::Tlb => tlb::ARGS,
        TestGuestName::Stress => stress::ARGS,
    }
}

/// Rejects arguments the guest does not know.
pub fn check_args(params: &TestGuestParams) -> Result<(), TestGuestError> {
    let valid = valid_args(params.name);
    for arg in params.args.keys() {
        if !valid.contains(&arg.as_str()) {
            return Err(TestGuestError::UnknownArg {
                guest: params.name,
                arg: arg.clone(),
                valid: if valid.is_empty() {
                    "(none)".to_owned()
                } else {
                    valid.join(", ")
                },
            });
        }
    }
    Ok(())
}

/// Emits the workload of `params.name`; returns its label.
pub fn emit(b: &mut GuestBuilder, params: &TestGuestParams) -> Result<CodeLabel, TestGuestError> {
    let mut label = b.a.create_label();
    b.a.set_label(&mut label)?;
    match params.name {
        TestGuestName::Hello => hello::emit(b)?,
        TestGuestName::Verify => verify::emit(b, params.generations)?,
        TestGuestName::Unmap => unmap::emit(b, params)?,
        TestGuestName::Fault => fault::emit(b)?,
        TestGuestName::Tlb => tlb::emit(b, params)?,
        TestGuestName::Stress => stress::emit(b, params)?,
    }
    Ok(label)
}
