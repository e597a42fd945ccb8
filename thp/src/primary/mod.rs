//! Primary (host) mapping model: address spaces ([`Mm`]) whose 2M frames are
//! either PMD-mapped to a huge folio or covered by a table of 512 PTEs, over a
//! shared folio arena and page pools ([`Primary`]).
//!
//! Mirrors mm/memory.c (faults, COW), mm/huge_memory.c (`split_huge_pmd`,
//! `split_folio`, deferred split), mm/khugepaged.c (collapse) and fork's
//! `copy_page_range`, at the level of mapcounts and refcounts.

mod collapse;
mod fault;
mod fork;
mod pageout;
mod protect;
mod rmap;
mod split;
mod unmap;

pub use collapse::{CollapseControl, CollapseRefusal, CollapseReport};
pub use fault::FaultOutcome;
pub use split::ShrinkReport;

use crate::folio::{Backing, Folio, FolioArena, FolioId};
use crate::policy::ThpPolicy;
use crate::pool::{HugePool, PoolError, SmallPool};
use crate::units::{Level, PAGES_PER_HPAGE, PAGES_PER_HPAGE_USIZE, PAGE_SIZE};
use std::collections::BTreeSet;

/// Index of an address space in a [`Primary`].
pub type MmId = usize;

/// A 4K mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pte {
    /// Mapped folio.
    pub folio: FolioId,
    /// Page of the folio.
    pub idx: u16,
    /// Pfn of that page.
    pub pfn: u64,
    /// Write permission (cleared by fork for COW).
    pub writable: bool,
}

/// A 2M mapping of a whole huge folio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pmd {
    /// Mapped huge folio.
    pub folio: FolioId,
    /// Pfn of its first page (2M aligned).
    pub pfn: u64,
    /// Write permission.
    pub writable: bool,
}

/// A table of 512 PTEs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageTable {
    ptes: Vec<Option<Pte>>,
    present: u32,
}

impl PageTable {
    fn new() -> Self {
        PageTable {
            ptes: vec![None; PAGES_PER_HPAGE_USIZE],
            present: 0,
        }
    }
    /// The PTE for page `idx` of the frame.
    pub fn get(&self, idx: usize) -> Option<Pte> {
        self.ptes[idx]
    }
    /// Number of present PTEs.
    pub fn present(&self) -> u32 {
        self.present
    }
    fn set(&mut self, idx: usize, pte: Option<Pte>) -> Option<Pte> {
        let old = std::mem::replace(&mut self.ptes[idx], pte);
        match (old.is_some(), self.ptes[idx].is_some()) {
            (false, true) => self.present += 1,
            (true, false) => self.present -= 1,
            _ => {}
        }
        old
    }
    /// Iterates over present PTEs as (page index, PTE).
    pub fn iter(&self) -> impl Iterator<Item = (usize, Pte)> + '_ {
        self.ptes
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|p| (i, p)))
    }
}

/// What covers one 2M frame of an address space.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FrameMap {
    /// Nothing (pmd_none).
    #[default]
    None,
    /// A PMD leaf.
    Pmd(Pmd),
    /// A page table.
    Table(Box<PageTable>),
}

/// One address space: a single anonymous VMA of `frames` 2M frames at `base_hva`.
#[derive(Debug, Clone)]
pub struct Mm {
    base_hva: u64,
    madvised: bool,
    frames: Vec<FrameMap>,
    /// Per frame: the VMA there lost `PROT_WRITE` (`mprotect(PROT_READ)`).
    wrprotected: Vec<bool>,
    /// A shmem (file) mapping instead of anonymous memory: its folios are
    /// page-cache folios (no deferred split), collapse is `collapse_file`.
    shmem: bool,
}

impl Mm {
    /// First host virtual address of the VMA (2M aligned).
    pub fn base_hva(&self) -> u64 {
        self.base_hva
    }
    /// Whether this is a shmem mapping (`!vma_is_anonymous`).
    pub fn is_shmem(&self) -> bool {
        self.shmem
    }
    /// Number of 2M frames.
    pub fn frames(&self) -> usize {
        self.frames.len()
    }
    /// Number of 4K pages.
    pub fn pages(&self) -> u64 {
        self.frames.len() as u64 * PAGES_PER_HPAGE
    }
    /// Whether the VMA is `MADV_HUGEPAGE`.
    pub fn madvised(&self) -> bool {
        self.madvised
    }
    /// The mapping of `frame`.
    pub fn frame(&self, frame: usize) -> &FrameMap {
        &self.frames[frame]
    }
    /// Whether `frame` is write-protected by `mprotect` ([`Primary::mprotect`]):
    /// every mapping there is read-only whatever its PTE bit says, and a
    /// write fault fails ([`MmError::WriteProtected`]).
    pub fn write_protected(&self, frame: usize) -> bool {
        self.wrprotected.get(frame).copied().unwrap_or(false)
    }
    /// Page index (relative to the VMA) of `hva`, if inside.
    pub fn page_of_hva(&self, hva: u64) -> Option<u64> {
        let off = hva.checked_sub(self.base_hva)?;
        let page = off / PAGE_SIZE;
        (page < self.pages()).then_some(page)
    }
    /// Host virtual address of VMA page `page`.
    pub fn hva_of_page(&self, page: u64) -> u64 {
        self.base_hva + page * PAGE_SIZE
    }
    /// What maps VMA page `page`: (level, pfn, folio, writable). `writable`
    /// is the effective permission: the PTE/PMD bit and the VMA's `PROT_WRITE`.
    pub fn lookup(&self, page: u64) -> Option<(Level, u64, FolioId, bool)> {
        let f = (page / PAGES_PER_HPAGE) as usize;
        let i = (page % PAGES_PER_HPAGE) as usize;
        let vma_w = !self.write_protected(f);
        match self.frames.get(f)? {
            FrameMap::None => None,
            FrameMap::Pmd(p) => Some((Level::M2, p.pfn + i as u64, p.folio, p.writable && vma_w)),
            FrameMap::Table(t) => t
                .get(i)
                .map(|p| (Level::K4, p.pfn, p.folio, p.writable && vma_w)),
        }
    }
}

/// Event counters named like `/proc/vmstat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmStat {
    /// Huge folios allocated at fault time.
    pub thp_fault_alloc: u64,
    /// Huge-capable faults that fell back to small pages.
    pub thp_fault_fallback: u64,
    /// Huge folios allocated by collapse.
    pub thp_collapse_alloc: u64,
    /// Collapses that failed to allocate a huge folio.
    pub thp_collapse_alloc_failed: u64,
    /// PMD mappings split into PTEs.
    pub thp_split_pmd: u64,
    /// Huge folios split into small folios.
    pub thp_split_page: u64,
    /// Folio splits that failed (pinned / extra references).
    pub thp_split_page_failed: u64,
    /// Folios queued for deferred split.
    pub thp_deferred_split_page: u64,
    /// Copy-on-write copies made.
    pub cow_copies: u64,
}

/// Errors of primary operations. Every error leaves the model unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmError {
    /// No address space with that id.
    #[error("no address space {0}")]
    NoSuchMm(MmId),
    /// A page range outside the VMA.
    #[error("pages [{first}, {first}+{npages}) outside the VMA of {pages} pages")]
    OutOfRange {
        /// First page.
        first: u64,
        /// Number of pages.
        npages: u64,
        /// VMA size in pages.
        pages: u64,
    },
    /// Something is mapped in the frame of the page already.
    #[error("page {page}'s frame is mapped already")]
    AlreadyMapped {
        /// The page.
        page: u64,
    },
    /// Nothing is mapped at the page.
    #[error("page {page} is not mapped")]
    NotMapped {
        /// The page.
        page: u64,
    },
    /// No folio with that id.
    #[error("no folio {0}")]
    NoSuchFolio(FolioId),
    /// The folio is not large.
    #[error("folio {0} is not a large folio")]
    NotLarge(FolioId),
    /// The folio is pinned or has extra references (-EBUSY); nothing changed.
    #[error("folio {folio} is busy: {pins} pins, {held} extra references; unpin before splitting")]
    Busy {
        /// The folio.
        folio: FolioId,
        /// Its pin count.
        pins: u32,
        /// Its extra references.
        held: u32,
    },
    /// Unpin / put of a folio that has no pin / reference.
    #[error("folio {0} has no pin or reference to drop")]
    NotPinned(FolioId),
    /// The small pool cannot supply the pages (-ENOMEM).
    #[error("small pool exhausted: need {needed} pages, {available} available")]
    OutOfMemory {
        /// Pages needed.
        needed: usize,
        /// Pages available.
        available: usize,
    },
    /// A write fault on a page whose VMA is read-only (`SIGSEGV`; GUP with
    /// `FOLL_WRITE` fails with `-EFAULT`).
    #[error("page {page} is write-protected (mprotect PROT_READ); restore PROT_WRITE first")]
    WriteProtected {
        /// The page.
        page: u64,
    },
    /// khugepaged refused to collapse.
    #[error("collapse refused: {0}")]
    Collapse(CollapseRefusal),
    /// Internal pool inconsistency (a model bug).
    #[error("pool accounting: {0}")]
    Pool(#[from] PoolError),
}

/// Folios, pools, policy and address spaces.
#[derive(Debug, Clone)]
pub struct Primary {
    folios: FolioArena,
    huge: HugePool,
    small: SmallPool,
    /// Live part folios per huge slot (after `split_folio`).
    parts_live: Vec<u16>,
    policy: ThpPolicy,
    mms: Vec<Option<Mm>>,
    deferred: BTreeSet<FolioId>,
    stat: VmStat,
    freed_log: Option<Vec<Backing>>,
    /// While a transaction is open ([`Primary::begin_undo`]).
    undo: Option<Box<PrimaryUndo>>,
}

/// The undo log of an open transaction, for what the arena's and the pools'
/// own logs do not cover.
#[derive(Debug, Clone)]
struct PrimaryUndo {
    /// First value of every frame mapping changed (address space, frame).
    frames: Vec<(MmId, usize, FrameMap)>,
    /// Frames already in `frames`.
    saved_frames: BTreeSet<(MmId, usize)>,
    /// Deferred-split queue membership before each change, in order.
    deferred: Vec<(FolioId, bool)>,
    /// `parts_live` before each change, in order.
    parts_live: Vec<(u32, u16)>,
    stat: VmStat,
    freed_log: Option<Vec<Backing>>,
}

impl Primary {
    /// A primary with a huge pool of `huge_capacity` slots and a small pool
    /// limited to `small_limit` pages (`None`: unlimited).
    pub fn new(huge_capacity: usize, small_limit: Option<usize>, policy: ThpPolicy) -> Self {
        Primary {
            folios: FolioArena::new(),
            huge: HugePool::new(huge_capacity),
            small: SmallPool::new(small_limit),
            parts_live: vec![0; huge_capacity],
            policy,
            mms: Vec::new(),
            deferred: BTreeSet::new(),
            stat: VmStat::default(),
            freed_log: None,
            undo: None,
        }
    }

    /// Opens a transaction: from now on every change to folios, pools,
    /// frame mappings, the deferred-split queue and counters is recorded so
    /// that [`Self::rollback_undo`] can undo it exactly. The cost is per
    /// change (one copy of each folio and frame mapping touched), never per
    /// address-space size. Address spaces are not created, destroyed,
    /// forked or `mprotect`ed inside a transaction (not recorded).
    pub fn begin_undo(&mut self) {
        debug_assert!(self.undo.is_none(), "nested transaction");
        self.folios.begin_undo();
        self.huge.undo.begin();
        self.small.undo.begin();
        self.undo = Some(Box::new(PrimaryUndo {
            frames: Vec::new(),
            saved_frames: BTreeSet::new(),
            deferred: Vec::new(),
            parts_live: Vec::new(),
            stat: self.stat,
            freed_log: self.freed_log.clone(),
        }));
    }

    /// Whether a transaction is open.
    pub fn undo_open(&self) -> bool {
        self.undo.is_some()
    }

    /// Keeps every change since [`Self::begin_undo`] and closes the transaction.
    pub fn commit_undo(&mut self) {
        self.folios.commit_undo();
        self.huge.undo.commit();
        self.small.undo.commit();
        self.undo = None;
    }

    /// Undoes every change since [`Self::begin_undo`] (the model is exactly
    /// as it was then, free lists' order included) and closes the transaction.
    pub fn rollback_undo(&mut self) {
        self.folios.rollback_undo();
        self.huge.rollback_undo();
        self.small.rollback_undo();
        let Some(u) = self.undo.take() else { return };
        let u = *u;
        for (id, member) in u.deferred.into_iter().rev() {
            if member {
                self.deferred.insert(id);
            } else {
                self.deferred.remove(&id);
            }
        }
        for (slot, n) in u.parts_live.into_iter().rev() {
            self.parts_live[slot as usize] = n;
        }
        for (mm, frame, map) in u.frames {
            if let Some(Some(m)) = self.mms.get_mut(mm) {
                m.frames[frame] = map;
            }
        }
        self.stat = u.stat;
        self.freed_log = u.freed_log;
    }

    /// The mapping of `frame` of `mm`, to change (recorded for undo).
    pub(crate) fn frame_mut(&mut self, mm: MmId, frame: usize) -> Result<&mut FrameMap, MmError> {
        let m = self
            .mms
            .get_mut(mm)
            .and_then(|m| m.as_mut())
            .ok_or(MmError::NoSuchMm(mm))?;
        if let Some(u) = self.undo.as_mut() {
            // Most changes hit the frame changed last: skip the set then.
            let last = u.frames.last().is_some_and(|l| l.0 == mm && l.1 == frame);
            if !last && u.saved_frames.insert((mm, frame)) {
                u.frames.push((mm, frame, m.frames[frame].clone()));
            }
        }
        Ok(&mut m.frames[frame])
    }

    /// Puts folio `id` on the deferred-split queue or takes it off (recorded for undo).
    pub(crate) fn set_deferred(&mut self, id: FolioId, member: bool) {
        let was = if member {
            !self.deferred.insert(id)
        } else {
            self.deferred.remove(&id)
        };
        if was != member {
            if let Some(u) = self.undo.as_mut() {
                u.deferred.push((id, was));
            }
        }
    }

    /// Sets the live part count of huge slot `slot` (recorded for undo).
    pub(crate) fn set_parts_live(&mut self, slot: u32, n: u16) {
        let old = std::mem::replace(&mut self.parts_live[slot as usize], n);
        if let Some(u) = self.undo.as_mut() {
            u.parts_live.push((slot, old));
        }
    }

    /// Creates an address space of `frames` frames at `base_hva` (2M aligned).
    pub fn new_mm(&mut self, frames: usize, base_hva: u64, madvised: bool) -> MmId {
        self.mms.push(Some(Mm {
            base_hva,
            madvised,
            frames: vec![FrameMap::None; frames],
            wrprotected: vec![false; frames],
            shmem: false,
        }));
        self.mms.len() - 1
    }

    /// Like [`Self::new_mm`] for a shared shmem mapping (a memfd): its
    /// folios are page-cache folios.
    pub fn new_shmem_mm(&mut self, frames: usize, base_hva: u64, madvised: bool) -> MmId {
        let id = self.new_mm(frames, base_hva, madvised);
        if let Some(Some(m)) = self.mms.get_mut(id) {
            m.shmem = true;
        }
        id
    }

    /// The address space `id`.
    pub fn mm(&self, id: MmId) -> Result<&Mm, MmError> {
        self.mms
            .get(id)
            .and_then(|m| m.as_ref())
            .ok_or(MmError::NoSuchMm(id))
    }

    pub(crate) fn mm_mut(&mut self, id: MmId) -> Result<&mut Mm, MmError> {
        self.mms
            .get_mut(id)
            .and_then(|m| m.as_mut())
            .ok_or(MmError::NoSuchMm(id))
    }

    /// Ids of live address spaces.
    pub fn mm_ids(&self) -> Vec<MmId> {
        (0..self.mms.len())
            .filter(|i| self.mms[*i].is_some())
            .collect()
    }

    /// The folio arena.
    pub fn folios(&self) -> &FolioArena {
        &self.folios
    }

    /// One folio.
    pub fn folio(&self, id: FolioId) -> Result<&Folio, MmError> {
        self.folios.get(id).ok_or(MmError::NoSuchFolio(id))
    }

    /// The huge pool.
    pub fn huge_pool(&self) -> &HugePool {
        &self.huge
    }
    /// The huge pool, mutable (fault injection).
    pub fn huge_pool_mut(&mut self) -> &mut HugePool {
        &mut self.huge
    }
    /// The small pool.
    pub fn small_pool(&self) -> &SmallPool {
        &self.small
    }
    /// The small pool, mutable (fault injection).
    pub fn small_pool_mut(&mut self) -> &mut SmallPool {
        &mut self.small
    }
    /// Live part folios of huge slot `slot`.
    pub fn parts_live(&self, slot: u32) -> u16 {
        self.parts_live.get(slot as usize).copied().unwrap_or(0)
    }
    /// The policy.
    pub fn policy(&self) -> &ThpPolicy {
        &self.policy
    }
    /// Changes the policy.
    pub fn set_policy(&mut self, policy: ThpPolicy) {
        self.policy = policy;
    }
    /// Event counters.
    pub fn stat(&self) -> &VmStat {
        &self.stat
    }
    /// Folios on the deferred-split queue.
    pub fn deferred_queue(&self) -> impl Iterator<Item = FolioId> + '_ {
        self.deferred.iter().copied()
    }

    /// Starts recording the backing of every freed folio.
    pub fn log_frees(&mut self) {
        self.freed_log.get_or_insert_with(Vec::new);
    }
    /// Takes the backings freed since the last call (empty unless [`Self::log_frees`]).
    pub fn take_freed(&mut self) -> Vec<Backing> {
        self.freed_log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn check_range(&self, mm: MmId, first: u64, npages: u64) -> Result<(), MmError> {
        let pages = self.mm(mm)?.pages();
        if first.checked_add(npages).is_none_or(|end| end > pages) {
            return Err(MmError::OutOfRange {
                first,
                npages,
                pages,
            });
        }
        Ok(())
    }

    /// Takes an extra reference on a folio (`folio_get`).
    pub fn get_folio(&mut self, id: FolioId) -> Result<(), MmError> {
        let f = self.folios.get_mut(id).ok_or(MmError::NoSuchFolio(id))?;
        f.refcount += 1;
        f.held += 1;
        Ok(())
    }

    /// Drops an extra reference (`folio_put`); frees the folio at refcount 0.
    pub fn put_folio(&mut self, id: FolioId) -> Result<(), MmError> {
        let f = self.folios.get_mut(id).ok_or(MmError::NoSuchFolio(id))?;
        if f.held == 0 {
            return Err(MmError::NotPinned(id));
        }
        f.held -= 1;
        self.put_ref(id)
    }

    /// Pins the folio mapped at `page` (`pin_user_pages`); returns it.
    pub fn pin(&mut self, mm: MmId, page: u64) -> Result<FolioId, MmError> {
        self.check_range(mm, page, 1)?;
        let (_, _, id, _) = self
            .mm(mm)?
            .lookup(page)
            .ok_or(MmError::NotMapped { page })?;
        let f = self.folios.get_mut(id).ok_or(MmError::NoSuchFolio(id))?;
        f.pincount += 1;
        f.refcount += 1;
        Ok(id)
    }

    /// Drops a pin (`unpin_user_page`).
    pub fn unpin(&mut self, id: FolioId) -> Result<(), MmError> {
        let f = self.folios.get_mut(id).ok_or(MmError::NoSuchFolio(id))?;
        if f.pincount == 0 {
            return Err(MmError::NotPinned(id));
        }
        f.pincount -= 1;
        self.put_ref(id)
    }

    /// Destroys an address space (exit): unmaps everything.
    pub fn destroy_mm(&mut self, mm: MmId) -> Result<(), MmError> {
        let pages = self.mm(mm)?.pages();
        self.unmap(mm, 0, pages)?;
        self.mms[mm] = None;
        Ok(())
    }
}
