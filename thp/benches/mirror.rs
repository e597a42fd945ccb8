//! Fault + invalidate throughput of the KVM secondary-MMU mirror at 1 GiB and
//! 64 GiB of modelled guest RAM. One element = one fault or one
//! invalidation (start + end) of a 4K range.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use thp::interleave::SplitMix64;
use thp::kvm_mirror::{LevelMap, Memslot, SecondaryMmu};
use thp::units::{Level, HPAGE_SIZE, PAGES_PER_HPAGE, PAGE_SIZE};

const HVA: u64 = 0x7f00_0000_0000;
const BATCH: u64 = 1000;

fn setup(bytes: u64) -> (SecondaryMmu, LevelMap, u64) {
    let frames = (bytes / HPAGE_SIZE) as usize;
    // Every fourth frame is host-mapped with 4K pages, the rest with PMDs.
    let levels = (0..frames)
        .map(|f| Some(if f % 4 == 3 { Level::K4 } else { Level::M2 }))
        .collect();
    let host = LevelMap::new(HVA, levels);
    let mut mmu = SecondaryMmu::new();
    let npages = frames as u64 * PAGES_PER_HPAGE;
    mmu.add_slot(Memslot {
        id: 0,
        base_gfn: 0,
        npages,
        userspace_addr: HVA,
        dirty_logging: false,
    })
    .expect("valid slot");
    (mmu, host, npages)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("mirror_fault_invalidate");
    for (name, bytes) in [("1GiB", 1u64 << 30), ("64GiB", 64u64 << 30)] {
        let (mut mmu, host, npages) = setup(bytes);
        let mut rng = SplitMix64::new(42);
        g.throughput(Throughput::Elements(BATCH));
        g.bench_function(
            BenchmarkId::new("mixed_7_faults_1_invalidation", name),
            |b| {
                b.iter(|| {
                    for i in 0..BATCH {
                        let gfn = rng.below(npages);
                        if i % 8 == 7 {
                            let hva = HVA + gfn * PAGE_SIZE;
                            black_box(mmu.invalidate_range_start(hva, hva + PAGE_SIZE));
                            mmu.invalidate_range_end(hva, hva + PAGE_SIZE)
                                .expect("balanced");
                        } else {
                            black_box(mmu.fault(gfn, Level::M2, &host).expect("gfn in slot"));
                        }
                    }
                })
            },
        );
        println!(
            "{name}: pages_4k={} pages_2m={}",
            mmu.pages_4k(),
            mmu.pages_2m()
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
