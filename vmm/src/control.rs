//! Stopping and parking vCPU threads: pause/resume for `guest_mem::Quiesce`,
//! and the final stop. A vCPU is kicked out of `KVM_RUN` with a real-time
//! signal whose handler does nothing (`KVM_RUN` then returns `EINTR`).
//! Kicks repeat until every vCPU is parked, so a signal that lands just
//! before a vCPU enters `KVM_RUN` cannot be lost.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use guest_mem::{Quiesce, QuiesceError, SplitWindows};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// How long a pause may wait for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(20);
/// Interval between kicks.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the no-op handler of the kick signal (once per process).
pub fn install_kick_handler() -> Result<(), std::io::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(SIGRTMIN(), kick_handler) {
            result = Err(std::io::Error::from_raw_os_error(e.errno()));
        }
    });
    result
}

#[derive(Debug, Default)]
struct State {
    /// Pause requests in force.
    pausers: usize,
    /// vCPU threads outside the guest that will not enter it while paused.
    parked: usize,
    /// vCPU threads alive.
    active: usize,
    /// Everything stops.
    stop: bool,
    /// pthread ids of live vCPU threads.
    threads: Vec<Option<libc::pthread_t>>,
}

/// Shared control block of all vCPU threads.
#[derive(Debug, Default)]
pub struct VcpuControl {
    state: Mutex<State>,
    cv: Condvar,
    /// How long a pause waits (`None`: [`PAUSE_TIMEOUT`]).
    pause_timeout: Option<Duration>,
    /// Guest RAM's split write-holds: a pause waits for the one on now
    /// before it kicks (a kick would fail a guest write KVM is making
    /// inside the kernel, asleep on the write-protect) and keeps new ones
    /// off while in force.
    holds: Option<Arc<SplitWindows>>,
}

impl VcpuControl {
    /// A control block for `vcpus` threads (registered as they start).
    pub fn new(vcpus: usize) -> VcpuControl {
        VcpuControl {
            state: Mutex::new(State {
                threads: vec![None; vcpus],
                ..State::default()
            }),
            cv: Condvar::new(),
            pause_timeout: None,
            holds: None,
        }
    }

    /// The same, pausing only between guest RAM's split write-holds.
    pub fn with_split_holds(mut self, holds: Arc<SplitWindows>) -> VcpuControl {
        self.holds = Some(holds);
        self
    }

    /// The same with another pause timeout (tests).
    pub fn with_pause_timeout(mut self, t: Duration) -> VcpuControl {
        self.pause_timeout = Some(t);
        self
    }

    /// Pause requests in force.
    pub fn pausers(&self) -> usize {
        self.lock().pausers
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by vCPU thread `index` when it starts.
    pub fn thread_started(&self, index: usize) {
        let mut st = self.lock();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if let Some(slot) = st.threads.get_mut(index) {
            *slot = Some(me);
        }
        st.active += 1;
        self.cv.notify_all();
    }

    /// Called by vCPU thread `index` when it ends.
    pub fn thread_exited(&self, index: usize) {
        let mut st = self.lock();
        if let Some(slot) = st.threads.get_mut(index) {
            *slot = None;
        }
        st.active = st.active.saturating_sub(1);
        self.cv.notify_all();
    }

    /// Called by a vCPU thread before each `KVM_RUN`: parks while a pause is
    /// in force; `false` when the thread must end.
    pub fn before_run(&self) -> bool {
        let mut st = self.lock();
        while st.pausers > 0 && !st.stop {
            st.parked += 1;
            self.cv.notify_all();
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            st.parked -= 1;
        }
        !st.stop
    }

    /// Run `f` on a vCPU thread while counting this thread as parked: for exit
    /// handlers that wait on a lock another vCPU may hold while it pauses.
    pub fn parked_while<T>(&self, f: impl FnOnce() -> T) -> T {
        self.lock().parked += 1;
        self.cv.notify_all();
        let r = f();
        self.lock().parked -= 1;
        r
    }

    /// Whether a stop was requested.
    pub fn stopping(&self) -> bool {
        self.lock().stop
    }

    /// Kick every vCPU out of `KVM_RUN`, then wait (the lock released) for a
    /// change of state or [`KICK_INTERVAL`], whichever comes first.
    fn kick_and_wait<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.kick_all(&st);
        self.cv
            .wait_timeout(st, KICK_INTERVAL)
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    fn kick_all(&self, st: &State) {
        for t in st.threads.iter().flatten() {
            // SAFETY: `t` is the pthread id of a vCPU thread registered in
            // `thread_started` and removed (under this same lock) before it
            // exits, so it names a live thread; the signal has a no-op handler.
            unsafe {
                libc::pthread_kill(*t, SIGRTMIN());
            }
        }
    }

    /// Kick every vCPU out of `KVM_RUN` once (it runs again at once unless
    /// paused or stopped): to make each vCPU thread look at its vCPU.
    pub fn kick(&self) {
        let st = self.lock();
        self.kick_all(&st);
    }

    /// Stop every vCPU for good and wait until all threads left the guest.
    pub fn stop(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        st.stop = true;
        self.cv.notify_all();
        while st.active > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            st = self.kick_and_wait(st);
        }
        true
    }
}

impl Quiesce for VcpuControl {
    fn pause(&self) -> Result<(), QuiesceError> {
        let timeout = self.pause_timeout.unwrap_or(PAUSE_TIMEOUT);
        let deadline = Instant::now() + timeout;
        if let Some(h) = &self.holds {
            if !h.pause_begins(timeout) {
                h.pause_ends();
                return Err(QuiesceError {
                    reason: format!("a split's write-hold stayed on for {timeout:?}"),
                });
            }
        }
        let mut st = self.lock();
        st.pausers += 1;
        while st.parked < st.active {
            if Instant::now() >= deadline {
                let (parked, active) = (st.parked, st.active);
                // Saturating: a resume that came in meanwhile may already
                // have taken this pause's count away.
                st.pausers = st.pausers.saturating_sub(1);
                self.cv.notify_all();
                if let Some(h) = &self.holds {
                    h.pause_ends();
                }
                return Err(QuiesceError {
                    reason: format!("only {parked} of {active} vCPUs parked within {timeout:?}"),
                });
            }
            st = self.kick_and_wait(st);
        }
        Ok(())
    }

    fn resume(&self) {
        let mut st = self.lock();
        st.pausers = st.pausers.saturating_sub(1);
        self.cv.notify_all();
        drop(st);
        if let Some(h) = &self.holds {
            h.pause_ends();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn resume_during_a_pause_that_times_out_does_not_underflow() {
        let c = Arc::new(VcpuControl::new(1).with_pause_timeout(Duration::from_millis(300)));
        // A vCPU that never parks (stuck outside `before_run`).
        c.thread_started(0);
        let c2 = c.clone();
        let pauser = std::thread::spawn(move || c2.pause());
        while c.pausers() == 0 {
            std::thread::yield_now();
        }
        c.resume(); // a resume accepted while the pause still waits
        assert!(pauser.join().unwrap().is_err(), "the pause cannot succeed");
        assert_eq!(c.pausers(), 0, "pauser count wrapped");
        c.thread_exited(0);
        // A vCPU starting now runs (would park forever after an underflow).
        c.thread_started(0);
        let c3 = c.clone();
        let runner = std::thread::spawn(move || c3.before_run());
        assert!(runner.join().unwrap());
    }

    #[test]
    fn pause_parks_all_threads_and_resume_releases_them() {
        install_kick_handler().unwrap();
        let c = Arc::new(VcpuControl::new(2));
        let counter = Arc::new(AtomicU64::new(0));
        let in_guest = Arc::new(AtomicBool::new(false));
        let mut hs = Vec::new();
        for i in 0..2 {
            let (c, counter, in_guest) = (c.clone(), counter.clone(), in_guest.clone());
            hs.push(std::thread::spawn(move || {
                c.thread_started(i);
                while c.before_run() {
                    // Stand-in for KVM_RUN: a short stretch of "guest" work.
                    in_guest.store(true, Ordering::SeqCst);
                    counter.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(100));
                    in_guest.store(false, Ordering::SeqCst);
                }
                c.thread_exited(i);
            }));
        }
        while c.lock().active < 2 {
            std::thread::yield_now();
        }
        c.pause().unwrap();
        assert!(!in_guest.load(Ordering::SeqCst));
        let before = counter.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            counter.load(Ordering::SeqCst),
            before,
            "a vCPU ran while paused"
        );
        c.resume();
        while counter.load(Ordering::SeqCst) == before {
            std::thread::yield_now();
        }
        assert!(c.stop(Duration::from_secs(5)));
        for h in hs {
            h.join().unwrap();
        }
    }
}
