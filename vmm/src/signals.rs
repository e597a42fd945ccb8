//! SIGINT, SIGTERM and SIGHUP on `vmm run`: the handler only records the
//! signal; the run's wait loop sees it, stops the vCPUs and ends the run
//! with [`crate::outcome::Outcome::Signal`] (report written, API socket
//! removed, exit code 128 + the signal's number: 130, 143, 129).
//! The handler resets itself (`SA_RESETHAND`): a second signal of the same
//! kind terminates the process the default way, for a run that is stuck.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signals that stop a run.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The first stop signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Async-signal-safe: one atomic compare-exchange, nothing else.
    let _ = RECEIVED.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
}

/// Install the handler for [`STOP_SIGNALS`].
pub fn install() -> std::io::Result<()> {
    for sig in STOP_SIGNALS {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler
        // is an `extern "C" fn(c_int)` that only touches an atomic, so it is
        // async-signal-safe; `sigemptyset` gets a valid pointer to our mask.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART | libc::SA_RESETHAND;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The first stop signal received since the process started, if any.
pub fn received() -> Option<libc::c_int> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The signal's name.
pub fn name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
