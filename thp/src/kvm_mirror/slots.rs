//! Memslots and their `lpage_info` (`kvm_alloc_memslot_metadata`):
//! a per-2M-frame `disallow_lpage` count.

use super::MirrorError;
use crate::units::{PAGES_PER_HPAGE, PAGE_SIZE};

/// A KVM memslot (`KVM_SET_USER_MEMORY_REGION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memslot {
    /// Slot id.
    pub id: u32,
    /// First guest frame number.
    pub base_gfn: u64,
    /// Size in 4K pages.
    pub npages: u64,
    /// Host virtual address of `base_gfn` (4K aligned).
    pub userspace_addr: u64,
    /// `KVM_MEM_LOG_DIRTY_PAGES`.
    pub dirty_logging: bool,
}

impl Memslot {
    /// Whether `gfn` is inside the slot.
    pub fn contains(&self, gfn: u64) -> bool {
        gfn >= self.base_gfn && gfn - self.base_gfn < self.npages
    }
    /// `__gfn_to_hva_memslot`.
    pub fn gfn_to_hva(&self, gfn: u64) -> u64 {
        self.userspace_addr + (gfn - self.base_gfn) * PAGE_SIZE
    }
    /// End gfn (exclusive).
    pub fn end_gfn(&self) -> u64 {
        self.base_gfn + self.npages
    }
    /// Whether 2M mappings are impossible in the whole slot because guest
    /// and host addresses are not congruent mod 2M.
    pub fn misaligned(&self) -> bool {
        (self.base_gfn ^ (self.userspace_addr / PAGE_SIZE)) & (PAGES_PER_HPAGE - 1) != 0
    }
}

/// A slot plus its `lpage_info[PG_LEVEL_2M]`.
#[derive(Debug, Clone)]
pub(crate) struct SlotState {
    pub(crate) slot: Memslot,
    /// `disallow_lpage` per 2M index (`gfn_to_index`).
    pub(crate) disallow: Vec<u32>,
}

impl SlotState {
    /// `kvm_alloc_memslot_metadata` for the 2M level.
    pub(crate) fn new(slot: Memslot) -> Result<Self, MirrorError> {
        let bad = |why| Err(MirrorError::BadSlot { id: slot.id, why });
        if slot.npages == 0 {
            return bad("zero pages");
        }
        if !slot.userspace_addr.is_multiple_of(PAGE_SIZE) {
            return bad("userspace_addr not 4K aligned");
        }
        if slot.base_gfn.checked_add(slot.npages).is_none() {
            return bad("gfn range overflows");
        }
        let first = slot.base_gfn / PAGES_PER_HPAGE;
        let last = (slot.base_gfn + slot.npages - 1) / PAGES_PER_HPAGE;
        let n = (last - first + 1) as usize;
        let mut disallow = vec![0u32; n];
        // A partial first or last 2M frame cannot be mapped huge.
        if !slot.base_gfn.is_multiple_of(PAGES_PER_HPAGE) {
            disallow[0] = 1;
        }
        if !(slot.base_gfn + slot.npages).is_multiple_of(PAGES_PER_HPAGE) {
            disallow[n - 1] = 1;
        }
        // Guest and host not congruent mod 2M: no 2M anywhere in the slot.
        if slot.misaligned() {
            for d in disallow.iter_mut() {
                *d += 1;
            }
        }
        Ok(SlotState { slot, disallow })
    }

    /// `gfn_to_index(gfn, base_gfn, PG_LEVEL_2M)`.
    pub(crate) fn index(&self, gfn: u64) -> usize {
        (gfn / PAGES_PER_HPAGE - self.slot.base_gfn / PAGES_PER_HPAGE) as usize
    }

    /// Whether the 2M frame holding `gfn` may be mapped huge (lpage_info only).
    pub(crate) fn lpage_allowed(&self, gfn: u64) -> bool {
        self.disallow.get(self.index(gfn)) == Some(&0)
    }
}
