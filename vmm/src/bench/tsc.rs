//! The TSC frequency that converts the guest's and the native loop's rdtsc
//! cycles to nanoseconds.
//!
//! Source, in order: `KVM_GET_TSC_KHZ` on a vCPU of a throw-away VM (the rate
//! a new vCPU's TSC runs at, which is the rate the test guest sees), else the
//! host TSC calibrated against `CLOCK_MONOTONIC`. Both are measured and kept:
//! a large difference is logged, since the native loop reads the host TSC.

use std::path::Path;
use std::time::{Duration, Instant};

/// A TSC frequency and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TscFreq {
    /// kHz used for the conversion.
    pub khz: u64,
    /// `"KVM_GET_TSC_KHZ"` or `"calibrated against CLOCK_MONOTONIC"`.
    pub source: &'static str,
    /// The host TSC calibrated against CLOCK_MONOTONIC (kHz).
    pub calibrated_khz: u64,
}

impl TscFreq {
    /// Nanoseconds per `cycles / count`.
    pub fn ns_per(&self, cycles: u64, count: u64) -> f64 {
        cycles as f64 * 1e6 / self.khz as f64 / count.max(1) as f64
    }
}

/// `lfence; rdtsc`.
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: lfence and rdtsc only read the time-stamp counter; they touch no
    // memory and the outputs are the declared registers.
    unsafe {
        std::arch::asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nostack, nomem));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

fn calibrate() -> u64 {
    let t0 = Instant::now();
    let c0 = rdtsc();
    std::thread::sleep(Duration::from_millis(100));
    let c1 = rdtsc();
    let ns = t0.elapsed().as_nanos().max(1) as f64;
    ((c1.wrapping_sub(c0)) as f64 * 1e6 / ns) as u64
}

fn kvm_khz(kvm_dev: &Path) -> Option<u64> {
    let kvm = crate::vm::open_kvm(kvm_dev).ok()?;
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.get_tsc_khz().ok().map(u64::from).filter(|&k| k > 0)
}

/// Measures the TSC frequency.
pub fn detect(kvm_dev: &Path) -> TscFreq {
    let calibrated_khz = calibrate();
    match kvm_khz(kvm_dev) {
        Some(khz) => {
            let diff = khz.abs_diff(calibrated_khz) as f64 / khz as f64;
            if diff > 0.01 {
                log::warn!(
                    "KVM_GET_TSC_KHZ says {khz} kHz but the host TSC runs at {calibrated_khz} kHz: \
                     native and guest ns may not compare exactly"
                );
            }
            TscFreq {
                khz,
                source: "KVM_GET_TSC_KHZ",
                calibrated_khz,
            }
        }
        None => TscFreq {
            khz: calibrated_khz.max(1),
            source: "calibrated against CLOCK_MONOTONIC",
            calibrated_khz,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion() {
        let f = TscFreq {
            khz: 2_000_000,
            source: "x",
            calibrated_khz: 0,
        };
        assert!((f.ns_per(2_000, 10) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn tsc_advances() {
        let a = rdtsc();
        let b = rdtsc();
        assert!(b >= a);
    }
}
