//! Reverse-map bookkeeping: taking and dropping mappings and references,
//! freeing folios, queueing partially mapped folios for deferred split.

use super::{FrameMap, MmError, MmId, PageTable, Pmd, Primary, Pte};
use crate::folio::{Backing, Folio, FolioId};

impl Primary {
    /// Allocates a small (4K, small-pool) folio at `frame` with refcount 0.
    pub(crate) fn alloc_small(&mut self, frame: usize) -> Result<FolioId, MmError> {
        let slot = self.small.alloc().ok_or(MmError::OutOfMemory {
            needed: 1,
            available: 0,
        })?;
        Ok(self.folios.insert(Folio::new(Backing::Small(slot), frame)))
    }

    /// Allocates a small folio at `frame` on small slot `slot` (see
    /// [`crate::pool::SmallPool::alloc_at`]).
    pub(crate) fn alloc_small_at(&mut self, frame: usize, slot: u32) -> Result<FolioId, MmError> {
        let slot = self.small.alloc_at(slot).ok_or(MmError::OutOfMemory {
            needed: 1,
            available: 0,
        })?;
        Ok(self.folios.insert(Folio::new(Backing::Small(slot), frame)))
    }

    /// Allocates a huge folio at `frame` with refcount 0, `None` if the pool is empty.
    pub(crate) fn alloc_huge(&mut self, frame: usize) -> Option<FolioId> {
        let slot = self.huge.alloc()?;
        Some(self.folios.insert(Folio::new(Backing::Huge(slot), frame)))
    }

    /// Allocates a huge folio at `frame` on huge slot `slot` (see
    /// [`crate::pool::HugePool::alloc_at`]), `None` if that slot is taken.
    pub(crate) fn alloc_huge_at(&mut self, frame: usize, slot: u32) -> Option<FolioId> {
        let slot = self.huge.alloc_at(slot)?;
        Some(self.folios.insert(Folio::new(Backing::Huge(slot), frame)))
    }

    /// Drops one reference; frees the folio when none is left.
    pub(crate) fn put_ref(&mut self, id: FolioId) -> Result<(), MmError> {
        let f = self.folios.get_mut(id).ok_or(MmError::NoSuchFolio(id))?;
        f.refcount -= 1;
        if f.refcount == 0 {
            self.free_folio(id)?;
        }
        Ok(())
    }

    fn free_folio(&mut self, id: FolioId) -> Result<(), MmError> {
        let f = self.folios.remove(id).ok_or(MmError::NoSuchFolio(id))?;
        debug_assert!(!f.is_mapped() && f.pincount == 0 && f.held == 0);
        if f.on_deferred_split {
            self.set_deferred(id, false);
        }
        match f.backing {
            Backing::Huge(s) => self.huge.free(s)?,
            Backing::Small(s) => self.small.free(s)?,
            Backing::HugePart { slot, .. } => {
                let n = self.parts_live[slot as usize] - 1;
                self.set_parts_live(slot, n);
                if n == 0 {
                    self.huge.free(slot)?;
                }
            }
        }
        if let Some(log) = self.freed_log.as_mut() {
            log.push(f.backing);
        }
        Ok(())
    }

    /// `deferred_split_folio` (mm/huge_memory.c, Linux 6.18): queues a large
    /// folio. `partially_mapped` (part of it got unmapped) sets the sticky
    /// `partially_mapped` flag and counts `thp_deferred_split_page` once;
    /// since 6.12 every new PMD-mapped anonymous THP is queued too (not
    /// partially mapped) so the shrinker can split it when underused.
    pub(crate) fn deferred_split_folio(&mut self, id: FolioId, partially_mapped: bool) {
        if let Some(f) = self.folios.get_mut(id) {
            if !f.is_large() || !f.anon {
                return;
            }
            if partially_mapped && !f.partially_mapped_flag {
                f.partially_mapped_flag = true;
                self.stat.thp_deferred_split_page += 1;
            }
            if !f.on_deferred_split {
                f.on_deferred_split = true;
                self.set_deferred(id, true);
            }
        }
    }

    /// After an unmap: a large folio that is now partially mapped is queued
    /// (`__folio_remove_rmap` → `deferred_split_folio(folio, true)`).
    fn maybe_defer(&mut self, id: FolioId) {
        if self.folios.get(id).is_some_and(|f| f.partially_mapped()) {
            self.deferred_split_folio(id, true);
        }
    }

    /// Adds a PTE mapping of page `idx` of `id` by `mm` (`folio_add_*_rmap_pte` + ref).
    pub(crate) fn rmap_add_pte(&mut self, id: FolioId, idx: u16, mm: MmId) {
        if let Some(f) = self.folios.get_mut(id) {
            f.add_pte_mapping(idx as usize);
            f.refcount += 1;
            let total = f.total_mapcount();
            f.folio_add_return_large_mapcount(1, mm, total);
        }
    }

    /// Removes a PTE mapping of `mm` and its reference (`folio_remove_rmap_pte` + put).
    pub(crate) fn rmap_remove_pte(
        &mut self,
        id: FolioId,
        idx: u16,
        mm: MmId,
    ) -> Result<(), MmError> {
        let f = self.folios.get_mut(id).ok_or(MmError::NoSuchFolio(id))?;
        f.remove_pte_mapping(idx as usize);
        let total = f.total_mapcount();
        f.folio_sub_return_large_mapcount(1, mm, total);
        self.maybe_defer(id);
        self.put_ref(id)
    }

    /// Removes a PMD mapping of `mm` and its reference (`folio_remove_rmap_pmd` + put).
    pub(crate) fn rmap_remove_pmd(&mut self, id: FolioId, mm: MmId) -> Result<(), MmError> {
        let f = self.folios.get_mut(id).ok_or(MmError::NoSuchFolio(id))?;
        f.entire_mapcount -= 1;
        let total = f.total_mapcount();
        f.folio_sub_return_large_mapcount(1, mm, total);
        self.maybe_defer(id);
        self.put_ref(id)
    }

    /// Installs a new PTE for `folio`'s page `idx` at `page` of `mm` (the slot must be none).
    pub(crate) fn install_pte(
        &mut self,
        mm: MmId,
        page: u64,
        folio: FolioId,
        idx: u16,
        writable: bool,
    ) -> Result<(), MmError> {
        let pfn = self.folio(folio)?.pfn(idx as usize);
        let shmem = self.mm(mm)?.is_shmem();
        if let Some(f) = self.folios.get_mut(folio) {
            f.anon &= !shmem;
        }
        self.rmap_add_pte(folio, idx, mm);
        let (f, i) = split_page(page);
        let slot = self.frame_mut(mm, f)?;
        if matches!(slot, FrameMap::None) {
            *slot = FrameMap::Table(Box::new(PageTable::new()));
        }
        if let FrameMap::Table(t) = slot {
            t.set(
                i,
                Some(Pte {
                    folio,
                    idx,
                    pfn,
                    writable,
                }),
            );
        }
        Ok(())
    }

    /// Clears the PTE at `page` of `mm` (frame must be a table) and drops its mapping.
    pub(crate) fn clear_pte(&mut self, mm: MmId, page: u64) -> Result<Option<Pte>, MmError> {
        let (f, i) = split_page(page);
        let old = match self.frame_mut(mm, f)? {
            FrameMap::Table(t) => t.set(i, None),
            _ => None,
        };
        if let Some(p) = old {
            self.rmap_remove_pte(p.folio, p.idx, mm)?;
        }
        Ok(old)
    }

    /// Maps huge folio `id` with a PMD at `frame` of `mm`.
    pub(crate) fn install_pmd(
        &mut self,
        mm: MmId,
        frame: usize,
        id: FolioId,
        writable: bool,
    ) -> Result<(), MmError> {
        let shmem = self.mm(mm)?.is_shmem();
        let f = self.folios.get_mut(id).ok_or(MmError::NoSuchFolio(id))?;
        f.anon &= !shmem;
        f.entire_mapcount += 1;
        f.refcount += 1;
        let total = f.total_mapcount();
        f.folio_add_return_large_mapcount(1, mm, total);
        let pfn = f.pfn(0);
        *self.frame_mut(mm, frame)? = FrameMap::Pmd(Pmd {
            folio: id,
            pfn,
            writable,
        });
        Ok(())
    }
}

/// (frame, page index in frame) of a VMA page.
pub(crate) fn split_page(page: u64) -> (usize, usize) {
    (
        (page / crate::units::PAGES_PER_HPAGE) as usize,
        (page % crate::units::PAGES_PER_HPAGE) as usize,
    )
}
