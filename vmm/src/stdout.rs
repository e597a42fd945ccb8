//! Printing results on stdout when stdout may be gone: `vmm ... | head -1`
//! closes the pipe early, and Rust's `print!` panics on `EPIPE` (the process
//! ignores SIGPIPE). A failed write is reported on stderr once and the run
//! carries on: its report file and exit code do not depend on stdout.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static WARNED: AtomicBool = AtomicBool::new(false);

/// Write `text` to stdout and flush; `false` (and one note on stderr) if
/// stdout is closed or failing.
pub fn print(text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => true,
        Err(e) => {
            if !WARNED.swap(true, Ordering::SeqCst) {
                eprintln!("vmm: stdout: {e}; output dropped (the exit code and report files are unaffected)");
            }
            false
        }
    }
}
