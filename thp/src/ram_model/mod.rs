//! [`RamModel`]: the façade `guest-mem` uses. One anonymous, `MADV_HUGEPAGE`
//! VMA covering guest RAM (frame `f` = guest-physical `[f*2M, (f+1)*2M)`) over
//! [`Primary`] + pools + policy. Every operation changes the model and returns
//! a *plan* saying what to do to real memory; on error nothing changed.

use crate::folio::{Backing, FolioId};
use crate::invariants::{self, InvariantViolation};
use crate::policy::ThpPolicy;
use crate::pool::{HugePool, SmallPool};
use crate::primary::{CollapseRefusal, FaultOutcome, FrameMap, Mm, MmError, MmId, Primary, VmStat};
use crate::units::{Level, PAGES_PER_HPAGE, PAGES_PER_HPAGE_USIZE};

mod gig;
mod split_blocks;
mod warm_huge;
use gig::GigLayer;
pub use gig::{GigCollapsePlan, GigPopulatePlan, GigSource, GigSplitPlan, FRAMES_PER_GIG};

/// What the model says about one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameView {
    /// Nothing mapped (never populated, or given back whole).
    Unpopulated,
    /// PMD-mapped from huge slot `slot`.
    Huge {
        /// Huge-pool slot.
        slot: u32,
    },
    /// Mapped by 4K pages, `present` of 512 present.
    Small {
        /// Present pages.
        present: u32,
    },
    /// Part `index` (0..512) of a 1G page: gig-pool slot `slot`, PUD-mapped
    /// with the rest of its 1G frame ([`RamModel::populate_gig`]).
    Gig {
        /// Gig-pool slot.
        slot: u32,
        /// Which 2M of the 1G page this frame is.
        index: u16,
    },
}

impl FrameView {
    /// The level at which the host maps this frame, as KVM's
    /// `host_pfn_mapping_level` sees it: a huge frame by one PMD (2M), a
    /// small frame with any page present by PTEs (4K), an unpopulated or
    /// empty frame not at all (`None`).
    ///
    /// Per frame, not per page, on purpose: `guest-mem` maps every page of a
    /// populated small frame that the model calls absent (given back, never
    /// refilled) to an anonymous zero page, so the host maps the whole frame.
    /// [`RamModel::host_map`] answers per page from the model's own page
    /// table, where those pages are not mapped; it is the right host for a
    /// pure model, this is the right one for guest RAM on a real host.
    pub fn host_level(&self) -> Option<Level> {
        match self {
            FrameView::Gig { .. } => Some(Level::G1),
            FrameView::Huge { .. } => Some(Level::M2),
            FrameView::Small { present } if *present > 0 => Some(Level::K4),
            FrameView::Small { .. } | FrameView::Unpopulated => None,
        }
    }
}

/// The host level of each frame ([`FrameView::host_level`]), in frame order:
/// what [`crate::kvm_mirror::LevelMap`] takes.
pub fn host_levels(frames: &[FrameView]) -> Vec<Option<Level>> {
    frames.iter().map(FrameView::host_level).collect()
}

/// Result of [`RamModel::populate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PopulatePlan {
    /// The frame already had a mapping (huge, or small with any page table);
    /// use `refill` for missing small pages.
    AlreadyPopulated,
    /// Map huge slot `slot` over the frame.
    Huge {
        /// Huge-pool slot.
        slot: u32,
    },
    /// Map these 512 small slots over the frame, in page order.
    Small {
        /// Small-pool slots, `slots[i]` backs page `i`.
        slots: Vec<u32>,
    },
}

/// One frame's part of [`RamModel::discard`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscardStep {
    /// The whole 2M frame was given back: punch the huge page out; slot returns to the pool.
    WholeHuge {
        /// Frame.
        frame: usize,
        /// Freed huge slot.
        slot: u32,
    },
    /// Part of a huge frame: copy each kept page (page index, new small slot)
    /// from the huge page, map the small pages over the frame, then free the huge slot.
    SplitHuge {
        /// Frame.
        frame: usize,
        /// Freed huge slot.
        huge_slot: u32,
        /// Kept pages: (page index, new small slot).
        kept: Vec<(u16, u32)>,
        /// Given-back page indices (now not present).
        dropped: Vec<u16>,
    },
    /// Small pages given back: punch these small slots (page index, slot).
    Small {
        /// Frame.
        frame: usize,
        /// Freed pages: (page index, small slot).
        freed: Vec<(u16, u32)>,
    },
}

/// One frame's part of [`RamModel::refill`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefillStep {
    /// Frame.
    pub frame: usize,
    /// Pages made present: (page index, new small slot), to be zero-filled and mapped.
    pub filled: Vec<(u16, u32)>,
}

/// Result of [`RamModel::split`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitPlan {
    /// The frame is not huge; nothing to do.
    NotHuge,
    /// Copy every page of the huge slot to its small slot, map them, free the huge slot.
    Split {
        /// Frame.
        frame: usize,
        /// Freed huge slot.
        huge_slot: u32,
        /// (page index, new small slot) for all 512 pages.
        copied: Vec<(u16, u32)>,
    },
}

/// Result of [`RamModel::collapse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CollapsePlan {
    /// The frame is already huge; nothing to do.
    AlreadyHuge,
    /// Fill huge slot `huge_slot`: copy each (page index, small slot), zero
    /// the `zero` pages, map the huge page over the frame, punch `free_small`.
    Collapse {
        /// Frame.
        frame: usize,
        /// New huge slot.
        huge_slot: u32,
        /// (page index, source small slot) to copy.
        copy: Vec<(u16, u32)>,
        /// Page indices to zero-fill (were not present).
        zero: Vec<u16>,
        /// Small slots freed.
        free_small: Vec<u32>,
    },
}

/// Errors of [`RamModel`]; the model is unchanged after any of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// Frame index beyond guest RAM.
    #[error("frame {frame} out of range (guest RAM has {frames} frames)")]
    FrameOutOfRange {
        /// The frame.
        frame: usize,
        /// Frames of guest RAM.
        frames: usize,
    },
    /// Page range beyond guest RAM.
    #[error("pages [{first}, {first}+{npages}) out of range (guest RAM has {pages} pages)")]
    PagesOutOfRange {
        /// First page.
        first: u64,
        /// Number of pages.
        npages: u64,
        /// Pages of guest RAM.
        pages: u64,
    },
    /// The frame is pinned; unpin it first.
    #[error("frame {frame} is pinned ({pins} pins); unpin it before discard/split/collapse")]
    Busy {
        /// The frame.
        frame: usize,
        /// Its pins.
        pins: u32,
    },
    /// No free huge page for a collapse; free one (discard a frame) or grow the pool.
    #[error("huge pool empty ({capacity} slots all used); cannot collapse frame {frame}")]
    HugePoolEmpty {
        /// The frame.
        frame: usize,
        /// Pool capacity.
        capacity: usize,
    },
    /// The small pool limit is reached.
    #[error("small pool exhausted: need {needed} pages, {available} available")]
    SmallPoolExhausted {
        /// Pages needed.
        needed: usize,
        /// Pages available.
        available: usize,
    },
    /// khugepaged's rules refuse the collapse.
    #[error("collapse of frame {frame} refused: {reason}")]
    CollapseRefused {
        /// The frame.
        frame: usize,
        /// Why.
        reason: CollapseRefusal,
    },
    /// The frame has nothing mapped.
    #[error("frame {frame} is not populated")]
    NotPopulated {
        /// The frame.
        frame: usize,
    },
    /// Unpin of a frame that is not pinned.
    #[error("frame {frame} is not pinned")]
    NotPinned {
        /// The frame.
        frame: usize,
    },
    /// The frame is part of a 1G frame: split that first ([`RamModel::split_gig`]).
    #[error("frame {frame} is part of 1G frame {gig}: split the 1G frame first")]
    InGig {
        /// The frame.
        frame: usize,
        /// Its 1G frame.
        gig: usize,
    },
    /// 1G frame index beyond guest RAM's whole 1G frames.
    #[error("1G frame {gig} out of range (guest RAM has {gigs} whole 1G frames)")]
    GigOutOfRange {
        /// The 1G frame.
        gig: usize,
        /// Whole 1G frames of guest RAM.
        gigs: usize,
    },
    /// No free 1G page for a collapse to 1G.
    #[error("1G pool empty ({capacity} slots all used); cannot collapse 1G frame {gig}")]
    GigPoolEmpty {
        /// The 1G frame.
        gig: usize,
        /// Pool capacity.
        capacity: usize,
    },
    /// A primary-model error (a model bug if it ever shows).
    #[error("primary model: {0}")]
    Primary(#[from] MmError),
}

/// The guest-RAM model.
#[derive(Debug, Clone)]
pub struct RamModel {
    primary: Primary,
    mm: MmId,
    frames: usize,
    /// Per frame: folios pinned by `pin(frame)`, one list per pin.
    pins: Vec<Vec<Vec<FolioId>>>,
    /// The PUD level: 1G frames over the 2M model, and the 1G pool.
    gig: GigLayer,
    /// The 1G level as it was at [`Self::checkpoint`] (small: one entry per
    /// 1G of guest RAM and per 1G page), restored by [`Self::rollback`].
    gig_saved: Option<GigLayer>,
}

impl RamModel {
    /// A model of `frames` frames with a huge pool of `huge_pool_capacity` slots.
    pub fn new(frames: usize, huge_pool_capacity: usize, policy: ThpPolicy) -> Self {
        Self::with_small_limit(frames, huge_pool_capacity, policy, None)
    }

    /// Like [`Self::new`] for shmem (the `thp` backing: a memfd whose huge
    /// pages the kernel manages): page-cache folios never go on the
    /// deferred-split queue, and [`Self::collapse`] is `MADV_COLLAPSE` of a
    /// file (`collapse_file` without khugepaged's limits).
    pub fn shmem(frames: usize, huge_pool_capacity: usize, policy: ThpPolicy) -> Self {
        Self::build(frames, huge_pool_capacity, policy, None, true)
    }

    /// Like [`Self::new`] with a limit on small pages in use (fault injection).
    pub fn with_small_limit(
        frames: usize,
        huge_pool_capacity: usize,
        policy: ThpPolicy,
        small_limit: Option<usize>,
    ) -> Self {
        Self::build(frames, huge_pool_capacity, policy, small_limit, false)
    }

    fn build(
        frames: usize,
        huge_pool_capacity: usize,
        policy: ThpPolicy,
        small_limit: Option<usize>,
        shmem: bool,
    ) -> Self {
        let mut primary = Primary::new(huge_pool_capacity, small_limit, policy);
        let mm = if shmem {
            primary.new_shmem_mm(frames, 0, true)
        } else {
            primary.new_mm(frames, 0, true)
        };
        primary.log_frees();
        RamModel {
            primary,
            mm,
            frames,
            pins: vec![Vec::new(); frames],
            gig: GigLayer::new(frames, 0),
            gig_saved: None,
        }
    }

    /// Number of frames.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Number of 4K pages.
    pub fn pages(&self) -> u64 {
        self.frames as u64 * PAGES_PER_HPAGE
    }

    fn check_frame(&self, frame: usize) -> Result<(), ModelError> {
        if frame >= self.frames {
            return Err(ModelError::FrameOutOfRange {
                frame,
                frames: self.frames,
            });
        }
        Ok(())
    }

    fn check_pages(&self, first: u64, npages: u64) -> Result<(), ModelError> {
        let pages = self.pages();
        if first.checked_add(npages).is_none_or(|e| e > pages) {
            return Err(ModelError::PagesOutOfRange {
                first,
                npages,
                pages,
            });
        }
        Ok(())
    }

    fn check_unpinned(&self, frame: usize) -> Result<(), ModelError> {
        let pins = self.pins[frame].len() as u32;
        if pins > 0 {
            return Err(ModelError::Busy { frame, pins });
        }
        Ok(())
    }

    fn mm(&self) -> &Mm {
        // The RamModel's address space is never destroyed.
        self.primary
            .mm(self.mm)
            .expect("RamModel's address space always exists")
    }

    fn check_not_gig(&self, frame: usize) -> Result<(), ModelError> {
        match self.gig.of_frame(frame) {
            Some(gig) => Err(ModelError::InGig { frame, gig }),
            None => Ok(()),
        }
    }

    fn small_available(&self, needed: usize) -> Result<(), ModelError> {
        let available = self.primary.small_pool().available();
        if needed > available {
            return Err(ModelError::SmallPoolExhausted { needed, available });
        }
        Ok(())
    }

    fn small_slot(&self, id: FolioId) -> Result<u32, ModelError> {
        match self.primary.folio(id)?.backing {
            Backing::Small(s) => Ok(s),
            _ => Err(ModelError::Primary(MmError::NotLarge(id))),
        }
    }

    /// The model's view of `frame` (`Unpopulated` for a frame out of range).
    pub fn frame(&self, frame: usize) -> FrameView {
        if frame >= self.frames {
            return FrameView::Unpopulated;
        }
        if let Some(v) = self.gig.view(frame) {
            return v;
        }
        match self.mm().frame(frame) {
            FrameMap::None => FrameView::Unpopulated,
            FrameMap::Pmd(p) => match self.primary.folio(p.folio).map(|f| f.backing) {
                Ok(Backing::Huge(slot)) => FrameView::Huge { slot },
                _ => FrameView::Unpopulated,
            },
            FrameMap::Table(t) => FrameView::Small {
                present: t.present(),
            },
        }
    }

    /// Views of all frames.
    pub fn frame_views(&self) -> Vec<FrameView> {
        (0..self.frames).map(|f| self.frame(f)).collect()
    }

    /// Fault in every page of `frame`: huge from the pool when policy allows,
    /// else 512 small slots (THP-style fallback, counted in
    /// `thp_fault_fallback`). No-op plan if anything is mapped already.
    pub fn populate(&mut self, frame: usize) -> Result<PopulatePlan, ModelError> {
        self.check_frame(frame)?;
        if !matches!(self.mm().frame(frame), FrameMap::None) || self.gig.of_frame(frame).is_some() {
            return Ok(PopulatePlan::AlreadyPopulated);
        }
        let huge_likely = self.primary.policy().fault_may_use_huge(true)
            && self.primary.huge_pool().free_count() > 0;
        if !huge_likely {
            self.small_available(PAGES_PER_HPAGE_USIZE)?;
        }
        let first = frame as u64 * PAGES_PER_HPAGE;
        self.primary.take_freed();
        match self.primary.fault(self.mm, first, true)? {
            FaultOutcome::MappedHuge(id) => match self.primary.folio(id)?.backing {
                Backing::Huge(slot) => Ok(PopulatePlan::Huge { slot }),
                _ => Err(ModelError::Primary(MmError::NotLarge(id))),
            },
            _ => {
                let mut slots = Vec::with_capacity(PAGES_PER_HPAGE_USIZE);
                for p in first..first + PAGES_PER_HPAGE {
                    if let Err(e) = self.primary.fault(self.mm, p, true) {
                        // Only reachable with injected failures: roll back.
                        self.primary.unmap(self.mm, first, PAGES_PER_HPAGE)?;
                        self.primary.free_empty_table(self.mm, frame)?;
                        self.primary.take_freed();
                        return Err(match e {
                            MmError::OutOfMemory { needed, available } => {
                                ModelError::SmallPoolExhausted { needed, available }
                            }
                            e => e.into(),
                        });
                    }
                    let (_, _, id, _) =
                        self.mm().lookup(p).ok_or(MmError::NotMapped { page: p })?;
                    slots.push(self.small_slot(id)?);
                }
                Ok(PopulatePlan::Small { slots })
            }
        }
    }

    /// Gives back guest pages `[first_page, first_page + npages)`.
    /// One step per touched frame, in frame order.
    pub fn discard(
        &mut self,
        first_page: u64,
        npages: u64,
    ) -> Result<Vec<DiscardStep>, ModelError> {
        self.check_pages(first_page, npages)?;
        let end = first_page + npages;
        let frames = frame_spans(first_page, end);
        for &(f, ..) in &frames {
            self.check_not_gig(f)?;
        }
        let mut needed = 0usize;
        for &(f, lo, hi) in &frames {
            if let FrameMap::Pmd(_) = self.mm().frame(f) {
                self.check_unpinned(f)?;
                needed += PAGES_PER_HPAGE_USIZE - (hi - lo) as usize;
            } else if let FrameMap::Table(_) = self.mm().frame(f) {
                self.check_unpinned(f)?;
            }
        }
        self.small_available(needed)?;
        let mut steps = Vec::with_capacity(frames.len());
        for (f, lo, hi) in frames {
            let base = f as u64 * PAGES_PER_HPAGE;
            match self.mm().frame(f).clone() {
                FrameMap::None => steps.push(DiscardStep::Small {
                    frame: f,
                    freed: Vec::new(),
                }),
                FrameMap::Pmd(p) => {
                    let huge_slot = match self.primary.folio(p.folio)?.backing {
                        Backing::Huge(s) => s,
                        _ => return Err(MmError::NotLarge(p.folio).into()),
                    };
                    self.primary.unmap(self.mm, base + lo, hi - lo)?;
                    if lo == 0 && hi == PAGES_PER_HPAGE {
                        steps.push(DiscardStep::WholeHuge {
                            frame: f,
                            slot: huge_slot,
                        });
                    } else {
                        let kept = self.primary.migrate_frame_to_small(self.mm, f)?;
                        steps.push(DiscardStep::SplitHuge {
                            frame: f,
                            huge_slot,
                            kept,
                            dropped: (lo as u16..hi as u16).collect(),
                        });
                    }
                }
                FrameMap::Table(t) => {
                    let mut freed = Vec::new();
                    for i in lo..hi {
                        if let Some(pte) = t.get(i as usize) {
                            freed.push((i as u16, self.small_slot(pte.folio)?));
                        }
                    }
                    self.primary.unmap(self.mm, base + lo, hi - lo)?;
                    steps.push(DiscardStep::Small { frame: f, freed });
                }
            }
        }
        self.primary.take_freed();
        Ok(steps)
    }

    /// Gives back the sorted, distinct pages `pages` of `frame` in one step
    /// (one split at most, however scattered they are): `WholeHuge` when they
    /// are all 512 pages of a huge frame, `SplitHuge` for part of one,
    /// `Small` otherwise. With `keep_huge`, a huge frame given back whole is
    /// faulted in again at once from the pool (normally the same slot): the
    /// caller frees the old page on the host and maps the slot without
    /// touching it, so the guest's next access faults in a fresh, zeroed
    /// huge page ([`DiscardStep::WholeHuge`] then names the old slot, and
    /// [`Self::frame`] says `Huge` with the new one).
    pub fn discard_frame_pages(
        &mut self,
        frame: usize,
        pages: &[u16],
        keep_huge: bool,
    ) -> Result<DiscardStep, ModelError> {
        self.check_frame(frame)?;
        self.check_not_gig(frame)?;
        if pages.windows(2).any(|w| w[0] >= w[1])
            || pages
                .last()
                .is_some_and(|p| *p as usize >= PAGES_PER_HPAGE_USIZE)
        {
            return Err(ModelError::PagesOutOfRange {
                first: frame as u64 * PAGES_PER_HPAGE,
                npages: pages.len() as u64,
                pages: self.pages(),
            });
        }
        let base = frame as u64 * PAGES_PER_HPAGE;
        let whole = pages.len() == PAGES_PER_HPAGE_USIZE;
        let runs = page_index_runs(pages);
        match self.mm().frame(frame).clone() {
            FrameMap::None => Ok(DiscardStep::Small {
                frame,
                freed: Vec::new(),
            }),
            FrameMap::Pmd(p) => {
                self.check_unpinned(frame)?;
                if !whole {
                    self.small_available(PAGES_PER_HPAGE_USIZE - pages.len())?;
                }
                let huge_slot = match self.primary.folio(p.folio)?.backing {
                    Backing::Huge(s) => s,
                    _ => return Err(MmError::NotLarge(p.folio).into()),
                };
                if whole {
                    self.primary.unmap(self.mm, base, PAGES_PER_HPAGE)?;
                    self.primary.take_freed();
                    if keep_huge && self.primary.policy().fault_may_use_huge(true) {
                        // Only the huge fault: never 512 small pages here.
                        if let Ok(FaultOutcome::MappedHuge(_)) =
                            self.primary.fault(self.mm, base, true)
                        {
                        } else {
                            self.primary.unmap(self.mm, base, PAGES_PER_HPAGE)?;
                            self.primary.free_empty_table(self.mm, frame)?;
                        }
                        self.primary.take_freed();
                    }
                    return Ok(DiscardStep::WholeHuge {
                        frame,
                        slot: huge_slot,
                    });
                }
                for &(lo, n) in &runs {
                    self.primary.unmap(self.mm, base + lo, n)?;
                }
                let kept = self.primary.migrate_frame_to_small(self.mm, frame)?;
                self.primary.take_freed();
                Ok(DiscardStep::SplitHuge {
                    frame,
                    huge_slot,
                    kept,
                    dropped: pages.to_vec(),
                })
            }
            FrameMap::Table(t) => {
                self.check_unpinned(frame)?;
                let mut freed = Vec::new();
                for &i in pages {
                    if let Some(pte) = t.get(i as usize) {
                        freed.push((i, self.small_slot(pte.folio)?));
                    }
                }
                for &(lo, n) in &runs {
                    self.primary.unmap(self.mm, base + lo, n)?;
                }
                self.primary.take_freed();
                Ok(DiscardStep::Small { frame, freed })
            }
        }
    }

    /// Takes back pages: every not-present page in the range becomes present
    /// on a new, zero-filled small slot. One step per touched frame.
    pub fn refill(&mut self, first_page: u64, npages: u64) -> Result<Vec<RefillStep>, ModelError> {
        self.check_pages(first_page, npages)?;
        let end = first_page + npages;
        // Every page of a 1G frame is present: nothing to refill there.
        let frames: Vec<_> = frame_spans(first_page, end)
            .into_iter()
            .filter(|&(f, ..)| self.gig.of_frame(f).is_none())
            .collect();
        let mut needed = 0usize;
        for &(f, lo, hi) in &frames {
            let base = f as u64 * PAGES_PER_HPAGE;
            needed += (lo..hi)
                .filter(|i| self.mm().lookup(base + i).is_none())
                .count();
        }
        self.small_available(needed)?;
        let mut steps = Vec::with_capacity(frames.len());
        for (f, lo, hi) in frames {
            let base = f as u64 * PAGES_PER_HPAGE;
            let mut filled = Vec::new();
            for i in lo..hi {
                if self.mm().lookup(base + i).is_some() {
                    continue;
                }
                match self.primary.fault_nohuge(self.mm, base + i, true)? {
                    FaultOutcome::MappedSmall { folio, .. } => {
                        filled.push((i as u16, self.small_slot(folio)?));
                    }
                    other => {
                        log::warn!("refill of page {} gave {:?}", base + i, other);
                    }
                }
            }
            steps.push(RefillStep { frame: f, filled });
        }
        self.primary.take_freed();
        Ok(steps)
    }

    /// Splits a huge frame into 512 small pages (copy), freeing the huge slot.
    /// `Busy` while the frame is pinned (nothing changes).
    pub fn split(&mut self, frame: usize) -> Result<SplitPlan, ModelError> {
        self.check_frame(frame)?;
        self.check_not_gig(frame)?;
        let FrameMap::Pmd(p) = self.mm().frame(frame).clone() else {
            return Ok(SplitPlan::NotHuge);
        };
        self.check_unpinned(frame)?;
        self.small_available(PAGES_PER_HPAGE_USIZE)?;
        let huge_slot = match self.primary.folio(p.folio)?.backing {
            Backing::Huge(s) => s,
            _ => return Err(MmError::NotLarge(p.folio).into()),
        };
        let copied = self.primary.migrate_frame_to_small(self.mm, frame)?;
        self.primary.take_freed();
        Ok(SplitPlan::Split {
            frame,
            huge_slot,
            copied,
        })
    }

    /// Collapses a small frame into a huge page: anonymous memory with
    /// khugepaged's rules (`max_ptes_none` counts not-present pages); shmem
    /// ([`Self::shmem`]) as `MADV_COLLAPSE` does (no `max_ptes_*` limits).
    pub fn collapse(&mut self, frame: usize) -> Result<CollapsePlan, ModelError> {
        self.check_frame(frame)?;
        self.check_not_gig(frame)?;
        if let FrameMap::Pmd(_) = self.mm().frame(frame) {
            return Ok(CollapsePlan::AlreadyHuge);
        }
        self.check_unpinned(frame)?;
        self.primary.take_freed();
        let shmem = self.primary.mm(self.mm).is_ok_and(|m| m.is_shmem());
        let r = if shmem {
            self.primary.madvise_collapse(self.mm, frame)
        } else {
            self.primary.collapse(self.mm, frame)
        };
        let r = match r {
            Ok(r) => r,
            Err(MmError::Collapse(CollapseRefusal::PoolEmpty)) => {
                return Err(ModelError::HugePoolEmpty {
                    frame,
                    capacity: self.primary.huge_pool().capacity(),
                })
            }
            Err(MmError::Collapse(reason)) => {
                return Err(ModelError::CollapseRefused { frame, reason })
            }
            Err(e) => return Err(e.into()),
        };
        let copy = r
            .copied
            .iter()
            .filter_map(|(i, b, _)| match b {
                Backing::Small(s) => Some((*i, *s)),
                _ => None,
            })
            .collect();
        let free_small = self
            .primary
            .take_freed()
            .into_iter()
            .filter_map(|b| match b {
                Backing::Small(s) => Some(s),
                _ => None,
            })
            .collect();
        Ok(CollapsePlan::Collapse {
            frame,
            huge_slot: r.huge_slot,
            copy,
            zero: r.zeroed,
            free_small,
        })
    }

    /// Opens a transaction: [`Self::rollback`] undoes every change made
    /// since, exactly (folios, pools and their free lists' order, frame
    /// mappings, deferred-split queue, counters); [`Self::commit`] keeps
    /// them. Costs one copy of what each operation touches (a frame's
    /// mapping and folios, the pool slots it takes or returns), never of
    /// the whole model: the caller of [`Self::split`], [`Self::collapse`],
    /// [`Self::refill`] or a discard opens one before and rolls back when
    /// the host cannot follow the plan. `pin` and `unpin` are not recorded.
    pub fn checkpoint(&mut self) {
        self.primary.begin_undo();
        self.gig_saved = Some(self.gig.clone());
    }

    /// Keeps the changes since [`Self::checkpoint`] and closes the transaction.
    pub fn commit(&mut self) {
        self.primary.commit_undo();
        self.gig_saved = None;
    }

    /// Undoes the changes since [`Self::checkpoint`] and closes the transaction.
    pub fn rollback(&mut self) {
        self.primary.rollback_undo();
        if let Some(g) = self.gig_saved.take() {
            self.gig = g;
        }
    }

    /// Pins every page of a populated frame (like `pin_user_pages` over it):
    /// discard, split and collapse of it return `Busy` until [`Self::unpin`].
    pub fn pin(&mut self, frame: usize) -> Result<(), ModelError> {
        debug_assert!(!self.primary.undo_open(), "pin inside a transaction");
        self.check_frame(frame)?;
        self.check_not_gig(frame)?;
        let ids: Vec<FolioId> = match self.mm().frame(frame) {
            FrameMap::None => return Err(ModelError::NotPopulated { frame }),
            FrameMap::Pmd(p) => vec![p.folio],
            FrameMap::Table(t) => t.iter().map(|(_, p)| p.folio).collect(),
        };
        let first = frame as u64 * PAGES_PER_HPAGE;
        let mut pinned = Vec::with_capacity(ids.len());
        match self.mm().frame(frame).clone() {
            FrameMap::Table(t) => {
                for (i, _) in t.iter() {
                    pinned.push(self.primary.pin(self.mm, first + i as u64)?);
                }
            }
            _ => pinned.push(self.primary.pin(self.mm, first)?),
        }
        self.pins[frame].push(pinned);
        Ok(())
    }

    /// Drops one pin of `frame`.
    pub fn unpin(&mut self, frame: usize) -> Result<(), ModelError> {
        debug_assert!(!self.primary.undo_open(), "unpin inside a transaction");
        self.check_frame(frame)?;
        let ids = self.pins[frame]
            .pop()
            .ok_or(ModelError::NotPinned { frame })?;
        for id in ids {
            self.primary.unpin(id)?;
        }
        self.primary.take_freed();
        Ok(())
    }

    /// Number of pins on `frame`.
    pub fn pins(&self, frame: usize) -> u32 {
        self.pins.get(frame).map_or(0, |p| p.len() as u32)
    }

    /// The huge pool.
    pub fn huge_pool(&self) -> &HugePool {
        self.primary.huge_pool()
    }

    /// The small pool.
    pub fn small_pool(&self) -> &SmallPool {
        self.primary.small_pool()
    }

    /// Fault injection: the next `n` huge allocations fail.
    pub fn inject_huge_failures(&mut self, n: u32) {
        self.primary.huge_pool_mut().inject_failures(n);
    }

    /// `/proc/vmstat`-like counters (`thp_fault_alloc`, `thp_fault_fallback`,
    /// `thp_collapse_alloc`, `thp_split_pmd`, `thp_split_page`,
    /// `thp_deferred_split_page`, ...).
    pub fn vmstat(&self) -> &VmStat {
        self.primary.stat()
    }

    /// The policy.
    pub fn policy(&self) -> &ThpPolicy {
        self.primary.policy()
    }

    /// The underlying primary model.
    pub fn primary(&self) -> &Primary {
        &self.primary
    }

    /// The guest-RAM address space (hva = guest-physical offset, base 0);
    /// implements [`crate::kvm_mirror::HostMap`].
    pub fn host_map(&self) -> &Mm {
        self.mm()
    }

    /// Checks the primary's invariants and the model's own: every folio is
    /// mapped exactly once (no sharing in guest RAM), every huge folio
    /// PMD-mapped, every mapped page backed by its own slot, pins recorded.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        invariants::check_primary(&self.primary)?;
        self.check_gig_invariants()?;
        for (id, f) in self.primary.folios().iter() {
            if f.total_mapcount() != 1 {
                return Err(InvariantViolation::new(format!(
                    "RamModel folio {id} mapped {} times (must be exactly once)",
                    f.total_mapcount()
                )));
            }
            if f.is_large() && f.entire_mapcount != 1 {
                return Err(InvariantViolation::new(format!(
                    "RamModel huge folio {id} not PMD-mapped"
                )));
            }
            if matches!(f.backing, Backing::HugePart { .. }) {
                return Err(InvariantViolation::new(format!(
                    "RamModel folio {id} is a split part of a huge slot"
                )));
            }
        }
        for (frame, pins) in self.pins.iter().enumerate() {
            for ids in pins {
                for id in ids {
                    let ok = self
                        .primary
                        .folio(*id)
                        .map(|f| f.frame == frame && f.pincount > 0);
                    if ok != Ok(true) {
                        return Err(InvariantViolation::new(format!(
                            "pin of frame {frame} refers to folio {id} not pinned there"
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Splits `[first, end)` into (frame, lo, hi) with page indices inside the frame.
fn frame_spans(first: u64, end: u64) -> Vec<(usize, u64, u64)> {
    let mut out = Vec::new();
    let mut p = first;
    while p < end {
        let f = p / PAGES_PER_HPAGE;
        let stop = end.min((f + 1) * PAGES_PER_HPAGE);
        out.push((f as usize, p % PAGES_PER_HPAGE, stop - f * PAGES_PER_HPAGE));
        p = stop;
    }
    out
}

/// Runs `(first index, count)` of sorted page indices.
fn page_index_runs(pages: &[u16]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        let p = u64::from(p);
        match runs.last_mut() {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}
