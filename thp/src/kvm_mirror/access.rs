//! The fault path with access kind and memslot snapshot: what
//! `kvm_faultin_pfn` captures before `mmu_lock` (`fault->slot`, the memslot
//! generation, `fault->write`, `fault->map_writable`) and what the install
//! makes of it under the lock.

use super::host::HostMap;
use super::mmu::{FaultResult, PendingFault, SecondaryMmu};
use super::slots::Memslot;
use super::MirrorError;
use crate::units::Level;

/// A fault in flight with its access kind and the memslot it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessFault {
    /// The gfn, level cap, `mmu_invalidate_seq`, hva and pfn.
    pub fault: PendingFault,
    /// A write access (`fault->write`, GUP with `FOLL_WRITE`).
    pub write: bool,
    /// Whether the host gave a writable pfn (`fault->map_writable`).
    pub map_writable: bool,
    /// The memslot as read at the start of the fault (`fault->slot`): its
    /// flags (dirty logging) decide the level at install.
    pub slot: Memslot,
    /// The memslot generation read with the slot.
    pub generation: u64,
}

/// What the host translation (GUP) gave a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// A pfn (`map_writable` tells whether writable).
    Pfn(u64),
    /// Nothing mapped at the hva (GUP would fault it in first).
    NotPresent,
    /// A write access to a read-only host page (`KVM_PFN_ERR_FAULT`: the
    /// vCPU exits with `-EFAULT` until the host fault succeeds).
    WriteDenied,
}

impl SecondaryMmu {
    /// Fault step 1: read the memslot (and its generation) and
    /// `mmu_invalidate_seq`. No slot: KVM exits to userspace for MMIO
    /// ([`MirrorError::NoSlot`]), nothing is installed.
    pub fn access_begin(
        &self,
        gfn: u64,
        guest_max_level: Level,
        write: bool,
    ) -> Result<AccessFault, MirrorError> {
        let mut fault = self.fault_begin(gfn, guest_max_level)?;
        fault.write = write;
        let slot = *self.slot_for_gfn(gfn).ok_or(MirrorError::NoSlot { gfn })?;
        Ok(AccessFault {
            fault,
            write,
            map_writable: false,
            slot,
            generation: self.generation,
        })
    }

    /// Fault step 2 (`hva_to_pfn`): the pfn at the hva and whether it is
    /// writable. A write access to a read-only host page gets no pfn.
    pub fn access_translate(&self, f: &mut AccessFault, host: &dyn HostMap) -> Translation {
        let pfn = host.pfn(f.fault.hva);
        let writable = pfn.is_some() && host.writable(f.fault.hva);
        match pfn {
            None => {
                f.fault.pfn = None;
                f.map_writable = false;
                Translation::NotPresent
            }
            Some(_) if f.write && !writable => {
                f.fault.pfn = None;
                f.map_writable = false;
                Translation::WriteDenied
            }
            Some(p) => {
                f.fault.pfn = Some(p);
                f.map_writable = writable;
                Translation::Pfn(p)
            }
        }
    }

    /// Whether the memslot the fault saw is stale (the generation moved:
    /// dirty logging toggled, slot deleted or re-created). Stands for KVM's
    /// SRCU-protected memslot snapshot plus `KVM_MEMSLOT_INVALID`.
    pub fn access_slot_stale(&self, f: &AccessFault) -> bool {
        self.generation != f.generation
    }

    /// Fault step 3 (under `mmu_lock`): retry if an invalidation covers the
    /// hva, `mmu_invalidate_seq` moved, or the memslot is stale.
    pub fn access_must_retry(&self, f: &AccessFault) -> bool {
        self.fault_must_retry(&f.fault) || self.access_slot_stale(f)
    }

    /// Fault step 4 (under `mmu_lock`, retry check passed): the level from
    /// the fault's own cap, the memslot flags it saw
    /// (`kvm_mmu_hugepage_adjust` reads `fault->slot`), the current
    /// `lpage_info` (4K when the gfn has no slot now) and the host level;
    /// the leaf is writable iff `map_writable`.
    pub fn access_install(
        &mut self,
        f: &AccessFault,
        host: &dyn HostMap,
    ) -> Result<FaultResult, MirrorError> {
        let Some(pfn) = f.fault.pfn else {
            return Ok(FaultResult::NoHostPage);
        };
        Ok(self.map(&f.fault, f.slot.dirty_logging, pfn, f.map_writable, host))
    }
}
