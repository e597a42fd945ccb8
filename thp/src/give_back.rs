//! Pages of huge frames the guest gave back, coalesced per 2M frame across
//! requests (balloon inflate buffers carry at most 256 PFNs, so no single
//! buffer ever covers a frame), and the deferred-split queue of frames given
//! back in part.
//!
//! The kernel's idea (mm/huge_memory.c): a partially unmapped THP is not split
//! at once; `deferred_split_folio` queues it and the shrinker
//! (`deferred_split_scan`) splits it later, freeing the unmapped parts. Here a
//! frame whose every page has been given back meanwhile never needs a split at
//! all: it is freed whole. Time is a [`Duration`] on a monotonic clock the
//! caller chooses (no syscall here).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::units::PAGES_PER_HPAGE_USIZE;

const WORDS: usize = PAGES_PER_HPAGE_USIZE / 64;

/// One frame's given-back pages, not yet freed on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    bits: [u64; WORDS],
    /// When the first of them was given back.
    since: Duration,
}

impl Pending {
    fn count(&self) -> u32 {
        self.bits.iter().map(|w| w.count_ones()).sum()
    }

    fn has(&self, page: u16) -> bool {
        self.bits[page as usize / 64] & (1 << (page % 64)) != 0
    }

    fn set(&mut self, page: u16) {
        self.bits[page as usize / 64] |= 1 << (page % 64);
    }

    fn clear(&mut self, page: u16) -> bool {
        let had = self.has(page);
        self.bits[page as usize / 64] &= !(1 << (page % 64));
        had
    }

    fn pages(&self) -> Vec<u16> {
        (0..PAGES_PER_HPAGE_USIZE as u16)
            .filter(|p| self.has(*p))
            .collect()
    }
}

/// A frame leaving the queue: its given-back pages and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueFrame {
    /// The frame.
    pub frame: usize,
    /// Given-back page indices (sorted); all 512 when the frame is whole.
    pub pages: Vec<u16>,
    /// When the first of them was given back.
    pub since: Duration,
}

impl DueFrame {
    /// Every page of the frame was given back.
    pub fn is_whole(&self) -> bool {
        self.pages.len() == PAGES_PER_HPAGE_USIZE
    }
}

/// What [`GiveBackQueue::deferred_split_folio`] decided for a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coalesced {
    /// Every page of the frame is given back now: free it whole (no split).
    Whole(DueFrame),
    /// Part of the frame is given back: it waits on the deferred-split queue.
    Queued {
        /// Pages of the frame given back so far.
        pending: u32,
        /// The frame was not on the queue before.
        newly_queued: bool,
    },
}

/// When queued frames are split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitPolicy {
    /// Split a partly given-back frame at once (no coalescing across requests).
    Eager,
    /// Queue it; split it once the guest has given nothing back for
    /// `delay` (its give-back stream paused: no later buffer will complete
    /// the frame soon), or once its first page has waited `max_wait`.
    Deferred {
        /// Quiet time after the last give-back before queued frames are split.
        delay: Duration,
        /// Longest a given-back page stays backed on the host, whatever the guest does.
        max_wait: Duration,
    },
}

impl Default for SplitPolicy {
    fn default() -> Self {
        SplitPolicy::Deferred {
            delay: Duration::from_millis(500),
            max_wait: Duration::from_millis(1000),
        }
    }
}

/// Counters of the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Frames that went on the queue (each time one was queued afresh).
    pub frames_deferred: u64,
    /// Frames that left the queue whole (freed without a split).
    pub frames_completed: u64,
    /// Frames taken off the queue for a split.
    pub frames_due: u64,
}

/// Given-back pages per huge frame and the deferred-split queue.
#[derive(Debug, Clone, Default)]
pub struct GiveBackQueue {
    frames: BTreeMap<usize, Pending>,
    /// When the guest last gave a page of a huge frame back.
    last_give_back: Option<Duration>,
    stats: QueueStats,
}

impl GiveBackQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// `deferred_split_folio` (mm/huge_memory.c, Linux 6.18), for a guest
    /// frame: the kernel queues a large folio once part of it is unmapped, so
    /// that the shrinker splits it later instead of the unmap path splitting
    /// it at once. Here `pages` (indices in `frame`, given back at `now`) join
    /// the frame's earlier given-back pages; when they cover the frame it
    /// leaves the queue as [`Coalesced::Whole`] (freed whole, never split),
    /// otherwise it waits ([`Coalesced::Queued`]) for
    /// [`Self::deferred_split_scan`]. Page indices beyond the frame are ignored.
    pub fn deferred_split_folio(
        &mut self,
        frame: usize,
        pages: impl IntoIterator<Item = u16>,
        now: Duration,
    ) -> Coalesced {
        let newly_queued = !self.frames.contains_key(&frame);
        self.last_give_back = Some(self.last_give_back.map_or(now, |t| t.max(now)));
        let p = self.frames.entry(frame).or_insert(Pending {
            bits: [0; WORDS],
            since: now,
        });
        for page in pages {
            if (page as usize) < PAGES_PER_HPAGE_USIZE {
                p.set(page);
            }
        }
        let pending = p.count();
        if pending as usize == PAGES_PER_HPAGE_USIZE {
            let since = p.since;
            self.frames.remove(&frame);
            if !newly_queued {
                self.stats.frames_completed += 1;
            }
            return Coalesced::Whole(DueFrame {
                frame,
                pages: (0..PAGES_PER_HPAGE_USIZE as u16).collect(),
                since,
            });
        }
        if newly_queued {
            self.stats.frames_deferred += 1;
        }
        Coalesced::Queued {
            pending,
            newly_queued,
        }
    }

    /// Whether `pages` (free right now but not given back for good, as a free
    /// page report's: the guest may reuse them at any moment after the
    /// report) complete `frame` together with its queued pages. If so the
    /// frame leaves the queue whole; if not nothing is remembered.
    pub fn complete_with(&mut self, frame: usize, pages: &[u16]) -> Option<DueFrame> {
        let p = self.frames.get(&frame)?;
        let mut all = p.clone();
        for &page in pages {
            if (page as usize) < PAGES_PER_HPAGE_USIZE {
                all.set(page);
            }
        }
        if all.count() as usize != PAGES_PER_HPAGE_USIZE {
            return None;
        }
        self.frames.remove(&frame);
        self.stats.frames_completed += 1;
        Some(DueFrame {
            frame,
            pages: all.pages(),
            since: all.since,
        })
    }

    /// `deferred_split_scan` (mm/huge_memory.c, Linux 6.18): the shrinker of
    /// the deferred-split queue splits the queued folios, freeing their
    /// unmapped parts. Here the frames leave the queue to be split when the
    /// guest's give-back stream has been quiet for `delay` at `now` (a later
    /// buffer is no longer on its way to complete them), or, one by one,
    /// when a frame's first given-back page has waited `max_wait` (the bound
    /// on host memory staying backed). `delay` zero takes every frame (a
    /// split on request or under pressure).
    pub fn deferred_split_scan(
        &mut self,
        now: Duration,
        delay: Duration,
        max_wait: Duration,
    ) -> Vec<DueFrame> {
        let quiet = self
            .last_give_back
            .is_none_or(|t| now.saturating_sub(t) >= delay);
        let due: Vec<usize> = self
            .frames
            .iter()
            .filter(|(_, p)| quiet || now.saturating_sub(p.since) >= max_wait)
            .map(|(f, _)| *f)
            .collect();
        due.into_iter().filter_map(|f| self.take_frame(f)).collect()
    }

    /// When the next queued frame is due under (`delay`, `max_wait`), as a
    /// time on the caller's clock (`None` with an empty queue).
    pub fn next_due(&self, delay: Duration, max_wait: Duration) -> Option<Duration> {
        let oldest = self.oldest()?;
        let by_quiet = self.last_give_back.map_or(oldest, |t| t + delay);
        Some(by_quiet.min(oldest + max_wait))
    }

    /// Take `frame` off the queue (its pages are to be freed now, e.g. before
    /// another operation on the frame).
    pub fn take_frame(&mut self, frame: usize) -> Option<DueFrame> {
        let p = self.frames.remove(&frame)?;
        self.stats.frames_due += 1;
        Some(DueFrame {
            frame,
            pages: p.pages(),
            since: p.since,
        })
    }

    /// The guest takes pages `[lo, hi)` of `frame` back before they were
    /// freed: they leave the queue (the frame too once none is left).
    /// Returns the pages that were queued.
    pub fn take_back(&mut self, frame: usize, lo: u16, hi: u16) -> Vec<u16> {
        let Some(p) = self.frames.get_mut(&frame) else {
            return Vec::new();
        };
        let back: Vec<u16> = (lo..hi.min(PAGES_PER_HPAGE_USIZE as u16))
            .filter(|i| p.clear(*i))
            .collect();
        if p.count() == 0 {
            self.frames.remove(&frame);
        }
        back
    }

    /// Whether page `page` of `frame` is queued.
    pub fn is_queued(&self, frame: usize, page: u16) -> bool {
        self.frames.get(&frame).is_some_and(|p| p.has(page))
    }

    /// Frames on the queue now.
    pub fn frames_queued(&self) -> usize {
        self.frames.len()
    }

    /// Given-back pages still backed on the host.
    pub fn pages_queued(&self) -> u64 {
        self.frames.values().map(|p| u64::from(p.count())).sum()
    }

    /// When the oldest queued page was given back.
    pub fn oldest(&self) -> Option<Duration> {
        self.frames.values().map(|p| p.since).min()
    }

    /// The counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn buffers_of_256_pages_coalesce_into_a_whole_frame() {
        let mut q = GiveBackQueue::new();
        let a = q.deferred_split_folio(3, 0..256, ms(0));
        assert_eq!(
            a,
            Coalesced::Queued {
                pending: 256,
                newly_queued: true
            }
        );
        assert_eq!(q.frames_queued(), 1);
        let Coalesced::Whole(d) = q.deferred_split_folio(3, 256..512, ms(5)) else {
            panic!("a covered frame must leave whole");
        };
        assert!(d.is_whole());
        assert_eq!((d.frame, d.since), (3, ms(0)));
        assert_eq!(q.frames_queued(), 0);
        assert_eq!(q.stats().frames_completed, 1);
        // Nothing is left for the shrinker.
        assert!(q.deferred_split_scan(ms(10_000), ms(0), ms(0)).is_empty());
    }

    #[test]
    fn one_request_covering_a_frame_is_whole_at_once() {
        let mut q = GiveBackQueue::new();
        assert!(matches!(
            q.deferred_split_folio(0, 0..512, ms(1)),
            Coalesced::Whole(_)
        ));
        assert_eq!(q.stats(), QueueStats::default());
    }

    #[test]
    fn a_partial_frame_waits_while_the_guest_keeps_giving_back() {
        let mut q = GiveBackQueue::new();
        q.deferred_split_folio(7, [1, 2, 3], ms(100));
        // Another frame keeps the stream going: frame 7 stays queued...
        q.deferred_split_folio(8, [0], ms(500));
        assert!(q
            .deferred_split_scan(ms(900), ms(500), ms(5_000))
            .is_empty());
        assert_eq!(q.next_due(ms(500), ms(5_000)), Some(ms(1_000)));
        // ...until the stream has been quiet for the delay.
        let due = q.deferred_split_scan(ms(1_000), ms(500), ms(5_000));
        assert_eq!(due.len(), 2);
        assert_eq!(due[0].pages, vec![1, 2, 3]);
        assert!(!due[0].is_whole());
        assert_eq!(q.frames_queued(), 0);
        assert_eq!(q.stats().frames_deferred, 2);
        assert_eq!(q.stats().frames_due, 2);
    }

    #[test]
    fn max_wait_bounds_a_page_under_a_continuous_stream() {
        let mut q = GiveBackQueue::new();
        q.deferred_split_folio(1, [9], ms(0));
        for t in (100..=1_000).step_by(100) {
            q.deferred_split_folio(2 + t as usize, [0], ms(t));
        }
        assert_eq!(q.next_due(ms(500), ms(1_000)), Some(ms(1_000)));
        let due = q.deferred_split_scan(ms(1_000), ms(500), ms(1_000));
        assert_eq!(due.len(), 1, "only the frame that waited max_wait");
        assert_eq!(due[0].frame, 1);
        assert_eq!(q.frames_queued(), 10);
    }

    #[test]
    fn zero_delay_takes_every_frame() {
        let mut q = GiveBackQueue::new();
        q.deferred_split_folio(1, [0], ms(10));
        q.deferred_split_folio(2, [5], ms(20));
        assert_eq!(q.pages_queued(), 2);
        assert_eq!(q.oldest(), Some(ms(10)));
        assert_eq!(q.deferred_split_scan(ms(20), ms(0), ms(0)).len(), 2);
    }

    #[test]
    fn take_back_leaves_the_queue_and_never_splits() {
        let mut q = GiveBackQueue::new();
        q.deferred_split_folio(4, 10..20, ms(0));
        assert_eq!(q.take_back(4, 15, 30), (15..20).collect::<Vec<_>>());
        assert!(q.is_queued(4, 10) && !q.is_queued(4, 15));
        q.take_back(4, 0, 512);
        assert_eq!(q.frames_queued(), 0);
        assert!(q.deferred_split_scan(ms(9_999), ms(0), ms(0)).is_empty());
    }

    #[test]
    fn a_free_report_completes_a_queued_frame_but_is_not_remembered() {
        let mut q = GiveBackQueue::new();
        assert_eq!(q.complete_with(5, &(0..512).collect::<Vec<_>>()), None);
        q.deferred_split_folio(5, 0..300, ms(0));
        // Not enough: nothing of the report stays queued.
        assert_eq!(q.complete_with(5, &(300..400).collect::<Vec<_>>()), None);
        assert_eq!(q.pages_queued(), 300);
        let d = q.complete_with(5, &(300..512).collect::<Vec<_>>()).unwrap();
        assert!(d.is_whole());
        assert_eq!(q.frames_queued(), 0);
    }

    #[test]
    fn pages_beyond_a_frame_are_ignored() {
        let mut q = GiveBackQueue::new();
        q.deferred_split_folio(0, [511, 512, 9999], ms(0));
        assert_eq!(q.pages_queued(), 1);
    }
}
