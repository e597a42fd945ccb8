//! The KVM side of the quirk layer: read the instruction and the state the
//! rules need from the vCPU, and carry out a decided [`Action`].

use kvm_bindings::{kvm_regs, kvm_vcpu_events};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::decide::{bitness, Action, CpuState};

/// Longest x86 instruction.
pub const MAX_INSN: usize = 15;
const PAGE: u64 = 4096;
/// EFER.LMA (long mode active).
const EFER_LMA: u64 = 1 << 10;

/// The guest bytes at virtual address `rip` (up to 15), translated through
/// the vCPU's page tables page by page; shorter when the next page is not
/// mapped, empty when RIP's own page is not.
pub fn insn_bytes(vcpu: &VcpuFd, mem: &GuestMemoryMmap, rip: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_INSN);
    let mut va = rip;
    while out.len() < MAX_INSN {
        let Ok(t) = vcpu.translate_gva(va) else { break };
        if t.valid == 0 {
            break;
        }
        let in_page = (PAGE - (t.physical_address & (PAGE - 1))) as usize;
        let mut buf = vec![0u8; (MAX_INSN - out.len()).min(in_page)];
        if mem
            .read_slice(&mut buf, GuestAddress(t.physical_address))
            .is_err()
        {
            break;
        }
        out.extend_from_slice(&buf);
        va = va.wrapping_add(buf.len() as u64);
    }
    out
}

/// The vCPU state the rules look at. The x87 status word is `None` when
/// `KVM_GET_FPU` fails (only FWAIT needs it).
pub fn cpu_state(vcpu: &VcpuFd) -> Result<CpuState, kvm_ioctls::Error> {
    let sregs = vcpu.get_sregs()?;
    let fsw = match vcpu.get_fpu() {
        Ok(f) => Some(f.fsw),
        Err(e) => {
            log::debug!("KVM_GET_FPU failed: {e}");
            None
        }
    };
    Ok(CpuState {
        bitness: bitness(
            sregs.efer & EFER_LMA != 0,
            sregs.cs.l != 0,
            sregs.cs.db != 0,
        ),
        cr0: sregs.cr0,
        fsw,
    })
}

/// Carry out `action` on the vCPU whose registers were `regs`.
pub fn apply(vcpu: &VcpuFd, mut regs: kvm_regs, action: &Action) -> Result<(), kvm_ioctls::Error> {
    match *action {
        Action::Skip { len } => {
            regs.rip = regs.rip.wrapping_add(u64::from(len));
            vcpu.set_regs(&regs)
        }
        Action::Raise {
            vector,
            error_code,
            advance,
        } => {
            if advance > 0 {
                regs.rip = regs.rip.wrapping_add(u64::from(advance));
                vcpu.set_regs(&regs)?;
            }
            let mut ev: kvm_vcpu_events = vcpu.get_vcpu_events()?;
            ev.exception.injected = 1;
            ev.exception.nr = vector;
            ev.exception.has_error_code = u8::from(error_code.is_some());
            ev.exception.error_code = error_code.unwrap_or(0);
            ev.exception.pending = 0;
            ev.exception_has_payload = 0;
            ev.flags = 0;
            vcpu.set_vcpu_events(&ev)
        }
    }
}
