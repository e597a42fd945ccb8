//! Latency of split and collapse per 2M frame (hugetlb: copy by the VMM;
//! thp: in-kernel) and of a 4K discard, on real memory.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use guest_mem::{Backing, GuestRam, GuestRamConfig, NoVcpus, HPAGE_SIZE, PAGE_SIZE};

const FRAMES: usize = 8;

fn ram(backing: Backing) -> Option<GuestRam> {
    let mut r = match GuestRam::new(&GuestRamConfig::new(FRAMES as u64 * HPAGE_SIZE, backing)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skip {backing}: {e}");
            return None;
        }
    };
    if let Err(e) = r.populate_all() {
        eprintln!("skip {backing}: {e}");
        return None;
    }
    Some(r)
}

fn split_collapse(c: &mut Criterion, backing: Backing) {
    let Some(mut r) = ram(backing) else { return };
    let mut g = c.benchmark_group(format!("{backing}"));
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
    split_collapse(c, Backing::Hugetlb);
    split_collapse(c, Backing::Thp);
    discard_4k(c, Backing::Small4k);
    discard_4k(c, Backing::Hugetlb);
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
