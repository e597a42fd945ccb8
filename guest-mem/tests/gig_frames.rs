//! 1G frames on real memory (`hugetlb-1g`, no KVM): a GiB of guest RAM on one
//! 1G page; a give-back of one 4K page splits it 1G -> 2M and only that 2M
//! frame -> 4K; the collapse of that frame climbs back to one 1G page. Every
//! byte is checked against a shadow and the host's own accounting (smaps,
//! memfd blocks, pagemap) against the books after each step.

mod common;

use std::cell::Cell;

use common::Shadow;
use guest_mem::quiesce::{Quiesce, QuiesceError};
use guest_mem::{
    Backing, FrameView, GuestRam, GuestRamConfig, NoVcpus, FRAMES_PER_GIG, GIG_SIZE, PAGE_SIZE,
};

const PAGES: usize = FRAMES_PER_GIG * common::PPH;

/// The tests share the host's one 1G page: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn ram() -> Option<GuestRam> {
    // One 1G page, and 512 2M pages for its split.
    if !common::gig_pages_available(1) || !common::hugetlb_available(FRAMES_PER_GIG as u64) {
        return None;
    }
    let cfg = GuestRamConfig::new(GIG_SIZE, Backing::Hugetlb1g);
    let mut ram = GuestRam::new(&cfg).unwrap();
    ram.populate_all().unwrap();
    Some(ram)
}

/// Counts the vCPU pauses asked for (there are no vCPUs).
#[derive(Default)]
struct Pauses(Cell<u32>);

impl Quiesce for Pauses {
    fn pause(&self) -> Result<(), QuiesceError> {
        self.0.set(self.0.get() + 1);
        Ok(())
    }
    fn resume(&self) {}
}

fn count(ram: &GuestRam, pred: impl Fn(&FrameView) -> bool) -> usize {
    ram.frame_states().iter().filter(|s| pred(s)).count()
}

#[test]
fn a_4k_give_back_splits_1g_to_2m_and_one_frame_to_4k_and_collapse_climbs_back() {
    let _one = one_at_a_time();
    let Some(mut ram) = ram() else {
        return;
    };
    let gig = |s: &FrameView| matches!(s, FrameView::Gig { .. });
    let huge = |s: &FrameView| matches!(s, FrameView::Huge { .. });
    assert_eq!(count(&ram, gig), FRAMES_PER_GIG);
    assert_eq!(ram.pool_stats().gig_memfd_bytes, GIG_SIZE);
    common::verify_host(&ram, &[]);
    let mut shadow = Shadow::new(PAGES);
    shadow.made_present(0..PAGES as u64);
    shadow.write(&ram, 0..PAGES as u64, 1);

    // The guest gives back one page of frame 5.
    let page = 5 * common::PPH as u64 + 9;
    let pauses = Pauses::default();
    let rep = ram.discard(page * PAGE_SIZE, PAGE_SIZE, &pauses).unwrap();
    assert_eq!(
        pauses.0.get(),
        0,
        "no vCPU paused for the 1G or the 2M split"
    );
    assert_eq!(rep.frames_split, 1, "{rep:?}");
    // The 1G split ran with the guest running, writes to the GiB held (the
    // 2M split of frame 5 after it too): two write-hold windows.
    assert_eq!(ram.split_windows().take().len(), 2);
    shadow.discarded(page..page + 1);
    assert_eq!(count(&ram, gig), 0);
    assert_eq!(count(&ram, huge), FRAMES_PER_GIG - 1);
    assert_eq!(ram.frame_state(5), FrameView::Small { present: 511 });
    assert_eq!(ram.pool_stats().gig_memfd_bytes, 0, "the 1G page is freed");
    common::verify_host(&ram, &[]);
    shadow.verify_bytes(&ram);

    // Collapse of that frame: 4K -> 2M, and the GiB, all huge now, -> 1G.
    ram.collapse(5, &pauses).unwrap();
    // The 2M collapse pauses; the climb to 1G, every frame on a 2M page then,
    // copies with writes to the GiB held instead.
    assert_eq!(pauses.0.get(), 1);
    shadow.made_present(page..page + 1);
    assert_eq!(count(&ram, gig), FRAMES_PER_GIG);
    assert_eq!(ram.pool_stats().gig_memfd_bytes, GIG_SIZE);
    assert_eq!(
        ram.pool_stats().pool_memfd_bytes,
        0,
        "the 2M pages are freed"
    );
    common::verify_host(&ram, &[]);
    shadow.verify_bytes(&ram);
}

#[test]
fn with_no_block_of_2m_pages_the_1g_split_runs_paused_onto_small_pages_and_keeps_every_byte() {
    let _one = one_at_a_time();
    if !common::gig_pages_available(1) || !common::hugetlb_available(100) {
        return;
    }
    // 100 2M pages: no block of 512, so the split copies frame by frame under
    // the pause, 100 frames onto 2M pages and 412 onto small pages.
    let mut cfg = GuestRamConfig::new(GIG_SIZE, Backing::Hugetlb1g);
    cfg.hugetlb_pool_pages = Some(100);
    let mut ram = GuestRam::new(&cfg).unwrap();
    ram.populate_all().unwrap();
    let mut shadow = Shadow::new(PAGES);
    shadow.made_present(0..PAGES as u64);
    shadow.write(&ram, 0..PAGES as u64, 2);
    ram.split_gig(0, &NoVcpus).unwrap();
    assert!(ram.split_windows().take().is_empty(), "paused, not held");
    let states = ram.frame_states();
    assert_eq!(count(&ram, |s| matches!(s, FrameView::Huge { .. })), 100);
    assert_eq!(
        count(&ram, |s| *s == FrameView::Small { present: 512 }),
        FRAMES_PER_GIG - 100,
        "{:?}",
        &states[..4]
    );
    common::verify_host(&ram, &[]);
    shadow.verify_bytes(&ram);
    // And back: small frames among the sources, so under the pause.
    let pauses = Pauses::default();
    ram.collapse_gig(0, &pauses).unwrap();
    assert_eq!(pauses.0.get(), 1);
    assert_eq!(
        count(&ram, |s| matches!(s, FrameView::Gig { .. })),
        FRAMES_PER_GIG
    );
    common::verify_host(&ram, &[]);
    shadow.verify_bytes(&ram);
}
