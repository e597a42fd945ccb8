//! On the `thp` backing the kernel, not us, allocates pages. A frame that was
//! discarded whole and then refilled is small in our books; the host must
//! agree (it must not fault a huge page in behind the model's back).

mod common;

use guest_mem::pagemap::pmd_mapped_frames;
use guest_mem::quiesce::NoVcpus;
use guest_mem::{Backing, FrameView, GuestRam, GuestRamConfig, HPAGE_SIZE};

#[test]
fn thp_whole_frame_discard_then_refill_stays_small_on_the_host() {
    if !common::shmem_thp_available() {
        return;
    }
    let frames = 4usize;
    let mut ram = GuestRam::new(&GuestRamConfig::new(
        frames as u64 * HPAGE_SIZE,
        Backing::Thp,
    ))
    .expect("thp guest RAM");
    ram.populate_all().expect("populate");
    let Some(before) = pmd_mapped_frames(ram.host_addr(), frames).expect("pagemap") else {
        common::skip("PAGEMAP_SCAN is not available on this kernel");
        return;
    };
    if !before[1] {
        common::skip(&format!(
            "the kernel did not back frame 1 with a huge page ({before:?})"
        ));
        return;
    }
    ram.discard(HPAGE_SIZE, HPAGE_SIZE, &NoVcpus)
        .expect("discard frame 1");
    ram.refill(HPAGE_SIZE, HPAGE_SIZE, &NoVcpus)
        .expect("refill frame 1");
    assert!(
        matches!(ram.frame_states()[1], FrameView::Small { present: 512 }),
        "books: {:?}",
        ram.frame_states()[1]
    );
    let after = pmd_mapped_frames(ram.host_addr(), frames)
        .expect("pagemap")
        .expect("PAGEMAP_SCAN worked a moment ago");
    assert!(
        !after[1],
        "host maps refilled frame 1 with a 2M page, books say small"
    );
    // Collapse brings it back to huge, in the books and on the host.
    ram.collapse(1, &NoVcpus).expect("collapse frame 1");
    let collapsed = pmd_mapped_frames(ram.host_addr(), frames)
        .expect("pagemap")
        .expect("PAGEMAP_SCAN");
    assert!(
        collapsed[1],
        "collapse did not make frame 1 huge on the host"
    );
}
