//! Per-frame host truth: which 2M frames of a range the host maps with one
//! PMD (a hugetlb page or a PMD-mapped THP), via the `PAGEMAP_SCAN` ioctl of
//! `/proc/self/pagemap` (Linux 6.7+), whose `PAGE_IS_HUGE` category is set
//! exactly for PMD-level (and hugetlb) mappings. Older kernels: the 2M
//! folios of [`crate::kpageflags`], trusted only when their count equals
//! what smaps says is PMD-mapped in the range.

use crate::error::GuestMemError;
use crate::kpageflags::{self, FrameFolio};
use crate::{smaps, vma_probe, HPAGE_SIZE};

const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_HUGE: u64 = 1 << 6;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// The ioctl numbers, encoded by vmm-sys-util (a private module: the macro
/// makes public functions without docs).
mod nr {
    use super::PmScanArg;
    // `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)` (include/uapi/linux/fs.h).
    vmm_sys_util::ioctl_iowr_nr!(PAGEMAP_SCAN, 0x66, 16, PmScanArg);
}
use nr::PAGEMAP_SCAN;

const PAGEMAP: &str = "/proc/self/pagemap";

/// For each 2M frame of `[start, start + frames * 2M)` (2M aligned), whether the
/// host maps it with a PMD. `Ok(None)` when the host cannot tell: no
/// `PAGEMAP_SCAN`, and the fallback of [`pmd_mapped_by_folio`] is unavailable
/// or disagrees with smaps.
pub fn pmd_mapped_frames(start: u64, frames: usize) -> Result<Option<Vec<bool>>, GuestMemError> {
    match scan_pmd_mapped(start, frames)? {
        Some(v) => Ok(Some(v)),
        None => pmd_mapped_by_folio(start, frames),
    }
}

/// Kernels without `PAGEMAP_SCAN`: a frame is PMD-mapped when it is one
/// present 2M folio ([`kpageflags::frame_folios`]), checked against smaps'
/// `*_Hugetlb` and `*PmdMapped` totals over the range's VMAs. A THP can also
/// be mapped with PTEs: when the THP count exceeds smaps' PMD total, each
/// THP frame is asked about alone ([`vma_probe`]). `Ok(None)` when the
/// sources still disagree.
pub fn pmd_mapped_by_folio(start: u64, frames: usize) -> Result<Option<Vec<bool>>, GuestMemError> {
    let Some(folios) = kpageflags::frame_folios(start, frames)? else {
        return Ok(None);
    };
    let end = start + frames as u64 * HPAGE_SIZE;
    let t = smaps::sum(&smaps::read_vmas(start, end)?);
    let bytes = |k: FrameFolio| folios.iter().filter(|f| **f == k).count() as u64 * HPAGE_SIZE;
    let thp_pmd = t.shmem_pmd_mapped + t.file_pmd_mapped + t.anon_huge_pages;
    if bytes(FrameFolio::Hugetlb) != t.hugetlb() {
        log::debug!(
            "hugetlb 2M folios ({} B) and smaps hugetlb ({} B) disagree: per-frame truth unknown",
            bytes(FrameFolio::Hugetlb),
            t.hugetlb()
        );
        return Ok(None);
    }
    let mut out: Vec<bool> = folios
        .iter()
        .map(|f| matches!(f, FrameFolio::Hugetlb | FrameFolio::Thp))
        .collect();
    if bytes(FrameFolio::Thp) != thp_pmd {
        // Some THP is mapped with PTEs (KVM maps it 4K): ask smaps about
        // each THP frame alone.
        for (f, folio) in folios.iter().enumerate() {
            if *folio == FrameFolio::Thp {
                out[f] = vma_probe::frame_pmd_mapped(start + f as u64 * HPAGE_SIZE)?;
            }
        }
        let found = out
            .iter()
            .zip(&folios)
            .filter(|(pmd, f)| **pmd && **f == FrameFolio::Thp)
            .count() as u64;
        if found * HPAGE_SIZE != thp_pmd {
            log::debug!(
                "THP frames smaps calls PMD-mapped one by one ({found}) and in total ({thp_pmd} B) \
                 disagree: per-frame truth unknown"
            );
            return Ok(None);
        }
    }
    Ok(Some(out))
}

/// The `PAGEMAP_SCAN` answer, `Ok(None)` when the kernel lacks the ioctl.
fn scan_pmd_mapped(start: u64, frames: usize) -> Result<Option<Vec<bool>>, GuestMemError> {
    let f = std::fs::File::open(PAGEMAP).map_err(|source| GuestMemError::HostRead {
        path: PAGEMAP.into(),
        source,
    })?;
    let end = start + frames as u64 * HPAGE_SIZE;
    let mut out = vec![false; frames];
    let mut vec = vec![PageRegion::default(); 512];
    let mut cur = start;
    while cur < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: cur,
            end,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            category_anyof_mask: PAGE_IS_HUGE,
            return_mask: PAGE_IS_HUGE | PAGE_IS_PRESENT,
            ..PmScanArg::default()
        };
        // SAFETY: `f` is our open /proc/self/pagemap; `arg` is a valid
        // pm_scan_arg (its `size` field is its own size) whose `vec` points at
        // `vec.len()` writable page_region entries that outlive the call.
        let n = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&f, PAGEMAP_SCAN(), &mut arg) };
        if n < 0 {
            let e = GuestMemError::last_os();
            if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) {
                return Ok(None);
            }
            return Err(GuestMemError::HostRead {
                path: format!("{PAGEMAP} (PAGEMAP_SCAN)"),
                source: e,
            });
        }
        for r in &vec[..n as usize] {
            // A hugetlb VMA reports PAGE_IS_HUGE for its holes too (a page
            // punched out of the pool and not touched since): not mapped.
            if r.categories & PAGE_IS_HUGE == 0 || r.categories & PAGE_IS_PRESENT == 0 {
                continue;
            }
            // Mark every frame this huge run covers entirely.
            let mut a = r.start.max(start);
            while a + HPAGE_SIZE <= r.end.min(end) {
                if (a - start).is_multiple_of(HPAGE_SIZE) {
                    out[((a - start) / HPAGE_SIZE) as usize] = true;
                    a += HPAGE_SIZE;
                } else {
                    a = start + (a - start).div_ceil(HPAGE_SIZE) * HPAGE_SIZE;
                }
            }
        }
        if arg.walk_end <= cur {
            break;
        }
        cur = arg.walk_end;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_the_uapi() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(PAGEMAP_SCAN(), 0xc060_6610);
    }

    #[test]
    fn small_anonymous_pages_are_not_pmd_mapped() {
        let r = crate::mapping::HostRange::reserve(2 * HPAGE_SIZE).unwrap();
        r.map_zero(0, 2 * HPAGE_SIZE).unwrap();
        // SAFETY: the range is mapped read-write above.
        unsafe { r.ptr(0).write_bytes(1, 8192) };
        if let Some(v) = pmd_mapped_frames(r.base(), 2).unwrap() {
            assert_eq!(v, vec![false, false]);
        } else {
            eprintln!("skip: kernel lacks PAGEMAP_SCAN");
        }
    }
}
