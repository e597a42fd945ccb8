//! Page faults: anonymous fault-in (huge when policy and pool allow, THP-style
//! fallback otherwise) and write-protect faults (reuse or copy-on-write).

use super::rmap::split_page;
use super::{FrameMap, MmError, MmId, Primary};
use crate::folio::FolioId;
use crate::policy::EmptyPoolAction;
use crate::units::{Level, PAGES_PER_HPAGE};

/// What a fault did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The page was already mapped with the needed permission.
    AlreadyMapped,
    /// A huge folio was allocated and PMD-mapped.
    MappedHuge(FolioId),
    /// A small folio was allocated and PTE-mapped (`fallback`: a huge page was
    /// wanted but the pool was empty).
    MappedSmall {
        /// The new folio.
        folio: FolioId,
        /// Whether this was a THP fallback.
        fallback: bool,
    },
    /// Write fault on an exclusive page: made writable in place.
    Reused,
    /// Write fault on a shared page: copied into a new small folio.
    Copied(FolioId),
}

impl Primary {
    /// Handles a fault at VMA page `page` of `mm` (`handle_mm_fault`).
    /// On error nothing changed.
    pub fn fault(&mut self, mm: MmId, page: u64, write: bool) -> Result<FaultOutcome, MmError> {
        self.fault_inner(mm, page, write, true)
    }

    /// Like [`Self::fault`] but never allocates a huge folio (as in a
    /// `VM_NOHUGEPAGE` region): a none page always gets a small folio.
    pub fn fault_nohuge(
        &mut self,
        mm: MmId,
        page: u64,
        write: bool,
    ) -> Result<FaultOutcome, MmError> {
        self.fault_inner(mm, page, write, false)
    }

    fn fault_inner(
        &mut self,
        mm: MmId,
        page: u64,
        write: bool,
        allow_huge: bool,
    ) -> Result<FaultOutcome, MmError> {
        self.check_range(mm, page, 1)?;
        let (f, _) = split_page(page);
        let m = self.mm(mm)?;
        let madvised = m.madvised;
        if write && m.write_protected(f) {
            return Err(MmError::WriteProtected { page });
        }
        match m.lookup(page) {
            Some((_, _, _, writable)) if writable || !write => Ok(FaultOutcome::AlreadyMapped),
            Some((Level::M2 | Level::G1, _, id, _)) => self.wp_fault_pmd(mm, page, id),
            Some((Level::K4, _, id, _)) => self.wp_fault_pte(mm, page, id),
            None => {
                if allow_huge
                    && matches!(m.frames[f], FrameMap::None)
                    && self.policy.fault_may_use_huge(madvised)
                {
                    if let Some(id) = self.alloc_huge_for_fault(f, madvised) {
                        self.install_pmd(mm, f, id, true)?;
                        // 6.12+: every new PMD THP goes on the deferred-split queue.
                        self.deferred_split_folio(id, false);
                        self.stat.thp_fault_alloc += 1;
                        return Ok(FaultOutcome::MappedHuge(id));
                    }
                    let id = self.alloc_small(f)?;
                    self.stat.thp_fault_fallback += 1;
                    self.install_pte(mm, page, id, 0, true)?;
                    return Ok(FaultOutcome::MappedSmall {
                        folio: id,
                        fallback: true,
                    });
                }
                let id = self.alloc_small(f)?;
                self.install_pte(mm, page, id, 0, true)?;
                Ok(FaultOutcome::MappedSmall {
                    folio: id,
                    fallback: false,
                })
            }
        }
    }

    /// A huge fault of the none `frame` of `mm` on huge slot `slot` (a 1G
    /// split placing its frames on a block of the pool): as [`Self::fault`]
    /// maps a fresh huge folio, counted in `thp_fault_alloc`. On error
    /// (frame mapped, slot taken, injected failure) nothing changed.
    pub fn fault_huge_at(&mut self, mm: MmId, frame: usize, slot: u32) -> Result<FolioId, MmError> {
        let page = frame as u64 * PAGES_PER_HPAGE;
        self.check_range(mm, page, PAGES_PER_HPAGE)?;
        if !matches!(self.mm(mm)?.frames[frame], FrameMap::None) {
            return Err(MmError::AlreadyMapped { page });
        }
        let id = self
            .alloc_huge_at(frame, slot)
            .ok_or(MmError::OutOfMemory {
                needed: 1,
                available: 0,
            })?;
        self.install_pmd(mm, frame, id, true)?;
        self.deferred_split_folio(id, false);
        self.stat.thp_fault_alloc += 1;
        Ok(id)
    }

    fn alloc_huge_for_fault(&mut self, frame: usize, madvised: bool) -> Option<FolioId> {
        if let Some(id) = self.alloc_huge(frame) {
            return Some(id);
        }
        match self.policy.on_pool_empty(madvised) {
            EmptyPoolAction::ReclaimThenRetry => {
                // Direct reclaim: the deferred-split shrinker may free whole slots.
                self.shrink_deferred_split();
                self.alloc_huge(frame)
            }
            EmptyPoolAction::FallbackSmall | EmptyPoolAction::DeferToKhugepaged => None,
        }
    }

    /// `do_huge_pmd_wp_page`: reuse an exclusive huge folio, else split the
    /// PMD and copy just the faulting page.
    fn wp_fault_pmd(&mut self, mm: MmId, page: u64, id: FolioId) -> Result<FaultOutcome, MmError> {
        let f = self.folio(id)?;
        if f.refcount == 1 && f.entire_mapcount == 1 && f.total_mapcount() == 1 {
            let (fr, _) = split_page(page);
            if let FrameMap::Pmd(p) = self.frame_mut(mm, fr)? {
                p.writable = true;
            }
            return Ok(FaultOutcome::Reused);
        }
        // Check the copy can be allocated before splitting so errors change nothing.
        if self.small.available() == 0 {
            return Err(MmError::OutOfMemory {
                needed: 1,
                available: 0,
            });
        }
        self.split_huge_pmd(mm, (page / PAGES_PER_HPAGE) as usize)?;
        self.wp_fault_pte(mm, page, id)
    }

    /// `do_wp_page`: reuse an exclusive small folio, else copy the page.
    fn wp_fault_pte(&mut self, mm: MmId, page: u64, id: FolioId) -> Result<FaultOutcome, MmError> {
        let f = self.folio(id)?;
        let (fr, i) = split_page(page);
        if !f.is_large() && f.refcount == 1 && f.total_mapcount() == 1 {
            if let FrameMap::Table(t) = self.frame_mut(mm, fr)? {
                if let Some(mut p) = t.get(i) {
                    p.writable = true;
                    t.set(i, Some(p));
                }
            }
            return Ok(FaultOutcome::Reused);
        }
        let new = self.alloc_small(fr)?;
        self.clear_pte(mm, page)?;
        self.install_pte(mm, page, new, 0, true)?;
        self.stat.cow_copies += 1;
        Ok(FaultOutcome::Copied(new))
    }
}
