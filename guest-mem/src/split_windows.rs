//! How long each hugetlb split held back writes to its frame: the one
//! thing a split without a pause costs the guest (only a writer of that
//! frame waits, see `write_hold.rs`); also a collapse's hold (a 2M frame
//! with every page present, or the climb back of a GiB whose frames are all
//! on 2M pages). The VMM's reports take them.
//!
//! Also the gate a vCPU pause waits at while a write-hold is on: a writer
//! asleep in the write-protect fault inside the kernel (KVM emulating a
//! guest write to guest RAM, `copy_to_user`) must not be kicked by the
//! pause's signal, which would fail that write instead of letting it sleep
//! until the frame is remapped. Holds last a few hundred microseconds
//! (a 2M split), or the copy of 1 GiB (a 1G split or collapse, ~0.1 s).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Windows kept until taken (later ones are dropped).
const MAX_WINDOWS: usize = 100_000;

/// One split (or collapse) made with the vCPUs running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitWindow {
    /// Writes to the frame held back: from the write-protect, through the
    /// copy, to the wake after the remap.
    pub write_hold: Duration,
    /// A collapse's hold (2M or 1G), not a split's.
    pub collapse: bool,
    /// The split's small pages (a 2M collapse: its huge page) were
    /// allocated ahead (the split or collapse reserve): it allocated
    /// nothing on its path.
    pub prepared: bool,
}

/// The windows of the splits made since the last [`SplitWindows::take`].
#[derive(Debug, Default)]
pub struct SplitWindows {
    windows: Mutex<Vec<SplitWindow>>,
    gate: Mutex<Gate>,
    released: Condvar,
    on_record: Mutex<Option<OnRecord>>,
}

/// What [`SplitWindows::set_on_record`] registered.
struct OnRecord(Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for OnRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnRecord")
    }
}

#[derive(Debug, Default)]
struct Gate {
    /// Write-holds on now.
    holding: usize,
    /// vCPU pauses in force (or waiting to kick): no new hold starts.
    pausing: usize,
}

/// A write-hold that is on; it ends on drop.
#[derive(Debug)]
pub(crate) struct HoldOn<'a> {
    windows: &'a SplitWindows,
    since: Instant,
}

impl HoldOn<'_> {
    /// How long the hold has been on.
    pub(crate) fn elapsed(&self) -> Duration {
        self.since.elapsed()
    }
}

impl Drop for HoldOn<'_> {
    fn drop(&mut self) {
        let mut g = self.windows.gate();
        g.holding = g.holding.saturating_sub(1);
        self.windows.released.notify_all();
    }
}

impl SplitWindows {
    fn lock(&self) -> MutexGuard<'_, Vec<SplitWindow>> {
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The windows since the last call.
    pub fn take(&self) -> Vec<SplitWindow> {
        std::mem::take(&mut *self.lock())
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A split is about to write-protect a frame: `None` while a vCPU pause
    /// is in force or about to kick (the split then copies under a pause
    /// of its own).
    pub(crate) fn hold_on(&self) -> Option<HoldOn<'_>> {
        let mut g = self.gate();
        if g.pausing > 0 {
            return None;
        }
        g.holding += 1;
        Some(HoldOn {
            windows: self,
            since: Instant::now(),
        })
    }

    /// A vCPU pause begins: no new write-hold starts until
    /// [`Self::pause_ends`], and this waits (at most `max`) for the holds
    /// on now to end. `false` when one still is after `max` (the pause is
    /// counted all the same: call [`Self::pause_ends`]).
    pub fn pause_begins(&self, max: Duration) -> bool {
        let mut g = self.gate();
        g.pausing += 1;
        let (_g, waited) = self
            .released
            .wait_timeout_while(g, max, |g| g.holding > 0)
            .unwrap_or_else(|p| p.into_inner());
        !waited.timed_out()
    }

    /// A vCPU pause ended (or failed).
    pub fn pause_ends(&self) {
        let mut g = self.gate();
        g.pausing = g.pausing.saturating_sub(1);
    }

    pub(crate) fn record(&self, w: SplitWindow) {
        {
            let mut v = self.lock();
            if v.len() < MAX_WINDOWS {
                v.push(w);
            }
        }
        let hook = self.on_record.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = hook.as_ref() {
            (f.0)();
        }
    }

    /// Call `f` after each window is recorded (each split or collapse made
    /// with the vCPUs running, under the RAM lock: `f` must be quick and
    /// must not take that lock). The VMM wakes its reserve worker so: the
    /// split took a block of the split reserve, the split frame wants a
    /// huge page ahead of its collapse.
    pub fn set_on_record(&self, f: impl Fn() + Send + Sync + 'static) {
        *self.on_record.lock().unwrap_or_else(|p| p.into_inner()) = Some(OnRecord(Box::new(f)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_runs_after_each_record() {
        let s = SplitWindows::default();
        let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let m = n.clone();
        s.set_on_record(move || {
            m.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let w = SplitWindow {
            write_hold: Duration::from_micros(1),
            collapse: false,
            prepared: true,
        };
        s.record(w);
        s.record(w);
        assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(s.take().len(), 2);
    }

    #[test]
    fn take_empties_and_the_cap_holds() {
        let s = SplitWindows::default();
        let w = SplitWindow {
            write_hold: Duration::from_micros(7),
            collapse: false,
            prepared: false,
        };
        for _ in 0..MAX_WINDOWS + 3 {
            s.record(w);
        }
        assert_eq!(s.take().len(), MAX_WINDOWS);
        assert!(s.take().is_empty());
    }

    #[test]
    fn a_pause_waits_for_the_hold_to_end_and_no_hold_starts_while_paused() {
        let s = std::sync::Arc::new(SplitWindows::default());
        assert!(s.pause_begins(Duration::ZERO));
        assert!(s.hold_on().is_none(), "a hold started during a pause");
        s.pause_ends();
        let hold = s.hold_on().expect("no pause in force");
        assert!(!s.pause_begins(Duration::from_millis(5)));
        s.pause_ends();
        let s2 = s.clone();
        let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r2 = released.clone();
        let waiter = std::thread::spawn(move || {
            let ok = s2.pause_begins(Duration::from_secs(10));
            // Read before the pause ends: true only if it waited for the
            // hold (set just before the hold drops).
            let after_release = r2.load(std::sync::atomic::Ordering::SeqCst);
            s2.pause_ends();
            (ok, after_release)
        });
        std::thread::sleep(Duration::from_millis(30));
        released.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(hold);
        let (ok, after_release) = waiter.join().unwrap();
        assert!(ok);
        assert!(after_release, "the pause began while the hold was on");
        assert!(s.hold_on().is_some());
    }
}
