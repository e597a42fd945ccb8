//! The KVM side of the quirk layer: read the instruction and the state the
//! rules need from the vCPU, and carry out a decided [`Action`].

use iced_x86::Instruction;
use kvm_bindings::{kvm_regs, kvm_vcpu_events};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::action::Action;
use super::decide::{bitness, CpuState};
use super::simd::{self, MemError, Memory, SimdError, SimdRegs};

/// Why a decided action could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A KVM ioctl failed.
    #[error("{0}")]
    Kvm(#[from] kvm_ioctls::Error),
    /// The instruction could not be executed.
    #[error("{0}")]
    Simd(SimdError),
}

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

/// The vCPU state the rules look at (`regs` already read). The x87 status
/// word is `None` when `KVM_GET_FPU` fails (only FWAIT needs it).
pub fn cpu_state(vcpu: &VcpuFd, regs: &kvm_regs) -> Result<CpuState, kvm_ioctls::Error> {
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
        rip: regs.rip,
        cr0: sregs.cr0,
        cr4: sregs.cr4,
        fsw,
    })
}

/// Carry out `action` on the vCPU whose registers were `regs`.
pub fn apply(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    mut regs: kvm_regs,
    action: &Action,
) -> Result<(), ApplyError> {
    match *action {
        Action::Skip { len } => {
            regs.rip = regs.rip.wrapping_add(u64::from(len));
            vcpu.set_regs(&regs)?;
        }
        Action::Raise {
            vector,
            error_code,
            advance,
        } => raise(vcpu, regs, vector, error_code, advance)?,
        Action::Execute { insn } => execute(vcpu, mem, regs, &insn)?,
    }
    Ok(())
}

fn raise(
    vcpu: &VcpuFd,
    mut regs: kvm_regs,
    vector: u8,
    error_code: Option<u32>,
    advance: u8,
) -> Result<(), kvm_ioctls::Error> {
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

fn gprs(r: &kvm_regs) -> [u64; 16] {
    [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ]
}

fn set_gprs(r: &mut kvm_regs, g: &[u64; 16]) {
    [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ] = *g;
}

/// [`simd::execute`] on the vCPU's registers and guest memory: XMM/MXCSR
/// through `KVM_GET/SET_FPU`, a fault it reports is injected with RIP
/// unchanged, else RIP moves past the instruction.
fn execute(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    mut regs: kvm_regs,
    insn: &Instruction,
) -> Result<(), ApplyError> {
    let mut fpu = vcpu.get_fpu()?;
    let sregs = vcpu.get_sregs()?;
    let mut r = SimdRegs {
        xmm: fpu.xmm.map(u128::from_le_bytes),
        mxcsr: fpu.mxcsr,
        gpr: gprs(&regs),
    };
    let before = r;
    let addr = simd::memory_address(insn, &r.gpr, sregs.fs.base, sregs.gs.base);
    match simd::execute(insn, &mut r, addr, &mut GuestVirt { vcpu, mem }) {
        Ok(()) => {}
        Err(SimdError::Fault { vector, error_code }) => {
            raise(vcpu, regs, vector, error_code, 0)?;
            return Ok(());
        }
        Err(e) => return Err(ApplyError::Simd(e)),
    }
    if r.xmm != before.xmm || r.mxcsr != before.mxcsr {
        fpu.xmm = r.xmm.map(u128::to_le_bytes);
        fpu.mxcsr = r.mxcsr;
        vcpu.set_fpu(&fpu)?;
    }
    set_gprs(&mut regs, &r.gpr);
    regs.rip = regs.rip.wrapping_add(insn.len() as u64);
    vcpu.set_regs(&regs)?;
    Ok(())
}

/// Guest virtual memory through the vCPU's page tables.
struct GuestVirt<'a> {
    vcpu: &'a VcpuFd,
    mem: &'a GuestMemoryMmap,
}

impl GuestVirt<'_> {
    /// The guest-physical pieces of `[addr, addr + len)`, each within a page;
    /// all must be mapped (and writable for a write) before any is touched.
    fn pieces(&self, addr: u64, len: usize, write: bool) -> Result<Vec<(u64, usize)>, MemError> {
        let err = MemError { addr, len, write };
        let mut out = Vec::new();
        let mut done = 0usize;
        while done < len {
            let va = addr.wrapping_add(done as u64);
            let t = self.vcpu.translate_gva(va).map_err(|_| err)?;
            if t.valid == 0 || (write && t.writeable == 0) {
                return Err(err);
            }
            let n = ((PAGE - (t.physical_address & (PAGE - 1))) as usize).min(len - done);
            out.push((t.physical_address, n));
            done += n;
        }
        Ok(out)
    }
}

impl Memory for GuestVirt<'_> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let err = MemError {
            addr,
            len: buf.len(),
            write: false,
        };
        let mut off = 0;
        for (gpa, n) in self.pieces(addr, buf.len(), false)? {
            self.mem
                .read_slice(&mut buf[off..off + n], GuestAddress(gpa))
                .map_err(|_| err)?;
            off += n;
        }
        Ok(())
    }

    fn write(&mut self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        let err = MemError {
            addr,
            len: buf.len(),
            write: true,
        };
        let mut off = 0;
        for (gpa, n) in self.pieces(addr, buf.len(), true)? {
            self.mem
                .write_slice(&buf[off..off + n], GuestAddress(gpa))
                .map_err(|_| err)?;
            off += n;
        }
        Ok(())
    }
}
