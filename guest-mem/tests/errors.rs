//! Bad input and missing host prerequisites: every error is produced and its
//! message checked for what to do.

mod common;

use guest_mem::{
    Backing, FrameView, GuestMemError, GuestRam, GuestRamConfig, HostPaths, NoVcpus, HPAGE_SIZE,
};

fn fake_sys(tag: &str, shmem: &str, free_2m: u64, total_2m: u64) -> HostPaths {
    let root = std::env::temp_dir().join(format!("guest-mem-errors-{}-{tag}", std::process::id()));
    let thp = root.join("kernel/mm/transparent_hugepage");
    std::fs::create_dir_all(&thp).unwrap();
    std::fs::write(thp.join("shmem_enabled"), shmem).unwrap();
    let hp = root.join("kernel/mm/hugepages/hugepages-2048kB");
    std::fs::create_dir_all(&hp).unwrap();
    for (f, v) in [
        ("nr_hugepages", total_2m),
        ("free_hugepages", free_2m),
        ("resv_hugepages", 0),
        ("surplus_hugepages", 0),
    ] {
        std::fs::write(hp.join(f), format!("{v}\n")).unwrap();
    }
    HostPaths { sys: root }
}

#[test]
fn size_not_a_multiple_of_2m() {
    for size in [0, 3 << 20, (16 << 20) + 4096] {
        let e = GuestRam::new(&GuestRamConfig::new(size, Backing::Small4k)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("guest RAM size {size} bytes is not a positive multiple of 2 MiB (2097152): round it to a multiple of 2M")
        );
    }
    let e = GuestRam::new(&GuestRamConfig::new(512 << 30, Backing::Small4k)).unwrap_err();
    assert!(
        e.to_string()
            .contains("larger than the maximum 0x7fc0000000"),
        "{e}"
    );
}

#[test]
fn more_ram_than_the_host_can_back_is_refused_before_anything_is_allocated() {
    let e = GuestRam::new(&GuestRamConfig::new(500 << 30, Backing::Small4k)).unwrap_err();
    assert!(
        matches!(e, GuestMemError::HostCannotBack { need, huge: 0, .. } if need == 500 << 30),
        "{e}"
    );
    assert!(
        e.to_string().contains("512000 MiB of ordinary host memory"),
        "{e}"
    );
}

#[test]
fn ranges_outside_ram_or_unaligned() {
    let mut ram = GuestRam::new(&GuestRamConfig::new(4 << 20, Backing::Small4k)).unwrap();
    ram.populate_all().unwrap();
    let e = ram.discard(4 << 20, 4096, &NoVcpus).unwrap_err();
    assert_eq!(
        e.to_string(),
        "range gpa 0x400000 + 0x1000 is outside guest RAM [0, 0x400000): pass a range inside guest RAM"
    );
    let e = ram.refill(u64::MAX - 4095, 4096, &NoVcpus).unwrap_err();
    assert!(matches!(e, GuestMemError::RangeOutsideRam { .. }), "{e}");
    let e = ram.discard(0x1800, 4096, &NoVcpus).unwrap_err();
    assert_eq!(
        e.to_string(),
        "range gpa 0x1800 + 0x1000 is not a non-empty range of whole 4K pages: align start and length to 4096"
    );
    let e = ram.discard(0, 0, &NoVcpus).unwrap_err();
    assert!(
        matches!(e, GuestMemError::RangeNotPageAligned { .. }),
        "{e}"
    );
    let mut buf = [0u8; 8];
    let e = ram.read_no_populate((4 << 20) - 4, &mut buf).unwrap_err();
    assert!(matches!(e, GuestMemError::RangeOutsideRam { .. }), "{e}");
    // Nothing changed.
    assert!(ram
        .frame_states()
        .iter()
        .all(|s| *s == FrameView::Small { present: 512 }));
}

#[test]
fn split_and_collapse_on_4k_and_bad_frames() {
    let mut ram = GuestRam::new(&GuestRamConfig::new(4 << 20, Backing::Small4k)).unwrap();
    let e = ram.split(0, &NoVcpus).unwrap_err();
    assert_eq!(
        e.to_string(),
        "backing 4k has no huge frames: split needs --backing hugetlb or thp"
    );
    let e = ram.collapse(1, &NoVcpus).unwrap_err();
    assert_eq!(
        e.to_string(),
        "backing 4k has no huge frames: collapse needs --backing hugetlb or thp"
    );
    let mut ram = GuestRam::new(&GuestRamConfig::new(4 << 20, Backing::Thp)).unwrap();
    let e = ram.split(2, &NoVcpus).unwrap_err();
    assert_eq!(
        e.to_string(),
        "frame 2 is outside guest RAM (2 frames of 2M): pass a frame below 2"
    );
    let e = ram.populate(9).unwrap_err();
    assert!(
        matches!(
            e,
            GuestMemError::FrameOutOfRange {
                frame: 9,
                frames: 2
            }
        ),
        "{e}"
    );
}

#[test]
fn shmem_thp_disabled_is_reported_with_the_setting_to_change() {
    let paths = fake_sys(
        "shmem-never",
        "always within_size advise [never] deny force\n",
        0,
        0,
    );
    let cfg = GuestRamConfig {
        host: paths.clone(),
        ..GuestRamConfig::new(4 << 20, Backing::Thp)
    };
    let e = GuestRam::new(&cfg).unwrap_err();
    let file = paths
        .sys
        .join("kernel/mm/transparent_hugepage/shmem_enabled");
    assert_eq!(
        e.to_string(),
        format!(
            "shmem transparent huge pages are disabled ({0} = never): set it with `echo advise > {0}` (or use --backing hugetlb / 4k)",
            file.display()
        )
    );
    std::fs::remove_dir_all(paths.sys).unwrap();
}

#[test]
fn hugetlb_pool_too_small_strict_errors_default_falls_back() {
    // The fake host claims 2 free 2M pages out of 10.
    let paths = fake_sys("pool-small", "[advise]\n", 2, 10);
    let strict = GuestRamConfig {
        host: paths.clone(),
        strict_pool: true,
        ..GuestRamConfig::new(8 * HPAGE_SIZE, Backing::Hugetlb)
    };
    let e = GuestRam::new(&strict).unwrap_err();
    assert_eq!(
        e.to_string(),
        "hugetlb pool too small: need 8 free 2M pages, have 2: reserve with \
         `echo 16 > /proc/sys/vm/nr_hugepages` (strict pool mode; the default policy instead \
         falls back to small pages for the frames that do not fit)"
    );
    let real = guest_mem::smaps::read_meminfo()
        .map(|m| m.available())
        .unwrap_or(0);
    if real < 2 + 8 {
        common::skip(&format!("fallback half: host has {real} free 2M pages"));
        std::fs::remove_dir_all(paths.sys).unwrap();
        return;
    }
    let mut ram = GuestRam::new(&GuestRamConfig {
        strict_pool: false,
        ..strict
    })
    .unwrap();
    ram.populate_all().unwrap();
    let huge = ram
        .frame_states()
        .iter()
        .filter(|s| matches!(s, FrameView::Huge { .. }))
        .count();
    assert_eq!(huge, 2, "{:?}", ram.frame_states());
    let ps = ram.pool_stats();
    assert_eq!((ps.requested, ps.capacity), (8, 2));
    assert_eq!(ram.host_view().unwrap().smaps.hugetlb(), 2 * HPAGE_SIZE);
    std::fs::remove_dir_all(paths.sys).unwrap();
}

#[test]
fn mmap_failure_names_the_errno() {
    let e = guest_mem::mapping::HostRange::reserve(1 << 62).unwrap_err();
    let s = e.to_string();
    assert!(s.starts_with("mmap of guest RAM reservation at 0x0"), "{s}");
    assert!(s.contains("os error 12"), "{s}");
}

#[test]
fn memfd_failure_names_the_errno() {
    let e = guest_mem::memfd::Memfd::create("bad\0name", guest_mem::memfd::MemfdKind::Hugetlb2M)
        .unwrap_err();
    assert!(e.to_string().contains("os error 22"), "{e}");
}

#[test]
fn vm_memory_view_outliving_guest_ram_stays_mapped() {
    use vm_memory::{Bytes, GuestAddress};
    let mut ram = GuestRam::new(&GuestRamConfig::new(2 << 20, Backing::Small4k)).unwrap();
    ram.populate_all().unwrap();
    let mem = ram.memory();
    mem.write_obj(5u64, GuestAddress(64)).unwrap();
    drop(ram);
    // The range was replaced with zero pages, not unmapped.
    assert_eq!(mem.read_obj::<u64>(GuestAddress(64)).unwrap(), 0);
}
