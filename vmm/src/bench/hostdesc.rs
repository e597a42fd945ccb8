//! What the host is, for the results file.

use crate::host::{HostInfo, HostKind};
use guest_mem::backing::read_selected;
use guest_mem::smaps::read_meminfo;
use guest_mem::HostPaths;

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

/// The `[selected]` value of a THP knob, `?` when it cannot be read.
fn thp_knob(name: &str) -> String {
    let knob = format!("kernel/mm/transparent_hugepage/{name}");
    read_selected(&HostPaths::default(), &knob).unwrap_or_else(|_| "?".into())
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
        // No hugetlb support in the kernel: an empty pool.
        let huge = read_meminfo().unwrap_or_default();
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
                thp_knob("enabled"),
                thp_knob("shmem_enabled")
            ),
            hugetlb_total: huge.total,
            hugetlb_free: huge.free,
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
