//! `vmm stress` for 20 seconds per backing with 2 vCPUs: zero violations,
//! every event kind that applies to the backing fired at least 100 times,
//! KVM and the mirror agree at every quiescent point (one of them with dirty
//! logging on), write protection was waited out, dirty logging made KVM
//! drop 2M mappings, and the injector's CPU time per kind lies within the
//! kind's latency and adds up to the reported rate ceiling. Applicable
//! kinds: all eight on hugetlb and thp; no split / collapse on 4k (no huge
//! frames).
//!
//! The three runs share one lock: they would otherwise compete for the two
//! host cores and the hugetlb pool.

mod common;

use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn stress(backing: &str) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !common::kvm_or_skip() {
        return;
    }
    let dir = common::out_dir("vmm-stress", backing);
    let json = dir.join("report.json");
    let mix = if backing == "4k" {
        "discard4k=1,discard2m=1,wrprotect=1,dirtylog=1,slot=1,pageout=1"
    } else {
        "discard4k=1,discard2m=1,split=1,collapse=1,wrprotect=1,dirtylog=1,slot=1,pageout=1"
    };
    let o = Command::new(common::vmm_bin())
        .args([
            "stress",
            "--backing",
            backing,
            "--memory",
            "128M",
            "--vcpus",
            "2",
        ])
        .args(["--seconds", "20", "--seed", "11", "--quiesce-every", "2"])
        .args(["--ops-mix", mix])
        .arg("--json")
        .arg(&json)
        .arg("--replay-out")
        .arg(dir.join("replay.json"))
        .env("RUST_LOG", "error")
        .output()
        .expect("running vmm stress");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    if o.status.code() == Some(2) {
        common::skip(&format!(
            "the host cannot run --backing {backing}: {stderr}"
        ));
        return;
    }
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let r = common::read_json(&json);
    assert_eq!(r["violations"].as_array().unwrap().len(), 0, "{stdout}");
    assert_eq!(r["exit_code"], 0);
    assert!(r["pages_verified"].as_u64().unwrap() > 0, "{stdout}");
    let applicable: Vec<&str> = r["applicable_kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // Every event kind, in order (their names are pinned by thp's
    // `event_kind_names_round_trip`).
    let expect: Vec<String> = thp::interleave::EventKind::ALL
        .iter()
        .map(|k| k.to_string())
        .filter(|k| backing != "4k" || !matches!(k.as_str(), "split" | "collapse"))
        .collect();
    assert_eq!(applicable, expect);
    for k in &expect {
        let fired = r["kinds"][k]["fired"].as_u64().unwrap_or(0);
        assert!(fired >= 100, "{k} fired {fired} times (< 100):\n{stdout}");
    }
    for k in ["split", "collapse"] {
        if backing == "4k" {
            assert!(r["kinds"].get(k).is_none(), "{k} fired on 4k");
        }
    }
    // Quiescent points: several, all agreeing, one with dirty logging on.
    let points = r["quiescent_points"].as_array().unwrap();
    assert!(points.len() >= 3, "{stdout}");
    assert!(points.iter().all(|p| p["agrees"] == true), "{stdout}");
    let dirty: Vec<&Value> = points
        .iter()
        .filter(|p| p["dirty_logging"] == true)
        .collect();
    assert!(!dirty.is_empty(), "{stdout}");
    for p in dirty {
        assert_eq!(p["prediction"]["pages_2m"], 0, "{stdout}");
        assert!(p["kvm_pages_2m"].as_u64().unwrap() <= 1, "{stdout}");
    }
    // Write protection: vCPU writes faulted and were waited out (the run
    // had no guest-visible error, checked above).
    assert!(r["wrprotect_faults"].as_u64().unwrap() > 0, "{stdout}");
    // Memslot delete: KVM mapped nothing while slot 0 was gone.
    assert!(
        r["kinds"]["slot"]["unmapped_after_delete"]
            .as_u64()
            .unwrap()
            > 0
    );
    if backing != "4k" {
        // Dirty logging dropped 2M mappings while the guest wrote.
        let fell = r["kinds"]["dirtylog"]["pages_2m_fell"].as_u64().unwrap();
        assert!(fell > 0, "{stdout}");
        let huge_seen = points
            .iter()
            .any(|p| p["kvm_pages_2m"].as_u64().unwrap() > 0);
        assert!(huge_seen, "KVM never mapped 2M: {stdout}");
    }
    // The injector's CPU time: within each kind's latency (the rest is
    // waiting), and what the rate ceiling is made of.
    let mut cpu = 0;
    for k in &expect {
        let (c, t) = (
            r["kinds"][k]["cpu_us"].as_u64().unwrap(),
            r["kinds"][k]["total_us"].as_u64().unwrap(),
        );
        assert!(
            c > 0 && c <= t + 1000,
            "{k}: cpu {c} us of {t} us:\n{stdout}"
        );
        cpu += c;
    }
    let per_event = r["injector_cpu_per_event_us"].as_f64().unwrap();
    let events = r["events"].as_u64().unwrap() as f64;
    assert!((per_event * events - cpu as f64).abs() < 1.0, "{stdout}");
    let ceiling = r["injector_ceiling_events_per_second"].as_f64().unwrap();
    assert!((ceiling * per_event - 1e6).abs() < 1.0, "{stdout}");
    assert!(stdout.contains("injector on a CPU"), "{stdout}");
    assert!(!dir.join("replay.json").exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn stress_hugetlb() {
    stress("hugetlb");
}

#[test]
fn stress_thp() {
    stress("thp");
}

#[test]
fn stress_4k() {
    stress("4k");
}
