//! `split_folio` (turn a huge folio into 512 small ones in place) and the
//! deferred-split queue's shrinker (`deferred_split_scan`), which splits
//! partially mapped folios so their unmapped pages are freed.

use super::{FrameMap, MmError, MmId, Primary};
use crate::folio::{Backing, Folio, FolioId};
use crate::units::{PAGES_PER_HPAGE, PAGES_PER_HPAGE_USIZE};

/// What one run of the deferred-split shrinker did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShrinkReport {
    /// Folios split.
    pub split: u32,
    /// 4K pages freed (unmapped pages of split folios).
    pub freed_pages: u64,
    /// Folios left queued because they are pinned or referenced.
    pub busy: u32,
    /// Folios dropped from the queue because they are no longer partially mapped.
    pub dequeued: u32,
}

impl Primary {
    /// Splits huge folio `id` into 512 order-0 folios over the same memory;
    /// PMD mappings of it are split first, unmapped pages are freed.
    /// Returns the number of pages freed. Fails with [`MmError::Busy`] while
    /// the folio is pinned or has extra references, changing nothing.
    pub fn split_folio(&mut self, id: FolioId) -> Result<u64, MmError> {
        let f = self.folio(id)?;
        if !f.is_large() {
            return Err(MmError::NotLarge(id));
        }
        if f.pincount > 0 || f.held > 0 {
            let (pins, held) = (f.pincount, f.held);
            self.stat.thp_split_page_failed += 1;
            return Err(MmError::Busy {
                folio: id,
                pins,
                held,
            });
        }
        let frame = f.frame;
        let Backing::Huge(slot) = f.backing else {
            return Err(MmError::NotLarge(id));
        };
        // unmap_folio: every PMD mapping becomes PTEs.
        for mm in self.mm_ids() {
            if matches!(&self.mm(mm)?.frames[frame], FrameMap::Pmd(p) if p.folio == id) {
                self.split_huge_pmd(mm, frame)?;
            }
        }
        let Some(old) = self.folios.remove(id) else {
            return Err(MmError::NoSuchFolio(id));
        };
        if old.on_deferred_split {
            self.set_deferred(id, false);
        }
        let mut new_ids = vec![None; PAGES_PER_HPAGE_USIZE];
        let mut freed = 0u64;
        let mut parts = 0u16;
        for (i, slot_id) in new_ids.iter_mut().enumerate() {
            let mc = old.pte_mapcounts()[i];
            let backing = Backing::HugePart {
                slot,
                idx: i as u16,
            };
            if mc == 0 {
                freed += 1;
                if let Some(log) = self.freed_log.as_mut() {
                    log.push(backing);
                }
                continue;
            }
            let mut nf = Folio::new(backing, frame);
            nf.add_pte_mappings(0, mc);
            nf.refcount = mc;
            *slot_id = Some(self.folios.insert(nf));
            parts += 1;
        }
        self.set_parts_live(slot, parts);
        if parts == 0 {
            self.huge.free(slot)?;
        }
        for mm in self.mm_ids() {
            if let FrameMap::Table(t) = self.frame_mut(mm, frame)? {
                for i in 0..PAGES_PER_HPAGE_USIZE {
                    if let Some(mut p) = t.get(i) {
                        if p.folio == id {
                            if let Some(n) = new_ids[p.idx as usize] {
                                p.folio = n;
                                p.idx = 0;
                                t.set(i, Some(p));
                            }
                        }
                    }
                }
            }
        }
        self.stat.thp_split_page += 1;
        Ok(freed)
    }

    /// Replaces every PTE of `frame` in `mm` that maps a page of a huge folio
    /// by a copy in a new small folio (migration of a THP into base pages, the
    /// VMM's split-by-copy); a PMD-mapped frame is split (`split_huge_pmd`) first. Returns (page index, new small slot) per copy.
    /// Fails with [`MmError::Busy`] if such a folio is pinned or referenced and
    /// with [`MmError::OutOfMemory`] if the small pool is short; then nothing changed.
    pub fn migrate_frame_to_small(
        &mut self,
        mm: MmId,
        frame: usize,
    ) -> Result<Vec<(u16, u32)>, MmError> {
        if let FrameMap::Pmd(pmd) = &self.mm(mm)?.frames[frame] {
            let f = self.folio(pmd.folio)?;
            if f.pincount > 0 || f.held > 0 {
                return Err(MmError::Busy {
                    folio: pmd.folio,
                    pins: f.pincount,
                    held: f.held,
                });
            }
            let available = self.small.available();
            if available < PAGES_PER_HPAGE_USIZE {
                return Err(MmError::OutOfMemory {
                    needed: PAGES_PER_HPAGE_USIZE,
                    available,
                });
            }
            self.split_huge_pmd(mm, frame)?;
        }
        let FrameMap::Table(t) = self.mm(mm)?.frames[frame].clone() else {
            return Ok(Vec::new());
        };
        let mut todo = Vec::new();
        for (i, p) in t.iter() {
            let f = self.folio(p.folio)?;
            if f.is_large() {
                if f.pincount > 0 || f.held > 0 {
                    return Err(MmError::Busy {
                        folio: p.folio,
                        pins: f.pincount,
                        held: f.held,
                    });
                }
                todo.push((i, p));
            }
        }
        let available = self.small.available();
        if todo.len() > available {
            return Err(MmError::OutOfMemory {
                needed: todo.len(),
                available,
            });
        }
        let first = frame as u64 * PAGES_PER_HPAGE;
        // Page `i` goes to small slot `base + i`: the frame's small pages
        // then lie in the small memfd in page order, so the host replaces
        // the huge mapping with one mapping of them (atomically, no pause).
        let base = self.small.free_block(PAGES_PER_HPAGE_USIZE);
        let mut out = Vec::with_capacity(todo.len());
        for (i, p) in todo.iter().copied() {
            let new = self.alloc_small_at(frame, base + i as u32)?;
            let slot = match self.folio(new)?.backing {
                Backing::Small(s) => s,
                _ => 0,
            };
            self.clear_pte(mm, first + i as u64)?;
            self.install_pte(mm, first + i as u64, new, 0, p.writable)?;
            out.push((i as u16, slot));
        }
        if !todo.is_empty() {
            self.stat.thp_split_page += 1;
        }
        Ok(out)
    }

    /// `thp_underused` (mm/huge_memory.c): more zero-filled pages than
    /// `max_ptes_none`. Page contents are not modelled: false, which is the
    /// kernel's answer too with the default `max_ptes_none` = 511.
    fn thp_underused(&self, _id: FolioId) -> bool {
        false
    }

    /// `deferred_split_scan` (mm/huge_memory.c, Linux 6.18) over the whole
    /// queue: a folio not partially mapped and not underused leaves the
    /// queue; a partially mapped one is split (`split_folio`), or stays
    /// queued when that fails (pinned).
    pub fn shrink_deferred_split(&mut self) -> ShrinkReport {
        let mut r = ShrinkReport::default();
        let queued: Vec<FolioId> = self.deferred.iter().copied().collect();
        for id in queued {
            let partial = self.folios.get(id).is_some_and(|f| f.partially_mapped_flag);
            if !partial && !self.thp_underused(id) {
                self.set_deferred(id, false);
                if let Some(f) = self.folios.get_mut(id) {
                    f.on_deferred_split = false;
                }
                r.dequeued += 1;
                continue;
            }
            match self.split_folio(id) {
                Ok(freed) => {
                    r.split += 1;
                    r.freed_pages += freed;
                }
                Err(_) => r.busy += 1,
            }
        }
        r
    }
}
