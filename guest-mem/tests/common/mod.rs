//! Shared helpers of the real-memory tests: skip checks, page patterns, a
//! shadow of what every page must hold, and host-vs-books comparisons.
#![allow(dead_code)]

use guest_mem::smaps::read_meminfo;
use guest_mem::{Backing, FrameView, GuestRam, HPAGE_SIZE, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

pub const PPH: usize = 512;

/// Skipping a test the host cannot run: one policy for every test crate.
#[path = "../../../tests/src/skip.rs"]
mod skip_policy;
pub use skip_policy::skip;

/// Whether the host has `need` free 2M hugetlb pages (plus a margin for the
/// other users of the shared pool); prints the reason when it has not.
pub fn hugetlb_available(need: u64) -> bool {
    match read_meminfo() {
        Ok(m) if m.available() >= need + 8 => true,
        Ok(m) => {
            skip(&format!(
                "need {} free 2M hugetlb pages, host has {} (HugePages_Free {} - Rsvd {})",
                need + 8,
                m.available(),
                m.free,
                m.rsvd
            ));
            false
        }
        Err(e) => {
            skip(&format!("no hugetlb on this host: {e}"));
            false
        }
    }
}

/// Whether the host has `need` free 1G hugetlb pages; prints the reason (and
/// the command that reserves them) when it has not.
pub fn gig_pages_available(need: u64) -> bool {
    match guest_mem::backing::hugetlb_1g_counters(&Default::default()) {
        Ok(c) if c.available() >= need => true,
        Ok(c) => {
            skip(&format!(
                "need {need} free 1G hugetlb pages, host has {} (reserve early: echo {} > \
                 /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages)",
                c.available(),
                c.total + need
            ));
            false
        }
        Err(e) => {
            skip(&format!("no 1G hugetlb pages on this host: {e}"));
            false
        }
    }
}

/// Whether shmem THP is usable; prints the reason when it is not.
pub fn shmem_thp_available() -> bool {
    match guest_mem::backing::check_shmem_thp(&Default::default()) {
        Ok(()) => true,
        Err(e) => {
            skip(&e.to_string());
            false
        }
    }
}

/// Word `i` of page `page` in generation `gen` (generation 0 = zero page).
pub fn word(page: u64, gen: u32, i: usize) -> u64 {
    if gen == 0 {
        return 0;
    }
    (page << 24) ^ (u64::from(gen) << 48) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

pub fn page_bytes(page: u64, gen: u32) -> Vec<u8> {
    (0..PAGE_SIZE as usize / 8)
        .flat_map(|i| word(page, gen, i).to_le_bytes())
        .collect()
}

/// `frames` frames of guest RAM on `backing`, every page populated and
/// written with generation 1, and the shadow that says so.
pub fn patterned_ram(frames: usize, backing: Backing) -> (GuestRam, Shadow) {
    let cfg = guest_mem::GuestRamConfig::new(frames as u64 * HPAGE_SIZE, backing);
    let mut ram = GuestRam::new(&cfg).unwrap();
    ram.populate_all().unwrap();
    let pages = (frames * PPH) as u64;
    let mut sh = Shadow::new(pages as usize);
    sh.made_present(0..pages);
    sh.write(&ram, 0..pages, 1);
    (ram, sh)
}

/// [`patterned_ram`] on `hugetlb` when the host has `frames` 2M pages free
/// (else `None`, the skip said).
pub fn patterned_hugetlb(frames: usize) -> Option<(GuestRam, Shadow)> {
    if !hugetlb_available(frames as u64) {
        return None;
    }
    Some(patterned_ram(frames, Backing::Hugetlb))
}

/// The host's books, our books and every byte agree with the shadow (no
/// frame needs to be PMD-mapped).
pub fn check_all(ram: &GuestRam, sh: &Shadow) {
    verify_host(ram, &vec![false; ram.frame_states().len()]);
    sh.verify_books(ram);
    sh.verify_bytes(ram);
}

/// What every 4K page must hold and whether it must be backed.
pub struct Shadow {
    pub gen: Vec<u32>,
    pub present: Vec<bool>,
}

impl Shadow {
    pub fn new(pages: usize) -> Self {
        Self {
            gen: vec![0; pages],
            present: vec![false; pages],
        }
    }

    /// Write generation `gen` into `pages` through the vm-memory view.
    pub fn write(&mut self, ram: &GuestRam, pages: std::ops::Range<u64>, gen: u32) {
        let mem = ram.memory();
        for p in pages {
            mem.write_slice(&page_bytes(p, gen), GuestAddress(p * PAGE_SIZE))
                .unwrap();
            self.gen[p as usize] = gen;
        }
    }

    pub fn discarded(&mut self, pages: std::ops::Range<u64>) {
        for p in pages {
            self.gen[p as usize] = 0;
            self.present[p as usize] = false;
        }
    }

    pub fn made_present(&mut self, pages: std::ops::Range<u64>) {
        for p in pages {
            if !self.present[p as usize] {
                self.present[p as usize] = true;
                self.gen[p as usize] = 0;
            }
        }
    }

    pub fn frame_all_present(&mut self, frame: usize) {
        let b = frame as u64 * PPH as u64;
        self.made_present(b..b + PPH as u64);
    }

    /// Every byte of guest RAM is what the shadow says: present pages through
    /// the vm-memory view, absent ones without faulting them in.
    pub fn verify_bytes(&self, ram: &GuestRam) {
        let mem = ram.memory();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        for (p, &gen) in self.gen.iter().enumerate() {
            let p = p as u64;
            if self.present[p as usize] {
                mem.read_slice(&mut buf, GuestAddress(p * PAGE_SIZE))
                    .unwrap();
            } else {
                ram.read_no_populate(p * PAGE_SIZE, &mut buf).unwrap();
            }
            if buf != page_bytes(p, gen) {
                let first = buf
                    .chunks(8)
                    .position(|c| u64::from_le_bytes(c.try_into().unwrap()) != word(p, gen, 0))
                    .unwrap_or(0);
                panic!(
                    "page {p} (frame {}, index {}) corrupt: expected generation {gen} (present {}), \
                     word {first} differs; frame state {:?}",
                    p / PPH as u64,
                    p % PPH as u64,
                    self.present[p as usize],
                    ram.frame_states()[(p / PPH as u64) as usize]
                );
            }
        }
    }

    /// Our books (the model's frame states) agree with the shadow's presence.
    pub fn verify_books(&self, ram: &GuestRam) {
        for (f, st) in ram.frame_states().iter().enumerate() {
            let present = self.present[f * PPH..(f + 1) * PPH]
                .iter()
                .filter(|b| **b)
                .count() as u32;
            let books = match st {
                FrameView::Unpopulated => 0,
                FrameView::Huge { .. } | FrameView::Gig { .. } => PPH as u32,
                FrameView::Small { present } => *present,
            };
            assert_eq!(
                books, present,
                "frame {f}: books {st:?} vs shadow {present} present"
            );
        }
    }
}

/// The host's own accounting agrees with our per-frame books.
/// `must_be_pmd[f]`: frames the kernel must map huge now (thp: after a
/// successful MADV_COLLAPSE); other model-huge frames of `thp` may have been
/// refused a huge page at fault time.
pub fn verify_host(ram: &GuestRam, must_be_pmd: &[bool]) {
    let states = ram.frame_states();
    let hv = ram.host_view().unwrap();
    let ps = ram.pool_stats();
    let huge = states
        .iter()
        .filter(|s| matches!(s, FrameView::Huge { .. }))
        .count() as u64;
    let small_present: u64 = states
        .iter()
        .map(|s| match s {
            FrameView::Small { present } => u64::from(*present),
            _ => 0,
        })
        .sum();
    let pmd = hv.pmd_mapped.clone();
    match ram.backing() {
        Backing::Hugetlb | Backing::Hugetlb1g => {
            // Frames of 1G pages (hugetlb-1g): hugetlb memory of the 1G memfd.
            let gig = states
                .iter()
                .filter(|s| matches!(s, FrameView::Gig { .. }))
                .count() as u64;
            assert_eq!(
                hv.smaps.hugetlb(),
                (huge + gig) * HPAGE_SIZE,
                "smaps hugetlb vs books {states:?}"
            );
            assert_eq!(
                hv.smaps.rss,
                small_present * PAGE_SIZE,
                "smaps Rss vs small pages in books"
            );
            assert_eq!(
                ps.pool_memfd_bytes,
                huge * HPAGE_SIZE + ps.collapse_reserve_bytes,
                "pool memfd blocks vs books (+ the collapse reserve)"
            );
            assert_eq!(
                ps.gig_memfd_bytes,
                gig * HPAGE_SIZE,
                "1G memfd blocks vs books"
            );
            assert_eq!(
                ps.data_memfd_bytes,
                small_present * PAGE_SIZE + ps.split_reserve_bytes,
                "small memfd blocks vs books (+ the split reserve)"
            );
            assert_eq!(ps.used as u64, huge);
            if let Some(v) = pmd {
                for (f, s) in states.iter().enumerate() {
                    assert_eq!(
                        v[f],
                        matches!(s, FrameView::Huge { .. } | FrameView::Gig { .. }),
                        "frame {f} {s:?} huge-mapped {}",
                        v[f]
                    );
                }
            }
        }
        Backing::Thp => {
            let present = huge * PPH as u64 + small_present;
            assert_eq!(
                hv.smaps.rss,
                present * PAGE_SIZE,
                "smaps Rss vs present pages: {hv:?} {states:?}"
            );
            assert_eq!(
                ps.data_memfd_bytes,
                present * PAGE_SIZE,
                "memfd blocks vs present pages"
            );
            if let Some(v) = pmd {
                let n = v.iter().filter(|b| **b).count() as u64;
                assert_eq!(
                    hv.smaps.shmem_pmd_mapped,
                    n * HPAGE_SIZE,
                    "ShmemPmdMapped vs pagemap"
                );
                for (f, s) in states.iter().enumerate() {
                    let is_huge = matches!(s, FrameView::Huge { .. });
                    assert!(
                        !v[f] || is_huge,
                        "frame {f} is PMD-mapped but the books say {s:?}"
                    );
                    assert!(
                        v[f] || !must_be_pmd.get(f).copied().unwrap_or(false),
                        "frame {f} was collapsed but is not PMD-mapped"
                    );
                }
                assert!(n > 0 || huge == 0, "the kernel mapped no frame huge at all");
            } else {
                assert!(hv.smaps.shmem_pmd_mapped <= huge * HPAGE_SIZE);
            }
        }
        Backing::Small4k => {
            assert_eq!(
                hv.pmd_mapped_bytes(),
                0,
                "4k backing has PMD mappings: {hv:?}"
            );
            assert_eq!(hv.smaps.rss, small_present * PAGE_SIZE);
            assert_eq!(ps.data_memfd_bytes, small_present * PAGE_SIZE);
            if let Some(v) = pmd {
                assert!(v.iter().all(|b| !b));
            }
        }
    }
}
