//! The split reserve on real memory (`hugetlb`, native host): blocks of
//! small slots allocated ahead; a split onto a warm block allocates
//! nothing and leaves the memfd exactly as the books say; a split that takes
//! a block while its pages are being allocated (the background race) leaves
//! it exact too. Every byte is checked after each step.

mod common;

use common::{check_all as check, PPH};
use guest_mem::{Backing, FrameView, GuestRam, GuestRamConfig, NoVcpus, HPAGE_SIZE, PAGE_SIZE};

const FRAMES: usize = 8;

#[test]
fn a_split_onto_a_warm_block_takes_it_and_the_memfd_stays_exact() {
    let Some((mut ram, sh)) = common::patterned_hugetlb(FRAMES) else {
        return;
    };
    assert_eq!(ram.prepare_split_blocks(2).unwrap(), 2);
    assert_eq!(ram.warm_split_blocks(), 2);
    let ps = ram.pool_stats();
    assert_eq!(ps.split_reserve_bytes, 2 * HPAGE_SIZE);
    assert_eq!(
        ps.data_memfd_bytes,
        2 * HPAGE_SIZE,
        "the two blocks, allocated"
    );
    check(&ram, &sh);

    ram.split(3, &NoVcpus).unwrap();
    assert_eq!(ram.frame_states()[3], FrameView::Small { present: 512 });
    assert_eq!(ram.warm_split_blocks(), 1, "the split took one warm block");
    let ps = ram.pool_stats();
    assert_eq!(
        ps.data_memfd_bytes,
        2 * HPAGE_SIZE,
        "nothing allocated anew"
    );
    check(&ram, &sh);

    // A give-back inside a huge frame splits it onto the other warm block:
    // the slot of the page given back is punched, not left allocated.
    let gpa = 5 * HPAGE_SIZE + 7 * PAGE_SIZE;
    let rep = ram.discard(gpa, PAGE_SIZE, &NoVcpus).unwrap();
    assert_eq!(rep.frames_split, 1);
    let mut sh = sh;
    let p = gpa / PAGE_SIZE;
    sh.discarded(p..p + 1);
    assert_eq!(ram.warm_split_blocks(), 0);
    assert_eq!(
        ram.pool_stats().data_memfd_bytes,
        (2 * PPH as u64 - 1) * PAGE_SIZE
    );
    check(&ram, &sh);

    // Refilled: the reserve is topped up again where no page lives.
    assert_eq!(ram.prepare_split_blocks(1).unwrap(), 1);
    check(&ram, &sh);
    ram.collapse(3, &NoVcpus).unwrap();
    check(&ram, &sh);
}

#[test]
fn a_split_that_takes_a_block_being_allocated_leaves_the_memfd_exact() {
    let Some((mut ram, mut sh)) = common::patterned_hugetlb(FRAMES) else {
        return;
    };
    // Step 1 under the lock; the split comes before step 2 finishes.
    let prep = ram
        .split_block_to_prepare(1)
        .unwrap()
        .expect("a block to prepare");
    assert!(
        ram.split_block_to_prepare(1).unwrap().is_none(),
        "one set aside"
    );
    let gpa = 2 * HPAGE_SIZE;
    ram.discard(gpa, 3 * PAGE_SIZE, &NoVcpus).unwrap();
    let p = gpa / PAGE_SIZE;
    sh.discarded(p..p + 3);
    assert_eq!(
        ram.frame_states()[2],
        FrameView::Small { present: 509 },
        "split onto the block set aside"
    );
    check(&ram, &sh);
    // Step 2 allocates all 512 slots, the 3 free ones too; step 3 finds
    // the block taken and punches those again.
    let r = prep.allocate();
    assert!(!ram.split_block_allocated(prep, r).unwrap());
    assert_eq!(ram.warm_split_blocks(), 0);
    check(&ram, &sh);
    assert_eq!(
        ram.pool_stats().data_memfd_bytes,
        509 * PAGE_SIZE,
        "only the pages in use"
    );
}

#[test]
fn no_reserve_where_the_kernel_splits() {
    let cfg = GuestRamConfig::new(2 * HPAGE_SIZE, Backing::Small4k);
    let mut ram = GuestRam::new(&cfg).unwrap();
    assert!(ram.split_block_to_prepare(4).unwrap().is_none());
    assert_eq!(ram.prepare_split_blocks(4).unwrap(), 0);
    assert_eq!(ram.pool_stats().split_reserve_bytes, 0);
}

#[test]
fn a_collapse_keeps_its_block_for_the_next_split_which_shows_nothing_stale() {
    let Some((mut ram, mut sh)) = common::patterned_hugetlb(FRAMES) else {
        return;
    };
    // The reserve wants one block; a split takes it.
    assert_eq!(ram.prepare_split_blocks(1).unwrap(), 1);
    ram.split(3, &NoVcpus).unwrap();
    assert_eq!(ram.warm_split_blocks(), 0);
    // The collapse keeps frame 3's block (all 512 pages, in page order)
    // for the reserve instead of punching it: still allocated, counted.
    ram.collapse(3, &NoVcpus).unwrap();
    assert_eq!(ram.warm_split_blocks(), 1, "the collapsed block is kept");
    let ps = ram.pool_stats();
    assert_eq!(ps.split_reserve_bytes, HPAGE_SIZE);
    assert_eq!(ps.data_memfd_bytes, HPAGE_SIZE, "frame 3's old pages, kept");
    check(&ram, &sh);

    // A give-back in frame 5 splits it onto the kept block (no mapping yet:
    // copied with pwrite); the pages given back read zero, not frame 3's
    // old bytes, and only the kept pages stay allocated.
    let gpa = 5 * HPAGE_SIZE + 10 * PAGE_SIZE;
    assert_eq!(
        ram.discard(gpa, 3 * PAGE_SIZE, &NoVcpus)
            .unwrap()
            .frames_split,
        1
    );
    let p = gpa / PAGE_SIZE;
    sh.discarded(p..p + 3);
    assert_eq!(ram.warm_split_blocks(), 0);
    assert_eq!(ram.pool_stats().data_memfd_bytes, 509 * PAGE_SIZE);
    check(&ram, &sh);

    // Taken back: the refill gets the lowest free slots, the three the
    // give-back left, so frame 5 is a whole block again and its collapse
    // keeps it too. A split of frame 6 takes it, a collapse of frame 6 keeps
    // it again, the worker's step maps it; a give-back in frame 7 then
    // copies through that mapping.
    let gpa5 = 5 * HPAGE_SIZE;
    ram.refill(gpa5, HPAGE_SIZE, &NoVcpus).unwrap();
    sh.made_present(gpa5 / PAGE_SIZE..gpa5 / PAGE_SIZE + PPH as u64);
    ram.collapse(5, &NoVcpus).unwrap();
    assert_eq!(ram.warm_split_blocks(), 1, "a whole block again: kept");
    check(&ram, &sh);
    ram.split(6, &NoVcpus).unwrap();
    assert_eq!(ram.warm_split_blocks(), 0);
    ram.collapse(6, &NoVcpus).unwrap();
    assert_eq!(ram.warm_split_blocks(), 1);
    assert_eq!(
        ram.prepare_split_blocks(1).unwrap(),
        0,
        "mapped, nothing allocated"
    );
    let windows = ram.split_windows();
    windows.take();
    let gpa7 = 7 * HPAGE_SIZE + 511 * PAGE_SIZE;
    ram.discard(gpa7, PAGE_SIZE, &NoVcpus).unwrap();
    let p7 = gpa7 / PAGE_SIZE;
    sh.discarded(p7..p7 + 1);
    assert!(windows.take().iter().all(|w| w.prepared));
    assert_eq!(ram.pool_stats().data_memfd_bytes, 511 * PAGE_SIZE);
    check(&ram, &sh);
}
