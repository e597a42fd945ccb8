//! One test per kernel rule of issue 12 ("Exact mirror"), each against the
//! behaviour of Linux 6.18 (the function named in each test's comment).
//! Hosts are [`LevelMap`]s (synthetic pfns = hva / 4K) unless a test needs
//! the primary model.

use thp::invariants::check_secondary;
use thp::kvm_mirror::{
    predict_with, Access, FaultResult, HostMap, LevelMap, Memslot, MirrorError, MmuKind, MmuParams,
    SecondaryMmu, Touch,
};
use thp::units::{Level, PAGES_PER_GPAGE, PAGES_PER_HPAGE, PAGE_SIZE};

const HVA: u64 = 0x7f00_0000_0000;

fn slot(npages: u64) -> Memslot {
    Memslot {
        id: 0,
        base_gfn: 0,
        npages,
        userspace_addr: HVA,
        dirty_logging: false,
    }
}

/// `frames` frames, all PMD-mapped on the host.
fn huge_host(frames: usize) -> LevelMap {
    LevelMap::new(HVA, vec![Some(Level::M2); frames])
}

fn mmu(params: MmuParams, frames: usize) -> SecondaryMmu {
    let mut s = SecondaryMmu::with_params(params);
    s.add_slot(slot(frames as u64 * PAGES_PER_HPAGE)).unwrap();
    s
}

fn counts(s: &SecondaryMmu) -> (u64, u64) {
    (s.pages_4k(), s.pages_2m())
}

fn ok(s: &SecondaryMmu, host: &dyn HostMap) {
    if let Err(e) = check_secondary(s, host) {
        panic!("{e}");
    }
}

const WRITE: Access = Access::WRITE;
const EXEC: Access = Access::EXEC;

// ---- row 1: shadow MMU write tracking (account_shadowed) ----

/// `account_shadowed` → `kvm_mmu_gfn_disallow_lpage` + `kvm_mmu_slot_gfn_write_protect`:
/// the existing 2M leaf over a newly shadowed guest page table is
/// write-protected and kept, not zapped; the next write fault in the frame
/// maps 4K (`drop_large_spte`).
#[test]
fn account_shadowed_write_protects_the_2m_leaf_instead_of_zapping_it() {
    let host = huge_host(2);
    let mut s = mmu(MmuParams::shadow(), 2);
    s.fault(600, Level::M2, &host).unwrap();
    assert_eq!(counts(&s), (0, 1));
    s.account_shadowed(513).unwrap();
    assert_eq!(counts(&s), (0, 1), "the 2M leaf stays");
    assert_eq!(
        s.lookup_access(600).map(|(l, _, w)| (l, w)),
        Some((Level::M2, false))
    );
    assert_eq!(
        s.max_mapping_level(600, &host, Level::M2).unwrap(),
        Level::K4
    );
    assert_eq!(
        s.max_mapping_level(10, &host, Level::M2).unwrap(),
        Level::M2
    );
    ok(&s, &host);
    // The write fault: 4K leaf plus direct prefetch of its group of 8.
    s.fault_access(600, Level::M2, WRITE, &host).unwrap();
    assert_eq!(counts(&s), (8, 0));
    assert!(s.lookup_access(513).is_none());
    ok(&s, &host);
    s.unaccount_shadowed(513).unwrap();
    assert!(s.unaccount_shadowed(513).is_err());
    assert_eq!(
        s.max_mapping_level(600, &host, Level::M2).unwrap(),
        Level::M2
    );
}

/// The TDP MMU shadows no guest page tables.
#[test]
fn tdp_mmu_has_no_shadowed_page_tables() {
    let mut s = mmu(MmuParams::tdp(), 1);
    assert_eq!(s.account_shadowed(3), Err(MirrorError::NotShadowMmu));
}

/// The 127 vs 128 of `vmm run --test-guest hello --backing hugetlb --memory 256M`
/// on the shadow MMU: frame 0 holds the guest's page tables, so it never
/// maps 2M; the touched code and stack pages map 4K with their prefetch
/// groups of 8 (16 leaves). The TDP MMU maps all 128 frames 2M.
#[test]
fn page_table_frame_maps_4k_on_shadow_and_2m_on_tdp() {
    let frames = 128;
    let host = huge_host(frames);
    let tables: Vec<u64> = (0x100..0x106).chain(0x9..0xf).collect();
    let mut touches: Vec<Touch> = vec![
        Touch {
            gfn: 0x14,
            guest_max_level: Level::M2,
            access: EXEC,
        },
        Touch {
            gfn: 0x41,
            guest_max_level: Level::M2,
            access: WRITE,
        },
    ];
    touches.extend((512..frames as u64 * 512).map(|gfn| Touch {
        gfn,
        guest_max_level: Level::M2,
        access: WRITE,
    }));
    let sh = predict_with(
        MmuParams::shadow(),
        &[slot(frames as u64 * 512)],
        &host,
        &tables,
        touches.clone(),
    )
    .unwrap();
    assert_eq!(counts(&sh), (16, 127));
    let tdp = predict_with(
        MmuParams::tdp(),
        &[slot(frames as u64 * 512)],
        &host,
        &tables,
        touches,
    )
    .unwrap();
    assert_eq!(counts(&tdp), (0, 128));
}

// ---- row 2: dirty logging (kvm_mmu_slot_apply_flags) ----

/// TDP MMU, `eager_page_split=Y`: dirty logging on splits every 2M leaf into
/// 512 read-only 4K leaves at once (`kvm_mmu_slot_try_split_huge_pages`);
/// off recovers the 2M leaf in place (`kvm_tdp_mmu_recover_huge_pages`,
/// 6.13+), with no fault.
#[test]
fn tdp_dirty_logging_eager_splits_and_recovers_in_place() {
    let host = huge_host(2);
    let mut s = mmu(MmuParams::tdp(), 2);
    s.fault(5, Level::G1, &host).unwrap();
    assert_eq!(counts(&s), (0, 1));
    s.set_dirty_logging(0, true, &host).unwrap();
    assert_eq!(counts(&s), (512, 0));
    assert!(s.entries_access().all(|(.., w)| !w));
    ok(&s, &host);
    s.set_dirty_logging(0, false, &host).unwrap();
    assert_eq!(counts(&s), (0, 1), "recovered without a fault");
    ok(&s, &host);
}

/// TDP MMU, `eager_page_split=N`: the 2M leaf stays, read-only; the first
/// write fault wants 4K (dirty logging) and splits it into 512 leaves
/// (`kvm_tdp_mmu_map` → `tdp_mmu_split_huge_page`).
#[test]
fn tdp_dirty_logging_without_eager_split_splits_on_the_first_write() {
    let host = huge_host(1);
    let mut s = mmu(
        MmuParams {
            eager_page_split: false,
            ..MmuParams::tdp()
        },
        1,
    );
    s.fault(5, Level::G1, &host).unwrap();
    s.set_dirty_logging(0, true, &host).unwrap();
    assert_eq!(counts(&s), (0, 1));
    ok(&s, &host);
    s.fault_access(7, Level::G1, WRITE, &host).unwrap();
    assert_eq!(counts(&s), (512, 0));
    ok(&s, &host);
}

/// Shadow MMU: no eager split (`if (!tdp_mmu_enabled) return;`); the 2M leaf
/// is write-protected and kept; a write fault maps one 4K leaf (no prefetch
/// while logging); off zaps the collapsible 4K leaves
/// (`kvm_rmap_zap_collapsible_sptes`) and the next fault maps 2M.
#[test]
fn shadow_dirty_logging_write_protects_then_zaps_collapsible_leaves() {
    let host = huge_host(1);
    let mut s = mmu(MmuParams::shadow(), 1);
    s.fault(5, Level::M2, &host).unwrap();
    s.set_dirty_logging(0, true, &host).unwrap();
    assert_eq!(counts(&s), (0, 1));
    s.fault_access(7, Level::M2, WRITE, &host).unwrap();
    assert_eq!(counts(&s), (1, 0));
    ok(&s, &host);
    s.set_dirty_logging(0, false, &host).unwrap();
    assert_eq!(counts(&s), (0, 0));
    s.fault(7, Level::M2, &host).unwrap();
    assert_eq!(counts(&s), (0, 1));
}

/// `KVM_DIRTY_LOG_INITIALLY_SET`: turning logging on neither splits nor
/// write-protects (the early return in `kvm_mmu_slot_apply_flags`).
#[test]
fn dirty_log_initially_set_changes_nothing_at_enable() {
    let host = huge_host(1);
    let mut s = mmu(
        MmuParams {
            dirty_log_initially_set: true,
            ..MmuParams::tdp()
        },
        1,
    );
    s.fault(5, Level::G1, &host).unwrap();
    s.set_dirty_logging(0, true, &host).unwrap();
    assert_eq!(
        s.lookup_access(5).map(|(l, _, w)| (l, w)),
        Some((Level::M2, true))
    );
}

// ---- row 3: NX huge pages ----

/// `kvm_mmu_hugepage_adjust` (`huge_page_disallowed` for an exec fault with
/// `nx_huge_pages`) and `disallowed_hugepage_adjust`: the exec fault maps 4K
/// and its table stays 4K for later non-exec faults in the frame; without
/// the parameter the frame maps 2M.
#[test]
fn nx_huge_pages_exec_fault_forces_4k_in_its_frame() {
    let host = huge_host(2);
    for kind in [MmuKind::Tdp, MmuKind::Shadow] {
        let p = MmuParams {
            kind,
            nx_huge_pages: true,
            ..MmuParams::tdp()
        };
        let mut s = mmu(p, 2);
        s.fault_access(3, Level::M2, EXEC, &host).unwrap();
        s.fault_access(100, Level::M2, WRITE, &host).unwrap();
        s.fault_access(600, Level::M2, WRITE, &host).unwrap();
        assert_eq!(s.lookup(100).map(|l| l.0), Some(Level::K4), "{kind:?}");
        assert_eq!(s.lookup(600).map(|l| l.0), Some(Level::M2), "{kind:?}");
        assert_eq!(s.nx_lpage_splits(), 1);
        ok(&s, &host);
        // An exec fault under the 2M leaf of frame 1: the TDP MMU splits it.
        s.fault_access(700, Level::M2, EXEC, &host).unwrap();
        let expect = match kind {
            MmuKind::Tdp => 512,
            MmuKind::Shadow => 8,
        };
        assert_eq!(
            (0..512).filter(|g| s.lookup(512 + g).is_some()).count(),
            expect,
            "{kind:?}"
        );
        ok(&s, &host);
    }
    let mut s = mmu(MmuParams::tdp(), 1);
    s.fault_access(3, Level::M2, EXEC, &host).unwrap();
    assert_eq!(counts(&s), (0, 1), "nx_huge_pages off");
}

// ---- row 4: mmu_invalidate_begin only for ranges that hit a memslot ----

/// `kvm_mmu_notifier_invalidate_range_start` → `kvm_handle_hva_range` calls
/// `kvm_mmu_invalidate_begin` only when a memslot intersects the range:
/// an invalidation elsewhere makes no fault retry.
#[test]
fn invalidation_outside_every_memslot_makes_no_fault_retry() {
    let host = huge_host(1);
    let mut s = mmu(MmuParams::tdp(), 1);
    let mut f = s.fault_begin(7, Level::M2).unwrap();
    s.fault_translate(&mut f, &host);
    let far = HVA + (64 << 30);
    s.invalidate_range_start(far, far + (2 << 20));
    assert_eq!(s.invalidate_in_progress(), 0);
    assert!(!s.fault_must_retry(&f));
    s.invalidate_range_end(far, far + (2 << 20)).unwrap();
    assert!(!s.fault_must_retry(&f), "no seq bump either");
    let (a, b) = (HVA + 7 * PAGE_SIZE, HVA + 8 * PAGE_SIZE);
    s.invalidate_range_start(a, b);
    assert!(s.fault_must_retry(&f));
    s.invalidate_range_end(a, b).unwrap();
    assert!(s.fault_must_retry(&f));
    assert!(matches!(
        s.invalidate_range_end(a, b),
        Err(MirrorError::UnbalancedInvalidate)
    ));
}

/// Memslot updates wait for invalidations in progress (`mn_active_invalidate_count`).
#[test]
fn memslot_update_waits_for_invalidations() {
    let host = huge_host(1);
    let mut s = mmu(MmuParams::tdp(), 1);
    s.invalidate_range_start(HVA, HVA + PAGE_SIZE);
    assert_eq!(
        s.set_dirty_logging(0, true, &host),
        Err(MirrorError::InvalidationActive)
    );
    assert_eq!(
        s.remove_slot(0).map(|_| ()),
        Err(MirrorError::InvalidationActive)
    );
    s.invalidate_range_end(HVA, HVA + PAGE_SIZE).unwrap();
    assert!(s.remove_slot(0).is_ok());
}

// ---- row 5: TDP MMU 4K fault under a 2M leaf ----

/// `kvm_tdp_mmu_map`: a 4K fault under an existing 2M leaf splits it into
/// 512 leaves (`tdp_mmu_split_huge_page`); the shadow MMU drops it
/// (`drop_large_spte`) and maps one.
#[test]
fn four_k_fault_under_a_2m_leaf_splits_on_tdp_and_drops_on_shadow() {
    let host = huge_host(1);
    let mut t = mmu(MmuParams::tdp(), 1);
    t.fault(5, Level::M2, &host).unwrap();
    assert!(matches!(
        t.fault(9, Level::K4, &host).unwrap(),
        FaultResult::AlreadyMapped { level: Level::K4 }
            | FaultResult::Installed {
                level: Level::K4,
                ..
            }
    ));
    assert_eq!(counts(&t), (512, 0));
    ok(&t, &host);
    let mut s = mmu(MmuParams::shadow(), 1);
    s.fault(5, Level::M2, &host).unwrap();
    s.fault(9, Level::K4, &host).unwrap();
    assert_eq!(counts(&s), (1, 0), "indirect shadow page: no prefetch");
    ok(&s, &host);
}

// ---- row 6: stats count SPTEs, shadow prefetch ----

/// `direct_pte_prefetch`: a 4K fault in a direct shadow page maps the
/// non-present rest of its aligned group of `PTE_PREFETCH_NUM` = 8 (up to
/// the first page the host cannot give); the TDP MMU maps one.
#[test]
fn shadow_direct_fault_prefetches_its_group_of_8() {
    // Frame 0 is 4K on the host.
    let host = LevelMap::new(HVA, vec![Some(Level::K4), Some(Level::M2)]);
    let mut s = mmu(MmuParams::shadow(), 2);
    s.fault(11, Level::M2, &host).unwrap();
    assert_eq!(counts(&s), (8, 0));
    assert!((8..16).all(|g| s.lookup(g).is_some()));
    s.fault(13, Level::M2, &host).unwrap();
    assert_eq!(counts(&s), (8, 0));
    ok(&s, &host);
    let mut t = mmu(MmuParams::tdp(), 2);
    t.fault(11, Level::M2, &host).unwrap();
    assert_eq!(counts(&t), (1, 0));
    // Host pages missing stop the run: frame 0 unmapped beyond gfn 12.
    struct Holes(LevelMap);
    impl HostMap for Holes {
        fn host_level(&self, hva: u64) -> Level {
            self.0.host_level(hva)
        }
        fn pfn(&self, hva: u64) -> Option<u64> {
            ((hva - HVA) / PAGE_SIZE <= 12)
                .then(|| self.0.pfn(hva))
                .flatten()
        }
    }
    let h = Holes(host);
    let mut s = mmu(MmuParams::shadow(), 2);
    s.fault(9, Level::M2, &h).unwrap();
    assert_eq!(counts(&s), (5, 0), "gfns 8..=12");
}

// ---- 1G-ready: lpage_info and the host level per level ----

struct GigHost;
impl HostMap for GigHost {
    fn host_level(&self, _: u64) -> Level {
        Level::G1
    }
    fn pfn(&self, hva: u64) -> Option<u64> {
        Some(hva / PAGE_SIZE)
    }
}

/// `kvm_alloc_memslot_metadata` per level and `kvm_mmu_max_mapping_level`
/// walking down from `max_huge_page_level`: a slot covering 1G and a bit
/// maps its whole 1G page with one leaf and the partial rest at 2M; with
/// `max_huge_page_level` 2M everything maps 2M.
#[test]
fn one_g_leaf_where_lpage_info_and_the_host_allow_it() {
    let base = 0x7f00_0000_0000u64; // 1G aligned
    let s0 = Memslot {
        id: 0,
        base_gfn: 0,
        npages: PAGES_PER_GPAGE + 2 * PAGES_PER_HPAGE,
        userspace_addr: base,
        dirty_logging: false,
    };
    let mut s = SecondaryMmu::with_params(MmuParams::tdp());
    s.add_slot(s0).unwrap();
    assert!(s.lpage_allowed_at(5, Level::G1));
    assert!(
        !s.lpage_allowed_at(PAGES_PER_GPAGE + 5, Level::G1),
        "partial last 1G page"
    );
    assert!(s.lpage_allowed_at(PAGES_PER_GPAGE + 5, Level::M2));
    assert_eq!(s.kvm_mmu_max_mapping_level(5, &GigHost), Level::G1);
    s.fault(5, Level::G1, &GigHost).unwrap();
    s.fault(PAGES_PER_GPAGE + 5, Level::G1, &GigHost).unwrap();
    assert_eq!((s.pages_4k(), s.pages_2m(), s.pages_1g()), (0, 1, 1));
    ok(&s, &GigHost);
    // A shadowed gfn disallows both levels.
    let mut sh = SecondaryMmu::with_params(MmuParams::shadow());
    sh.add_slot(s0).unwrap();
    sh.account_shadowed(600).unwrap();
    assert!(!sh.lpage_allowed_at(5, Level::G1));
    assert!(sh.lpage_allowed_at(5, Level::M2));
    assert_eq!(sh.kvm_mmu_max_mapping_level(5, &GigHost), Level::M2);
    let mut m2 = SecondaryMmu::with_params(MmuParams {
        max_huge_page_level: Level::M2,
        ..MmuParams::tdp()
    });
    m2.add_slot(s0).unwrap();
    m2.fault(5, Level::G1, &GigHost).unwrap();
    assert_eq!((m2.pages_2m(), m2.pages_1g()), (1, 0));
    // Misaligned by 2M: 1G disallowed, 2M allowed.
    let mut mis = SecondaryMmu::with_params(MmuParams::tdp());
    mis.add_slot(Memslot {
        userspace_addr: base + (2 << 20),
        ..s0
    })
    .unwrap();
    assert!(!mis.lpage_allowed_at(5, Level::G1));
    assert!(mis.lpage_allowed_at(5, Level::M2));
}
