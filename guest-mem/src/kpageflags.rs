//! Per-frame host truth on kernels without `PAGEMAP_SCAN` (before 6.7):
//! which 2M frames are backed by one present 2M folio (a hugetlb page or a
//! PMD-size THP), from the page frame numbers of `/proc/self/pagemap` and
//! the flags of `/proc/kpageflags` (Documentation/admin-guide/mm/pagemap.rst).
//! Both need `CAP_SYS_ADMIN`; without it the answer is "unknown".
//!
//! A 2M folio is what KVM's `host_pfn_mapping_level` needs but not all of it:
//! the host must also map it with a PMD. [`crate::pagemap`] therefore checks
//! the count against smaps' PMD-mapped totals before it trusts this map.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::GuestMemError;
use crate::{HPAGE_SIZE, PAGE_SIZE};

const PAGEMAP: &str = "/proc/self/pagemap";
const KPAGEFLAGS: &str = "/proc/kpageflags";

/// pagemap: page present.
const PM_PRESENT: u64 = 1 << 63;
/// pagemap: bits 0-54 hold the page frame number.
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// kpageflags bits (include/uapi/linux/kernel-page-flags.h).
const KPF_COMPOUND_HEAD: u64 = 1 << 15;
const KPF_COMPOUND_TAIL: u64 = 1 << 16;
const KPF_HUGE: u64 = 1 << 17;
#[cfg(test)]
const KPF_THP: u64 = 1 << 22;

/// Pages per 2M frame.
const FRAME_PAGES: u64 = HPAGE_SIZE / PAGE_SIZE;

/// What one frame is backed by, as far as the host's page flags tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFolio {
    /// First page not present.
    Absent,
    /// Present, not one 2M folio (small pages, or a folio of another size).
    Small,
    /// One hugetlb 2M page.
    Hugetlb,
    /// One PMD-size transparent huge page.
    Thp,
}

fn read_u64(f: &File, path: &str, index: u64) -> Result<u64, GuestMemError> {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, index * 8)
        .map_err(|source| GuestMemError::HostRead {
            path: path.into(),
            source,
        })?;
    Ok(u64::from_le_bytes(b))
}

/// The folio behind each 2M frame of `[start, start + frames * 2M)` (2M
/// aligned). `Ok(None)` when the host does not tell (no `CAP_SYS_ADMIN`:
/// `/proc/kpageflags` unreadable or page frame numbers read as zero).
pub fn frame_folios(start: u64, frames: usize) -> Result<Option<Vec<FrameFolio>>, GuestMemError> {
    let pagemap = File::open(PAGEMAP).map_err(|source| GuestMemError::HostRead {
        path: PAGEMAP.into(),
        source,
    })?;
    let flags = match File::open(KPAGEFLAGS) {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound
            ) =>
        {
            return Ok(None)
        }
        Err(source) => {
            return Err(GuestMemError::HostRead {
                path: KPAGEFLAGS.into(),
                source,
            })
        }
    };
    let mut out = Vec::with_capacity(frames);
    for f in 0..frames as u64 {
        let first = (start + f * HPAGE_SIZE) / PAGE_SIZE;
        let e0 = read_u64(&pagemap, PAGEMAP, first)?;
        if e0 & PM_PRESENT == 0 {
            out.push(FrameFolio::Absent);
            continue;
        }
        let pfn0 = e0 & PM_PFN_MASK;
        if pfn0 == 0 {
            return Ok(None);
        }
        let e_last = read_u64(&pagemap, PAGEMAP, first + FRAME_PAGES - 1)?;
        let pfn_last = e_last & PM_PFN_MASK;
        let k0 = read_u64(&flags, KPAGEFLAGS, pfn0)?;
        let contiguous = e_last & PM_PRESENT != 0
            && pfn0.is_multiple_of(FRAME_PAGES)
            && pfn_last == pfn0 + FRAME_PAGES - 1
            && read_u64(&flags, KPAGEFLAGS, pfn_last)? & KPF_COMPOUND_TAIL != 0;
        out.push(classify(k0, contiguous));
    }
    Ok(Some(out))
}

/// A present frame from the flags of its first page and whether its last
/// page is a tail of the same aligned run. Guest RAM holds only hugetlb and
/// shmem folios, so an aligned 2M compound page that is not hugetlb is a
/// THP even without `KPF_THP`: Linux sets that bit only for a folio on an
/// LRU list, and a new one waits in a per-CPU batch first.
fn classify(head_flags: u64, contiguous_tail: bool) -> FrameFolio {
    if head_flags & KPF_COMPOUND_HEAD == 0 || !contiguous_tail {
        FrameFolio::Small
    } else if head_flags & KPF_HUGE != 0 {
        FrameFolio::Hugetlb
    } else {
        FrameFolio::Thp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_aligned_compound_head_with_its_tail_is_a_2m_folio() {
        let head = KPF_COMPOUND_HEAD;
        assert_eq!(classify(head | KPF_HUGE, true), FrameFolio::Hugetlb);
        assert_eq!(classify(head | KPF_THP, true), FrameFolio::Thp);
        assert_eq!(classify(head | KPF_THP, false), FrameFolio::Small);
        assert_eq!(classify(KPF_THP, true), FrameFolio::Small);
        assert_eq!(classify(head, true), FrameFolio::Thp, "off the LRU for now");
    }
}
