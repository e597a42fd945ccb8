//! The collapse reserve (`hugetlb`): huge slots of the pool set aside in the
//! model ([`thp::ram_model::RamModel::prepare_warm_huge`]) whose page the
//! host allocates ahead, so that a collapse onto one skips taking a huge
//! page from the host (the kernel zeroes all 2 MiB of it there: ~0.2 ms of a
//! collapse on this host) and mapping it for the copy. The split reserve's
//! worker keeps them, one per frame mapped by small pages at most (only
//! those can be collapsed), allocating each without the RAM lock:
//!
//! 1. under the lock, [`GuestRam::huge_page_to_prepare`]: the model sets
//!    the slot aside (the next huge allocation takes it) and hands out a
//!    handle on the pool memfd;
//! 2. without the lock, [`HugePagePrep::allocate`]: `fallocate` of the slot
//!    and a mapping of it, faulted in (a collapse meanwhile may take the
//!    slot and fill it: `fallocate` never changes a page that exists, and
//!    the fault-in of a page that exists keeps its bytes);
//! 3. under the lock, [`GuestRam::huge_page_allocated`]: the slot is warm
//!    if it is still set aside; else, if no frame uses it (a collapse took
//!    it and a split freed it meanwhile), its page is punched again, so the
//!    pool memfd holds exactly what the books say.
//!
//! Warm pages are the only pool pages no frame uses:
//! [`crate::PoolStats::collapse_reserve_bytes`] counts them.

use crate::error::GuestMemError;
use crate::guest_ram::GuestRam;
use crate::mapping::TempMap;
use crate::memfd::Memfd;
use crate::{Backing, HPAGE_SIZE};

/// A huge slot set aside whose page is to be allocated (step 2).
#[derive(Debug)]
pub struct HugePagePrep {
    slot: u32,
    file: Memfd,
}

impl HugePagePrep {
    /// The pool slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Allocates the slot's huge page (`fallocate`: the kernel zeroes it)
    /// and maps it, faulted in writable; call it without the RAM lock.
    pub fn allocate(&self) -> Result<WarmHugePage, GuestMemError> {
        let offset = u64::from(self.slot) * HPAGE_SIZE;
        self.file
            .allocate(offset, HPAGE_SIZE)
            .map_err(|source| GuestMemError::Fallocate {
                what: "hugetlb memfd, allocate a huge page ahead of a collapse",
                offset,
                len: HPAGE_SIZE,
                source,
            })?;
        let map = TempMap::new(&self.file, offset, HPAGE_SIZE, "warm huge page map")?;
        map.populate_in_chunks(HPAGE_SIZE as usize)?;
        Ok(WarmHugePage { map })
    }
}

/// A huge page allocated and mapped (step 2's outcome).
#[derive(Debug)]
pub struct WarmHugePage {
    map: TempMap,
}

impl GuestRam {
    /// How many warm huge pages `pages` asks for now: at most one per
    /// frame mapped by small pages; none on other backings (`thp`
    /// collapses in the kernel; `hugetlb-1g` places its 2M frames in runs
    /// of the pool a set-aside slot would break).
    fn warm_huge_wanted(&self, pages: usize) -> usize {
        if self.backing != Backing::Hugetlb {
            return 0;
        }
        self.model.warm_huge_wanted(pages)
    }

    /// Step 1: the next huge slot to allocate ahead, when fewer than
    /// wanted are warm (`pages` asked for, see [`Self::warm_huge_wanted`]).
    pub fn huge_page_to_prepare(
        &mut self,
        pages: usize,
    ) -> Result<Option<HugePagePrep>, GuestMemError> {
        if self.model.warm_huge_count() >= self.warm_huge_wanted(pages) {
            return Ok(None);
        }
        let Some(slot) = self.model.prepare_warm_huge() else {
            return Ok(None);
        };
        match self.host.pool_file() {
            Ok(file) => Ok(Some(HugePagePrep { slot, file })),
            Err(e) => {
                self.model.release_warm_huge(slot);
                Err(e)
            }
        }
    }

    /// Step 3: `allocated` is step 2's outcome. `Ok(true)` when the page
    /// is ready for a collapse; a failed allocation gives the slot back to
    /// the free list (its page punched) and returns the error.
    pub fn huge_page_allocated(
        &mut self,
        prep: HugePagePrep,
        allocated: Result<WarmHugePage, GuestMemError>,
    ) -> Result<bool, GuestMemError> {
        let slot = prep.slot;
        let still_aside = self.model.warm_huge_prepared(slot);
        let allocated = match allocated {
            Ok(warm) if still_aside => {
                self.host.mark_huge_warm(slot, warm.map);
                return Ok(true);
            }
            Ok(warm) => {
                self.host.retire_staging(warm.map);
                Ok(())
            }
            Err(e) => Err(e),
        };
        if still_aside {
            self.model.release_warm_huge(slot);
        }
        if !self.model.huge_slot_used(slot) {
            self.host.huge_free(slot)?;
        }
        allocated.map(|()| false)
    }

    /// After a collapse that failed (its model changes rolled back): a warm
    /// slot it took is warm again in the books, but the host punched its
    /// page: it leaves the reserve (punched again, should a step have
    /// failed before), so the books count only pages that are warm and the
    /// worker allocates a new one.
    pub(crate) fn after_failed_collapse(&mut self, slot: u32) {
        if self.model.warm_huge_prepared(slot) && !self.host.huge_is_warm(slot) {
            if let Err(e) = self.drop_warm_huge(slot) {
                log::warn!("huge slot {slot}: punching it after a failed collapse: {e}");
            }
        }
    }

    /// Warm `slot` leaves the reserve: back to the free list in the books,
    /// its mapping (if any) to be unmapped off-path, its page punched.
    fn drop_warm_huge(&mut self, slot: u32) -> Result<(), GuestMemError> {
        self.model.release_warm_huge(slot);
        if let Some(map) = self.host.take_warm_huge(slot) {
            self.host.retire_staging(map);
        }
        self.host.huge_free(slot)
    }

    /// Gives back warm huge pages beyond what `pages` asks for now (the
    /// split frames were collapsed or freed): each slot goes back to the
    /// free list and its page to the host. Returns how many.
    pub fn release_surplus_warm_huge(&mut self, pages: usize) -> Result<usize, GuestMemError> {
        let wanted = self.warm_huge_wanted(pages);
        let mut n = 0;
        while self.model.warm_huge_count() > wanted {
            let Some(slot) = self.model.oldest_warm_huge() else {
                break;
            };
            self.drop_warm_huge(slot)?;
            n += 1;
        }
        Ok(n)
    }

    /// Steps 1-3 in a row, under `&mut self`, until `pages` are warm or no
    /// more are wanted (tests, benches). Returns the pages allocated.
    pub fn prepare_warm_huge_pages(&mut self, pages: usize) -> Result<usize, GuestMemError> {
        self.release_surplus_warm_huge(pages)?;
        let mut n = 0;
        while let Some(prep) = self.huge_page_to_prepare(pages)? {
            let r = prep.allocate();
            if self.huge_page_allocated(prep, r)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Huge pages allocated ahead now.
    pub fn warm_huge_pages(&self) -> usize {
        self.host.warm_huge_pages()
    }
}
