//! Bad input: each case runs the built binary and expects a clear message,
//! exit code 2, and no panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{kvm_or_skip, stderr, vmm};

fn tmpdir(name: &str) -> PathBuf {
    common::out_dir("vmm-cli", name)
}

fn assert_bad_input(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {e}");
    assert!(!e.contains("panicked"), "panic: {e}");
    for n in needles {
        assert!(e.contains(n), "expected {n:?} in: {e}");
    }
}

/// `vmm run --kernel KERNEL --backing 4k --memory MEMORY EXTRA...`.
fn run_kernel(kernel: &Path, memory: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--backing",
        "4k",
        "--memory",
        memory,
    ];
    args.extend_from_slice(extra);
    vmm(&args)
}

/// `vmm run --test-guest hello --backing 4k --memory 64M EXTRA...`.
fn run_hello_4k(extra: &[&str]) -> Command {
    let mut c = Command::new(common::vmm_bin());
    c.args([
        "run",
        "--test-guest",
        "hello",
        "--backing",
        "4k",
        "--memory",
        "64M",
    ])
    .args(extra);
    c
}

/// A minimal x86-64 ELF with one PT_LOAD segment of `filesz` bytes at file
/// offset 0x1000, physical address 16 MiB; `file_len` bytes are written.
fn write_elf(path: &Path, filesz: u64, file_len: usize) {
    let mut b = vec![0u8; file_len.max(120)];
    b[0..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // 64-bit
    b[5] = 1; // little endian
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // entry
    b[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    b[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    b[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    b[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = 64;
    b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    b[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes());
    b[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
    b[ph + 16..ph + 24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes()); // vaddr
    b[ph + 24..ph + 32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // paddr
    b[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
    b[ph + 40..ph + 48].copy_from_slice(&filesz.to_le_bytes());
    b[ph + 48..ph + 56].copy_from_slice(&0x20_0000u64.to_le_bytes());
    b.truncate(file_len.max(120));
    std::fs::write(path, b).unwrap();
}

#[test]
fn missing_kernel_file() {
    let o = run_kernel(Path::new("/nonexistent/vmlinux"), "64M", &[]);
    assert_bad_input(&o, &["kernel", "/nonexistent/vmlinux"]);
}

#[test]
fn file_that_is_not_a_kernel() {
    if !kvm_or_skip() {
        return;
    }
    let d = tmpdir("notkernel");
    let p = d.join("notes.txt");
    std::fs::write(&p, "just some text, certainly not a kernel\n".repeat(100)).unwrap();
    let o = run_kernel(&p, "64M", &[]);
    assert_bad_input(&o, &["is not a kernel", "vmlinux", "bzImage"]);
}

#[test]
fn truncated_elf() {
    if !kvm_or_skip() {
        return;
    }
    let d = tmpdir("trunc");
    let p = d.join("vmlinux");
    write_elf(&p, 0x10_0000, 0x2000);
    let o = run_kernel(&p, "64M", &[]);
    assert_bad_input(&o, &["damaged ELF", "truncated"]);
}

#[test]
fn memory_too_small_for_kernel_and_initrd() {
    if !kvm_or_skip() {
        return;
    }
    let d = tmpdir("small");
    let k = d.join("vmlinux");
    write_elf(&k, 0x1000, 0x2000);
    let i = d.join("initrd");
    std::fs::write(&i, vec![0u8; 20 << 20]).unwrap();
    let o = run_kernel(&k, "32M", &["--initrd", i.to_str().unwrap()]);
    assert_bad_input(&o, &["too small", "initrd", "--memory"]);
}

#[test]
fn memory_not_multiple_of_2m() {
    let o = vmm(&[
        "run",
        "--test-guest",
        "hello",
        "--backing",
        "hugetlb",
        "--memory",
        "3M",
    ]);
    assert_bad_input(&o, &["multiple of 2 MiB", "hugetlb"]);
}

#[test]
fn memory_unparsable() {
    let o = vmm(&["run", "--test-guest", "hello", "--memory", "lots"]);
    assert_bad_input(&o, &["invalid size", "512M"]);
}

#[test]
fn kvm_device_missing() {
    let o = run_hello_4k(&["--kvm-dev", "/nonexistent/kvm"])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert_bad_input(&o, &["/nonexistent/kvm", "KVM is not available"]);
}

#[test]
fn kvm_device_from_env() {
    let o = run_hello_4k(&[])
        .env("VMM_KVM_DEV", "/nonexistent/kvm2")
        .output()
        .unwrap();
    assert_bad_input(&o, &["/nonexistent/kvm2"]);
}

#[test]
fn unknown_test_guest() {
    let o = vmm(&["run", "--test-guest", "nosuchguest", "--memory", "64M"]);
    assert_bad_input(&o, &["nosuchguest", "hello", "verify"]);
}

#[test]
fn command_line_too_long() {
    if !kvm_or_skip() {
        return;
    }
    let d = tmpdir("cmdline");
    let k = d.join("vmlinux");
    write_elf(&k, 0x1000, 0x2000);
    let long = "x=".to_string() + &"y".repeat(3000);
    let o = run_kernel(&k, "64M", &["--cmdline", &long]);
    assert_bad_input(&o, &["command line", "at most 2047", "shorten --cmdline"]);
}

/// Every check of `vmm run`'s input comes before the KVM device is opened:
/// with a KVM device that does not exist, each bad input still gets its own
/// usage error (exit 2), never the KVM one.
#[test]
fn run_input_is_checked_before_kvm() {
    let no_kvm = ["--kvm-dev", "/nonexistent/kvm"];
    let cases: [(Vec<&str>, &[&str]); 4] = [
        (
            vec!["--test-guest", "unmap", "--generations", "5"],
            &["only the verify test guest takes generations"],
        ),
        (
            vec!["--test-guest", "hello", "--guest-arg", "nosuchkey=1"],
            &["test guest hello has no argument", "nosuchkey"],
        ),
        (
            vec!["--test-guest", "hello", "--memory", "3M"],
            &["multiple of 2 MiB"],
        ),
        (
            vec!["--kernel", "/nonexistent/vmlinux", "--memory", "64M"],
            &["/nonexistent/vmlinux"],
        ),
    ];
    for (args, needles) in cases {
        let mut a = vec!["run", "--backing", "4k"];
        a.extend(args);
        a.extend(no_kvm);
        let o = vmm(&a);
        assert_bad_input(&o, needles);
        assert!(!stderr(&o).contains("/nonexistent/kvm"), "{}", stderr(&o));
    }
    // The --serial output is opened first too (a directory is refused).
    let sdir = tmpdir("serial-nokvm");
    let mut a = vec![
        "run",
        "--backing",
        "4k",
        "--test-guest",
        "hello",
        "--serial",
    ];
    a.push(sdir.to_str().unwrap());
    a.extend(no_kvm);
    let o = vmm(&a);
    assert_bad_input(&o, &["--serial", "is a directory"]);
    assert!(!stderr(&o).contains("/nonexistent/kvm"), "{}", stderr(&o));
    // The kernel command line is composed (and its length checked) first too.
    let k = tmpdir("cmdline-nokvm").join("vmlinux");
    write_elf(&k, 0x1000, 0x2000);
    let long = "x=".to_string() + &"y".repeat(3000);
    let o = run_kernel(&k, "64M", &["--cmdline", &long, no_kvm[0], no_kvm[1]]);
    assert_bad_input(&o, &["command line", "at most 2047"]);
    // So is the kernel file: what it is, whether it is whole, whether it fits.
    let d = tmpdir("kernel-nokvm");
    let notes = d.join("notes.txt");
    std::fs::write(
        &notes,
        "just some text, certainly not a kernel\n".repeat(100),
    )
    .unwrap();
    let trunc = d.join("vmlinux-truncated");
    write_elf(&trunc, 0x10_0000, 0x2000);
    for (k, needles) in [
        (&notes, &["is not a kernel", "vmlinux", "bzImage"][..]),
        (&trunc, &["damaged ELF", "truncated"][..]),
    ] {
        let o = run_kernel(k, "64M", &no_kvm);
        assert_bad_input(&o, needles);
        assert!(!stderr(&o).contains("/nonexistent/kvm"), "{}", stderr(&o));
    }
}

#[test]
fn unknown_backing() {
    let o = vmm(&["run", "--test-guest", "hello", "--backing", "gigantic"]);
    assert_bad_input(&o, &["--backing", "gigantic"]);
}

#[test]
fn kernel_and_test_guest_together() {
    let o = vmm(&[
        "run",
        "--kernel",
        "/nonexistent/vmlinux",
        "--test-guest",
        "hello",
    ]);
    assert_bad_input(&o, &["--test-guest", "--kernel"]);
}

#[test]
fn kernel_or_test_guest_required() {
    let o = vmm(&["run", "--memory", "64M"]);
    assert_bad_input(&o, &["--kernel"]);
}

#[test]
fn help_documents_exit_codes() {
    let o = vmm(&["run", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    let s = String::from_utf8_lossy(&o.stdout);
    for line in [
        "0  guest powered off",
        "2  bad input",
        "3  guest panic",
        "4  test guest",
        "5  timeout",
    ] {
        assert!(s.contains(line), "{line:?} missing in help: {s}");
    }
}
