//! Guest RAM around the 32-bit MMIO hole, on real hugetlb memory (no KVM):
//! 3 GiB + 8 MiB of RAM, of which only a few frames are populated (so the
//! test costs a few huge pages, not gigabytes). Balloon give-backs and free
//! page reports above 4 GiB free exactly their frames; ranges in the hole
//! are refused; the vm-memory view has the two regions.

mod common;

use guest_mem::{
    Backing, FrameView, GuestMemError, GuestRam, GuestRamConfig, NoVcpus, SplitPolicy,
    HIGH_RAM_START, HPAGE_SIZE, MMIO_HOLE_START, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const SIZE: u64 = MMIO_HOLE_START + 8 * HPAGE_SIZE;
/// Frames of guest-physical space below 4 GiB.
const HIGH_FRAME: usize = (HIGH_RAM_START / HPAGE_SIZE) as usize;

fn ram() -> Option<GuestRam> {
    if !common::hugetlb_available(4) {
        return None;
    }
    let mut cfg = GuestRamConfig::new(SIZE, Backing::Hugetlb);
    cfg.hugetlb_pool_pages = Some(4);
    let mut ram = GuestRam::new(&cfg).unwrap();
    for f in [0, HIGH_FRAME, HIGH_FRAME + 1, HIGH_FRAME + 7] {
        ram.populate(f).unwrap();
    }
    Some(ram)
}

#[test]
fn layout_memslots_and_view_skip_the_hole() {
    let Some(ram) = ram() else {
        return;
    };
    assert_eq!(ram.size(), SIZE);
    assert_eq!(ram.span(), HIGH_RAM_START + 8 * HPAGE_SIZE);
    let slots = ram.memslots();
    assert_eq!(slots.len(), 2);
    assert_eq!(
        (slots[1].gpa, slots[1].size),
        (HIGH_RAM_START, 8 * HPAGE_SIZE)
    );
    assert_eq!(slots[1].host_addr, ram.host_addr() + HIGH_RAM_START);
    assert_eq!(slots[1].host_addr % HPAGE_SIZE, 0);
    let mem = ram.memory();
    assert_eq!(mem.num_regions(), 2);
    mem.write_obj(0x1234_5678u64, GuestAddress(HIGH_RAM_START + 8))
        .unwrap();
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(HIGH_RAM_START + 8))
            .unwrap(),
        0x1234_5678
    );
    assert!(mem.read_obj::<u64>(GuestAddress(MMIO_HOLE_START)).is_err());
    // The hole's frames are not RAM: never populated, refused by name.
    let states = ram.frame_states();
    assert_eq!(states.len(), HIGH_FRAME + 8);
    assert!(states[HIGH_FRAME - 1] == FrameView::Unpopulated);
    assert!(matches!(states[HIGH_FRAME], FrameView::Huge { .. }));
}

#[test]
fn give_back_and_free_page_reports_above_4g_free_their_frames() {
    let Some(mut ram) = ram() else {
        return;
    };
    let q = &NoVcpus;
    // A free page report of a whole frame above 4 GiB frees it whole.
    let r = ram.report_free(HIGH_RAM_START, HPAGE_SIZE, q).unwrap();
    assert_eq!((r.whole_frames_freed, r.frames_split), (1, 0));
    assert!(ram.released_frames().contains(&HIGH_FRAME));
    // An inflate of one page of the next frame (eager) splits exactly it.
    let gpa = HIGH_RAM_START + HPAGE_SIZE + 5 * PAGE_SIZE;
    let r = ram
        .give_back(gpa, PAGE_SIZE, SplitPolicy::Eager, q)
        .unwrap();
    assert_eq!((r.frames_split, r.pages_freed), (1, 1));
    assert_eq!(
        ram.frame_states()[HIGH_FRAME + 1],
        FrameView::Small { present: 511 }
    );
    let mut b = [0xffu8; 8];
    ram.read_no_populate(gpa, &mut b).unwrap();
    assert_eq!(b, [0; 8]);
    // Take it back: a zero page again, the frame still small.
    ram.refill(gpa, PAGE_SIZE, q).unwrap();
    assert_eq!(
        ram.frame_states()[HIGH_FRAME + 1],
        FrameView::Small { present: 512 }
    );
    // The hole and past the end are refused, nothing changes.
    for (gpa, len) in [
        (MMIO_HOLE_START, PAGE_SIZE),
        (MMIO_HOLE_START - PAGE_SIZE, 2 * PAGE_SIZE),
        (HIGH_RAM_START + 8 * HPAGE_SIZE, PAGE_SIZE),
    ] {
        let e = ram.report_free(gpa, len, q).unwrap_err();
        assert!(matches!(e, GuestMemError::RangeOutsideRam { .. }), "{e}");
        assert!(e.to_string().contains("0x100000000"), "{e}");
    }
    let e = ram.split(HIGH_FRAME - 1, q).unwrap_err();
    assert!(matches!(e, GuestMemError::FrameInHole { .. }), "{e}");
    assert!(matches!(
        ram.frame_states()[HIGH_FRAME + 7],
        FrameView::Huge { .. }
    ));
}
