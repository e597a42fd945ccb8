//! Host detection: hardware virtualization (VT-x/AMD-V) or a paravirtual,
//! shadow-paging KVM (no `vmx`/`svm` in `/proc/cpuinfo`, `tdp_mmu=N`).

use std::fs;

/// The kernel command-line entries a paravirtual, shadow-paging host needs:
/// `clearcpuid` hides instructions its emulator cannot run, and `nolapic_timer`
/// keeps the kernel on the PIT (the boot-time LAPIC timer calibration runs at
/// emulated CPL0 there). On VT-x/AMD-V hosts the LAPIC timer is kept: with the
/// PIT alone a nested guest was seen to wait forever for a timer tick.
pub const PV_CMDLINE: &str = "nolapic_timer clearcpuid=smap,smep,umip,cx16,xsave,popcnt";

/// What kind of KVM this host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum HostKind {
    /// VT-x or AMD-V: two-dimensional paging, CPL0 runs natively.
    HardwareVirt,
    /// No hardware virtualization: paravirtual shadow paging; guest CPL0 is emulated.
    ParavirtShadow,
}

/// Facts about the host that change what the VMM does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HostInfo {
    /// Kind of KVM.
    pub kind: HostKind,
    /// `/sys/module/kvm/parameters/tdp_mmu` is `Y`.
    pub tdp_mmu: bool,
}

impl HostInfo {
    /// Detect from `/proc/cpuinfo` and sysfs; unreadable files count as "absent".
    pub fn detect() -> HostInfo {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let tdp = fs::read_to_string("/sys/module/kvm/parameters/tdp_mmu").unwrap_or_default();
        Self::from_texts(&cpuinfo, &tdp)
    }

    /// Decide from the texts of `/proc/cpuinfo` and the `tdp_mmu` parameter.
    pub fn from_texts(cpuinfo: &str, tdp_mmu: &str) -> HostInfo {
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        let tdp_mmu = tdp_mmu.trim().eq_ignore_ascii_case("y");
        let kind = if hw {
            HostKind::HardwareVirt
        } else {
            HostKind::ParavirtShadow
        };
        HostInfo { kind, tdp_mmu }
    }

    /// Shadow paging: the guest's own page size caps KVM's mapping level.
    pub fn shadow_paging(&self) -> bool {
        self.kind == HostKind::ParavirtShadow
    }

    /// Whether the emulator workarounds (clearcpuid, INT3 → #BP) apply.
    pub fn needs_emulator_workarounds(&self) -> bool {
        self.kind == HostKind::ParavirtShadow
    }
}

/// The host kernel's release (`/proc/sys/kernel/osrelease`), or `unknown`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_paravirtual_hosts_lose_the_lapic_timer() {
        let hw = crate::boot::linux::DEFAULT_CMDLINE;
        assert!(!hw.contains("nolapic_timer"), "{hw}");
        assert!(PV_CMDLINE.contains("nolapic_timer"));
        assert!(PV_CMDLINE.contains("clearcpuid="));
    }

    use super::*;

    #[test]
    fn vmx_flag_means_hardware() {
        let h = HostInfo::from_texts("flags\t\t: fpu vme vmx sse\n", "Y\n");
        assert_eq!(h.kind, HostKind::HardwareVirt);
        assert!(h.tdp_mmu);
        assert!(!h.needs_emulator_workarounds());
        assert!(!h.shadow_paging());
    }

    #[test]
    fn svm_flag_means_hardware() {
        let h = HostInfo::from_texts("flags : fpu svm\n", "N");
        assert_eq!(h.kind, HostKind::HardwareVirt);
    }

    #[test]
    fn no_flag_means_paravirt() {
        let h = HostInfo::from_texts("flags : fpu vme hypervisor\nmodel name: vmxfoo\n", "N\n");
        assert_eq!(h.kind, HostKind::ParavirtShadow);
        assert!(h.needs_emulator_workarounds());
        assert!(h.shadow_paging());
    }
}
