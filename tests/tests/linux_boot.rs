//! Boot the test Linux guest (resources/kernel + resources/initramfs) with the release
//! `vmm` on hugetlb-backed RAM and check how far it got on the serial console.
//!
//! On a VT-x/AMD-V host the guest runs /init, which prints `VMM-TEST-INIT-OK` and powers
//! off (exit code 0). On a paravirtual shadow-paging KVM host guest user space cannot make
//! system calls (docs/ARCHITECTURE.md), so the test expects the kernel's
//! `Run /init as init process` line instead. This boot takes about 50 s there.

use std::ffi::OsString;

use integration_tests::host::{host_kind, hugepages_free, kvm_unavailable, HostKind};
use integration_tests::images::{self, INITRD, INIT_OK_MARKER, KERNEL, RUN_INIT_MARKER};

/// `skip!` for a function that returns an `Option`.
macro_rules! skip_none {
    ($($arg:tt)*) => {{
        integration_tests::skip::skip(&format!($($arg)*));
        return None;
    }};
}
use integration_tests::vmm_bin::{run_vmm, tail};

/// Guest RAM of this test: 256 MiB = 128 hugetlb pages.
const MEMORY: &str = "256M";
const MEMORY_HPAGES: u64 = 128;

#[test]
fn linux_boots_to_init_on_hugetlb() {
    let _ = boot_to_init(MEMORY, "hugetlb", MEMORY_HPAGES, "400");
}

/// 4.5 GiB of guest RAM, 1.5 GiB of it above the 32-bit MMIO hole: the
/// kernel takes the e820 map with RAM from 4 GiB up and reaches init.
/// Measured on the paravirtual host: `Run /init as init process` after
/// 226 s, most of it the emulated CPL0 kernel handing 1.15 M pages to its
/// page allocator (~110 s between `software IO TLB: area num` and
/// `Memory:`); 12.5 minutes before the test kernel's boot got 4x shorter.
/// It runs beside the 256 MiB boot (one test binary, two threads).
#[test]
fn linux_boots_to_init_with_ram_above_4g() {
    let Some(console) = boot_to_init("4608M", "thp", 0, "1200") else {
        return;
    };
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000100000000-0x000000015fffffff] usable"),
        "the e820 map has RAM above 4 GiB:\n{}",
        tail(&console, 60)
    );
}

/// Boot the test kernel with `memory` on `backing` (`hpages` huge pages
/// needed) until the init marker; returns the console.
fn boot_to_init(memory: &str, backing: &str, hpages: u64, timeout: &str) -> Option<String> {
    if let Some(why) = kvm_unavailable() {
        skip_none!("{why}");
    }
    let kernel = match images::image(KERNEL) {
        Ok(p) => p,
        Err(why) => skip_none!("no test kernel: {why}"),
    };
    let initrd = match images::image(INITRD) {
        Ok(p) => p,
        Err(why) => skip_none!("no test initramfs: {why}"),
    };
    let free = hugepages_free();
    if backing == "hugetlb" && free < hpages {
        skip_none!(
            "{free} free hugetlb pages, {hpages} needed \
             (echo 2048 > /proc/sys/vm/nr_hugepages, or run resources/setup-host.sh)"
        );
    }
    let kind = host_kind();
    let marker = match kind {
        HostKind::HardwareVirt => INIT_OK_MARKER,
        HostKind::ParavirtShadow => RUN_INIT_MARKER,
    };

    // One file per boot: the tests of this binary boot at the same time.
    let serial = std::env::temp_dir().join(format!(
        "vmm-linux-boot-{}-{memory}-{backing}.log",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&serial);
    let mut args: Vec<OsString> = vec!["run".into(), "--kernel".into(), kernel.into()];
    args.extend(["--initrd".into(), initrd.into()]);
    args.extend(
        [
            "--memory",
            memory,
            "--backing",
            backing,
            "--timeout",
            timeout,
        ]
        .map(OsString::from),
    );
    args.extend(["--serial".into(), serial.clone().into()]);
    let run = run_vmm(&args);
    let console = std::fs::read(&serial)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let _ = std::fs::remove_file(&serial);

    eprintln!(
        "host {kind:?}: vmm exited with {:?} after {:.1} s; last serial lines:\n{}",
        run.code(),
        run.elapsed.as_secs_f64(),
        tail(&console, 8)
    );
    assert!(
        console.contains(marker),
        "marker {marker:?} not on the serial console.\n--- last serial lines:\n{}\n--- vmm stderr:\n{}",
        tail(&console, 30),
        tail(&run.stderr(), 30)
    );
    match kind {
        HostKind::HardwareVirt => assert_eq!(
            run.code(),
            Some(0),
            "guest printed {marker} but vmm did not exit 0 after poweroff; stderr:\n{}",
            tail(&run.stderr(), 30)
        ),
        // /init's first system call fails here, the kernel panics ("Attempted to kill
        // init") and reboots (panic=-1): vmm reports the panic (3) or the reset (0),
        // never a timeout or an internal error.
        HostKind::ParavirtShadow => assert!(
            matches!(run.code(), Some(0 | 3)),
            "after {marker:?} vmm exited with {:?}, expected 0 or 3; stderr:\n{}",
            run.code(),
            tail(&run.stderr(), 30)
        ),
    }
    Some(console)
}
