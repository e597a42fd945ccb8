//! 1G frames end to end on this host's KVM (`--backing hugetlb-1g`): the
//! `unmap` test guest in 1 GiB of RAM, all of it on one 1G page. Its
//! give-back of one 4K page in each of K = 8 frames splits the 1G page into
//! 2M frames (1G -> 2M) and only those K frames to 4K; the take-back and the
//! collapser bring the K frames back to 2M and the GiB back to one 1G page.
//! KVM's pages_4k / pages_2m / pages_1g equal the mirror's at every
//! checkpoint; the guest checks every byte.
//!
//! Host kinds: this machine's KVM (shadow paging: the guest's 2M pages cap
//! KVM's mappings at 2M, so pages_1g stays 0 here; `tdp_host.rs` proves the
//! 1G mapping on the emulated AMD-V + NPT host).

mod common;

use common::num;
use serde_json::Value;

const K: u64 = 8;
/// Frames of the 1G page.
const FRAMES: u64 = 512;

fn phase(r: &Value, p: u64) -> &Value {
    r["checkpoints"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["phase"].as_u64() == Some(p)))
        .unwrap_or_else(|| panic!("no checkpoint {p} in {r:#}"))
}

#[test]
fn unmap_on_a_1g_page_splits_1g_to_2m_and_k_frames_to_4k_and_climbs_back() {
    if let Some(why) = common::skip_reason("hugetlb-1g", FRAMES) {
        common::skip(&why);
        return;
    }
    let (r, stdout) = common::run_with_report(
        "unmap-1g",
        &[
            "run",
            "--test-guest",
            "unmap",
            "--backing",
            "hugetlb-1g",
            "--memory",
            "1G",
            "--serial",
            "/dev/null",
            "--timeout",
            "120",
            "--stats",
        ],
    );
    assert_eq!(num(&r, &["report_totals", "mismatches"]), 0, "{r:#}");
    assert_eq!(num(&r, &["report_totals", "nonzero_discarded"]), 0);
    common::assert_checkpoints_match_mirror(&r);
    let frames = |c: &Value, k: &str| num(c, &["frames", k]);
    // Phase 1: the whole GiB on its 1G page.
    let c1 = phase(&r, 1);
    assert_eq!(frames(c1, "gig"), FRAMES, "{c1:#}");
    assert_eq!(frames(c1, "huge") + frames(c1, "small"), 0);
    // Phase 2: 1G -> 2M for the GiB, 2M -> 4K for the K frames only.
    let c2 = phase(&r, 2);
    assert_eq!(frames(c2, "gig"), 0, "{c2:#}");
    assert_eq!(frames(c2, "small"), K);
    assert_eq!(frames(c2, "huge"), FRAMES - K);
    // Phase 4: the collapser takes the K frames back to 2M and the GiB to 1G.
    let c4 = phase(&r, 4);
    assert_eq!(num(c4, &["collapsed_after"]), K, "{c4:#}");
    let c5 = phase(&r, 5);
    assert_eq!(frames(c5, "gig"), FRAMES, "{c5:#}");
    assert_eq!(frames(c5, "huge") + frames(c5, "small"), 0);
    // The 1G split and the K 2M splits each held writes, no vCPU paused.
    assert_eq!(num(&r, &["unmap", "split_pause", "count"]), 0);
    assert_eq!(
        num(&r, &["unmap", "split_write_hold", "count"]),
        K + 1,
        "{:#}",
        r["unmap"]
    );
    assert!(
        stdout.contains("1x1G+0/0"),
        "the reports show the 1G page:\n{stdout}"
    );
}
