//! Documented process exit codes of `vmm run`.

/// Guest powered off, reset or halted for good, or a test guest reported success.
pub const OK: i32 = 0;
/// Internal VMM error.
pub const INTERNAL: i32 = 1;
/// Bad input: CLI, files, host prerequisites.
pub const BAD_INPUT: i32 = 2;
/// Guest panic: Linux panic marker, triple fault, unhandled emulation failure.
pub const GUEST_PANIC: i32 = 3;
/// A test guest reported failure.
pub const TEST_FAILURE: i32 = 4;
/// The run hit `--timeout`.
pub const TIMEOUT: i32 = 5;

/// Stopped by signal N (SIGINT, SIGTERM, SIGHUP): exit code 128 + N.
pub const SIGNAL_BASE: i32 = 128;

/// The table printed by `vmm run --help`.
pub const TABLE: &str = "Exit codes:
  0  guest powered off, reset or halted for good, or test guest reported success
  1  internal VMM error
  2  bad input (CLI, files, host prerequisites)
  3  guest panic (Linux panic marker / triple fault / unhandled emulation failure)
  4  test guest reported failure, or KVM disagrees with the mirror
  5  timeout
  129, 130, 143  stopped by SIGHUP, SIGINT, SIGTERM (report written, API socket removed)";
