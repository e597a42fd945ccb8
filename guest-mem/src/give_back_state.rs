//! What a `GuestRam` remembers of balloon give-backs between calls: the
//! per-frame deferred-split queue and the frames given back whole
//! ([`crate::give_back`] acts on it).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use thp::give_back::GiveBackQueue;

/// Per-`GuestRam` state of balloon give-backs.
#[derive(Debug)]
pub(crate) struct GiveBackState {
    pub(crate) queue: GiveBackQueue,
    epoch: Instant,
    /// Frames given back whole whose huge page is not on the host until the
    /// guest touches the frame again (books: huge, on their slot).
    pub(crate) released: BTreeSet<usize>,
}

impl Default for GiveBackState {
    fn default() -> Self {
        Self {
            queue: GiveBackQueue::new(),
            epoch: Instant::now(),
            released: BTreeSet::new(),
        }
    }
}

impl GiveBackState {
    /// Time since this `GuestRam` was made (give-back ages are measured from it).
    pub(crate) fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Whether `frame` was given back whole and not (known to be) touched since.
    pub(crate) fn is_released(&self, frame: usize) -> bool {
        self.released.contains(&frame)
    }
}
