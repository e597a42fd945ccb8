//! The vCPU thread: `KVM_RUN` loop and exit dispatch.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::bus::{self, PioTarget};
use crate::devices::i8042;
use crate::emulation::{self, EmulationVerdict};
use crate::machine::{GuestKind, Machine, Report};
use crate::outcome::Outcome;
use crate::testguest::device::TestDeviceAction;
use crate::unmap_stats::{GiveBack, TimedQuiesce};

/// `KVM_SYSTEM_EVENT_*` types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// What an exit handler decided.
enum Next {
    Continue,
    Stop(Outcome),
    /// `KVM_EXIT_INTERNAL_ERROR`: handled once the exit's borrow of the vCPU ends.
    InternalError,
}

/// Run vCPU `index` until the machine stops.
pub fn run_vcpu(index: usize, mut vcpu: VcpuFd, m: Arc<Machine>) {
    m.control.thread_started(index);
    while m.control.before_run() {
        let next = match vcpu.run() {
            Ok(exit) => {
                let exit_at = Instant::now();
                handle_exit(index, exit, &m, exit_at)
            }
            Err(e) => match run_failed(index, &mut vcpu, &e) {
                None => Next::Continue,
                Some(o) => Next::Stop(o),
            },
        };
        let next = match next {
            Next::InternalError => match internal_error(index, &mut vcpu, &m) {
                None => Next::Continue,
                Some(o) => Next::Stop(o),
            },
            other => other,
        };
        if let Next::Stop(o) = next {
            m.finish(o);
            break;
        }
        if let Some(generation) = m.halt.wanted(index) {
            m.halt
                .answer(index, generation, halted_for_good(index, &vcpu));
        }
    }
    m.control.thread_exited(index);
}

/// Whether this vCPU sits in `hlt` with interrupts off ([`crate::halt`]).
fn halted_for_good(index: usize, vcpu: &VcpuFd) -> bool {
    match (vcpu.get_mp_state(), vcpu.get_regs()) {
        (Ok(mp), Ok(regs)) => crate::halt::halted_for_good(mp.mp_state, regs.rflags),
        (Err(e), _) | (_, Err(e)) => {
            log::debug!("vCPU {index}: reading its state for the halt probe failed: {e}");
            false
        }
    }
}

/// A failed `KVM_RUN` (other than the cases a caller handles itself):
/// `None` when it was only interrupted (the immediate-exit flag is cleared
/// and the vCPU may run again), else the outcome that stops the machine.
pub(crate) fn run_failed(
    index: usize,
    vcpu: &mut VcpuFd,
    e: &kvm_ioctls::Error,
) -> Option<Outcome> {
    if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN {
        vcpu.set_kvm_immediate_exit(0);
        None
    } else {
        Some(Outcome::Internal(format!(
            "vCPU {index}: KVM_RUN failed: {e}"
        )))
    }
}

/// `KVM_EXIT_INTERNAL_ERROR`: hand the instruction KVM could not emulate to
/// [`emulation::handle`]. `None` when the vCPU may run again, else the
/// outcome that stops the machine.
pub(crate) fn internal_error(index: usize, vcpu: &mut VcpuFd, m: &Machine) -> Option<Outcome> {
    // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so the kernel
    // filled the `internal` member of the kvm_run union.
    let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    match emulation::handle(
        vcpu,
        &m.mem,
        &m.host,
        internal.suberror,
        &internal.data[..n],
    ) {
        EmulationVerdict::Resumed => None,
        EmulationVerdict::Fatal(s) => Some(Outcome::GuestPanic(format!("vCPU {index}: {s}"))),
    }
}

fn shutdown_outcome(index: usize, m: &Machine, what: &str) -> Outcome {
    if m.serial_flags.panicked.load(Ordering::SeqCst) {
        Outcome::GuestPanic("the kernel panicked (see the serial output)".into())
    } else if m.kind == GuestKind::Linux && m.serial_flags.rebooting.load(Ordering::SeqCst) {
        Outcome::Reset
    } else {
        Outcome::GuestPanic(format!("vCPU {index}: {what}"))
    }
}

fn handle_exit(index: usize, exit: VcpuExit<'_>, m: &Machine, exit_at: Instant) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => pio_in(index, port, data, m, exit_at),
        VcpuExit::IoOut(port, data) => pio_out(index, port, data, m, exit_at),
        VcpuExit::MmioRead(addr, data) => mmio_read(index, addr, data, m),
        VcpuExit::MmioWrite(addr, data) => mmio_write(index, addr, data, m, exit_at),
        VcpuExit::Hlt => match m.kind {
            GuestKind::Linux => Next::Stop(Outcome::Reset),
            GuestKind::TestGuest => Next::Stop(Outcome::GuestPanic(format!(
                "vCPU {index}: test guest halted without reporting an exit"
            ))),
        },
        VcpuExit::Shutdown => Next::Stop(shutdown_outcome(
            index,
            m,
            "triple fault (KVM_EXIT_SHUTDOWN)",
        )),
        VcpuExit::SystemEvent(ty, _) if ty == SYSTEM_EVENT_SHUTDOWN || ty == SYSTEM_EVENT_RESET => {
            Next::Stop(shutdown_outcome(index, m, "system event"))
        }
        VcpuExit::SystemEvent(ty, data) => Next::Stop(Outcome::GuestPanic(format!(
            "vCPU {index}: system event {ty} {data:x?}"
        ))),
        VcpuExit::InternalError => Next::InternalError,
        VcpuExit::FailEntry(reason, cpu) => Next::Stop(Outcome::Internal(format!(
            "vCPU {index}: VM entry failed, hardware reason {reason:#x} on host CPU {cpu}"
        ))),
        VcpuExit::Intr => Next::Continue,
        other => Next::Stop(Outcome::Internal(format!(
            "vCPU {index}: unexpected exit {other:?}"
        ))),
    }
}

// The balloon's backend may pause the other vCPUs (and the collapser holds
// the transport while it pauses them): this vCPU counts as parked meanwhile.
fn mmio_read(index: usize, addr: u64, data: &mut [u8], m: &Machine) -> Next {
    let handled = m
        .balloon()
        .is_some_and(|b| m.control.parked_while(|| b.mmio_read(addr, data)));
    if !handled {
        log::debug!(
            "vCPU {index}: MMIO read of {} bytes at {addr:#x}: no device",
            data.len()
        );
        data.fill(0xff);
    }
    Next::Continue
}

fn mmio_write(index: usize, addr: u64, data: &[u8], m: &Machine, exit_at: Instant) -> Next {
    let handled = m
        .balloon()
        .is_some_and(|b| m.control.parked_while(|| b.mmio_write(addr, data, exit_at)));
    if !handled {
        log::debug!(
            "vCPU {index}: MMIO write of {} bytes at {addr:#x}: no device",
            data.len()
        );
    }
    Next::Continue
}

fn pio_in(index: usize, port: u16, data: &mut [u8], m: &Machine, exit_at: Instant) -> Next {
    match bus::decode(port) {
        PioTarget::Serial(off) => {
            let v = m.serial().read(off);
            data.fill(0);
            if let Some(d) = data.first_mut() {
                *d = v;
            }
        }
        PioTarget::I8042(p) => data.fill(i8042::read(p)),
        PioTarget::TestDevice(_) => match &m.test_device {
            Some(dev) => {
                let a = dev.io_in(index, port, data);
                return test_action(index, a, m, exit_at);
            }
            None => data.fill(0xff),
        },
        PioTarget::Unclaimed => data.fill(0xff),
    }
    Next::Continue
}

fn pio_out(index: usize, port: u16, data: &[u8], m: &Machine, exit_at: Instant) -> Next {
    match bus::decode(port) {
        PioTarget::Serial(off) => {
            if let Some(&v) = data.first() {
                if let Err(e) = m.serial().write(off, v) {
                    log::warn!("serial: raising the interrupt failed: {e:?}");
                }
            }
        }
        PioTarget::I8042(p) => {
            if data.first().map(|&v| i8042::write(p, v)) == Some(i8042::I8042Action::Reset) {
                return Next::Stop(shutdown_outcome_reset(m));
            }
        }
        PioTarget::TestDevice(_) => {
            if let Some(dev) = &m.test_device {
                let a = dev.io_out(index, port, data, &m.mem);
                return test_action(index, a, m, exit_at);
            }
        }
        PioTarget::Unclaimed => {}
    }
    Next::Continue
}

fn shutdown_outcome_reset(m: &Machine) -> Outcome {
    if m.serial_flags.panicked.load(Ordering::SeqCst) {
        Outcome::GuestPanic("the kernel panicked (see the serial output)".into())
    } else {
        Outcome::Reset
    }
}

fn test_action(index: usize, a: TestDeviceAction, m: &Machine, exit_at: Instant) -> Next {
    if let TestDeviceAction::Report { key, value } = a {
        log::info!("test guest vCPU {index}: report key {key} = {value}");
    }
    match common_test_action(index, a, m) {
        Ok(None) => Next::Continue,
        Ok(Some(o)) => Next::Stop(o),
        Err(LoopAction::Print(s)) => {
            m.print_line(&s);
            Next::Continue
        }
        Err(LoopAction::Discard { gpa, len }) => ram_op(index, m, "discard", gpa, len, |ram| {
            // Eager: a frame given back in part is split at once, so each
            // checkpoint sees exactly the frames split so far; a frame given
            // back whole is freed without a split and faults in huge again.
            let timed = TimedQuiesce::new(&m.control);
            let rep = ram.give_back(gpa, len, guest_mem::SplitPolicy::Eager, &timed)?;
            m.unmap.give_back(
                GiveBack {
                    frames_split: rep.frames_split,
                    huge_frames_freed: rep.whole_frames_freed,
                    pages: rep.pages_freed,
                },
                Some(exit_at),
                &timed.windows(),
            );
            Ok(())
        }),
        Err(LoopAction::Refill { gpa, len }) => ram_op(index, m, "refill", gpa, len, |ram| {
            ram.refill(gpa, len, &m.control)?;
            m.unmap.refilled(len / guest_mem::PAGE_SIZE);
            Ok(())
        }),
    }
}

/// The test-device actions whose handling depends on the vCPU loop.
pub(crate) enum LoopAction {
    /// [`TestDeviceAction::Print`].
    Print(String),
    /// [`TestDeviceAction::Discard`].
    Discard { gpa: u64, len: u64 },
    /// [`TestDeviceAction::Refill`].
    Refill { gpa: u64, len: u64 },
}

/// The test-device actions every vCPU loop handles alike (none, report,
/// checkpoint, exit, fault): `Ok(None)` to resume the vCPU, `Ok(Some(_))`
/// to stop the machine with that outcome. The others are handed back.
pub(crate) fn common_test_action(
    index: usize,
    a: TestDeviceAction,
    m: &Machine,
) -> Result<Option<Outcome>, LoopAction> {
    match a {
        TestDeviceAction::None => Ok(None),
        TestDeviceAction::Report { key, value } => {
            m.report(Report {
                vcpu: index,
                key,
                value,
            });
            Ok(None)
        }
        TestDeviceAction::Checkpoint { phase } => {
            m.checkpoint(index, phase);
            Ok(None)
        }
        TestDeviceAction::Exit(status) => Ok(Some(Outcome::TestExit(status))),
        TestDeviceAction::Fault {
            vector,
            error_code,
            rip,
            cr2,
        } => Ok(Some(Outcome::TestFault {
            vcpu: index,
            vector,
            error_code,
            rip,
            cr2,
        })),
        TestDeviceAction::Print(s) => Err(LoopAction::Print(s)),
        TestDeviceAction::Discard { gpa, len } => Err(LoopAction::Discard { gpa, len }),
        TestDeviceAction::Refill { gpa, len } => Err(LoopAction::Refill { gpa, len }),
    }
}

fn ram_op(
    index: usize,
    m: &Machine,
    what: &str,
    gpa: u64,
    len: u64,
    f: impl FnOnce(&mut guest_mem::GuestRam) -> Result<(), guest_mem::GuestMemError>,
) -> Next {
    // Count this vCPU as parked while it waits for guest RAM: another vCPU may
    // hold it and be pausing everyone.
    let r = m.control.parked_while(|| f(&mut m.ram()));
    match r {
        Ok(()) => {
            log::debug!("vCPU {index}: {what} [{gpa:#x}, +{len:#x}) done");
            Next::Continue
        }
        Err(e) => Next::Stop(Outcome::Internal(format!(
            "vCPU {index}: {what} of [{gpa:#x}, +{len:#x}) failed: {e}"
        ))),
    }
}
