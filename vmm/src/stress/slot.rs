//! Memslot 0 as the stress run sees it: dirty logging on/off, delete and
//! re-create at the same place, and the dirty bitmap.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

/// A memslot ioctl failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} on slot 0: {source}")]
pub struct SlotError {
    /// What.
    pub op: &'static str,
    /// KVM's error.
    pub source: kvm_ioctls::Error,
}

/// Slot 0 over guest RAM.
#[derive(Debug, Clone, Copy)]
pub struct Slot0 {
    /// Host address of gpa 0.
    pub host_addr: u64,
    /// RAM size.
    pub size: u64,
}

impl Slot0 {
    fn region(&self, flags: u32, size: u64) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: 0,
            flags,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: self.host_addr,
        }
    }

    fn set(
        &self,
        vm: &VmFd,
        r: kvm_userspace_memory_region,
        op: &'static str,
    ) -> Result<(), SlotError> {
        // SAFETY: the region is guest RAM's host range, which GuestRam keeps
        // mapped (frames are only remapped in place) for the life of the VM;
        // a zero size deletes the slot.
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| SlotError { op, source })
    }

    /// Turn dirty logging on or off.
    pub fn set_dirty_logging(&self, vm: &VmFd, on: bool) -> Result<(), SlotError> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        self.set(
            vm,
            self.region(flags, self.size),
            if on {
                "KVM_SET_USER_MEMORY_REGION (dirty logging on)"
            } else {
                "KVM_SET_USER_MEMORY_REGION (dirty logging off)"
            },
        )
    }

    /// Pages marked dirty since the last call (clears the log).
    pub fn dirty_pages(&self, vm: &VmFd) -> Result<u64, SlotError> {
        let bitmap = vm
            .get_dirty_log(0, self.size as usize)
            .map_err(|source| SlotError {
                op: "KVM_GET_DIRTY_LOG",
                source,
            })?;
        Ok(bitmap.iter().map(|w| u64::from(w.count_ones())).sum())
    }

    /// Delete the slot (vCPUs must be paused until [`Slot0::create`]).
    pub fn delete(&self, vm: &VmFd) -> Result<(), SlotError> {
        self.set(vm, self.region(0, 0), "KVM_SET_USER_MEMORY_REGION (delete)")
    }

    /// Create it again, logging off.
    pub fn create(&self, vm: &VmFd) -> Result<(), SlotError> {
        self.set(
            vm,
            self.region(0, self.size),
            "KVM_SET_USER_MEMORY_REGION (re-create)",
        )
    }
}
