//! What the balloon's give-backs did (`balloon.give_back` in `vmm ctl stats`
//! and the run report): huge frames freed whole, frames split, frames
//! deferred, vCPU pauses, and the time from a page being given back to its
//! host memory being freed.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use guest_mem::{GiveBackReport, GiveBackStatus, SplitPolicy};
use serde::Serialize;

use crate::unmap_stats::Series;

/// The balloon's give-back counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GiveBackMetrics {
    /// `eager` or `deferred`.
    pub split_policy: String,
    /// Deferred: quiet time after the guest's last give-back before queued
    /// frames are split, in milliseconds.
    pub split_delay_ms: Option<u64>,
    /// Deferred: the longest a given-back page stays backed, in milliseconds.
    pub split_max_wait_ms: Option<u64>,
    /// Huge frames freed whole: no split, no copy.
    pub whole_frames_freed: u64,
    /// Huge frames split (their kept pages copied to small pages).
    pub frames_split: u64,
    /// Frames that went on the deferred-split queue (most leave it whole).
    pub frames_deferred: u64,
    /// Frames that left the queue whole.
    pub frames_completed: u64,
    /// 4K pages freed on the host.
    pub pages_freed: u64,
    /// Frames on the queue now.
    pub frames_queued: usize,
    /// Given-back pages still backed on the host now.
    pub pages_queued: u64,
    /// How long the oldest queued page has waited, milliseconds.
    pub oldest_wait_ms: Option<f64>,
    /// Frames given back whole that the guest has not touched in again.
    pub released_frames: usize,
    /// vCPU pause windows of the splits.
    pub split_pause: Series,
    /// Per freed huge frame: from the first of its pages given back to its
    /// host memory freed.
    pub give_back_to_freed: Series,
}

/// Thread-safe recorder of [`GiveBackMetrics`].
#[derive(Debug, Default)]
pub struct GiveBackRecorder {
    m: Mutex<GiveBackMetrics>,
}

/// The report's spelling of a policy: name, delay and max wait in milliseconds.
pub fn policy_name(p: SplitPolicy) -> (&'static str, Option<u64>, Option<u64>) {
    match p {
        SplitPolicy::Eager => ("eager", None, None),
        SplitPolicy::Deferred { delay, max_wait } => (
            "deferred",
            Some(delay.as_millis() as u64),
            Some(max_wait.as_millis() as u64),
        ),
    }
}

impl GiveBackRecorder {
    /// A recorder for `policy`.
    pub fn new(policy: SplitPolicy) -> Self {
        let (name, delay, max_wait) = policy_name(policy);
        GiveBackRecorder {
            m: Mutex::new(GiveBackMetrics {
                split_policy: name.into(),
                split_delay_ms: delay,
                split_max_wait_ms: max_wait,
                ..GiveBackMetrics::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GiveBackMetrics> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record one give-back call and the vCPU pauses it took.
    pub fn record(&self, r: &GiveBackReport, pauses: &[Duration]) {
        let mut m = self.lock();
        m.whole_frames_freed += r.whole_frames_freed;
        m.frames_split += r.frames_split;
        m.frames_deferred += r.frames_deferred;
        m.pages_freed += r.pages_freed;
        for d in &r.freed_after {
            m.give_back_to_freed.push(*d);
        }
        if r.frames_split > 0 {
            for p in pauses {
                m.split_pause.push(*p);
            }
        }
    }

    /// The metrics, with the queue's state `st` now.
    pub fn snapshot(&self, st: Option<&GiveBackStatus>) -> GiveBackMetrics {
        let mut m = self.lock().clone();
        if let Some(st) = st {
            m.frames_completed = st.queue.frames_completed;
            m.frames_queued = st.frames_queued;
            m.pages_queued = st.pages_queued;
            m.oldest_wait_ms = st.oldest_wait.map(|d| d.as_secs_f64() * 1e3);
            m.released_frames = st.released_frames;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_sum_and_time_freed_frames() {
        let r = GiveBackRecorder::new(SplitPolicy::default());
        r.record(
            &GiveBackReport {
                whole_frames_freed: 2,
                frames_deferred: 3,
                pages_freed: 1024,
                freed_after: vec![Duration::from_millis(1), Duration::from_millis(3)],
                ..Default::default()
            },
            &[Duration::from_micros(50)],
        );
        r.record(
            &GiveBackReport {
                frames_split: 1,
                pages_freed: 10,
                freed_after: vec![Duration::from_millis(500)],
                ..Default::default()
            },
            &[Duration::from_micros(70)],
        );
        let m = r.snapshot(None);
        assert_eq!(m.split_policy, "deferred");
        assert_eq!(m.split_delay_ms, Some(500));
        assert_eq!(m.split_max_wait_ms, Some(1000));
        assert_eq!((m.whole_frames_freed, m.frames_split), (2, 1));
        assert_eq!((m.frames_deferred, m.pages_freed), (3, 1034));
        assert_eq!(m.give_back_to_freed.count, 3);
        // Only the split's pauses count.
        assert_eq!(m.split_pause.count, 1);
    }
}
