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

use std::collections::BTreeMap;

use rustix::fs::{self, SeekFrom};
use rustix::io::{retry_on_intr, Errno};
use rustix::mm::Advice;

use crate::backing::Backing;
use crate::error::GuestMemError;
use crate::mapping::{madvise_raw, HostRange, TempMap};
use crate::memfd::{Memfd, MemfdKind};
use crate::write_hold::WriteHold;
use crate::{GIG_SIZE, HPAGE_SIZE, PAGE_SIZE};

/// Staging mappings of finished splits kept for unmapping elsewhere.
const MAX_USED_STAGING: usize = 16;

/// The memfds and the host range, with per-frame primitives.
#[derive(Debug)]
pub(crate) struct HostMem {
    backing: Backing,
    // Field order matters for Drop: mappings go before the files.
    range: HostRange,
    pool: Option<Memfd>,
    /// `hugetlb-1g`: the 1G-page memfd (slot `s` at `s * 1G`).
    gig: Option<Memfd>,
    data: Memfd,
    data_len: u64,
    /// Split blocks (their base slots; set aside in the model) whose 512
    /// small slots are allocated in `data` ahead of the split that takes
    /// them, each with a mapping of its pages, faulted in, once the
    /// reserve's worker made one (`crate::split_reserve`; a block a
    /// collapse gave back has none at first).
    warm: BTreeMap<u32, Option<TempMap>>,
    /// Huge slots of the pool made warm ahead of a collapse
    /// (`crate::collapse_reserve`; set aside in the model): their page is
    /// allocated (zeroed by the kernel) and mapped, faulted in, for the
    /// collapse's copy.
    warm_huge: BTreeMap<u32, TempMap>,
    /// The warm block the split in progress copies into (base, mapping).
    staging: Option<(u32, TempMap)>,
    /// Staging mappings of finished splits, unmapped off the split's path
    /// by whoever takes them ([`Self::take_used_staging`]; at most
    /// `MAX_USED_STAGING` wait, older ones are unmapped in place).
    used_staging: Vec<TempMap>,
    /// Write-protects a frame while a split copies it (`hugetlb`, where
    /// the kernel can); `None`: the copy happens under the vCPU pause.
    hold: Option<WriteHold>,
    /// Tests: the next split or collapse switch fails (a host failure
    /// under the pause).
    #[cfg(test)]
    pub(crate) fail_switch: bool,
    /// Fault injection (a broken barrier): a split copies with the vCPUs
    /// running but without write-protecting the frame.
    pub(crate) copy_unheld: bool,
    /// Tests: runs right after a split's copy under the write-hold.
    #[cfg(test)]
    pub(crate) after_copy: Option<TestHook>,
}

/// A test's code run inside an operation.
#[cfg(test)]
pub(crate) struct TestHook(pub Box<dyn Fn() + Send>);

#[cfg(test)]
impl std::fmt::Debug for TestHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestHook")
    }
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

/// The small slot `base` when every `(page, slot)` pair is `(p, base + p)`:
/// the frame's small pages lie in page order in the small memfd, and one
/// mapping of `[base, base + 512)` replaces the frame's huge mapping at
/// once (the model places a split's pages so, see
/// `thp::pool::SmallPool::free_block`).
pub(crate) fn block_base(pages: &[(u16, u32)]) -> Option<u32> {
    let (p0, s0) = *pages.first()?;
    let base = s0.checked_sub(u32::from(p0))?;
    pages
        .iter()
        .all(|&(p, s)| s.checked_sub(u32::from(p)) == Some(base))
        .then_some(base)
}

/// The pages of a frame not in `pages` (ascending).
fn missing_pages(pages: &[(u16, u32)]) -> Vec<u16> {
    let mut kept = vec![false; crate::PAGES_PER_HPAGE as usize];
    for &(p, _) in pages {
        if let Some(k) = kept.get_mut(usize::from(p)) {
            *k = true;
        }
    }
    (0..crate::PAGES_PER_HPAGE as u16)
        .filter(|&p| !kept[usize::from(p)])
        .collect()
}

/// Every page index of a 2M frame.
pub(crate) fn all_pages() -> Vec<u16> {
    (0..crate::PAGES_PER_HPAGE as u16).collect()
}

/// `(page, slot)` pairs of a frame's small slots given in page order.
pub(crate) fn in_page_order(slots: &[u32]) -> Vec<(u16, u32)> {
    slots
        .iter()
        .enumerate()
        .map(|(i, s)| (i as u16, *s))
        .collect()
}

/// Runs of consecutive slots of `(page index, slot)` pairs, whatever their
/// pages: `(first slot, count)`.
fn slot_only_runs(pages: &[(u16, u32)]) -> Vec<(u32, u32)> {
    let mut slots: Vec<u32> = pages.iter().map(|p| p.1).collect();
    slots.sort_unstable();
    slots.dedup();
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for s in slots {
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += 1,
            _ => runs.push((s, 1)),
        }
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

/// Copies `(offset in the frame, offset in dst, len)` runs from one frame of
/// guest RAM at `frame` (its first byte) into the separate mapping `dst`;
/// a run reaching past the frame or past `dst` is skipped.
fn copy_out(frame: *const u8, dst: &TempMap, runs: &[(u64, u64, u64)]) {
    for &(src_off, dst_off, len) in runs {
        if src_off + len > HPAGE_SIZE || dst_off + len > dst.len() as u64 {
            continue;
        }
        // SAFETY: the source is mapped, readable guest RAM inside the frame
        // and the destination lies inside `dst` (both checked above); the
        // two are distinct mappings, so the regions don't overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                frame.add(src_off as usize),
                dst.ptr().add(dst_off as usize),
                len as usize,
            );
        }
    }
}

/// Take `[off, off + len)` of hugetlb memfd `fd` from the host's pool, for
/// slot `slot` (ENOSPC, the host ran out: `HostPoolExhausted`).
fn take_huge(
    fd: &Memfd,
    slot: u32,
    off: u64,
    len: u64,
    what: &'static str,
) -> Result<(), GuestMemError> {
    fd.allocate(off, len).map_err(|source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            GuestMemError::HostPoolExhausted { slot, source }
        } else {
            GuestMemError::Fallocate {
                what,
                offset: off,
                len,
                source,
            }
        }
    })
}

fn frame_off(frame: usize) -> u64 {
    frame as u64 * HPAGE_SIZE
}

fn page_off(frame: usize, page: u16) -> u64 {
    frame_off(frame) + u64::from(page) * PAGE_SIZE
}

impl HostMem {
    /// Create the memfds and reserve the range. Nothing is populated yet.
    /// `gig_slots`: 1G pages of the `hugetlb-1g` backing (the range is then
    /// 1G aligned, so that guest-physical and host 1G boundaries agree).
    pub(crate) fn new(
        backing: Backing,
        size: u64,
        pool_slots: usize,
        gig_slots: usize,
    ) -> Result<Self, GuestMemError> {
        let range = if backing == Backing::Hugetlb1g {
            HostRange::reserve_aligned(size, GIG_SIZE)?
        } else {
            HostRange::reserve(size)?
        };
        let gig = if backing == Backing::Hugetlb1g {
            let gig = Memfd::create("guest-ram-hugetlb-1g", MemfdKind::Hugetlb1G)?;
            gig.set_len(gig_slots as u64 * GIG_SIZE)?;
            Some(gig)
        } else {
            None
        };
        let (pool, data, data_len) = match backing {
            Backing::Hugetlb | Backing::Hugetlb1g => {
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
                    range.madvise(0, size, Advice::LinuxHugepage, "MADV_HUGEPAGE")?;
                } else {
                    range.madvise(0, size, Advice::LinuxNoHugepage, "MADV_NOHUGEPAGE")?;
                }
                (None, data, size)
            }
        };
        let hold = if backing.is_hugetlb() {
            WriteHold::open()
                .inspect_err(|why| {
                    log::info!(
                        "splits copy under the vCPU pause: no userfaultfd write-protect: {why}"
                    )
                })
                .ok()
        } else {
            None
        };
        Ok(Self {
            backing,
            range,
            pool,
            gig,
            data,
            data_len,
            warm: BTreeMap::new(),
            staging: None,
            used_staging: Vec::new(),
            warm_huge: BTreeMap::new(),
            hold,
            #[cfg(test)]
            fail_switch: false,
            copy_unheld: false,
            #[cfg(test)]
            after_copy: None,
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
            .madvise(off, len, Advice::LinuxPopulateWrite, "MADV_POPULATE_WRITE")
    }

    // ---- 1G primitives (`hugetlb-1g`) ----

    fn gig(&self) -> Result<&Memfd, GuestMemError> {
        self.gig.as_ref().ok_or(GuestMemError::NoGigPool)
    }

    /// Take 1G slot `slot` from the host's 1G pool (ENOSPC: the host ran out).
    pub(crate) fn gig_alloc(&self, slot: u32) -> Result<(), GuestMemError> {
        let off = u64::from(slot) * GIG_SIZE;
        take_huge(
            self.gig()?,
            slot,
            off,
            GIG_SIZE,
            "1G hugetlb memfd, allocate",
        )
    }

    /// Map the allocated 1G slot `slot` over 1G frame `gig` (frames
    /// `gig * 512 ..`), in one `mmap` (fault it in with [`Self::gig_populate`]).
    pub(crate) fn gig_map(&self, gig: usize, slot: u32) -> Result<(), GuestMemError> {
        self.range.map_file(
            gig as u64 * GIG_SIZE,
            GIG_SIZE,
            self.gig()?,
            u64::from(slot) * GIG_SIZE,
            "1G hugetlb slot",
        )
    }

    /// Fault the whole of 1G frame `gig` in as it is mapped now.
    pub(crate) fn gig_populate(&self, gig: usize) -> Result<(), GuestMemError> {
        self.populate(gig as u64 * GIG_SIZE, GIG_SIZE)
    }

    /// After a switch of 1G frame `gig` (nothing left to undo): fault it in,
    /// as a speed-up only; the guest's own touches fault in what this could
    /// not, so a failure is logged and the operation stands.
    pub(crate) fn gig_populate_after_switch(&self, gig: usize) {
        if let Err(e) = self.gig_populate(gig) {
            log::warn!("1G frame {gig}: faulting it in after the switch: {e}");
        }
    }

    /// Return 1G slot `slot` to the host.
    pub(crate) fn gig_free(&self, slot: u32) -> Result<(), GuestMemError> {
        self.gig()?.punch_hole(u64::from(slot) * GIG_SIZE, GIG_SIZE)
    }

    /// The host address and length of 1G frame `gig`.
    fn gig_span(&self, gig: usize) -> (u64, u64) {
        (self.range.ptr(gig as u64 * GIG_SIZE) as u64, GIG_SIZE)
    }

    /// Write-protect 1G frame `gig` with the userfaultfd (a writer of it
    /// sleeps in its fault until [`Self::gig_release`]); `false` where the
    /// host cannot, and then nothing is held.
    pub(crate) fn gig_hold(&self, gig: usize) -> bool {
        let (start, len) = self.gig_span(gig);
        self.hold
            .as_ref()
            .is_some_and(|h| h.hold(start, len).is_ok())
    }

    /// Let the writers held by [`Self::gig_hold`] go: after the 1G page was
    /// replaced (`switched`) they fault again into the new mapping; else the
    /// write-protect is lifted first.
    pub(crate) fn gig_release(&self, gig: usize, switched: bool) {
        let (start, len) = self.gig_span(gig);
        self.release_held(start, len, switched);
    }

    /// Take the 2M pool's slots `base .. base + 512` from the host and map
    /// them for staging, faulted in (the kernel zeroes them here, before any
    /// write is held): where a 1G split copies its GiB to.
    pub(crate) fn gig_block_staging(&self, base: u32) -> Result<TempMap, GuestMemError> {
        let off = u64::from(base) * HPAGE_SIZE;
        take_huge(self.pool(), base, off, GIG_SIZE, "hugetlb memfd, allocate")?;
        let t = TempMap::new(self.pool(), off, GIG_SIZE, "hugetlb staging map (1G split)")?;
        t.populate()?;
        Ok(t)
    }

    /// Copy the 1 GiB of 1G frame `gig` into a staging map of as much
    /// (nothing writes it now: it is write-protected, or the vCPUs are paused).
    pub(crate) fn gig_copy_out(&self, gig: usize, dst: &TempMap) {
        for i in 0..crate::FRAMES_PER_GIG {
            let frame = gig * crate::FRAMES_PER_GIG + i;
            let at = i as u64 * HPAGE_SIZE;
            copy_out(
                self.range.ptr(frame_off(frame)),
                dst,
                &[(0, at, HPAGE_SIZE)],
            );
        }
    }

    /// One mapping of the 2M pool's slots `base .. base + 512` over 1G frame
    /// `gig`: the 1G page is replaced whole at once (a hugetlb mapping splits
    /// only at its page size, so never frame by frame); faulting it in is
    /// the caller's ([`Self::gig_populate_after_switch`]).
    pub(crate) fn gig_switch_to_block(&self, gig: usize, base: u32) -> Result<(), GuestMemError> {
        let off = gig as u64 * GIG_SIZE;
        self.range.map_file(
            off,
            GIG_SIZE,
            self.pool(),
            u64::from(base) * HPAGE_SIZE,
            "hugetlb pool block (1G split)",
        )
    }

    /// Copy frame `frame` (2M of a 1G page) into huge slot `slot`, allocated
    /// here (the 1G split where the 2M slots are not one block).
    pub(crate) fn copy_frame_to_huge(&self, frame: usize, slot: u32) -> Result<(), GuestMemError> {
        self.huge_alloc(slot)?;
        let dst = TempMap::new(
            self.pool(),
            u64::from(slot) * HPAGE_SIZE,
            HPAGE_SIZE,
            "hugetlb staging map (1G split)",
        )?;
        copy_out(
            self.range.ptr(frame_off(frame)),
            &dst,
            &[(0, 0, HPAGE_SIZE)],
        );
        Ok(())
    }

    /// Copy frame `frame`'s pages into small slots (page, slot), allocated
    /// by the write.
    pub(crate) fn copy_frame_to_small(
        &mut self,
        frame: usize,
        pages: &[(u16, u32)],
    ) -> Result<(), GuestMemError> {
        self.split_prepare(pages)?;
        self.copy_pages(frame, pages)?;
        self.staging = None;
        Ok(())
    }

    /// Replace 1G frame `gig`'s mapping with zero pages (before its frames
    /// are mapped one by one, the vCPUs paused).
    pub(crate) fn gig_unmap(&self, gig: usize) -> Result<(), GuestMemError> {
        self.range.map_zero(gig as u64 * GIG_SIZE, GIG_SIZE)
    }

    /// A staging map of 1G slot `slot`, allocated here and faulted in, to
    /// copy a collapse into.
    pub(crate) fn gig_staging(&self, slot: u32) -> Result<TempMap, GuestMemError> {
        self.gig_alloc(slot)?;
        let t = TempMap::new(
            self.gig()?,
            u64::from(slot) * GIG_SIZE,
            GIG_SIZE,
            "1G staging map",
        )?;
        t.populate()?;
        Ok(t)
    }

    /// Copy pages `pages` (page indices) of `frame` as mapped now into the
    /// same place of a 1G staging map of the frame's 1G frame.
    pub(crate) fn copy_into_gig(&self, staging: &TempMap, frame: usize, pages: &[u16]) {
        let in_gig = frame_off(frame) % GIG_SIZE;
        let runs: Vec<(u64, u64, u64)> = page_runs(pages)
            .into_iter()
            .map(|(p, n)| {
                let off = u64::from(p) * PAGE_SIZE;
                (off, in_gig + off, u64::from(n) * PAGE_SIZE)
            })
            .collect();
        copy_out(self.range.ptr(frame_off(frame)), staging, &runs);
    }

    /// Bytes of the 1G memfd backed by memory now.
    pub(crate) fn gig_allocated_bytes(&self) -> Result<u64, GuestMemError> {
        match &self.gig {
            Some(g) => g.allocated_bytes(),
            None => Ok(0),
        }
    }

    // ---- hugetlb primitives ----

    /// Take huge slot `slot` from the host pool (ENOSPC: the host ran out).
    pub(crate) fn huge_alloc(&self, slot: u32) -> Result<(), GuestMemError> {
        let off = u64::from(slot) * HPAGE_SIZE;
        take_huge(
            self.pool(),
            slot,
            off,
            HPAGE_SIZE,
            "hugetlb memfd, allocate",
        )
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
        }
        Ok(())
    }

    /// Split, step 1 (vCPUs running): size the small memfd and allocate the
    /// small slots of `pages` (`(page, slot)`) with `fallocate` (one call
    /// per run of slots; no page table touched, nothing zeroed that the copy
    /// overwrites), so that the copy allocates nothing.
    ///
    /// A block allocated ahead (warm, `crate::split_reserve`) needs no
    /// `fallocate`: its pages exist and are mapped for the copy already
    /// ([`Self::copy_pages`] copies into that mapping, no `pwrite`); its
    /// slots this split does not fill are punched by [`Self::split_finish`]
    /// as for any block. Returns `true` when the pages were allocated ahead.
    pub(crate) fn split_prepare(&mut self, pages: &[(u16, u32)]) -> Result<bool, GuestMemError> {
        self.staging = None;
        let Some(max) = pages.iter().map(|p| p.1).max() else {
            return Ok(false);
        };
        if let Some(base) = block_base(pages) {
            if let Some(map) = self.warm.remove(&base) {
                self.staging = map.map(|m| (base, m));
                // A kept block may hold a collapsed frame's old bytes: the
                // pages not kept must read zero from the remap on.
                let spare: Vec<u32> = missing_pages(pages)
                    .into_iter()
                    .map(|p| base + u32::from(p))
                    .collect();
                self.small_free(&spare)?;
                return Ok(true);
            }
        }
        // A block is mapped whole: the memfd must reach its end.
        let end = block_base(pages).map_or(max + 1, |b| b + crate::PAGES_PER_HPAGE as u32);
        self.ensure_data_len(u64::from(end))?;
        for (s, n) in slot_only_runs(pages) {
            let (offset, len) = (u64::from(s) * PAGE_SIZE, u64::from(n) * PAGE_SIZE);
            self.data
                .allocate(offset, len)
                .map_err(|source| GuestMemError::Fallocate {
                    what: "shmem memfd, allocate small-page slots",
                    offset,
                    len,
                    source,
                })?;
        }
        Ok(false)
    }

    /// A handle on the small memfd, grown to hold the split block at
    /// `base`, to allocate the block's pages without the RAM lock.
    pub(crate) fn split_block_file(&mut self, base: u32) -> Result<Memfd, GuestMemError> {
        self.ensure_data_len(u64::from(base) + crate::PAGES_PER_HPAGE)?;
        self.data.try_clone()
    }

    /// The split block at `base` is allocated and `map` maps its pages:
    /// the next split onto it skips its `fallocate` and copies through `map`.
    pub(crate) fn mark_split_block_warm(&mut self, base: u32, map: TempMap) {
        self.warm.insert(base, Some(map));
    }

    /// A collapsed frame's block at `base` keeps its pages for the next
    /// split (they hold the frame's old bytes: a split onto it overwrites
    /// the pages it keeps and punches the others before its remap). No
    /// mapping yet: the worker makes one (`Self::attach_split_block_map`).
    pub(crate) fn keep_split_block(&mut self, base: u32) {
        self.warm.insert(base, None);
    }

    /// A warm block with no mapping yet, and a handle on the small memfd to
    /// make one away from the RAM lock.
    pub(crate) fn split_block_needing_map(&self) -> Result<Option<(u32, Memfd)>, GuestMemError> {
        match self.warm.iter().find(|(_, m)| m.is_none()) {
            Some((&base, _)) => Ok(Some((base, self.data.try_clone()?))),
            None => Ok(None),
        }
    }

    /// Gives the warm block at `base` its mapping (kept if it has one
    /// already); `false` (and `map` dropped) when the block is no longer warm.
    pub(crate) fn attach_split_block_map(&mut self, base: u32, map: TempMap) -> bool {
        match self.warm.get_mut(&base) {
            Some(slot) => {
                slot.get_or_insert(map);
                true
            }
            None => false,
        }
    }

    /// Whether the split block at `base` is warm (allocated ahead, mapped
    /// or waiting for its mapping).
    pub(crate) fn is_split_block_warm(&self, base: u32) -> bool {
        self.warm.contains_key(&base)
    }

    /// The block at `base` leaves the reserve (its mapping unmapped).
    pub(crate) fn forget_split_block(&mut self, base: u32) {
        self.warm.remove(&base);
    }

    /// Split blocks allocated ahead now.
    pub(crate) fn warm_split_blocks(&self) -> usize {
        self.warm.len()
    }

    /// Whether a split can hold back writes to its frame while it copies.
    #[cfg(test)]
    pub(crate) fn holds_writes(&self) -> bool {
        self.hold.is_some()
    }

    /// Tests: split as on a host without userfaultfd write-protect (`false`)
    /// or as this host can.
    #[cfg(test)]
    pub(crate) fn use_write_hold(&mut self, on: bool) {
        self.hold = if on { WriteHold::open().ok() } else { None };
    }

    /// Split, step 2 (vCPUs running), for a frame whose pages go to one
    /// block of small slots ([`block_base`]): write-protect `frame` (a write
    /// to it now sleeps until [`Self::split_release`]; reads go on) and
    /// copy `pages` into their prepared small slots. `false` when the
    /// frame's pages are not one block or it could not be write-protected:
    /// [`Self::split_switch`] then copies with the vCPUs paused.
    pub(crate) fn split_copy_held(&mut self, frame: usize, pages: &[(u16, u32)]) -> bool {
        if block_base(pages).is_none() {
            return false;
        }
        let held = self.hold_frame(frame, "copying under the pause");
        if held && self.copy_pages(frame, pages).is_err() {
            self.split_release(frame, false);
            return false;
        }
        #[cfg(test)]
        if let Some(h) = self.after_copy.as_ref().filter(|_| held) {
            (h.0)();
        }
        held
    }

    /// Split, step 3: copy `pages` of huge `frame` into their prepared small
    /// slots unless [`Self::split_copy_held`] did (`copied`), then replace
    /// the frame's mapping. A block ([`block_base`]) is one `mmap` of the
    /// small memfd over the whole frame, which swaps the huge page for the
    /// small pages in one step (no vCPU needs to be paused: every kept page
    /// is right from then on), then zero pages over the pages not kept
    /// (given back: their content is the guest's no more). Otherwise
    /// (vCPUs paused): zero pages over the frame (hugetlb unmaps only 2M at
    /// a time) and one `mmap` per run. Nothing is faulted in here. On error
    /// the frame maps `huge_slot` again (still allocated and intact), so the
    /// host is as before the split.
    pub(crate) fn split_switch(
        &mut self,
        frame: usize,
        huge_slot: u32,
        pages: &[(u16, u32)],
        copied: bool,
    ) -> Result<(), GuestMemError> {
        let r = self.split_switch_inner(frame, pages, copied);
        if r.is_err() {
            if let Err(e) = self.huge_map(frame, huge_slot) {
                log::warn!("frame {frame}: restoring the huge mapping after a failed split: {e}");
            }
        }
        r
    }

    fn split_switch_inner(
        &mut self,
        frame: usize,
        pages: &[(u16, u32)],
        copied: bool,
    ) -> Result<(), GuestMemError> {
        #[cfg(test)]
        if self.fail_switch {
            return Err(GuestMemError::VmMemory("injected host failure".into()));
        }
        if !copied {
            self.copy_pages(frame, pages)?;
        }
        if let Some(base) = block_base(pages) {
            self.range.map_file(
                frame_off(frame),
                HPAGE_SIZE,
                &self.data,
                u64::from(base) * PAGE_SIZE,
                "the frame's block of small-page slots",
            )?;
            return self.zero_map(frame, &missing_pages(pages));
        }
        let runs = slot_runs(pages);
        self.zero_map(frame, &all_pages())?;
        for &(p, s, n) in &runs {
            self.range.map_file(
                page_off(frame, p),
                u64::from(n) * PAGE_SIZE,
                &self.data,
                u64::from(s) * PAGE_SIZE,
                "small-page slots",
            )?;
        }
        Ok(())
    }

    /// Copy `pages` (page, small slot) of huge `frame` into their small
    /// slots: onto a warm block (the split in progress took one), a
    /// `memcpy` through its mapping; else one `pwrite` into the small memfd
    /// per run of pages on consecutive slots (nothing is mapped for it).
    fn copy_pages(&self, frame: usize, pages: &[(u16, u32)]) -> Result<(), GuestMemError> {
        let src = self.range.ptr(frame_off(frame));
        if let Some((_, map)) = self
            .staging
            .as_ref()
            .filter(|(b, _)| block_base(pages) == Some(*b))
        {
            // A warm block: page p sits at p * 4K of its mapping.
            let runs: Vec<(u64, u64, u64)> = slot_runs(pages)
                .into_iter()
                .map(|(p, _, n)| {
                    let off = u64::from(p) * PAGE_SIZE;
                    (off, off, u64::from(n) * PAGE_SIZE)
                })
                .collect();
            copy_out(src, map, &runs);
            return Ok(());
        }
        for (p, s, n) in slot_runs(pages) {
            let (off, len) = (u64::from(p) * PAGE_SIZE, u64::from(n) * PAGE_SIZE);
            if off + len > HPAGE_SIZE {
                continue;
            }
            // SAFETY: [off, off + len) lies inside the frame (checked), which
            // is mapped guest RAM until `self` drops; nothing writes it now
            // (the frame is write-protected, or the vCPUs are paused).
            let run = unsafe { std::slice::from_raw_parts(src.add(off as usize), len as usize) };
            self.data.write_all_at(run, u64::from(s) * PAGE_SIZE)?;
        }
        Ok(())
    }

    /// After step 3, when step 2 held `frame`'s writes: let the held
    /// writers go. After a switch (`switched`) they fault again into the
    /// small pages; after a failed one the frame's write-protect is lifted
    /// first, where it still maps the huge page.
    pub(crate) fn split_release(&self, frame: usize, switched: bool) {
        let start = self.range.ptr(frame_off(frame)) as u64;
        self.release_held(start, HPAGE_SIZE, switched);
    }

    /// Let the writers held on `[start, start + len)` go: after a switch
    /// they fault again into the new mapping (woken); else, or when the
    /// wake fails, the write-protect is lifted.
    fn release_held(&self, start: u64, len: u64, switched: bool) {
        let Some(h) = &self.hold else {
            return;
        };
        if !switched {
            h.release(start, len);
        } else if let Err(e) = h.wake(start, len) {
            log::warn!("host range {start:#x} (+{len:#x}): {e}");
            h.release(start, len);
        }
    }

    /// Split, step 4 (vCPUs running again): map the small pages in (they
    /// are in the page cache: no allocation, and a vCPU that gets there
    /// first only takes the same minor fault), punch the block's slots of
    /// the pages not kept, keep the frame from forming shmem THPs, free the
    /// huge slot.
    pub(crate) fn split_finish(
        &mut self,
        frame: usize,
        huge_slot: u32,
        pages: &[(u16, u32)],
    ) -> Result<(), GuestMemError> {
        // Read faults map the page cache around each fault (fault-around):
        // a few faults for the whole frame instead of one per page.
        for (p, _, n) in slot_runs(pages) {
            self.range.madvise(
                page_off(frame, p),
                u64::from(n) * PAGE_SIZE,
                Advice::LinuxPopulateRead,
                "MADV_POPULATE_READ (small pages)",
            )?;
        }
        if let Some(base) = block_base(pages) {
            // The block's slots of pages not kept were mapped for a moment:
            // free in the books, so empty on the host too.
            let spare: Vec<u32> = missing_pages(pages)
                .into_iter()
                .map(|p| base + u32::from(p))
                .collect();
            self.small_free(&spare)?;
        }
        if !pages.is_empty() {
            self.frame_hugepage_advice(frame, false)?;
        }
        if let Some((_, map)) = self.staging.take() {
            self.retire_staging(map);
        }
        self.huge_free(huge_slot)
    }

    /// A staging mapping an operation is done with: unmapped later, off
    /// its path ([`Self::take_used_staging`]), or here when too many wait.
    pub(crate) fn retire_staging(&mut self, map: TempMap) {
        if self.used_staging.len() >= MAX_USED_STAGING {
            self.used_staging.clear();
        }
        self.used_staging.push(map);
    }

    /// A handle on the pool memfd, for allocating a warm huge page away
    /// from the RAM lock.
    pub(crate) fn pool_file(&self) -> Result<Memfd, GuestMemError> {
        self.pool().try_clone()
    }

    /// Huge slot `slot` is allocated and `map` maps its page, faulted in:
    /// the next collapse onto it skips the allocation.
    pub(crate) fn mark_huge_warm(&mut self, slot: u32, map: TempMap) {
        self.warm_huge.insert(slot, map);
    }

    /// Takes warm huge slot `slot`'s mapping (the slot is being allocated);
    /// `None` when the slot is not warm on the host.
    pub(crate) fn take_warm_huge(&mut self, slot: u32) -> Option<TempMap> {
        self.warm_huge.remove(&slot)
    }

    /// Whether huge slot `slot` is warm on the host (allocated ahead).
    pub(crate) fn huge_is_warm(&self, slot: u32) -> bool {
        self.warm_huge.contains_key(&slot)
    }

    /// Huge pages allocated ahead now.
    pub(crate) fn warm_huge_pages(&self) -> usize {
        self.warm_huge.len()
    }

    /// The staging mappings of finished splits, to unmap (drop) away from
    /// the split's path and the RAM lock.
    pub(crate) fn take_used_staging(&mut self) -> Vec<TempMap> {
        std::mem::take(&mut self.used_staging)
    }

    /// After a split that did not happen: punch the small slots it
    /// prepared (a block's: all 512, a warm block was allocated whole), so
    /// the small memfd holds what the rolled-back books say.
    pub(crate) fn split_unprepare(&mut self, pages: &[(u16, u32)]) -> Result<(), GuestMemError> {
        self.staging = None;
        match block_base(pages) {
            Some(base) => self.data.punch_hole(
                u64::from(base) * PAGE_SIZE,
                crate::PAGES_PER_HPAGE * PAGE_SIZE,
            ),
            None => {
                let slots: Vec<u32> = pages.iter().map(|p| p.1).collect();
                self.small_free(&slots)
            }
        }
    }

    /// Collapse, step 1 (vCPUs running): take huge slot `slot` from the host
    /// pool (the kernel zeroes it here) and map it for staging.
    /// A warm slot (`crate::collapse_reserve`) has both ready: nothing is
    /// allocated, zeroed or faulted here.
    pub(crate) fn collapse_prepare(&mut self, slot: u32) -> Result<TempMap, GuestMemError> {
        if let Some(map) = self.take_warm_huge(slot) {
            return Ok(map);
        }
        self.huge_alloc(slot)?;
        let t = TempMap::new(
            self.pool(),
            u64::from(slot) * HPAGE_SIZE,
            HPAGE_SIZE,
            "hugetlb staging map",
        )
        .and_then(|t| {
            madvise_raw(
                t.ptr() as usize,
                t.len(),
                Advice::LinuxPopulateWrite,
                "MADV_POPULATE_WRITE (staging)",
            )
            .map(|()| t)
        });
        if t.is_err() {
            self.huge_free(slot)?;
        }
        t
    }

    /// Collapse, step 2 (vCPUs paused): copy the present `copy` pages
    /// (`(page, small slot)`) of `frame` into the staging map of `slot`
    /// (one copy per run of pages; the others stay zero), then map the slot
    /// over the frame (one PMD). On error the frame maps its small slots and
    /// zero pages again and the slot goes back to the host pool.
    /// `held`: writes to the frame are held back ([`Self::hold_frame`])
    /// instead of the vCPUs being paused.
    pub(crate) fn collapse_switch(
        &mut self,
        frame: usize,
        slot: u32,
        staging: &TempMap,
        copy: &[(u16, u32)],
        held: bool,
    ) -> Result<(), GuestMemError> {
        let r = self.collapse_switch_inner(frame, slot, staging, copy, held);
        if r.is_err() {
            // Every page present (a held collapse): the small pages alone
            // cover the frame, with no moment of zero pages in between.
            let zero_first = copy.len() < crate::PAGES_PER_HPAGE as usize;
            let back = if zero_first {
                self.zero_map(frame, &all_pages())
            } else {
                Ok(())
            }
            .and_then(|()| self.small_map(frame, copy, true))
            .and_then(|()| self.huge_free(slot));
            if let Err(e) = back {
                log::warn!(
                    "frame {frame}: restoring the small mapping after a failed collapse: {e}"
                );
            }
        }
        r
    }

    fn collapse_switch_inner(
        &self,
        frame: usize,
        slot: u32,
        staging: &TempMap,
        copy: &[(u16, u32)],
        held: bool,
    ) -> Result<(), GuestMemError> {
        #[cfg(test)]
        if self.fail_switch {
            return Err(GuestMemError::VmMemory("injected host failure".into()));
        }
        let pages: Vec<u16> = copy.iter().map(|p| p.0).collect();
        let copies: Vec<(u64, u64, u64)> = page_runs(&pages)
            .into_iter()
            .map(|(p, n)| {
                let off = u64::from(p) * PAGE_SIZE;
                (off, off, u64::from(n) * PAGE_SIZE)
            })
            .collect();
        copy_out(self.range.ptr(frame_off(frame)), staging, &copies);
        #[cfg(test)]
        if let Some(h) = self.after_copy.as_ref().filter(|_| held) {
            (h.0)();
        }
        #[cfg(not(test))]
        let _ = held;
        self.huge_map(frame, slot)
    }

    /// Write-protect `frame` for a split's or a collapse's copy with the
    /// guest running (a collapse: every page of it present, on small pages
    /// of the small memfd, which the kernel write-protects present or not:
    /// no anonymous zero page in it), so a writer of the frame sleeps until
    /// [`Self::split_release`] wakes it into the new mapping. `false` when
    /// the host cannot (logged with `fallback`: the operation then pauses
    /// the vCPUs). Fault injection (`copy_unheld`): `true` without holding
    /// anything.
    pub(crate) fn hold_frame(&self, frame: usize, fallback: &str) -> bool {
        let (start, len) = (self.range.ptr(frame_off(frame)) as u64, HPAGE_SIZE);
        self.copy_unheld
            || match &self.hold {
                Some(h) => h
                    .hold(start, len)
                    .inspect_err(|e| log::warn!("frame {frame}: {fallback}: {e}"))
                    .is_ok(),
                None => false,
            }
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
        let start = frame_off(frame);
        let end = start + HPAGE_SIZE;
        let mut runs = Vec::new();
        let mut pos = start;
        while pos < end {
            let d = match fs::seek(&self.data, SeekFrom::Data(pos)) {
                Ok(d) if d < end => d,
                Ok(_) | Err(Errno::NXIO) => break,
                Err(e) => {
                    return Err(GuestMemError::HostRead {
                        path: format!("memfd {} (SEEK_DATA)", self.data.name()),
                        source: e.into(),
                    })
                }
            };
            // A failed SEEK_HOLE ends the scan like an empty run.
            let Ok(h) = fs::seek(&self.data, SeekFrom::Hole(d)) else {
                break;
            };
            let h = h.min(end);
            if h <= d {
                break;
            }
            let first = ((d - start) / PAGE_SIZE) as u16;
            let n = (h - d).div_ceil(PAGE_SIZE) as u32;
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
            (Advice::LinuxHugepage, "MADV_HUGEPAGE")
        } else {
            (Advice::LinuxNoHugepage, "MADV_NOHUGEPAGE")
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
            // rustix's `Advice` has no MADV_COLLAPSE: this call stays on libc.
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
            Backing::Hugetlb | Backing::Hugetlb1g => {
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
                    let r = retry_on_intr(|| {
                        rustix::io::pread(&self.data, &mut buf[done..], off + done as u64)
                    });
                    let source = match r {
                        Ok(n) if n > 0 => {
                            done += n;
                            continue;
                        }
                        Ok(_) => std::io::ErrorKind::UnexpectedEof.into(),
                        Err(e) => e.into(),
                    };
                    return Err(GuestMemError::HostRead {
                        path: format!("memfd {}", self.data.name()),
                        source,
                    });
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
