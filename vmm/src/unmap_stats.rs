//! Measurements of guest-driven partial unmap: how long a guest's give-back
//! request takes until the frame is mapped with 4K pages, how long the vCPUs
//! stay paused per split and per collapse (a hugetlb split, and a collapse of
//! a frame with every page present, pauses none where the host can
//! write-protect: then how long it held back writes to the frame, see
//! `guest_mem::SplitWindows`),
//! and how fast frames collapse. [`TimedQuiesce`] wraps the vCPU control
//! and times every pause window.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::sync::Arc;

use guest_mem::{Quiesce, QuiesceError, SplitWindows};
use serde::Serialize;

/// Samples kept per series (older ones are dropped, the counts stay exact).
const MAX_SAMPLES: usize = 100_000;

/// A series of durations in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Series {
    /// How many events (all of them, even beyond the kept samples).
    pub count: u64,
    /// Median in microseconds (`None` without samples).
    pub median_us: Option<f64>,
    /// Largest sample in microseconds.
    pub max_us: Option<f64>,
    /// The samples kept, microseconds, in order of arrival.
    pub samples_us: Vec<f64>,
}

impl Series {
    /// Add one sample.
    pub fn push(&mut self, d: Duration) {
        self.count += 1;
        if self.samples_us.len() < MAX_SAMPLES {
            self.samples_us.push(d.as_secs_f64() * 1e6);
        }
        self.median_us = median(&self.samples_us);
        self.max_us = self.samples_us.iter().copied().reduce(f64::max);
    }

    /// The series without its samples (for short replies).
    pub fn summary(&self) -> Series {
        Series {
            count: self.count,
            median_us: self.median_us,
            max_us: self.max_us,
            samples_us: Vec::new(),
        }
    }
}

/// The median of `v` (mean of the two middle values for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// Everything measured about splits and collapses in one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UnmapMetrics {
    /// Huge frames split because part of them was given back.
    pub frames_split: u64,
    /// Whole huge frames given back without a split.
    pub huge_frames_freed: u64,
    /// 4K pages given back (discarded).
    pub pages_discarded: u64,
    /// 4K pages taken back (refilled).
    pub pages_refilled: u64,
    /// Frames collapsed back to one huge page.
    pub frames_collapsed: u64,
    /// Collapses the policy or the host refused.
    pub collapse_refused: u64,
    /// From the guest's request (the I/O or MMIO exit) to the split frame being
    /// mapped with 4K pages on the host, one sample per give-back that split.
    pub split_latency: Series,
    /// vCPU pause windows while a split copied and remapped pages (hugetlb
    /// where the host cannot write-protect; `thp` splits pause too).
    pub split_pause: Series,
    /// Per hugetlb split without a pause: how long writes to the frame were
    /// held back (write-protected from before the copy to after the remap;
    /// only a writer of that frame waits, reads go on).
    pub split_write_hold: Series,
    /// Of those splits: how many found their small pages allocated ahead
    /// (the split reserve) and allocated nothing on their path.
    pub splits_onto_reserve: u64,
    /// Time per collapse (copy + remap, or `MADV_COLLAPSE`).
    pub collapse_time: Series,
    /// vCPU pause windows per collapse (hugetlb, a frame with pages
    /// missing or where the host cannot write-protect).
    pub collapse_pause: Series,
    /// Per hugetlb collapse without a pause (every page present): how long
    /// writes to the frame were held back (only a writer of it waits).
    pub collapse_write_hold: Series,
    /// Collapses that found their huge page allocated ahead (the collapse
    /// reserve) and allocated nothing on their path.
    pub collapses_onto_reserve: u64,
    /// Frames collapsed per second of collapse work (`frames_collapsed` over
    /// the summed `collapse_time`).
    pub collapse_rate_frames_per_s: Option<f64>,
}

impl UnmapMetrics {
    /// The metrics without sample lists.
    pub fn summary(&self) -> UnmapMetrics {
        UnmapMetrics {
            split_latency: self.split_latency.summary(),
            split_pause: self.split_pause.summary(),
            split_write_hold: self.split_write_hold.summary(),
            collapse_time: self.collapse_time.summary(),
            collapse_pause: self.collapse_pause.summary(),
            collapse_write_hold: self.collapse_write_hold.summary(),
            ..self.clone()
        }
    }
}

/// What one give-back did, for [`UnmapRecorder::give_back`].
#[derive(Debug, Clone, Copy, Default)]
pub struct GiveBack {
    /// Frames split.
    pub frames_split: u64,
    /// Whole huge frames freed.
    pub huge_frames_freed: u64,
    /// Pages freed.
    pub pages: u64,
}

/// Shared, thread-safe recorder of [`UnmapMetrics`].
#[derive(Debug, Default)]
pub struct UnmapRecorder {
    m: Mutex<UnmapMetrics>,
    collapse_secs: Mutex<f64>,
    /// Where splits record their write-hold windows.
    windows: Option<Arc<SplitWindows>>,
}

impl UnmapRecorder {
    /// A recorder that also takes the splits' windows from `windows`.
    pub fn with_split_windows(windows: Arc<SplitWindows>) -> UnmapRecorder {
        UnmapRecorder {
            windows: Some(windows),
            ..UnmapRecorder::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, UnmapMetrics> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A give-back finished; `requested` is when the guest asked (its exit).
    pub fn give_back(&self, g: GiveBack, requested: Option<Instant>, pauses: &[Duration]) {
        let mut m = self.lock();
        m.frames_split += g.frames_split;
        m.huge_frames_freed += g.huge_frames_freed;
        m.pages_discarded += g.pages;
        if g.frames_split > 0 {
            if let Some(t) = requested {
                m.split_latency.push(t.elapsed());
            }
            for p in pauses {
                m.split_pause.push(*p);
            }
        }
        self.take_windows(&mut m);
    }

    /// The write-hold windows of splits and collapses made since the last
    /// call, into their series.
    fn take_windows(&self, m: &mut UnmapMetrics) {
        for w in self.windows.iter().flat_map(|w| w.take()) {
            if w.collapse {
                m.collapse_write_hold.push(w.write_hold);
                m.collapses_onto_reserve += u64::from(w.prepared);
            } else {
                m.split_write_hold.push(w.write_hold);
                m.splits_onto_reserve += u64::from(w.prepared);
            }
        }
    }

    /// Pages taken back.
    pub fn refilled(&self, pages: u64) {
        self.lock().pages_refilled += pages;
    }

    /// A frame collapsed in `took`, with the vCPUs paused for `pauses`.
    pub fn collapsed(&self, took: Duration, pauses: &[Duration]) {
        let secs = {
            let mut s = self.collapse_secs.lock().unwrap_or_else(|p| p.into_inner());
            *s += took.as_secs_f64();
            *s
        };
        let mut m = self.lock();
        m.frames_collapsed += 1;
        m.collapse_time.push(took);
        for p in pauses {
            m.collapse_pause.push(*p);
        }
        self.take_windows(&mut m);
        if secs > 0.0 {
            m.collapse_rate_frames_per_s = Some(m.frames_collapsed as f64 / secs);
        }
    }

    /// A collapse was refused.
    pub fn collapse_refused(&self) {
        self.lock().collapse_refused += 1;
    }

    /// A copy of the metrics.
    pub fn snapshot(&self) -> UnmapMetrics {
        self.lock().clone()
    }
}

/// A [`Quiesce`] that times each pause window of an inner one.
pub struct TimedQuiesce<'a> {
    inner: &'a dyn Quiesce,
    started: Mutex<Option<Instant>>,
    windows: Mutex<Vec<Duration>>,
}

impl<'a> TimedQuiesce<'a> {
    /// Time the pauses of `inner`.
    pub fn new(inner: &'a dyn Quiesce) -> Self {
        TimedQuiesce {
            inner,
            started: Mutex::new(None),
            windows: Mutex::new(Vec::new()),
        }
    }

    /// The pause windows so far.
    pub fn windows(&self) -> Vec<Duration> {
        self.windows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Quiesce for TimedQuiesce<'_> {
    fn pause(&self) -> Result<(), QuiesceError> {
        self.inner.pause()?;
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        Ok(())
    }

    fn resume(&self) {
        let started = self
            .started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = started {
            self.windows
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(t.elapsed());
        }
        self.inner.resume();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_mem::NoVcpus;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn timed_quiesce_records_each_window() {
        let t = TimedQuiesce::new(&NoVcpus);
        t.pause().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.resume();
        t.pause().unwrap();
        t.resume();
        let w = t.windows();
        assert_eq!(w.len(), 2);
        assert!(w[0] >= Duration::from_millis(2));
    }

    #[test]
    fn recorder_counts_and_rates() {
        let r = UnmapRecorder::default();
        let g = GiveBack {
            frames_split: 1,
            huge_frames_freed: 0,
            pages: 1,
        };
        r.give_back(g, Some(Instant::now()), &[Duration::from_micros(10)]);
        r.give_back(GiveBack::default(), Some(Instant::now()), &[]);
        r.collapsed(Duration::from_millis(500), &[]);
        r.collapsed(Duration::from_millis(500), &[]);
        let s = r.snapshot();
        assert_eq!(s.frames_split, 1);
        assert_eq!(s.split_latency.count, 1);
        assert_eq!(s.split_pause.samples_us, vec![10.0]);
        assert_eq!(s.frames_collapsed, 2);
        assert_eq!(s.collapse_rate_frames_per_s, Some(2.0));
        assert!(s.summary().collapse_time.samples_us.is_empty());
    }
}
