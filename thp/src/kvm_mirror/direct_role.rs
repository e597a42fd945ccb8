//! The access role of the shadow MMU's direct shadow pages (a guest huge
//! page mapped with 4K SPTEs) and the SPTEs a role change leaves behind
//! (Linux 6.18, arch/x86/kvm/mmu/mmu.c and paging_tmpl.h).
//!
//! A direct shadow page's role carries the access of the guest's huge PTE
//! as the fault saw it (`direct_access = gw->pte_access` in `FNAME(fetch)`).
//! A read or exec fault through a guest PTE whose dirty bit is clear drops
//! write access (`FNAME(protect_clean_gpte)`), so the first 4K fault in a
//! clean guest 2M page makes a read-only direct shadow page. The first write
//! fault sets the guest PTE's dirty bit (`FNAME(update_accessed_dirty_bits)`)
//! and asks for a writable role: `validate_direct_spte` unlinks the
//! read-only page (`drop_parent_pte`) **without zapping its SPTEs**, and a
//! new writable page is linked and filled (fault + prefetch). The old page's
//! SPTEs stay present (counted in `pages_4k`, reachable through the rmaps)
//! until an invalidation of their gfns, a collapsible-SPTE zap or a zap of
//! everything. The mirror keeps them as orphan SPTEs per gfn.

use super::mmu::SecondaryMmu;
use crate::units::{Level, PAGES_PER_HPAGE};

impl SecondaryMmu {
    /// Declares whether the guest PTE mapping `gfn`'s 2M guest page has its
    /// dirty bit clear (`clean`). Unless declared clean a guest PTE is taken
    /// as dirty (no role change can happen). A write fault through it makes
    /// it dirty ([`Self::fetch_direct_access`]).
    pub fn set_guest_pte_clean(&mut self, gfn: u64, clean: bool) {
        let p = Level::M2.index(gfn);
        if clean {
            self.guest_clean.insert(p, ());
        } else {
            self.guest_clean.remove(&p);
        }
    }

    /// Whether the guest PTE of `gfn`'s 2M guest page is clean (see
    /// [`Self::set_guest_pte_clean`]).
    pub fn guest_pte_clean(&self, gfn: u64) -> bool {
        self.guest_clean.contains_key(&Level::M2.index(gfn))
    }

    /// `FNAME(walk_addr_generic)` + `FNAME(protect_clean_gpte)` +
    /// `FNAME(update_accessed_dirty_bits)` (arch/x86/kvm/mmu/paging_tmpl.h):
    /// the access a direct shadow page made by this fault gets
    /// (`direct_access`): writable unless the fault is not a write and the
    /// guest PTE is clean; a write fault sets the guest PTE's dirty bit.
    pub(super) fn fetch_direct_access(&mut self, gfn: u64, write: bool) -> bool {
        if write {
            self.set_guest_pte_clean(gfn, false);
            return true;
        }
        !self.guest_pte_clean(gfn)
    }

    /// `validate_direct_spte` (arch/x86/kvm/mmu/mmu.c), called by
    /// `FNAME(fetch)` at the 2M level on the way to a 4K leaf: when the
    /// linked direct shadow page's role access differs from the fault's
    /// (`child->role.access != direct_access`), `drop_parent_pte` unlinks
    /// it: its 4K SPTEs stay present, as orphans, and the fault links a new
    /// page with the new role (`kvm_mmu_get_child_sp`), empty, that the
    /// fault and its prefetch fill again. Returns the SPTEs orphaned.
    pub(super) fn validate_direct_spte(&mut self, gfn: u64, writable_role: bool) -> u64 {
        let frame = Level::M2.index(gfn);
        let old = self.direct_role.insert(frame, writable_role);
        if old.is_none_or(|w| w == writable_role) {
            return 0;
        }
        let first = frame * PAGES_PER_HPAGE;
        let linked: Vec<u64> = (first..first + PAGES_PER_HPAGE)
            .filter(|g| self.leaves[0].contains_key(g))
            .collect();
        for g in &linked {
            self.zap_gfn_range_levels(*g, g + 1, &[Level::K4]);
            *self.orphans.entry(*g).or_insert(0) += 1;
        }
        self.orphan_count += linked.len() as u64;
        linked.len() as u64
    }

    /// Zaps the orphan SPTEs of gfns `[g0, g1)` (an invalidation reaches
    /// them through the rmaps like any SPTE). Returns SPTEs zapped.
    pub(super) fn zap_orphans(&mut self, g0: u64, g1: u64) -> u64 {
        if self.orphans.is_empty() || g0 >= g1 {
            return 0;
        }
        let gone: Vec<u64> = if g1 - g0 > self.orphans.len() as u64 {
            self.orphans
                .keys()
                .copied()
                .filter(|g| (g0..g1).contains(g))
                .collect()
        } else {
            (g0..g1).filter(|g| self.orphans.contains_key(g)).collect()
        };
        let mut n = 0;
        for g in gone {
            n += u64::from(self.orphans.remove(&g).unwrap_or(0));
        }
        self.orphan_count -= n;
        n
    }

    /// 4K SPTEs left in unlinked direct shadow pages by
    /// [`Self::validate_direct_spte`] (included in [`Self::pages_4k`]).
    pub fn orphan_pages_4k(&self) -> u64 {
        self.orphan_count
    }

    /// Gfns with orphan SPTEs, and how many each.
    pub fn orphans(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.orphans.iter().map(|(g, n)| (*g, *n))
    }
}

#[cfg(test)]
mod tests {
    use super::super::host::LevelMap;
    use super::super::mmu::Access;
    use super::super::params::MmuParams;
    use super::super::slots::Memslot;
    use super::*;

    const HVA: u64 = 0x7f00_0000_0000;

    fn shadow(frames: Vec<Option<Level>>) -> (SecondaryMmu, LevelMap) {
        let mut m = SecondaryMmu::with_params(MmuParams::shadow());
        m.add_slot(Memslot {
            id: 0,
            base_gfn: 0,
            npages: frames.len() as u64 * PAGES_PER_HPAGE,
            userspace_addr: HVA,
            dirty_logging: false,
        })
        .unwrap();
        (m, LevelMap::new(HVA, frames))
    }

    /// The trace of this project's shadow host (docs/ARCHITECTURE.md, "The
    /// exact mirror"): frame 63 split before the guest's first access,
    /// guest PDE clean; a read of gfn 0x7e00 makes a `-ux` direct page with
    /// 8 SPTEs, the write makes a `wux` one with 8 more: 16 SPTEs for 8 gfns.
    /// The collapse's invalidation takes all of them.
    #[test]
    fn read_then_write_in_a_clean_small_guest_huge_page_orphans_the_read_only_group() {
        let mut frames = vec![Some(Level::M2); 64];
        frames[63] = Some(Level::K4);
        let (mut m, host) = shadow(frames);
        let x = 63 * PAGES_PER_HPAGE;
        m.set_guest_pte_clean(x, true);
        m.fault_access(x, Level::M2, Access::READ, &host).unwrap();
        assert_eq!((m.pages_4k(), m.orphan_pages_4k()), (8, 0));
        assert!(m.lookup_access(x).is_some_and(|(_, _, w)| !w));
        m.fault_access(x, Level::M2, Access::WRITE, &host).unwrap();
        assert_eq!((m.pages_4k(), m.orphan_pages_4k()), (16, 8));
        assert!(!m.guest_pte_clean(x));
        // The rest of the guest page: one SPTE per gfn more, no new orphans.
        for g in x + 1..x + PAGES_PER_HPAGE {
            m.fault_access(g, Level::M2, Access::READ, &host).unwrap();
            m.fault_access(g, Level::M2, Access::WRITE, &host).unwrap();
        }
        assert_eq!(m.pages_4k(), 512 + 8);
        // A 4K invalidation takes one orphan with its gfn's live SPTE.
        m.invalidate_range_start(HVA + x * 4096, HVA + (x + 1) * 4096);
        m.invalidate_range_end(HVA + x * 4096, HVA + (x + 1) * 4096)
            .unwrap();
        assert_eq!((m.pages_4k(), m.orphan_pages_4k()), (511 + 7, 7));
        // The collapse: the whole frame's invalidation.
        let (a, b) = (HVA + 63 * (2 << 20), HVA + 64 * (2 << 20));
        m.invalidate_range_start(a, b);
        m.invalidate_range_end(a, b).unwrap();
        assert_eq!((m.pages_4k(), m.orphan_pages_4k()), (0, 0));
    }

    /// A dirty guest PTE (the default), a first write, or a huge host frame
    /// (the 2M leaf is simply replaced): no role change, no orphan.
    #[test]
    fn no_orphans_without_a_role_change_under_a_4k_leaf() {
        let (mut m, host) = shadow(vec![Some(Level::K4), Some(Level::M2)]);
        m.fault_access(0, Level::M2, Access::READ, &host).unwrap();
        m.fault_access(0, Level::M2, Access::WRITE, &host).unwrap();
        m.set_guest_pte_clean(8, true);
        m.fault_access(8, Level::M2, Access::WRITE, &host).unwrap();
        m.set_guest_pte_clean(512, true);
        m.fault_access(512, Level::M2, Access::READ, &host).unwrap();
        m.fault_access(512, Level::M2, Access::WRITE, &host)
            .unwrap();
        assert_eq!(
            (m.pages_4k(), m.pages_2m(), m.orphan_pages_4k()),
            (16, 1, 0)
        );
        m.kvm_mmu_zap_all_fast();
        assert_eq!(m.pages_4k(), 0);
    }
}
