//! [`SecondaryMmu`]: the secondary page tables, the fault path and the
//! mmu-notifier invalidation protocol. Every kernel rule is one function named
//! for the kernel function it follows (Linux 6.18, file and function in
//! its doc comment); the memslot-flag rules live in `dirty_log.rs`, write
//! tracking of shadowed guest page tables in `track.rs`.

use super::hash::U64Map;
use super::host::HostMap;
use super::params::{MmuKind, MmuParams, PTE_PREFETCH_NUM};
use super::slots::{Memslot, SlotState};
use super::MirrorError;
use crate::units::{Level, PAGES_PER_HPAGE, PAGE_SIZE};

/// A fault in flight: what `kvm_faultin_pfn` gathered before taking `mmu_lock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingFault {
    /// Faulting gfn.
    pub gfn: u64,
    /// The fault's own maximum level (`fault->max_level`); on shadow paging
    /// the guest's page size at this gfn (a 4K guest PTE caps it at 4K).
    pub guest_max_level: Level,
    /// An instruction fetch (`fault->exec`): with `nx_huge_pages` it maps 4K.
    pub exec: bool,
    /// A write (`fault->write`): on the shadow MMU it sets the guest PTE's
    /// dirty bit and asks for a writable direct shadow page.
    pub write: bool,
    /// `mmu_invalidate_seq` read at the start of the fault.
    pub seq: u64,
    /// Host virtual address of the gfn.
    pub hva: u64,
    /// Pfn from the host (GUP), once translated.
    pub pfn: Option<u64>,
}

/// Outcome of a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultResult {
    /// A new leaf was installed.
    Installed {
        /// Its level.
        level: Level,
        /// Its pfn (aligned to the level for a huge leaf).
        pfn: u64,
    },
    /// The gfn was already mapped like this (spurious fault).
    AlreadyMapped {
        /// Level of the existing leaf.
        level: Level,
    },
    /// `mmu_invalidate_retry_gfn` said retry: nothing installed.
    Retry,
    /// The host has no page at the hva (KVM would fault it in on the host).
    NoHostPage,
}

/// A leaf SPTE: pfn (aligned for a huge leaf), write permission, and
/// whether it lives in a direct shadow page (TDP, or a shadow-MMU page for
/// a guest huge page: `kvm_rmap_zap_collapsible_sptes` zaps only those).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Spte {
    pub(super) pfn: u64,
    pub(super) writable: bool,
    pub(super) direct: bool,
}

/// Access kind of a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// A write (`fault->write`).
    pub write: bool,
    /// An instruction fetch (`fault->exec`).
    pub exec: bool,
}

impl Access {
    /// A data read.
    pub const READ: Access = Access {
        write: false,
        exec: false,
    };
    /// A data write.
    pub const WRITE: Access = Access {
        write: true,
        exec: false,
    };
    /// An instruction fetch.
    pub const EXEC: Access = Access {
        write: false,
        exec: true,
    };
}

/// One pending `invalidate_range_start`: its hva range and whether it hit a
/// memslot (only then did `kvm_mmu_invalidate_begin` count it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Invalidation {
    hva: (u64, u64),
    counted: bool,
}

/// The secondary MMU of one VM.
#[derive(Debug, Clone, Default)]
pub struct SecondaryMmu {
    pub(super) params: MmuParams,
    pub(super) slots: Vec<SlotState>,
    /// Leaves per level ([`Level::K4`], [`Level::M2`], [`Level::G1`]), keyed
    /// by `level.index(gfn)`.
    pub(super) leaves: [U64Map<Spte>; 3],
    /// 4K leaves per 2M frame (fast range zaps).
    small_per_frame: U64Map<u16>,
    /// 2M frames with a 4K page table (a non-leaf SPTE at the 2M level);
    /// `true` when it was created for an NX exec fault
    /// (`sp->nx_huge_page_disallowed`). Leaf zaps keep tables.
    pub(super) tables: U64Map<bool>,
    /// Shadowed (write-tracked) gfns and how many shadow pages each.
    pub(super) tracked: U64Map<u32>,
    seq: u64,
    in_progress: u32,
    /// `mmu_invalidate_range_start/end` in gfns (`INVALID_GPA` = none).
    range: Option<(u64, u64)>,
    pending: Vec<Invalidation>,
    /// Memslot generation (`kvm_memslots(kvm)->generation`): bumped by every
    /// memslot update (create, delete, flags).
    pub(super) generation: u64,
    /// Shadow MMU: 2M guest pages whose guest PTE has its dirty bit clear
    /// (`direct_role.rs`).
    pub(super) guest_clean: U64Map<()>,
    /// Shadow MMU: the role of the direct shadow page linked under each 2M
    /// frame: writable or not (`direct_role.rs`).
    pub(super) direct_role: U64Map<bool>,
    /// Shadow MMU: 4K SPTEs of unlinked direct shadow pages, per gfn.
    pub(super) orphans: U64Map<u32>,
    /// Their total.
    pub(super) orphan_count: u64,
}

pub(super) fn lvl_idx(level: Level) -> usize {
    match level {
        Level::K4 => 0,
        Level::M2 => 1,
        Level::G1 => 2,
    }
}

impl SecondaryMmu {
    /// An empty VM on the TDP MMU with default parameters ([`MmuParams::tdp`]).
    pub fn new() -> Self {
        Self::with_params(MmuParams::tdp())
    }

    /// An empty VM on the MMU `params` describes.
    pub fn with_params(params: MmuParams) -> Self {
        SecondaryMmu {
            params,
            ..Self::default()
        }
    }

    /// The MMU and module parameters mirrored.
    pub fn params(&self) -> MmuParams {
        self.params
    }

    /// Adds a memslot (`KVM_SET_USER_MEMORY_REGION`, create). Like
    /// `kvm_swap_active_memslots`, a memslot update waits for invalidations
    /// in progress (`mn_active_invalidate_count`): refused while one is.
    pub fn add_slot(&mut self, slot: Memslot) -> Result<(), MirrorError> {
        self.no_invalidation_active()?;
        let state = SlotState::kvm_alloc_memslot_metadata(slot)?;
        if let Some(o) = self.slots.iter().find(|o| {
            o.slot.id == slot.id
                || (slot.base_gfn < o.slot.end_gfn() && o.slot.base_gfn < slot.end_gfn())
        }) {
            return Err(MirrorError::SlotOverlap {
                id: slot.id,
                base_gfn: slot.base_gfn,
                npages: slot.npages,
                other: o.slot.id,
            });
        }
        let at = self
            .slots
            .partition_point(|o| o.slot.base_gfn < slot.base_gfn);
        self.slots.insert(at, state);
        // Shadow pages of gfns in the new slot account now.
        let tracked: Vec<u64> = self.tracked.keys().copied().collect();
        for g in tracked {
            if slot.contains(g) {
                let n = self.tracked[&g];
                if let Some(s) = self.slots.iter_mut().find(|s| s.slot.contains(g)) {
                    s.update_gfn_disallow_lpage_count(g, n as i32);
                }
            }
        }
        self.generation += 1;
        Ok(())
    }

    pub(super) fn no_invalidation_active(&self) -> Result<(), MirrorError> {
        if self.pending.is_empty() {
            Ok(())
        } else {
            Err(MirrorError::InvalidationActive)
        }
    }

    /// Deletes a memslot (waits for invalidations like [`Self::add_slot`])
    /// and `kvm_arch_flush_shadow_memslot` (arch/x86/kvm/mmu/mmu.c): with
    /// the default `KVM_X86_QUIRK_SLOT_ZAP_ALL` that is
    /// `kvm_mmu_zap_all_fast`: every SPTE and shadow page of the VM goes.
    pub fn remove_slot(&mut self, id: u32) -> Result<Memslot, MirrorError> {
        self.no_invalidation_active()?;
        let i = self.slot_index(id)?;
        let s = self.slots.remove(i).slot;
        self.generation += 1;
        self.kvm_mmu_zap_all_fast();
        Ok(s)
    }

    /// `kvm_mmu_zap_all_fast` (arch/x86/kvm/mmu/mmu.c): all roots become
    /// obsolete and are zapped: every leaf and page table; on the shadow MMU
    /// the shadow pages of guest page tables go too (`unaccount_shadowed`),
    /// until the guest's next faults shadow them again.
    pub fn kvm_mmu_zap_all_fast(&mut self) {
        for l in &mut self.leaves {
            l.clear();
        }
        self.small_per_frame.clear();
        self.tables.clear();
        self.direct_role.clear();
        self.orphans.clear();
        self.orphan_count = 0;
        let tracked: Vec<(u64, u32)> = self.tracked.drain().collect();
        for (g, n) in tracked {
            if let Some(s) = self.slots.iter_mut().find(|s| s.slot.contains(g)) {
                s.update_gfn_disallow_lpage_count(g, -(n as i32));
            }
        }
    }

    /// The memslot generation: bumped by every memslot update
    /// ([`Self::add_slot`], [`Self::remove_slot`], [`Self::set_dirty_logging`]).
    pub fn memslot_generation(&self) -> u64 {
        self.generation
    }

    pub(super) fn slot_index(&self, id: u32) -> Result<usize, MirrorError> {
        self.slots
            .iter()
            .position(|s| s.slot.id == id)
            .ok_or(MirrorError::UnknownSlot(id))
    }

    /// The memslots, sorted by base gfn.
    pub fn slots(&self) -> impl Iterator<Item = &Memslot> {
        self.slots.iter().map(|s| &s.slot)
    }

    pub(super) fn state_for_gfn(&self, gfn: u64) -> Option<&SlotState> {
        let i = self.slots.partition_point(|s| s.slot.base_gfn <= gfn);
        let s = self.slots.get(i.checked_sub(1)?)?;
        s.slot.contains(gfn).then_some(s)
    }

    /// The memslot containing `gfn`.
    pub fn slot_for_gfn(&self, gfn: u64) -> Option<&Memslot> {
        self.state_for_gfn(gfn).map(|s| &s.slot)
    }

    /// Whether `lpage_info` allows a 2M leaf over `gfn`'s frame.
    pub fn lpage_allowed(&self, gfn: u64) -> bool {
        self.lpage_allowed_at(gfn, Level::M2)
    }

    /// Whether `lpage_info` allows a leaf of `level` over `gfn`.
    pub fn lpage_allowed_at(&self, gfn: u64, level: Level) -> bool {
        self.state_for_gfn(gfn)
            .is_some_and(|s| s.lpage_allowed_at(gfn, level))
    }

    /// `host_pfn_mapping_level` (arch/x86/kvm/mmu/mmu.c): the level of the
    /// host's leaf (PTE, PMD or PUD) mapping `hva`, walked without GUP.
    pub fn host_pfn_mapping_level(host: &dyn HostMap, hva: u64) -> Level {
        host.host_level(hva)
    }

    /// `kvm_mmu_max_mapping_level` (arch/x86/kvm/mmu/mmu.c): the largest
    /// level from `max_huge_page_level` down whose `lpage_info` allows it,
    /// capped by [`Self::host_pfn_mapping_level`].
    pub fn kvm_mmu_max_mapping_level(&self, gfn: u64, host: &dyn HostMap) -> Level {
        let Some(s) = self.state_for_gfn(gfn) else {
            return Level::K4;
        };
        let mut max = self.params.max_huge_page_level;
        while max > Level::K4 && !s.lpage_allowed_at(gfn, max) {
            max = max.below();
        }
        if max == Level::K4 {
            return Level::K4;
        }
        Self::host_pfn_mapping_level(host, s.slot.gfn_to_hva(gfn)).min(max)
    }

    /// `kvm_mmu_hugepage_adjust` (arch/x86/kvm/mmu/mmu.c): the goal level of
    /// a fault and whether NX forbids huge (`huge_page_disallowed`): 4K when
    /// the fault's own cap is 4K, the slot logs dirty pages
    /// (`slot_dirty`: the flags the fault's memslot snapshot had), or an
    /// exec fault meets `nx_huge_pages`; else [`Self::kvm_mmu_max_mapping_level`]
    /// capped by the fault's own level.
    pub fn kvm_mmu_hugepage_adjust(
        &self,
        gfn: u64,
        guest_max_level: Level,
        exec: bool,
        slot_dirty: bool,
        host: &dyn HostMap,
    ) -> (Level, bool) {
        let huge_page_disallowed = exec && self.params.nx_huge_pages;
        if guest_max_level == Level::K4 || slot_dirty {
            return (Level::K4, huge_page_disallowed);
        }
        let req = self
            .kvm_mmu_max_mapping_level(gfn, host)
            .min(guest_max_level);
        if req == Level::K4 || huge_page_disallowed {
            return (Level::K4, huge_page_disallowed);
        }
        (req, false)
    }

    /// `disallowed_hugepage_adjust` (arch/x86/kvm/mmu/mmu.c): a fault that
    /// wants 2M where a 4K table created for an NX exec fault exists goes
    /// down to 4K.
    pub(super) fn disallowed_hugepage_adjust(&self, gfn: u64, goal: Level) -> Level {
        if goal == Level::M2 && self.tables.get(&Level::M2.index(gfn)) == Some(&true) {
            Level::K4
        } else {
            goal
        }
    }

    /// The level a non-exec fault at `gfn` with the guest's cap
    /// `guest_max_level` would map now (dirty logging and `lpage_info` of the
    /// current memslot, NX tables, the host level).
    pub fn max_mapping_level(
        &self,
        gfn: u64,
        host: &dyn HostMap,
        guest_max_level: Level,
    ) -> Result<Level, MirrorError> {
        let s = self.state_for_gfn(gfn).ok_or(MirrorError::NoSlot { gfn })?;
        let (goal, _) =
            self.kvm_mmu_hugepage_adjust(gfn, guest_max_level, false, s.slot.dirty_logging, host);
        Ok(self.disallowed_hugepage_adjust(gfn, goal))
    }

    /// Fault step 1: read `mmu_invalidate_seq` (before GUP, `smp_rmb`).
    pub fn fault_begin(
        &self,
        gfn: u64,
        guest_max_level: Level,
    ) -> Result<PendingFault, MirrorError> {
        let s = self.slot_for_gfn(gfn).ok_or(MirrorError::NoSlot { gfn })?;
        Ok(PendingFault {
            gfn,
            guest_max_level,
            exec: false,
            write: false,
            seq: self.seq,
            hva: s.gfn_to_hva(gfn),
            pfn: None,
        })
    }

    /// Fault step 2: translate the hva through the host (`hva_to_pfn`).
    pub fn fault_translate(&self, f: &mut PendingFault, host: &dyn HostMap) {
        f.pfn = host.pfn(f.hva);
    }

    /// `mmu_invalidate_retry_gfn` (include/linux/kvm_host.h), fault step 3
    /// under `mmu_lock`: retry when an invalidation in progress covers the
    /// gfn or `mmu_invalidate_seq` moved since the fault read it.
    pub fn mmu_invalidate_retry_gfn(&self, f: &PendingFault) -> bool {
        let in_range = self.range.is_some_and(|(a, b)| f.gfn >= a && f.gfn < b);
        (self.in_progress > 0 && in_range) || self.seq != f.seq
    }

    /// Fault step 3: [`Self::mmu_invalidate_retry_gfn`].
    pub fn fault_must_retry(&self, f: &PendingFault) -> bool {
        self.mmu_invalidate_retry_gfn(f)
    }

    /// Fault step 4 (under `mmu_lock`, retry check passed): choose the level
    /// and install the leaf. The leaf is writable when the host page is (a
    /// read fault maps writable opportunistically).
    pub fn fault_install(
        &mut self,
        f: &PendingFault,
        host: &dyn HostMap,
    ) -> Result<FaultResult, MirrorError> {
        let Some(pfn) = f.pfn else {
            return Ok(FaultResult::NoHostPage);
        };
        let dirty = self
            .slot_for_gfn(f.gfn)
            .ok_or(MirrorError::NoSlot { gfn: f.gfn })?
            .dirty_logging;
        Ok(self.map(f, dirty, pfn, host.writable(f.hva), host))
    }

    /// Goal level, then the walk that installs the leaf: the fault's
    /// adjusted level, NX tables, and the MMU's way with a huge leaf in
    /// the way ([`Self::kvm_tdp_mmu_map`] / [`Self::direct_map`]).
    pub(super) fn map(
        &mut self,
        f: &PendingFault,
        slot_dirty: bool,
        pfn: u64,
        writable: bool,
        host: &dyn HostMap,
    ) -> FaultResult {
        let (goal, nx) =
            self.kvm_mmu_hugepage_adjust(f.gfn, f.guest_max_level, f.exec, slot_dirty, host);
        let goal = self.disallowed_hugepage_adjust(f.gfn, goal);
        let direct = self.params.kind == MmuKind::Tdp || f.guest_max_level > Level::K4;
        let mut writable =
            writable && !(self.params.shadow_paging() && self.tracked.contains_key(&f.gfn));
        if self.params.shadow_paging() && direct {
            let role_writable = self.fetch_direct_access(f.gfn, f.write);
            writable &= role_writable;
            if goal == Level::K4 {
                self.validate_direct_spte(f.gfn, role_writable);
            }
        }
        let r = match self.params.kind {
            MmuKind::Tdp => self.kvm_tdp_mmu_map(f.gfn, goal, pfn, writable, nx),
            MmuKind::Shadow => self.direct_map(f.gfn, goal, pfn, writable, direct, nx),
        };
        if self.params.shadow_paging()
            && direct
            && matches!(
                r,
                FaultResult::Installed {
                    level: Level::K4,
                    ..
                }
            )
        {
            self.direct_pte_prefetch(f.gfn, slot_dirty, host);
        }
        r
    }

    /// The whole fault path at once (`kvm_tdp_page_fault` / `FNAME(page_fault)`),
    /// a non-exec access.
    pub fn fault(
        &mut self,
        gfn: u64,
        guest_max_level: Level,
        host: &dyn HostMap,
    ) -> Result<FaultResult, MirrorError> {
        self.fault_access(gfn, guest_max_level, Access::default(), host)
    }

    /// The whole fault path for an access of kind `access` (an exec fault
    /// meets `nx_huge_pages`).
    pub fn fault_access(
        &mut self,
        gfn: u64,
        guest_max_level: Level,
        access: Access,
        host: &dyn HostMap,
    ) -> Result<FaultResult, MirrorError> {
        let mut f = self.fault_begin(gfn, guest_max_level)?;
        f.exec = access.exec;
        f.write = access.write;
        self.fault_translate(&mut f, host);
        if self.fault_must_retry(&f) {
            return Ok(FaultResult::Retry);
        }
        self.fault_install(&f, host)
    }

    fn leaf(&self, level: Level, gfn: u64) -> Option<Spte> {
        self.leaves[lvl_idx(level)].get(&level.index(gfn)).copied()
    }

    /// The huge leaf covering `gfn`, if any.
    fn huge_leaf(&self, gfn: u64) -> Option<(Level, Spte)> {
        [Level::G1, Level::M2]
            .into_iter()
            .find_map(|l| self.leaf(l, gfn).map(|s| (l, s)))
    }

    fn insert_leaf(&mut self, level: Level, gfn: u64, spte: Spte) -> Option<Spte> {
        let old = self.leaves[lvl_idx(level)].insert(level.index(gfn), spte);
        if level == Level::K4 {
            let frame = Level::M2.index(gfn);
            self.tables.entry(frame).or_insert(false);
            if old.is_none() {
                *self.small_per_frame.entry(frame).or_insert(0) += 1;
            }
        }
        old
    }

    fn remove_leaf(&mut self, level: Level, idx: u64) -> bool {
        let gone = self.leaves[lvl_idx(level)].remove(&idx).is_some();
        if gone && level == Level::K4 {
            let frame = idx / PAGES_PER_HPAGE;
            if let Some(n) = self.small_per_frame.get_mut(&frame) {
                *n -= 1;
                if *n == 0 {
                    self.small_per_frame.remove(&frame);
                }
            }
        }
        gone
    }

    /// `tdp_mmu_split_huge_page` (arch/x86/kvm/mmu/tdp_mmu.c): a huge leaf
    /// becomes a table of 512 leaves one level down, each with the huge
    /// leaf's permissions (`make_small_spte`).
    pub(super) fn tdp_mmu_split_huge_page(&mut self, level: Level, idx: u64) {
        let Some(h) = self.leaves[lvl_idx(level)].remove(&idx) else {
            return;
        };
        let child = level.below();
        let first_gfn = idx * level.pages();
        for i in 0..PAGES_PER_HPAGE {
            let gfn = first_gfn + i * child.pages();
            let s = Spte {
                pfn: h.pfn + i * child.pages(),
                ..h
            };
            self.insert_leaf(child, gfn, s);
        }
    }

    /// `drop_large_spte` (arch/x86/kvm/mmu/mmu.c): the shadow MMU zaps a huge
    /// leaf in the way of a smaller mapping (`__link_shadow_page`).
    pub(super) fn drop_large_spte(&mut self, level: Level, idx: u64) {
        self.remove_leaf(level, idx);
    }

    /// `kvm_tdp_mmu_map` (arch/x86/kvm/mmu/tdp_mmu.c): walk down to `goal`;
    /// a huge leaf above the goal is split in place
    /// ([`Self::tdp_mmu_split_huge_page`]); at the goal a leaf is set
    /// (`tdp_mmu_map_handle_target_level`), replacing a lower table.
    pub(super) fn kvm_tdp_mmu_map(
        &mut self,
        gfn: u64,
        goal: Level,
        pfn: u64,
        writable: bool,
        nx: bool,
    ) -> FaultResult {
        for level in [Level::G1, Level::M2] {
            if level <= goal {
                break;
            }
            if self.leaf(level, gfn).is_some() {
                self.tdp_mmu_split_huge_page(level, level.index(gfn));
                if level == Level::M2 && nx {
                    // The new table is `sp->nx_huge_page_disallowed`.
                    self.tables.insert(level.index(gfn), true);
                }
            }
        }
        self.set_target_leaf(gfn, goal, pfn, writable, true, nx)
    }

    /// `direct_map` / `FNAME(fetch)` (arch/x86/kvm/mmu/mmu.c, paging_tmpl.h):
    /// walk down to `goal`; a huge leaf above the goal is dropped
    /// ([`Self::drop_large_spte`]); at the goal a leaf is set.
    pub(super) fn direct_map(
        &mut self,
        gfn: u64,
        goal: Level,
        pfn: u64,
        writable: bool,
        direct: bool,
        nx: bool,
    ) -> FaultResult {
        for level in [Level::G1, Level::M2] {
            if level <= goal {
                break;
            }
            if self.leaf(level, gfn).is_some() {
                self.drop_large_spte(level, level.index(gfn));
            }
        }
        self.set_target_leaf(gfn, goal, pfn, writable, direct, nx)
    }

    /// The leaf at the goal level (`mmu_set_spte` / `tdp_mmu_map_handle_target_level`):
    /// the same pfn and permission is a spurious fault; a huge leaf replaces
    /// every smaller leaf and table under it; a 4K leaf under an NX exec
    /// fault marks its new table `nx_huge_page_disallowed`.
    fn set_target_leaf(
        &mut self,
        gfn: u64,
        goal: Level,
        pfn: u64,
        writable: bool,
        direct: bool,
        nx: bool,
    ) -> FaultResult {
        let mut level = goal;
        let mask = level.pages() - 1;
        if level > Level::K4 && (gfn & mask) != (pfn & mask) {
            log::warn!("gfn {gfn:#x} and pfn {pfn:#x} not congruent at {level:?}; mapping 4K");
            level = Level::K4;
        }
        let mask = level.pages() - 1;
        let lpfn = pfn & !mask;
        let new = Spte {
            pfn: lpfn,
            writable,
            direct,
        };
        if let Some(old) = self.leaf(level, gfn) {
            if old.pfn == lpfn && (old.writable || !writable) {
                return FaultResult::AlreadyMapped { level };
            }
        }
        if level == Level::K4 {
            let frame = Level::M2.index(gfn);
            let table_is_new = !self.tables.contains_key(&frame);
            self.insert_leaf(Level::K4, gfn, new);
            if table_is_new && nx {
                self.tables.insert(frame, true);
            }
            return FaultResult::Installed { level, pfn: lpfn };
        }
        let first = level.index(gfn) * level.pages();
        self.zap_below(first, first + level.pages(), level);
        self.insert_leaf(level, gfn, new);
        FaultResult::Installed { level, pfn: lpfn }
    }

    /// A huge leaf at `level` over `first_gfn`'s page replaces everything under it.
    pub(super) fn replace_with_huge(&mut self, first_gfn: u64, level: Level, spte: Spte) {
        self.zap_below(first_gfn, first_gfn + level.pages(), level);
        self.insert_leaf(level, first_gfn, spte);
    }

    /// Drops every leaf and table below `level` in gfns `[g0, g1)` (a huge
    /// leaf replacing a table: `handle_removed_pt`).
    fn zap_below(&mut self, g0: u64, g1: u64, level: Level) {
        if level == Level::G1 {
            let f0 = Level::M2.index(g0);
            for f in f0..f0 + PAGES_PER_HPAGE {
                self.remove_leaf(Level::M2, f);
            }
        }
        self.zap_gfn_range_levels(g0, g1, &[Level::K4]);
        for f in Level::M2.index(g0)..=Level::M2.index(g1 - 1) {
            self.tables.remove(&f);
            self.direct_role.remove(&f);
        }
    }

    /// `direct_pte_prefetch` / `__direct_pte_prefetch` /
    /// `direct_pte_prefetch_many` (arch/x86/kvm/mmu/mmu.c): after a 4K
    /// fault in a direct shadow page, map the non-present neighbours in the
    /// faulting gfn's aligned group of [`PTE_PREFETCH_NUM`], run by run,
    /// each run up to its first gfn the host cannot give writable
    /// (`kvm_prefetch_pages`); nothing while the slot logs dirty pages
    /// (`gfn_to_memslot_dirty_bitmap` returns no slot). The TDP MMU does not
    /// prefetch; indirect shadow pages (`FNAME(pte_prefetch)`) prefetch only
    /// guest PTEs with the accessed bit, which the mirror takes as none.
    pub(super) fn direct_pte_prefetch(&mut self, gfn: u64, slot_dirty: bool, host: &dyn HostMap) {
        if slot_dirty {
            return;
        }
        let start = gfn & !(PTE_PREFETCH_NUM - 1);
        let present = |m: &Self, g: u64| m.leaf(Level::K4, g).is_some();
        let mut g = start;
        while g < start + PTE_PREFETCH_NUM {
            if g == gfn || present(self, g) {
                g += 1;
                continue;
            }
            // A run of non-present sptes [g, end).
            let mut end = g;
            while end < start + PTE_PREFETCH_NUM && end != gfn && !present(self, end) {
                end += 1;
            }
            let mut got = Vec::new();
            for x in g..end {
                let Some(s) = self.state_for_gfn(x) else {
                    break;
                };
                let hva = s.slot.gfn_to_hva(x);
                match host.pfn(hva) {
                    Some(p) if host.writable(hva) => got.push((x, p)),
                    _ => break,
                }
            }
            if got.is_empty() {
                return;
            }
            let role_writable = self
                .direct_role
                .get(&Level::M2.index(gfn))
                .copied()
                .unwrap_or(true);
            for (x, p) in got {
                let writable = role_writable && !self.tracked.contains_key(&x);
                self.insert_leaf(
                    Level::K4,
                    x,
                    Spte {
                        pfn: p,
                        writable,
                        direct: true,
                    },
                );
            }
            g = end;
        }
    }

    /// `kvm_mmu_notifier_invalidate_range_start` (virt/kvm/kvm_main.c) →
    /// `kvm_handle_hva_range`: for each memslot the hva range hits,
    /// `kvm_mmu_invalidate_begin` (once: in-progress count, range reset),
    /// `kvm_mmu_invalidate_range_add` (gfn range) and `kvm_unmap_gfn_range`
    /// (every leaf overlapping; a huge leaf goes whole). A range that hits
    /// no memslot counts nothing. Returns the number of leaves zapped.
    pub fn invalidate_range_start(&mut self, hva_start: u64, hva_end: u64) -> usize {
        let mut ranges = Vec::new();
        for s in &self.slots {
            let (ua, ue) = (
                s.slot.userspace_addr,
                s.slot.userspace_addr + s.slot.npages * PAGE_SIZE,
            );
            let (a, b) = (hva_start.max(ua), hva_end.min(ue));
            if a < b {
                let g0 = s.slot.base_gfn + (a - ua) / PAGE_SIZE;
                let g1 = s.slot.base_gfn + (b - ua).div_ceil(PAGE_SIZE);
                ranges.push((g0, g1));
            }
        }
        let counted = !ranges.is_empty();
        self.pending.push(Invalidation {
            hva: (hva_start, hva_end),
            counted,
        });
        if counted {
            self.kvm_mmu_invalidate_begin();
        }
        let mut n = 0;
        for (a, b) in ranges {
            self.kvm_mmu_invalidate_range_add(a, b);
            n += self.kvm_unmap_gfn_range(a, b);
        }
        n
    }

    /// `kvm_mmu_invalidate_begin` (virt/kvm/kvm_main.c).
    fn kvm_mmu_invalidate_begin(&mut self) {
        self.in_progress += 1;
        if self.in_progress == 1 {
            self.range = None;
        }
    }

    /// `kvm_mmu_invalidate_range_add` (virt/kvm/kvm_main.c).
    fn kvm_mmu_invalidate_range_add(&mut self, g0: u64, g1: u64) {
        self.range = Some(match self.range {
            None => (g0, g1),
            Some((a, b)) => (a.min(g0), b.max(g1)),
        });
    }

    /// `kvm_unmap_gfn_range` (arch/x86/kvm/mmu/mmu.c): zap every leaf
    /// overlapping gfns `[g0, g1)` (tables stay).
    fn kvm_unmap_gfn_range(&mut self, g0: u64, g1: u64) -> usize {
        let orphans = self.zap_orphans(g0, g1) as usize;
        self.zap_gfn_range_levels(g0, g1, &[Level::K4, Level::M2, Level::G1]) + orphans
    }

    /// `kvm_mmu_notifier_invalidate_range_end` → `kvm_mmu_invalidate_end`
    /// (virt/kvm/kvm_main.c): for an invalidation that hit a memslot, bump
    /// `mmu_invalidate_seq` and end one in progress.
    pub fn invalidate_range_end(
        &mut self,
        hva_start: u64,
        hva_end: u64,
    ) -> Result<(), MirrorError> {
        let i = self
            .pending
            .iter()
            .rposition(|p| p.hva == (hva_start, hva_end))
            .ok_or(MirrorError::UnbalancedInvalidate)?;
        let inv = self.pending.remove(i);
        if inv.counted {
            self.seq += 1;
            self.in_progress -= 1;
        }
        Ok(())
    }

    /// Zaps leaves of `levels` overlapping gfns `[g0, g1)` (a huge leaf goes
    /// whole). Returns leaves zapped.
    pub(super) fn zap_gfn_range_levels(&mut self, g0: u64, g1: u64, levels: &[Level]) -> usize {
        if g0 >= g1 {
            return 0;
        }
        let mut n = 0;
        for &level in levels {
            match level {
                Level::G1 | Level::M2 => {
                    for idx in level.index(g0)..=level.index(g1 - 1) {
                        n += usize::from(self.remove_leaf(level, idx));
                    }
                }
                Level::K4 => {
                    for frame in g0 / PAGES_PER_HPAGE..=(g1 - 1) / PAGES_PER_HPAGE {
                        if !self.small_per_frame.contains_key(&frame) {
                            continue;
                        }
                        let lo = g0.max(frame * PAGES_PER_HPAGE);
                        let hi = g1.min((frame + 1) * PAGES_PER_HPAGE);
                        for g in lo..hi {
                            if !self.small_per_frame.contains_key(&frame) {
                                break;
                            }
                            n += usize::from(self.remove_leaf(Level::K4, g));
                        }
                    }
                }
            }
        }
        n
    }

    /// Write-protects every leaf mapping gfns `[g0, g1)` at `min_level` and
    /// above (`rmap_write_protect` / `write_protect_gfn`).
    pub(super) fn write_protect_range(&mut self, g0: u64, g1: u64, min_level: Level) {
        if g0 >= g1 {
            return;
        }
        for level in [Level::K4, Level::M2, Level::G1] {
            if level < min_level {
                continue;
            }
            let (a, b) = (level.index(g0), level.index(g1 - 1));
            let map = &mut self.leaves[lvl_idx(level)];
            if (b - a) as usize > map.len() {
                for (k, e) in map.iter_mut() {
                    if (a..=b).contains(k) {
                        e.writable = false;
                    }
                }
            } else {
                for k in a..=b {
                    if let Some(e) = map.get_mut(&k) {
                        e.writable = false;
                    }
                }
            }
        }
    }

    /// The leaf mapping `gfn`: (level, pfn of the gfn's page).
    pub fn lookup(&self, gfn: u64) -> Option<(Level, u64)> {
        self.lookup_access(gfn).map(|(l, p, _)| (l, p))
    }

    /// The leaf mapping `gfn`: (level, pfn of the gfn's page, writable).
    pub fn lookup_access(&self, gfn: u64) -> Option<(Level, u64, bool)> {
        if let Some((l, h)) = self.huge_leaf(gfn) {
            return Some((l, h.pfn + gfn % l.pages(), h.writable));
        }
        self.leaf(Level::K4, gfn)
            .map(|p| (Level::K4, p.pfn, p.writable))
    }

    /// Every leaf as (first gfn, level, pfn).
    pub fn entries(&self) -> impl Iterator<Item = (u64, Level, u64)> + '_ {
        self.entries_access().map(|(g, l, p, _)| (g, l, p))
    }

    /// Every leaf as (first gfn, level, pfn, writable).
    pub fn entries_access(&self) -> impl Iterator<Item = (u64, Level, u64, bool)> + '_ {
        [Level::K4, Level::M2, Level::G1]
            .into_iter()
            .flat_map(move |l| {
                self.leaves[lvl_idx(l)]
                    .iter()
                    .map(move |(&i, &p)| (i * l.pages(), l, p.pfn, p.writable))
            })
    }

    /// KVM's `pages_4k`: present 4K leaves, the orphans of unlinked direct
    /// shadow pages included ([`Self::orphan_pages_4k`]).
    pub fn pages_4k(&self) -> u64 {
        self.leaves[0].len() as u64 + self.orphan_count
    }

    /// KVM's `pages_2m`: present 2M leaves.
    pub fn pages_2m(&self) -> u64 {
        self.leaves[1].len() as u64
    }

    /// KVM's `pages_1g`: present 1G leaves.
    pub fn pages_1g(&self) -> u64 {
        self.leaves[2].len() as u64
    }

    /// KVM's `nx_lpage_splits`: 4K tables that exist because of an NX exec fault.
    pub fn nx_lpage_splits(&self) -> u64 {
        self.tables.values().filter(|nx| **nx).count() as u64
    }

    /// `mmu_invalidate_seq`.
    pub fn mmu_invalidate_seq(&self) -> u64 {
        self.seq
    }

    /// `mmu_invalidate_in_progress`.
    pub fn invalidate_in_progress(&self) -> u32 {
        self.in_progress
    }

    /// Drops every leaf (e.g. `kvm_mmu_zap_all`), keeping shadowed gfns.
    pub fn zap_all(&mut self) {
        for l in &mut self.leaves {
            l.clear();
        }
        self.small_per_frame.clear();
        self.tables.clear();
        self.direct_role.clear();
        self.orphans.clear();
        self.orphan_count = 0;
    }
}
