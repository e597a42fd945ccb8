//! Skipping a test the host cannot run, and CI's rule that nothing may skip.
//!
//! Also compiled into `vmm`'s and `guest-mem`'s own integration tests
//! (`vmm/tests/common`, `guest-mem/tests/common`), so every test crate follows one
//! policy.

/// Set (by `.ci/run`) where every host kind the tests need is provided: a test that
/// would skip fails instead.
pub const NO_SKIP_ENV: &str = "VMM_TEST_NO_SKIP";

/// Say why a test does not run here (`SKIP: <reason>` on stderr), or fail the test
/// when [`NO_SKIP_ENV`] is set (and not empty or `0`).
pub fn skip(reason: &str) {
    if std::env::var_os(NO_SKIP_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("this test would skip, and {NO_SKIP_ENV} forbids skips: {reason}");
    }
    eprintln!("SKIP: {reason}");
}
