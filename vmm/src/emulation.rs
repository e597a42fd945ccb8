//! KVM emulation failures (`KVM_EXIT_INTERNAL_ERROR`, suberror 1) on hosts
//! whose KVM emulates guest CPL0 code: INT3 is answered by injecting #BP;
//! anything else stops the VM with RIP, the bytes there and a hint.

use kvm_bindings::kvm_vcpu_events;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::host::HostInfo;

/// `KVM_INTERNAL_ERROR_EMULATION`.
pub const SUBERROR_EMULATION: u32 = 1;
/// Breakpoint exception vector.
const BP_VECTOR: u8 = 3;
/// Longest x86 instruction.
const MAX_INSN: usize = 15;

/// What to do about an internal error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmulationVerdict {
    /// Handled (INT3 → #BP injected); resume the vCPU.
    Resumed,
    /// Stop the VM: the description says where and why.
    Fatal(String),
}

/// The guest bytes at virtual address `rip` (up to 15, within one page),
/// translated through the vCPU's page tables.
pub fn insn_bytes(vcpu: &VcpuFd, mem: &GuestMemoryMmap, rip: u64) -> Vec<u8> {
    let Ok(t) = vcpu.translate_gva(rip) else {
        return Vec::new();
    };
    if t.valid == 0 {
        return Vec::new();
    }
    let in_page = (4096 - (t.physical_address & 0xfff)) as usize;
    let mut buf = vec![0u8; MAX_INSN.min(in_page)];
    match mem.read_slice(&mut buf, GuestAddress(t.physical_address)) {
        Ok(()) => buf,
        Err(_) => Vec::new(),
    }
}

/// A hint for the instruction in `bytes` (opcode patterns the paravirtual
/// host's emulator is known to fail on).
pub fn hint(bytes: &[u8]) -> &'static str {
    // Skip legacy prefixes and REX.
    let mut i = 0;
    while i < bytes.len()
        && matches!(
            bytes[i],
            0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3 | 0x2e | 0x3e | 0x26 | 0x64 | 0x65 | 0x36 | 0x40
                ..=0x4f
        )
    {
        i += 1;
    }
    let b = &bytes[i.min(bytes.len())..];
    match b {
        [0x0f, 0x01, 0xca | 0xcb, ..] => {
            "CLAC/STAC: add clearcpuid=smap to the kernel command line"
        }
        [0x0f, 0xc7, m, ..] if (m >> 3) & 7 == 1 => "CMPXCHG8B/16B: add clearcpuid=cx16",
        [0x0f, 0xae, m, ..] if matches!((m >> 3) & 7, 4..=6) && m >> 6 != 3 => {
            "XSAVE/XRSTOR family: add clearcpuid=xsave"
        }
        [0x0f, 0xb8, ..] => "POPCNT: add clearcpuid=popcnt",
        [0x0f, 0x01, 0xd0 | 0xd1, ..] => "XGETBV/XSETBV: add clearcpuid=xsave",
        [] => "the instruction bytes could not be read (RIP not mapped)",
        _ => {
            "this host's KVM emulates guest CPL0 code and cannot emulate this instruction; \
              on a VT-x/AMD-V host it runs natively"
        }
    }
}

/// Handle `KVM_EXIT_INTERNAL_ERROR` with `suberror` on `vcpu`.
pub fn handle(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    host: &HostInfo,
    suberror: u32,
    data: &[u64],
) -> EmulationVerdict {
    let mut regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => {
            return EmulationVerdict::Fatal(format!(
                "internal error {suberror}; KVM_GET_REGS failed: {e}"
            ))
        }
    };
    let bytes = insn_bytes(vcpu, mem, regs.rip);
    if suberror == SUBERROR_EMULATION
        && host.needs_emulator_workarounds()
        && bytes.first() == Some(&0xcc)
    {
        regs.rip += 1;
        let inject = || -> Result<(), kvm_ioctls::Error> {
            vcpu.set_regs(&regs)?;
            let mut ev: kvm_vcpu_events = vcpu.get_vcpu_events()?;
            ev.exception.injected = 1;
            ev.exception.nr = BP_VECTOR;
            ev.exception.has_error_code = 0;
            ev.exception.error_code = 0;
            ev.exception.pending = 0;
            ev.exception_has_payload = 0;
            ev.flags = 0;
            vcpu.set_vcpu_events(&ev)
        };
        return match inject() {
            Ok(()) => {
                log::debug!("INT3 at {:#x}: injected #BP", regs.rip - 1);
                EmulationVerdict::Resumed
            }
            Err(e) => EmulationVerdict::Fatal(format!(
                "INT3 at {:#x}: injecting #BP failed: {e}",
                regs.rip - 1
            )),
        };
    }
    let what = if suberror == SUBERROR_EMULATION {
        "emulation failure".to_string()
    } else {
        format!("KVM internal error (suberror {suberror}, data {data:x?})")
    };
    EmulationVerdict::Fatal(format!(
        "{what} at RIP {:#x}, instruction bytes {}: {}",
        regs.rip,
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" "),
        hint(&bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_clearcpuid_entry() {
        assert!(hint(&[0x0f, 0x01, 0xca]).contains("smap"));
        assert!(hint(&[0x48, 0x0f, 0xc7, 0x0e]).contains("cx16"));
        assert!(hint(&[0x0f, 0xae, 0x27]).contains("xsave"));
        assert!(hint(&[0xf3, 0x48, 0x0f, 0xb8, 0xc0]).contains("popcnt"));
        assert!(hint(&[]).contains("could not be read"));
        assert!(hint(&[0x90]).contains("VT-x"));
    }
}
