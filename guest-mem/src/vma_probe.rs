//! Ask smaps about one 2M frame alone. smaps sums per VMA; to learn whether
//! the host maps one frame with a PMD, the frame is given a VMA of its own
//! for a moment: `madvise(MADV_DONTDUMP)` over exactly that frame splits
//! the VMA at its 2M-aligned edges, smaps of the new VMA is read, and
//! `MADV_DODUMP` merges it back (the other way round when the VMA had
//! `VM_DONTDUMP`). A VM-flag change at PMD-aligned edges touches no page
//! table entry and fires no mmu notifier (`madvise_update_vma`,
//! mm/madvise.c), so KVM's mappings stay as they are.
//! Used only where `PAGEMAP_SCAN` (Linux 6.7+) is missing.

use rustix::mm::Advice;

use crate::error::GuestMemError;
use crate::mapping::madvise_raw;
use crate::{smaps, HPAGE_SIZE};

fn advise(addr: u64, advice: (Advice, &'static str)) -> Result<(), GuestMemError> {
    madvise_raw(addr as usize, HPAGE_SIZE as usize, advice.0, advice.1)
}

/// Whether smaps counts the frame at host address `addr` (2M aligned, inside
/// a shmem mapping of this process) as PMD-mapped.
pub fn frame_pmd_mapped(addr: u64) -> Result<bool, GuestMemError> {
    let end = addr + HPAGE_SIZE;
    let had_dd = smaps::read_vmas(0, u64::MAX)?
        .iter()
        .any(|v| v.start <= addr && addr < v.end && v.dontdump);
    let (flip, back) = if had_dd {
        (
            (Advice::LinuxDoDump, "MADV_DODUMP"),
            (Advice::LinuxDontDump, "MADV_DONTDUMP"),
        )
    } else {
        (
            (Advice::LinuxDontDump, "MADV_DONTDUMP"),
            (Advice::LinuxDoDump, "MADV_DODUMP"),
        )
    };
    advise(addr, flip)?;
    let alone = smaps::read_vmas(addr, end);
    advise(addr, back)?;
    let vmas = alone?;
    let t = smaps::sum(&vmas);
    if t.vmas != 1 {
        return Err(GuestMemError::HostParse {
            path: "/proc/self/smaps".into(),
            detail: format!(
                "frame at {addr:#x} did not get a VMA of its own ({} VMAs inside it)",
                t.vmas
            ),
        });
    }
    Ok(t.shmem_pmd_mapped + t.file_pmd_mapped + t.anon_huge_pages == HPAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::HostRange;
    use crate::memfd::{Memfd, MemfdKind};

    /// One shmem THP seen through two mappings: at offset 0 (PMD-mapped) and
    /// at offset 4K (file and address out of step: PTEs only).
    #[test]
    fn a_pmd_mapped_and_a_pte_mapped_view_of_one_thp() {
        if crate::backing::check_shmem_thp(&Default::default()).is_err() {
            eprintln!("skip: shmem THP unavailable");
            return;
        }
        let fd = Memfd::create("vma-probe", MemfdKind::Shmem).unwrap();
        fd.set_len(2 * HPAGE_SIZE).unwrap();
        let r = HostRange::reserve(2 * HPAGE_SIZE).unwrap();
        r.map_file(0, HPAGE_SIZE, &fd, 0, "view at 0").unwrap();
        r.madvise(0, HPAGE_SIZE, Advice::LinuxHugepage, "MADV_HUGEPAGE")
            .unwrap();
        r.map_file(HPAGE_SIZE, HPAGE_SIZE, &fd, 4096, "view at 4K")
            .unwrap();
        // SAFETY: both views are mapped read-write above.
        unsafe {
            r.ptr(0).write_bytes(1, HPAGE_SIZE as usize);
            r.ptr(HPAGE_SIZE).write_bytes(2, 4096);
        }
        let Some(scan) = crate::pagemap::pmd_mapped_frames(r.base(), 1).unwrap() else {
            eprintln!("skip: no host truth to compare with");
            return;
        };
        if !scan[0] {
            eprintln!("skip: the kernel gave no THP");
            return;
        }
        let vmas = smaps::read_vmas(r.base(), r.base() + 2 * HPAGE_SIZE)
            .unwrap()
            .len();
        assert!(frame_pmd_mapped(r.base()).unwrap());
        assert!(!frame_pmd_mapped(r.base() + HPAGE_SIZE).unwrap());
        let after = smaps::read_vmas(r.base(), r.base() + 2 * HPAGE_SIZE).unwrap();
        assert_eq!(
            after.len(),
            vmas,
            "the probe leaves the VMAs as it found them"
        );
        assert!(after.iter().all(|v| !v.dontdump));
    }
}
