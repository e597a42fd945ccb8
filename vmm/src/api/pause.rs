//! The API's pause of the vCPUs: one pause at a time, and a `resume` only
//! once that pause has answered. A `resume` accepted while a `pause` still
//! waits for the vCPUs to park would take the waiting pause's count away
//! (the vCPUs run while the reply says `paused: true`, and the pause's own
//! timeout path would then release a count it no longer holds).

use std::sync::{Mutex, MutexGuard};

use guest_mem::Quiesce;

/// Where the API's pause stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PauseState {
    /// The API holds no pause.
    #[default]
    Running,
    /// A `pause` waits for the vCPUs to park.
    Pausing,
    /// The API holds a pause.
    Paused,
}

/// The API's pause, shared by its connections.
#[derive(Debug, Default)]
pub struct ApiPause {
    state: Mutex<PauseState>,
}

impl ApiPause {
    fn lock(&self) -> MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> PauseState {
        *self.lock()
    }

    /// Whether the API holds a pause (the vCPUs are parked).
    pub fn is_paused(&self) -> bool {
        self.state() == PauseState::Paused
    }

    /// Pause through `q`; the error is the reply's text.
    pub fn pause(&self, q: &dyn Quiesce) -> Result<(), String> {
        {
            let mut s = self.lock();
            match *s {
                PauseState::Running => *s = PauseState::Pausing,
                PauseState::Pausing => {
                    return Err("a pause is already waiting for the vCPUs to park".into())
                }
                PauseState::Paused => {
                    return Err("the vCPUs are already paused (send resume)".into())
                }
            }
        }
        // The lock is not held while the vCPUs park (up to the pause timeout).
        let r = q.pause();
        let mut s = self.lock();
        match r {
            Ok(()) => {
                *s = PauseState::Paused;
                Ok(())
            }
            Err(e) => {
                *s = PauseState::Running;
                Err(e.to_string())
            }
        }
    }

    /// Resume through `q`; the error is the reply's text.
    pub fn resume(&self, q: &dyn Quiesce) -> Result<(), String> {
        let mut s = self.lock();
        match *s {
            PauseState::Paused => {
                q.resume();
                *s = PauseState::Running;
                Ok(())
            }
            PauseState::Pausing => Err(
                "a pause is still waiting for the vCPUs to park: send resume after it has answered"
                    .into(),
            ),
            PauseState::Running => Err("the vCPUs are not paused (send pause first)".into()),
        }
    }

    /// Give back a pause the API holds (the server is going away).
    pub fn release(&self, q: &dyn Quiesce) {
        let mut s = self.lock();
        if *s == PauseState::Paused {
            q.resume();
            *s = PauseState::Running;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_mem::QuiesceError;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::mpsc;
    use std::sync::Arc;

    /// A `Quiesce` whose pause waits for a go from the test, then succeeds
    /// or fails; it counts pausers the way `VcpuControl` does.
    struct Fake {
        pausers: AtomicI64,
        go: Mutex<mpsc::Receiver<bool>>,
    }

    impl Quiesce for Fake {
        fn pause(&self) -> Result<(), QuiesceError> {
            self.pausers.fetch_add(1, Ordering::SeqCst);
            let ok = self.go.lock().unwrap().recv().unwrap();
            if ok {
                Ok(())
            } else {
                self.pausers.fetch_sub(1, Ordering::SeqCst);
                Err(QuiesceError {
                    reason: "timed out".into(),
                })
            }
        }
        fn resume(&self) {
            self.pausers.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn fake() -> (Arc<Fake>, mpsc::Sender<bool>) {
        let (tx, rx) = mpsc::channel();
        let f = Fake {
            pausers: AtomicI64::new(0),
            go: Mutex::new(rx),
        };
        (Arc::new(f), tx)
    }

    #[test]
    fn resume_while_a_pause_waits_is_refused() {
        for pause_succeeds in [false, true] {
            let (q, go) = fake();
            let p = Arc::new(ApiPause::default());
            let (p2, q2) = (p.clone(), q.clone());
            let t = std::thread::spawn(move || p2.pause(&*q2));
            while p.state() != PauseState::Pausing {
                std::thread::yield_now();
            }
            assert!(!p.is_paused(), "paused reported before the vCPUs parked");
            let e = p.resume(&*q).unwrap_err();
            assert!(e.contains("still waiting"), "{e}");
            assert!(p.pause(&*q).unwrap_err().contains("already waiting"));
            go.send(pause_succeeds).unwrap();
            assert_eq!(t.join().unwrap().is_ok(), pause_succeeds);
            assert_eq!(p.is_paused(), pause_succeeds);
            assert_eq!(q.pausers.load(Ordering::SeqCst), i64::from(pause_succeeds));
            if pause_succeeds {
                p.resume(&*q).unwrap();
            }
            assert_eq!(q.pausers.load(Ordering::SeqCst), 0, "count never negative");
            assert!(p.resume(&*q).unwrap_err().contains("not paused"));
        }
    }
}
