//! `vmm bench workload` on this host. Host kinds: on a paravirtual shadow-paging host
//! (guest user space cannot make system calls) it must refuse with exit code 2 and
//! the reason, before booting anything. On a VT-x/AMD-V host the end-to-end run is
//! `tests/tests/tdp_host.rs` (emulated AMD-V host); here it skips.

use integration_tests::host::{host_kind, HostKind};
use integration_tests::images::{self, INITRD_WORKLOAD, KERNEL};
use integration_tests::skip;
use integration_tests::vmm_bin::run_vmm;

#[test]
fn bench_workload_exits_2_with_the_reason_on_a_paravirtual_host() {
    if host_kind() != HostKind::ParavirtShadow {
        skip!("this host has VT-x/AMD-V: the end-to-end run is in tests/tests/tdp_host.rs");
    }
    // Real images when built (the refusal must come before they are read).
    let kernel = images::image(KERNEL).unwrap_or_else(|_| "/nonexistent/vmlinux".into());
    let initrd =
        images::image(INITRD_WORKLOAD).unwrap_or_else(|_| "/nonexistent/workload.cpio".into());
    let json = std::env::temp_dir().join(format!("bench-workload-{}.json", std::process::id()));
    let mut args: Vec<std::ffi::OsString> =
        ["bench", "workload", "--kernel"].map(Into::into).to_vec();
    args.push(kernel.into());
    args.push("--initrd".into());
    args.push(initrd.into());
    for a in [
        "--run",
        "chase 64M 1000",
        "--backing",
        "4k,hugetlb",
        "--json",
    ] {
        args.push(a.into());
    }
    args.push(json.clone().into());
    let r = run_vmm(&args);
    let err = r.stderr();
    assert_eq!(r.code(), Some(2), "stderr:\n{err}");
    assert!(err.contains("paravirtual shadow paging"), "{err}");
    assert!(err.contains("SYSCALL"), "{err}");
    assert!(!json.exists(), "no results file on a refusal");
    assert!(
        r.stdout().is_empty(),
        "no table on a refusal: {}",
        r.stdout()
    );
}
