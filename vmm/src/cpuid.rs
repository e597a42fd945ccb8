//! CPUID for each vCPU: KVM's supported set with per-vCPU fixes.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// Reading KVM's supported CPUID failed.
#[derive(Debug, thiserror::Error)]
#[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
pub struct CpuidError(pub kvm_ioctls::Error);

/// KVM's supported CPUID leaves, plus the TSC-deadline timer where KVM's
/// in-kernel LAPIC emulates it (`KVM_CAP_TSC_DEADLINE_TIMER`: KVM reports the
/// capability, not the CPUID bit; VMMs set the bit themselves).
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    let mut c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError)?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        offer_tsc_deadline(&mut c);
    }
    Ok(c)
}

/// TSC-deadline mode of the LAPIC timer in leaf 1 ECX.
const ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Offer the TSC-deadline timer (leaf 1 ECX bit 24). A Linux guest then arms
/// its LAPIC timer in TSC-deadline mode and skips the LAPIC timer calibration
/// against the PIT, which fails now and then on slow (emulated) hosts and
/// leaves the guest on the PIT alone.
pub fn offer_tsc_deadline(c: &mut CpuId) {
    for e in c.as_mut_slice() {
        if e.function == 1 {
            e.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// Extended leaf with the long-mode feature bits.
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
/// 1 GiB pages (`pdpe1gb`) in leaf 0x8000_0001 EDX.
const EDX_PDPE1GB: u32 = 1 << 26;

/// Whether `c` offers 1 GiB pages (leaf 0x8000_0001 EDX bit 26,
/// `pdpe1gb`): KVM passes the host's bit through in its supported CPUID,
/// and a guest may set PS in a PDPTE only with it.
pub fn has_pdpe1gb(c: &CpuId) -> bool {
    c.as_slice()
        .iter()
        .any(|e| e.function == LEAF_EXT_FEATURES && e.edx & EDX_PDPE1GB != 0)
}

/// Hypervisor-present bit in leaf 1 ECX.
const ECX_HYPERVISOR: u32 = 1 << 31;

/// A copy of `base` for vCPU `index` of `count`: APIC id in leaf 1 EBX[31:24]
/// and the x2APIC id in leaf 0xB EDX, logical processor count, hypervisor bit.
pub fn for_vcpu(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    // HTT: more than one logical processor in the package.
                    e.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => {
                e.edx = u32::from(index);
            }
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_hypervisor_bit() {
        let base = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                edx: 7,
                ..Default::default()
            },
        ])
        .unwrap();
        let c = for_vcpu(&base, 3, 4);
        let l1 = c.as_slice()[0];
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(c.as_slice()[1].edx, 3);
    }

    #[test]
    fn pdpe1gb_is_leaf_0x80000001_edx_bit_26() {
        let leaf = |function, edx| kvm_cpuid_entry2 {
            function,
            edx,
            ..Default::default()
        };
        let with = CpuId::from_entries(&[leaf(1, 1 << 26), leaf(0x8000_0001, 1 << 26)]).unwrap();
        assert!(has_pdpe1gb(&with));
        // The per-vCPU copy keeps it.
        assert!(has_pdpe1gb(&for_vcpu(&with, 1, 2)));
        let without =
            CpuId::from_entries(&[leaf(1, 1 << 26), leaf(0x8000_0001, !(1 << 26))]).unwrap();
        assert!(!has_pdpe1gb(&without));
        assert!(!has_pdpe1gb(&CpuId::from_entries(&[leaf(1, !0)]).unwrap()));
    }

    #[test]
    fn tsc_deadline_bit_only_in_leaf_1() {
        let mut c = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ecx: 0x1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ..Default::default()
            },
        ])
        .unwrap();
        offer_tsc_deadline(&mut c);
        assert_eq!(c.as_slice()[0].ecx, 0x1 | 1 << 24);
        assert_eq!(c.as_slice()[1].ecx, 0);
    }
}
