//! Which host page backs each 4K page of guest RAM (the page frame numbers
//! of `/proc/self/pagemap`, Documentation/admin-guide/mm/pagemap.rst), and
//! which pages moved between two reads. The host kernel migrates pages on
//! its own (compaction, khugepaged, NUMA balancing): each move of a guest
//! page is an mmu-notifier invalidation that no VMM operation caused, so
//! KVM drops its mapping there and a prediction made from the VMM's own
//! operations cannot know. Comparing two reads says how many of *this*
//! guest's pages moved (the system-wide `pgmigrate_success` counts every
//! process's). Needs `CAP_SYS_ADMIN` (without it the frame numbers read
//! as zero and the answer is "unknown").

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::GuestMemError;
use crate::{PAGES_PER_HPAGE, PAGE_SIZE};

const PAGEMAP: &str = "/proc/self/pagemap";
/// pagemap: page present.
const PM_PRESENT: u64 = 1 << 63;
/// pagemap: bits 0-54 hold the page frame number.
const PM_PFN_MASK: u64 = (1 << 55) - 1;
/// Entries read per `pread` (512 KiB).
const CHUNK: usize = 1 << 16;

/// The host pages behind `pages` 4K pages from host address `start` (page
/// aligned): per page its frame number, 0 where nothing is mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageFrames(Vec<u64>);

/// Guest pages whose host page changed between two [`PageFrames`] reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Moved {
    /// 4K pages mapped in the first read and mapped elsewhere (or not at
    /// all) in the second.
    pub pages: u64,
    /// 2M frames holding at least one of them.
    pub frames: u64,
}

impl PageFrames {
    /// Reads the frame numbers. `Ok(None)` when the host does not tell
    /// (no `CAP_SYS_ADMIN`: every present page reads frame 0).
    pub fn read(start: u64, pages: usize) -> Result<Option<Self>, GuestMemError> {
        let err = |source| GuestMemError::HostRead {
            path: PAGEMAP.into(),
            source,
        };
        let f = File::open(PAGEMAP).map_err(err)?;
        let mut out = Vec::with_capacity(pages);
        let mut buf = vec![0u8; CHUNK.min(pages.max(1)) * 8];
        let first = start / PAGE_SIZE;
        let mut done = 0usize;
        while done < pages {
            let n = CHUNK.min(pages - done);
            let b = &mut buf[..n * 8];
            f.read_exact_at(b, (first + done as u64) * 8).map_err(err)?;
            for e in b.chunks_exact(8) {
                let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
                if e & PM_PRESENT == 0 {
                    out.push(0);
                } else if e & PM_PFN_MASK == 0 {
                    return Ok(None);
                } else {
                    out.push(e & PM_PFN_MASK);
                }
            }
            done += n;
        }
        Ok(Some(Self(out)))
    }

    /// What moved from `self` (the earlier read) to `later`.
    pub fn moved_to(&self, later: &PageFrames) -> Moved {
        let mut m = Moved::default();
        let mut last_frame = None;
        for (i, (a, b)) in self.0.iter().zip(&later.0).enumerate() {
            if *a != 0 && a != b {
                m.pages += 1;
                let f = i as u64 / PAGES_PER_HPAGE;
                if last_frame != Some(f) {
                    m.frames += 1;
                    last_frame = Some(f);
                }
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_counts_pages_that_changed_and_their_frames() {
        let mut a = vec![0u64; 3 * PAGES_PER_HPAGE as usize];
        for (i, x) in a.iter_mut().enumerate() {
            *x = 1000 + i as u64;
        }
        a[5] = 0; // never mapped: its change counts for nothing
        let mut b = a.clone();
        b[5] = 77;
        b[7] = 9; // moved
        b[8] = 0; // unmapped since
        b[2 * PAGES_PER_HPAGE as usize + 3] = 1; // moved, third frame
        let m = PageFrames(a.clone()).moved_to(&PageFrames(b));
        assert_eq!(
            m,
            Moved {
                pages: 3,
                frames: 2
            }
        );
        assert_eq!(
            PageFrames(a.clone()).moved_to(&PageFrames(a)),
            Moved::default()
        );
    }

    #[test]
    fn reads_this_process_own_pages() {
        let v = vec![1u8; 4 * PAGE_SIZE as usize];
        let start = (v.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        match PageFrames::read(start, 2) {
            Ok(Some(p)) => assert!(p.0.iter().all(|&f| f != 0), "{p:?}"),
            Ok(None) => {
                crate::guest_ram::skip_policy::skip("no CAP_SYS_ADMIN: pagemap hides frame numbers")
            }
            Err(e) => panic!("{e}"),
        }
    }
}
