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
use crate::split_windows::{SplitWindow, SplitWindows};
use crate::stats::{DiscardReport, HostView, PoolStats};
use crate::{pagemap, smaps, FRAMES_PER_GIG, HPAGE_SIZE, PAGES_PER_HPAGE, PAGE_SIZE};
use thp::ram_model as model;

pub use model::FrameView;
use model::{CollapsePlan, DiscardStep, PopulatePlan, RamModel, RefillStep, SplitPlan};

pub use crate::layout::MAX_RAM_SIZE;
use crate::layout::{RamLayout, RamSlot};

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
    /// Cut guest RAM into memslots of at most this many bytes (a 4K
    /// multiple; default: one memslot per RAM region).
    pub memslot_size: Option<u64>,
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
            memslot_size: None,
        }
    }
}

/// Guest RAM: one 2M-aligned host range over memfds, frame by frame huge or small.
#[derive(Debug)]
pub struct GuestRam {
    pub(crate) backing: Backing,
    size: u64,
    /// Frames of guest-physical space (the MMIO hole's included).
    pub(crate) frames: usize,
    layout: RamLayout,
    slots: Vec<RamSlot>,
    requested_pool: usize,
    host_paths: HostPaths,
    pub(crate) model: RamModel,
    /// One vm-memory region per RAM region.
    regions: Vec<Arc<GuestRegionMmap>>,
    pub(crate) host: HostMem,
    /// Frames whose host mapping changed (each such change fires the
    /// host's mmu notifier over the frame) since [`GuestRam::take_changed_frames`].
    pub(crate) changed: std::collections::BTreeSet<usize>,
    /// 4K pages of small frames whose host mapping changed alone (a discard
    /// that punched or remapped only them), since
    /// [`GuestRam::take_changed_pages`].
    changed_pages: std::collections::BTreeMap<usize, Vec<u16>>,
    /// Balloon give-backs: pages coalesced per frame, the deferred-split
    /// queue, frames given back whole (see `give_back.rs`).
    pub(crate) give_back: crate::give_back_state::GiveBackState,
    /// How long each split without a pause held back writes to its frame.
    split_windows: Arc<SplitWindows>,
    /// Split blocks the split reserve keeps (as its worker last asked,
    /// `split_block_to_prepare`); a collapse gives its frame's block to the
    /// reserve while it has fewer (`crate::split_reserve`).
    pub(crate) split_reserve_target: usize,
}

const PPH: usize = PAGES_PER_HPAGE as usize;

/// The one guest RAM size check: `size` must be a positive multiple of 2 MiB
/// and at most [`MAX_RAM_SIZE`] (the rule lives in [`RamLayout::new`]).
/// Returns the number of 2M frames of RAM (the 32-bit MMIO hole excluded).
/// Every layer that takes a RAM size from a user or a file (`vmm run`,
/// `vmm stress`, replay files) checks it here, so the rule has one home.
pub fn check_ram_size(size: u64) -> Result<usize, GuestMemError> {
    RamLayout::new(size).map(|l| l.ram_frames())
}

/// How many pool slots fit on the host (hugetlb): the requested count, or in
/// the default mode what is free now (with a warning).
fn fit_pool(cfg: &GuestRamConfig, want: usize) -> Result<usize, GuestMemError> {
    if want == 0 {
        return Ok(0);
    }
    let c = backing::hugetlb_2m_counters(&cfg.host)?;
    fit(
        cfg,
        want,
        &c,
        "small pages for",
        "frames",
        |need, have, suggest_total| GuestMemError::PoolTooSmall {
            need,
            have,
            suggest_total,
        },
    )
}

/// `want` pages of a host pool whose counters are `c`: all of them, or in the
/// default mode what is free now, with a warning that the rest (`unit`s)
/// falls back to `fallback`; `too_small(need, have, suggest_total)` is the
/// error of strict mode.
fn fit(
    cfg: &GuestRamConfig,
    want: usize,
    c: &crate::smaps::HugeMeminfo,
    fallback: &str,
    unit: &str,
    too_small: impl Fn(u64, u64, u64) -> GuestMemError,
) -> Result<usize, GuestMemError> {
    let have = c.available();
    if have >= want as u64 {
        return Ok(want);
    }
    let e = too_small(want as u64, have, c.total + (want as u64 - have));
    if cfg.strict_pool {
        return Err(e);
    }
    warn!(
        "{e}; falling back to {fallback} {} of {want} {unit}",
        want as u64 - have
    );
    Ok(have as usize)
}

/// The 1G frames whose 512 frames are all RAM (the MMIO hole's GiB and a
/// partial last GiB are not).
fn whole_gigs(layout: &RamLayout) -> Vec<usize> {
    (0..layout.span_frames() / FRAMES_PER_GIG)
        .filter(|g| (g * FRAMES_PER_GIG..(g + 1) * FRAMES_PER_GIG).all(|f| layout.frame_is_ram(f)))
        .collect()
}

/// How many 1G pages to take (`hugetlb-1g`): one per whole GiB of RAM, or
/// in the default mode what the host has free now (with a warning); none
/// where the host has no 1G pages at all (with a warning), unless strict.
fn fit_gig_pool(cfg: &GuestRamConfig, want: usize) -> Result<usize, GuestMemError> {
    if want == 0 {
        return Ok(0);
    }
    let c = match backing::hugetlb_1g_counters(&cfg.host) {
        Ok(c) => c,
        Err(e) if !cfg.strict_pool => {
            warn!("{e}; guest RAM uses 2M frames only");
            return Ok(0);
        }
        Err(e) => return Err(e),
    };
    fit(
        cfg,
        want,
        &c,
        "2M frames for",
        "GiBs",
        |need, have, suggest_total| GuestMemError::GigPoolTooSmall {
            need,
            have,
            suggest_total,
        },
    )
}

/// Take slots `0..count` of a pool from the host now, one by one (`alloc`),
/// so that no other process can take them later; `need` pages are what the
/// guest RAM wanted. When the host runs dry: in the default mode a warning
/// (naming `what`) and the count taken; in strict mode the error
/// `too_small(need, have, suggest_total)` from the host's counters now.
fn take_from_host(
    cfg: &GuestRamConfig,
    count: usize,
    need: usize,
    what: &str,
    alloc: impl Fn(u32) -> Result<(), GuestMemError>,
    counters: impl Fn() -> Result<crate::smaps::HugeMeminfo, GuestMemError>,
    too_small: impl Fn(u64, u64, u64) -> GuestMemError,
) -> Result<usize, GuestMemError> {
    for slot in 0..count {
        match alloc(slot as u32) {
            Ok(()) => {}
            Err(GuestMemError::HostPoolExhausted { .. }) if !cfg.strict_pool => {
                warn!(
                    "host ran dry at {slot} of {count} pages (taken meanwhile by another \
                     process): {what}"
                );
                return Ok(slot);
            }
            Err(GuestMemError::HostPoolExhausted { .. }) => {
                let c = counters()?;
                return Err(too_small(
                    need as u64,
                    slot as u64 + c.available(),
                    c.total + need.saturating_sub(slot) as u64,
                ));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(count)
}

/// Every page is populated at start: what the hugetlb pool does not hold
/// comes from ordinary memory, which must be available now.
fn check_host_can_back(size: u64, pool_pages: usize) -> Result<(), GuestMemError> {
    let huge = pool_pages as u64 * HPAGE_SIZE;
    let need = size.saturating_sub(huge);
    if need == 0 {
        return Ok(());
    }
    let available = smaps::read_mem_available()?;
    if need > available {
        return Err(GuestMemError::HostCannotBack {
            size,
            need,
            huge,
            available,
        });
    }
    Ok(())
}

impl GuestRam {
    /// Create guest RAM: check the host, reserve the 2M-aligned range, create
    /// the memfds. Nothing is populated yet (see [`GuestRam::populate_all`]).
    pub fn new(cfg: &GuestRamConfig) -> Result<GuestRam, GuestMemError> {
        let layout = RamLayout::new(cfg.size)?;
        // Check the slot size before anything is allocated.
        layout.memslots(0, cfg.memslot_size)?;
        let frames = layout.span_frames();
        let ram_frames = layout.ram_frames();
        // hugetlb-1g: every whole GiB of RAM on a 1G page while the host has them.
        let gig_capacity = if cfg.backing == Backing::Hugetlb1g {
            fit_gig_pool(cfg, whole_gigs(&layout).len())?
        } else {
            0
        };
        let gig_frames = gig_capacity * FRAMES_PER_GIG;
        let (requested_pool, policy) = match cfg.backing {
            Backing::Hugetlb => (
                cfg.hugetlb_pool_pages.unwrap_or(ram_frames).min(ram_frames),
                cfg.policy,
            ),
            // The frames outside the 1G pages, and room for one 1G split
            // (each of its 2M frames keeps a 2M page).
            Backing::Hugetlb1g => (
                cfg.hugetlb_pool_pages
                    .unwrap_or(ram_frames - gig_frames + gig_frames.min(FRAMES_PER_GIG))
                    .min(ram_frames),
                cfg.policy,
            ),
            Backing::Thp => {
                backing::check_shmem_thp(&cfg.host)?;
                (ram_frames, cfg.policy)
            }
            Backing::Small4k => (0, ThpPolicy::never()),
        };
        let mut capacity = match cfg.backing {
            Backing::Hugetlb | Backing::Hugetlb1g => fit_pool(cfg, requested_pool)?,
            _ => requested_pool,
        };
        // Only the hugetlb backings have a pool of their own; thp and 4k come
        // from ordinary memory whole.
        let huge_pages = match cfg.backing {
            Backing::Hugetlb | Backing::Hugetlb1g => capacity,
            _ => 0,
        };
        check_host_can_back(cfg.size, (huge_pages + gig_frames).min(ram_frames))?;
        let host = HostMem::new(cfg.backing, layout.span(), capacity, gig_capacity)?;
        let gig_capacity = take_from_host(
            cfg,
            gig_capacity,
            gig_capacity,
            "1G pool; the other GiBs use 2M frames",
            |slot| host.gig_alloc(slot),
            || backing::hugetlb_1g_counters(&cfg.host),
            |need, have, suggest_total| GuestMemError::GigPoolTooSmall {
                need,
                have,
                suggest_total,
            },
        )?;
        if cfg.backing.is_hugetlb() {
            // Take the pool's pages from the host now, so that populating never
            // finds the host pool empty because of a race with another process.
            // Not the room for 1G splits (hugetlb-1g): a split takes its pages
            // when it runs (and fails cleanly, 1G page kept, if the host has
            // none left then).
            let populated = if cfg.backing == Backing::Hugetlb1g {
                capacity.min(ram_frames - gig_frames)
            } else {
                capacity
            };
            let taken = take_from_host(
                cfg,
                populated,
                requested_pool,
                "hugetlb pool; the other frames fall back to small pages",
                |slot| host.huge_alloc(slot),
                || backing::hugetlb_2m_counters(&cfg.host),
                |need, have, suggest_total| GuestMemError::PoolTooSmall {
                    need,
                    have,
                    suggest_total,
                },
            )?;
            if taken < populated {
                capacity = taken;
            }
        }
        let model = match cfg.backing {
            Backing::Thp => RamModel::shmem(frames, capacity, policy),
            _ => RamModel::new(frames, capacity, policy).with_gig_pool(gig_capacity),
        };
        let regions = Self::build_regions(&host, &layout)?;
        let slots = layout.memslots(host.range().base(), cfg.memslot_size)?;
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
            layout,
            slots,
            requested_pool,
            host_paths: cfg.host.clone(),
            model,
            regions,
            host,
            changed: Default::default(),
            changed_pages: Default::default(),
            give_back: Default::default(),
            split_windows: Arc::default(),
            split_reserve_target: 0,
        })
    }

    /// Fault injection, to prove a checker catches a broken barrier (`vmm
    /// stress --inject-bug no-write-hold`): from now on a hugetlb split (and
    /// a collapse of a frame with every page present) copies its frame with
    /// the vCPUs running but without write-protecting it, so a write made
    /// during the copy is lost. Never set otherwise.
    pub fn inject_split_without_write_hold(&mut self) {
        self.host.copy_unheld = true;
    }

    /// Where each hugetlb split made without a pause records how long it
    /// held back writes to its frame.
    pub fn split_windows(&self) -> Arc<SplitWindows> {
        self.split_windows.clone()
    }

    fn build_regions(
        host: &HostMem,
        layout: &RamLayout,
    ) -> Result<Vec<Arc<GuestRegionMmap>>, GuestMemError> {
        let r = host.range();
        let mut v = Vec::new();
        for reg in layout.regions() {
            // SAFETY: the host range covers guest-physical [0, span) one to
            // one and every RAM region lies inside it; it is mapped read-write
            // for the whole life of `HostMem` (frames are only ever replaced
            // with MAP_FIXED inside it), and `GuestRam`'s Drop keeps it mapped
            // while any view built here is alive.
            let mmap = unsafe {
                MmapRegion::build_raw(
                    r.ptr(reg.gpa),
                    reg.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                )
            }
            .map_err(|e| GuestMemError::VmMemory(e.to_string()))?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(reg.gpa))
                .ok_or_else(|| GuestMemError::VmMemory("region end overflows".into()))?;
            v.push(Arc::new(region));
        }
        Ok(v)
    }

    /// Where RAM lies in guest-physical space.
    pub fn layout(&self) -> RamLayout {
        self.layout
    }

    /// The memslots over guest RAM (one per region, or `memslot_size` pieces).
    pub fn memslots(&self) -> &[RamSlot] {
        &self.slots
    }

    /// Describes the RAM regions, for messages.
    fn describe_ram(&self) -> String {
        self.layout
            .regions()
            .iter()
            .map(|r| match r.gpa {
                0 => format!("[0, {:#x})", r.range().end),
                g => format!("[{g:#x}, {:#x})", r.range().end),
            })
            .collect::<Vec<_>>()
            .join(" and ")
    }

    /// Host address of guest-physical 0 (2M aligned).
    pub fn host_addr(&self) -> u64 {
        self.host.range().base()
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// End of guest-physical RAM: the host range's size (the MMIO hole
    /// included when RAM goes above it).
    pub fn span(&self) -> u64 {
        self.layout.span()
    }

    /// Number of 2M frames of guest-physical space `[0, span)` (the MMIO
    /// hole's frames included; they are never populated).
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// The backing.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The vm-memory view: one region per RAM region, gpa `g` at
    /// [`GuestRam::host_addr`] + `g`.
    pub fn memory(&self) -> GuestMemoryMmap {
        GuestMemoryMmap::from_arc_regions(self.regions.iter().map(Arc::clone).collect())
            .unwrap_or_default()
    }

    pub(crate) fn check_frame(&self, frame: usize) -> Result<(), GuestMemError> {
        if frame >= self.frames {
            return Err(GuestMemError::FrameOutOfRange {
                frame,
                frames: self.frames,
            });
        }
        if !self.layout.frame_is_ram(frame) {
            return Err(GuestMemError::FrameInHole { frame });
        }
        Ok(())
    }

    pub(crate) fn check_range(&self, gpa: u64, len: u64) -> Result<(u64, u64), GuestMemError> {
        if !self.layout.contains(gpa, len) {
            return Err(GuestMemError::RangeOutsideRam {
                gpa,
                len,
                ram: self.describe_ram(),
            });
        }
        if len == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(GuestMemError::RangeNotPageAligned { gpa, len });
        }
        Ok((gpa / PAGE_SIZE, len / PAGE_SIZE))
    }

    pub(crate) fn check_huge_backing(&self, op: &'static str) -> Result<(), GuestMemError> {
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

    /// Populate every frame of RAM: each whole GiB on a 1G page first while
    /// the 1G pool has one (`hugetlb-1g`), then frame by frame.
    pub fn populate_all(&mut self) -> Result<(), GuestMemError> {
        let layout = self.layout;
        if self.model.gig_pool().capacity() > 0 {
            for g in whole_gigs(&layout) {
                self.populate_gig(g)?;
            }
        }
        for f in layout.ram_frame_indices() {
            self.populate(f)?;
        }
        Ok(())
    }

    fn apply_populate(&mut self, frame: usize, plan: PopulatePlan) -> Result<(), GuestMemError> {
        match (self.backing, plan) {
            (_, PopulatePlan::AlreadyPopulated) => Ok(()),
            (Backing::Hugetlb | Backing::Hugetlb1g, PopulatePlan::Huge { slot }) => {
                match self.host.take_warm_huge(slot) {
                    // Allocated and zeroed ahead: its staging map goes.
                    Some(map) => self.host.retire_staging(map),
                    None => self.host.huge_alloc(slot)?,
                }
                self.host.huge_map(frame, slot)
            }
            (Backing::Hugetlb | Backing::Hugetlb1g, PopulatePlan::Small { slots }) => {
                let pages = crate::host_mem::in_page_order(&slots);
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
        self.split_gigs_over(first, n, q)?;
        let steps = self.model.discard(first, n)?;
        for s in &steps {
            self.note_discard(s);
        }
        let mut rep = DiscardReport::default();
        for step in steps {
            self.apply_discard_step(step, &mut rep, q)?;
        }
        Ok(rep)
    }

    /// Act on one frame's discard plan, pausing the vCPUs through `q` only
    /// for what must not race with them: the copy and remap of a hugetlb
    /// split (see [`Self::split_hugetlb`]). The only way a discard step
    /// reaches the host: no hugetlb split runs without the pause.
    pub(crate) fn apply_discard_step(
        &mut self,
        step: DiscardStep,
        rep: &mut DiscardReport,
        q: &dyn Quiesce,
    ) -> Result<(), GuestMemError> {
        match step {
            DiscardStep::SplitHuge {
                frame,
                huge_slot,
                kept,
                dropped,
            } if self.backing.is_hugetlb() => {
                rep.frames_split += 1;
                rep.pages_freed += dropped.len() as u64;
                self.split_hugetlb(frame, huge_slot, &kept, q)
            }
            step => self.apply_unpaused_step(step, rep),
        }
    }

    /// Record what a discard step changes on the host: hugetlb remaps and
    /// 4k punches exactly the freed pages of a small frame; a punch into a
    /// shmem THP frame unmaps all of it (`remap_present`), and splits and
    /// whole-frame frees change the whole frame.
    pub(crate) fn note_discard(&mut self, step: &DiscardStep) {
        match step {
            DiscardStep::Small { frame, freed } if self.backing != Backing::Thp => self
                .changed_pages
                .entry(*frame)
                .or_default()
                .extend(freed.iter().map(|p| p.0)),
            DiscardStep::WholeHuge { frame, .. }
            | DiscardStep::SplitHuge { frame, .. }
            | DiscardStep::Small { frame, .. } => {
                self.changed.insert(*frame);
            }
        }
    }

    /// The discard steps that need no vCPU pause: every step but a hugetlb
    /// split, which [`Self::apply_discard_step`] takes before it gets here.
    fn apply_unpaused_step(
        &mut self,
        step: DiscardStep,
        rep: &mut DiscardReport,
    ) -> Result<(), GuestMemError> {
        match step {
            DiscardStep::WholeHuge { frame, slot } => {
                rep.huge_frames_freed += 1;
                rep.pages_freed += PAGES_PER_HPAGE;
                if self.backing.is_hugetlb() {
                    self.host.zero_map(frame, &crate::host_mem::all_pages())?;
                    self.host.huge_free(slot)?;
                } else {
                    self.host.file_punch(frame, &crate::host_mem::all_pages())?;
                }
            }
            DiscardStep::SplitHuge {
                frame,
                huge_slot,
                kept: _,
                dropped,
            } => {
                rep.frames_split += 1;
                rep.pages_freed += dropped.len() as u64;
                if self.backing.is_hugetlb() {
                    // Unreachable: apply_discard_step splits hugetlb frames
                    // under the pause. Refuse rather than race the vCPUs.
                    return Err(GuestMemError::UnpausedSplit { frame, huge_slot });
                } else {
                    // The kernel splits the shmem THP it punches into; keep
                    // khugepaged from collapsing it behind the model's back.
                    self.host.file_punch_freed(frame, &dropped)?;
                    self.host.frame_hugepage_advice(frame, false)?;
                    // The split unmapped the kept pages; map them again
                    // (they stay in the page cache, nothing is allocated).
                    self.host.remap_present(frame)?;
                }
            }
            DiscardStep::Small { frame, freed } => {
                rep.pages_freed += freed.len() as u64;
                let pages: Vec<u16> = freed.iter().map(|p| p.0).collect();
                if self.backing.is_hugetlb() {
                    self.host.zero_map(frame, &pages)?;
                    let slots: Vec<u32> = freed.iter().map(|p| p.1).collect();
                    self.host.small_free(&slots)?;
                } else if !pages.is_empty() {
                    self.host.file_punch_freed(frame, &pages)?;
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
        self.undoable(|ram| {
            let steps = ram.model.refill(first, n)?;
            ram.changed.extend(
                steps
                    .iter()
                    .filter(|s| !s.filled.is_empty())
                    .map(|s| s.frame),
            );
            let _guard = if ram.backing.is_hugetlb() {
                Some(quiesce::pause(q)?)
            } else {
                None
            };
            ram.apply_refill(steps)
        })
    }

    /// Runs `op` (a model operation and the host work its plan asks for)
    /// in a model transaction: on error the model is rolled back exactly
    /// as it was, at the cost of what `op` touched (no copy of the model).
    pub(crate) fn undoable<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T, GuestMemError>,
    ) -> Result<T, GuestMemError> {
        self.model.checkpoint();
        let r = op(self);
        if r.is_ok() {
            self.model.commit();
        } else {
            self.model.rollback();
        }
        r
    }

    fn apply_refill(&mut self, steps: Vec<RefillStep>) -> Result<(), GuestMemError> {
        for RefillStep { frame, filled } in steps {
            if filled.is_empty() {
                continue;
            }
            if self.backing.is_hugetlb() {
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
        // A frame of a 1G page: 1G -> 2M first, then this frame 2M -> 4K.
        self.split_gigs_over(frame as u64 * PAGES_PER_HPAGE, PAGES_PER_HPAGE, q)?;
        let mut block = None;
        let r = self.undoable(|ram| {
            let SplitPlan::Split {
                frame,
                huge_slot,
                copied,
            } = ram.model.split(frame)?
            else {
                return Ok(());
            };
            block = crate::host_mem::block_base(&copied);
            ram.changed.insert(frame);
            if !ram.backing.is_hugetlb() {
                let _guard = quiesce::pause(q)?;
                return ram
                    .host
                    .thp_split(frame, None)
                    .and_then(|()| ram.host.frame_hugepage_advice(frame, false))
                    .and_then(|()| ram.host.remap_present(frame));
            }
            ram.split_hugetlb(frame, huge_slot, &copied, q)
        });
        if let (Err(_), Some(base)) = (&r, block) {
            self.after_failed_split(base);
        }
        r
    }

    /// Move the present pages `pages` (page, new small slot) of huge `frame`
    /// to small pages, the others becoming zero pages, with the vCPUs
    /// running. Allocating the small pages happens first; then the frame
    /// is write-protected (only a writer of this frame waits) and copied;
    /// then one `mmap` swaps the huge page for the frame's block of small
    /// pages and the held writers go on there.
    /// Where the host cannot write-protect the frame (or the pages are not
    /// one block), the copy and the remap happen with every vCPU paused
    /// through `q` instead. Mapping the small pages in and freeing the huge
    /// page come last. When the pause or the remap fails the frame keeps
    /// its huge page and the prepared small slots are freed.
    fn split_hugetlb(
        &mut self,
        frame: usize,
        huge_slot: u32,
        pages: &[(u16, u32)],
        q: &dyn Quiesce,
    ) -> Result<(), GuestMemError> {
        let prepared = self.host.split_prepare(pages)?;
        let windows = self.split_windows.clone();
        let hold = windows.hold_on();
        let switched = if let Some(hold) = hold.filter(|_| self.host.split_copy_held(frame, pages))
        {
            let r = self.host.split_switch(frame, huge_slot, pages, true);
            self.host.split_release(frame, r.is_ok());
            if r.is_ok() {
                windows.record(SplitWindow {
                    write_hold: hold.elapsed(),
                    collapse: false,
                    prepared,
                });
            }
            r
        } else {
            match quiesce::pause(q) {
                Ok(_guard) => self.host.split_switch(frame, huge_slot, pages, false),
                Err(e) => Err(e.into()),
            }
        };
        if let Err(e) = switched {
            self.free_prepared_small(pages);
            return Err(e);
        }
        self.host.split_finish(frame, huge_slot, pages)
    }

    /// After a split that did not happen: punch the small slots it
    /// prepared, so the small memfd holds what the rolled-back books say.
    fn free_prepared_small(&mut self, pages: &[(u16, u32)]) {
        if let Err(e) = self.host.split_unprepare(pages) {
            warn!("freeing the small slots of a failed split: {e}");
        }
    }

    /// Collapse `frame` back into one huge page (pages not present come back
    /// zero; no-op for a huge frame). For `hugetlb` the vCPUs are paused
    /// through `q` while the pages are copied; for `thp` the kernel collapses
    /// in place (`MADV_COLLAPSE`).
    /// `hugetlb-1g`: once the frame is huge, its whole GiB climbs back to one
    /// 1G page when all its 512 frames are huge and the 1G pool has a page
    /// ([`Self::collapse_gig`]; a failure there leaves the 2M frames).
    pub fn collapse(&mut self, frame: usize, q: &dyn Quiesce) -> Result<(), GuestMemError> {
        self.check_huge_backing("collapse")?;
        self.check_frame(frame)?;
        if self.gig_of(frame).is_some() {
            return Ok(());
        }
        self.collapse_2m(frame, q)?;
        self.climb_to_gig(frame, q);
        Ok(())
    }

    fn collapse_2m(&mut self, frame: usize, q: &dyn Quiesce) -> Result<(), GuestMemError> {
        let mut slot = None;
        let freed = self.undoable(|ram| {
            let CollapsePlan::Collapse {
                frame,
                huge_slot,
                copy,
                zero: _,
                free_small,
            } = ram.model.collapse(frame)?
            else {
                return Ok(None);
            };
            ram.changed.insert(frame);
            if !ram.backing.is_hugetlb() {
                return ram.host.thp_collapse(frame).map(|()| None);
            }
            // Taking the huge page (zeroed by the kernel: the `zero` pages
            // need nothing) happens with the vCPUs running; only the copy
            // and the remap hold them back: every vCPU, or, when every page
            // is present (no anonymous zero page, which this kernel may not
            // write-protect), only a writer of this frame, as a split does.
            slot = Some(huge_slot);
            let warm = ram.host.huge_is_warm(huge_slot);
            let staging = ram.host.collapse_prepare(huge_slot)?;
            let windows = ram.split_windows.clone();
            let hold = (copy.len() == PAGES_PER_HPAGE as usize)
                .then(|| windows.hold_on())
                .flatten()
                .filter(|_| ram.host.hold_frame(frame, "collapsing under the pause"));
            let switched = if let Some(hold) = hold {
                let r = ram
                    .host
                    .collapse_switch(frame, huge_slot, &staging, &copy, true);
                ram.host.split_release(frame, r.is_ok());
                if r.is_ok() {
                    windows.record(SplitWindow {
                        write_hold: hold.elapsed(),
                        collapse: true,
                        prepared: warm,
                    });
                }
                r
            } else {
                match quiesce::pause(q) {
                    Ok(_guard) => ram
                        .host
                        .collapse_switch(frame, huge_slot, &staging, &copy, false),
                    Err(e) => {
                        if let Err(f) = ram.host.huge_free(huge_slot) {
                            warn!("freeing the huge slot of a failed collapse: {f}");
                        }
                        Err(e.into())
                    }
                }
            };
            ram.host.retire_staging(staging);
            switched?;
            Ok(Some((crate::host_mem::block_base(&copy), free_small)))
        });
        if let (Err(_), Some(s)) = (&freed, slot) {
            self.after_failed_collapse(s);
        }
        match freed? {
            Some((block, slots)) => self.free_collapsed_small(block, &slots),
            None => Ok(()),
        }
    }

    /// Frames whose host mapping changed since the last call, in frame
    /// order: each change fired the host's mmu notifier over
    /// (part of) the frame, so KVM dropped its mappings there. The KVM mirror
    /// replays them as invalidations of the whole frame.
    pub fn take_changed_frames(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.changed).into_iter().collect()
    }

    /// 4K pages whose host mapping changed alone since the last call (per
    /// frame, in frame order; a frame also listed by
    /// [`Self::take_changed_frames`] changed whole anyway): KVM dropped its
    /// mappings of exactly these pages.
    pub fn take_changed_pages(&mut self) -> Vec<(usize, Vec<u16>)> {
        std::mem::take(&mut self.changed_pages)
            .into_iter()
            .collect()
    }

    /// Our books: the state of `frame` (`Unpopulated` past the end), without
    /// copying every frame's.
    pub fn frame_state(&self, frame: usize) -> FrameView {
        if frame < self.frames {
            self.model.frame(frame)
        } else {
            FrameView::Unpopulated
        }
    }

    /// Our books: the state of every frame.
    pub fn frame_states(&self) -> Vec<FrameView> {
        (0..self.frames).map(|f| self.model.frame(f)).collect()
    }

    /// The host's view of guest RAM: smaps totals and per-frame PMD mapping.
    pub fn host_view(&self) -> Result<HostView, GuestMemError> {
        let base = self.host_addr();
        let vmas = smaps::read_vmas(base, base + self.layout.span())?;
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
            gig_capacity: self.model.gig_pool().capacity(),
            gig_used: self.model.gig_pool().used_count(),
            gig_memfd_bytes: self.host.gig_allocated_bytes().unwrap_or(0),
            split_reserve_bytes: self.host.warm_split_blocks() as u64 * HPAGE_SIZE,
            collapse_reserve_bytes: self.host.warm_huge_pages() as u64 * HPAGE_SIZE,
        }
    }

    /// Read guest memory without faulting anything in (discarded pages read
    /// as zero and stay unbacked).
    pub fn read_no_populate(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let len = buf.len() as u64;
        if !buf.is_empty() && !self.layout.contains(gpa, len) {
            return Err(GuestMemError::RangeOutsideRam {
                gpa,
                len,
                ram: self.describe_ram(),
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
        let views = self
            .regions
            .iter()
            .any(|r| Arc::strong_count(r) > 1 || Arc::strong_count(&r.get_mmap()) > 2);
        if views {
            warn!(
                "guest RAM dropped while vm-memory views of it are alive: replacing it with \
                 zero pages and leaking the address range"
            );
            self.host.leak_range();
        }
    }
}

/// The tests' one skip policy (`VMM_TEST_NO_SKIP` turns a skip into a failure).
#[cfg(test)]
#[path = "../../tests/src/skip.rs"]
pub(crate) mod skip_policy;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quiesce::{NoVcpus, QuiesceError};
    use vm_memory::Bytes;

    /// Pausing fails: the host fails after the model planned and the
    /// small slots or huge page were prepared.
    struct NoPause;
    impl Quiesce for NoPause {
        fn pause(&self) -> Result<(), QuiesceError> {
            Err(QuiesceError {
                reason: "injected".into(),
            })
        }
        fn resume(&self) {}
    }

    const FRAMES: usize = 4;

    fn ram() -> Option<GuestRam> {
        let free = crate::smaps::read_meminfo()
            .map(|m| m.available())
            .unwrap_or(0);
        if free < FRAMES as u64 + 8 {
            skip_policy::skip(&format!("needs {} free 2M hugetlb pages", FRAMES + 8));
            return None;
        }
        let mut cfg = GuestRamConfig::new(FRAMES as u64 * HPAGE_SIZE, Backing::Hugetlb);
        cfg.strict_pool = true;
        let mut ram = GuestRam::new(&cfg).expect("guest RAM");
        ram.populate_all().expect("populate");
        let mem = ram.memory();
        for f in 0..FRAMES as u64 {
            for p in 0..PPH as u64 {
                let a = GuestAddress(f * HPAGE_SIZE + p * PAGE_SIZE);
                mem.write_obj(f << 32 | p << 8 | 0x5a, a).expect("write");
            }
        }
        Some(ram)
    }

    /// Everything a failed operation must leave as it was: the whole model
    /// (pools, free lists, folios, counters), the memfds' backed bytes and
    /// every word the guest wrote.
    fn state(ram: &GuestRam) -> (String, (u64, u64), Vec<u64>) {
        let mem = ram.memory();
        let words = (0..FRAMES as u64 * PPH as u64)
            .map(|p| {
                mem.read_obj::<u64>(GuestAddress(p * PAGE_SIZE))
                    .expect("read")
            })
            .collect();
        (
            format!("{:?}", ram.model),
            ram.host.allocated_bytes().expect("allocated"),
            words,
        )
    }

    #[test]
    fn host_failure_mid_split_or_collapse_leaves_model_pool_and_data_as_before() {
        let Some(mut ram) = ram() else { return };
        // Frame 1 small (for collapse), frame 0 huge (for split).
        ram.split(1, &NoVcpus).expect("split");
        let before = state(&ram);

        // Where the host cannot write-protect, a split pauses the vCPUs.
        ram.host.use_write_hold(false);
        // Pausing fails after the small slots were prepared.
        assert!(ram.split(0, &NoPause).is_err());
        assert_eq!(state(&ram), before);
        // The host fails under the pause, after nothing / the copy.
        ram.host.fail_switch = true;
        assert!(ram.split(0, &NoVcpus).is_err());
        assert_eq!(state(&ram), before);
        // The host fails in the remap after the copy under the write-hold
        // (no pause: `NoPause` is never asked).
        ram.host.use_write_hold(true);
        assert!(ram.split(0, &NoPause).is_err());
        ram.host.fail_switch = false;
        assert_eq!(state(&ram), before);
        assert_eq!(ram.frame_state(0), FrameView::Huge { slot: 0 });

        // Where the host cannot write-protect, a collapse pauses the vCPUs
        // too: pausing fails after the huge page was taken.
        ram.host.use_write_hold(false);
        assert!(ram.collapse(1, &NoPause).is_err());
        assert_eq!(state(&ram), before);
        ram.host.fail_switch = true;
        assert!(ram.collapse(1, &NoVcpus).is_err());
        assert_eq!(state(&ram), before);
        // The host fails in the remap after the copy under the write-hold
        // (every page of frame 1 present: no pause asked).
        ram.host.use_write_hold(true);
        assert!(ram.collapse(1, &NoPause).is_err());
        ram.host.fail_switch = false;
        assert_eq!(state(&ram), before);
        assert!(matches!(
            ram.frame_state(1),
            FrameView::Small { present: 512 }
        ));

        // And then both work, keeping every word.
        let words = before.2;
        // No pause where the host can write-protect.
        let q: &dyn Quiesce = if ram.host.holds_writes() {
            &NoPause
        } else {
            &NoVcpus
        };
        ram.split(0, q).expect("split");
        ram.collapse(1, &NoVcpus).expect("collapse");
        assert_eq!(state(&ram).2, words);
        assert!(matches!(
            ram.frame_state(0),
            FrameView::Small { present: 512 }
        ));
        assert!(matches!(ram.frame_state(1), FrameView::Huge { .. }));
    }

    #[test]
    fn a_hugetlb_split_without_the_pause_is_refused() {
        let Some(mut ram) = ram() else { return };
        let step = ram
            .model
            .discard_frame_pages(2, &[0, 1, 2], false)
            .expect("plan");
        assert!(matches!(step, DiscardStep::SplitHuge { frame: 2, .. }));
        let before = ram.host.allocated_bytes().expect("allocated");
        let mut rep = DiscardReport::default();
        let e = ram.apply_unpaused_step(step, &mut rep).unwrap_err();
        assert!(
            matches!(e, GuestMemError::UnpausedSplit { frame: 2, .. }),
            "{e}"
        );
        // Nothing reached the host: the huge page is still there, data intact.
        assert_eq!(ram.host.allocated_bytes().expect("allocated"), before);
        let w: u64 = ram
            .memory()
            .read_obj(GuestAddress(2 * HPAGE_SIZE + 5 * PAGE_SIZE))
            .expect("read");
        assert_eq!(w, 2 << 32 | 5 << 8 | 0x5a);
    }

    /// Split frame 3 while another thread writes one word of it right
    /// after the copy; returns (whether the write was still held back 20 ms
    /// later, the word the guest reads after the split, the word written).
    fn split_with_a_write_during_the_copy(ram: &mut GuestRam) -> (Option<bool>, u64, u64) {
        with_a_write_during_the_copy(ram, |ram| {
            ram.split(3, &NoPause).expect("split without a pause")
        })
    }

    /// As [`split_with_a_write_during_the_copy`], for the collapse of frame
    /// 3 (split first, every page present), with `warm` huge pages
    /// allocated ahead.
    fn collapse_with_a_write_during_the_copy(
        ram: &mut GuestRam,
        warm: usize,
    ) -> (Option<bool>, u64, u64) {
        ram.split(3, &NoVcpus).expect("split");
        assert_eq!(ram.prepare_warm_huge_pages(warm).expect("warm"), warm);
        with_a_write_during_the_copy(ram, |ram| {
            ram.collapse(3, &NoPause).expect("collapse without a pause")
        })
    }

    /// Runs `op` (a split or collapse of frame 3) while another thread
    /// writes one word of the frame right after the copy. Held: the hook
    /// gives the writer 20 ms and records whether it is still waiting;
    /// with the hold broken (`inject_split_without_write_hold`) it waits
    /// for the write to land (at most 10 s: a loaded host may run the
    /// writer late), so the remap surely comes after it.
    fn with_a_write_during_the_copy(
        ram: &mut GuestRam,
        op: impl FnOnce(&mut GuestRam),
    ) -> (Option<bool>, u64, u64) {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Barrier, Mutex};
        let gpa = GuestAddress(3 * HPAGE_SIZE + 77 * PAGE_SIZE + 8);
        let host = (ram.host_addr() + gpa.0) as usize;
        let (go, done) = (Arc::new(Barrier::new(2)), Arc::new(AtomicBool::new(false)));
        let held = Arc::new(Mutex::new(None));
        let written = 0xfeed_f00d_u64;
        let writer = {
            let (go, done) = (go.clone(), done.clone());
            std::thread::spawn(move || {
                go.wait();
                // SAFETY: `host` is an aligned word of frame 3 of guest RAM,
                // mapped until `ram` drops, which happens after this thread
                // is joined.
                unsafe { std::ptr::write_volatile(host as *mut u64, written) };
                done.store(true, Ordering::SeqCst);
            })
        };
        let h = held.clone();
        let broken = ram.host.copy_unheld;
        ram.host.after_copy = Some(crate::host_mem::TestHook(Box::new(move || {
            go.wait();
            let t = std::time::Instant::now();
            std::thread::sleep(std::time::Duration::from_millis(20));
            while broken
                && !done.load(Ordering::SeqCst)
                && t.elapsed() < std::time::Duration::from_secs(10)
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            *h.lock().unwrap() = Some(!done.load(Ordering::SeqCst));
        })));
        op(ram);
        ram.host.after_copy = None;
        writer.join().expect("writer");
        let now: u64 = ram.memory().read_obj(gpa).expect("read");
        let held = *held.lock().unwrap();
        (held, now, written)
    }

    #[test]
    fn a_write_during_the_split_copy_is_held_back_and_kept() {
        held_write_is_kept(0);
    }

    /// The same onto a block of the split reserve: the copy goes through
    /// the block's mapping instead of `pwrite`, under the same hold.
    #[test]
    fn a_write_during_a_split_onto_the_reserve_is_held_back_and_kept() {
        held_write_is_kept(1);
    }

    fn held_write_is_kept(reserve: usize) {
        let Some(mut ram) = ram() else { return };
        if !ram.host.holds_writes() {
            skip_policy::skip("the kernel has no userfaultfd write-protect on hugetlbfs");
            return;
        }
        assert_eq!(ram.prepare_split_blocks(reserve).expect("reserve"), reserve);
        let (held, now, written) = split_with_a_write_during_the_copy(&mut ram);
        assert_eq!(ram.warm_split_blocks(), 0, "the split took the reserve");
        assert_eq!(held, Some(true), "the write went through during the split");
        assert_eq!(now, written, "the write made during the split was lost");
        assert!(matches!(
            ram.frame_state(3),
            FrameView::Small { present: 512 }
        ));
        assert_one_hold_and_the_rest_kept(&ram, false, reserve > 0);
    }

    /// One write-hold window (of a split, or a collapse) of at least the
    /// test writer's 20 ms, `prepared` as said, and every other word of
    /// frame 3 as written before.
    fn assert_one_hold_and_the_rest_kept(ram: &GuestRam, collapse: bool, prepared: bool) {
        let w: Vec<_> = ram
            .split_windows()
            .take()
            .into_iter()
            .filter(|w| w.collapse == collapse)
            .collect();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].write_hold >= std::time::Duration::from_millis(20),
            "{w:?}"
        );
        assert_eq!(w[0].prepared, prepared, "{w:?}");
        let w: u64 = ram
            .memory()
            .read_obj(GuestAddress(3 * HPAGE_SIZE + 78 * PAGE_SIZE))
            .expect("read");
        assert_eq!(w, 3 << 32 | 78 << 8 | 0x5a);
    }

    #[test]
    fn a_broken_write_hold_loses_the_write_and_the_check_sees_it() {
        broken_hold_loses_the_write(0);
    }

    #[test]
    fn a_broken_write_hold_onto_the_reserve_loses_the_write_too() {
        broken_hold_loses_the_write(1);
    }

    /// A split that fails after it took a warm block (the host punched it):
    /// the books no longer count the block as set aside, and the reserve is
    /// topped up again (the books once kept it, the worker never refilled).
    #[test]
    fn a_failed_split_onto_a_warm_block_leaves_the_reserve_exact() {
        let Some(mut ram) = ram() else { return };
        assert_eq!(ram.prepare_split_blocks(1).expect("reserve"), 1);
        ram.host.fail_switch = true;
        assert!(ram.split(0, &NoVcpus).is_err());
        ram.host.fail_switch = false;
        assert_eq!(ram.warm_split_blocks(), 0, "the host punched the block");
        assert_eq!(ram.model.prepared_split_blocks(), 0, "and the books say so");
        assert_eq!(ram.pool_stats().data_memfd_bytes, 0);
        assert_eq!(ram.prepare_split_blocks(1).expect("reserve"), 1);
        ram.split(0, &NoVcpus).expect("split");
        assert_eq!(ram.warm_split_blocks(), 0, "onto the new block");
    }

    /// The same for a collapse onto a warm huge page.
    #[test]
    fn a_failed_collapse_onto_a_warm_huge_page_leaves_the_reserve_exact() {
        let Some(mut ram) = ram() else { return };
        ram.split(1, &NoVcpus).expect("split");
        assert_eq!(ram.prepare_warm_huge_pages(1).expect("warm"), 1);
        ram.host.fail_switch = true;
        assert!(ram.collapse(1, &NoVcpus).is_err());
        ram.host.fail_switch = false;
        assert_eq!(ram.warm_huge_pages(), 0, "the host punched the page");
        assert_eq!(ram.model.warm_huge_count(), 0, "and the books say so");
        assert_eq!(
            ram.pool_stats().pool_memfd_bytes,
            (FRAMES as u64 - 1) * HPAGE_SIZE
        );
        assert_eq!(ram.prepare_warm_huge_pages(1).expect("warm"), 1);
        ram.collapse(1, &NoVcpus).expect("collapse");
        assert_eq!(ram.warm_huge_pages(), 0, "onto the new page");
    }

    /// A collapse of a frame with every page present holds back a write to
    /// it instead of pausing the vCPUs (`NoPause` refuses any pause), the
    /// write lands in the huge page; onto a warm huge page too.
    #[test]
    fn a_write_during_the_collapse_copy_is_held_back_and_kept() {
        for warm in [0, 1] {
            let Some(mut ram) = ram() else { return };
            if !ram.host.holds_writes() {
                skip_policy::skip("the kernel has no userfaultfd write-protect on shmem");
                return;
            }
            let (held, now, written) = collapse_with_a_write_during_the_copy(&mut ram, warm);
            assert_eq!(
                held,
                Some(true),
                "the write went through during the collapse"
            );
            assert_eq!(now, written, "the write made during the collapse was lost");
            assert!(matches!(ram.frame_state(3), FrameView::Huge { .. }));
            assert_one_hold_and_the_rest_kept(&ram, true, warm > 0);
        }
    }

    /// The frame's small pages paged out first (`MADV_PAGEOUT`: their page
    /// table entries gone, the pages in the page cache): the write-protect
    /// covers the empty entries too (the kernel's markers on shmem), so the
    /// write is still held back and kept.
    #[test]
    fn a_write_during_the_collapse_of_a_paged_out_frame_is_held_back_and_kept() {
        let Some(mut ram) = ram() else { return };
        if !ram.host.holds_writes() {
            skip_policy::skip("the kernel has no userfaultfd write-protect on shmem");
            return;
        }
        ram.split(3, &NoVcpus).expect("split");
        let start = ram.host_addr() + 3 * HPAGE_SIZE;
        let read = || crate::page_moves::PageFrames::read(start, PPH).expect("pagemap");
        let before = read();
        ram.page_out_frame(3).expect("page-out");
        if let (Some(b), Some(a)) = (before, read()) {
            assert_eq!(
                b.moved_to(&a).pages,
                PPH as u64,
                "page-out unmapped every page"
            );
        }
        let (held, now, written) = with_a_write_during_the_copy(&mut ram, |ram| {
            ram.collapse(3, &NoPause).expect("collapse without a pause")
        });
        assert_eq!(
            held,
            Some(true),
            "the write went through during the collapse"
        );
        assert_eq!(now, written, "the write made during the collapse was lost");
    }

    #[test]
    fn a_broken_write_hold_loses_a_write_during_the_collapse_too() {
        let Some(mut ram) = ram() else { return };
        ram.inject_split_without_write_hold();
        let (held, now, written) = collapse_with_a_write_during_the_copy(&mut ram, 0);
        assert_eq!(held, Some(false), "nothing held the write");
        assert_ne!(now, written, "the broken barrier must lose the write");
        assert_eq!(now, 0, "the word from before the copy (never written)");
    }

    fn broken_hold_loses_the_write(reserve: usize) {
        let Some(mut ram) = ram() else { return };
        ram.inject_split_without_write_hold();
        assert_eq!(ram.prepare_split_blocks(reserve).expect("reserve"), reserve);
        let (held, now, written) = split_with_a_write_during_the_copy(&mut ram);
        assert_eq!(held, Some(false), "nothing held the write");
        assert_ne!(now, written, "the broken barrier must lose the write");
        assert_eq!(now, 0, "the word from before the copy (never written)");
    }
}
