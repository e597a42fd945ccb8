//! Unmapping (`zap_page_range` / `MADV_DONTNEED`) and `split_huge_pmd`.

use super::rmap::split_page;
use super::{FrameMap, MmError, MmId, PageTable, Primary, Pte};
use crate::units::{PAGES_PER_HPAGE, PAGES_PER_HPAGE_USIZE};

impl Primary {
    /// `split_huge_pmd`: replaces the PMD at `frame` of `mm` by 512 PTEs
    /// mapping the same folio. Never fails on a PMD; no-op otherwise.
    /// Returns whether a PMD was split.
    pub fn split_huge_pmd(&mut self, mm: MmId, frame: usize) -> Result<bool, MmError> {
        let pages = self.mm(mm)?.pages();
        if frame as u64 * PAGES_PER_HPAGE >= pages {
            return Err(MmError::OutOfRange {
                first: frame as u64 * PAGES_PER_HPAGE,
                npages: PAGES_PER_HPAGE,
                pages,
            });
        }
        let slot = self.frame_mut(mm, frame)?;
        let FrameMap::Pmd(pmd) = *slot else {
            return Ok(false);
        };
        let mut t = PageTable::new();
        for i in 0..PAGES_PER_HPAGE_USIZE {
            t.set(
                i,
                Some(Pte {
                    folio: pmd.folio,
                    idx: i as u16,
                    pfn: pmd.pfn + i as u64,
                    writable: pmd.writable,
                }),
            );
        }
        *slot = FrameMap::Table(Box::new(t));
        let f = self
            .folios
            .get_mut(pmd.folio)
            .ok_or(MmError::NoSuchFolio(pmd.folio))?;
        // The PMD's mapping and reference become 512 PTE mappings and
        // references (`folio_add_anon_rmap_ptes`, then `folio_remove_rmap_pmd`).
        let before = f.total_mapcount();
        for idx in 0..f.nr_pages() {
            f.add_pte_mapping(idx);
        }
        f.folio_add_return_large_mapcount(PAGES_PER_HPAGE as u32, mm, before + 512);
        f.entire_mapcount -= 1;
        f.folio_sub_return_large_mapcount(1, mm, before + 511);
        f.refcount += PAGES_PER_HPAGE as u32 - 1;
        self.stat.thp_split_pmd += 1;
        Ok(true)
    }

    /// Unmaps pages `[first, first + npages)` of `mm`. A range covering a whole
    /// PMD-mapped frame zaps the PMD; a partial range splits it first
    /// (`split_huge_pmd`, never fails). Page tables stay allocated.
    pub fn unmap(&mut self, mm: MmId, first: u64, npages: u64) -> Result<(), MmError> {
        self.check_range(mm, first, npages)?;
        let end = first + npages;
        let mut page = first;
        while page < end {
            let (f, i) = split_page(page);
            let frame_end = (f as u64 + 1) * PAGES_PER_HPAGE;
            let stop = end.min(frame_end);
            let whole = i == 0 && stop == frame_end;
            match &self.mm(mm)?.frames[f] {
                FrameMap::None => {}
                FrameMap::Pmd(pmd) if whole => {
                    let id = pmd.folio;
                    *self.frame_mut(mm, f)? = FrameMap::None;
                    self.rmap_remove_pmd(id, mm)?;
                }
                FrameMap::Pmd(_) => {
                    self.split_huge_pmd(mm, f)?;
                    for p in page..stop {
                        self.clear_pte(mm, p)?;
                    }
                }
                FrameMap::Table(_) => {
                    for p in page..stop {
                        self.clear_pte(mm, p)?;
                    }
                }
            }
            page = stop;
        }
        Ok(())
    }

    /// Frees the page table of `frame` if it maps nothing (`free_pte_range`);
    /// returns whether it was freed.
    pub fn free_empty_table(&mut self, mm: MmId, frame: usize) -> Result<bool, MmError> {
        match self.mm(mm)?.frames.get(frame) {
            Some(FrameMap::Table(t)) if t.present() == 0 => {
                *self.frame_mut(mm, frame)? = FrameMap::None;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
