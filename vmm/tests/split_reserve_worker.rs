//! The split-reserve worker on real guest RAM (a hugetlb pool, no VM):
//! `SplitReserve::wait_caught_up` returns once the worker has allocated one
//! huge page per split frame, up to the collapse reserve, and refilled the
//! split blocks the splits took; after the worker ended it returns `false`
//! at once. (A test guest's checkpoint waits on it before its collapse
//! pass: `unmap_guest` relies on it.)
//!
//! Host kinds: any host with free 2M hugetlb pages; no KVM needed.

mod common;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use guest_mem::{Backing, GuestRam, GuestRamConfig, NoVcpus, HPAGE_SIZE};
use vmm::control::VcpuControl;
use vmm::give_back_stats::GiveBackRecorder;
use vmm::ram_handle::RamHandle;
use vmm::split_reserve::{ReserveSizes, SplitReserve};
use vmm::unmap_stats::UnmapRecorder;

const FRAMES: u64 = 16;
const SPLIT: usize = 5;
const SIZES: ReserveSizes = ReserveSizes {
    split_blocks: 2,
    huge_pages: 3,
};
const CATCH_UP: Duration = Duration::from_secs(30);

/// Guest RAM and what the worker's handle needs beside it.
struct Ram {
    ram: Mutex<GuestRam>,
    vcpus: VcpuControl,
    unmap: UnmapRecorder,
}

impl RamHandle for Ram {
    fn ram(&self) -> MutexGuard<'_, GuestRam> {
        self.ram.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn with_ram_after_balloon(&self, f: &mut dyn FnMut(&mut GuestRam)) {
        f(&mut self.ram());
    }
    fn with_balloon_ram(&self, _: &mut dyn FnMut(&mut GuestRam, &GiveBackRecorder)) -> bool {
        false
    }
    fn vcpus(&self) -> &VcpuControl {
        &self.vcpus
    }
    fn recorder(&self) -> &UnmapRecorder {
        &self.unmap
    }
}

#[test]
fn the_worker_catches_up_after_splits_then_ends() {
    // The frames, the blocks and huge pages allocated ahead, headroom.
    if let Some(why) = common::hugetlb_skip_reason(FRAMES + 16) {
        common::skip(&why);
        return;
    }
    let mut ram = GuestRam::new(&GuestRamConfig::new(FRAMES * HPAGE_SIZE, Backing::Hugetlb))
        .expect("hugetlb guest RAM");
    ram.populate_all().expect("populate");
    let m = Arc::new(Ram {
        ram: Mutex::new(ram),
        vcpus: VcpuControl::new(0),
        unmap: UnmapRecorder::default(),
    });
    let running = SplitReserve::start_for(SIZES, Backing::Hugetlb, &m)
        .expect("spawning the worker")
        .expect("a worker on hugetlb");
    let worker = Arc::clone(running.worker());

    // Nothing split yet: blocks ready, no huge page wanted.
    assert!(worker.wait_caught_up(CATCH_UP), "caught up before splits");
    assert_eq!(m.ram().warm_split_blocks(), SIZES.split_blocks);
    assert_eq!(m.ram().warm_huge_pages(), 0);

    for frame in 0..SPLIT {
        m.ram().split(frame, &NoVcpus).expect("split");
    }
    assert!(worker.wait_caught_up(CATCH_UP), "caught up after splits");
    // One huge page per split frame, up to the reserve; the blocks the
    // splits took are replaced.
    assert_eq!(
        m.ram().warm_huge_pages(),
        SIZES.huge_pages.min(SPLIT),
        "huge pages allocated ahead"
    );
    assert_eq!(m.ram().warm_split_blocks(), SIZES.split_blocks);

    running.shutdown();
    let t = Instant::now();
    assert!(
        !worker.wait_caught_up(CATCH_UP),
        "an ended worker never catches up"
    );
    assert!(t.elapsed() < CATCH_UP / 2, "it says so at once");
}
