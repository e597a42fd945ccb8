//! The collapse reserve on real memory (`hugetlb`, native host): a huge
//! page allocated ahead for a split frame; a collapse onto it allocates
//! nothing, keeps every byte (the pages the frame lacked read zero) and
//! leaves the pool memfd exactly as the books say; a page no split frame
//! wants any more goes back to the host; a collapse that takes the slot
//! while its page is being allocated (the background race) leaves the memfd
//! exact too. Every byte is checked after each step.

mod common;

use common::{check_all as check, Shadow};
use guest_mem::{FrameView, GuestRam, NoVcpus, HPAGE_SIZE, PAGE_SIZE};

const FRAMES: usize = 8;

/// Gives back 3 pages of `frame` (a split), as the shadow records.
fn give_back_3(ram: &mut GuestRam, sh: &mut Shadow, frame: u64) {
    let gpa = frame * HPAGE_SIZE + 9 * PAGE_SIZE;
    ram.discard(gpa, 3 * PAGE_SIZE, &NoVcpus).unwrap();
    let p = gpa / PAGE_SIZE;
    sh.discarded(p..p + 3);
}

#[test]
fn a_collapse_onto_a_warm_huge_page_takes_it_and_the_pool_stays_exact() {
    let Some((mut ram, mut sh)) = common::patterned_hugetlb(FRAMES) else {
        return;
    };
    assert_eq!(
        ram.prepare_warm_huge_pages(1).unwrap(),
        0,
        "no split frame: nothing to collapse, no page taken ahead"
    );
    assert_eq!(ram.pool_stats().collapse_reserve_bytes, 0);

    give_back_3(&mut ram, &mut sh, 4);
    assert_eq!(ram.frame_states()[4], FrameView::Small { present: 509 });
    check(&ram, &sh);
    assert_eq!(
        ram.prepare_warm_huge_pages(2).unwrap(),
        1,
        "one split frame: one page, not the two asked for"
    );
    let ps = ram.pool_stats();
    assert_eq!(ps.collapse_reserve_bytes, HPAGE_SIZE);
    assert_eq!(ps.pool_memfd_bytes, (FRAMES as u64 - 1 + 1) * HPAGE_SIZE);
    check(&ram, &sh);

    ram.collapse(4, &NoVcpus).unwrap();
    assert!(matches!(ram.frame_states()[4], FrameView::Huge { .. }));
    assert_eq!(ram.warm_huge_pages(), 0, "the collapse took the warm page");
    let ps = ram.pool_stats();
    assert_eq!(ps.collapse_reserve_bytes, 0);
    assert_eq!(ps.pool_memfd_bytes, FRAMES as u64 * HPAGE_SIZE);
    // The 3 pages given back read zero on the warm page, the rest kept.
    sh.frame_all_present(4);
    check(&ram, &sh);
}

#[test]
fn a_warm_huge_page_no_split_frame_wants_goes_back_to_the_host() {
    let Some((mut ram, mut sh)) = common::patterned_hugetlb(FRAMES) else {
        return;
    };
    give_back_3(&mut ram, &mut sh, 2);
    assert_eq!(ram.prepare_warm_huge_pages(1).unwrap(), 1);
    check(&ram, &sh);
    // The split frame given back whole: no frame left to collapse.
    ram.discard(2 * HPAGE_SIZE, HPAGE_SIZE, &NoVcpus).unwrap();
    sh.discarded(2 * 512..3 * 512);
    assert_eq!(ram.release_surplus_warm_huge(1).unwrap(), 1);
    assert_eq!(ram.warm_huge_pages(), 0);
    assert_eq!(ram.pool_stats().collapse_reserve_bytes, 0);
    check(&ram, &sh);
}

#[test]
fn a_collapse_that_takes_a_page_being_allocated_leaves_the_pool_exact() {
    let Some((mut ram, mut sh)) = common::patterned_hugetlb(FRAMES) else {
        return;
    };
    give_back_3(&mut ram, &mut sh, 6);
    // Step 1 under the lock; the collapse comes before step 2.
    let prep = ram
        .huge_page_to_prepare(1)
        .unwrap()
        .expect("a page to prepare");
    assert!(ram.huge_page_to_prepare(1).unwrap().is_none(), "one aside");
    ram.collapse(6, &NoVcpus).unwrap();
    assert!(matches!(
        ram.frame_states()[6],
        FrameView::Huge { slot } if slot == prep.slot()
    ));
    sh.frame_all_present(6);
    check(&ram, &sh);
    // Step 2 finds the page in use (allocates nothing, changes no byte);
    // step 3 finds the slot taken and leaves it to its frame.
    let r = prep.allocate();
    assert!(!ram.huge_page_allocated(prep, r).unwrap());
    assert_eq!(ram.warm_huge_pages(), 0);
    check(&ram, &sh);

    // The other order: the frame split again and its slot freed before
    // step 3 (step 2 allocated a page for a free slot): punched again.
    give_back_3(&mut ram, &mut sh, 6);
    let prep = ram.huge_page_to_prepare(1).unwrap().expect("a page");
    let slot = prep.slot();
    ram.collapse(6, &NoVcpus).unwrap();
    sh.frame_all_present(6);
    give_back_3(&mut ram, &mut sh, 6);
    assert!(!matches!(ram.frame_states()[6], FrameView::Huge { .. }));
    let r = prep.allocate();
    assert!(!ram.huge_page_allocated(prep, r).unwrap());
    assert_eq!(
        ram.pool_stats().pool_memfd_bytes,
        (FRAMES as u64 - 1) * HPAGE_SIZE,
        "slot {slot}: no page left where no frame lives"
    );
    check(&ram, &sh);
}
