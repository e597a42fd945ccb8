//! The 2M-aligned host range of guest RAM and the `MAP_FIXED` remaps inside it.
//!
//! The range is reserved once (`PROT_NONE`, anonymous), aligned to 2M, and
//! never moves: frames are switched by mapping over them with `MAP_FIXED`.

use std::os::fd::AsRawFd;

use crate::HPAGE_SIZE;

use crate::error::GuestMemError;

/// The reserved, 2M-aligned host virtual range holding guest RAM.
///
/// Addresses are kept as integers so the owner is `Send + Sync`; every access
/// through them goes through the unsafe blocks of this module and of
/// `guest_ram`, which keep offsets inside `[0, size)`.
#[derive(Debug)]
pub struct HostRange {
    base: usize,
    size: usize,
    leak: bool,
}

fn to_usize(v: u64, what: &'static str) -> Result<usize, GuestMemError> {
    usize::try_from(v).map_err(|_| GuestMemError::Mmap {
        what,
        addr: 0,
        len: v,
        source: std::io::Error::from_raw_os_error(libc::EOVERFLOW),
    })
}

impl HostRange {
    /// Reserve `size` bytes (a multiple of 2M) at a 2M-aligned address:
    /// map `size + 2M` of `PROT_NONE` anonymous memory, keep the aligned part,
    /// unmap the slack on both sides.
    pub fn reserve(size: u64) -> Result<Self, GuestMemError> {
        let size = to_usize(size, "guest RAM reservation")?;
        let hp = HPAGE_SIZE as usize;
        let len = size.checked_add(hp).ok_or_else(|| GuestMemError::Mmap {
            what: "guest RAM reservation",
            addr: 0,
            len: size as u64,
            source: std::io::Error::from_raw_os_error(libc::EOVERFLOW),
        })?;
        // SAFETY: a fresh anonymous PROT_NONE mapping at an address the kernel
        // picks; it overlaps nothing of ours.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        let p = mapped(p, "guest RAM reservation", 0, len as u64)?;
        let start = p as usize;
        let base = (start + hp - 1) & !(hp - 1);
        let head = base - start;
        let tail = len - head - size;
        // SAFETY: both pieces lie inside the mapping just created and outside
        // [base, base + size), which we keep.
        unsafe {
            if head > 0 {
                libc::munmap(start as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((base + size) as *mut libc::c_void, tail);
            }
        }
        Ok(Self {
            base,
            size,
            leak: false,
        })
    }

    /// Host address of the first byte (2M aligned).
    pub fn base(&self) -> u64 {
        self.base as u64
    }

    /// Length in bytes.
    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// Raw pointer to offset `off` (caller keeps `off` inside the range).
    pub fn ptr(&self, off: u64) -> *mut u8 {
        (self.base + off as usize) as *mut u8
    }

    fn check(
        &self,
        off: u64,
        len: u64,
        what: &'static str,
    ) -> Result<(usize, usize), GuestMemError> {
        let inside = off
            .checked_add(len)
            .is_some_and(|end| end <= self.size as u64);
        if !inside || len == 0 {
            return Err(GuestMemError::Mmap {
                what,
                addr: self.base as u64 + off,
                len,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        Ok((self.base + off as usize, len as usize))
    }

    /// Map `fd` at `file_off` over `[off, off + len)` of the range, shared,
    /// read-write, `MAP_FIXED`.
    pub fn map_file(
        &self,
        off: u64,
        len: u64,
        fd: &impl AsRawFd,
        file_off: u64,
        what: &'static str,
    ) -> Result<(), GuestMemError> {
        let (addr, l) = self.check(off, len, what)?;
        let fo = libc::off_t::try_from(file_off).map_err(|_| GuestMemError::Mmap {
            what,
            addr: addr as u64,
            len,
            source: std::io::Error::from_raw_os_error(libc::EOVERFLOW),
        })?;
        // SAFETY: [addr, addr + l) lies inside our reserved range (checked), so
        // MAP_FIXED replaces only our own mappings; the fd is valid.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                l,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                fo,
            )
        };
        mapped(p, what, addr as u64, len)?;
        Ok(())
    }

    /// Map private anonymous memory (reads as zero, allocates nothing until
    /// written) over `[off, off + len)`: the state of a page that is not backed
    /// by any memfd slot (never populated, or discarded).
    pub fn map_zero(&self, off: u64, len: u64) -> Result<(), GuestMemError> {
        let what = "anonymous zero pages";
        let (addr, l) = self.check(off, len, what)?;
        // SAFETY: [addr, addr + l) lies inside our reserved range (checked).
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                l,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        mapped(p, what, addr as u64, len)?;
        // Best effort: keep anonymous filler out of THP so the host view stays exact.
        self.madvise(off, len, libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")
    }

    /// `madvise(advice)` on `[off, off + len)` of the range.
    pub fn madvise(
        &self,
        off: u64,
        len: u64,
        advice: libc::c_int,
        name: &'static str,
    ) -> Result<(), GuestMemError> {
        let (addr, l) = self.check(off, len, name)?;
        madvise_raw(addr, l, advice, name)
    }
}

/// `madvise` with EINTR/EAGAIN-free error reporting.
pub(crate) fn madvise_raw(
    addr: usize,
    len: usize,
    advice: libc::c_int,
    name: &'static str,
) -> Result<(), GuestMemError> {
    loop {
        // SAFETY: madvise on memory we mapped; the advices used here never
        // unmap memory other code relies on.
        let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
        if r == 0 {
            return Ok(());
        }
        let e = GuestMemError::last_os();
        if e.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return Err(GuestMemError::Madvise {
            advice: name,
            addr: addr as u64,
            len: len as u64,
            source: e,
        });
    }
}

impl HostRange {
    /// Keep the address range mapped after drop (vm-memory views still point
    /// into it): map zero pages over it so no memfd stays referenced.
    pub fn leak(&mut self) {
        if let Err(e) = self.map_zero(0, self.size as u64) {
            log::warn!("could not replace leaked guest RAM with zero pages: {e}");
        }
        self.leak = true;
    }
}

impl Drop for HostRange {
    fn drop(&mut self) {
        if self.leak {
            return;
        }
        // SAFETY: we own [base, base + size) and nothing refers to it any more
        // (the owner checks outstanding vm-memory views before dropping us).
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.size);
        }
    }
}

/// A temporary shared mapping of part of a memfd (a staging window for copies).
#[derive(Debug)]
pub struct TempMap {
    addr: usize,
    len: usize,
}

impl TempMap {
    /// Map `len` bytes of `fd` at `file_off`, shared, read-write, anywhere.
    pub fn new(
        fd: &impl AsRawFd,
        file_off: u64,
        len: u64,
        what: &'static str,
    ) -> Result<Self, GuestMemError> {
        let err = |source| GuestMemError::Mmap {
            what,
            addr: 0,
            len,
            source,
        };
        let l = to_usize(len, what)?;
        let fo = libc::off_t::try_from(file_off)
            .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
        // SAFETY: a new shared mapping at a kernel-chosen address; overlaps nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                l,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                fo,
            )
        };
        let p = mapped(p, what, 0, len)?;
        Ok(Self {
            addr: p as usize,
            len: l,
        })
    }

    /// Pointer to the first byte.
    pub fn ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: kept for clippy's len rule).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drop the page-table entries of `[off, off + len)` (the file keeps its pages).
    pub fn drop_ptes(&self, off: usize, len: usize) -> Result<(), GuestMemError> {
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            return Ok(());
        }
        madvise_raw(self.addr + off, len, libc::MADV_DONTNEED, "MADV_DONTNEED")
    }
}

impl Drop for TempMap {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing borrows from it past its life.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

/// `mmap`'s result: `MAP_FAILED` becomes [`GuestMemError::Mmap`] with the errno
/// (call it right after `mmap`, before anything else can change errno).
fn mapped(
    p: *mut libc::c_void,
    what: &'static str,
    addr: u64,
    len: u64,
) -> Result<*mut libc::c_void, GuestMemError> {
    if p == libc::MAP_FAILED {
        return Err(GuestMemError::Mmap {
            what,
            addr,
            len,
            source: GuestMemError::last_os(),
        });
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_2m_aligned_and_zero_filler_reads_zero() {
        let r = HostRange::reserve(4 * HPAGE_SIZE).unwrap();
        assert_eq!(r.base() % HPAGE_SIZE, 0);
        assert_eq!(r.size(), 4 * HPAGE_SIZE);
        r.map_zero(0, 4 * HPAGE_SIZE).unwrap();
        // SAFETY: the range is mapped read-write just above.
        unsafe {
            assert_eq!(*r.ptr(HPAGE_SIZE + 17), 0);
            *r.ptr(HPAGE_SIZE + 17) = 5;
            assert_eq!(*r.ptr(HPAGE_SIZE + 17), 5);
        }
    }

    #[test]
    fn out_of_range_map_is_refused() {
        let r = HostRange::reserve(HPAGE_SIZE).unwrap();
        let e = r.map_zero(HPAGE_SIZE, 4096).unwrap_err();
        assert!(e.to_string().contains("Invalid argument"), "{e}");
    }
}
