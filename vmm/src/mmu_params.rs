//! Which x86 KVM MMU this host runs, for the mirror: the TDP MMU (hardware
//! two-dimensional paging and `tdp_mmu=Y`) or the shadow MMU, and the
//! module parameters that change what it maps
//! (`/sys/module/kvm/parameters/{nx_huge_pages,eager_page_split}`).

use std::fs;
use std::path::Path;

use thp::kvm_mirror::{HugePageCpu, MmuParams, TdpVendor};

use crate::host::{HostInfo, HostKind};

const PARAMS: &str = "/sys/module/kvm/parameters";

/// Read the host's MMU parameters (an unreadable parameter counts as the
/// kernel's default: `nx_huge_pages` off, `eager_page_split` on).
pub fn detect(host: &HostInfo) -> MmuParams {
    let read = |name: &str| fs::read_to_string(Path::new(PARAMS).join(name)).ok();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let p = from_texts(
        host,
        read("nx_huge_pages").as_deref(),
        read("eager_page_split").as_deref(),
        &cpuinfo,
    );
    log::debug!("KVM MMU mirrored: {p:?}");
    p
}

fn yes(v: Option<&str>, default: bool) -> bool {
    match v.map(|s| s.trim().to_ascii_lowercase()) {
        Some(s) if s == "y" || s == "1" || s == "force" || s == "on" => true,
        Some(s) if s == "n" || s == "0" || s == "off" || s == "never" => false,
        _ => default,
    }
}

/// Decide from the texts of the parameters and `/proc/cpuinfo` (1G pages:
/// [`MmuParams::kvm_configure_mmu_max_huge_page_level`] from its `flags`
/// and `vmx flags` lines).
pub fn from_texts(
    host: &HostInfo,
    nx_huge_pages: Option<&str>,
    eager_page_split: Option<&str>,
    cpuinfo: &str,
) -> MmuParams {
    let tdp = host.kind == HostKind::HardwareVirt && host.tdp_mmu;
    let has = |line: &str, flag: &str| {
        cpuinfo
            .lines()
            .filter(|l| l.split(':').next().map(str::trim) == Some(line))
            .any(|l| l.split_whitespace().any(|f| f == flag))
    };
    let cpu = HugePageCpu {
        vendor: if has("flags", "svm") {
            TdpVendor::Npt
        } else {
            TdpVendor::Ept
        },
        ept_1gb: has("vmx flags", "ept_1gb"),
        gbpages: has("flags", "pdpe1gb"),
    };
    // `tdp_enabled` (EPT/NPT in use), with or without the TDP MMU.
    let tdp_enabled = host.kind == HostKind::HardwareVirt;
    MmuParams {
        max_huge_page_level: MmuParams::kvm_configure_mmu_max_huge_page_level(tdp_enabled, cpu),
        ..MmuParams::from_host(tdp, yes(nx_huge_pages, false), yes(eager_page_split, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thp::kvm_mirror::MmuKind;
    use thp::units::Level;

    #[test]
    fn paravirtual_host_is_the_shadow_mmu() {
        let h = HostInfo::from_texts("flags : fpu hypervisor pdpe1gb", "N");
        let p = from_texts(&h, Some("N\n"), Some("Y\n"), "flags : fpu pdpe1gb");
        assert_eq!(p.kind, MmuKind::Shadow);
        assert!(!p.nx_huge_pages && p.eager_page_split);
        assert_eq!(p.max_huge_page_level, Level::G1);
    }

    #[test]
    fn amd_v_with_tdp_mmu_is_the_tdp_mmu() {
        let h = HostInfo::from_texts("flags : fpu svm", "Y");
        let p = from_texts(&h, Some("Y"), Some("N"), "flags : fpu svm");
        assert_eq!(p.kind, MmuKind::Tdp);
        assert!(p.nx_huge_pages && !p.eager_page_split);
        // NPT: 1G whatever the CPU flags say (`svm_hardware_setup`).
        assert_eq!(p.max_huge_page_level, Level::G1);
        let legacy = HostInfo::from_texts("flags : vmx", "N");
        assert_eq!(from_texts(&legacy, None, None, "").kind, MmuKind::Shadow);
    }

    /// NPT maps 1G whatever the CPU flags; EPT only with `ept_1gb`; shadow
    /// paging only with `pdpe1gb` (`kvm_configure_mmu`).
    #[test]
    fn largest_page_follows_kvm_configure_mmu() {
        let npt = HostInfo::from_texts("flags : fpu svm", "Y");
        let p = from_texts(&npt, None, None, "flags\t\t: fpu svm\n");
        assert_eq!(p.max_huge_page_level, Level::G1);
        let ept = HostInfo::from_texts("flags : fpu vmx pdpe1gb", "Y");
        let flags = "flags\t\t: fpu vmx pdpe1gb\nvmx flags\t: vnmi ept";
        let p = from_texts(&ept, None, None, flags);
        assert_eq!((p.kind, p.max_huge_page_level), (MmuKind::Tdp, Level::M2));
        let p = from_texts(&ept, None, None, &format!("{flags} ept_1gb\n"));
        assert_eq!(p.max_huge_page_level, Level::G1);
        // The legacy direct MMU (`tdp_mmu=N`, mirrored as shadow) still
        // takes EPT's level.
        let legacy = HostInfo::from_texts("flags : fpu vmx", "N");
        let p = from_texts(&legacy, None, None, &format!("{flags} ept_1gb\n"));
        assert_eq!(
            (p.kind, p.max_huge_page_level),
            (MmuKind::Shadow, Level::G1)
        );
        let shadow = HostInfo::from_texts("flags : fpu hypervisor", "N");
        let p = from_texts(&shadow, None, None, "flags\t\t: fpu svm\n");
        assert_eq!(
            (p.kind, p.max_huge_page_level),
            (MmuKind::Shadow, Level::M2)
        );
    }
}
