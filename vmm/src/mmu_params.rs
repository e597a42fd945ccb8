//! Which x86 KVM MMU this host runs, for the mirror: the TDP MMU (hardware
//! two-dimensional paging and `tdp_mmu=Y`) or the shadow MMU, and the
//! module parameters that change what it maps
//! (`/sys/module/kvm/parameters/{nx_huge_pages,eager_page_split}`).

use std::fs;
use std::path::Path;

use thp::kvm_mirror::MmuParams;
use thp::units::Level;

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
/// `pdpe1gb`, KVM's `max_huge_page_level`).
pub fn from_texts(
    host: &HostInfo,
    nx_huge_pages: Option<&str>,
    eager_page_split: Option<&str>,
    cpuinfo: &str,
) -> MmuParams {
    let tdp = host.kind == HostKind::HardwareVirt && host.tdp_mmu;
    let gb = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "pdpe1gb"));
    MmuParams {
        max_huge_page_level: if gb { Level::G1 } else { Level::M2 },
        ..MmuParams::from_host(tdp, yes(nx_huge_pages, false), yes(eager_page_split, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thp::kvm_mirror::MmuKind;

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
        assert_eq!(p.max_huge_page_level, Level::M2);
        let legacy = HostInfo::from_texts("flags : vmx", "N");
        assert_eq!(from_texts(&legacy, None, None, "").kind, MmuKind::Shadow);
    }
}
