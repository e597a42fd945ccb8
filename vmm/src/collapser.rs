//! The background collapser: khugepaged's role for guest RAM. A thread wakes
//! every `scan_sleep_ms`, scans `pages_to_scan` pages' worth of frames (512
//! per frame) from where it stopped, and collapses each small-page frame the
//! policy allows back into one huge page (hugetlb: the vCPUs are paused for
//! the copy; thp: `MADV_COLLAPSE`). The policy is `thp::policy::Khugepaged`:
//! a frame qualifies when it has at most `max_ptes_none` pages not present
//! (`Khugepaged::none_ptes_within_limit`, the rule of `thp`'s khugepaged).
//! The VMM's default `max_ptes_none` is 0 (only frames whose pages are all
//! present again, e.g. after a balloon deflate): the kernel's 511 would
//! re-fill every page the guest gave back.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_mem::{FrameView, GuestMemError, PAGES_PER_HPAGE};
use thp::policy::Khugepaged;
use thp::ram_model::ModelError;

use crate::ram_handle::RamHandle;
use crate::stop_signal::StopSignal;
use crate::unmap_stats::TimedQuiesce;

/// The collapser's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollapserConfig {
    /// khugepaged tunables: `scan_sleep_ms`, `pages_to_scan`, `max_ptes_none`.
    pub khugepaged: Khugepaged,
    /// Run the background thread (checkpoint passes of test guests run
    /// whenever a collapser exists).
    pub background: bool,
}

impl CollapserConfig {
    /// Frames scanned per wake-up (at least one).
    pub fn frames_per_scan(&self) -> usize {
        (self.khugepaged.pages_to_scan as usize / PAGES_PER_HPAGE as usize).max(1)
    }

    /// Whether a frame in `state` qualifies for a collapse: a small frame
    /// within khugepaged's none-PTE limit
    /// ([`Khugepaged::none_ptes_within_limit`], the rule `thp` applies).
    pub fn eligible(&self, state: FrameView) -> bool {
        match state {
            FrameView::Small { present } => self.khugepaged.none_ptes_within_limit(present),
            _ => false,
        }
    }
}

/// The collapser of one machine.
#[derive(Debug)]
pub struct Collapser {
    cfg: CollapserConfig,
    /// Next frame to scan; held for a whole pass so passes never overlap.
    cursor: Mutex<usize>,
    stop: StopSignal,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Collapser {
    /// A collapser with `cfg`.
    pub fn new(cfg: CollapserConfig) -> Arc<Collapser> {
        Arc::new(Collapser {
            cfg,
            cursor: Mutex::new(0),
            stop: StopSignal::default(),
        })
    }

    /// Its policy.
    pub fn config(&self) -> CollapserConfig {
        self.cfg
    }

    /// Collapse `frame` if it still qualifies. Lock order: balloon transport,
    /// guest RAM (as on the balloon's path). Not on a vCPU thread unless it
    /// counts as parked.
    fn collapse_frame(&self, m: &dyn RamHandle, frame: usize) -> bool {
        let mut collapsed = false;
        m.with_ram_after_balloon(&mut |ram| {
            if !self.cfg.eligible(ram.frame_state(frame)) {
                return;
            }
            let timed = TimedQuiesce::new(m.vcpus());
            let t = Instant::now();
            match ram.collapse(frame, &timed) {
                Ok(()) => {
                    m.recorder().collapsed(t.elapsed(), &timed.windows());
                    log::debug!("collapser: frame {frame} collapsed in {:?}", t.elapsed());
                    collapsed = true;
                }
                Err(e) => {
                    m.recorder().collapse_refused();
                    match e {
                        GuestMemError::Model(
                            ModelError::HugePoolEmpty { .. } | ModelError::CollapseRefused { .. },
                        ) => log::debug!("collapser: frame {frame} not collapsed: {e}"),
                        e => log::warn!("collapser: collapsing frame {frame} failed: {e}"),
                    }
                }
            }
        });
        collapsed
    }

    fn scan(&self, m: &dyn RamHandle, frames: Option<usize>) -> u64 {
        let mut cursor = lock(&self.cursor);
        // Frame by frame: a wake-up scans a few frames, it must not copy
        // every frame's state of guest RAM (up to 511 GiB) to do so.
        let total = m.ram().frames();
        if total == 0 {
            return 0;
        }
        let n = frames.unwrap_or(total).min(total);
        let mut collapsed = 0;
        for i in 0..n {
            let f = (*cursor + i) % total;
            let state = m.ram().frame_state(f);
            if self.cfg.eligible(state) && self.collapse_frame(m, f) {
                collapsed += 1;
            }
        }
        *cursor = (*cursor + n) % total;
        collapsed
    }

    /// One pass over every frame; returns how many collapsed.
    pub fn pass_all(&self, m: &dyn RamHandle) -> u64 {
        self.scan(m, None)
    }

    /// One khugepaged wake-up: `pages_to_scan` pages' worth of frames.
    pub fn pass(&self, m: &dyn RamHandle) -> u64 {
        self.scan(m, Some(self.cfg.frames_per_scan()))
    }

    /// Start the background thread (if configured); it ends after
    /// [`Collapser::stop`] or when the VM is gone.
    pub fn spawn(
        self: &Arc<Self>,
        m: Weak<impl RamHandle + 'static>,
    ) -> std::io::Result<Option<JoinHandle<()>>> {
        if !self.cfg.background {
            return Ok(None);
        }
        let me = self.clone();
        let sleep = Duration::from_millis(u64::from(self.cfg.khugepaged.scan_sleep_ms));
        std::thread::Builder::new()
            .name("collapser".into())
            .spawn(move || loop {
                if me.stop.wait(sleep) {
                    return;
                }
                let Some(m) = m.upgrade() else { return };
                if m.vcpus().stopping() {
                    return;
                }
                let n = me.pass(m.as_ref());
                if n > 0 {
                    log::info!("collapser: {n} frame(s) collapsed");
                }
            })
            .map(Some)
    }

    /// Stop the background thread.
    pub fn stop(&self) {
        self.stop.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_ptes_none: u32, pages_to_scan: u32) -> CollapserConfig {
        CollapserConfig {
            khugepaged: Khugepaged {
                max_ptes_none,
                pages_to_scan,
                ..Khugepaged::default()
            },
            background: false,
        }
    }

    #[test]
    fn eligibility_follows_max_ptes_none() {
        let c = cfg(0, 4096);
        assert!(c.eligible(FrameView::Small { present: 512 }));
        assert!(!c.eligible(FrameView::Small { present: 511 }));
        assert!(!c.eligible(FrameView::Huge { slot: 0 }));
        assert!(!c.eligible(FrameView::Unpopulated));
        let k = cfg(511, 4096);
        assert!(k.eligible(FrameView::Small { present: 1 }));
        assert!(!k.eligible(FrameView::Small { present: 0 }));
    }

    #[test]
    fn frames_per_scan_from_pages_to_scan() {
        assert_eq!(cfg(0, 4096).frames_per_scan(), 8);
        assert_eq!(cfg(0, 1).frames_per_scan(), 1);
    }
}
