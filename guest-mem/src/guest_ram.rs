//! `GuestRam`: ties the plans of the RAM model to real memory and offers the
//! vm-memory view of guest RAM.

use std::sync::Arc;

use log::{debug, warn};
use thp::policy::ThpPolicy;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::backing::{self, Backing, HostPaths};
use crate::error::GuestMemError;
use crate::host_mem::HostMem;
use crate::quiesce::{self, Quiesce};
use crate::stats::{DiscardReport, HostView, PoolStats};
use crate::{pagemap, smaps, HPAGE_SIZE, PAGES_PER_HPAGE, PAGE_SIZE};
use thp::ram_model as model;

pub use model::FrameView;
use model::{CollapsePlan, DiscardStep, PopulatePlan, RamModel, RefillStep, SplitPlan};

/// Largest guest RAM: it must end below the 32-bit MMIO hole at 3 GiB.
pub const MAX_RAM_SIZE: u64 = 0xC000_0000;

/// How guest RAM is set up.
#[derive(Debug, Clone)]
pub struct GuestRamConfig {
    /// Bytes of guest RAM (a multiple of 2M, at most [`MAX_RAM_SIZE`]).
    pub size: u64,
    /// What backs it.
    pub backing: Backing,
    /// THP policy the model follows (huge at fault, fallback, collapse rules).
    pub policy: ThpPolicy,
    /// `hugetlb`: at most this many 2M pages in our pool (default: one per frame).
    pub hugetlb_pool_pages: Option<usize>,
    /// `hugetlb`: error out when the host has fewer free 2M pages than the pool
    /// wants, instead of the default fallback to small pages for the rest.
    pub strict_pool: bool,
    /// Where the host's settings are read (tests point it at a fake `/sys`).
    pub host: HostPaths,
}

impl GuestRamConfig {
    /// `size` bytes on `backing`, default policy, pool and fallback.
    pub fn new(size: u64, backing: Backing) -> Self {
        Self {
            size,
            backing,
            ..Self::default()
        }
    }
}

impl Default for GuestRamConfig {
    fn default() -> Self {
        Self {
            size: 0,
            backing: Backing::default(),
            policy: ThpPolicy::always(),
            hugetlb_pool_pages: None,
            strict_pool: false,
            host: HostPaths::default(),
        }
    }
}

/// Guest RAM: one 2M-aligned host range over memfds, frame by frame huge or small.
#[derive(Debug)]
pub struct GuestRam {
    pub(crate) backing: Backing,
    size: u64,
    pub(crate) frames: usize,
    requested_pool: usize,
    host_paths: HostPaths,
    pub(crate) model: RamModel,
    region: Arc<GuestRegionMmap>,
    pub(crate) host: HostMem,
    /// Frames whose host mapping changed (each such change fires the
    /// host's mmu notifier over the frame) since [`GuestRam::take_changed_frames`].
    pub(crate) changed: std::collections::BTreeSet<usize>,
    /// Balloon give-backs: pages coalesced per frame, the deferred-split
    /// queue, frames given back whole (see `give_back.rs`).
    pub(crate) give_back: crate::give_back::GiveBackState,
}

const PPH: usize = PAGES_PER_HPAGE as usize;

fn all_pages() -> Vec<u16> {
    (0..PPH as u16).collect()
}

/// The one guest RAM size check: `size` must be a positive multiple of 2 MiB
/// and at most [`MAX_RAM_SIZE`]. Returns the number of 2M frames. Every layer
/// that takes a RAM size from a user or a file (`vmm run`, `vmm stress`, replay
/// files) checks it here, so the rule has one home.
pub fn check_ram_size(size: u64) -> Result<usize, GuestMemError> {
    if size == 0 || !size.is_multiple_of(HPAGE_SIZE) {
        return Err(GuestMemError::SizeNotMultipleOf2M { size });
    }
    if size > MAX_RAM_SIZE {
        return Err(GuestMemError::SizeTooLarge {
            size,
            max: MAX_RAM_SIZE,
        });
    }
    Ok((size / HPAGE_SIZE) as usize)
}

/// How many pool slots fit on the host (hugetlb): the requested count, or in
/// the default mode what is free now (with a warning).
fn fit_pool(cfg: &GuestRamConfig, want: usize) -> Result<usize, GuestMemError> {
    if want == 0 {
        return Ok(0);
    }
    let c = backing::hugetlb_2m_counters(&cfg.host)?;
    let have = c.available();
    if have >= want as u64 {
        return Ok(want);
    }
    let e = GuestMemError::PoolTooSmall {
        need: want as u64,
        have,
        suggest_total: c.total + (want as u64 - have),
    };
    if cfg.strict_pool {
        return Err(e);
    }
    warn!(
        "{e}; falling back to small pages for {} of {want} frames",
        want as u64 - have
    );
    Ok(have as usize)
}

impl GuestRam {
    /// Create guest RAM: check the host, reserve the 2M-aligned range, create
    /// the memfds. Nothing is populated yet (see [`GuestRam::populate_all`]).
    pub fn new(cfg: &GuestRamConfig) -> Result<GuestRam, GuestMemError> {
        let frames = check_ram_size(cfg.size)?;
        let (requested_pool, policy) = match cfg.backing {
            Backing::Hugetlb => (
                cfg.hugetlb_pool_pages.unwrap_or(frames).min(frames),
                cfg.policy,
            ),
            Backing::Thp => {
                backing::check_shmem_thp(&cfg.host)?;
                (frames, cfg.policy)
            }
            Backing::Small4k => (0, ThpPolicy::never()),
        };
        let mut capacity = match cfg.backing {
            Backing::Hugetlb => fit_pool(cfg, requested_pool)?,
            _ => requested_pool,
        };
        let host = HostMem::new(cfg.backing, cfg.size, capacity)?;
        if cfg.backing == Backing::Hugetlb {
            // Take the pool's pages from the host now, so that populating never
            // finds the host pool empty because of a race with another process.
            for slot in 0..capacity {
                match host.huge_alloc(slot as u32) {
                    Ok(()) => {}
                    Err(GuestMemError::HostPoolExhausted { .. }) if !cfg.strict_pool => {
                        warn!(
                            "host hugetlb pool ran dry at {slot} of {capacity} pages (taken \
                             meanwhile by another process); the other frames fall back to small pages"
                        );
                        capacity = slot;
                        break;
                    }
                    Err(GuestMemError::HostPoolExhausted { .. }) => {
                        let c = backing::hugetlb_2m_counters(&cfg.host)?;
                        return Err(GuestMemError::PoolTooSmall {
                            need: requested_pool as u64,
                            have: slot as u64 + c.available(),
                            suggest_total: c.total + (requested_pool - slot) as u64,
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let model = match cfg.backing {
            Backing::Thp => RamModel::shmem(frames, capacity, policy),
            _ => RamModel::new(frames, capacity, policy),
        };
        let region = Self::build_region(&host)?;
        debug!(
            "guest RAM: {} MiB on {} at {:#x}, pool {capacity}/{requested_pool} huge pages",
            cfg.size >> 20,
            cfg.backing,
            host.range().base()
        );
        Ok(GuestRam {
            backing: cfg.backing,
            size: cfg.size,
            frames,
            requested_pool,
            host_paths: cfg.host.clone(),
            model,
            region,
            host,
            changed: Default::default(),
            give_back: Default::default(),
        })
    }

    fn build_region(host: &HostMem) -> Result<Arc<GuestRegionMmap>, GuestMemError> {
        let r = host.range();
        // SAFETY: [base, base + size) is mapped read-write for the whole life of
        // `HostMem` (frames are only ever replaced with MAP_FIXED inside it), and
        // `GuestRam`'s Drop keeps it mapped while any view built here is alive.
        let mmap = unsafe {
            MmapRegion::build_raw(
                r.ptr(0),
                r.size() as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .map_err(|e| GuestMemError::VmMemory(e.to_string()))?;
        let region = GuestRegionMmap::new(mmap, GuestAddress(0))
            .ok_or_else(|| GuestMemError::VmMemory("region end overflows".into()))?;
        Ok(Arc::new(region))
    }

    /// Host address of guest-physical 0 (2M aligned).
    pub fn host_addr(&self) -> u64 {
        self.host.range().base()
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 2M frames.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// The backing.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The vm-memory view: one region, gpa `0..size`, over [`GuestRam::host_addr`].
    pub fn memory(&self) -> GuestMemoryMmap {
        GuestMemoryMmap::from_arc_regions(vec![Arc::clone(&self.region)]).unwrap_or_default()
    }

    fn check_frame(&self, frame: usize) -> Result<(), GuestMemError> {
        if frame >= self.frames {
            return Err(GuestMemError::FrameOutOfRange {
                frame,
                frames: self.frames,
            });
        }
        Ok(())
    }

    pub(crate) fn check_range_pub(&self, gpa: u64, len: u64) -> Result<(u64, u64), GuestMemError> {
        self.check_range(gpa, len)
    }

    fn check_range(&self, gpa: u64, len: u64) -> Result<(u64, u64), GuestMemError> {
        if gpa.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(GuestMemError::RangeOutsideRam {
                gpa,
                len,
                size: self.size,
            });
        }
        if len == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(GuestMemError::RangeNotPageAligned { gpa, len });
        }
        Ok((gpa / PAGE_SIZE, len / PAGE_SIZE))
    }

    fn check_huge_backing(&self, op: &'static str) -> Result<(), GuestMemError> {
        if !self.backing.has_huge_frames() {
            return Err(GuestMemError::NoHugeFrames {
                backing: self.backing,
                op,
            });
        }
        Ok(())
    }

    /// Populate `frame` as the model decides (huge from the pool, else small).
    pub fn populate(&mut self, frame: usize) -> Result<(), GuestMemError> {
        self.check_frame(frame)?;
        let plan = self.model.populate(frame)?;
        if !matches!(plan, PopulatePlan::AlreadyPopulated) {
            self.changed.insert(frame);
        }
        self.apply_populate(frame, plan)
    }

    /// Populate every frame.
    pub fn populate_all(&mut self) -> Result<(), GuestMemError> {
        for f in 0..self.frames {
            self.populate(f)?;
        }
        Ok(())
    }

    fn apply_populate(&mut self, frame: usize, plan: PopulatePlan) -> Result<(), GuestMemError> {
        match (self.backing, plan) {
            (_, PopulatePlan::AlreadyPopulated) => Ok(()),
            (Backing::Hugetlb, PopulatePlan::Huge { slot }) => {
                self.host.huge_alloc(slot)?;
                self.host.huge_map(frame, slot)
            }
            (Backing::Hugetlb, PopulatePlan::Small { slots }) => {
                let pages: Vec<(u16, u32)> = slots
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (i as u16, *s))
                    .collect();
                self.host.small_map(frame, &pages, true)
            }
            (Backing::Thp, PopulatePlan::Huge { .. }) => {
                self.host.frame_hugepage_advice(frame, true)?;
                self.host.file_populate(frame, 0, PPH as u32)
            }
            (_, PopulatePlan::Small { .. }) | (Backing::Small4k, _) => {
                if self.backing == Backing::Thp {
                    self.host.frame_hugepage_advice(frame, false)?;
                }
                self.host.file_populate(frame, 0, PPH as u32)
            }
        }
    }

    /// Give back guest pages `[gpa, gpa + len)` (4K granularity): afterwards
    /// they read as zero and their host memory is freed.
    pub fn discard(
        &mut self,
        gpa: u64,
        len: u64,
        q: &dyn Quiesce,
    ) -> Result<DiscardReport, GuestMemError> {
        let (first, n) = self.check_range(gpa, len)?;
        self.settle_give_backs(first, n, q)?;
        let steps = self.model.discard(first, n)?;
        self.changed.extend(steps.iter().map(|s| match s {
            DiscardStep::WholeHuge { frame, .. }
            | DiscardStep::SplitHuge { frame, .. }
            | DiscardStep::Small { frame, .. } => *frame,
        }));
        let mut rep = DiscardReport::default();
        let needs_pause = self.backing == Backing::Hugetlb
            && steps
                .iter()
                .any(|s| matches!(s, DiscardStep::SplitHuge { .. }));
        let _guard = if needs_pause {
            Some(quiesce::pause(q)?)
        } else {
            None
        };
        for step in steps {
            self.apply_discard_step(step, &mut rep)?;
        }
        Ok(rep)
    }

    /// Act on one frame's discard plan (hugetlb splits expect the vCPUs
    /// paused by the caller).
    pub(crate) fn apply_discard_step(
        &mut self,
        step: DiscardStep,
        rep: &mut DiscardReport,
    ) -> Result<(), GuestMemError> {
        match step {
            DiscardStep::WholeHuge { frame, slot } => {
                rep.huge_frames_freed += 1;
                rep.pages_freed += PAGES_PER_HPAGE;
                if self.backing == Backing::Hugetlb {
                    self.host.zero_map(frame, &all_pages())?;
                    self.host.huge_free(slot)?;
                } else {
                    self.host.file_punch(frame, &all_pages())?;
                }
            }
            DiscardStep::SplitHuge {
                frame,
                huge_slot,
                kept,
                dropped,
            } => {
                rep.frames_split += 1;
                rep.pages_freed += dropped.len() as u64;
                if self.backing == Backing::Hugetlb {
                    self.apply_split_hugetlb(frame, huge_slot, &kept)?;
                } else {
                    // The kernel splits the shmem THP it punches into; keep
                    // khugepaged from collapsing it behind the model's back.
                    self.host.file_punch(frame, &dropped)?;
                    self.host.frame_hugepage_advice(frame, false)?;
                    // The split unmapped the kept pages; map them again
                    // (they stay in the page cache, nothing is allocated).
                    self.host.remap_present(frame)?;
                }
            }
            DiscardStep::Small { frame, freed } => {
                rep.pages_freed += freed.len() as u64;
                let pages: Vec<u16> = freed.iter().map(|p| p.0).collect();
                if self.backing == Backing::Hugetlb {
                    self.host.zero_map(frame, &pages)?;
                    let slots: Vec<u32> = freed.iter().map(|p| p.1).collect();
                    self.host.small_free(&slots)?;
                } else if !pages.is_empty() {
                    self.host.file_punch(frame, &pages)?;
                    if self.backing == Backing::Thp {
                        // A punch into a large folio splits it and unmaps the rest.
                        self.host.remap_present(frame)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Take back (re-populate) pages `[gpa, gpa + len)`; a discarded page comes
    /// back zero-filled.
    pub fn refill(&mut self, gpa: u64, len: u64, q: &dyn Quiesce) -> Result<(), GuestMemError> {
        let (first, n) = self.check_range(gpa, len)?;
        self.take_back_given(first, n)?;
        let before = self.model.clone();
        let steps = self.model.refill(first, n)?;
        self.changed.extend(
            steps
                .iter()
                .filter(|s| !s.filled.is_empty())
                .map(|s| s.frame),
        );
        let r = if self.backing == Backing::Hugetlb {
            match quiesce::pause(q) {
                Ok(_guard) => self.apply_refill(steps),
                Err(e) => Err(e.into()),
            }
        } else {
            self.apply_refill(steps)
        };
        if r.is_err() {
            self.model = before;
        }
        r
    }

    fn apply_refill(&mut self, steps: Vec<RefillStep>) -> Result<(), GuestMemError> {
        for RefillStep { frame, filled } in steps {
            if filled.is_empty() {
                continue;
            }
            if self.backing == Backing::Hugetlb {
                // Fresh slots are holes of the small memfd: they read zero.
                self.host.small_map(frame, &filled, true)?;
            } else {
                let pages: Vec<u16> = filled.iter().map(|f| f.0).collect();
                if self.backing == Backing::Thp {
                    // The model refills with small pages (a whole-frame discard
                    // left the frame unpopulated); without this the fault
                    // below would let the kernel allocate a huge page behind
                    // the model's back. Collapse clears the advice again.
                    self.host.frame_hugepage_advice(frame, false)?;
                }
                // The memfd still holds whatever a vCPU wrote to the discarded
                // page since; punch again so the page comes back zero.
                self.host.file_punch(frame, &pages)?;
                for (p, n) in crate::host_mem::page_runs(&pages) {
                    self.host.file_populate(frame, p, n)?;
                }
            }
        }
        Ok(())
    }

    /// Split huge `frame` into small pages, keeping every byte (no-op for a
    /// frame that is not huge). The vCPUs are paused through `q` while the
    /// pages are copied and remapped.
    pub fn split(&mut self, frame: usize, q: &dyn Quiesce) -> Result<(), GuestMemError> {
        self.check_huge_backing("split")?;
        self.check_frame(frame)?;
        self.settle_give_backs(frame as u64 * PAGES_PER_HPAGE, PAGES_PER_HPAGE, q)?;
        let before = self.model.clone();
        let plan = self.model.split(frame)?;
        let SplitPlan::Split {
            frame,
            huge_slot,
            copied,
        } = plan
        else {
            return Ok(());
        };
        self.changed.insert(frame);
        let r = match quiesce::pause(q) {
            Ok(_guard) => match self.backing {
                Backing::Hugetlb => self.apply_split_hugetlb(frame, huge_slot, &copied),
                _ => self
                    .host
                    .thp_split(frame, None)
                    .and_then(|()| self.host.frame_hugepage_advice(frame, false))
                    .and_then(|()| self.host.remap_present(frame)),
            },
            Err(e) => Err(e.into()),
        };
        if r.is_err() {
            self.model = before;
        }
        r
    }

    /// Move the present pages `copied` (page, new small slot) of huge `frame`
    /// to small pages; the pages not listed become zero pages.
    fn apply_split_hugetlb(
        &mut self,
        frame: usize,
        huge_slot: u32,
        copied: &[(u16, u32)],
    ) -> Result<(), GuestMemError> {
        // Copy out first, then replace the whole hugetlb mapping (it can only
        // be unmapped 2M at a time) with zero pages, then map the kept pages.
        self.host.copy_to_small(frame, copied)?;
        self.host.zero_map(frame, &all_pages())?;
        self.host.small_map(frame, copied, true)?;
        self.host.huge_free(huge_slot)
    }

    /// Collapse `frame` back into one huge page (pages not present come back
    /// zero; no-op for a huge frame). For `hugetlb` the vCPUs are paused
    /// through `q` while the pages are copied; for `thp` the kernel collapses
    /// in place (`MADV_COLLAPSE`).
    pub fn collapse(&mut self, frame: usize, q: &dyn Quiesce) -> Result<(), GuestMemError> {
        self.check_huge_backing("collapse")?;
        self.check_frame(frame)?;
        let before = self.model.clone();
        let plan = self.model.collapse(frame)?;
        let CollapsePlan::Collapse {
            frame,
            huge_slot,
            copy,
            zero: _,
            free_small,
        } = plan
        else {
            return Ok(());
        };
        self.changed.insert(frame);
        let r = match self.backing {
            Backing::Hugetlb => match quiesce::pause(q) {
                Ok(_guard) => self.apply_collapse_hugetlb(frame, huge_slot, &copy, &free_small),
                Err(e) => Err(e.into()),
            },
            _ => self.host.thp_collapse(frame),
        };
        if r.is_err() {
            self.model = before;
        }
        r
    }

    fn apply_collapse_hugetlb(
        &mut self,
        frame: usize,
        huge_slot: u32,
        copy: &[(u16, u32)],
        free_small: &[u32],
    ) -> Result<(), GuestMemError> {
        // A fresh hugetlb page is zero-filled: the `zero` pages need nothing.
        self.host.huge_alloc(huge_slot)?;
        let pages: Vec<u16> = copy.iter().map(|p| p.0).collect();
        self.host.copy_to_huge(frame, huge_slot, &pages)?;
        self.host.huge_map(frame, huge_slot)?;
        self.host.small_free(free_small)
    }

    /// Frames whose host mapping changed since the last call, in frame
    /// order: each change fired the host's mmu notifier over
    /// (part of) the frame, so KVM dropped its mappings there. The KVM mirror
    /// replays them as invalidations of the whole frame.
    pub fn take_changed_frames(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.changed).into_iter().collect()
    }

    /// Our books: the state of every frame.
    pub fn frame_states(&self) -> Vec<FrameView> {
        (0..self.frames).map(|f| self.model.frame(f)).collect()
    }

    /// The host's view of guest RAM: smaps totals and per-frame PMD mapping.
    pub fn host_view(&self) -> Result<HostView, GuestMemError> {
        let base = self.host_addr();
        let vmas = smaps::read_vmas(base, base + self.size)?;
        Ok(HostView {
            smaps: smaps::sum(&vmas),
            pmd_mapped: pagemap::pmd_mapped_frames(base, self.frames)?,
        })
    }

    /// Pool accounting: our books and the host's counters.
    pub fn pool_stats(&self) -> PoolStats {
        let pool = self.model.huge_pool();
        let (pool_bytes, data_bytes) = self.host.allocated_bytes().unwrap_or((0, 0));
        PoolStats {
            backing: self.backing,
            requested: self.requested_pool,
            capacity: pool.capacity(),
            used: pool.used_count(),
            free: pool.free_count(),
            pool_memfd_bytes: pool_bytes,
            data_memfd_bytes: data_bytes,
            host: backing::hugetlb_2m_counters(&self.host_paths).ok(),
        }
    }

    /// Read guest memory without faulting anything in (discarded pages read
    /// as zero and stay unbacked).
    pub fn read_no_populate(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let len = buf.len() as u64;
        if gpa.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(GuestMemError::RangeOutsideRam {
                gpa,
                len,
                size: self.size,
            });
        }
        // A frame given back whole is a hole of the pool until touched:
        // reading it through the mapping would fault a huge page in.
        let mut done = 0usize;
        while done < buf.len() {
            let at = gpa + done as u64;
            let frame = (at / HPAGE_SIZE) as usize;
            let n = ((HPAGE_SIZE - at % HPAGE_SIZE) as usize).min(buf.len() - done);
            if self.give_back.is_released(frame) {
                buf[done..done + n].fill(0);
            } else {
                self.host.read_no_populate(at, &mut buf[done..done + n])?;
            }
            done += n;
        }
        Ok(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        let views =
            Arc::strong_count(&self.region) > 1 || Arc::strong_count(&self.region.get_mmap()) > 2;
        if views {
            warn!(
                "guest RAM dropped while vm-memory views of it are alive: replacing it with \
                 zero pages and leaking the address range"
            );
            self.host.leak_range();
        }
    }
}
