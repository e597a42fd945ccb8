//! Shared helpers for the workspace-level integration tests (package `integration-tests`).
//!
//! * [`images`]: where the test guest kernel and initramfs images are
//!   (built by `resources/setup-host.sh`);
//! * [`host`]: what this host can do (VT-x/AMD-V or paravirtual KVM, free hugetlb pages);
//! * [`vmm_bin`]: the `vmm` binary, built on demand, and running it;
//! * [`json`]: numbers out of `vmm`'s JSON reports;
//! * [`linux_vm`]: a Linux test guest in the background, driven through `vmm ctl`;
//! * [`l1host`]: the emulated AMD-V + NPT host (QEMU TCG): run `vmm` commands on KVM's TDP MMU.
//!
//! A test that needs something the host lacks prints `SKIP: <reason>` (see [`skip!`])
//! and returns.

pub mod host;
pub mod images;
pub mod json;
pub mod l1host;
pub mod linux_vm;
pub mod vmm_bin;

/// Set (by `.ci/run`) where every host kind the tests need is provided: a test that
/// would skip fails instead.
pub const NO_SKIP_ENV: &str = "VMM_TEST_NO_SKIP";

/// Say why a test does not run here (`SKIP: <reason>` on stderr), or fail the test
/// when [`NO_SKIP_ENV`] is set.
pub fn skip_here(reason: &str) {
    if std::env::var_os(NO_SKIP_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("this test would skip, and {NO_SKIP_ENV} forbids skips: {reason}");
    }
    eprintln!("SKIP: {reason}");
}

/// Print why a test does not run here and return from the test ([`skip_here`]:
/// a failure where skips are forbidden).
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {{
        $crate::skip_here(&format!($($arg)*));
        return;
    }};
}
