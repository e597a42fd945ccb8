//! Seeded random scenarios for long runs.

use super::{Actor, Event, EventKind, HostOp, Scenario, SplitMix64};
use crate::units::{Level, PAGES_PER_HPAGE};

/// A random long scenario: `frames` frames, a pool smaller than RAM, some
/// frames populated huge and some small, and `actors` random actors (vCPU
/// faults, unmaps, COW after fork, collapse, split, shrinker, pins, pool and
/// allocation failure injection).
pub fn random_scenario(seed: u64, frames: usize, actors: usize) -> Scenario {
    let mut rng = SplitMix64::new(seed);
    let pages = frames as u64 * PAGES_PER_HPAGE;
    let mut s = Scenario::new(frames, frames.saturating_sub(1).max(1));
    populate_frames(&mut s, &mut rng, frames, 4);
    for _ in 0..frames * 4 {
        s.prefault_secondary.push((rng.below(pages), Level::M2));
    }
    let page = |rng: &mut SplitMix64| rng.below(pages);
    for _ in 0..actors {
        let a = match rng.below(16) {
            0..=5 => Actor::KvmFault {
                gfn: page(&mut rng),
                guest_max_level: if rng.below(4) == 0 {
                    Level::K4
                } else {
                    Level::M2
                },
            },
            6 => {
                let first = page(&mut rng);
                let npages = (1 + rng.below(600)).min(pages - first);
                Actor::Host(HostOp::Unmap { first, npages })
            }
            7 => Actor::Host(HostOp::WriteFault {
                page: page(&mut rng),
            }),
            8 => Actor::Host(HostOp::ReadFault {
                page: page(&mut rng),
            }),
            9 => Actor::Host(HostOp::Collapse {
                frame: rng.below(frames as u64) as usize,
            }),
            10 => Actor::Host(HostOp::SplitFolio {
                frame: rng.below(frames as u64) as usize,
            }),
            11 => Actor::Host(HostOp::Migrate {
                frame: rng.below(frames as u64) as usize,
            }),
            12 => Actor::Host(if rng.below(2) == 0 {
                HostOp::Shrink
            } else {
                HostOp::Fork
            }),
            13 => Actor::Host(HostOp::Pin {
                page: page(&mut rng),
            }),
            14 => Actor::Host(HostOp::Unpin),
            _ => Actor::Host(if rng.below(2) == 0 {
                HostOp::InjectHugeFailures {
                    n: 1 + rng.below(3) as u32,
                }
            } else {
                HostOp::InjectSmallFailures {
                    n: 1 + rng.below(3) as u32,
                }
            }),
        };
        s.actors.push(a);
    }
    s
}

/// A random scenario mixing every [`EventKind`] with concurrent whole vCPU
/// faults: `frames` frames (each populated huge, small or not at all, the
/// pool one huge page larger than RAM so collapse and fault-in can
/// allocate), a few secondary entries already installed, `faults`
/// [`Actor::VcpuFault`]s (read or write, 2M or 4K guest pages) and `events`
/// [`Actor::Event`]s whose kinds cycle through [`EventKind::ALL`] from a
/// random start (so every kind appears once `events >= 8`). A fault that
/// retries faults again up to twice ([`Scenario::fault_retries`]).
pub fn random_event_scenario(seed: u64, frames: usize, faults: usize, events: usize) -> Scenario {
    let mut rng = SplitMix64::new(seed);
    let pages = frames as u64 * PAGES_PER_HPAGE;
    let mut s = Scenario::new(frames, frames + 1);
    s.fault_retries = 2;
    populate_frames(&mut s, &mut rng, frames, 8);
    for _ in 0..frames * 2 {
        s.prefault_secondary.push((rng.below(pages), Level::M2));
    }
    // Faults land on a few hot pages so they race the events that hit them.
    let hot: Vec<u64> = (0..4).map(|_| rng.below(pages)).collect();
    for _ in 0..faults {
        let gfn = if rng.below(2) == 0 {
            hot[rng.below(hot.len() as u64) as usize]
        } else {
            rng.below(pages)
        };
        s.actors.push(Actor::VcpuFault {
            gfn,
            guest_max_level: if rng.below(4) == 0 {
                Level::K4
            } else {
                Level::M2
            },
            write: rng.below(2) == 0,
        });
    }
    let start = rng.below(EventKind::ALL.len() as u64) as usize;
    for k in 0..events {
        let kind = EventKind::ALL[(start + k) % EventKind::ALL.len()];
        let page = hot[rng.below(hot.len() as u64) as usize];
        let frame = if rng.below(2) == 0 {
            (page / PAGES_PER_HPAGE) as usize
        } else {
            rng.below(frames as u64) as usize
        };
        s.actors.push(Actor::Event(Event {
            kind,
            frame,
            page: page % PAGES_PER_HPAGE,
        }));
    }
    s
}

/// Setup of the random scenarios: each of `frames` frames is, with equal
/// odds, faulted huge, faulted small (huge allocation failing; each page
/// faulted except one in `gap_one_in` on average) or left empty.
fn populate_frames(s: &mut Scenario, rng: &mut SplitMix64, frames: usize, gap_one_in: u64) {
    for f in 0..frames {
        let base = f as u64 * PAGES_PER_HPAGE;
        match rng.below(3) {
            0 => s.setup.push(HostOp::WriteFault { page: base }),
            1 => {
                // Two failures: the fault retries the pool once after direct reclaim.
                s.setup.push(HostOp::InjectHugeFailures { n: 2 });
                for i in 0..PAGES_PER_HPAGE {
                    if rng.below(gap_one_in) != 0 {
                        s.setup.push(HostOp::WriteFault { page: base + i });
                    }
                }
                s.setup.push(HostOp::InjectHugeFailures { n: 0 });
            }
            _ => {}
        }
    }
}
