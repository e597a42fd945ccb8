//! [`SecondaryMmu`]: the secondary page tables, the fault path and the
//! mmu-notifier invalidation protocol.

use super::hash::U64Map;
use super::host::HostMap;
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
        /// Its pfn (2M aligned for a 2M leaf).
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

/// A leaf SPTE: pfn (2M aligned for a 2M leaf) and write permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Spte {
    pub(super) pfn: u64,
    pub(super) writable: bool,
}

/// The secondary MMU of one VM.
#[derive(Debug, Clone, Default)]
pub struct SecondaryMmu {
    pub(super) slots: Vec<SlotState>,
    pub(super) huge: U64Map<Spte>,
    pub(super) small: U64Map<Spte>,
    small_per_frame: U64Map<u16>,
    tracked: U64Map<u32>,
    seq: u64,
    in_progress: u32,
    range: (u64, u64),
    /// Memslot generation (`kvm_memslots(kvm)->generation`): bumped by every
    /// memslot update (create, delete, flags).
    pub(super) generation: u64,
}

impl SecondaryMmu {
    /// An empty VM: no memslots, no mappings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a memslot (`KVM_SET_USER_MEMORY_REGION`, create).
    pub fn add_slot(&mut self, slot: Memslot) -> Result<(), MirrorError> {
        let state = SlotState::new(slot)?;
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
        self.generation += 1;
        Ok(())
    }

    /// Deletes a memslot, zapping its mappings (`kvm_arch_flush_shadow_memslot`).
    pub fn remove_slot(&mut self, id: u32) -> Result<Memslot, MirrorError> {
        let i = self.slot_index(id)?;
        let s = self.slots.remove(i).slot;
        self.generation += 1;
        self.zap_gfn_range(s.base_gfn, s.end_gfn(), true, true);
        Ok(s)
    }

    /// The memslot generation: bumped by every memslot update
    /// ([`Self::add_slot`], [`Self::remove_slot`], [`Self::set_dirty_logging`]).
    pub fn memslot_generation(&self) -> u64 {
        self.generation
    }

    fn slot_index(&self, id: u32) -> Result<usize, MirrorError> {
        self.slots
            .iter()
            .position(|s| s.slot.id == id)
            .ok_or(MirrorError::UnknownSlot(id))
    }

    /// Turns dirty logging on or off for a slot (a memslot update: the
    /// generation moves). On: 2M leaves in the slot are dropped (as eager
    /// page splitting does), 4K leaves become read-only
    /// (`kvm_mmu_slot_remove_write_access`) and no new 2M leaf is made.
    /// Off: 4K leaves are zapped so faults can map 2M again
    /// (`kvm_mmu_zap_collapsible_sptes`, here without the collapsibility filter).
    pub fn set_dirty_logging(&mut self, id: u32, on: bool) -> Result<(), MirrorError> {
        let i = self.slot_index(id)?;
        let s = &mut self.slots[i].slot;
        s.dirty_logging = on;
        let (a, b) = (s.base_gfn, s.end_gfn());
        self.generation += 1;
        self.zap_gfn_range(a, b, on, !on);
        if on {
            for (g, e) in self.small.iter_mut() {
                if (a..b).contains(g) {
                    e.writable = false;
                }
            }
        }
        Ok(())
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
        self.state_for_gfn(gfn)
            .is_some_and(|s| s.lpage_allowed(gfn))
    }

    /// `kvm_mmu_gfn_disallow_lpage` via write tracking (shadow paging
    /// write-protects guest page-table pages): forbids 2M in `gfn`'s frame
    /// and drops a 2M leaf there.
    pub fn track_write(&mut self, gfn: u64) -> Result<(), MirrorError> {
        let i = self
            .slots
            .iter()
            .position(|s| s.slot.contains(gfn))
            .ok_or(MirrorError::NoSlot { gfn })?;
        let idx = self.slots[i].index(gfn);
        self.slots[i].disallow[idx] += 1;
        *self.tracked.entry(gfn).or_insert(0) += 1;
        let f = gfn / PAGES_PER_HPAGE * PAGES_PER_HPAGE;
        self.zap_gfn_range(f, f + PAGES_PER_HPAGE, true, false);
        Ok(())
    }

    /// `kvm_mmu_gfn_allow_lpage`: undoes one [`Self::track_write`].
    pub fn untrack_write(&mut self, gfn: u64) -> Result<(), MirrorError> {
        match self.tracked.get_mut(&gfn) {
            Some(n) if *n > 0 => {
                *n -= 1;
                if *n == 0 {
                    self.tracked.remove(&gfn);
                }
            }
            _ => return Err(MirrorError::NotTracked { gfn }),
        }
        if let Some(i) = self.slots.iter().position(|s| s.slot.contains(gfn)) {
            let idx = self.slots[i].index(gfn);
            self.slots[i].disallow[idx] -= 1;
        }
        Ok(())
    }

    /// `kvm_mmu_hugepage_adjust` + `kvm_mmu_max_mapping_level` +
    /// `host_pfn_mapping_level`: 2M only if the fault allows it
    /// (`guest_max_level`), dirty logging is off, `lpage_info` allows it and
    /// the host maps the backing with a PMD.
    pub fn max_mapping_level(
        &self,
        gfn: u64,
        host: &dyn HostMap,
        guest_max_level: Level,
    ) -> Result<Level, MirrorError> {
        let s = self.state_for_gfn(gfn).ok_or(MirrorError::NoSlot { gfn })?;
        if guest_max_level == Level::K4 || s.slot.dirty_logging || !s.lpage_allowed(gfn) {
            return Ok(Level::K4);
        }
        Ok(host.host_level(s.slot.gfn_to_hva(gfn)).min(guest_max_level))
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
            seq: self.seq,
            hva: s.gfn_to_hva(gfn),
            pfn: None,
        })
    }

    /// Fault step 2: translate the hva through the host (`hva_to_pfn`).
    pub fn fault_translate(&self, f: &mut PendingFault, host: &dyn HostMap) {
        f.pfn = host.pfn(f.hva);
    }

    /// Fault step 3 (under `mmu_lock`): `mmu_invalidate_retry_gfn` — retry if
    /// an invalidation in progress covers the hva or the sequence moved.
    pub fn fault_must_retry(&self, f: &PendingFault) -> bool {
        (self.in_progress > 0 && f.hva >= self.range.0 && f.hva < self.range.1) || self.seq != f.seq
    }

    /// Fault step 4 (under `mmu_lock`, retry check passed): choose the level
    /// and install the leaf; a 2M leaf maps the pfn aligned down to 2M and
    /// replaces the frame's 4K leaves. The leaf is writable when the host
    /// page is (a read fault maps writable opportunistically).
    pub fn fault_install(
        &mut self,
        f: &PendingFault,
        host: &dyn HostMap,
    ) -> Result<FaultResult, MirrorError> {
        let Some(pfn) = f.pfn else {
            return Ok(FaultResult::NoHostPage);
        };
        let level = self.max_mapping_level(f.gfn, host, f.guest_max_level)?;
        Ok(self.install_leaf(f.gfn, level, pfn, host.writable(f.hva)))
    }

    /// Installs a leaf for `gfn` -> `pfn` at `level` (at most): 2M falls back
    /// to 4K when gfn and pfn are not congruent mod 2M.
    pub(super) fn install_leaf(
        &mut self,
        gfn: u64,
        mut level: Level,
        pfn: u64,
        writable: bool,
    ) -> FaultResult {
        let mask = PAGES_PER_HPAGE - 1;
        if level == Level::M2 && (gfn & mask) != (pfn & mask) {
            log::warn!("gfn {gfn:#x} and pfn {pfn:#x} not congruent mod 2M; mapping 4K");
            level = Level::K4;
        }
        let frame = gfn / PAGES_PER_HPAGE;
        match level {
            Level::M2 => {
                let hpfn = pfn & !mask;
                if let Some(e) = self.huge.get_mut(&frame) {
                    if e.pfn == hpfn {
                        if writable && !e.writable {
                            e.writable = true;
                        }
                        return FaultResult::AlreadyMapped { level };
                    }
                }
                let base = frame * PAGES_PER_HPAGE;
                self.zap_gfn_range(base, base + PAGES_PER_HPAGE, true, true);
                self.huge.insert(
                    frame,
                    Spte {
                        pfn: hpfn,
                        writable,
                    },
                );
                FaultResult::Installed { level, pfn: hpfn }
            }
            Level::K4 => {
                if let Some(&h) = self.huge.get(&frame) {
                    if h.pfn + (gfn & mask) == pfn && (h.writable || !writable) {
                        return FaultResult::AlreadyMapped { level: Level::M2 };
                    }
                    self.huge.remove(&frame);
                }
                let new = Spte { pfn, writable };
                match self.small.insert(gfn, new) {
                    Some(old) if old == new => return FaultResult::AlreadyMapped { level },
                    Some(_) => {}
                    None => *self.small_per_frame.entry(frame).or_insert(0) += 1,
                }
                FaultResult::Installed { level, pfn }
            }
        }
    }

    /// The whole fault path at once (`kvm_tdp_page_fault` / `FNAME(page_fault)`).
    pub fn fault(
        &mut self,
        gfn: u64,
        guest_max_level: Level,
        host: &dyn HostMap,
    ) -> Result<FaultResult, MirrorError> {
        let mut f = self.fault_begin(gfn, guest_max_level)?;
        self.fault_translate(&mut f, host);
        if self.fault_must_retry(&f) {
            return Ok(FaultResult::Retry);
        }
        self.fault_install(&f, host)
    }

    /// `kvm_mmu_notifier_invalidate_range_start`: counts the invalidation in
    /// progress, widens the recorded range and zaps every leaf overlapping
    /// the hva range (a 2M leaf goes whole). Returns the number of leaves zapped.
    pub fn invalidate_range_start(&mut self, hva_start: u64, hva_end: u64) -> usize {
        self.in_progress += 1;
        if self.in_progress == 1 {
            self.range = (hva_start, hva_end);
        } else {
            self.range = (self.range.0.min(hva_start), self.range.1.max(hva_end));
        }
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
        ranges
            .into_iter()
            .map(|(a, b)| self.zap_gfn_range(a, b, true, true))
            .sum()
    }

    /// `kvm_mmu_notifier_invalidate_range_end`: bumps `mmu_invalidate_seq`
    /// and ends one invalidation in progress.
    pub fn invalidate_range_end(
        &mut self,
        _hva_start: u64,
        _hva_end: u64,
    ) -> Result<(), MirrorError> {
        if self.in_progress == 0 {
            return Err(MirrorError::UnbalancedInvalidate);
        }
        self.seq += 1;
        self.in_progress -= 1;
        Ok(())
    }

    /// Zaps leaves overlapping gfns `[g0, g1)`: 2M leaves (whole) if `huge`,
    /// 4K leaves if `small`. Returns leaves zapped.
    fn zap_gfn_range(&mut self, g0: u64, g1: u64, huge: bool, small: bool) -> usize {
        if g0 >= g1 {
            return 0;
        }
        let mut n = 0;
        for frame in g0 / PAGES_PER_HPAGE..=(g1 - 1) / PAGES_PER_HPAGE {
            if huge && self.huge.remove(&frame).is_some() {
                n += 1;
            }
            if !small {
                continue;
            }
            let Some(&count) = self.small_per_frame.get(&frame) else {
                continue;
            };
            let lo = g0.max(frame * PAGES_PER_HPAGE);
            let hi = g1.min((frame + 1) * PAGES_PER_HPAGE);
            let mut left = count;
            for g in lo..hi {
                if left == 0 {
                    break;
                }
                if self.small.remove(&g).is_some() {
                    left -= 1;
                    n += 1;
                }
            }
            if left == 0 {
                self.small_per_frame.remove(&frame);
            } else {
                self.small_per_frame.insert(frame, left);
            }
        }
        n
    }

    /// The leaf mapping `gfn`: (level, pfn of the gfn's page).
    pub fn lookup(&self, gfn: u64) -> Option<(Level, u64)> {
        self.lookup_access(gfn).map(|(l, p, _)| (l, p))
    }

    /// The leaf mapping `gfn`: (level, pfn of the gfn's page, writable).
    pub fn lookup_access(&self, gfn: u64) -> Option<(Level, u64, bool)> {
        let frame = gfn / PAGES_PER_HPAGE;
        if let Some(&h) = self.huge.get(&frame) {
            return Some((Level::M2, h.pfn + gfn % PAGES_PER_HPAGE, h.writable));
        }
        self.small
            .get(&gfn)
            .map(|&p| (Level::K4, p.pfn, p.writable))
    }

    /// Every leaf as (first gfn, level, pfn).
    pub fn entries(&self) -> impl Iterator<Item = (u64, Level, u64)> + '_ {
        self.entries_access().map(|(g, l, p, _)| (g, l, p))
    }

    /// Every leaf as (first gfn, level, pfn, writable).
    pub fn entries_access(&self) -> impl Iterator<Item = (u64, Level, u64, bool)> + '_ {
        self.huge
            .iter()
            .map(|(&f, &p)| (f * PAGES_PER_HPAGE, Level::M2, p.pfn, p.writable))
            .chain(
                self.small
                    .iter()
                    .map(|(&g, &p)| (g, Level::K4, p.pfn, p.writable)),
            )
    }

    /// KVM's `pages_4k`: present 4K leaves.
    pub fn pages_4k(&self) -> u64 {
        self.small.len() as u64
    }

    /// KVM's `pages_2m`: present 2M leaves (one per 2M leaf).
    pub fn pages_2m(&self) -> u64 {
        self.huge.len() as u64
    }

    /// `mmu_invalidate_seq`.
    pub fn mmu_invalidate_seq(&self) -> u64 {
        self.seq
    }

    /// `mmu_invalidate_in_progress`.
    pub fn invalidate_in_progress(&self) -> u32 {
        self.in_progress
    }

    /// Drops every leaf (e.g. `kvm_mmu_zap_all`).
    pub fn zap_all(&mut self) {
        self.huge.clear();
        self.small.clear();
        self.small_per_frame.clear();
    }
}
