//! khugepaged collapse (`hpage_collapse_scan_pmd` + `collapse_huge_page`):
//! scan the 512 PTEs of a frame, refuse on khugepaged's limits, otherwise copy
//! into a fresh huge folio and PMD-map it.

use super::{FrameMap, MmError, MmId, Primary};
use crate::folio::{Backing, FolioId};
use crate::units::{PAGES_PER_HPAGE, PAGES_PER_HPAGE_USIZE};
use std::fmt;

/// Why khugepaged refused (the kernel's `SCAN_*` result codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollapseRefusal {
    /// THP disabled for the VMA by policy (`SCAN_VMA_CHECK`).
    Disabled,
    /// No page table at the frame (`SCAN_PMD_NULL`).
    NoPageTable,
    /// Already PMD-mapped (`SCAN_PMD_MAPPED`).
    AlreadyPmdMapped,
    /// More none PTEs than `max_ptes_none` (`SCAN_EXCEED_NONE_PTE`).
    ExceedNonePte {
        /// None PTEs found.
        none: u32,
        /// The limit.
        max: u32,
    },
    /// More shared PTEs than `max_ptes_shared` (`SCAN_EXCEED_SHARED_PTE`).
    ExceedSharedPte {
        /// Shared PTEs found (at the point of refusal).
        shared: u32,
        /// The limit.
        max: u32,
    },
    /// A page is pinned or has extra references (`SCAN_PAGE_COUNT`).
    Pinned {
        /// Page index in the frame.
        page: u16,
    },
    /// No writable PTE in the range (`SCAN_PAGE_RO`).
    NoWritablePte,
    /// The huge pool is empty (`SCAN_ALLOC_HUGE_PAGE_FAIL`).
    PoolEmpty,
}

impl fmt::Display for CollapseRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CollapseRefusal::Disabled => write!(f, "THP disabled for this region by policy"),
            CollapseRefusal::NoPageTable => write!(f, "no page table at the frame"),
            CollapseRefusal::AlreadyPmdMapped => write!(f, "frame already PMD-mapped"),
            CollapseRefusal::ExceedNonePte { none, max } => {
                write!(f, "{none} none PTEs exceed max_ptes_none {max}")
            }
            CollapseRefusal::ExceedSharedPte { shared, max } => {
                write!(f, "{shared} shared PTEs exceed max_ptes_shared {max}")
            }
            CollapseRefusal::Pinned { page } => {
                write!(f, "page {page} is pinned or referenced")
            }
            CollapseRefusal::NoWritablePte => write!(f, "no writable PTE in the range"),
            CollapseRefusal::PoolEmpty => write!(f, "huge pool empty"),
        }
    }
}

/// `struct collapse_control` (mm/khugepaged.c): who collapses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollapseControl {
    /// khugepaged (its `max_ptes_*` limits apply), or `MADV_COLLAPSE` (false).
    pub is_khugepaged: bool,
}

/// What a successful collapse did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollapseReport {
    /// The new huge folio.
    pub folio: FolioId,
    /// Its huge slot.
    pub huge_slot: u32,
    /// Pages copied: (page index, backing of the source folio, source pfn).
    pub copied: Vec<(u16, Backing, u64)>,
    /// Pages zero-filled (none PTEs).
    pub zeroed: Vec<u16>,
}

impl Primary {
    /// Scans `frame` of `mm` with khugepaged's rules; refusal reason or the
    /// counts (none, shared) when collapsible. Changes nothing.
    pub fn collapse_scan(&self, mm: MmId, frame: usize) -> Result<(u32, u32), MmError> {
        self.collapse_scan_cc(
            mm,
            frame,
            CollapseControl {
                is_khugepaged: true,
            },
        )
    }

    /// The scan for `cc`: `hpage_collapse_scan_pmd` (anonymous) or
    /// `hpage_collapse_scan_file` (shmem), mm/khugepaged.c.
    pub fn collapse_scan_cc(
        &self,
        mm: MmId,
        frame: usize,
        cc: CollapseControl,
    ) -> Result<(u32, u32), MmError> {
        let m = self.mm(mm)?;
        if frame >= m.frames() {
            return Err(MmError::OutOfRange {
                first: frame as u64 * PAGES_PER_HPAGE,
                npages: PAGES_PER_HPAGE,
                pages: m.pages(),
            });
        }
        let refuse = |r| Err(MmError::Collapse(r));
        if cc.is_khugepaged && !self.policy.collapse_allowed(m.madvised) {
            return refuse(CollapseRefusal::Disabled);
        }
        let t = match &m.frames[frame] {
            FrameMap::None => return refuse(CollapseRefusal::NoPageTable),
            FrameMap::Pmd(_) => return refuse(CollapseRefusal::AlreadyPmdMapped),
            FrameMap::Table(t) => t,
        };
        if m.is_shmem() {
            self.hpage_collapse_scan_file(t, cc)
        } else {
            self.hpage_collapse_scan_pmd(m, frame, t, cc)
        }
    }

    /// `hpage_collapse_scan_pmd` (mm/khugepaged.c, Linux 6.18): none PTEs
    /// above `max_ptes_none` and PTEs of maybe-shared folios above
    /// `max_ptes_shared` refuse only for khugepaged (`cc->is_khugepaged`;
    /// `MADV_COLLAPSE` ignores the limits); a pinned or otherwise referenced
    /// page (`SCAN_PAGE_COUNT`) and no writable PTE (`SCAN_PAGE_RO`) refuse
    /// for both.
    fn hpage_collapse_scan_pmd(
        &self,
        m: &super::Mm,
        frame: usize,
        t: &super::PageTable,
        cc: CollapseControl,
    ) -> Result<(u32, u32), MmError> {
        let refuse = |r| Err(MmError::Collapse(r));
        let k = self.policy.khugepaged;
        let none = PAGES_PER_HPAGE as u32 - t.present();
        if cc.is_khugepaged && !k.none_ptes_within_limit(t.present()) {
            return refuse(CollapseRefusal::ExceedNonePte {
                none,
                max: k.max_ptes_none,
            });
        }
        let mut shared = 0u32;
        let mut writable = false;
        for (i, pte) in t.iter() {
            let f = self.folio(pte.folio)?;
            // 6.10+: a page counts as shared if any part of its folio may be
            // (`folio_maybe_mapped_shared`).
            if f.folio_maybe_mapped_shared() {
                shared += 1;
                if cc.is_khugepaged && shared > k.max_ptes_shared {
                    return refuse(CollapseRefusal::ExceedSharedPte {
                        shared,
                        max: k.max_ptes_shared,
                    });
                }
            }
            if f.maybe_dma_pinned() || f.held > 0 {
                return refuse(CollapseRefusal::Pinned { page: i as u16 });
            }
            writable |= pte.writable && !m.write_protected(frame);
        }
        if !writable {
            return refuse(CollapseRefusal::NoWritablePte);
        }
        Ok((none, shared))
    }

    /// `hpage_collapse_scan_file` (mm/khugepaged.c, Linux 6.18) for a shmem
    /// frame (the model's page cache is what is mapped): fewer than
    /// `512 - max_ptes_none` present pages refuse only for khugepaged; a
    /// pinned or referenced page refuses (`SCAN_PAGE_COUNT`); no writable
    /// PTE and sharing are no reason (`collapse_file` works on the page cache).
    fn hpage_collapse_scan_file(
        &self,
        t: &super::PageTable,
        cc: CollapseControl,
    ) -> Result<(u32, u32), MmError> {
        let k = self.policy.khugepaged;
        let present = t.present();
        let none = PAGES_PER_HPAGE as u32 - present;
        if cc.is_khugepaged && !k.none_ptes_within_limit(present) {
            return Err(MmError::Collapse(CollapseRefusal::ExceedNonePte {
                none,
                max: k.max_ptes_none,
            }));
        }
        for (i, pte) in t.iter() {
            let f = self.folio(pte.folio)?;
            if f.maybe_dma_pinned() || f.held > 0 {
                return Err(MmError::Collapse(CollapseRefusal::Pinned {
                    page: i as u16,
                }));
            }
        }
        Ok((none, 0))
    }

    /// Collapses `frame` of `mm` into a fresh PMD-mapped huge folio
    /// (khugepaged). On refusal nothing changed.
    pub fn collapse(&mut self, mm: MmId, frame: usize) -> Result<CollapseReport, MmError> {
        self.collapse_cc(
            mm,
            frame,
            CollapseControl {
                is_khugepaged: true,
            },
        )
    }

    /// `MADV_COLLAPSE` (`madvise_collapse`): the collapse without
    /// khugepaged's limits (`cc->is_khugepaged` false) and regardless of the
    /// THP `enabled` policy.
    pub fn madvise_collapse(&mut self, mm: MmId, frame: usize) -> Result<CollapseReport, MmError> {
        self.collapse_cc(
            mm,
            frame,
            CollapseControl {
                is_khugepaged: false,
            },
        )
    }

    /// `collapse_huge_page` / `collapse_file` after the scan for `cc`.
    pub fn collapse_cc(
        &mut self,
        mm: MmId,
        frame: usize,
        cc: CollapseControl,
    ) -> Result<CollapseReport, MmError> {
        self.collapse_scan_cc(mm, frame, cc)?;
        let Some(new) = self.alloc_huge(frame) else {
            self.stat.thp_collapse_alloc_failed += 1;
            return Err(MmError::Collapse(CollapseRefusal::PoolEmpty));
        };
        let huge_slot = match self.folio(new)?.backing {
            Backing::Huge(s) => s,
            _ => 0,
        };
        let FrameMap::Table(t) = self.mm(mm)?.frames[frame].clone() else {
            return Err(MmError::Collapse(CollapseRefusal::NoPageTable));
        };
        let mut copied = Vec::with_capacity(t.present() as usize);
        let mut zeroed = Vec::new();
        for i in 0..PAGES_PER_HPAGE_USIZE {
            match t.get(i) {
                Some(p) => copied.push((i as u16, self.folio(p.folio)?.backing, p.pfn)),
                None => zeroed.push(i as u16),
            }
        }
        let first = frame as u64 * PAGES_PER_HPAGE;
        for (i, _) in t.iter() {
            self.clear_pte(mm, first + i as u64)?;
        }
        self.install_pmd(mm, frame, new, true)?;
        self.stat.thp_collapse_alloc += 1;
        Ok(CollapseReport {
            folio: new,
            huge_slot,
            copied,
            zeroed,
        })
    }
}
