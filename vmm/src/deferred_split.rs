//! The deferred-split worker: the shrinker of the balloon's deferred-split
//! queue (the kernel's `deferred_split_scan` idea, `thp::give_back`). A frame
//! the guest gave back in part waits on the queue so that later inflate
//! buffers can complete it (then it is freed whole, without a split); the
//! worker splits every frame whose first given-back page has waited the
//! policy's delay, waking at least every [`max_period`] of it, so every
//! given-back page is freed on the host within `delay + period + one split`
//! (default 500 ms + 100 ms). `vmm ctl split` splits the whole queue at once.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_mem::{GiveBackReport, GuestMemError};

use crate::balloon_backend::record;
use crate::ram_handle::RamHandle;
use crate::stop_signal::StopSignal;
use crate::unmap_stats::TimedQuiesce;

/// Longest sleep between two scans for a queue delay of `delay`: a fifth of
/// it, between 10 ms and 100 ms.
pub fn max_period(delay: Duration) -> Duration {
    (delay / 5).clamp(Duration::from_millis(10), Duration::from_millis(100))
}

/// Split the queued frames that are due under (`delay`, `max_wait`) (all of
/// them with `delay` zero).
/// Lock order: balloon transport, guest RAM (as the balloon's own path).
/// Not on a vCPU thread unless it counts as parked.
pub fn split_due(
    m: &dyn RamHandle,
    delay: Duration,
    max_wait: Duration,
) -> Result<GiveBackReport, GuestMemError> {
    let mut out = Ok(GiveBackReport::default());
    m.with_balloon_ram(&mut |ram, metrics| {
        let timed = TimedQuiesce::new(m.vcpus());
        out = ram.split_deferred(delay, max_wait, &timed);
        if let Ok(rep) = &out {
            if *rep != GiveBackReport::default() {
                log::debug!(
                    "deferred split: {} frame(s) split, {} pages freed",
                    rep.frames_split,
                    rep.pages_freed
                );
                record(m, metrics, rep, None, &timed.windows());
            }
        }
    });
    out
}

/// The worker of one machine.
#[derive(Debug)]
pub struct DeferredSplitter {
    delay: Duration,
    max_wait: Duration,
    stop: StopSignal,
}

impl DeferredSplitter {
    /// A worker splitting frames due under (`delay`, `max_wait`).
    pub fn new(delay: Duration, max_wait: Duration) -> Arc<DeferredSplitter> {
        Arc::new(DeferredSplitter {
            delay,
            max_wait,
            stop: StopSignal::default(),
        })
    }

    /// Start the thread; it ends on [`Self::stop`] or when the machine is gone.
    pub fn spawn(
        self: &Arc<Self>,
        m: Weak<impl RamHandle + 'static>,
    ) -> std::io::Result<JoinHandle<()>> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("deferred-split".into())
            .spawn(move || me.run(m))
    }

    fn run(&self, m: Weak<impl RamHandle>) {
        let period = max_period(self.delay.min(self.max_wait));
        let mut next = Instant::now() + period;
        loop {
            if self
                .stop
                .wait(next.saturating_duration_since(Instant::now()))
            {
                return;
            }
            let Some(machine) = m.upgrade() else {
                return;
            };
            if machine.vcpus().stopping() {
                return;
            }
            if let Err(e) = split_due(&*machine, self.delay, self.max_wait) {
                log::warn!("deferred split failed: {e}; the frames stay queued or backed");
            }
            // Wake when the oldest queued frame is due, at the latest after `period`.
            let wait = machine
                .ram()
                .next_deferred_due(self.delay, self.max_wait)
                .map_or(period, |d| d.min(period))
                .max(Duration::from_millis(1));
            next = Instant::now() + wait;
        }
    }

    /// Ask the thread to end.
    pub fn stop(&self) {
        self.stop.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_is_a_fifth_of_the_delay_within_bounds() {
        assert_eq!(
            max_period(Duration::from_millis(500)),
            Duration::from_millis(100)
        );
        assert_eq!(
            max_period(Duration::from_millis(200)),
            Duration::from_millis(40)
        );
        assert_eq!(max_period(Duration::ZERO), Duration::from_millis(10));
        assert_eq!(
            max_period(Duration::from_secs(60)),
            Duration::from_millis(100)
        );
    }
}
