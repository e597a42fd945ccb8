//! Guest RAM's memslots as the stress run sees them: dirty logging on/off
//! (every slot), delete and re-create at the same place (one slot per event,
//! each in turn), and the dirty bitmaps.

use std::sync::atomic::{AtomicUsize, Ordering};

use guest_mem::RamSlot;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

/// A memslot ioctl failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} on slot {slot}: {source}")]
pub struct SlotError {
    /// What.
    pub op: &'static str,
    /// The slot.
    pub slot: u32,
    /// KVM's error.
    pub source: kvm_ioctls::Error,
}

/// The memslots over guest RAM.
#[derive(Debug)]
pub struct Slots {
    slots: Vec<RamSlot>,
    /// The slot the next delete/re-create cycle acts on.
    next: AtomicUsize,
}

fn region(s: &RamSlot, flags: u32, size: u64) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot: s.id,
        flags,
        guest_phys_addr: s.gpa,
        memory_size: size,
        userspace_addr: s.host_addr,
    }
}

fn set(
    vm: &VmFd,
    s: &RamSlot,
    r: kvm_userspace_memory_region,
    op: &'static str,
) -> Result<(), SlotError> {
    // SAFETY: the region is part of guest RAM's host range, which GuestRam
    // keeps mapped (frames are only remapped in place) for the life of the
    // VM; a zero size deletes the slot.
    unsafe { vm.set_user_memory_region(r) }.map_err(|source| SlotError {
        op,
        slot: s.id,
        source,
    })
}

impl Slots {
    /// The memslots `slots` (as registered by `Vm::new`).
    pub fn new(slots: Vec<RamSlot>) -> Slots {
        Slots {
            slots,
            next: AtomicUsize::new(0),
        }
    }

    /// Turn dirty logging on or off in every slot.
    pub fn set_dirty_logging(&self, vm: &VmFd, on: bool) -> Result<(), SlotError> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for s in &self.slots {
            set(
                vm,
                s,
                region(s, flags, s.size),
                if on {
                    "KVM_SET_USER_MEMORY_REGION (dirty logging on)"
                } else {
                    "KVM_SET_USER_MEMORY_REGION (dirty logging off)"
                },
            )?;
        }
        Ok(())
    }

    /// Pages marked dirty since the last call in all slots (clears the logs).
    pub fn dirty_pages(&self, vm: &VmFd) -> Result<u64, SlotError> {
        let mut n = 0;
        for s in &self.slots {
            let bitmap = vm
                .get_dirty_log(s.id, s.size as usize)
                .map_err(|source| SlotError {
                    op: "KVM_GET_DIRTY_LOG",
                    slot: s.id,
                    source,
                })?;
            n += bitmap
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>();
        }
        Ok(n)
    }

    /// The id of the slot holding guest-physical `gpa`.
    pub fn slot_of(&self, gpa: u64) -> Option<u32> {
        self.slots
            .iter()
            .find(|s| s.range().contains(&gpa))
            .map(|s| s.id)
    }

    /// The slot of the next [`Slots::delete`]: each in turn.
    pub fn next_slot(&self) -> Option<RamSlot> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len().max(1);
        self.slots.get(i).copied()
    }

    /// Delete `s` (vCPUs must be paused until [`Slots::create`]).
    pub fn delete(&self, vm: &VmFd, s: &RamSlot) -> Result<(), SlotError> {
        set(
            vm,
            s,
            region(s, 0, 0),
            "KVM_SET_USER_MEMORY_REGION (delete)",
        )
    }

    /// Create `s` again, logging off.
    pub fn create(&self, vm: &VmFd, s: &RamSlot) -> Result<(), SlotError> {
        set(
            vm,
            s,
            region(s, 0, s.size),
            "KVM_SET_USER_MEMORY_REGION (re-create)",
        )
    }
}
