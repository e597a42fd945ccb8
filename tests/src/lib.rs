//! Shared helpers for the workspace-level integration tests (package `integration-tests`).
//!
//! * [`images`]: where the test guest kernel and initramfs images are
//!   (built by `resources/setup-host.sh`);
//! * [`host`]: what this host can do (VT-x/AMD-V or paravirtual KVM, free hugetlb pages);
//! * [`vmm_bin`]: the `vmm` binary, built on demand, and running it;
//! * [`json`]: numbers out of `vmm`'s JSON reports;
//! * [`skip`]: skipping a test the host cannot run (a failure in CI);
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
pub mod skip;
pub mod vmm_bin;

/// Print why a test does not run here and return from the test ([`skip::skip`]:
/// a failure where skips are forbidden).
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {{
        $crate::skip::skip(&format!($($arg)*));
        return;
    }};
}
