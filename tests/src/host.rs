//! What the host can do, read from /proc and /dev.

use std::fs;
use std::path::Path;

/// How the host's KVM runs a guest (see docs/ARCHITECTURE.md, `vmm::host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// `vmx` or `svm` in /proc/cpuinfo: hardware virtualization, guest user space runs.
    HardwareVirt,
    /// No `vmx`/`svm`: a paravirtual shadow-paging KVM; guest CPL0 is emulated and the
    /// first system call from guest user space is not delivered.
    Paravirtual,
}

/// Classify the host from the CPU flags in /proc/cpuinfo.
pub fn host_kind() -> HostKind {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    host_kind_from_cpuinfo(&cpuinfo)
}

/// Classify from the text of /proc/cpuinfo.
pub fn host_kind_from_cpuinfo(cpuinfo: &str) -> HostKind {
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm");
    if hw {
        HostKind::HardwareVirt
    } else {
        HostKind::Paravirtual
    }
}

/// Why KVM can't be used here, or `None` when /dev/kvm opens read-write.
pub fn kvm_unavailable() -> Option<String> {
    let dev = Path::new("/dev/kvm");
    match fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => None,
        Err(e) => Some(format!("cannot open /dev/kvm: {e}")),
    }
}

/// `HugePages_Free` from /proc/meminfo (2M pages), 0 when unreadable.
pub fn hugepages_free() -> u64 {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo_value(&meminfo, "HugePages_Free").unwrap_or(0)
}

/// Why `--backing thp` cannot get 2M shmem pages here, or `None` when it can:
/// `shmem_enabled` must be `advise`, `within_size`, `always` or `force`.
pub fn shmem_thp_unavailable() -> Option<String> {
    let f = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    let text = fs::read_to_string(f).unwrap_or_default();
    let selected = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or("unreadable");
    match selected {
        "advise" | "within_size" | "always" | "force" => None,
        other => Some(format!(
            "{f} is {other}: echo advise > {f} (or run resources/setup-host.sh)"
        )),
    }
}

/// The number after `key:` in /proc/meminfo text.
pub fn meminfo_value(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        v.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_cpu_flags() {
        let hw = "processor\t: 0\nflags\t\t: fpu vme svm sse2\n";
        let pv = "processor\t: 0\nflags\t\t: fpu vme sse2 hypervisor\n";
        assert_eq!(host_kind_from_cpuinfo(hw), HostKind::HardwareVirt);
        assert_eq!(host_kind_from_cpuinfo(pv), HostKind::Paravirtual);
        assert_eq!(host_kind_from_cpuinfo(""), HostKind::Paravirtual);
    }

    #[test]
    fn reads_meminfo_values() {
        let m = "MemTotal:       24000000 kB\nHugePages_Total:    1536\nHugePages_Free:     1400\n";
        assert_eq!(meminfo_value(m, "HugePages_Free"), Some(1400));
        assert_eq!(meminfo_value(m, "HugePages_Total"), Some(1536));
        assert_eq!(meminfo_value(m, "HugePages_Rsvd"), None);
    }
}
