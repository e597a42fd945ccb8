//! Write tracking of guest page tables on the shadow MMU
//! (`account_shadowed` / `unaccount_shadowed`, arch/x86/kvm/mmu/mmu.c,
//! Linux 6.18).

use super::mmu::SecondaryMmu;
use super::MirrorError;
use crate::units::Level;

impl SecondaryMmu {
    /// `account_shadowed` (arch/x86/kvm/mmu/mmu.c): the shadow MMU made a
    /// shadow page for the guest page table at `gfn`. The gfn is
    /// write-tracked: `kvm_mmu_gfn_disallow_lpage` (no huge leaf over it at
    /// any level; for a non-leaf shadow page via `__kvm_write_track_add_gfn`,
    /// same effect) and `kvm_mmu_slot_gfn_write_protect` from `PG_LEVEL_4K`
    /// up: existing leaves mapping it, a huge one included, become
    /// **read-only and stay**; a later write fault maps 4K. The TDP MMU has
    /// no shadow pages: [`MirrorError::NotShadowMmu`].
    pub fn account_shadowed(&mut self, gfn: u64) -> Result<(), MirrorError> {
        if !self.params.shadow_paging() {
            return Err(MirrorError::NotShadowMmu);
        }
        let i = self
            .slots
            .iter()
            .position(|s| s.slot.contains(gfn))
            .ok_or(MirrorError::NoSlot { gfn })?;
        self.slots[i].update_gfn_disallow_lpage_count(gfn, 1);
        *self.tracked.entry(gfn).or_insert(0) += 1;
        self.write_protect_range(gfn, gfn + 1, Level::K4);
        Ok(())
    }

    /// `unaccount_shadowed` (arch/x86/kvm/mmu/mmu.c): the shadow page of
    /// `gfn` is gone; `kvm_mmu_gfn_allow_lpage` undoes one
    /// [`Self::account_shadowed`]. Leaves stay as they are.
    pub fn unaccount_shadowed(&mut self, gfn: u64) -> Result<(), MirrorError> {
        match self.tracked.get_mut(&gfn) {
            Some(n) if *n > 0 => {
                *n -= 1;
                if *n == 0 {
                    self.tracked.remove(&gfn);
                }
            }
            _ => return Err(MirrorError::NotTracked { gfn }),
        }
        if let Some(s) = self.slots.iter_mut().find(|s| s.slot.contains(gfn)) {
            s.update_gfn_disallow_lpage_count(gfn, -1);
        }
        Ok(())
    }

    /// Whether `gfn` is write-tracked (shadowed guest page table).
    pub fn is_shadowed(&self, gfn: u64) -> bool {
        self.tracked.contains_key(&gfn)
    }
}
