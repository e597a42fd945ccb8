//! The PUD level of guest RAM: 1G frames ([`FRAMES_PER_GIG`] frames each, the
//! first a multiple of 512) backed by a page of a pool of 1G pages, one level
//! above the 2M model.
//!
//! HugeTLB 1G pages are not THP: the kernel never splits a mapped one (it only
//! demotes free ones, `demote` in `/sys/kernel/mm/hugepages/hugepages-1048576kB`,
//! mm/hugetlb.c `demote_free_hugetlb_folios`), and a hugetlb VMA maps at one page
//! size. So a 1G split is the VMM's own: each 2M of the 1G page is copied into a
//! frame of the 2M model (a 2M page from the 2M pool, or 512 small pages when that
//! pool is empty), mapped there, and the 1G page freed. A collapse copies the 512
//! frames back into a fresh 1G page and frees what backed them. Nothing between:
//! a 1G frame is either whole (every frame of it [`FrameView::Gig`], nothing of it
//! in the 2M model) or not a 1G frame at all.

use super::{DiscardStep, FrameView, ModelError, PopulatePlan, RamModel};
use crate::folio::Backing;
use crate::invariants::InvariantViolation;
use crate::pool::HugePool;
use crate::primary::{FrameMap, MmError};
use crate::units::{PAGES_PER_GPAGE, PAGES_PER_HPAGE};

/// 2M frames in a 1G frame.
pub const FRAMES_PER_GIG: usize = 512;

/// 1G frames and the 1G pool.
#[derive(Debug, Clone)]
pub(super) struct GigLayer {
    pool: HugePool,
    /// Per whole 1G frame of guest RAM: the 1G-pool slot backing it.
    gigs: Vec<Option<u32>>,
}

impl GigLayer {
    /// No 1G frame yet; guest RAM of `frames` frames, a 1G pool of `capacity`.
    pub(super) fn new(frames: usize, capacity: usize) -> Self {
        GigLayer {
            pool: HugePool::new(capacity),
            gigs: vec![None; frames / FRAMES_PER_GIG],
        }
    }

    /// The 1G frame `frame` is part of, when that is backed by a 1G page.
    pub(super) fn of_frame(&self, frame: usize) -> Option<usize> {
        let gig = frame / FRAMES_PER_GIG;
        self.gigs.get(gig).copied().flatten().map(|_| gig)
    }

    /// `frame`'s view when it is part of a 1G page.
    pub(super) fn view(&self, frame: usize) -> Option<FrameView> {
        let slot = (*self.gigs.get(frame / FRAMES_PER_GIG)?)?;
        Some(FrameView::Gig {
            slot,
            index: (frame % FRAMES_PER_GIG) as u16,
        })
    }
}

/// Result of [`RamModel::populate_gig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GigPopulatePlan {
    /// Map 1G page `slot` over the 1G frame.
    Gig {
        /// 1G-pool slot.
        slot: u32,
    },
    /// The 1G frame, or a frame of it, is populated already: populate what is
    /// left frame by frame ([`RamModel::populate`]).
    AlreadyPopulated,
    /// The 1G pool has no free page: populate frame by frame (2M pool, then
    /// small pages).
    NoGigPage,
}

/// Result of [`RamModel::split_gig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GigSplitPlan {
    /// The 1G frame is not backed by a 1G page: nothing to do.
    NotGig,
    /// For each frame `(frame, plan)`, in frame order: copy that frame's 2M of
    /// the 1G page into what `plan` names (a 2M page, or 512 small pages in
    /// page order) and map it over the frame; then free 1G page `gig_slot`.
    Split {
        /// The 1G frame.
        gig: usize,
        /// Freed 1G-pool slot.
        gig_slot: u32,
        /// Where each of its 512 frames goes (never `AlreadyPopulated`).
        frames: Vec<(usize, PopulatePlan)>,
        /// `Some(base)` when frame `i` of the 1G frame got 2M slot `base + i`,
        /// every one: one mapping of the 2M pool from slot `base` replaces
        /// the whole 1G page at once.
        block: Option<u32>,
    },
}

/// Where one frame's bytes come from in a [`GigCollapsePlan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GigSource {
    /// A 2M page of the 2M pool.
    Huge {
        /// 2M-pool slot.
        slot: u32,
    },
    /// Small pages: (page index, small slot) for each present page; the pages
    /// not listed are zero.
    Small {
        /// Present pages.
        pages: Vec<(u16, u32)>,
    },
    /// Nothing: the whole frame is zero.
    Unpopulated,
}

/// Result of [`RamModel::collapse_gig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GigCollapsePlan {
    /// The 1G frame is backed by a 1G page already.
    AlreadyGig,
    /// Copy each frame's source (`sources[i]` for frame `gig * 512 + i`) into
    /// 1G page `gig_slot`, map it over the 1G frame, then free what `freed`
    /// names (as a discard would).
    Collapse {
        /// The 1G frame.
        gig: usize,
        /// New 1G-pool slot.
        gig_slot: u32,
        /// Sources, in frame order (512).
        sources: Vec<GigSource>,
        /// What backed the frames, to free on the host.
        freed: Vec<DiscardStep>,
    },
}

impl RamModel {
    /// This model with a pool of `capacity` 1G pages (none by default).
    pub fn with_gig_pool(mut self, capacity: usize) -> Self {
        self.gig = GigLayer::new(self.frames, capacity);
        self
    }

    /// The 1G pool.
    pub fn gig_pool(&self) -> &HugePool {
        &self.gig.pool
    }

    /// Whole 1G frames of guest RAM (1G frame `g` = frames `g*512 .. (g+1)*512`).
    pub fn gigs(&self) -> usize {
        self.gig.gigs.len()
    }

    /// The 1G-pool slot backing 1G frame `gig`, if one does.
    pub fn gig(&self, gig: usize) -> Option<u32> {
        self.gig.gigs.get(gig).copied().flatten()
    }

    /// Fault injection: the next `n` 1G allocations fail.
    pub fn inject_gig_failures(&mut self, n: u32) {
        self.gig.pool.inject_failures(n);
    }

    fn check_gig(&self, gig: usize) -> Result<(), ModelError> {
        if gig >= self.gigs() {
            return Err(ModelError::GigOutOfRange {
                gig,
                gigs: self.gigs(),
            });
        }
        Ok(())
    }

    fn gig_frames(gig: usize) -> std::ops::Range<usize> {
        gig * FRAMES_PER_GIG..(gig + 1) * FRAMES_PER_GIG
    }

    /// Backs the whole 1G frame `gig` with one 1G page when nothing of it is
    /// populated and the 1G pool has one; else says why not (the caller then
    /// populates frame by frame).
    pub fn populate_gig(&mut self, gig: usize) -> Result<GigPopulatePlan, ModelError> {
        self.check_gig(gig)?;
        let empty = self.gig(gig).is_none()
            && Self::gig_frames(gig).all(|f| matches!(self.mm().frame(f), FrameMap::None));
        if !empty {
            return Ok(GigPopulatePlan::AlreadyPopulated);
        }
        let Some(slot) = self.gig.pool.alloc() else {
            return Ok(GigPopulatePlan::NoGigPage);
        };
        self.gig.gigs[gig] = Some(slot);
        Ok(GigPopulatePlan::Gig { slot })
    }

    /// Splits 1G frame `gig` into 512 frames of the 2M model: each gets a 2M
    /// page from the 2M pool (policy allowing), or 512 small pages when that is
    /// empty; the 1G page is freed. On error nothing changed (inside a
    /// transaction the caller opened, the caller's rollback undoes it).
    pub fn split_gig(&mut self, gig: usize) -> Result<GigSplitPlan, ModelError> {
        self.check_gig(gig)?;
        let Some(gig_slot) = self.gig(gig) else {
            return Ok(GigSplitPlan::NotGig);
        };
        // Worst case first: frames the 2M pool cannot take need small pages.
        let huge = if self.primary.policy().fault_may_use_huge(true) {
            self.primary.huge_pool().free_count().min(FRAMES_PER_GIG)
        } else {
            0
        };
        self.small_available((FRAMES_PER_GIG - huge) * PAGES_PER_HPAGE as usize)?;
        let own = !self.primary.undo_open();
        if own {
            self.checkpoint();
        }
        let r = self.split_gig_frames(gig, gig_slot);
        if own {
            if r.is_ok() {
                self.commit();
            } else {
                self.rollback();
            }
        }
        r
    }

    fn split_gig_frames(&mut self, gig: usize, gig_slot: u32) -> Result<GigSplitPlan, ModelError> {
        self.gig.gigs[gig] = None;
        let mut frames = Vec::with_capacity(FRAMES_PER_GIG);
        let base = self
            .primary
            .policy()
            .fault_may_use_huge(true)
            .then(|| self.primary.huge_pool().free_block(FRAMES_PER_GIG))
            .flatten();
        let mut block = base;
        for (i, f) in Self::gig_frames(gig).enumerate() {
            let at = base.map(|b| (b + i as u32, f));
            let plan = match at.map(|(slot, f)| self.primary.fault_huge_at(self.mm, f, slot)) {
                Some(Ok(_)) => PopulatePlan::Huge {
                    slot: at.map_or(0, |a| a.0),
                },
                // An injected failure: this frame, and the rest, as a fault would.
                Some(Err(_)) | None => {
                    block = None;
                    self.populate(f)?
                }
            };
            frames.push((f, plan));
        }
        self.gig
            .pool
            .free(gig_slot)
            .map_err(|e| ModelError::Primary(e.into()))?;
        Ok(GigSplitPlan::Split {
            gig,
            gig_slot,
            frames,
            block,
        })
    }

    /// Collapses the 512 frames of 1G frame `gig` into one fresh 1G page (any
    /// mix of 2M frames, small frames and unpopulated frames; what is not
    /// present is zero); what backed them is freed. Refused while any frame of
    /// it is pinned, or with no free 1G page. On error nothing changed.
    pub fn collapse_gig(&mut self, gig: usize) -> Result<GigCollapsePlan, ModelError> {
        self.check_gig(gig)?;
        if self.gig(gig).is_some() {
            return Ok(GigCollapsePlan::AlreadyGig);
        }
        for f in Self::gig_frames(gig) {
            self.check_unpinned(f)?;
        }
        let mut sources = Vec::with_capacity(FRAMES_PER_GIG);
        for f in Self::gig_frames(gig) {
            sources.push(match self.mm().frame(f) {
                FrameMap::None => GigSource::Unpopulated,
                FrameMap::Pmd(p) => match self.primary.folio(p.folio)?.backing {
                    Backing::Huge(slot) => GigSource::Huge { slot },
                    _ => return Err(MmError::NotLarge(p.folio).into()),
                },
                FrameMap::Table(t) => {
                    let mut pages = Vec::with_capacity(t.present() as usize);
                    for (i, pte) in t.iter() {
                        pages.push((i as u16, self.small_slot(pte.folio)?));
                    }
                    GigSource::Small { pages }
                }
            });
        }
        let capacity = self.gig.pool.capacity();
        let Some(gig_slot) = self.gig.pool.alloc() else {
            return Err(ModelError::GigPoolEmpty { gig, capacity });
        };
        let first = Self::gig_frames(gig).start as u64 * PAGES_PER_HPAGE;
        // A whole-range discard needs no small page: it cannot run short.
        let freed = match self.discard(first, PAGES_PER_GPAGE) {
            Ok(steps) => steps,
            Err(e) => {
                let _ = self.gig.pool.free(gig_slot);
                return Err(e);
            }
        };
        for f in Self::gig_frames(gig) {
            self.primary.free_empty_table(self.mm, f)?;
        }
        self.gig.gigs[gig] = Some(gig_slot);
        let freed = freed
            .into_iter()
            .filter(|s| !matches!(s, DiscardStep::Small { freed, .. } if freed.is_empty()))
            .collect();
        Ok(GigCollapsePlan::Collapse {
            gig,
            gig_slot,
            sources,
            freed,
        })
    }

    /// The 1G level's invariants: the 1G pool is consistent and its used slots
    /// are exactly the slots of the 1G frames, each once; a 1G frame has
    /// nothing in the 2M model and no pins.
    pub(super) fn check_gig_invariants(&self) -> Result<(), InvariantViolation> {
        let pool = &self.gig.pool;
        if !pool.is_consistent() {
            return Err(InvariantViolation::new("1G pool free list inconsistent"));
        }
        let slots: Vec<u32> = self.gig.gigs.iter().filter_map(|s| *s).collect();
        let mut distinct = slots.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != slots.len() || slots.len() != pool.used_count() {
            return Err(InvariantViolation::new(format!(
                "1G frames use slots {slots:?} but the 1G pool has {} used",
                pool.used_count()
            )));
        }
        if let Some(s) = slots.iter().find(|s| !pool.is_used(**s)) {
            return Err(InvariantViolation::new(format!(
                "1G slot {s} backs a 1G frame but is free in the pool"
            )));
        }
        for (gig, _) in self
            .gig
            .gigs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
        {
            for f in Self::gig_frames(gig) {
                if !matches!(self.mm().frame(f), FrameMap::None) || self.pins(f) > 0 {
                    return Err(InvariantViolation::new(format!(
                        "frame {f} of 1G frame {gig} is also in the 2M model or pinned"
                    )));
                }
            }
        }
        Ok(())
    }
}
