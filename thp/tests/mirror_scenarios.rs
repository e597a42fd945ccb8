//! Named scenarios for the mirror of x86 KVM's secondary MMU.

mod common;
use common::{ok2, HVA};
use thp::kvm_mirror::{predict, FaultResult, LevelMap, Memslot, SecondaryMmu};
use thp::policy::ThpPolicy;
use thp::primary::{MmId, Primary};
use thp::units::{Level, PAGES_PER_HPAGE, PAGE_SIZE};

fn slot(base_gfn: u64, npages: u64, userspace_addr: u64) -> Memslot {
    Memslot {
        id: 0,
        base_gfn,
        npages,
        userspace_addr,
        dirty_logging: false,
    }
}

/// A primary with `frames` PMD-mapped frames at HVA and a VM whose slot 0 maps gfn 0.. to it.
fn setup(frames: usize) -> (Primary, MmId, SecondaryMmu) {
    let mut p = Primary::new(frames, None, ThpPolicy::always());
    let mm = p.new_mm(frames, HVA, true);
    for f in 0..frames as u64 {
        p.fault(mm, f * PAGES_PER_HPAGE, true).unwrap();
    }
    let mut s = SecondaryMmu::new();
    s.add_slot(slot(0, frames as u64 * PAGES_PER_HPAGE, HVA))
        .unwrap();
    (p, mm, s)
}

#[test]
fn pmd_mapped_backing_maps_2m_with_pfn_aligned_down() {
    let (p, mm, mut s) = setup(2);
    let host = p.mm(mm).unwrap();
    let r = s.fault(512 + 77, Level::M2, host).unwrap();
    let base = host.lookup(512).unwrap().1;
    assert_eq!(
        r,
        FaultResult::Installed {
            level: Level::M2,
            pfn: base
        }
    );
    assert_eq!(base % 512, 0);
    assert_eq!(s.lookup(512 + 100), Some((Level::M2, base + 100)));
    assert_eq!((s.pages_4k(), s.pages_2m()), (0, 1));
    assert_eq!(
        s.fault(512 + 3, Level::M2, host).unwrap(),
        FaultResult::AlreadyMapped { level: Level::M2 }
    );
    ok2(&p, mm, &s);
}

#[test]
fn misaligned_memslot_never_maps_2m() {
    let (p, mm, _) = setup(3);
    let mut s = SecondaryMmu::new();
    // gfn 0 at HVA + 4K: not congruent mod 2M.
    s.add_slot(slot(0, 1024, HVA + PAGE_SIZE)).unwrap();
    assert!(s.slots().next().unwrap().misaligned());
    let host = p.mm(mm).unwrap();
    for gfn in [0, 5, 511, 512, 600, 1023] {
        assert_eq!(
            s.max_mapping_level(gfn, host, Level::M2).unwrap(),
            Level::K4
        );
        assert!(matches!(
            s.fault(gfn, Level::M2, host).unwrap(),
            FaultResult::Installed {
                level: Level::K4,
                ..
            }
        ));
    }
    assert_eq!((s.pages_4k(), s.pages_2m()), (6, 0));
    ok2(&p, mm, &s);
}

#[test]
fn guest_4k_page_caps_level_on_shadow_paging() {
    let (p, mm, mut s) = setup(1);
    let host = p.mm(mm).unwrap();
    assert_eq!(s.max_mapping_level(3, host, Level::K4).unwrap(), Level::K4);
    assert!(matches!(
        s.fault(3, Level::K4, host).unwrap(),
        FaultResult::Installed {
            level: Level::K4,
            ..
        }
    ));
    assert_eq!((s.pages_4k(), s.pages_2m()), (1, 0));
    ok2(&p, mm, &s);
}

#[test]
fn partial_first_and_last_frame_of_slot_disallowed() {
    let (p, mm, _) = setup(4);
    let host = p.mm(mm).unwrap();
    let mut s = SecondaryMmu::new();
    // Slot covers gfn 256..1792 (congruent with hva): frames 0 and 3 partial.
    s.add_slot(slot(256, 1536, HVA + 256 * PAGE_SIZE)).unwrap();
    assert!(!s.slots().next().unwrap().misaligned());
    assert_eq!(
        s.max_mapping_level(300, host, Level::M2).unwrap(),
        Level::K4
    );
    assert_eq!(
        s.max_mapping_level(600, host, Level::M2).unwrap(),
        Level::M2
    );
    assert_eq!(
        s.max_mapping_level(1100, host, Level::M2).unwrap(),
        Level::M2
    );
    assert_eq!(
        s.max_mapping_level(1600, host, Level::M2).unwrap(),
        Level::K4
    );
    assert!(
        s.max_mapping_level(100, host, Level::M2).is_err(),
        "gfn outside the slot"
    );
    for g in [300, 600, 1100, 1600] {
        s.fault(g, Level::M2, host).unwrap();
    }
    assert_eq!((s.pages_4k(), s.pages_2m()), (2, 2));
    ok2(&p, mm, &s);
}

#[test]
fn host_4k_mapping_gives_4k_after_split_pmd() {
    let (mut p, mm, mut s) = setup(1);
    p.unmap(mm, 5, 1).unwrap();
    let host = p.mm(mm).unwrap();
    assert_eq!(s.max_mapping_level(0, host, Level::M2).unwrap(), Level::K4);
    assert_eq!(
        s.fault(5, Level::M2, host).unwrap(),
        FaultResult::NoHostPage
    );
    s.fault(6, Level::M2, host).unwrap();
    assert_eq!((s.pages_4k(), s.pages_2m()), (1, 0));
    ok2(&p, mm, &s);
}

#[test]
fn invalidation_of_4k_zaps_whole_2m_entry() {
    let (p, mm, mut s) = setup(2);
    let host = p.mm(mm).unwrap();
    s.fault(0, Level::M2, host).unwrap();
    s.fault(512, Level::M2, host).unwrap();
    let hva = HVA + 300 * PAGE_SIZE;
    assert_eq!(s.invalidate_range_start(hva, hva + PAGE_SIZE), 1);
    assert_eq!(s.lookup(0), None, "the whole 2M leaf is gone");
    assert_eq!(s.lookup(511), None);
    assert!(s.lookup(512).is_some(), "neighbour frame untouched");
    s.invalidate_range_end(hva, hva + PAGE_SIZE).unwrap();
    assert_eq!(s.mmu_invalidate_seq(), 1);
    assert!(s.invalidate_range_end(hva, hva + PAGE_SIZE).is_err());
    assert_eq!((s.pages_4k(), s.pages_2m()), (0, 1));
    ok2(&p, mm, &s);
}

#[test]
fn invalidation_racing_fault_forces_retry_and_never_installs_stale_pfn() {
    let mut p = Primary::new(2, None, ThpPolicy::always());
    let mm = p.new_mm(1, HVA, true);
    p.fault(mm, 0, true).unwrap();
    let mut s = SecondaryMmu::new();
    s.add_slot(slot(0, 512, HVA)).unwrap();
    // Fault reads the sequence and translates (GUP holds a reference).
    let mut f = s.fault_begin(7, Level::M2).unwrap();
    s.fault_translate(&mut f, p.mm(mm).unwrap());
    let stale = f.pfn.unwrap();
    let old = p.mm(mm).unwrap().lookup(7).unwrap().2;
    p.get_folio(old).unwrap();
    // The host unmaps the frame under an invalidation and maps a new page.
    let (a, b) = (HVA, HVA + 512 * PAGE_SIZE);
    s.invalidate_range_start(a, b);
    assert!(
        s.fault_must_retry(&f),
        "retry while the invalidation is in progress"
    );
    p.unmap(mm, 0, 512).unwrap();
    p.fault(mm, 7, true).unwrap();
    s.invalidate_range_end(a, b).unwrap();
    assert!(s.fault_must_retry(&f), "retry: the sequence moved");
    let fresh = p.mm(mm).unwrap().lookup(7).unwrap().1;
    assert_ne!(fresh, stale);
    // The fault gives up: kvm_release_pfn drops the reference, freeing the old page.
    p.put_folio(old).unwrap();
    assert_eq!(p.huge_pool().used_count(), 1);
    // Re-running the whole fault installs the fresh pfn.
    let r = s.fault(7, Level::M2, p.mm(mm).unwrap()).unwrap();
    assert_eq!(
        r,
        FaultResult::Installed {
            level: Level::M2,
            pfn: fresh - 7
        }
    );
    ok2(&p, mm, &s);
}

#[test]
fn retry_only_when_invalidation_overlaps_the_hva() {
    let (p, mm, mut s) = setup(2);
    let f = s.fault_begin(7, Level::M2).unwrap();
    let other = HVA + 600 * PAGE_SIZE;
    s.invalidate_range_start(other, other + PAGE_SIZE);
    assert!(!s.fault_must_retry(&f), "in progress elsewhere: no retry");
    let mine = HVA + 7 * PAGE_SIZE;
    s.invalidate_range_start(mine, mine + PAGE_SIZE);
    assert!(s.fault_must_retry(&f));
    s.invalidate_range_end(mine, mine + PAGE_SIZE).unwrap();
    s.invalidate_range_end(other, other + PAGE_SIZE).unwrap();
    assert_eq!(s.invalidate_in_progress(), 0);
    assert!(s.fault_must_retry(&f), "sequence moved by 2");
    assert_eq!(s.mmu_invalidate_seq(), 2);
    ok2(&p, mm, &s);
}

#[test]
fn fault_replaces_4k_leaves_by_2m_leaf_after_collapse() {
    let mut p = Primary::new(1, None, ThpPolicy::always());
    let mm = p.new_mm(1, HVA, true);
    for i in 0..512 {
        p.fault_nohuge(mm, i, true).unwrap();
    }
    let mut s = SecondaryMmu::new();
    s.add_slot(slot(0, 512, HVA)).unwrap();
    for g in [1, 2, 3] {
        s.fault(g, Level::M2, p.mm(mm).unwrap()).unwrap();
    }
    assert_eq!((s.pages_4k(), s.pages_2m()), (3, 0));
    s.invalidate_range_start(HVA, HVA + 512 * PAGE_SIZE);
    p.collapse(mm, 0).unwrap();
    s.invalidate_range_end(HVA, HVA + 512 * PAGE_SIZE).unwrap();
    s.fault(9, Level::M2, p.mm(mm).unwrap()).unwrap();
    assert_eq!((s.pages_4k(), s.pages_2m()), (0, 1));
    ok2(&p, mm, &s);
}

#[test]
fn predict_counts_like_kvm_stats() {
    // 5 frames: 0 huge, 1 small, 2 huge, 3 huge but guest-mapped 4K, 4 unmapped.
    let host = LevelMap::new(
        HVA,
        vec![
            Some(Level::M2),
            Some(Level::K4),
            Some(Level::M2),
            Some(Level::M2),
            None,
        ],
    );
    let slots = [slot(0, 2560, HVA)];
    let touched = [0, 1, 2, 512, 513, 514, 1024, 1600, 1601, 1601, 2100];
    let gml = |g: u64| {
        if (1536..2048).contains(&g) {
            Level::K4
        } else {
            Level::M2
        }
    };
    let (p4, p2) = predict(&slots, &host, gml, touched).unwrap();
    assert_eq!(
        (p4, p2),
        (5, 2),
        "512..514, 1600, 1601 at 4K; frames 0 and 2 at 2M"
    );
    assert!(
        predict(&slots, &host, gml, [5000]).is_err(),
        "gfn outside every slot"
    );
}

#[test]
fn overlapping_or_bad_memslots_are_rejected() {
    let mut s = SecondaryMmu::new();
    s.add_slot(slot(0, 512, HVA)).unwrap();
    assert!(s
        .add_slot(Memslot {
            id: 1,
            ..slot(100, 10, HVA)
        })
        .is_err());
    assert!(s
        .add_slot(Memslot {
            id: 0,
            ..slot(1000, 10, HVA)
        })
        .is_err());
    assert!(s
        .add_slot(Memslot {
            id: 2,
            ..slot(1000, 0, HVA)
        })
        .is_err());
    assert!(s
        .add_slot(Memslot {
            id: 3,
            ..slot(1000, 1, HVA + 1)
        })
        .is_err());
    s.add_slot(Memslot {
        id: 4,
        ..slot(512, 512, HVA + (2 << 20))
    })
    .unwrap();
    assert_eq!(s.slot_for_gfn(700).unwrap().id, 4);
    s.remove_slot(0).unwrap();
    assert!(s.slot_for_gfn(5).is_none());
}
