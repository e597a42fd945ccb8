//! `vmm stress` on 3.5 GiB (3 GiB below the 32-bit MMIO hole, 512 MiB from
//! 4 GiB up: two memslots) on hugetlb, 120 events with 2 vCPUs: no
//! violation, KVM and the mirror agree at every quiescent point, frame
//! events act in both memslots, and the `slot` event deletes and re-creates
//! each memslot in turn. Alone in its test binary: it takes 1792 of the
//! 2048 huge pages `resources/setup-host.sh` reserves.

mod common;

use serde_json::Value;

fn per_slot(r: &Value, kind: &str) -> Vec<(u64, u64)> {
    r["kinds"][kind]["per_slot"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.parse().unwrap_or(u64::MAX), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn stress_events_in_both_memslots_around_the_hole() {
    if let Some(why) = common::skip_reason("hugetlb", 1792) {
        common::skip(&why);
        return;
    }
    let dir = common::out_dir("vmm-stress-above4g", "hugetlb");
    let json = dir.join("report.json");
    let replay = dir.join("replay.json");
    let (json_s, replay_s) = (json.display().to_string(), replay.display().to_string());
    let o = common::vmm(&[
        "stress",
        "--backing",
        "hugetlb",
        "--memory",
        "3584M",
        "--vcpus",
        "2",
        "--ops",
        "120",
        "--seed",
        "5",
        "--json",
        &json_s,
        "--replay-out",
        &replay_s,
    ]);
    let r = common::read_json_or_null(&json);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    assert_eq!(r["violations"].as_array().map(Vec::len), Some(0), "{r:#}");
    let points = r["quiescent_points"].as_array().expect("quiescent points");
    assert!(!points.is_empty(), "{r:#}");
    for p in points {
        assert_eq!(p["agrees"], true, "{p:#}");
    }
    // Frame events in both memslots (0: below the hole, 1: above it).
    let mut frame_events = [0u64; 2];
    for kind in [
        "discard4k",
        "discard2m",
        "split",
        "collapse",
        "wrprotect",
        "pageout",
    ] {
        for (slot, n) in per_slot(&r, kind) {
            assert!(slot < 2, "{kind}: slot {slot} in {r:#}");
            frame_events[slot as usize] += n;
        }
    }
    assert!(
        frame_events.iter().all(|n| *n > 0),
        "{frame_events:?}: {r:#}"
    );
    // The slot event cycles through both memslots.
    let slots: Vec<u64> = per_slot(&r, "slot").iter().map(|(s, _)| *s).collect();
    assert_eq!(slots, vec![0, 1], "{r:#}");
}
