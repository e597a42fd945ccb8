//! Quiescing the vCPUs while a frame's pages are copied and remapped.
//!
//! This crate knows nothing of KVM: the caller (the VMM) implements
//! [`Quiesce`] by stopping its vCPU threads; tests use [`NoVcpus`].

/// Pausing the vCPUs failed.
#[derive(Debug, thiserror::Error)]
#[error("could not pause the vCPUs: {reason}")]
pub struct QuiesceError {
    /// Why.
    pub reason: String,
}

/// Something that can stop every vCPU from touching guest RAM.
pub trait Quiesce {
    /// Stop every vCPU; on `Ok` no vCPU touches guest RAM until [`Quiesce::resume`].
    fn pause(&self) -> Result<(), QuiesceError>;
    /// Let the vCPUs run again.
    fn resume(&self);
}

/// The implementation for callers without vCPUs (tests, tools).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoVcpus;

impl Quiesce for NoVcpus {
    fn pause(&self) -> Result<(), QuiesceError> {
        Ok(())
    }
    fn resume(&self) {}
}

/// Resumes the vCPUs when dropped.
pub struct QuiesceGuard<'a> {
    q: &'a dyn Quiesce,
}

impl std::fmt::Debug for QuiesceGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QuiesceGuard")
    }
}

/// Pause through `q`; the vCPUs resume when the guard drops.
pub fn pause(q: &dyn Quiesce) -> Result<QuiesceGuard<'_>, QuiesceError> {
    q.pause()?;
    Ok(QuiesceGuard { q })
}

impl Drop for QuiesceGuard<'_> {
    fn drop(&mut self) {
        self.q.resume();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    struct Counting {
        paused: Cell<i32>,
        fail: bool,
    }
    impl Quiesce for Counting {
        fn pause(&self) -> Result<(), QuiesceError> {
            if self.fail {
                return Err(QuiesceError {
                    reason: "vcpu 1 did not stop".into(),
                });
            }
            self.paused.set(self.paused.get() + 1);
            Ok(())
        }
        fn resume(&self) {
            self.paused.set(self.paused.get() - 1);
        }
    }

    #[test]
    fn guard_resumes_on_drop() {
        let c = Counting {
            paused: Cell::new(0),
            fail: false,
        };
        {
            let _g = pause(&c).unwrap();
            assert_eq!(c.paused.get(), 1);
        }
        assert_eq!(c.paused.get(), 0);
    }

    #[test]
    fn failed_pause_has_no_guard() {
        let c = Counting {
            paused: Cell::new(0),
            fail: true,
        };
        let e = pause(&c).unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not pause the vCPUs: vcpu 1 did not stop"
        );
        assert_eq!(c.paused.get(), 0);
    }
}
