//! Host actions on one frame of guest RAM that are not plans of the RAM
//! model: write protection, page-out and residency (the events `vmm stress`
//! fires from the host side). They go through [`GuestRam`] so the frame is
//! checked to be RAM and the host change is in the books: a frame whose
//! protection changed or whose pages were paged out is in
//! [`GuestRam::take_changed_frames`] (each fired the host's mmu notifier
//! over the frame), like a frame a discard or split remapped.
//!
//! `mprotect` never leaves a frame half protected: Linux applies a
//! protection change VMA by VMA, so a call that fails part way (`ENOMEM` at
//! a hole, for one) has already changed the start of the range; on failure
//! the original protection is put back on the whole range.

use std::ffi::c_void;

use rustix::io::Errno;
use rustix::mm::{self, Advice, MprotectFlags};

use crate::error::{GuestMemError, ProtectError};
use crate::guest_ram::GuestRam;
use crate::{HPAGE_SIZE, PAGES_PER_HPAGE};

const RW: MprotectFlags = MprotectFlags::READ.union(MprotectFlags::WRITE);

/// What a page-out of a frame did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageOut {
    /// The kernel took the advice (shmem pages unmapped; with no swap
    /// they stay resident).
    Done,
    /// The kernel refused the frame (why): hugetlb mappings cannot be
    /// paged out.
    Refused(String),
}

impl GuestRam {
    /// Make `frame` read-only on the host, run `hold` (the caller watches
    /// the vCPUs fault on it), then make it writable again. The frame is
    /// recorded as changed (the host zapped its secondary mappings).
    pub fn write_protect_frame<R>(
        &mut self,
        frame: usize,
        hold: impl FnOnce() -> R,
    ) -> Result<R, GuestMemError> {
        let addr = self.frame_host_addr(frame)?;
        // SAFETY: [addr, addr + 2M) is one RAM frame of guest RAM's host
        // range (checked above; 2M aligned, so hugetlb mappings accept it);
        // only the protection changes, and it is restored below (or by
        // `protect` itself on failure) before `&mut self` is released, so
        // nothing else of ours touches the mapping meanwhile. The vCPUs'
        // writes fault in KVM (EFAULT), which the caller waits out.
        unsafe { protect(addr, HPAGE_SIZE, MprotectFlags::READ, RW) }?;
        self.changed.insert(frame);
        let r = hold();
        // SAFETY: as above; this restores the original protection.
        unsafe { protect(addr, HPAGE_SIZE, RW, RW) }?;
        Ok(r)
    }

    /// How many 4K pages of `frame` are resident on the host (`mincore`).
    pub fn resident_pages(&self, frame: usize) -> Result<u64, GuestMemError> {
        let addr = self.frame_host_addr(frame)?;
        let mut vec = vec![0u8; PAGES_PER_HPAGE as usize];
        // rustix has no mincore: this call stays on libc.
        // SAFETY: [addr, addr + 2M) is a mapped RAM frame (checked above);
        // `vec` has one byte per 4K page of it, as mincore requires.
        let r = unsafe {
            libc::mincore(
                addr as *mut libc::c_void,
                HPAGE_SIZE as usize,
                vec.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(GuestMemError::Mincore {
                addr,
                source: GuestMemError::last_os(),
            });
        }
        Ok(vec.iter().filter(|b| **b & 1 != 0).count() as u64)
    }

    /// Advise the host to page `frame` out (`MADV_PAGEOUT`): its contents
    /// stay (shmem pages are written back or stay resident), its pages may
    /// be unmapped. A hugetlb frame is refused by the kernel
    /// ([`PageOut::Refused`]); a frame the kernel took is recorded as changed.
    pub fn page_out_frame(&mut self, frame: usize) -> Result<PageOut, GuestMemError> {
        let addr = self.frame_host_addr(frame)?;
        // SAFETY: MADV_PAGEOUT on one RAM frame of our own mapping (checked
        // above) keeps its contents; it may unmap pages, which the next
        // access faults back in.
        let r = unsafe {
            mm::madvise(
                addr as *mut c_void,
                HPAGE_SIZE as usize,
                Advice::LinuxPageOut,
            )
        };
        match r {
            Ok(()) => {
                self.changed.insert(frame);
                Ok(PageOut::Done)
            }
            Err(Errno::INVAL) => Ok(PageOut::Refused(
                "EINVAL (hugetlb mappings cannot be paged out)".into(),
            )),
            Err(e) => Err(GuestMemError::Madvise {
                advice: "MADV_PAGEOUT",
                addr,
                len: HPAGE_SIZE,
                source: e.into(),
            }),
        }
    }

    /// The host address of RAM frame `frame`.
    fn frame_host_addr(&self, frame: usize) -> Result<u64, GuestMemError> {
        let gpa = frame as u64 * HPAGE_SIZE;
        self.check_range(gpa, HPAGE_SIZE)?;
        Ok(self.host_addr() + gpa)
    }
}

fn prot_name(prot: MprotectFlags) -> &'static str {
    if prot == MprotectFlags::READ {
        "PROT_READ"
    } else if prot == RW {
        "PROT_READ|PROT_WRITE"
    } else if prot.is_empty() {
        "PROT_NONE"
    } else {
        "other"
    }
}

/// Set `prot` on `[addr, addr + len)`; if that fails, set `original` on the
/// whole range again before returning the error.
///
/// # Safety
/// `[addr, addr + len)` must be memory this process mapped and owns, and no
/// Rust reference to it may be used in a way the new protection forbids
/// while it is in force.
unsafe fn protect(
    addr: u64,
    len: u64,
    prot: MprotectFlags,
    original: MprotectFlags,
) -> Result<(), ProtectError> {
    let ptr = addr as *mut c_void;
    // SAFETY: the caller guarantees the range is ours (see above).
    let Err(source) = (unsafe { mm::mprotect(ptr, len as usize, prot) }) else {
        return Ok(());
    };
    // SAFETY: as above; this puts back the protection the range had.
    let restore = match unsafe { mm::mprotect(ptr, len as usize, original) } {
        Ok(()) => "; original protection restored".to_string(),
        Err(e) => format!(
            "; restoring {}: {} (the mapped parts were restored)",
            prot_name(original),
            std::io::Error::from(e)
        ),
    };
    Err(ProtectError {
        prot: prot_name(prot),
        addr,
        len,
        source: source.into(),
        restore,
    })
}

/// `/proc/self/maps` permissions, shared with the integration tests.
#[cfg(test)]
#[path = "../tests/common/maps.rs"]
mod test_maps;

#[cfg(test)]
mod tests {
    use super::*;

    use rustix::mm::{MapFlags, ProtFlags};

    const PAGE: usize = 4096;

    use super::test_maps::perms;

    /// A fresh private anonymous read-write mapping of `len` bytes.
    fn anon(len: usize) -> usize {
        // SAFETY: a new mapping at a kernel-chosen address; overlaps nothing.
        unsafe {
            mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .unwrap() as usize
    }

    #[test]
    fn partial_failure_restores_the_original_protection() {
        // Four pages with a hole at the third: mprotect over all four
        // changes the first two, then fails with ENOMEM at the hole.
        let base = anon(4 * PAGE);
        // SAFETY: the third page of the mapping just made; nothing refers to it.
        unsafe { mm::munmap((base + 2 * PAGE) as *mut c_void, PAGE) }.unwrap();
        assert_eq!(perms(base), "rw-p");
        // SAFETY: our own mapping; nothing reads or writes it meanwhile.
        let e =
            unsafe { protect(base as u64, 4 * PAGE as u64, MprotectFlags::READ, RW) }.unwrap_err();
        assert_eq!(
            e.source.raw_os_error(),
            Some(Errno::NOMEM.raw_os_error()),
            "{e}"
        );
        assert!(e.to_string().contains("mprotect(PROT_READ)"), "{e}");
        assert_eq!(perms(base), "rw-p", "the first pages stayed read-only");
        assert_eq!(perms(base + PAGE), "rw-p");
        // SAFETY: still mapped read-write (checked above); then unmapped.
        unsafe {
            *(base as *mut u8) = 7;
            mm::munmap(base as *mut c_void, 2 * PAGE).unwrap();
            mm::munmap((base + 3 * PAGE) as *mut c_void, PAGE).unwrap();
        }
    }

    #[test]
    fn success_changes_the_protection() {
        let p = anon(PAGE);
        // SAFETY: our own fresh mapping, which nothing else reads or writes;
        // unmapped at the end.
        unsafe {
            protect(p as u64, PAGE as u64, MprotectFlags::READ, RW).unwrap();
            assert_eq!(perms(p), "r--p");
            mm::munmap(p as *mut c_void, PAGE).unwrap();
        }
    }
}
