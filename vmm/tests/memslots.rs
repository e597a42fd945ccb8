//! Memslots that are not 2M aligned (`--memslot-size 3M`): every slot edge
//! at an odd multiple of 3 MiB cuts a 2M frame in two, and KVM's
//! `lpage_info` (`kvm_alloc_memslot_metadata`: a slot's partial first or
//! last large page is disallowed) keeps that frame 4K in both slots. The
//! `unmap` guest on 64 MiB: KVM and the mirror agree exactly at every
//! checkpoint, and KVM maps exactly as many frames fewer at 2M than with the
//! default memslots as there are cut frames.

mod common;

use common::num;
use serde_json::Value;

const MIB: u64 = 64;
const SLOT: u64 = 3 << 20;
const HPAGE: u64 = 2 << 20;

fn run(backing: &str, slot_size: Option<&str>) -> Value {
    let dir = common::out_dir("vmm-memslots", &format!("{backing}-{slot_size:?}"));
    let json = dir.join("report.json");
    let json_s = json.display().to_string();
    let mem = format!("{MIB}M");
    let mut args = vec![
        "run",
        "--test-guest",
        "unmap",
        "--backing",
        backing,
        "--memory",
        &mem,
        "--serial",
        "/dev/null",
        "--timeout",
        "120",
        "--stats-json",
        &json_s,
    ];
    if let Some(s) = slot_size {
        args.extend(["--memslot-size", s]);
    }
    let o = common::vmm(&args);
    let r = common::read_json_or_null(&json);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    r
}

/// Frames a slot edge cuts (an edge inside the frame, not at its start).
fn cut_frames() -> u64 {
    let edges = (1..).map(|k| k * SLOT).take_while(|e| *e < MIB << 20);
    let mut frames: Vec<u64> = edges
        .filter(|e| !e.is_multiple_of(HPAGE))
        .map(|e| e / HPAGE)
        .collect();
    frames.dedup();
    frames.len() as u64
}

fn phase1_2m(r: &Value) -> u64 {
    let c = r["checkpoints"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["phase"].as_u64() == Some(1)))
        .unwrap_or_else(|| panic!("no checkpoint 1 in {r:#}"));
    num(c, &["kvm", "pages_2m"])
}

fn misaligned_slots_are_predicted_exactly(backing: &str) {
    if let Some(why) = common::skip_reason(backing, MIB / 2) {
        common::skip(&why);
        return;
    }
    let r = run(backing, Some("3M"));
    let slots = r["slots"].as_array().expect("slots");
    assert_eq!(slots.len() as u64, (MIB << 20).div_ceil(SLOT), "{r:#}");
    common::assert_checkpoints_match_mirror(&r);
    assert_eq!(num(&r, &["report_totals", "mismatches"]), 0);
    let base = run(backing, None);
    assert_eq!(base["slots"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        phase1_2m(&base) - phase1_2m(&r),
        cut_frames(),
        "every frame a slot edge cuts maps 4K, no other: {r:#}"
    );
}

#[test]
fn memslots_of_3m_hugetlb_keep_cut_frames_4k_as_the_mirror_predicts() {
    assert_eq!(cut_frames(), 11);
    misaligned_slots_are_predicted_exactly("hugetlb");
}

#[test]
fn memslots_of_3m_thp_keep_cut_frames_4k_as_the_mirror_predicts() {
    misaligned_slots_are_predicted_exactly("thp");
}

#[test]
fn memslot_size_must_be_whole_pages() {
    let o = common::vmm(&[
        "run",
        "--test-guest",
        "hello",
        "--memory",
        "64M",
        "--memslot-size",
        "5000",
        "--kvm-dev",
        "/dev/null",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", common::text(&o));
    assert!(
        common::text(&o).contains("multiple of 4 KiB"),
        "{}",
        common::text(&o)
    );
}
