//! Memslot flag changes: dirty logging on and off
//! (`kvm_mmu_slot_apply_flags`, arch/x86/kvm/x86.c, Linux 6.18).

use super::host::HostMap;
use super::mmu::{lvl_idx, SecondaryMmu, Spte};
use super::params::MmuKind;
use super::MirrorError;
use crate::units::Level;

impl SecondaryMmu {
    /// `KVM_SET_USER_MEMORY_REGION` with `KVM_MEM_LOG_DIRTY_PAGES` toggled
    /// (a memslot update: the generation moves; waits for invalidations in
    /// progress) and then [`Self::kvm_mmu_slot_apply_flags`].
    pub fn set_dirty_logging(
        &mut self,
        id: u32,
        on: bool,
        host: &dyn HostMap,
    ) -> Result<(), MirrorError> {
        self.no_invalidation_active()?;
        let i = self.slot_index(id)?;
        let was = self.slots[i].slot.dirty_logging;
        self.slots[i].slot.dirty_logging = on;
        self.generation += 1;
        if was != on {
            self.kvm_mmu_slot_apply_flags(i, on, host);
        }
        Ok(())
    }

    /// `kvm_mmu_slot_apply_flags` (arch/x86/kvm/x86.c), dirty logging
    /// toggled on slot `i`. On: nothing with `KVM_DIRTY_LOG_INITIALLY_SET`;
    /// else eager split if `eager_page_split`
    /// ([`Self::kvm_mmu_slot_try_split_huge_pages`]), then every leaf
    /// write-protected ([`Self::kvm_mmu_slot_remove_write_access`]); huge
    /// leaves the MMU did not split stay, read-only. Off:
    /// [`Self::kvm_mmu_recover_huge_pages`].
    fn kvm_mmu_slot_apply_flags(&mut self, i: usize, on: bool, host: &dyn HostMap) {
        let (a, b) = (self.slots[i].slot.base_gfn, self.slots[i].slot.end_gfn());
        if on {
            if self.params.dirty_log_initially_set {
                return;
            }
            if self.params.eager_page_split {
                self.kvm_mmu_slot_try_split_huge_pages(a, b);
            }
            self.kvm_mmu_slot_remove_write_access(a, b);
        } else {
            self.kvm_mmu_recover_huge_pages(i, host);
        }
    }

    /// `kvm_mmu_slot_try_split_huge_pages` (arch/x86/kvm/mmu/mmu.c): only
    /// when the TDP MMU is enabled (`if (!tdp_mmu_enabled) return;`): every
    /// huge leaf of the slot is split down to 4K
    /// (`kvm_tdp_mmu_try_split_huge_pages`, target `PG_LEVEL_4K`), keeping
    /// its permissions.
    fn kvm_mmu_slot_try_split_huge_pages(&mut self, a: u64, b: u64) {
        if self.params.kind != MmuKind::Tdp {
            return;
        }
        for level in [Level::G1, Level::M2] {
            let idx: Vec<u64> = self.leaves[lvl_idx(level)]
                .keys()
                .copied()
                .filter(|i| {
                    let g = i * level.pages();
                    g >= a && g + level.pages() <= b
                })
                .collect();
            for i in idx {
                self.tdp_mmu_split_huge_page(level, i);
            }
        }
    }

    /// `kvm_mmu_slot_remove_write_access` (arch/x86/kvm/mmu/mmu.c,
    /// `min_level` `PG_LEVEL_4K`): every leaf of the slot becomes read-only.
    fn kvm_mmu_slot_remove_write_access(&mut self, a: u64, b: u64) {
        self.write_protect_range(a, b, Level::K4);
    }

    /// `kvm_mmu_recover_huge_pages` (arch/x86/kvm/mmu/mmu.c, 6.13+), dirty
    /// logging turned off on slot `i`. TDP MMU (`kvm_tdp_mmu_recover_huge_pages`
    /// → `recover_huge_pages_range`): a table with at least one present leaf
    /// whose gfn [`Self::kvm_mmu_max_mapping_level`] allows at the table's
    /// level becomes one huge leaf in place (`kvm_mmu_make_huge_spte`, the
    /// permissions of a present child). Shadow MMU
    /// (`kvm_rmap_zap_collapsible_sptes`): 4K leaves in direct shadow pages
    /// whose frame may map huge are zapped; the next fault maps huge.
    pub(super) fn kvm_mmu_recover_huge_pages(&mut self, i: usize, host: &dyn HostMap) {
        let (a, b) = (self.slots[i].slot.base_gfn, self.slots[i].slot.end_gfn());
        match self.params.kind {
            MmuKind::Tdp => {
                for level in [Level::G1, Level::M2] {
                    self.recover_huge_pages_range(a, b, level, host);
                }
            }
            MmuKind::Shadow => {
                let zap: Vec<u64> = self.leaves[0]
                    .iter()
                    .filter(|(g, e)| {
                        e.direct
                            && (a..b).contains(*g)
                            && self.kvm_mmu_max_mapping_level(**g, host) > Level::K4
                    })
                    .map(|(g, _)| *g)
                    .collect();
                for g in zap {
                    self.zap_gfn_range_levels(g, g + 1, &[Level::K4]);
                }
                // Orphans of unlinked direct pages (`direct_role.rs`) are
                // direct SPTEs in the rmaps too.
                let orphans: Vec<u64> = self
                    .orphans()
                    .map(|(g, _)| g)
                    .filter(|g| {
                        (a..b).contains(g) && self.kvm_mmu_max_mapping_level(*g, host) > Level::K4
                    })
                    .collect();
                for g in orphans {
                    self.zap_orphans(g, g + 1);
                }
            }
        }
    }

    /// `recover_huge_pages_range` (arch/x86/kvm/mmu/tdp_mmu.c) for tables
    /// at `level` (a 2M table holds 4K leaves, a 1G table 2M leaves).
    fn recover_huge_pages_range(&mut self, a: u64, b: u64, level: Level, host: &dyn HostMap) {
        let child = level.below();
        let mut parents: Vec<u64> = self.leaves[lvl_idx(child)]
            .keys()
            .map(|ci| ci * child.pages() / level.pages())
            .collect();
        parents.sort_unstable();
        parents.dedup();
        for p in parents {
            let g = p * level.pages();
            if g < a || g + level.pages() > b || self.kvm_mmu_max_mapping_level(g, host) < level {
                continue;
            }
            let Some(slot) = self.state_for_gfn(g).map(|s| s.slot) else {
                continue;
            };
            let Some(pfn) = host.pfn(slot.gfn_to_hva(g)) else {
                continue;
            };
            if pfn % level.pages() != 0 {
                continue;
            }
            let first_child = (g..g + level.pages())
                .step_by(child.pages() as usize)
                .find_map(|cg| self.leaves[lvl_idx(child)].get(&child.index(cg)).copied());
            let Some(c) = first_child else {
                continue;
            };
            self.replace_with_huge(
                g,
                level,
                Spte {
                    pfn,
                    writable: c.writable,
                    direct: true,
                },
            );
        }
    }
}
