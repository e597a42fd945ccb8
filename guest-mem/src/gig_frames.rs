//! 1G frames of the `hugetlb-1g` backing on real memory: a whole GiB of guest
//! RAM populated with one 1G page, split into 2M frames (1G -> 2M; a 2M frame
//! then goes to 4K as any other), and collapsed back from its 512 frames. The
//! decisions are `thp`'s (`RamModel::populate_gig`, `split_gig`,
//! `collapse_gig`); this file carries out their plans.
//!
//! Who may write when (a split, the vCPUs running): the GiB is write-protected
//! with the userfaultfd, so a writer of it (a vCPU inside KVM, a VMM thread)
//! sleeps in its fault; reads go on. The 1 GiB is copied into a block of 512
//! 2M pages of the pool, then one `mmap` of that block replaces the 1G page
//! whole (a hugetlb mapping splits only at its own page size: the GiB cannot
//! be remapped 2M at a time while it runs), and the held writers fault again
//! into the 2M pages. Where the host cannot write-protect, or the pool has no
//! free block of 512, the copy and the remap (the GiB zero-mapped, then each
//! frame mapped) happen under the vCPU pause instead. A collapse whose 512
//! frames are all on 2M pages (the climb back after a split) is held the same
//! way and swapped in by one `mmap` of the 1G page; one with small or empty
//! frames copies under the pause (anonymous zero pages cannot always be
//! write-protected).

use crate::error::GuestMemError;
use crate::guest_ram::GuestRam;
use crate::host_mem::{all_pages, in_page_order};
use crate::quiesce::{self, Quiesce};
use crate::split_windows::SplitWindow;
use crate::FRAMES_PER_GIG;
use thp::ram_model::{
    DiscardStep, FrameView, GigCollapsePlan, GigPopulatePlan, GigSource, GigSplitPlan,
};
use thp::PopulatePlan;

impl GuestRam {
    fn check_gig(&self, gig: usize) -> Result<(), GuestMemError> {
        self.check_huge_backing("1G split or collapse")?;
        let first = gig.saturating_mul(FRAMES_PER_GIG);
        self.check_frame(first)?;
        self.check_frame(first + FRAMES_PER_GIG - 1)
    }

    /// The 1G frame `frame` is part of, while a 1G page backs it.
    pub fn gig_of(&self, frame: usize) -> Option<usize> {
        let gig = frame / FRAMES_PER_GIG;
        self.model.gig(gig).map(|_| gig)
    }

    /// Before a 2M-level operation on pages `[first, first + n)`: split the
    /// 1G pages over them (1G -> 2M), so that only their 2M frames go further.
    pub(crate) fn split_gigs_over(
        &mut self,
        first: u64,
        n: u64,
        q: &dyn Quiesce,
    ) -> Result<(), GuestMemError> {
        if self.model.gig_pool().capacity() == 0 || n == 0 {
            return Ok(());
        }
        let per_gig = (FRAMES_PER_GIG as u64) * crate::PAGES_PER_HPAGE;
        for gig in first / per_gig..=(first + n - 1) / per_gig {
            if self.model.gig(gig as usize).is_some() {
                self.split_gig(gig as usize, q)?;
            }
        }
        Ok(())
    }

    /// After `frame` collapsed to 2M: collapse its GiB to one 1G page when
    /// every frame of it is huge now and the 1G pool has a free page. A
    /// failure is logged and leaves the 2M frames as they are.
    pub(crate) fn climb_to_gig(&mut self, frame: usize, q: &dyn Quiesce) {
        let gig = frame / FRAMES_PER_GIG;
        let ready = self.model.gig_pool().free_count() > 0
            && gig < self.model.gigs()
            && (gig * FRAMES_PER_GIG..(gig + 1) * FRAMES_PER_GIG)
                .all(|f| matches!(self.model.frame(f), FrameView::Huge { .. }));
        if ready {
            if let Err(e) = self.collapse_gig(gig, q) {
                log::warn!("1G frame {gig} stays on 2M frames: {e}");
            }
        }
    }

    /// Back the whole GiB `gig` (frames `gig * 512 ..`) with one 1G page
    /// when the model has one for it.
    pub fn populate_gig(&mut self, gig: usize) -> Result<(), GuestMemError> {
        self.check_gig(gig)?;
        self.undoable(|ram| {
            if let GigPopulatePlan::Gig { slot } = ram.model.populate_gig(gig)? {
                let first = gig * FRAMES_PER_GIG;
                ram.changed.extend(first..first + FRAMES_PER_GIG);
                ram.host.gig_map(gig, slot)?;
                ram.host.gig_populate(gig)?;
            }
            Ok(())
        })
    }

    /// Split 1G frame `gig` into 512 2M frames, keeping every byte (no-op
    /// when no 1G page backs it). The vCPUs run where the host can
    /// write-protect the GiB and the 2M pool has a free block for it (only a
    /// writer of this GiB waits); else they are paused through `q` for the
    /// copy and the remap. On error the 1G page stays, and so do the books.
    pub fn split_gig(&mut self, gig: usize, q: &dyn Quiesce) -> Result<(), GuestMemError> {
        self.check_gig(gig)?;
        self.undoable(|ram| {
            let GigSplitPlan::Split {
                gig,
                gig_slot,
                frames,
                block,
            } = ram.model.split_gig(gig)?
            else {
                return Ok(());
            };
            let first = gig * FRAMES_PER_GIG;
            ram.changed.extend(first..first + FRAMES_PER_GIG);
            let windows = ram.split_windows();
            // The block's 2M pages are taken and zeroed before any write is held.
            let staging = match block {
                Some(base) => match ram.host.gig_block_staging(base) {
                    Ok(t) => Some((base, t)),
                    Err(e) => {
                        ram.free_split_targets(&frames);
                        return Err(e);
                    }
                },
                None => None,
            };
            let held = staging.and_then(|(base, t)| {
                windows
                    .hold_on()
                    .filter(|_| ram.host.gig_hold(gig))
                    .map(|h| (base, t, h))
            });
            let r = match held {
                Some((base, staging, hold)) => {
                    ram.host.gig_copy_out(gig, &staging);
                    drop(staging);
                    let r = ram.host.gig_switch_to_block(gig, base);
                    ram.host.gig_release(gig, r.is_ok());
                    if r.is_ok() {
                        windows.record(SplitWindow {
                            write_hold: hold.elapsed(),
                            collapse: false,
                            prepared: false,
                        });
                    }
                    r
                }
                None => match quiesce::pause(q) {
                    Ok(_guard) => ram.split_gig_paused(gig, gig_slot, &frames),
                    Err(e) => Err(e.into()),
                },
            };
            if let Err(e) = r {
                ram.free_split_targets(&frames);
                return Err(e);
            }
            ram.host.gig_populate_after_switch(gig);
            // As after a collapse: the split stands.
            if let Err(e) = ram.host.gig_free(gig_slot) {
                log::warn!("1G frame {gig}: freeing its 1G page: {e}");
            }
            Ok(())
        })
    }

    /// The paused 1G split: copy each frame to its 2M page or small pages,
    /// zero-map the GiB, map each frame. A failure after the unmap maps the
    /// 1G page back.
    fn split_gig_paused(
        &mut self,
        gig: usize,
        gig_slot: u32,
        frames: &[(usize, PopulatePlan)],
    ) -> Result<(), GuestMemError> {
        for (f, plan) in frames {
            match plan {
                PopulatePlan::Huge { slot } => self.host.copy_frame_to_huge(*f, *slot)?,
                PopulatePlan::Small { slots } => {
                    self.host.copy_frame_to_small(*f, &in_page_order(slots))?
                }
                PopulatePlan::AlreadyPopulated => {}
            }
        }
        self.host.gig_unmap(gig)?;
        let mapped = frames.iter().try_for_each(|(f, plan)| match plan {
            PopulatePlan::Huge { slot } => self.host.huge_map(*f, *slot),
            PopulatePlan::Small { slots } => self.host.small_map(*f, &in_page_order(slots), true),
            PopulatePlan::AlreadyPopulated => Ok(()),
        });
        if let Err(e) = mapped {
            match self.host.gig_map(gig, gig_slot) {
                Ok(()) => self.host.gig_populate_after_switch(gig),
                Err(back) => log::error!("1G frame {gig}: mapping its 1G page back failed: {back}"),
            }
            return Err(e);
        }
        Ok(())
    }

    /// After a 1G split that did not happen: free the 2M pages and small
    /// pages it took, so the memfds hold what the rolled-back books say.
    fn free_split_targets(&mut self, frames: &[(usize, PopulatePlan)]) {
        for (_, plan) in frames {
            let r = match plan {
                PopulatePlan::Huge { slot } => self.host.huge_free(*slot),
                PopulatePlan::Small { slots } => self.host.small_free(slots),
                PopulatePlan::AlreadyPopulated => Ok(()),
            };
            if let Err(e) = r {
                log::warn!("freeing what a failed 1G split took: {e}");
            }
        }
    }

    /// Collapse the 512 frames of 1G frame `gig` into one fresh 1G page
    /// (pages not present come back zero; no-op when one backs it already).
    /// When every frame is on a 2M page and the host can write-protect, the
    /// guest runs (writes to the GiB held for the copy); else the vCPUs are
    /// paused through `q` for the copy and the one `mmap` that puts the 1G
    /// page over the GiB. What backed the frames is freed after.
    pub fn collapse_gig(&mut self, gig: usize, q: &dyn Quiesce) -> Result<(), GuestMemError> {
        self.check_gig(gig)?;
        self.undoable(|ram| {
            let GigCollapsePlan::Collapse {
                gig,
                gig_slot,
                sources,
                freed,
            } = ram.model.collapse_gig(gig)?
            else {
                return Ok(());
            };
            let first = gig * FRAMES_PER_GIG;
            ram.changed.extend(first..first + FRAMES_PER_GIG);
            let staging = ram.host.gig_staging(gig_slot)?;
            // Every frame on a 2M page (a climb back after a split): write-hold
            // the GiB and copy with the guest running, as a split does. Small
            // or empty frames (anonymous zero pages, which the kernel here may
            // not write-protect): under the pause.
            let all_huge = sources.iter().all(|s| matches!(s, GigSource::Huge { .. }));
            let windows = ram.split_windows();
            let hold = all_huge
                .then(|| windows.hold_on())
                .flatten()
                .filter(|_| ram.host.gig_hold(gig));
            let r = if let Some(hold) = hold {
                ram.host.gig_copy_out(gig, &staging);
                let r = ram.host.gig_map(gig, gig_slot);
                ram.host.gig_release(gig, r.is_ok());
                if r.is_ok() {
                    windows.record(SplitWindow {
                        write_hold: hold.elapsed(),
                        collapse: true,
                        prepared: false,
                    });
                }
                r
            } else {
                match quiesce::pause(q) {
                    Ok(_guard) => {
                        for (i, src) in sources.iter().enumerate() {
                            let pages = match src {
                                GigSource::Huge { .. } => all_pages(),
                                GigSource::Small { pages } => pages.iter().map(|p| p.0).collect(),
                                GigSource::Unpopulated => continue,
                            };
                            ram.host.copy_into_gig(&staging, first + i, &pages);
                        }
                        ram.host.gig_map(gig, gig_slot)
                    }
                    Err(e) => Err(e.into()),
                }
            };
            drop(staging);
            if let Err(e) = r {
                if let Err(f) = ram.host.gig_free(gig_slot) {
                    log::warn!("freeing the 1G page of a failed collapse: {f}");
                }
                return Err(e);
            }
            ram.host.gig_populate_after_switch(gig);
            // The 1G page is in: the books must say so whatever follows, so a
            // page that cannot be punched is logged (the memfd keeps it).
            for step in freed {
                let r = match step {
                    DiscardStep::WholeHuge { slot, .. } => ram.host.huge_free(slot),
                    DiscardStep::Small { freed, .. } => {
                        let slots: Vec<u32> = freed.iter().map(|p| p.1).collect();
                        ram.host.small_free(&slots)
                    }
                    DiscardStep::SplitHuge { .. } => Ok(()),
                };
                if let Err(e) = r {
                    log::warn!("1G frame {gig}: freeing what backed its frames: {e}");
                }
            }
            Ok(())
        })
    }
}
