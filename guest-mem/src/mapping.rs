//! The 2M-aligned host range of guest RAM and the `MAP_FIXED` remaps inside it.
//!
//! The range is reserved once (`PROT_NONE`, anonymous), aligned to 2M, and
//! never moves: frames are switched by mapping over them with `MAP_FIXED`.

use std::ffi::c_void;
use std::os::fd::AsFd;

use rustix::io::{retry_on_intr, Errno};
use rustix::mm::{self, Advice, MapFlags, ProtFlags};

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
        source: Errno::OVERFLOW.into(),
    })
}

impl HostRange {
    /// Reserve `size` bytes (a multiple of 2M) at a 2M-aligned address.
    pub fn reserve(size: u64) -> Result<Self, GuestMemError> {
        Self::reserve_aligned(size, HPAGE_SIZE)
    }

    /// Reserve `size` bytes at an `align`-aligned address (`align` a power of
    /// two, at least 2M: 1G for 1G pages): map `size + align` of `PROT_NONE`
    /// anonymous memory, keep the aligned part, unmap the slack on both sides.
    pub fn reserve_aligned(size: u64, align: u64) -> Result<Self, GuestMemError> {
        let size = to_usize(size, "guest RAM reservation")?;
        let hp = to_usize(align.max(HPAGE_SIZE), "guest RAM alignment")?;
        let len = size.checked_add(hp).ok_or_else(|| GuestMemError::Mmap {
            what: "guest RAM reservation",
            addr: 0,
            len: size as u64,
            source: Errno::OVERFLOW.into(),
        })?;
        // SAFETY: a fresh anonymous PROT_NONE mapping at an address the kernel
        // picks; it overlaps nothing of ours.
        let p = unsafe {
            mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(mmap_error("guest RAM reservation", 0, len as u64))?;
        let start = p as usize;
        let base = (start + hp - 1) & !(hp - 1);
        let head = base - start;
        let tail = len - head - size;
        // SAFETY: both pieces lie inside the mapping just created and outside
        // [base, base + size), which we keep.
        unsafe {
            if head > 0 {
                let _ = mm::munmap(start as *mut c_void, head);
            }
            if tail > 0 {
                let _ = mm::munmap((base + size) as *mut c_void, tail);
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
                source: Errno::INVAL.into(),
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
        fd: &impl AsFd,
        file_off: u64,
        what: &'static str,
    ) -> Result<(), GuestMemError> {
        let (addr, l) = self.check(off, len, what)?;
        if i64::try_from(file_off).is_err() {
            return Err(GuestMemError::Mmap {
                what,
                addr: addr as u64,
                len,
                source: Errno::OVERFLOW.into(),
            });
        }
        // SAFETY: [addr, addr + l) lies inside our reserved range (checked), so
        // MAP_FIXED replaces only our own mappings; the fd is valid.
        unsafe {
            mm::mmap(
                addr as *mut c_void,
                l,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                fd,
                file_off,
            )
        }
        .map_err(mmap_error(what, addr as u64, len))?;
        Ok(())
    }

    /// Map private anonymous memory (reads as zero, allocates nothing until
    /// written) over `[off, off + len)`: the state of a page that is not backed
    /// by any memfd slot (never populated, or discarded).
    pub fn map_zero(&self, off: u64, len: u64) -> Result<(), GuestMemError> {
        let what = "anonymous zero pages";
        let (addr, l) = self.check(off, len, what)?;
        // SAFETY: [addr, addr + l) lies inside our reserved range (checked).
        unsafe {
            mm::mmap_anonymous(
                addr as *mut c_void,
                l,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
            )
        }
        .map_err(mmap_error(what, addr as u64, len))?;
        // Best effort: keep anonymous filler out of THP so the host view stays exact.
        self.madvise(off, len, Advice::LinuxNoHugepage, "MADV_NOHUGEPAGE")
    }

    /// `madvise(advice)` on `[off, off + len)` of the range.
    pub fn madvise(
        &self,
        off: u64,
        len: u64,
        advice: Advice,
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
    advice: Advice,
    name: &'static str,
) -> Result<(), GuestMemError> {
    retry_on_intr(|| {
        // SAFETY: madvise on memory we mapped; the advices used here never
        // unmap memory other code relies on.
        unsafe { mm::madvise(addr as *mut c_void, len, advice) }
    })
    .map_err(|e| GuestMemError::Madvise {
        advice: name,
        addr: addr as u64,
        len: len as u64,
        source: e.into(),
    })
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
            let _ = mm::munmap(self.base as *mut c_void, self.size);
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
        fd: &impl AsFd,
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
        if i64::try_from(file_off).is_err() {
            return Err(err(Errno::OVERFLOW.into()));
        }
        // SAFETY: a new shared mapping at a kernel-chosen address; overlaps nothing.
        let p = unsafe {
            mm::mmap(
                std::ptr::null_mut(),
                l,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::NORESERVE,
                fd,
                file_off,
            )
        }
        .map_err(mmap_error(what, 0, len))?;
        Ok(Self {
            addr: p as usize,
            len: l,
        })
    }

    /// Pointer to the first byte.
    pub fn ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Fault every page of the mapping in, writable (`MADV_POPULATE_WRITE`),
    /// so that a copy into it later takes no fault.
    pub fn populate(&self) -> Result<(), GuestMemError> {
        madvise_raw(
            self.addr,
            self.len,
            Advice::LinuxPopulateWrite,
            "MADV_POPULATE_WRITE (staging map)",
        )
    }

    /// [`Self::populate`] `chunk` bytes at a time: the process's mmap lock
    /// is taken for each chunk alone, so an `mmap` of another thread (a
    /// split's remap, under a write-hold) waits for one chunk at most
    /// instead of the whole mapping.
    pub fn populate_in_chunks(&self, chunk: usize) -> Result<(), GuestMemError> {
        let chunk = chunk.max(1);
        let mut off = 0;
        while off < self.len {
            let n = chunk.min(self.len - off);
            madvise_raw(
                self.addr + off,
                n,
                Advice::LinuxPopulateWrite,
                "MADV_POPULATE_WRITE (staging map)",
            )?;
            off += n;
        }
        Ok(())
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: kept for clippy's len rule).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for TempMap {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing borrows from it past its life.
        unsafe {
            let _ = mm::munmap(self.addr as *mut c_void, self.len);
        }
    }
}

/// A failed `mmap` as [`GuestMemError::Mmap`], with what was mapped where.
fn mmap_error(what: &'static str, addr: u64, len: u64) -> impl FnOnce(Errno) -> GuestMemError {
    move |e| GuestMemError::Mmap {
        what,
        addr,
        len,
        source: e.into(),
    }
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
