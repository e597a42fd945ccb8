//! Which configurations of the default `vmm bench tlb` matrix the host can
//! back now: the large working sets (4G, 8G, 16G) run only where the hugetlb
//! pool (hugetlb guests, native 2M) or the available memory (4k and thp
//! guests, native 4K) holds them; the others are skipped with the reason.

use guest_mem::{Backing, HPAGE_SIZE};

use super::plan::{self, Config};
use crate::testguest::GuestPageSize;

/// Working sets of the default matrix that always run.
pub const SMALL_SETS: [u64; 3] = [64 << 20, 512 << 20, 2 << 30];
/// Working sets of the default matrix that run when the host can back them.
pub const LARGE_SETS: [u64; 3] = [4 << 30, 8 << 30, 16 << 30];

/// What the host offers now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRoom {
    /// Free 2M hugetlb pages.
    pub free_huge: u64,
    /// `MemAvailable` in bytes.
    pub available: u64,
}

/// Why the host cannot back `c` now (`None`: it can).
pub fn why_not(c: &Config, room: HostRoom) -> Option<String> {
    let guest = || plan::guest_memory(c.working_set, c.guest_pages).unwrap_or(u64::MAX);
    let (huge_pages, bytes) = match (c.backing, c.guest_pages) {
        (Some(Backing::Hugetlb), _) => (guest().div_ceil(HPAGE_SIZE), 0),
        // 1g: the native table takes 1G hugetlb pages if the host has them,
        // else 2M ones (counted here, the pool the host reports).
        (None, GuestPageSize::Size2M | GuestPageSize::Size1G) => {
            (c.working_set.div_ceil(HPAGE_SIZE), 0)
        }
        (Some(_), _) => (0, guest()),
        (None, GuestPageSize::Size4K) => (0, c.working_set),
    };
    if huge_pages > room.free_huge {
        return Some(format!(
            "needs {huge_pages} free 2M hugetlb pages, the host has {} (echo N > \
             /proc/sys/vm/nr_hugepages to run it)",
            room.free_huge
        ));
    }
    if bytes > room.available {
        return Some(format!(
            "needs {} MiB of memory, the host has {} MiB available",
            bytes >> 20,
            room.available >> 20
        ));
    }
    None
}

/// Split the default matrix `cfgs` into what runs and what is skipped
/// (with why): only configurations of [`LARGE_SETS`] are ever skipped.
pub fn default_matrix(cfgs: Vec<Config>, room: HostRoom) -> (Vec<Config>, Vec<(Config, String)>) {
    let mut run = Vec::new();
    let mut skipped = Vec::new();
    for c in cfgs {
        match why_not(&c, room).filter(|_| LARGE_SETS.contains(&c.working_set)) {
            Some(why) => skipped.push((c, why)),
            None => run.push(c),
        }
    }
    (run, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn cfg(ws: u64, backing: Option<Backing>) -> Config {
        Config {
            working_set: ws,
            guest_pages: GuestPageSize::Size2M,
            backing,
        }
    }

    #[test]
    fn large_sets_run_only_where_the_host_backs_them() {
        let room = HostRoom {
            free_huge: 4200,
            available: 10 * G,
        };
        let all = plan::configs(
            &[64 << 20, 8 * G, 16 * G],
            &[GuestPageSize::Size2M],
            &[Backing::Small4k, Backing::Hugetlb],
            true,
        );
        let (run, skipped) = default_matrix(all, room);
        let names: Vec<String> = run.iter().map(Config::name).collect();
        assert_eq!(run.len(), 6, "{names:?}");
        assert!(run.contains(&cfg(8 * G, Some(Backing::Hugetlb))));
        assert!(run.contains(&cfg(8 * G, Some(Backing::Small4k))));
        assert_eq!(skipped.len(), 3);
        let (c, why) = &skipped[0];
        assert_eq!(c.working_set, 16 * G);
        assert!(why.contains("hugetlb pages"), "{why}");
        assert!(skipped.iter().any(|(_, w)| w.contains("MiB of memory")));
        // Small sets are never skipped (a pool too small is an error there).
        let tiny = HostRoom {
            free_huge: 0,
            available: 0,
        };
        let (run, skipped) = default_matrix(vec![cfg(64 << 20, Some(Backing::Hugetlb))], tiny);
        assert_eq!((run.len(), skipped.len()), (1, 0));
    }
}
