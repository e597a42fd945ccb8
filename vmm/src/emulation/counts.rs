//! How many instructions of each kind the quirk layer handled.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::decide::Quirk;

/// Per-kind counters, shared by the vCPU threads.
#[derive(Debug, Default)]
pub struct QuirkCounts([AtomicU64; Quirk::ALL.len()]);

impl QuirkCounts {
    /// All zero.
    pub const fn new() -> QuirkCounts {
        QuirkCounts([const { AtomicU64::new(0) }; Quirk::ALL.len()])
    }

    /// One more `q` handled.
    pub fn record(&self, q: Quirk) {
        self.0[q.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// How many `q` were handled.
    pub fn get(&self, q: Quirk) -> u64 {
        self.0[q.index()].load(Ordering::Relaxed)
    }

    /// Every kind by name (zeros included, so the report's keys are stable).
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        Quirk::ALL
            .iter()
            .map(|&q| (q.name().to_string(), self.get(q)))
            .collect()
    }
}

static COUNTS: QuirkCounts = QuirkCounts::new();

/// The counters of this process. `vmm run` runs one VM per process, so they
/// are that VM's.
pub fn counts() -> &'static QuirkCounts {
    &COUNTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind_with_every_kind_named() {
        let c = QuirkCounts::new();
        c.record(Quirk::Fwait);
        c.record(Quirk::Fwait);
        c.record(Quirk::Int3);
        assert_eq!(c.get(Quirk::Fwait), 2);
        let s = c.snapshot();
        assert_eq!(s.get("fwait"), Some(&2));
        assert_eq!(s.get("int3"), Some(&1));
        assert_eq!(s.get("ud"), Some(&0));
        assert_eq!(s.len(), Quirk::ALL.len());
    }

    #[test]
    fn kinds_are_indexed_in_order() {
        for (i, q) in Quirk::ALL.iter().enumerate() {
            assert_eq!(q.index(), i);
        }
    }
}
