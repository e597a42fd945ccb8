//! The stop request of a service thread (collapser, deferred splitter,
//! split reserve): a flag and a condition variable, so a thread sleeping
//! between rounds wakes at once when asked to end.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// A one-way "stop" flag a sleeping thread waits on; [`StopSignal::wake`]
/// ends one sleep early without stopping.
#[derive(Debug, Default)]
pub struct StopSignal {
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct State {
    stopped: bool,
    /// A wake since the last sleep ended.
    woken: bool,
}

impl StopSignal {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps up to `d`, or until a stop or a wake (one that came while the
    /// thread was awake ends the next sleep at once); `true` when the stop
    /// was asked for (before or meanwhile).
    pub fn wait(&self, d: Duration) -> bool {
        self.wait_for_wake(d).0
    }

    /// [`Self::wait`], also saying whether a wake ended the sleep:
    /// (stopped, woken).
    pub fn wait_for_wake(&self, d: Duration) -> (bool, bool) {
        let g = self.lock();
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, d, |s| !s.stopped && !s.woken)
            .unwrap_or_else(|p| p.into_inner());
        let woken = std::mem::take(&mut g.woken);
        (g.stopped, woken)
    }

    /// Ends the thread's current (or next) sleep: there is work.
    pub fn wake(&self) {
        self.lock().woken = true;
        self.cv.notify_all();
    }

    /// Asks the thread to end and wakes it.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_times_out_until_stopped_then_returns_at_once() {
        let s = StopSignal::default();
        assert!(!s.wait(Duration::from_millis(1)));
        s.stop();
        let t = std::time::Instant::now();
        assert!(s.wait(Duration::from_secs(60)));
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_wake_ends_one_sleep_without_stopping() {
        let s = std::sync::Arc::new(StopSignal::default());
        s.wake();
        let t = std::time::Instant::now();
        assert_eq!(s.wait_for_wake(Duration::from_secs(60)), (false, true));
        assert!(t.elapsed() < Duration::from_secs(10));
        // Consumed: the next sleep runs its time out.
        assert_eq!(s.wait_for_wake(Duration::from_millis(1)), (false, false));
        let w = s.clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            w.wake();
        });
        let t = std::time::Instant::now();
        assert!(!s.wait(Duration::from_secs(60)));
        assert!(t.elapsed() < Duration::from_secs(10));
        waker.join().unwrap();
    }
}
