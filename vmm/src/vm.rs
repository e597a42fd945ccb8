//! `Vm`: the KVM VM fd, in-kernel irqchip and PIT, the memslots over `GuestRam`,
//! and the vCPU fds configured for a 64-bit entry.

use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_pit_config, kvm_regs, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::boot::long_mode::{self, BootPageTables};
use crate::{cpuid, msr};

/// Address of the TSS pages KVM needs on Intel (3 pages below the BIOS area).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// LAPIC register offsets and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm missing or not permitted.
    #[error("cannot open {path}: {source}; {hint}")]
    KvmOpen {
        /// The device path.
        path: PathBuf,
        /// OS error.
        source: kvm_ioctls::Error,
        /// What to do.
        hint: &'static str,
    },
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// Supported CPUID could not be read.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// Long-mode set-up failed.
    #[error(transparent)]
    LongMode(#[from] long_mode::LongModeError),
    /// Too many vCPUs.
    #[error("{got} vCPUs requested; this host's KVM allows at most {max}")]
    TooManyVcpus {
        /// Requested.
        got: usize,
        /// Allowed.
        max: usize,
    },
    /// The kick signal handler could not be installed.
    #[error("installing the vCPU kick signal handler failed: {0}")]
    Signal(std::io::Error),
}

impl VmError {
    /// Whether this is the user's or host's set-up (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, VmError::KvmOpen { .. } | VmError::TooManyVcpus { .. })
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Open the KVM device at `path`.
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| VmError::KvmOpen {
        path: path.to_path_buf(),
        source: kvm_ioctls::Error::new(libc::EINVAL),
        hint: "the path contains a NUL byte",
    })?;
    Kvm::new_with_path(c.as_c_str()).map_err(|source| {
        let hint = match source.errno() {
            libc::ENOENT => "KVM is not available: load the kvm module (kvm_intel / kvm_amd) or run on a host with virtualization",
            libc::EACCES | libc::EPERM => "permission denied: add your user to the `kvm` group or run as root",
            _ => "check that KVM works on this host",
        };
        VmError::KvmOpen {
            path: path.to_path_buf(),
            source,
            hint,
        }
    })
}

/// A created VM with its vCPUs (not yet running).
#[derive(Debug)]
pub struct Vm {
    /// The KVM system fd.
    pub kvm: Kvm,
    /// The VM fd.
    pub fd: VmFd,
    /// vCPU fds, index = APIC id.
    pub vcpus: Vec<VcpuFd>,
    /// The memslots registered over guest RAM.
    pub slots: Vec<guest_mem::RamSlot>,
}

impl Vm {
    /// Create the VM: irqchip, PIT, the memslots `slots` (guest RAM, see
    /// `GuestRam::memslots`), and `vcpus` vCPUs with CPUID, MSRs, FPU and
    /// LAPIC set.
    ///
    /// # Safety
    ///
    /// Each slot's `[host_addr, host_addr + size)` must be a host mapping
    /// that stays valid (it may be remapped in place) for the life of the VM.
    pub unsafe fn new(kvm: Kvm, vcpus: usize, slots: &[guest_mem::RamSlot]) -> Result<Vm, VmError> {
        let max = kvm
            .get_max_vcpus()
            .min(crate::boot::mptable::MAX_VCPUS as usize);
        if vcpus == 0 || vcpus > max {
            return Err(VmError::TooManyVcpus { got: vcpus, max });
        }
        crate::control::install_kick_handler().map_err(VmError::Signal)?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if let Err(e) = fd.set_tss_address(KVM_TSS_ADDRESS) {
            log::debug!("KVM_SET_TSS_ADDR failed ({e}); not needed on this host");
        }
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        for s in slots {
            let region = kvm_userspace_memory_region {
                slot: s.id,
                flags: 0,
                guest_phys_addr: s.gpa,
                memory_size: s.size,
                userspace_addr: s.host_addr,
            };
            // SAFETY: the caller guarantees each slot's host range stays
            // mapped for the life of the VM; KVM only accesses it through
            // that mapping.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let base_cpuid = cpuid::supported(&kvm)?;
        let msrs = msr::boot_msrs().map_err(|_| VmError::Kvm {
            op: "building the boot MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let mut fds = Vec::with_capacity(vcpus);
        for i in 0..vcpus {
            let v = fd
                .create_vcpu(i as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            v.set_cpuid2(&cpuid::for_vcpu(&base_cpuid, i as u8, vcpus as u8))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            let n = v.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
            if n != msrs.as_slice().len() {
                log::warn!(
                    "vCPU {i}: KVM accepted only {n} of {} boot MSRs",
                    msrs.as_slice().len()
                );
            }
            let fpu = kvm_bindings::kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            v.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
            set_lint(&v)?;
            fds.push(v);
        }
        Ok(Vm {
            kvm,
            fd,
            vcpus: fds,
            slots: slots.to_vec(),
        })
    }

    /// Put vCPUs in 64-bit mode on `tables`: segment and control registers
    /// from `boot::long_mode`, general registers from `regs(index)`. With
    /// `all_vcpus` every vCPU starts at once (test guests); otherwise only
    /// vCPU 0 does and the others wait for INIT/SIPI (Linux brings them up).
    pub fn setup_long_mode(
        &self,
        tables: &BootPageTables,
        regs: impl Fn(usize) -> kvm_regs,
        all_vcpus: bool,
    ) -> Result<(), VmError> {
        let n = if all_vcpus { self.vcpus.len() } else { 1 };
        for (i, v) in self.vcpus.iter().enumerate().take(n) {
            long_mode::configure_vcpu(v, tables)?;
            v.set_regs(&regs(i)).map_err(kvm_err("KVM_SET_REGS"))?;
            if i > 0 {
                // APs start running at once, like the BSP (no INIT/SIPI).
                let mp = kvm_bindings::kvm_mp_state {
                    mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                };
                v.set_mp_state(mp).map_err(kvm_err("KVM_SET_MP_STATE"))?;
            }
        }
        Ok(())
    }
}

fn set_apic_reg(regs: &mut [std::os::raw::c_char], off: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

fn get_apic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    u32::from_le_bytes([
        regs[off] as u8,
        regs[off + 1] as u8,
        regs[off + 2] as u8,
        regs[off + 3] as u8,
    ])
}

/// LINT0 = ExtINT (the PIC's output), LINT1 = NMI, as a PC's BIOS leaves them.
fn set_lint(v: &VcpuFd) -> Result<(), VmError> {
    let mut lapic = v.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let lvt0 = get_apic_reg(&lapic.regs, APIC_LVT0);
    set_apic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lvt1 = get_apic_reg(&lapic.regs, APIC_LVT1);
    set_apic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
    );
    v.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

/// General registers for a 64-bit entry at `rip` with `rsp` and `rsi`.
pub fn entry_regs(rip: u64, rsp: u64, rsi: u64) -> kvm_regs {
    kvm_regs {
        rip,
        rsp,
        rbp: rsp,
        rsi,
        rflags: 2,
        ..Default::default()
    }
}
