//! What the host is, for the results file.

use crate::host::{HostInfo, HostKind};

/// The host a benchmark ran on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostDesc {
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Kernel release.
    pub kernel: String,
    /// `hardware-virt` or `paravirt-shadow`.
    pub kvm_kind: String,
    /// KVM modules loaded (kvm_intel, kvm_amd, kvm_pvm).
    pub kvm_modules: Vec<String>,
    /// `tdp_mmu` parameter.
    pub tdp_mmu: bool,
    /// THP `enabled` and `shmem_enabled` settings.
    pub thp: String,
    /// hugetlb pool: total and free 2M pages at start.
    pub hugetlb_total: u64,
    /// Free hugetlb pages at start.
    pub hugetlb_free: u64,
}

fn read(p: &str) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// A value from /proc/meminfo (first number).
pub fn meminfo(key: &str) -> Option<u64> {
    read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn selected(text: &str) -> String {
    text.split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
        .unwrap_or_else(|| "?".into())
}

impl HostDesc {
    /// Reads the host.
    pub fn detect(info: &HostInfo) -> HostDesc {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let kvm_modules = ["kvm_intel", "kvm_amd", "kvm_pvm"]
            .iter()
            .filter(|m| std::path::Path::new(&format!("/sys/module/{m}")).exists())
            .map(|m| m.to_string())
            .collect();
        HostDesc {
            cpu_model,
            cpus,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            kvm_kind: match info.kind {
                HostKind::HardwareVirt => "hardware-virt (VT-x/AMD-V)".into(),
                HostKind::ParavirtShadow => "paravirt-shadow (no vmx/svm, shadow paging)".into(),
            },
            kvm_modules,
            tdp_mmu: info.tdp_mmu,
            thp: format!(
                "enabled={} shmem_enabled={}",
                selected(&read("/sys/kernel/mm/transparent_hugepage/enabled")),
                selected(&read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"))
            ),
            hugetlb_total: meminfo("HugePages_Total:").unwrap_or(0),
            hugetlb_free: meminfo("HugePages_Free:").unwrap_or(0),
        }
    }

    /// One line.
    pub fn line(&self) -> String {
        format!(
            "{} ({} CPUs), kernel {}, KVM {} [{}], tdp_mmu={}, THP {}, hugetlb {}/{} free",
            self.cpu_model,
            self.cpus,
            self.kernel,
            self.kvm_kind,
            self.kvm_modules.join(","),
            if self.tdp_mmu { "Y" } else { "N" },
            self.thp,
            self.hugetlb_free,
            self.hugetlb_total
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_setting() {
        assert_eq!(selected("always [madvise] never\n"), "madvise");
        assert_eq!(selected(""), "?");
    }
}
