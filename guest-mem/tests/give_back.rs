//! Balloon give-backs on real hugetlb memory (no KVM): pages coalesced per
//! frame across 256-page buffers, frames given back whole freed without a
//! split (smaps and the pool memfd drop by 2M each, contents of other frames
//! intact) and faulted in huge again when touched; partly given-back frames
//! deferred until `split_deferred`, or split at once with the eager policy.

mod common;

use std::time::Duration;

use common::{page_bytes, Shadow, PPH};
use guest_mem::pagemap::pmd_mapped_frames;
use guest_mem::{
    Backing, FrameView, GiveBackReport, GuestRam, GuestRamConfig, NoVcpus, SplitPolicy, HPAGE_SIZE,
    PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress};

const FRAMES: usize = 8;
const PPHU: u64 = PPH as u64;
const HOUR: Duration = Duration::from_secs(3600);
const DEFERRED: SplitPolicy = SplitPolicy::Deferred {
    delay: HOUR,
    max_wait: HOUR,
};

fn ram() -> Option<(GuestRam, Shadow)> {
    if !common::hugetlb_available(FRAMES as u64) {
        return None;
    }
    let mut ram = GuestRam::new(&GuestRamConfig::new(
        FRAMES as u64 * HPAGE_SIZE,
        Backing::Hugetlb,
    ))
    .unwrap();
    ram.populate_all().unwrap();
    let pages = FRAMES as u64 * PPHU;
    let mut sh = Shadow::new(pages as usize);
    sh.made_present(0..pages);
    sh.write(&ram, 0..pages, 3);
    Some((ram, sh))
}

/// Give back `[first, first + n)` pages in buffers of 256, as the Linux
/// driver does, summing the reports.
fn inflate(ram: &mut GuestRam, first: u64, n: u64, policy: SplitPolicy) -> GiveBackReport {
    let mut sum = GiveBackReport::default();
    let mut p = first;
    while p < first + n {
        let k = 256.min(first + n - p);
        let r = ram
            .give_back(p * PAGE_SIZE, k * PAGE_SIZE, policy, &NoVcpus)
            .unwrap();
        sum.whole_frames_freed += r.whole_frames_freed;
        sum.frames_split += r.frames_split;
        sum.frames_deferred += r.frames_deferred;
        sum.pages_freed += r.pages_freed;
        sum.pages_queued += r.pages_queued;
        sum.freed_after.extend(r.freed_after);
        p += k;
    }
    sum
}

fn host_bytes(ram: &GuestRam) -> (u64, u64, u64) {
    let hv = ram.host_view().unwrap();
    let ps = ram.pool_stats();
    (hv.smaps.hugetlb(), hv.smaps.rss, ps.pool_memfd_bytes)
}

#[test]
fn buffers_coalesce_into_whole_frames_freed_without_a_split() {
    let Some((mut ram, mut sh)) = ram() else {
        return;
    };
    let full = FRAMES as u64 * HPAGE_SIZE;
    assert_eq!(host_bytes(&ram), (full, 0, full));

    // Frames 2..6 whole and 100 pages of frame 6, in 256-page buffers.
    let first = 2 * PPHU;
    let n = 4 * PPHU + 100;
    let r = inflate(&mut ram, first, n, DEFERRED);
    assert_eq!(r.whole_frames_freed, 4, "{r:?}");
    assert_eq!(r.frames_split, 0, "{r:?}");
    // Every frame went on the queue with its first buffer; four left it whole.
    assert_eq!(r.frames_deferred, 5, "{r:?}");
    assert_eq!(r.pages_freed, 4 * PPHU, "{r:?}");
    // The first buffer of each whole frame waited for the second one.
    assert_eq!(r.pages_queued, 4 * 256 + 100, "{r:?}");
    assert_eq!(r.freed_after.len(), 4);
    // Read without faulting in (a read would fault the huge page in again).
    sh.discarded(first..first + 4 * PPHU);

    // Books: every frame still huge (the whole ones on their slot, not
    // faulted in); host: 4 huge pages gone, no small page anywhere.
    assert!(ram
        .frame_states()
        .iter()
        .all(|s| matches!(s, FrameView::Huge { .. })));
    assert_eq!(ram.released_frames(), vec![2, 3, 4, 5]);
    assert_eq!(
        host_bytes(&ram),
        (full - 4 * HPAGE_SIZE, 0, full - 4 * HPAGE_SIZE)
    );
    let st = ram.give_back_status();
    assert_eq!((st.frames_queued, st.pages_queued), (1, 100));
    assert_eq!(st.released_frames, 4);
    assert_eq!(st.queue.frames_completed, 4);

    // Nothing is due before the delay.
    let r = ram.split_deferred(HOUR, HOUR, &NoVcpus).unwrap();
    assert_eq!(r, GiveBackReport::default());
    // On request: frame 6 is split once, its 100 pages freed.
    let r = ram
        .split_deferred(Duration::ZERO, Duration::ZERO, &NoVcpus)
        .unwrap();
    assert_eq!((r.frames_split, r.pages_freed), (1, 100), "{r:?}");
    assert_eq!(r.freed_after.len(), 1);
    sh.discarded(6 * PPHU..6 * PPHU + 100);
    assert_eq!(ram.frame_states()[6], FrameView::Small { present: 412 });
    let kept = (PPHU - 100) * PAGE_SIZE;
    assert_eq!(
        host_bytes(&ram),
        (full - 5 * HPAGE_SIZE, kept, full - 5 * HPAGE_SIZE)
    );
    // Host memory of guest RAM: exactly the given-back pages less.
    assert_eq!(
        full - (full - 5 * HPAGE_SIZE + kept),
        n * PAGE_SIZE,
        "host memory freed"
    );
    // Kept pages kept their bytes; given-back ones read zero.
    sh.verify_bytes(&ram);

    // The guest touches frame 2 again: a fresh, zeroed huge page, PMD-mapped.
    let mem = ram.memory();
    mem.write_slice(
        &page_bytes(2 * PPHU + 7, 9),
        GuestAddress((2 * PPHU + 7) * PAGE_SIZE),
    )
    .unwrap();
    sh.gen[(2 * PPHU + 7) as usize] = 9;
    sh.present[(2 * PPHU + 7) as usize] = true;
    if let Some(pmd) = pmd_mapped_frames(ram.host_addr(), FRAMES).unwrap() {
        assert!(pmd[2], "frame 2 not PMD-mapped after the touch: {pmd:?}");
        assert!(!pmd[3]);
        assert_eq!(ram.released_frames(), vec![3, 4, 5]);
    }
    assert_eq!(host_bytes(&ram).0, full - 4 * HPAGE_SIZE);
    // The deflate of frame 3 gets its huge page back at once.
    ram.refill(3 * HPAGE_SIZE, HPAGE_SIZE, &NoVcpus).unwrap();
    assert_eq!(host_bytes(&ram).0, full - 3 * HPAGE_SIZE);
    if pmd_mapped_frames(ram.host_addr(), FRAMES)
        .unwrap()
        .is_some()
    {
        assert_eq!(ram.released_frames(), vec![4, 5]);
    }
    sh.verify_bytes(&ram);
}

#[test]
fn eager_policy_splits_at_once_as_today() {
    let Some((mut ram, mut sh)) = ram() else {
        return;
    };
    let r = inflate(&mut ram, PPHU, 300, SplitPolicy::Eager);
    // Two buffers into one frame: split on the first, small pages after.
    assert_eq!((r.frames_split, r.whole_frames_freed), (1, 0), "{r:?}");
    assert_eq!((r.pages_freed, r.pages_queued), (300, 0));
    assert_eq!(ram.give_back_status().frames_queued, 0);
    sh.discarded(PPHU..PPHU + 300);
    sh.verify_bytes(&ram);
    // A buffer that covers a frame still frees it whole.
    let r = ram
        .give_back(4 * HPAGE_SIZE, HPAGE_SIZE, SplitPolicy::Eager, &NoVcpus)
        .unwrap();
    assert_eq!((r.frames_split, r.whole_frames_freed), (0, 1), "{r:?}");
}

#[test]
fn pages_taken_back_before_the_split_never_split_and_read_zero() {
    let Some((mut ram, mut sh)) = ram() else {
        return;
    };
    inflate(&mut ram, 10, 20, DEFERRED);
    ram.refill(10 * PAGE_SIZE, 20 * PAGE_SIZE, &NoVcpus)
        .unwrap();
    sh.gen[10..30].iter_mut().for_each(|g| *g = 0);
    assert_eq!(ram.give_back_status().frames_queued, 0);
    let r = ram
        .split_deferred(Duration::ZERO, Duration::ZERO, &NoVcpus)
        .unwrap();
    assert_eq!(r.frames_split, 0);
    assert!(matches!(ram.frame_states()[0], FrameView::Huge { .. }));
    sh.verify_bytes(&ram);
}

#[test]
fn a_free_page_report_completes_a_frame_queued_by_inflates() {
    let Some((mut ram, mut sh)) = ram() else {
        return;
    };
    inflate(&mut ram, 3 * PPHU, 200, DEFERRED);
    // A report of part of the rest: kept (the guest may reuse those pages).
    let r = ram
        .report_free((3 * PPHU + 200) * PAGE_SIZE, 100 * PAGE_SIZE, &NoVcpus)
        .unwrap();
    assert_eq!(r, GiveBackReport::default());
    assert_eq!(ram.give_back_status().pages_queued, 200);
    // The whole rest: frame 3 is freed whole.
    let r = ram
        .report_free((3 * PPHU + 200) * PAGE_SIZE, 312 * PAGE_SIZE, &NoVcpus)
        .unwrap();
    assert_eq!((r.whole_frames_freed, r.frames_split), (1, 0), "{r:?}");
    assert_eq!(ram.give_back_status().frames_queued, 0);
    sh.discarded(3 * PPHU..4 * PPHU);
    sh.verify_bytes(&ram);
    // A discard through the old path settles nothing it does not touch.
    assert_eq!(ram.released_frames(), vec![3]);
}
