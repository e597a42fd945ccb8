//! What the host can do: the VMM's own detection (`vmm::host`, `guest_mem::backing`) plus /dev/kvm.

use std::fs;
use std::path::Path;

use guest_mem::backing::{check_shmem_thp, hugetlb_2m_counters};
use guest_mem::HostPaths;

pub use vmm::host::HostKind;

/// How this host's KVM runs a guest: the VMM's own detection (`vmm::host`).
pub fn host_kind() -> HostKind {
    vmm::host::HostInfo::detect().kind
}

/// Why KVM can't be used here, or `None` when /dev/kvm opens read-write.
pub fn kvm_unavailable() -> Option<String> {
    let dev = Path::new("/dev/kvm");
    match fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => None,
        Err(e) => Some(format!("cannot open /dev/kvm: {e}")),
    }
}

/// Free 2M hugetlb pages, as the VMM's allocator reads them
/// (`guest_mem::backing::hugetlb_2m_counters`); 0 when unreadable.
pub fn hugepages_free() -> u64 {
    hugetlb_2m_counters(&HostPaths::default()).map_or(0, |c| c.free)
}

/// Why `--backing thp` cannot get 2M shmem pages here (the VMM's own check and
/// message: which sysfs file to set to what), or `None` when it can.
pub fn shmem_thp_unavailable() -> Option<String> {
    check_shmem_thp(&HostPaths::default())
        .err()
        .map(|e| format!("{e} (or run resources/setup-host.sh)"))
}
