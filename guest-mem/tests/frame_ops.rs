//! Fill guest RAM with a per-page pattern, then split, collapse, discard and
//! refill at random on real memory; after every step every byte is checked
//! and the host's accounting is compared with our books.

mod common;

use common::{verify_host, PPH};
use guest_mem::{Backing, FrameView, GuestMemError, NoVcpus, PAGE_SIZE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FRAMES: usize = 16;

/// `reserve`: keep up to that many split blocks and huge pages allocated
/// ahead (topped up at random steps, `GuestRam::prepare_split_blocks`,
/// `prepare_warm_huge_pages`), so that splits and collapses land on warm
/// blocks and pages, cold ones and plain runs in turn.
fn run(backing: Backing, seed: u64, steps: usize, reserve: usize) {
    let (mut ram, mut sh) = common::patterned_ram(FRAMES, backing);
    let pages = (FRAMES * PPH) as u64;
    let mut must_pmd = vec![false; FRAMES];
    verify_host(&ram, &must_pmd);
    sh.verify_books(&ram);
    sh.verify_bytes(&ram);

    let mut rng = StdRng::seed_from_u64(seed);
    let (mut splits, mut collapses, mut discards, mut refills) = (0, 0, 0, 0);
    let mut warm_splits = 0;
    for step in 0..steps {
        let gen = step as u32 + 2;
        if reserve > 0 && rng.gen_bool(0.3) {
            ram.prepare_split_blocks(rng.gen_range(1..=reserve))
                .unwrap();
        }
        // The collapse reserve too (`hugetlb`: a no-op elsewhere), so
        // collapses and populates land on warm huge pages and cold slots.
        if reserve > 0 && rng.gen_bool(0.3) {
            ram.prepare_warm_huge_pages(rng.gen_range(0..=reserve))
                .unwrap();
        }
        match rng.gen_range(0..4) {
            0 if backing != Backing::Small4k => {
                let f = rng.gen_range(0..FRAMES);
                let was = ram.frame_states()[f];
                let warm = ram.warm_split_blocks();
                ram.split(f, &NoVcpus).unwrap();
                warm_splits += usize::from(ram.warm_split_blocks() < warm);
                must_pmd[f] = false;
                if let FrameView::Huge { .. } = was {
                    assert_eq!(ram.frame_states()[f], FrameView::Small { present: 512 });
                    splits += 1;
                } else {
                    assert_eq!(
                        ram.frame_states()[f],
                        was,
                        "split of a non-huge frame changed it"
                    );
                }
            }
            1 if backing != Backing::Small4k => {
                let f = rng.gen_range(0..FRAMES);
                let was = ram.frame_states()[f];
                match ram.collapse(f, &NoVcpus) {
                    Ok(()) => {
                        assert!(matches!(ram.frame_states()[f], FrameView::Huge { .. }));
                        sh.frame_all_present(f);
                        if was != ram.frame_states()[f] {
                            collapses += 1;
                            must_pmd[f] = true;
                        }
                    }
                    Err(e @ (GuestMemError::Model(_) | GuestMemError::CollapseFailed { .. })) => {
                        eprintln!("step {step}: collapse of frame {f} ({was:?}) refused: {e}");
                        assert_eq!(
                            ram.frame_states()[f],
                            was,
                            "a refused collapse changed the books"
                        );
                    }
                    Err(e) => panic!("collapse of frame {f}: {e}"),
                }
            }
            2 => {
                let first = rng.gen_range(0..pages);
                let n = match rng.gen_range(0..4) {
                    0 => 1,
                    1 => rng.gen_range(1..32),
                    2 => PPH as u64 - first % PPH as u64, // to the end of the frame
                    _ => rng.gen_range(1..2 * PPH as u64),
                }
                .min(pages - first);
                let rep = ram
                    .discard(first * PAGE_SIZE, n * PAGE_SIZE, &NoVcpus)
                    .unwrap();
                let freed_expected = sh.present[first as usize..(first + n) as usize]
                    .iter()
                    .filter(|b| **b)
                    .count() as u64;
                assert_eq!(rep.pages_freed, freed_expected, "discard report {rep:?}");
                sh.discarded(first..first + n);
                let (lo, hi) = (first as usize / PPH, (first + n - 1) as usize / PPH);
                must_pmd[lo..=hi].fill(false);
                discards += 1;
            }
            3 => {
                let first = rng.gen_range(0..pages);
                let n = rng.gen_range(1..64).min(pages - first);
                ram.refill(first * PAGE_SIZE, n * PAGE_SIZE, &NoVcpus)
                    .unwrap();
                sh.made_present(first..first + n);
                // Refilled pages read zero; check before writing new data.
                sh.verify_bytes(&ram);
                let fresh: Vec<u64> = (first..first + n)
                    .filter(|p| sh.gen[*p as usize] == 0)
                    .collect();
                for p in fresh {
                    sh.write(&ram, p..p + 1, gen);
                }
                refills += 1;
            }
            _ => continue,
        }
        verify_host(&ram, &must_pmd);
        sh.verify_books(&ram);
        sh.verify_bytes(&ram);
    }
    eprintln!(
        "{backing} seed {seed}: {splits} splits ({warm_splits} onto warm blocks), {collapses} collapses, {discards} discards, {refills} refills; final {:?}",
        ram.host_view().unwrap().smaps
    );
    if backing != Backing::Small4k {
        assert!(
            splits + collapses > 0,
            "the random walk did no split or collapse"
        );
        assert!(
            reserve == 0 || warm_splits > 0,
            "no split landed on a block allocated ahead"
        );
    }
}

#[test]
fn random_ops_hugetlb() {
    if !common::hugetlb_available(FRAMES as u64) {
        return;
    }
    for seed in [1, 2] {
        run(Backing::Hugetlb, seed, 60, 0);
    }
}

#[test]
fn random_ops_hugetlb_with_a_split_reserve() {
    if !common::hugetlb_available(FRAMES as u64) {
        return;
    }
    for seed in [6, 7] {
        run(Backing::Hugetlb, seed, 60, 2);
    }
}

#[test]
fn random_ops_thp() {
    if !common::shmem_thp_available() {
        return;
    }
    for seed in [3, 4] {
        run(Backing::Thp, seed, 60, 0);
    }
}

#[test]
fn random_ops_4k() {
    run(Backing::Small4k, 5, 40, 0);
}
