//! The vCPU thread of `vmm stress`: like [`crate::vcpu`] for test guests,
//! plus the write-protect path: a write to a read-only host page makes
//! `KVM_RUN` fail with `EFAULT` (and `KVM_EXIT_MEMORY_FAULT` on kernels
//! that report it); the thread waits at the [`WriteGate`] and re-runs the
//! vCPU, which retries the faulting write.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::bus::{self, PioTarget};
use crate::machine::Machine;
use crate::outcome::Outcome;
use crate::testguest::device::TestDeviceAction;
use crate::vcpu::{self, LoopAction};

use super::gate::WriteGate;

/// What the stress vCPU threads share besides the machine.
#[derive(Debug, Default)]
pub struct StressVcpuShared {
    /// The write-protect gate.
    pub gate: WriteGate,
    /// Errors the guest would have seen (unexplained faults, exceptions).
    pub guest_errors: Mutex<Vec<String>>,
}

impl StressVcpuShared {
    fn guest_error(&self, m: &Machine, what: String) {
        log::error!("{what}");
        self.guest_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what.clone());
        m.finish(Outcome::TestExit(u64::MAX));
    }

    /// Errors recorded so far.
    pub fn errors(&self) -> Vec<String> {
        self.guest_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

enum Next {
    Continue,
    Stop(Outcome),
    InternalError,
    MemoryFault(Option<u64>),
}

/// Run vCPU `index` until the machine stops.
pub fn run_vcpu(index: usize, mut vcpu: VcpuFd, m: Arc<Machine>, s: Arc<StressVcpuShared>) {
    m.control.thread_started(index);
    while m.control.before_run() {
        let next = match vcpu.run() {
            Ok(VcpuExit::MemoryFault { gpa, .. }) => Next::MemoryFault(Some(gpa)),
            Ok(exit) => handle_exit(index, exit, &m),
            Err(e) if e.errno() == libc::EFAULT => Next::MemoryFault(None),
            Err(e) => match vcpu::run_failed(index, &mut vcpu, &e) {
                None => Next::Continue,
                Some(o) => Next::Stop(o),
            },
        };
        let next = match next {
            Next::InternalError => match vcpu::internal_error(index, &mut vcpu, &m) {
                None => Next::Continue,
                Some(o) => Next::Stop(o),
            },
            Next::MemoryFault(gpa) => {
                let r = m
                    .control
                    .parked_while(|| s.gate.wait_writable(gpa, || m.control.stopping()));
                match r {
                    Ok(()) => Next::Continue,
                    Err(e) => {
                        s.guest_error(&m, format!("vCPU {index}: {e}"));
                        break;
                    }
                }
            }
            other => other,
        };
        if let Next::Stop(o) = next {
            if let Outcome::TestFault { .. } = o {
                s.guest_error(&m, format!("guest-visible error: {}", o.describe()));
            }
            m.finish(o);
            break;
        }
    }
    m.control.thread_exited(index);
}

fn handle_exit(index: usize, exit: VcpuExit<'_>, m: &Machine) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => match (bus::decode(port), &m.test_device) {
            (PioTarget::TestDevice(_), Some(dev)) => {
                let a = dev.io_in(index, port, data);
                test_action(index, a, m)
            }
            _ => {
                data.fill(0xff);
                Next::Continue
            }
        },
        VcpuExit::IoOut(port, data) => match (bus::decode(port), &m.test_device) {
            (PioTarget::TestDevice(_), Some(dev)) => {
                let a = dev.io_out(index, port, data, &m.mem);
                test_action(index, a, m)
            }
            _ => Next::Continue,
        },
        VcpuExit::Hlt => Next::Stop(Outcome::GuestPanic(format!(
            "vCPU {index}: stress guest halted without reporting an exit"
        ))),
        VcpuExit::Shutdown => Next::Stop(Outcome::GuestPanic(format!(
            "vCPU {index}: triple fault (KVM_EXIT_SHUTDOWN)"
        ))),
        VcpuExit::InternalError => Next::InternalError,
        VcpuExit::Intr => Next::Continue,
        other => Next::Stop(Outcome::Internal(format!(
            "vCPU {index}: unexpected exit {other:?}"
        ))),
    }
}

fn test_action(index: usize, a: TestDeviceAction, m: &Machine) -> Next {
    match vcpu::common_test_action(index, a, m) {
        Ok(None) => Next::Continue,
        Ok(Some(o)) => Next::Stop(o),
        Err(LoopAction::Print(s)) => {
            log::info!("stress guest vCPU {index}: {s}");
            Next::Continue
        }
        Err(LoopAction::Discard { gpa, len } | LoopAction::Refill { gpa, len }) => {
            Next::Stop(Outcome::Internal(format!(
                "vCPU {index}: the stress guest does not discard or refill ([{gpa:#x}, +{len:#x}))"
            )))
        }
    }
}
