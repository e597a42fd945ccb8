//! `HostMem`: the memfds and the host range of guest RAM, and the primitive
//! operations on real memory that `guest_ram` composes from the model's plans.
//!
//! Layout per backing:
//! * `hugetlb`: `pool` is the hugetlb memfd (slot `s` at `s * 2M`), `data` the
//!   small-page memfd (slot `s` at `s * 4K`). A frame maps either one pool
//!   slot, or small slots and anonymous zero pages (never-populated or
//!   discarded pages, so that no page of a freed slot stays reachable).
//! * `thp` / `4k`: `data` is the RAM memfd mapped once over the whole range,
//!   file offset = guest-physical address. Unpopulated pages are holes.

use std::os::fd::AsRawFd;

use crate::backing::Backing;
use crate::error::GuestMemError;
use crate::mapping::{HostRange, TempMap};
use crate::memfd::{Memfd, MemfdKind};
use crate::{HPAGE_SIZE, PAGE_SIZE};

/// The memfds and the host range, with per-frame primitives.
#[derive(Debug)]
pub(crate) struct HostMem {
    backing: Backing,
    // Field order matters for Drop: mappings go before the files.
    window: Option<TempMap>,
    range: HostRange,
    pool: Option<Memfd>,
    data: Memfd,
    data_len: u64,
}

/// Runs of consecutive `(page index, slot)` pairs: `(first page, first slot, count)`.
pub(crate) fn slot_runs(pages: &[(u16, u32)]) -> Vec<(u16, u32, u32)> {
    let mut sorted: Vec<(u16, u32)> = pages.to_vec();
    sorted.sort_unstable();
    let mut runs: Vec<(u16, u32, u32)> = Vec::new();
    for (p, s) in sorted {
        if let Some(last) = runs.last_mut() {
            if u32::from(last.0) + last.2 == u32::from(p) && last.1 + last.2 == s {
                last.2 += 1;
                continue;
            }
        }
        runs.push((p, s, 1));
    }
    runs
}

/// Runs of consecutive page indices: `(first, count)`.
pub(crate) fn page_runs(pages: &[u16]) -> Vec<(u16, u32)> {
    let mut sorted = pages.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(u16, u32)> = Vec::new();
    for p in sorted {
        if let Some(last) = runs.last_mut() {
            if u32::from(last.0) + last.1 == u32::from(p) {
                last.1 += 1;
                continue;
            }
        }
        runs.push((p, 1));
    }
    runs
}

fn frame_off(frame: usize) -> u64 {
    frame as u64 * HPAGE_SIZE
}

fn page_off(frame: usize, page: u16) -> u64 {
    frame_off(frame) + u64::from(page) * PAGE_SIZE
}

impl HostMem {
    /// Create the memfds and reserve the range. Nothing is populated yet.
    pub(crate) fn new(
        backing: Backing,
        size: u64,
        pool_slots: usize,
    ) -> Result<Self, GuestMemError> {
        let range = HostRange::reserve(size)?;
        let (pool, data, data_len) = match backing {
            Backing::Hugetlb => {
                let pool = Memfd::create("guest-ram-hugetlb-pool", MemfdKind::Hugetlb2M)?;
                pool.set_len(pool_slots as u64 * HPAGE_SIZE)?;
                let small = Memfd::create("guest-ram-small", MemfdKind::Shmem)?;
                small.set_len(size)?;
                range.map_zero(0, size)?;
                (Some(pool), small, size)
            }
            Backing::Thp | Backing::Small4k => {
                let data = Memfd::create(
                    if backing == Backing::Thp {
                        "guest-ram-thp"
                    } else {
                        "guest-ram-4k"
                    },
                    MemfdKind::Shmem,
                )?;
                data.set_len(size)?;
                range.map_file(0, size, &data, 0, "guest RAM memfd")?;
                if backing == Backing::Thp {
                    range.madvise(0, size, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")?;
                } else {
                    range.madvise(0, size, libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")?;
                }
                (None, data, size)
            }
        };
        Ok(Self {
            backing,
            window: None,
            range,
            pool,
            data,
            data_len,
        })
    }

    /// Keep the host range mapped (with zero pages) after drop.
    pub(crate) fn leak_range(&mut self) {
        self.range.leak();
    }

    pub(crate) fn range(&self) -> &HostRange {
        &self.range
    }

    /// Bytes of the hugetlb pool memfd and of the data memfd backed by memory now.
    pub(crate) fn allocated_bytes(&self) -> Result<(u64, u64), GuestMemError> {
        let pool = match &self.pool {
            Some(p) => p.allocated_bytes()?,
            None => 0,
        };
        Ok((pool, self.data.allocated_bytes()?))
    }

    fn pool(&self) -> &Memfd {
        // Only called on the hugetlb paths, where `new` created the pool.
        self.pool.as_ref().unwrap_or(&self.data)
    }

    fn populate(&self, off: u64, len: u64) -> Result<(), GuestMemError> {
        self.range
            .madvise(off, len, libc::MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE")
    }

    // ---- hugetlb primitives ----

    /// Take huge slot `slot` from the host pool (ENOSPC: the host ran out).
    pub(crate) fn huge_alloc(&self, slot: u32) -> Result<(), GuestMemError> {
        self.pool()
            .allocate(u64::from(slot) * HPAGE_SIZE, HPAGE_SIZE)
            .map_err(|source| {
                if source.raw_os_error() == Some(libc::ENOSPC) {
                    GuestMemError::HostPoolExhausted { slot, source }
                } else {
                    GuestMemError::Fallocate {
                        what: "hugetlb memfd, allocate",
                        offset: u64::from(slot) * HPAGE_SIZE,
                        len: HPAGE_SIZE,
                        source,
                    }
                }
            })
    }

    /// Map the allocated huge slot over `frame` and fault it in (one PMD).
    pub(crate) fn huge_map(&self, frame: usize, slot: u32) -> Result<(), GuestMemError> {
        self.range.map_file(
            frame_off(frame),
            HPAGE_SIZE,
            self.pool(),
            u64::from(slot) * HPAGE_SIZE,
            "hugetlb pool slot",
        )?;
        self.populate(frame_off(frame), HPAGE_SIZE)
    }

    /// Map huge slot `slot` over `frame` without touching it: the slot is a
    /// hole of the pool memfd, so the guest's next access faults in a fresh,
    /// zeroed huge page there (one PMD).
    pub(crate) fn huge_map_lazy(&self, frame: usize, slot: u32) -> Result<(), GuestMemError> {
        self.range.map_file(
            frame_off(frame),
            HPAGE_SIZE,
            self.pool(),
            u64::from(slot) * HPAGE_SIZE,
            "hugetlb pool slot (lazy)",
        )
    }

    /// Fault the whole of `frame` in as it is mapped now (`MADV_POPULATE_WRITE`).
    pub(crate) fn populate_frame(&self, frame: usize) -> Result<(), GuestMemError> {
        self.populate(frame_off(frame), HPAGE_SIZE)
    }

    /// Write zeros over pages of `frame` in place (they stay backed).
    pub(crate) fn zero_in_place(&self, frame: usize, pages: &[u16]) {
        for (p, n) in page_runs(pages) {
            // SAFETY: the pages lie inside guest RAM (frame < frames, page <
            // 512), which stays mapped read-write for the life of `range`;
            // the guest gave them back, so no vCPU relies on their contents.
            unsafe {
                std::ptr::write_bytes(
                    self.range.ptr(page_off(frame, p)),
                    0,
                    (u64::from(n) * PAGE_SIZE) as usize,
                )
            };
        }
    }

    /// Return huge slot `slot` to the host pool.
    pub(crate) fn huge_free(&self, slot: u32) -> Result<(), GuestMemError> {
        self.pool()
            .punch_hole(u64::from(slot) * HPAGE_SIZE, HPAGE_SIZE)
    }

    fn ensure_data_len(&mut self, slot_end: u64) -> Result<(), GuestMemError> {
        let need = slot_end * PAGE_SIZE;
        if need > self.data_len {
            let len = need.max(self.data_len * 2);
            self.data.set_len(len)?;
            self.data_len = len;
            self.window = None;
        }
        Ok(())
    }

    fn window(&mut self) -> Result<&TempMap, GuestMemError> {
        if self.window.is_none() {
            let w = TempMap::new(&self.data, 0, self.data_len, "small-page copy window")?;
            self.window = Some(w);
        }
        // Just set above when it was missing.
        self.window.as_ref().ok_or(GuestMemError::Mmap {
            what: "small-page copy window",
            addr: 0,
            len: self.data_len,
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        })
    }

    /// Copy pages of `frame` (as mapped now) into small slots: `(page, slot)`.
    pub(crate) fn copy_to_small(
        &mut self,
        frame: usize,
        pages: &[(u16, u32)],
    ) -> Result<(), GuestMemError> {
        let Some(max) = pages.iter().map(|p| p.1).max() else {
            return Ok(());
        };
        self.ensure_data_len(u64::from(max) + 1)?;
        let src_base = self.range.ptr(frame_off(frame));
        let w = self.window()?;
        for &(p, s) in pages {
            let src_off = u64::from(p) * PAGE_SIZE;
            let dst_off = u64::from(s) * PAGE_SIZE;
            if src_off + PAGE_SIZE > HPAGE_SIZE || dst_off + PAGE_SIZE > w.len() as u64 {
                continue;
            }
            // SAFETY: the source is a mapped, readable page of our guest range
            // (inside the frame); the destination lies inside the window (checked
            // above); the two mappings are distinct so the regions don't overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src_base.add(src_off as usize),
                    w.ptr().add(dst_off as usize),
                    PAGE_SIZE as usize,
                );
            }
        }
        let min = pages.iter().map(|p| p.1).min().unwrap_or(0);
        let lo = u64::from(min) * PAGE_SIZE;
        let hi = (u64::from(max) + 1) * PAGE_SIZE;
        // The window's PTEs are not needed any more; the file keeps the pages.
        w.drop_ptes(lo as usize, (hi - lo) as usize)
    }

    /// Map small slots over pages of `frame`: `(page, slot)`, one mmap per run.
    pub(crate) fn small_map(
        &mut self,
        frame: usize,
        pages: &[(u16, u32)],
        populate: bool,
    ) -> Result<(), GuestMemError> {
        if let Some(max) = pages.iter().map(|p| p.1).max() {
            self.ensure_data_len(u64::from(max) + 1)?;
        }
        for (p, s, n) in slot_runs(pages) {
            let off = page_off(frame, p);
            let len = u64::from(n) * PAGE_SIZE;
            self.range.map_file(
                off,
                len,
                &self.data,
                u64::from(s) * PAGE_SIZE,
                "small-page slots",
            )?;
            if populate {
                self.populate(off, len)?;
            }
        }
        if !pages.is_empty() {
            // Small slots never form shmem THPs (the frame holds only small
            // slots and anonymous zero pages here, so one call covers it).
            self.frame_hugepage_advice(frame, false)?;
        }
        Ok(())
    }

    /// Map anonymous zero pages over pages of `frame`.
    pub(crate) fn zero_map(&self, frame: usize, pages: &[u16]) -> Result<(), GuestMemError> {
        for (p, n) in page_runs(pages) {
            self.range
                .map_zero(page_off(frame, p), u64::from(n) * PAGE_SIZE)?;
        }
        Ok(())
    }

    /// Free small slots (punch them out of the small memfd).
    pub(crate) fn small_free(&self, slots: &[u32]) -> Result<(), GuestMemError> {
        let mut s = slots.to_vec();
        s.sort_unstable();
        let mut i = 0;
        while i < s.len() {
            let mut j = i + 1;
            while j < s.len() && s[j] == s[j - 1] + 1 {
                j += 1;
            }
            self.data
                .punch_hole(u64::from(s[i]) * PAGE_SIZE, (j - i) as u64 * PAGE_SIZE)?;
            i = j;
        }
        Ok(())
    }

    /// Copy the listed pages of `frame` (as mapped now) into the allocated huge
    /// slot `slot`; the other pages of the slot stay zero.
    pub(crate) fn copy_to_huge(
        &self,
        frame: usize,
        slot: u32,
        pages: &[u16],
    ) -> Result<(), GuestMemError> {
        if pages.is_empty() {
            return Ok(());
        }
        let t = TempMap::new(
            self.pool(),
            u64::from(slot) * HPAGE_SIZE,
            HPAGE_SIZE,
            "hugetlb staging map",
        )?;
        let src_base = self.range.ptr(frame_off(frame));
        for &p in pages {
            let off = u64::from(p) * PAGE_SIZE;
            if off + PAGE_SIZE > HPAGE_SIZE {
                continue;
            }
            // SAFETY: the source is a mapped page inside `frame` of our range;
            // the destination lies inside the 2M staging map; distinct mappings.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src_base.add(off as usize),
                    t.ptr().add(off as usize),
                    PAGE_SIZE as usize,
                );
            }
        }
        Ok(())
    }

    // ---- thp / 4k primitives (file offset = guest-physical address) ----

    /// Fault in pages `[first, first + n)` of `frame` from the RAM memfd.
    pub(crate) fn file_populate(
        &self,
        frame: usize,
        first: u16,
        n: u32,
    ) -> Result<(), GuestMemError> {
        self.populate(page_off(frame, first), u64::from(n) * PAGE_SIZE)
    }

    /// Punch the listed pages of `frame` out of the RAM memfd (the kernel
    /// splits a huge folio it cuts into).
    pub(crate) fn file_punch(&self, frame: usize, pages: &[u16]) -> Result<(), GuestMemError> {
        for (p, n) in page_runs(pages) {
            self.data
                .punch_hole(page_off(frame, p), u64::from(n) * PAGE_SIZE)?;
        }
        Ok(())
    }

    /// Free `pages` of a shmem `frame` that may lie in a large folio: punch,
    /// then check with `SEEK_DATA` that they are gone. Punching part of a
    /// large folio splits it (`truncate_inode_partial_folio`); when the split
    /// fails on a transient extra reference the kernel only zeroes the range
    /// and the pages stay allocated, so the punch is retried (after a short,
    /// growing wait) until they are freed. Returns how many of `pages` are
    /// still allocated after the last try (zeroed: nothing is lost).
    pub(crate) fn file_punch_freed(
        &self,
        frame: usize,
        pages: &[u16],
    ) -> Result<usize, GuestMemError> {
        const TRIES: u32 = 8;
        self.file_punch(frame, pages)?;
        let mut left = self.still_allocated(frame, pages)?;
        let mut wait = std::time::Duration::from_micros(200);
        for attempt in 1..TRIES {
            if left.is_empty() {
                break;
            }
            log::debug!(
                "frame {frame}: {} punched page(s) still allocated (folio split failed), retry {attempt}",
                left.len()
            );
            std::thread::sleep(wait);
            wait *= 2;
            self.file_punch(frame, &left)?;
            left = self.still_allocated(frame, &left)?;
        }
        if !left.is_empty() {
            log::warn!(
                "frame {frame}: {} given-back page(s) stay allocated (zeroed): the kernel could not split the shmem huge page",
                left.len()
            );
        }
        Ok(left.len())
    }

    /// The pages of `pages` that the RAM memfd still holds data for.
    fn still_allocated(&self, frame: usize, pages: &[u16]) -> Result<Vec<u16>, GuestMemError> {
        let runs = self.data_runs(frame)?;
        Ok(pages
            .iter()
            .copied()
            .filter(|&p| {
                runs.iter()
                    .any(|&(s, n)| u32::from(p) >= u32::from(s) && u32::from(p) < u32::from(s) + n)
            })
            .collect())
    }

    /// Runs of pages of `frame` the RAM memfd holds data for (`SEEK_DATA` /
    /// `SEEK_HOLE`): `(first page, count)`.
    pub(crate) fn data_runs(&self, frame: usize) -> Result<Vec<(u16, u32)>, GuestMemError> {
        let start = frame_off(frame) as libc::off_t;
        let end = start + HPAGE_SIZE as libc::off_t;
        let fd = self.data.as_raw_fd();
        let mut runs = Vec::new();
        let mut pos = start;
        while pos < end {
            // SAFETY: lseek on our own fd; no memory is touched.
            let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if d < 0 || d >= end {
                let e = GuestMemError::last_os();
                if d < 0 && e.raw_os_error() != Some(libc::ENXIO) {
                    return Err(GuestMemError::HostRead {
                        path: format!("memfd {} (SEEK_DATA)", self.data.name()),
                        source: e,
                    });
                }
                break;
            }
            // SAFETY: as above.
            let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) }.min(end);
            if h <= d {
                break;
            }
            let first = ((d - start) as u64 / PAGE_SIZE) as u16;
            let n = ((h - d) as u64).div_ceil(PAGE_SIZE) as u32;
            runs.push((first, n));
            pos = h;
        }
        Ok(runs)
    }

    /// Map again every page of `frame` the RAM memfd still holds: a punch
    /// that splits a large folio unmaps the parts it keeps.
    pub(crate) fn remap_present(&self, frame: usize) -> Result<(), GuestMemError> {
        for (p, n) in self.data_runs(frame)? {
            self.file_populate(frame, p, n)?;
        }
        Ok(())
    }

    /// `MADV_HUGEPAGE` / `MADV_NOHUGEPAGE` on one frame.
    pub(crate) fn frame_hugepage_advice(
        &self,
        frame: usize,
        huge: bool,
    ) -> Result<(), GuestMemError> {
        let (a, n) = if huge {
            (libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")
        } else {
            (libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")
        };
        self.range.madvise(frame_off(frame), HPAGE_SIZE, a, n)
    }

    /// Split a shmem THP in place while keeping every byte: punch one page
    /// (the kernel splits the folio), then write its saved content back (the
    /// refault takes a small page). `hole` names a page already not present,
    /// whose punch loses nothing. The caller has the vCPUs paused.
    pub(crate) fn thp_split(&self, frame: usize, hole: Option<u16>) -> Result<(), GuestMemError> {
        if let Some(p) = hole {
            return self.file_punch(frame, &[p]);
        }
        let mut saved = vec![0u8; PAGE_SIZE as usize];
        let ptr = self.range.ptr(frame_off(frame));
        // SAFETY: page 0 of the frame is mapped and readable; `saved` has 4K.
        unsafe { std::ptr::copy_nonoverlapping(ptr, saved.as_mut_ptr(), saved.len()) };
        self.file_punch(frame, &[0])?;
        // SAFETY: page 0 of the frame is still mapped (the memfd, now with a
        // hole there); writing refaults a fresh small page.
        unsafe { std::ptr::copy_nonoverlapping(saved.as_ptr(), ptr, saved.len()) };
        Ok(())
    }

    /// Ask the kernel to collapse `frame` into a huge page (`MADV_COLLAPSE`).
    pub(crate) fn thp_collapse(&self, frame: usize) -> Result<(), GuestMemError> {
        self.frame_hugepage_advice(frame, true)?;
        let addr = self.range.base() + frame_off(frame);
        loop {
            // SAFETY: madvise on one frame of our own mapping; MADV_COLLAPSE
            // keeps contents and mappings valid.
            let r = unsafe {
                libc::madvise(
                    addr as *mut libc::c_void,
                    HPAGE_SIZE as usize,
                    libc::MADV_COLLAPSE,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = GuestMemError::last_os();
            let hint = match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => "EAGAIN: the pages were busy or a transient allocation failed; retry later",
                Some(libc::EINVAL) => "EINVAL: this kernel cannot collapse shmem with MADV_COLLAPSE (needs Linux 6.1+ with CONFIG_TRANSPARENT_HUGEPAGE)",
                Some(libc::ENOMEM) => "ENOMEM: no free 2M page for the collapse; free memory or compact and retry",
                Some(libc::EBUSY) => "EBUSY: memcg charge failed or pages pinned",
                _ => "the kernel refused the collapse",
            };
            return Err(GuestMemError::CollapseFailed {
                frame,
                source: e,
                hint,
            });
        }
    }

    /// Read `buf.len()` bytes at host offset `off` without faulting anything in:
    /// the RAM memfd for `thp` / `4k` (holes read zero), the mapping for
    /// `hugetlb` (whose unbacked pages are anonymous zero pages).
    pub(crate) fn read_no_populate(&self, off: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        match self.backing {
            Backing::Hugetlb => {
                // SAFETY: the caller checked [off, off + len) lies inside guest
                // RAM, all of which is mapped readable.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.range.ptr(off), buf.as_mut_ptr(), buf.len())
                };
                Ok(())
            }
            Backing::Thp | Backing::Small4k => {
                let mut done = 0usize;
                while done < buf.len() {
                    // SAFETY: pread into the unfilled tail of `buf`.
                    let r = unsafe {
                        libc::pread(
                            self.data.as_raw_fd(),
                            buf[done..].as_mut_ptr() as *mut libc::c_void,
                            buf.len() - done,
                            (off + done as u64) as libc::off_t,
                        )
                    };
                    if r <= 0 {
                        let e = GuestMemError::last_os();
                        if r < 0 && e.raw_os_error() == Some(libc::EINTR) {
                            continue;
                        }
                        return Err(GuestMemError::HostRead {
                            path: format!("memfd {}", self.data.name()),
                            source: e,
                        });
                    }
                    done += r as usize;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_consecutive_pages_and_slots() {
        assert_eq!(
            slot_runs(&[(2, 10), (0, 8), (1, 9), (4, 11), (5, 12)]),
            vec![(0, 8, 3), (4, 11, 2)]
        );
        assert_eq!(page_runs(&[5, 1, 2, 3, 7]), vec![(1, 3), (5, 1), (7, 1)]);
        assert!(slot_runs(&[]).is_empty());
    }
}
