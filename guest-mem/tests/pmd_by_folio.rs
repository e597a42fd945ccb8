//! The host-truth fallback for kernels without `PAGEMAP_SCAN` (page flags
//! of `/proc/kpageflags` checked against smaps) must give the same per-frame
//! answer as `PAGEMAP_SCAN` where both exist. Host kinds: any with hugetlb
//! pages reserved, shmem THP on `advise` and `PAGEMAP_SCAN` (Linux 6.7+);
//! root (`CAP_SYS_ADMIN`) for page frame numbers.

mod common;

use guest_mem::pagemap::{pmd_mapped_by_folio, pmd_mapped_frames};
use guest_mem::quiesce::NoVcpus;
use guest_mem::{Backing, GuestRam, GuestRamConfig, HPAGE_SIZE};

fn agree_on(backing: Backing) {
    let frames = 6usize;
    let mut ram = GuestRam::new(&GuestRamConfig::new(frames as u64 * HPAGE_SIZE, backing))
        .expect("guest RAM");
    ram.populate_all().expect("populate");
    // Frame 1 small, frame 2 not present, frame 3 small with a hole.
    ram.split(1, &NoVcpus).expect("split frame 1");
    ram.discard(2 * HPAGE_SIZE, HPAGE_SIZE, &NoVcpus)
        .expect("discard frame 2");
    ram.split(3, &NoVcpus).expect("split frame 3");
    ram.discard(3 * HPAGE_SIZE + 4096, 4096, &NoVcpus)
        .expect("discard a page of frame 3");
    let Some(scan) = pmd_mapped_frames(ram.host_addr(), frames).expect("pagemap") else {
        common::skip("PAGEMAP_SCAN is not available on this kernel");
        return;
    };
    let Some(folio) = pmd_mapped_by_folio(ram.host_addr(), frames).expect("kpageflags") else {
        common::skip("/proc/kpageflags or page frame numbers unreadable (needs CAP_SYS_ADMIN)");
        return;
    };
    assert_eq!(folio, scan, "kpageflags+smaps vs PAGEMAP_SCAN");
    assert!(!scan[1] && !scan[2] && !scan[3], "{scan:?}");
    if backing == Backing::Hugetlb {
        assert!(scan[0] && scan[4] && scan[5], "{scan:?}");
    }
}

#[test]
fn folio_fallback_agrees_with_pagemap_scan_on_hugetlb() {
    if common::hugetlb_available(6) {
        agree_on(Backing::Hugetlb);
    }
}

#[test]
fn folio_fallback_agrees_with_pagemap_scan_on_thp() {
    if common::shmem_thp_available() {
        agree_on(Backing::Thp);
    }
}
