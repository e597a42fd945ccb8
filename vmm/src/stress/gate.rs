//! The write-protect gate: while the injector holds a range read-only, a
//! vCPU whose write faults there (`KVM_RUN` fails with `EFAULT`, with or
//! without `KVM_EXIT_MEMORY_FAULT`) waits here until the range is writable
//! again, then re-runs the faulting instruction. The guest never sees it.

use std::ops::Range;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct State {
    /// The range (gpa) held read-only now.
    closed: Option<Range<u64>>,
    /// The last range held read-only, and when it was released.
    last: Option<(Range<u64>, Instant)>,
    /// Faults taken in the current episode.
    episode_faults: u64,
    /// Faults taken in all.
    faults: u64,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct WriteGate {
    st: Mutex<State>,
    cv: Condvar,
}

/// How long after a release a fault on the released range is still
/// explained by it (the fault raced with the release).
const LATE_FAULT: Duration = Duration::from_secs(1);

/// A write fault the gate cannot explain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KVM_RUN failed with EFAULT at gpa {gpa:?} outside any write-protected range")]
pub struct UnexplainedFault {
    /// The gpa KVM reported, if it did.
    pub gpa: Option<u64>,
}

impl WriteGate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start an episode: `range` is about to become read-only.
    pub fn close(&self, range: Range<u64>) {
        let mut st = self.lock();
        st.closed = Some(range);
        st.episode_faults = 0;
    }

    /// End the episode: the range is writable again.
    pub fn open(&self) {
        let mut st = self.lock();
        if let Some(r) = st.closed.take() {
            st.last = Some((r, Instant::now()));
        }
        self.cv.notify_all();
    }

    /// Faults in the current episode.
    pub fn episode_faults(&self) -> u64 {
        self.lock().episode_faults
    }

    /// Wait up to `max` for the first fault of the current episode.
    pub fn wait_fault(&self, max: Duration) -> bool {
        let (_st, waited) = self
            .cv
            .wait_timeout_while(self.lock(), max, |st| st.episode_faults == 0)
            .unwrap_or_else(|p| p.into_inner());
        !waited.timed_out()
    }

    /// Faults in all.
    pub fn faults(&self) -> u64 {
        self.lock().faults
    }

    /// A vCPU's write faulted at `gpa` (when KVM said): wait until the range
    /// is writable again or `stopping()` says the run ends. `Err` when no
    /// write protection explains the fault.
    pub fn wait_writable(
        &self,
        gpa: Option<u64>,
        stopping: impl Fn() -> bool,
    ) -> Result<(), UnexplainedFault> {
        let mut st = self.lock();
        let explained = match (&st.closed, &st.last, gpa) {
            (Some(r), _, Some(g)) if r.contains(&g) => true,
            (_, Some((r, t)), Some(g)) => r.contains(&g) && t.elapsed() < LATE_FAULT,
            (Some(_), _, None) => true,
            (None, Some((_, t)), None) => t.elapsed() < LATE_FAULT,
            _ => false,
        };
        if !explained {
            return Err(UnexplainedFault { gpa });
        }
        st.faults += 1;
        st.episode_faults += 1;
        self.cv.notify_all();
        while st.closed.is_some() && !stopping() {
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(5))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn faults_wait_for_the_release_and_strays_are_errors() {
        let g = Arc::new(WriteGate::default());
        assert_eq!(
            g.wait_writable(Some(0x1000), || false),
            Err(UnexplainedFault { gpa: Some(0x1000) })
        );
        g.close(0x20_0000..0x40_0000);
        let g2 = g.clone();
        let h = std::thread::spawn(move || g2.wait_writable(Some(0x30_0000), || false));
        assert!(g.wait_fault(Duration::from_secs(10)));
        assert!(!h.is_finished());
        assert!(g.wait_writable(Some(0x50_0000), || false).is_err());
        g.open();
        assert_eq!(h.join().unwrap(), Ok(()));
        assert_eq!(g.faults(), 1);
        // Late fault on the range just released: explained, no wait.
        assert_eq!(g.wait_writable(Some(0x30_0000), || false), Ok(()));
    }
}
