//! The hugetlb pool on the host: pages go back to the host on split and come
//! back on collapse (HugePages_Free from /proc/meminfo and the memfd's own
//! block count), and a pool smaller than RAM falls back to small pages.
//! One test per concern, kept in this binary so no other test of this crate
//! moves HugePages_Free meanwhile.

mod common;

use common::{verify_host, Shadow, PPH};
use guest_mem::smaps::read_meminfo;
use guest_mem::{Backing, FrameView, GuestMemError, GuestRam, GuestRamConfig, NoVcpus, HPAGE_SIZE};

const FRAMES: usize = 8;
const K: usize = 3;

#[test]
fn split_returns_pages_to_the_host_and_collapse_takes_them_back() {
    if !common::hugetlb_available(FRAMES as u64) {
        return;
    }
    let mut ram = GuestRam::new(&GuestRamConfig::new(
        FRAMES as u64 * HPAGE_SIZE,
        Backing::Hugetlb,
    ))
    .unwrap();
    ram.populate_all().unwrap();
    let pages = (FRAMES * PPH) as u64;
    let mut sh = Shadow::new(pages as usize);
    sh.made_present(0..pages);
    sh.write(&ram, 0..pages, 7);
    assert_eq!(
        ram.pool_stats().pool_memfd_bytes,
        FRAMES as u64 * HPAGE_SIZE
    );

    // Other processes share the host pool: retry the whole measurement a few
    // times until one window saw no foreign allocation.
    let mut matched = false;
    for attempt in 0..5 {
        let before = read_meminfo().unwrap().free;
        for f in 0..K {
            ram.split(f, &NoVcpus).unwrap();
        }
        let after_split = read_meminfo().unwrap().free;
        assert_eq!(
            ram.pool_stats().pool_memfd_bytes,
            (FRAMES - K) as u64 * HPAGE_SIZE,
            "the pool memfd still holds the split frames' huge pages"
        );
        verify_host(&ram, &[]);
        sh.verify_bytes(&ram);
        for f in 0..K {
            ram.collapse(f, &NoVcpus).unwrap();
        }
        let after_collapse = read_meminfo().unwrap().free;
        assert_eq!(
            ram.pool_stats().pool_memfd_bytes,
            FRAMES as u64 * HPAGE_SIZE
        );
        verify_host(&ram, &[]);
        sh.verify_bytes(&ram);
        eprintln!(
            "attempt {attempt}: HugePages_Free {before} -> {after_split} -> {after_collapse}"
        );
        if after_split == before + K as u64 && after_collapse == before {
            matched = true;
            break;
        }
    }
    assert!(
        matched,
        "HugePages_Free never moved by exactly {K} on split and back on collapse"
    );
}

#[test]
fn small_pool_falls_back_to_small_pages_and_collapse_restores_them() {
    if !common::hugetlb_available(4) {
        return;
    }
    let cfg = GuestRamConfig {
        hugetlb_pool_pages: Some(4),
        ..GuestRamConfig::new(FRAMES as u64 * HPAGE_SIZE, Backing::Hugetlb)
    };
    let mut ram = GuestRam::new(&cfg).unwrap();
    ram.populate_all().unwrap();
    let st = ram.frame_states();
    let huge: Vec<usize> = (0..FRAMES)
        .filter(|f| matches!(st[*f], FrameView::Huge { .. }))
        .collect();
    let small: Vec<usize> = (0..FRAMES)
        .filter(|f| st[*f] == FrameView::Small { present: 512 })
        .collect();
    assert_eq!((huge.len(), small.len()), (4, 4), "{st:?}");
    let ps = ram.pool_stats();
    assert_eq!((ps.requested, ps.capacity, ps.used, ps.free), (4, 4, 4, 0));
    let pages = (FRAMES * PPH) as u64;
    let mut sh = Shadow::new(pages as usize);
    sh.made_present(0..pages);
    sh.write(&ram, 0..pages, 3);
    verify_host(&ram, &[]);

    // Pool empty: collapsing a small frame is refused and changes nothing.
    let e = ram.collapse(small[0], &NoVcpus).unwrap_err();
    assert!(
        matches!(
            e,
            GuestMemError::Model(thp::ModelError::HugePoolEmpty { .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("huge pool empty"), "{e}");
    assert_eq!(ram.frame_states(), st);

    // Give two huge frames back (whole), then the small frames can collapse.
    for f in &huge[..2] {
        let rep = ram
            .discard(*f as u64 * HPAGE_SIZE, HPAGE_SIZE, &NoVcpus)
            .unwrap();
        assert_eq!(rep.huge_frames_freed, 1);
        let b = (*f * PPH) as u64;
        sh.discarded(b..b + PPH as u64);
    }
    assert_eq!(ram.pool_stats().free, 2);
    verify_host(&ram, &[]);
    for f in &small[..2] {
        ram.collapse(*f, &NoVcpus).unwrap();
        assert!(matches!(ram.frame_states()[*f], FrameView::Huge { .. }));
    }
    assert_eq!(ram.pool_stats().free, 0);
    verify_host(&ram, &[]);
    sh.verify_books(&ram);
    sh.verify_bytes(&ram);
}
