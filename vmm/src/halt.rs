//! Recognising a guest that halted for good.
//!
//! A Linux kernel without a power-off method (the test kernel has no ACPI) turns
//! `poweroff` into a halt: it prints `reboot: System halted` and every CPU executes
//! `hlt` with interrupts disabled (`native_machine_halt` -> `stop_this_cpu`). With
//! the in-kernel irqchip that `hlt` never leaves `KVM_RUN`, so the VMM sees no exit.
//! The run loop therefore asks, once a second, every vCPU thread to look at its own
//! vCPU: it kicks them out of `KVM_RUN`, and each answers with
//! [`halted_for_good`] of its `KVM_GET_MP_STATE` and RFLAGS. When every vCPU
//! answers "halted with interrupts off" in [`CONFIRMATIONS`] probes in a row, the
//! guest has halted for good: nothing but an NMI could wake it, and this VMM sends
//! none.

use std::sync::atomic::{AtomicU64, Ordering};

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// Probes in a row that must find every vCPU halted with interrupts off.
pub const CONFIRMATIONS: u32 = 2;

/// Whether a vCPU in `mp_state` with `rflags` is halted and cannot be woken by
/// an interrupt.
pub fn halted_for_good(mp_state: u32, rflags: u64) -> bool {
    mp_state == kvm_bindings::KVM_MP_STATE_HALTED && rflags & RFLAGS_IF == 0
}

/// The probe's shared state: a generation number per request, and each vCPU's
/// answer to the latest one (`generation << 1 | halted`).
#[derive(Debug)]
pub struct HaltWatch {
    generation: AtomicU64,
    answers: Vec<AtomicU64>,
}

impl HaltWatch {
    /// A watch over `vcpus` vCPUs, no request yet.
    pub fn new(vcpus: usize) -> Self {
        HaltWatch {
            generation: AtomicU64::new(0),
            answers: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Start a new probe; returns its generation (the caller then kicks the vCPUs).
    pub fn request(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The generation vCPU `index` has yet to answer, if any.
    pub fn wanted(&self, index: usize) -> Option<u64> {
        let g = self.generation.load(Ordering::SeqCst);
        let a = self.answers.get(index)?.load(Ordering::SeqCst);
        (g > 0 && a >> 1 != g).then_some(g)
    }

    /// vCPU `index` answers probe `generation`.
    pub fn answer(&self, index: usize, generation: u64, halted: bool) {
        if let Some(a) = self.answers.get(index) {
            a.store(generation << 1 | u64::from(halted), Ordering::SeqCst);
        }
    }

    /// Whether every vCPU answered probe `generation` with "halted for good".
    pub fn all_halted(&self, generation: u64) -> bool {
        !self.answers.is_empty()
            && self
                .answers
                .iter()
                .all(|a| a.load(Ordering::SeqCst) == (generation << 1 | 1))
    }
}

/// The run loop's side: probe once per call, count confirmations.
#[derive(Debug, Default)]
pub struct HaltTracker {
    last: Option<u64>,
    confirmed: u32,
}

impl HaltTracker {
    /// Look at the answers to the previous probe and start the next one
    /// (`kick` makes the vCPUs answer). `true` once the guest halted for good.
    pub fn step(&mut self, w: &HaltWatch, kick: impl FnOnce()) -> bool {
        if let Some(g) = self.last {
            if w.all_halted(g) {
                self.confirmed += 1;
            } else {
                self.confirmed = 0;
            }
        }
        if self.confirmed >= CONFIRMATIONS {
            return true;
        }
        self.last = Some(w.request());
        kick();
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE};

    #[test]
    fn only_hlt_with_interrupts_off_is_for_good() {
        assert!(halted_for_good(KVM_MP_STATE_HALTED, 0x2));
        assert!(!halted_for_good(KVM_MP_STATE_HALTED, 0x202)); // waits for the timer
        assert!(!halted_for_good(KVM_MP_STATE_RUNNABLE, 0x2)); // cli; spinning
    }

    #[test]
    fn every_vcpu_must_answer_halted_in_consecutive_probes() {
        let w = HaltWatch::new(2);
        let mut t = HaltTracker::default();
        assert_eq!(w.wanted(0), None, "nothing asked yet");
        assert!(!t.step(&w, || {}));
        let g = w.wanted(0).unwrap();
        w.answer(0, g, true);
        assert_eq!(w.wanted(0), None);
        // vCPU 1 does not answer (still running guest code): no confirmation.
        assert!(!t.step(&w, || {}));
        let g = w.wanted(1).unwrap();
        w.answer(0, g, true);
        w.answer(1, g, true);
        assert!(!t.step(&w, || {}), "one confirmation is not enough");
        let g = w.wanted(0).unwrap();
        w.answer(0, g, true);
        w.answer(1, g, false); // woke up (an interrupt came in)
        assert!(!t.step(&w, || {}));
        let both_halted = |w: &HaltWatch| {
            let g = w.wanted(0).unwrap();
            w.answer(0, g, true);
            w.answer(1, g, true);
        };
        both_halted(&w);
        assert!(!t.step(&w, || {}), "first confirmation after the wake-up");
        both_halted(&w);
        assert!(t.step(&w, || {}), "{CONFIRMATIONS} confirmations in a row");
    }

    #[test]
    fn stale_answers_do_not_count() {
        let w = HaltWatch::new(1);
        let g1 = w.request();
        w.answer(0, g1, true);
        let g2 = w.request();
        assert!(!w.all_halted(g2));
        assert_eq!(w.wanted(0), Some(g2));
    }
}
