//! Memslots and their `lpage_info` (`kvm_alloc_memslot_metadata`): a
//! `disallow_lpage` count per large page, for each huge level (2M and 1G).

use super::MirrorError;
use crate::units::{Level, PAGES_PER_HPAGE, PAGE_SIZE};

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

/// A slot plus its `lpage_info` for each huge level (2M and 1G).
#[derive(Debug, Clone)]
pub(crate) struct SlotState {
    pub(crate) slot: Memslot,
    /// `lpage_info[level - 2][i].disallow_lpage` for [`Level::HUGE`], per
    /// index `gfn_to_index(gfn, base_gfn, level)`.
    pub(crate) disallow: [Vec<u32>; 2],
}

fn huge_idx(level: Level) -> Option<usize> {
    Level::HUGE.iter().position(|l| *l == level)
}

impl SlotState {
    /// `kvm_alloc_memslot_metadata` (arch/x86/kvm/x86.c): for each huge
    /// level, a partial first or last large page of the slot is disallowed,
    /// and when guest and host addresses are not congruent modulo the large
    /// page size every large page of the slot is.
    pub(crate) fn kvm_alloc_memslot_metadata(slot: Memslot) -> Result<Self, MirrorError> {
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
        let ugfn = slot.userspace_addr / PAGE_SIZE;
        let disallow = Level::HUGE.map(|level| {
            let n = level.pages();
            let first = level.index(slot.base_gfn);
            let last = level.index(slot.base_gfn + slot.npages - 1);
            let len = (last - first + 1) as usize;
            let mut d = vec![0u32; len];
            if !slot.base_gfn.is_multiple_of(n) {
                d[0] = 1;
            }
            if !(slot.base_gfn + slot.npages).is_multiple_of(n) {
                d[len - 1] = 1;
            }
            if (slot.base_gfn ^ ugfn) & (n - 1) != 0 {
                for x in d.iter_mut() {
                    *x += 1;
                }
            }
            d
        });
        Ok(SlotState { slot, disallow })
    }

    /// `gfn_to_index(gfn, base_gfn, level)`.
    pub(crate) fn index(&self, gfn: u64, level: Level) -> usize {
        (level.index(gfn) - level.index(self.slot.base_gfn)) as usize
    }

    /// `lpage_info_slot(gfn, slot, level)->disallow_lpage == 0`: whether a
    /// leaf of `level` over `gfn` is allowed by `lpage_info` (4K always is).
    pub(crate) fn lpage_allowed_at(&self, gfn: u64, level: Level) -> bool {
        match huge_idx(level) {
            None => true,
            Some(i) => self.disallow[i].get(self.index(gfn, level)) == Some(&0),
        }
    }

    /// `update_gfn_disallow_lpage_count` (arch/x86/kvm/mmu/mmu.c): adds
    /// `count` to `disallow_lpage` of every huge level's page holding `gfn`
    /// (`kvm_mmu_gfn_disallow_lpage` is `+1`, `kvm_mmu_gfn_allow_lpage` `-1`).
    pub(crate) fn update_gfn_disallow_lpage_count(&mut self, gfn: u64, count: i32) {
        for (i, level) in Level::HUGE.iter().enumerate() {
            let idx = self.index(gfn, *level);
            if let Some(d) = self.disallow[i].get_mut(idx) {
                *d = d.saturating_add_signed(count);
            }
        }
    }
}
