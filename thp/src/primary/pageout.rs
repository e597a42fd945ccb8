//! `MADV_PAGEOUT` of a frame: reclaim unmaps what it can page out.

use super::{FrameMap, MmError, MmId, Primary};
use crate::units::PAGES_PER_HPAGE;

impl Primary {
    /// `MADV_PAGEOUT` of `frame` of `mm` (`madvise_cold_or_pageout_pte_range`,
    /// then `reclaim_pages`): every page whose folio is neither pinned
    /// (`try_to_unmap` refuses `folio_maybe_dma_pinned`) nor mapped shared
    /// (`folio_maybe_mapped_shared`) is unmapped; a PMD-mapped folio goes as
    /// a whole. The contents live on in swap / the page cache (not modelled):
    /// the next fault maps a fresh folio, possibly at a new pfn. Callers wrap
    /// this in an mmu-notifier invalidation. Returns the pages unmapped.
    pub fn pageout(&mut self, mm: MmId, frame: usize) -> Result<u64, MmError> {
        let first = frame as u64 * PAGES_PER_HPAGE;
        self.check_range(mm, first, PAGES_PER_HPAGE)?;
        let skip = |p: &Primary, id| {
            p.folio(id)
                .map(|f| f.maybe_dma_pinned() || f.folio_maybe_mapped_shared())
        };
        match self.mm(mm)?.frame(frame).clone() {
            FrameMap::None => Ok(0),
            FrameMap::Pmd(pmd) => {
                if skip(self, pmd.folio)? {
                    return Ok(0);
                }
                self.unmap(mm, first, PAGES_PER_HPAGE)?;
                Ok(PAGES_PER_HPAGE)
            }
            FrameMap::Table(t) => {
                let mut n = 0;
                for (i, pte) in t.iter() {
                    if !skip(self, pte.folio)? {
                        self.clear_pte(mm, first + i as u64)?;
                        n += 1;
                    }
                }
                Ok(n)
            }
        }
    }
}
