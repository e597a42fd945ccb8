//! `vmm run` rejects bad input with exit code 2 and says what is wrong, before it
//! touches KVM or host memory.

use integration_tests::vmm_bin::{run_vmm, tail};

const BAD_INPUT: i32 = 2;

fn assert_bad_input(args: &[&str], stderr_mentions: &str) {
    let run = run_vmm(args);
    let stderr = run.stderr();
    assert_eq!(
        run.code(),
        Some(BAD_INPUT),
        "vmm {args:?}: exit {:?}, stderr:\n{}",
        run.code(),
        tail(&stderr, 20)
    );
    assert!(
        stderr.contains(stderr_mentions),
        "vmm {args:?}: stderr does not mention {stderr_mentions:?}:\n{}",
        tail(&stderr, 20)
    );
}

#[test]
fn missing_kernel_file_is_bad_input() {
    let path = "/nonexistent/vmm-test/vmlinux";
    assert_bad_input(
        &[
            "run",
            "--kernel",
            path,
            "--memory",
            "64M",
            "--backing",
            "4k",
        ],
        path,
    );
}

#[test]
fn malformed_memory_size_is_bad_input() {
    assert_bad_input(
        &["run", "--test-guest", "hello", "--memory", "12Q"],
        "--memory",
    );
}

#[test]
fn unknown_backing_is_bad_input() {
    assert_bad_input(
        &["run", "--test-guest", "hello", "--backing", "gigantic"],
        "--backing",
    );
}

#[test]
fn kernel_and_test_guest_together_are_bad_input() {
    assert_bad_input(
        &[
            "run",
            "--kernel",
            "/nonexistent/vmlinux",
            "--test-guest",
            "hello",
        ],
        "--test-guest",
    );
}
