//! The quirk layer: KVM emulation failures (`KVM_EXIT_INTERNAL_ERROR`,
//! suberror 1) on hosts whose KVM emulates guest CPL0 code instruction by
//! instruction. An instruction that emulator cannot run but whose effect the
//! VMM knows is done here as the processor would (INT3 → #BP, FWAIT → no-op
//! or #NM/#MF, UD0/1/2 → #UD, SSE integer instructions and LDMXCSR/STMXCSR
//! executed on the vCPU's XMM registers); anything else stops the VM with
//! RIP, the bytes there and a hint.
//!
//! - [`decide`]: bytes + vCPU state → what to do (pure, unit-tested);
//! - [`action`]: what is done in the emulator's place ([`Action`]);
//! - [`rules`]: the architectural rule of each handled instruction;
//! - [`simd`]: the SSE instructions the VMM executes (pure);
//! - [`guest`]: reading the vCPU and carrying the decision out;
//! - [`hint`]: hints for what stays unhandled;
//! - [`counts`]: how many of each kind were handled (in the run report).

pub mod action;
pub mod counts;
pub mod decide;
pub mod guest;
pub mod hint;
pub mod rules;
pub mod simd;

use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use crate::host::HostInfo;

pub use action::Action;
pub use counts::{counts, QuirkCounts};
pub use decide::{decide, CpuState, Decision, Quirk, Unhandled};
pub use guest::insn_bytes;

/// `KVM_INTERNAL_ERROR_EMULATION`.
pub const SUBERROR_EMULATION: u32 = 1;

/// What to do about an internal error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmulationVerdict {
    /// Handled by the quirk layer; resume the vCPU.
    Resumed,
    /// Stop the VM: the description says where and why.
    Fatal(String),
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Handle `KVM_EXIT_INTERNAL_ERROR` with `suberror` on `vcpu`.
pub fn handle(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    host: &HostInfo,
    suberror: u32,
    data: &[u64],
) -> EmulationVerdict {
    let regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => {
            return EmulationVerdict::Fatal(format!(
                "internal error {suberror}; KVM_GET_REGS failed: {e}"
            ))
        }
    };
    let rip = regs.rip;
    let bytes = insn_bytes(vcpu, mem, rip);
    if suberror != SUBERROR_EMULATION {
        return EmulationVerdict::Fatal(format!(
            "KVM internal error (suberror {suberror}, data {data:x?}) at RIP {rip:#x}, \
             instruction bytes {}",
            hex(&bytes)
        ));
    }
    let fatal = |why: &dyn std::fmt::Display| {
        EmulationVerdict::Fatal(format!(
            "emulation failure at RIP {rip:#x}, instruction bytes {}: {why}",
            hex(&bytes)
        ))
    };
    if !host.needs_emulator_workarounds() {
        return fatal(&"KVM could not emulate this instruction (hardware-virtualization host)");
    }
    let cpu = match guest::cpu_state(vcpu, &regs) {
        Ok(c) => c,
        Err(e) => return fatal(&format_args!("KVM_GET_SREGS failed: {e}")),
    };
    match decide(&bytes, &cpu) {
        Ok(d) => match guest::apply(vcpu, mem, regs, &d.action) {
            Ok(()) => {
                counts().record(d.quirk);
                log::debug!("quirk {} at {rip:#x}: {}", d.quirk, d.action);
                EmulationVerdict::Resumed
            }
            Err(e) => fatal(&format_args!("{}: {} failed: {e}", d.quirk, d.action)),
        },
        Err(u) => fatal(&u),
    }
}
