//! Latency of split and collapse per 2M frame (hugetlb: copy by the VMM;
//! thp: in-kernel), the hugetlb split's and collapse's write-hold (or
//! pause), at several guest RAM sizes (the cost must not grow with
//! RAM: only the frames under test are populated, a hugetlb pool of just
//! their size), and of a 4K discard, on real memory. `hugetlb-1g`: the split
//! of a 1G page into 2M frames and the collapse back (1 GiB of RAM), with the
//! split's write-hold and the collapse's pause. hugetlb splits also onto
//! the split reserve (pages allocated ahead), and collapse onto the
//! collapse reserve (a huge page allocated ahead), as the VMM runs them.

use std::time::{Duration, Instant};

use std::cell::Cell;

use criterion::{criterion_group, criterion_main, Criterion};
use guest_mem::quiesce::{Quiesce, QuiesceError};
use guest_mem::{Backing, GuestRam, GuestRamConfig, NoVcpus, GIG_SIZE, HPAGE_SIZE, PAGE_SIZE};

/// Adds up the time between each pause and its resume: how long the
/// vCPUs would stand still.
#[derive(Default)]
struct PauseClock {
    since: Cell<Option<Instant>>,
    total: Cell<Duration>,
}

impl Quiesce for PauseClock {
    fn pause(&self) -> Result<(), QuiesceError> {
        self.since.set(Some(Instant::now()));
        Ok(())
    }
    fn resume(&self) {
        if let Some(t) = self.since.take() {
            self.total.set(self.total.get() + t.elapsed());
        }
    }
}

const FRAMES: usize = 8;

/// Guest RAM sizes the split and collapse benches run at.
const SIZES: [(u64, &str); 3] = [(256 << 20, "256M"), (2 << 30, "2G"), (16 << 30, "16G")];

fn ram(backing: Backing) -> Option<GuestRam> {
    ram_of(FRAMES as u64 * HPAGE_SIZE, backing)
}

/// `size` bytes of guest RAM with only the first [`FRAMES`] frames
/// populated (hugetlb: a pool of [`FRAMES`] pages).
fn ram_of(size: u64, backing: Backing) -> Option<GuestRam> {
    let mut cfg = GuestRamConfig::new(size, backing);
    cfg.hugetlb_pool_pages = Some(FRAMES);
    let mut r = match GuestRam::new(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skip {backing}: {e}");
            return None;
        }
    };
    for f in 0..FRAMES {
        if let Err(e) = r.populate(f) {
            eprintln!("skip {backing}: {e}");
            return None;
        }
    }
    Some(r)
}

/// The write-hold windows of the collapses (`collapse`) or of the splits
/// recorded since the last call.
fn held(windows: &guest_mem::SplitWindows, collapse: bool) -> Duration {
    windows
        .take()
        .iter()
        .filter(|w| w.collapse == collapse)
        .map(|w| w.write_hold)
        .sum()
}

fn split_collapse(c: &mut Criterion, backing: Backing, size: u64, name: &str) {
    let Some(mut r) = ram_of(size, backing) else {
        return;
    };
    let mut g = c.benchmark_group(format!("{backing}/{name}"));
    g.bench_function("split_2m", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for i in 0..iters {
                let f = i as usize % FRAMES;
                let s = Instant::now();
                r.split(f, &NoVcpus).unwrap();
                t += s.elapsed();
                r.collapse(f, &NoVcpus).unwrap();
            }
            t
        })
    });
    g.bench_function("collapse_2m", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for i in 0..iters {
                let f = i as usize % FRAMES;
                r.split(f, &NoVcpus).unwrap();
                let s = Instant::now();
                r.collapse(f, &NoVcpus).unwrap();
                t += s.elapsed();
            }
            t
        })
    });
    if backing == Backing::Hugetlb {
        // A hugetlb split pauses no vCPU (where the kernel has userfaultfd
        // write-protect): its cost to the guest is the time writes to that
        // frame are held back. Without it, the pause.
        g.bench_function("split_write_hold_or_pause", |b| {
            b.iter_custom(|iters| {
                let q = PauseClock::default();
                let windows = r.split_windows();
                windows.take();
                for i in 0..iters {
                    let f = i as usize % FRAMES;
                    r.split(f, &q).unwrap();
                    r.collapse(f, &NoVcpus).unwrap();
                }
                held(&windows, false) + q.total.get()
            })
        });
        // With the split reserve (`vmm --split-reserve`): the split finds
        // its small pages allocated and mapped ahead (topped up untimed
        // before each split, as the VMM's thread does in the background).
        g.bench_function("split_2m_onto_reserve", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for i in 0..iters {
                    let f = i as usize % FRAMES;
                    r.prepare_split_blocks(1).unwrap();
                    let s = Instant::now();
                    r.split(f, &NoVcpus).unwrap();
                    t += s.elapsed();
                    r.collapse(f, &NoVcpus).unwrap();
                }
                t
            })
        });
        g.bench_function("split_write_hold_onto_reserve", |b| {
            b.iter_custom(|iters| {
                let windows = r.split_windows();
                windows.take();
                for i in 0..iters {
                    let f = i as usize % FRAMES;
                    r.prepare_split_blocks(1).unwrap();
                    r.split(f, &NoVcpus).unwrap();
                    r.collapse(f, &NoVcpus).unwrap();
                }
                held(&windows, false)
            })
        });
        // The VMM's defaults (`--split-reserve`, `--collapse-reserve`): the
        // collapse finds its huge page allocated and mapped ahead (topped up
        // untimed after each split, as the VMM's thread does in the
        // background) and keeps its small pages as a split block.
        g.bench_function("collapse_2m_onto_reserve", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for i in 0..iters {
                    let f = i as usize % FRAMES;
                    r.prepare_split_blocks(1).unwrap();
                    r.split(f, &NoVcpus).unwrap();
                    r.prepare_warm_huge_pages(1).unwrap();
                    let s = Instant::now();
                    r.collapse(f, &NoVcpus).unwrap();
                    t += s.elapsed();
                }
                t
            })
        });
        // A collapse of a frame with every page present pauses no vCPU
        // (where the kernel has userfaultfd write-protect): its cost to the
        // guest is the time writes to that frame are held back. Without
        // it, the pause.
        g.bench_function("collapse_write_hold_or_pause", |b| {
            b.iter_custom(|iters| {
                let q = PauseClock::default();
                let windows = r.split_windows();
                windows.take();
                for i in 0..iters {
                    let f = i as usize % FRAMES;
                    r.split(f, &NoVcpus).unwrap();
                    r.collapse(f, &q).unwrap();
                }
                held(&windows, true) + q.total.get()
            })
        });
    }
    g.finish();
}

/// 1 GiB of guest RAM on one 1G page: split 1G -> 2M and collapse back.
fn split_collapse_1g(c: &mut Criterion) {
    let cfg = GuestRamConfig::new(GIG_SIZE, Backing::Hugetlb1g);
    let mut r = match GuestRam::new(&cfg).and_then(|mut r| r.populate_all().map(|()| r)) {
        Ok(r) if r.gig_of(0).is_some() => r,
        Ok(_) => {
            eprintln!(
                "skip hugetlb-1g: no free 1G page (bash resources/setup-host.sh --gigpages 1)"
            );
            return;
        }
        Err(e) => {
            eprintln!("skip hugetlb-1g: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("hugetlb-1g/1G");
    // Each sample is one 1 GiB copy: ten of them.
    g.sample_size(10);
    g.bench_function("split_1g", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let s = Instant::now();
                r.split_gig(0, &NoVcpus).unwrap();
                t += s.elapsed();
                r.collapse_gig(0, &NoVcpus).unwrap();
            }
            t
        })
    });
    g.bench_function("collapse_1g", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                r.split_gig(0, &NoVcpus).unwrap();
                let s = Instant::now();
                r.collapse_gig(0, &NoVcpus).unwrap();
                t += s.elapsed();
            }
            t
        })
    });
    g.bench_function("split_1g_write_hold_or_pause", |b| {
        b.iter_custom(|iters| {
            let q = PauseClock::default();
            let windows = r.split_windows();
            windows.take();
            for _ in 0..iters {
                r.split_gig(0, &q).unwrap();
                r.collapse_gig(0, &NoVcpus).unwrap();
            }
            held(&windows, false) + q.total.get()
        })
    });
    // Every frame on a 2M page after the split: the collapse holds writes
    // to the GiB instead of pausing (where the host can write-protect).
    g.bench_function("collapse_1g_write_hold_or_pause", |b| {
        b.iter_custom(|iters| {
            let q = PauseClock::default();
            let windows = r.split_windows();
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                r.split_gig(0, &NoVcpus).unwrap();
                windows.take();
                r.collapse_gig(0, &q).unwrap();
                total += held(&windows, true);
            }
            total + q.total.get()
        })
    });
    g.finish();
}

fn discard_4k(c: &mut Criterion, backing: Backing) {
    let Some(mut r) = ram(backing) else { return };
    let pages = FRAMES as u64 * 512;
    c.bench_function(&format!("{backing}/discard_4k"), |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for i in 0..iters {
                // Skip page 0 of each frame so huge frames split once, then stay small.
                let p = (i * 7919 % pages) | 1;
                let s = Instant::now();
                r.discard(p * PAGE_SIZE, PAGE_SIZE, &NoVcpus).unwrap();
                t += s.elapsed();
                r.refill(p * PAGE_SIZE, PAGE_SIZE, &NoVcpus).unwrap();
            }
            t
        })
    });
}

fn benches(c: &mut Criterion) {
    for backing in [Backing::Hugetlb, Backing::Thp] {
        for (size, name) in SIZES {
            split_collapse(c, backing, size, name);
        }
    }
    discard_4k(c, Backing::Small4k);
    discard_4k(c, Backing::Hugetlb);
    split_collapse_1g(c);
}

criterion_group! {
    name = frame_ops;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(frame_ops);
