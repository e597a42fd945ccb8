//! `vmm bench tlb` end to end on real KVM: one tiny configuration per
//! backing (16 MiB working set, 200k accesses, 2M guest pages) must finish,
//! report a positive ns per access and the mapping KVM says it used:
//! `pages_2m > 0` on huge backings, `0` on 4k. No timing assertions.

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// Why `backing` cannot run a 16M working set here, if it cannot: 16M
/// working set + reserved region + slack, and native needs 8 more, so
/// hugetlb wants 20 free 2M pages.
fn skip_reason(backing: &str) -> Option<String> {
    common::skip_reason(backing, 20)
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-bench-smoke-{}-{name}", std::process::id()))
}

fn bench(extra: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(common::vmm_bin())
        .args(["bench", "tlb"])
        .args(extra)
        .output()
        .expect("running vmm");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tiny(backing: &str, native: bool) -> Option<Value> {
    if let Some(why) = skip_reason(backing) {
        common::skip(&format!("bench smoke for {backing}: {why}"));
        return None;
    }
    let json = tmp(&format!("{backing}.json"));
    let json_s = json.display().to_string();
    let mut args = vec![
        "--working-set",
        "16M",
        "--accesses",
        "200000",
        "--guest-pages",
        "2m",
        "--backing",
        backing,
        "--repeat",
        "1",
        "--json",
        &json_s,
    ];
    if native {
        args.push("--native");
    }
    let (code, stdout, stderr) = bench(&args);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("ns/access"), "{stdout}");
    let v = common::read_json(&json);
    let _ = std::fs::remove_file(&json);
    Some(v)
}

fn guest_config<'a>(v: &'a Value, backing: &str) -> &'a Value {
    v["configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["backing"] == backing)
        .unwrap_or_else(|| panic!("no {backing} config in {v:#}"))
}

fn check(backing: &str, huge: bool, native: bool) {
    let Some(v) = tiny(backing, native) else {
        return;
    };
    let c = guest_config(&v, backing);
    assert_eq!(c["working_set"], 16u64 << 20);
    assert_eq!(c["guest_pages"], "2m");
    let ns = c["ns_per_access"]["median"].as_f64().unwrap();
    assert!(ns > 0.0 && ns.is_finite(), "{c:#}");
    assert_eq!(c["samples_ns"].as_array().unwrap().len(), 1);
    let p2 = c["kvm_pages_2m"].as_u64().expect("KVM pages_2m statistic");
    let p4 = c["kvm_pages_4k"].as_u64().expect("KVM pages_4k statistic");
    if huge {
        // 8 frames of working set at least.
        assert!(p2 >= 8, "{backing}: pages_2m {p2}: {c:#}");
    } else {
        assert_eq!(p2, 0, "{backing}: {c:#}");
        assert!(p4 >= 4096, "{backing}: pages_4k {p4}");
    }
    assert!(v["tsc"]["khz"].as_u64().unwrap() > 0);
    if native {
        let n = guest_config(&v, "native");
        assert!(n["ns_per_access"]["median"].as_f64().unwrap() > 0.0);
        assert!(n["native_backing"].is_string());
        assert!(c["slowdown_vs_native"].as_f64().unwrap() > 0.0);
    } else {
        assert!(c["slowdown_vs_native"].is_null());
    }
}

#[test]
fn tiny_run_on_hugetlb_maps_2m() {
    check("hugetlb", true, true);
}

#[test]
fn tiny_run_on_thp_maps_2m() {
    check("thp", true, false);
}

#[test]
fn tiny_run_on_4k_maps_4k_only() {
    check("4k", false, false);
}

#[test]
fn linux_guest_is_refused_with_a_reason() {
    // Without --kernel/--initrd: refused on every host; a paravirtual host says
    // guest user space cannot run there, a VT-x/AMD-V host asks for the images.
    let (code, _, stderr) = bench(&["--guest", "linux"]);
    assert_eq!(code, Some(2), "{stderr}");
    let want = if vmm::host::HostInfo::detect().shadow_paging() {
        "--guest linux is not available on this host"
    } else {
        "--guest linux needs --kernel and --initrd"
    };
    assert!(stderr.contains(want), "{stderr}");
}

#[test]
fn too_large_working_set_is_bad_input() {
    let (code, _, stderr) = bench(&["--working-set", "600G", "--backing", "4k", "--repeat", "1"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("does not fit"), "{stderr}");
}
