//! The stop request of a service thread (collapser, deferred splitter,
//! split reserve): a flag and a condition variable, so a thread sleeping
//! between rounds wakes at once when asked to end.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// A one-way "stop" flag a sleeping thread waits on.
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl StopSignal {
    fn lock(&self) -> MutexGuard<'_, bool> {
        self.stopped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps up to `d`; `true` when the stop was asked for (before or
    /// meanwhile).
    pub fn wait(&self, d: Duration) -> bool {
        let g = self.lock();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, d, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }

    /// Asks the thread to end and wakes it.
    pub fn stop(&self) {
        *self.lock() = true;
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
}
