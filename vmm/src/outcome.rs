//! How a run ended, and the exit code that says so.

use crate::exit_code;

/// The end of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest asked for a reset / power-off (i8042 reset, orderly reboot).
    Reset,
    /// The guest halted for good: every vCPU in `hlt` with interrupts off (a
    /// kernel's power-off without a power-off method). The text says what was seen.
    Halted(String),
    /// A test guest exited with this status (0 = success).
    TestExit(u64),
    /// A test guest took an unexpected exception.
    TestFault {
        /// vCPU index.
        vcpu: usize,
        /// Exception vector.
        vector: u64,
        /// Error code.
        error_code: u64,
        /// RIP.
        rip: u64,
        /// CR2.
        cr2: u64,
    },
    /// The guest panicked, triple-faulted or hit an unhandled emulation failure.
    GuestPanic(String),
    /// The VMM failed.
    Internal(String),
    /// `--timeout` expired.
    Timeout,
    /// Stopped from outside (`vmm ctl stop`).
    Stopped,
    /// Stopped by a signal (SIGINT, SIGTERM, SIGHUP): exit code 128 + its number.
    Signal(i32),
    /// A test guest succeeded but KVM's counters disagree with the mirror
    /// (at a checkpoint or at the end): what differed.
    MirrorMismatch(String),
}

impl Outcome {
    /// The process exit code (table in [`exit_code`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Reset | Outcome::Halted(_) | Outcome::TestExit(0) | Outcome::Stopped => {
                exit_code::OK
            }
            Outcome::TestExit(_) | Outcome::TestFault { .. } | Outcome::MirrorMismatch(_) => {
                exit_code::TEST_FAILURE
            }
            Outcome::GuestPanic(_) => exit_code::GUEST_PANIC,
            Outcome::Internal(_) => exit_code::INTERNAL,
            Outcome::Timeout => exit_code::TIMEOUT,
            Outcome::Signal(sig) => exit_code::SIGNAL_BASE + sig,
        }
    }

    /// One line for the user.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Reset => "guest reset / powered off".into(),
            Outcome::Halted(why) => format!("guest halted for good: {why}"),
            Outcome::TestExit(0) => "test guest reported success".into(),
            Outcome::TestExit(s) => format!("test guest reported failure (status {s:#x})"),
            Outcome::TestFault {
                vcpu,
                vector,
                error_code,
                rip,
                cr2,
            } => format!(
                "test guest vCPU {vcpu} took exception {vector} (error code {error_code:#x}) at RIP {rip:#x}, CR2 {cr2:#x}"
            ),
            Outcome::GuestPanic(why) => format!("guest panic: {why}"),
            Outcome::Internal(why) => format!("internal VMM error: {why}"),
            Outcome::Timeout => "timeout".into(),
            Outcome::Stopped => "stopped by `vmm ctl stop`".into(),
            Outcome::Signal(sig) => format!("stopped by {}", crate::signals::name(*sig)),
            Outcome::MirrorMismatch(why) => {
                format!("test guest reported success, but KVM disagrees with the mirror: {why}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_table() {
        assert_eq!(Outcome::Reset.exit_code(), 0);
        assert_eq!(Outcome::Halted("x".into()).exit_code(), 0);
        assert_eq!(Outcome::TestExit(0).exit_code(), 0);
        assert_eq!(Outcome::TestExit(1).exit_code(), 4);
        assert_eq!(Outcome::GuestPanic("x".into()).exit_code(), 3);
        assert_eq!(Outcome::Internal("x".into()).exit_code(), 1);
        assert_eq!(Outcome::Timeout.exit_code(), 5);
        assert_eq!(Outcome::Stopped.exit_code(), 0);
        assert_eq!(Outcome::MirrorMismatch("x".into()).exit_code(), 4);
        assert_eq!(Outcome::Signal(libc::SIGINT).exit_code(), 130);
        assert_eq!(Outcome::Signal(libc::SIGTERM).exit_code(), 143);
        assert_eq!(Outcome::Signal(libc::SIGHUP).exit_code(), 129);
    }
}
