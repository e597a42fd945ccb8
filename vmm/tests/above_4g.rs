//! Guest RAM beyond the 32-bit MMIO hole: a 4 GiB guest (3 GiB below the
//! hole at `[0, 0xc000_0000)`, 1 GiB from 4 GiB up) on each backing, in two
//! KVM memslots.
//!
//! * `unmap` with `stride=256` gives back a page of 8 frames spread over the
//!   whole slice, two of them above the hole: `pages_2m` drops by exactly 8
//!   and comes back (hugetlb, thp), KVM and the mirror agree exactly at every
//!   checkpoint, and the mirror's per-slot counts show the two frames above
//!   the hole mapped 4K at checkpoint 3 (slot 1 holds exactly them);
//! * `verify` stamps and checks every page on both sides of the hole;
//! * `--memslot-size` with a size that is not a 2M multiple leaves partial
//!   2M frames at slot edges, which KVM maps 4K only: the mirror predicts
//!   KVM's counts exactly.
//!
//! One run at a time (a 4 GiB hugetlb guest takes 2048 huge pages, what
//! `resources/setup-host.sh` reserves for the default test run).

mod common;

use std::sync::Mutex;

use common::num;
use serde_json::Value;

const MEMORY: &str = "4G";
/// 2M frames of a 4 GiB guest.
const FRAMES: u64 = 2048;
/// Frames of the slot above the hole.
const HIGH_FRAMES: u64 = 512;
const K: u64 = 8;

/// The runs take most of the hugetlb pool and 4 GiB of memory each.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run(backing: &str, extra: &[&str]) -> Option<Value> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(why) = common::skip_reason(backing, FRAMES) {
        common::skip(&why);
        return None;
    }
    let dir = common::out_dir("vmm-above4g", backing);
    let json = dir.join("report.json");
    let mut args = vec![
        "run",
        "--backing",
        backing,
        "--memory",
        MEMORY,
        "--serial",
        "/dev/null",
        "--timeout",
        "300",
        "--stats",
        "--stats-json",
    ];
    let json_s = json.display().to_string();
    args.push(&json_s);
    args.extend_from_slice(extra);
    let o = common::vmm(&args);
    let report = common::read_json_or_null(&json);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    Some(report)
}

fn phase(r: &Value, p: u64) -> &Value {
    r["checkpoints"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["phase"].as_u64() == Some(p)))
        .unwrap_or_else(|| panic!("no checkpoint {p} in {r:#}"))
}

/// The mirror's (pages_4k, pages_2m) in memslot `id` at checkpoint `c`.
fn slot_mirror(c: &Value, id: u64) -> (u64, u64) {
    let s = c["mirror"]["per_slot"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["id"].as_u64() == Some(id)))
        .unwrap_or_else(|| panic!("no slot {id} in {c:#}"));
    (num(s, &["pages_4k"]), num(s, &["pages_2m"]))
}

fn two_slots_around_the_hole(r: &Value) {
    let slots = r["slots"].as_array().expect("slots in the report");
    let got: Vec<(u64, u64)> = slots
        .iter()
        .map(|s| (num(s, &["gpa"]), num(s, &["size"])))
        .collect();
    assert_eq!(got, vec![(0, 3 << 30), (4 << 30, 1 << 30)], "{r:#}");
}

fn kvm_equals_mirror_everywhere(r: &Value) {
    common::assert_checkpoints_match_mirror(r);
    assert_eq!(
        (num(r, &["kvm", "pages_4k"]), num(r, &["kvm", "pages_2m"])),
        (
            num(r, &["mirror", "pages_4k"]),
            num(r, &["mirror", "pages_2m"])
        ),
        "at the end: {r:#}"
    );
}

fn unmap_across_the_hole(backing: &str) {
    let Some(r) = run(
        backing,
        &["--test-guest", "unmap", "--guest-arg", "stride=256"],
    ) else {
        return;
    };
    assert_eq!(num(&r, &["report_totals", "mismatches"]), 0, "{r:#}");
    assert_eq!(num(&r, &["report_totals", "nonzero_discarded"]), 0);
    assert_eq!(num(&r, &["report_totals", "pages_discarded"]), K);
    two_slots_around_the_hole(&r);
    kvm_equals_mirror_everywhere(&r);
    let (c1, c2, c3, c5) = (phase(&r, 1), phase(&r, 2), phase(&r, 3), phase(&r, 5));
    if backing == "4k" {
        // Every page 4K: the 8 given-back pages lose their SPTE alone.
        let k4 = |c: &Value| num(c, &["kvm", "pages_4k"]);
        assert_eq!(k4(c1) - k4(c2), K, "{r:#}");
        assert_eq!(k4(c3), k4(c1));
        assert_eq!(num(&r, &["kvm", "pages_2m"]), 0);
        // All of slot 1 (the 1 GiB above the hole) is mapped, 4K.
        assert_eq!(slot_mirror(c3, 1), (HIGH_FRAMES * 512, 0));
        return;
    }
    let k2 = |c: &Value| num(c, &["kvm", "pages_2m"]);
    assert_eq!(k2(c1) - k2(c2), K, "pages_2m drops by exactly K: {r:#}");
    assert_eq!(k2(c5), k2(c1), "and comes back");
    assert_eq!(num(c2, &["frames", "small"]), K);
    // Frames 1 + 256 k of the guest's virtual space: 1537 and 1793 lie
    // above the hole (virtual 3 GiB = guest-physical 4 GiB). At checkpoint 3
    // the guest re-read them through 4K host pages.
    assert_eq!(slot_mirror(c1, 1), (0, HIGH_FRAMES), "{r:#}");
    assert_eq!(slot_mirror(c2, 1), (0, HIGH_FRAMES - 2), "{r:#}");
    assert_eq!(slot_mirror(c3, 1), (2 * 512, HIGH_FRAMES - 2), "{r:#}");
    assert_eq!(slot_mirror(c5, 1), (0, HIGH_FRAMES), "{r:#}");
}

#[test]
fn unmap_4g_hugetlb_on_both_sides_of_the_hole() {
    unmap_across_the_hole("hugetlb");
}

#[test]
fn unmap_4g_thp_on_both_sides_of_the_hole() {
    unmap_across_the_hole("thp");
}

#[test]
fn unmap_4g_4k_on_both_sides_of_the_hole() {
    unmap_across_the_hole("4k");
}

#[test]
fn verify_4g_hugetlb_stamps_every_page_on_both_sides() {
    let Some(r) = run("hugetlb", &["--test-guest", "verify"]) else {
        return;
    };
    assert_eq!(num(&r, &["report_totals", "mismatches"]), 0, "{r:#}");
    // Two generations of every work page (all RAM but the reserved frame).
    assert_eq!(
        num(&r, &["report_totals", "pages_checked"]),
        2 * (FRAMES - 1) * 512
    );
    two_slots_around_the_hole(&r);
    kvm_equals_mirror_everywhere(&r);
    assert_eq!(slot_mirror(phase(&r, 2), 1), (0, HIGH_FRAMES), "{r:#}");
}
