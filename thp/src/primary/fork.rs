//! Fork (`copy_page_range`): the child shares every folio, both sides lose
//! write permission (COW); pinned folios are copied eagerly for the child
//! (`folio_needs_cow_for_dma`), splitting a pinned PMD first as
//! `copy_huge_pmd` does.

use super::{FrameMap, MmError, MmId, Primary};
use crate::units::{PAGES_PER_HPAGE, PAGES_PER_HPAGE_USIZE};

impl Primary {
    /// Forks `parent`: returns a child address space sharing its folios.
    /// On error (small pool too small for the eager copies) nothing changed.
    pub fn fork(&mut self, parent: MmId) -> Result<MmId, MmError> {
        let p = self.mm(parent)?;
        let (frames, base, madvised) = (p.frames(), p.base_hva, p.madvised);
        // Count eager copies needed for pinned folios.
        let mut needed = 0usize;
        for fm in &p.frames {
            match fm {
                FrameMap::None => {}
                FrameMap::Pmd(pmd) => {
                    if self.folio(pmd.folio)?.maybe_dma_pinned() {
                        needed += PAGES_PER_HPAGE_USIZE;
                    }
                }
                FrameMap::Table(t) => {
                    for (_, pte) in t.iter() {
                        if self.folio(pte.folio)?.maybe_dma_pinned() {
                            needed += 1;
                        }
                    }
                }
            }
        }
        let available = self.small.available();
        if needed > available {
            return Err(MmError::OutOfMemory { needed, available });
        }
        let wrprotected = p.wrprotected.clone();
        let child = self.new_mm(frames, base, madvised);
        self.mm_mut(child)?.wrprotected = wrprotected;
        for f in 0..frames {
            let fm = self.mm(parent)?.frames[f].clone();
            match fm {
                FrameMap::None => {}
                FrameMap::Pmd(pmd) => {
                    if self.folio(pmd.folio)?.maybe_dma_pinned() {
                        self.split_huge_pmd(parent, f)?;
                        self.fork_table(parent, child, f)?;
                    } else {
                        if let FrameMap::Pmd(pp) = self.frame_mut(parent, f)? {
                            pp.writable = false;
                        }
                        self.install_pmd(child, f, pmd.folio, false)?;
                    }
                }
                FrameMap::Table(_) => self.fork_table(parent, child, f)?,
            }
        }
        Ok(child)
    }

    fn fork_table(&mut self, parent: MmId, child: MmId, f: usize) -> Result<(), MmError> {
        let FrameMap::Table(t) = self.mm(parent)?.frames[f].clone() else {
            return Ok(());
        };
        for (i, pte) in t.iter() {
            let page = f as u64 * PAGES_PER_HPAGE + i as u64;
            if self.folio(pte.folio)?.maybe_dma_pinned() {
                let new = self.alloc_small(f)?;
                self.install_pte(child, page, new, 0, true)?;
                self.stat.cow_copies += 1;
            } else {
                if let FrameMap::Table(pt) = self.frame_mut(parent, f)? {
                    let mut w = pte;
                    w.writable = false;
                    pt.set(i, Some(w));
                }
                self.install_pte(child, page, pte.folio, pte.idx, false)?;
            }
        }
        Ok(())
    }
}
