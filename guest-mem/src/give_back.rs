//! Give-backs of a balloon (inflate, free page reports) coalesced per 2M
//! frame, on `GuestRam`: a huge frame whose every page has been given back is
//! freed whole (no split, no copy) and stays mapped to its pool slot, so the
//! guest's next touch faults in a fresh huge page; a frame given back in part
//! waits on the deferred-split queue (`thp::give_back`) until
//! [`GuestRam::split_deferred`] splits it (after a bounded delay, or at once
//! on request). [`SplitPolicy::Eager`] splits at once, as `discard` does.

use std::time::Duration;

use log::debug;
pub use thp::give_back::SplitPolicy;
use thp::give_back::{Coalesced, DueFrame, QueueStats};
use thp::ram_model::DiscardStep;

use crate::backing::Backing;
use crate::error::GuestMemError;
use crate::guest_ram::{FrameView, GuestRam};
use crate::quiesce::Quiesce;
use crate::stats::DiscardReport;
use crate::{pagemap, PAGES_PER_HPAGE};

const PPH: u16 = PAGES_PER_HPAGE as u16;

/// What one give-back call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GiveBackReport {
    /// Huge frames freed whole (no split, no copy).
    pub whole_frames_freed: u64,
    /// Huge frames split (copying their kept pages).
    pub frames_split: u64,
    /// Frames that went on the deferred-split queue.
    pub frames_deferred: u64,
    /// 4K pages freed on the host.
    pub pages_freed: u64,
    /// 4K pages given back but still backed (queued).
    pub pages_queued: u64,
    /// Per huge frame freed (whole or split): time from the first of its
    /// pages being given back to its host memory being freed.
    pub freed_after: Vec<Duration>,
}

impl GiveBackReport {
    fn add_discard(&mut self, d: &DiscardReport) {
        self.frames_split += d.frames_split as u64;
        self.whole_frames_freed += d.huge_frames_freed as u64;
        self.pages_freed += d.pages_freed;
    }
}

/// The queue and the frames given back whole, now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GiveBackStatus {
    /// Frames waiting on the deferred-split queue.
    pub frames_queued: usize,
    /// Given-back pages still backed on the host.
    pub pages_queued: u64,
    /// How long the oldest queued page has waited.
    pub oldest_wait: Option<Duration>,
    /// Frames given back whole whose huge page the guest has not touched
    /// in again (host truth when `PAGEMAP_SCAN` is there).
    pub released_frames: usize,
    /// Queue counters.
    pub queue: QueueStats,
}

/// `(frame, lo, hi)` page spans of `[first, first + n)`.
fn spans(first: u64, n: u64) -> Vec<(usize, u16, u16)> {
    let mut out = Vec::new();
    let (mut p, end) = (first, first + n);
    while p < end {
        let f = p / PAGES_PER_HPAGE;
        let stop = end.min((f + 1) * PAGES_PER_HPAGE);
        out.push((
            f as usize,
            (p - f * PAGES_PER_HPAGE) as u16,
            (stop - f * PAGES_PER_HPAGE) as u16,
        ));
        p = stop;
    }
    out
}

impl GuestRam {
    fn frame_is_huge(&self, frame: usize) -> bool {
        self.backing.has_huge_frames() && matches!(self.model.frame(frame), FrameView::Huge { .. })
    }

    /// Balloon inflate: the guest gives back `[gpa, gpa + len)` for good
    /// (until it deflates). Pages of huge frames join their frame's earlier
    /// given-back pages: a frame covered now is freed whole; otherwise it
    /// waits on the deferred-split queue (`policy` `Deferred`) or is split
    /// at once (`Eager`). Pages of small frames are freed at once.
    pub fn give_back(
        &mut self,
        gpa: u64,
        len: u64,
        policy: SplitPolicy,
        q: &dyn Quiesce,
    ) -> Result<GiveBackReport, GuestMemError> {
        let (first, n) = self.check_range(gpa, len)?;
        let now = self.give_back.now();
        let mut rep = GiveBackReport::default();
        let mut split_now = Vec::new();
        self.split_gigs_over(first, n, q)?;
        for (frame, lo, hi) in spans(first, n) {
            if !self.frame_is_huge(frame) {
                self.discard_small(frame, lo, hi, &mut rep, q)?;
                continue;
            }
            match self
                .give_back
                .queue
                .deferred_split_folio(frame, lo..hi, now)
            {
                Coalesced::Whole(d) => self.release_whole(d, &mut rep, q)?,
                Coalesced::Queued { newly_queued, .. } => match policy {
                    SplitPolicy::Eager => split_now.extend(self.give_back.queue.take_frame(frame)),
                    SplitPolicy::Deferred { .. } => {
                        rep.pages_queued += u64::from(hi - lo);
                        rep.frames_deferred += u64::from(newly_queued);
                    }
                },
            }
        }
        self.split_due(split_now, q, &mut rep)?;
        Ok(rep)
    }

    /// Free page report of `[gpa, gpa + len)`: the guest may reuse these
    /// pages at any moment after the report, so they are never queued. A
    /// whole huge frame in the run is freed whole; a frame the run completes
    /// together with pages queued by inflates is freed whole too; whole
    /// small frames are freed; the rest is kept.
    pub fn report_free(
        &mut self,
        gpa: u64,
        len: u64,
        q: &dyn Quiesce,
    ) -> Result<GiveBackReport, GuestMemError> {
        let (first, n) = self.check_range(gpa, len)?;
        let now = self.give_back.now();
        let mut rep = GiveBackReport::default();
        self.split_gigs_over(first, n, q)?;
        for (frame, lo, hi) in spans(first, n) {
            let whole = lo == 0 && hi == PPH;
            if self.frame_is_huge(frame) {
                let pages: Vec<u16> = (lo..hi).collect();
                let done = match self.give_back.queue.complete_with(frame, &pages) {
                    Some(d) => Some(d),
                    None if whole => Some(DueFrame {
                        frame,
                        pages,
                        since: now,
                    }),
                    None => None,
                };
                if let Some(d) = done {
                    self.release_whole(d, &mut rep, q)?;
                }
            } else if whole {
                self.discard_small(frame, lo, hi, &mut rep, q)?;
            }
        }
        Ok(rep)
    }

    /// The deferred-split queue's shrinker (`thp::give_back::GiveBackQueue::
    /// deferred_split_scan`): split the queued frames once the guest has
    /// given nothing back for `delay`, or those whose first given-back page
    /// has waited `max_wait` (all of them with `delay` zero), freeing their
    /// given-back pages. Each split pauses the vCPUs (hugetlb) once.
    pub fn split_deferred(
        &mut self,
        delay: Duration,
        max_wait: Duration,
        q: &dyn Quiesce,
    ) -> Result<GiveBackReport, GuestMemError> {
        let now = self.give_back.now();
        let due = self
            .give_back
            .queue
            .deferred_split_scan(now, delay, max_wait);
        let mut rep = GiveBackReport::default();
        self.split_due(due, q, &mut rep)?;
        Ok(rep)
    }

    /// How long until a queued frame is due under (`delay`, `max_wait`)
    /// (zero when one is due; `None` with an empty queue).
    pub fn next_deferred_due(&self, delay: Duration, max_wait: Duration) -> Option<Duration> {
        let at = self.give_back.queue.next_due(delay, max_wait)?;
        Some(at.saturating_sub(self.give_back.now()))
    }

    /// The queue and the frames given back whole, now; frames the guest
    /// touched in again since they were given back are dropped from the
    /// released set (host truth: `PAGEMAP_SCAN`).
    pub fn give_back_status(&mut self) -> GiveBackStatus {
        self.refresh_released();
        let now = self.give_back.now();
        let q = &self.give_back.queue;
        GiveBackStatus {
            frames_queued: q.frames_queued(),
            pages_queued: q.pages_queued(),
            oldest_wait: q.oldest().map(|t| now.saturating_sub(t)),
            released_frames: self.give_back.released.len(),
            queue: q.stats(),
        }
    }

    /// Frames given back whole and not touched again (see [`Self::give_back_status`]).
    pub fn released_frames(&mut self) -> Vec<usize> {
        self.refresh_released();
        self.give_back.released.iter().copied().collect()
    }

    fn refresh_released(&mut self) {
        if self.give_back.released.is_empty() {
            return;
        }
        // Scan only the span of the released frames, not all of guest RAM.
        let (Some(&lo), Some(&hi)) = (
            self.give_back.released.first(),
            self.give_back.released.last(),
        ) else {
            return;
        };
        let start = self.host_addr() + lo as u64 * crate::HPAGE_SIZE;
        if let Ok(Some(pmd)) = pagemap::pmd_mapped_frames(start, hi - lo + 1) {
            self.give_back
                .released
                .retain(|f| !pmd.get(*f - lo).copied().unwrap_or(false));
        }
    }

    /// Free pages `[lo, hi)` of a frame that is not huge, at once.
    fn discard_small(
        &mut self,
        frame: usize,
        lo: u16,
        hi: u16,
        rep: &mut GiveBackReport,
        q: &dyn Quiesce,
    ) -> Result<(), GuestMemError> {
        let pages: Vec<u16> = (lo..hi).collect();
        let step = self.model.discard_frame_pages(frame, &pages, false)?;
        self.note_discard(&step);
        let mut d = DiscardReport::default();
        self.apply_discard_step(step, &mut d, q)?;
        rep.add_discard(&d);
        Ok(())
    }

    /// Free a huge frame whose every page was given back: its huge page goes
    /// back to the host, the frame stays mapped to a pool slot (normally the
    /// same) without touching it, so the next touch faults in a fresh zeroed
    /// huge page (hugetlb: from the host's pool; thp: a shmem THP).
    fn release_whole(
        &mut self,
        d: DueFrame,
        rep: &mut GiveBackReport,
        q: &dyn Quiesce,
    ) -> Result<(), GuestMemError> {
        let frame = d.frame;
        let all = crate::host_mem::all_pages();
        let step = self.model.discard_frame_pages(frame, &all, true)?;
        self.changed.insert(frame);
        let DiscardStep::WholeHuge { slot, .. } = step else {
            // Not huge after all (cannot happen: checked by the caller).
            let mut r = DiscardReport::default();
            self.apply_discard_step(step, &mut r, q)?;
            rep.add_discard(&r);
            return Ok(());
        };
        let again = self.model.frame(frame);
        match (self.backing, again) {
            (Backing::Hugetlb | Backing::Hugetlb1g, FrameView::Huge { slot: new }) => {
                // The punch unmaps the page from the frame (mmu notifier:
                // KVM drops its 2M entry) and frees it; the mapping stays.
                self.host.huge_free(slot)?;
                if new != slot {
                    self.host.huge_map_lazy(frame, new)?;
                }
            }
            (Backing::Hugetlb | Backing::Hugetlb1g, _) => {
                self.host.zero_map(frame, &all)?;
                self.host.huge_free(slot)?;
            }
            _ => self.host.file_punch(frame, &all)?,
        }
        if matches!(again, FrameView::Huge { .. }) {
            self.give_back.released.insert(frame);
        }
        rep.whole_frames_freed += 1;
        rep.pages_freed += PAGES_PER_HPAGE;
        rep.freed_after
            .push(self.give_back.now().saturating_sub(d.since));
        debug!("give-back: frame {frame} freed whole (huge slot {slot})");
        Ok(())
    }

    /// Split the frames `due` leave the queue with, freeing their queued
    /// pages; one vCPU pause per split (hugetlb).
    fn split_due(
        &mut self,
        due: Vec<DueFrame>,
        q: &dyn Quiesce,
        rep: &mut GiveBackReport,
    ) -> Result<(), GuestMemError> {
        for d in due {
            self.give_back.released.remove(&d.frame);
            let mut r = DiscardReport::default();
            self.undoable(|ram| {
                let step = ram.model.discard_frame_pages(d.frame, &d.pages, false)?;
                ram.note_discard(&step);
                ram.apply_discard_step(step, &mut r, q)
            })?;
            rep.add_discard(&r);
            rep.freed_after
                .push(self.give_back.now().saturating_sub(d.since));
        }
        Ok(())
    }

    /// Before another operation acts on `[first, first + n)`: split the
    /// queued frames there (their given-back pages are freed first) and
    /// forget that frames there were given back whole.
    pub(crate) fn settle_give_backs(
        &mut self,
        first: u64,
        n: u64,
        q: &dyn Quiesce,
    ) -> Result<(), GuestMemError> {
        let mut due = Vec::new();
        for (frame, _, _) in spans(first, n) {
            due.extend(self.give_back.queue.take_frame(frame));
            self.give_back.released.remove(&frame);
        }
        if !due.is_empty() {
            let mut rep = GiveBackReport::default();
            self.split_due(due, q, &mut rep)?;
        }
        Ok(())
    }

    /// Refill of `[first, first + n)`: queued pages there are still backed
    /// (zeroed in place, as a taken-back page reads zero) and leave the
    /// queue; a frame given back whole there gets its huge page back now.
    pub(crate) fn take_back_given(&mut self, first: u64, n: u64) -> Result<(), GuestMemError> {
        for (frame, lo, hi) in spans(first, n) {
            let back = self.give_back.queue.take_back(frame, lo, hi);
            if !back.is_empty() {
                self.host.zero_in_place(frame, &back);
            }
            if self.give_back.released.remove(&frame) && self.frame_is_huge(frame) {
                // Faulting in fires no mmu notifier: KVM keeps what it maps.
                self.host.populate_frame(frame)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cut_at_frame_edges() {
        assert_eq!(spans(510, 4), vec![(0, 510, 512), (1, 0, 2)]);
        assert_eq!(spans(512, 512), vec![(1, 0, 512)]);
        assert!(spans(3, 0).is_empty());
    }
}
