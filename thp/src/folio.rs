//! Folios: one refcount per folio (not per subpage), a pin count, an entire
//! (PMD) mapcount and per-page (PTE) mapcounts, as after the THP refcounting
//! redesign and the folio mapcount work. Also the arena that owns all folios.

use crate::units::PAGES_PER_HPAGE_USIZE;

/// Index of a folio in a [`FolioArena`].
pub type FolioId = u32;

/// Order of a huge (PMD-sized) folio.
pub const HPAGE_PMD_ORDER: u8 = 9;

/// First pfn of the modelled huge-page pool: huge slot `s` page `i` has pfn
/// `HUGE_PFN_BASE + s * 512 + i` (2M aligned for `i == 0`).
pub const HUGE_PFN_BASE: u64 = 0x10_0000;
/// First pfn of the modelled small-page pool: small slot `s` has pfn `SMALL_PFN_BASE + s`.
pub const SMALL_PFN_BASE: u64 = 1 << 40;

/// Where a folio's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backing {
    /// A 2M slot of the huge pool.
    Huge(u32),
    /// A 4K slot of the small pool.
    Small(u32),
    /// Page `idx` of huge slot `slot`, after the huge folio was split
    /// (`split_folio`): the 2M slot returns to the pool only when all its
    /// parts are freed, like a buddy block.
    HugePart {
        /// The huge slot.
        slot: u32,
        /// Page index inside it.
        idx: u16,
    },
}

impl Backing {
    /// Pfn of the first page of this backing.
    pub fn base_pfn(self) -> u64 {
        match self {
            Backing::Huge(s) => HUGE_PFN_BASE + s as u64 * 512,
            Backing::Small(s) => SMALL_PFN_BASE + s as u64,
            Backing::HugePart { slot, idx } => HUGE_PFN_BASE + slot as u64 * 512 + idx as u64,
        }
    }
}

/// A folio of order 0 (4K) or 9 (2M).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folio {
    /// 0 or [`HPAGE_PMD_ORDER`].
    pub order: u8,
    /// References: one per mapping (PMD or PTE), one per pin, one per held reference.
    pub refcount: u32,
    /// `FOLL_PIN` pins (kept separately instead of the kernel's refcount bias).
    pub pincount: u32,
    /// Number of PMD mappings of the whole folio (`_entire_mapcount + 1`).
    pub entire_mapcount: u32,
    /// Number of PTE mappings of each page (`_mapcount + 1` per page); kept
    /// in step with the two sums below by the methods that change it.
    pte_mapcount: Vec<u32>,
    /// All PTE mappings of the folio: the PTE part of `_large_mapcount`,
    /// so [`Self::total_mapcount`] is O(1) as `folio_mapcount` is.
    pte_mappings: u32,
    /// Pages mapped by at least one PTE (`_nr_pages_mapped`, without its
    /// `ENTIRELY_MAPPED` part), so [`Self::partially_mapped`] is O(1).
    pages_pte_mapped: u32,
    /// Backing memory.
    pub backing: Backing,
    /// Extra references held by code that is not a mapping or a pin
    /// (e.g. a KVM fault between translating and installing, `get_page`).
    pub held: u32,
    /// The 2M frame (of every address space) this anonymous folio is mapped at;
    /// the model's reverse map (no mremap, so a folio never moves).
    pub frame: usize,
    /// Whether the folio is on the deferred-split queue.
    pub on_deferred_split: bool,
    /// `folio_test_partially_mapped`: set (once, sticky) when the folio was
    /// queued for deferred split because part of it got unmapped.
    pub partially_mapped_flag: bool,
    /// `_mm_id[0..2]` / `_mm_id_mapcount[0..2]` (CONFIG_MM_ID, 6.15+): up
    /// to two address spaces and how many mappings each holds.
    pub mm_ids: [Option<(usize, u32)>; 2],
    /// `FOLIO_MM_IDS_SHARED_BIT`.
    pub mm_ids_shared: bool,
    /// `folio_test_anon`: false for a shmem (page-cache) folio, which never
    /// goes on the deferred-split queue.
    pub anon: bool,
}

impl Folio {
    /// A fresh, unmapped folio with refcount 0 at `frame` (the caller takes references).
    pub fn new(backing: Backing, frame: usize) -> Self {
        let (order, n) = match backing {
            Backing::Huge(_) => (HPAGE_PMD_ORDER, PAGES_PER_HPAGE_USIZE),
            Backing::Small(_) | Backing::HugePart { .. } => (0, 1),
        };
        Folio {
            order,
            refcount: 0,
            pincount: 0,
            entire_mapcount: 0,
            pte_mapcount: vec![0; n],
            pte_mappings: 0,
            pages_pte_mapped: 0,
            backing,
            held: 0,
            frame,
            on_deferred_split: false,
            partially_mapped_flag: false,
            mm_ids: [None; 2],
            mm_ids_shared: false,
            anon: true,
        }
    }

    /// Number of 4K pages (`folio_nr_pages`).
    pub fn nr_pages(&self) -> usize {
        1 << self.order
    }

    /// Whether this is a large (order 9) folio (`folio_test_large`).
    pub fn is_large(&self) -> bool {
        self.order > 0
    }

    /// Pfn of page `idx` of this folio.
    pub fn pfn(&self, idx: usize) -> u64 {
        self.backing.base_pfn() + idx as u64
    }

    /// `page_mapcount(folio_page(folio, idx))`: PTE mappings of the page plus
    /// the folio's entire (PMD) mappings.
    pub fn page_mapcount(&self, idx: usize) -> u32 {
        self.pte_mapcount[idx] + self.entire_mapcount
    }

    /// PTE mappings of each page (without the entire mappings).
    pub fn pte_mapcounts(&self) -> &[u32] {
        &self.pte_mapcount
    }

    /// One more PTE mapping of page `idx` (`folio_add_*_rmap_pte`).
    pub fn add_pte_mapping(&mut self, idx: usize) {
        self.add_pte_mappings(idx, 1);
    }

    /// `n` more PTE mappings of page `idx`.
    pub fn add_pte_mappings(&mut self, idx: usize, n: u32) {
        if n == 0 {
            return;
        }
        let m = &mut self.pte_mapcount[idx];
        if *m == 0 {
            self.pages_pte_mapped += 1;
        }
        *m += n;
        self.pte_mappings += n;
    }

    /// One PTE mapping of page `idx` gone (`folio_remove_rmap_pte`); the
    /// caller holds one (the page tables map it).
    pub fn remove_pte_mapping(&mut self, idx: usize) {
        let m = &mut self.pte_mapcount[idx];
        debug_assert!(*m > 0, "page {idx} of the folio has no PTE mapping");
        *m -= 1;
        if *m == 0 {
            self.pages_pte_mapped -= 1;
        }
        self.pte_mappings -= 1;
    }

    /// The cached sums, recomputed from the per-page counts (the invariant
    /// checker compares them): (PTE mappings, pages PTE-mapped).
    pub fn pte_sums_recomputed(&self) -> (u32, u32) {
        (
            self.pte_mapcount.iter().sum(),
            self.pte_mapcount.iter().filter(|m| **m > 0).count() as u32,
        )
    }

    /// The cached sums: (PTE mappings, pages PTE-mapped).
    pub fn pte_sums(&self) -> (u32, u32) {
        (self.pte_mappings, self.pages_pte_mapped)
    }

    /// `folio_mapcount`: entire mappings plus all PTE mappings.
    pub fn total_mapcount(&self) -> u32 {
        self.entire_mapcount + self.pte_mappings
    }

    /// Whether any page is mapped (`folio_mapped`).
    pub fn is_mapped(&self) -> bool {
        self.entire_mapcount > 0 || self.pages_pte_mapped > 0
    }

    /// `folio_maybe_dma_pinned`.
    pub fn maybe_dma_pinned(&self) -> bool {
        self.pincount > 0
    }

    /// Whether the folio is mapped only partially: PTE-mapped, some pages
    /// unmapped, no PMD mapping (`folio_test_partially_mapped` conditions).
    pub fn partially_mapped(&self) -> bool {
        self.is_large()
            && self.entire_mapcount == 0
            && self.pages_pte_mapped > 0
            && (self.pages_pte_mapped as usize) < self.nr_pages()
    }

    /// `folio_add_return_large_mapcount` (include/linux/rmap.h, Linux 6.18,
    /// CONFIG_MM_ID): `diff` new mappings by address space `mm`, the folio's
    /// large mapcount now `new_total`. The mm's slot counts them; a free slot
    /// is claimed (and the folio marked maybe-shared if others map it too);
    /// with both slots taken by others nothing is tracked (the bit is
    /// already set).
    pub fn folio_add_return_large_mapcount(&mut self, diff: u32, mm: usize, new_total: u32) {
        if !self.is_large() {
            return;
        }
        if let Some(s) = self.mm_ids.iter_mut().flatten().find(|s| s.0 == mm) {
            s.1 += diff;
        } else if self.mm_ids[0].is_none() {
            self.mm_ids[0] = Some((mm, diff));
            if new_total != diff {
                self.mm_ids_shared = true;
            }
        } else if self.mm_ids[1].is_none() {
            self.mm_ids[1] = Some((mm, diff));
            self.mm_ids_shared = true;
        }
    }

    /// `folio_sub_return_large_mapcount` (include/linux/rmap.h, Linux 6.18):
    /// `diff` mappings of `mm` gone, large mapcount now `new_total`. When
    /// the mm's slot still has mappings nothing else changes; otherwise (slot
    /// freed, or the mm had none) the folio is exclusive again if one slot
    /// holds all mappings.
    pub fn folio_sub_return_large_mapcount(&mut self, diff: u32, mm: usize, new_total: u32) {
        if !self.is_large() {
            return;
        }
        if let Some(i) = self
            .mm_ids
            .iter()
            .position(|s| s.is_some_and(|s| s.0 == mm))
        {
            let s = self.mm_ids[i].as_mut().map(|s| &mut s.1);
            if let Some(c) = s {
                if *c > diff {
                    *c -= diff;
                    return;
                }
            }
            self.mm_ids[i] = None;
        }
        let holds = |s: Option<(usize, u32)>| s.map_or(0, |s| s.1);
        if holds(self.mm_ids[0]) == new_total || holds(self.mm_ids[1]) == new_total {
            self.mm_ids_shared = false;
        }
    }

    /// `folio_maybe_mapped_shared` (include/linux/mm.h, Linux 6.18): small
    /// folio: mapcount > 1 (exact). Large folio: at most one mapping means
    /// exclusive; else the MM-id tracking's maybe-shared bit. Never false
    /// for a folio two address spaces map; may stay true after a third one
    /// (untracked) came and went while two others keep their slots.
    pub fn folio_maybe_mapped_shared(&self) -> bool {
        let mapcount = self.total_mapcount();
        if !self.is_large() {
            return mapcount > 1;
        }
        if mapcount <= 1 {
            return false;
        }
        self.mm_ids_shared
    }
}

/// Owner of all folios; ids are reused after a folio is freed.
#[derive(Debug, Clone, Default)]
pub struct FolioArena {
    slots: Vec<Option<Folio>>,
    free: Vec<FolioId>,
    live: usize,
    /// While a transaction is open ([`FolioArena::begin_undo`]).
    undo: Option<ArenaUndo>,
}

/// One change to the arena, as the undo log records it. The saved folios
/// are boxed: a split logs 512 insertions, and with a `Folio` inline every
/// entry would take its size (the log outgrew malloc's mmap threshold, and
/// faulted fresh pages in, on every split).
#[derive(Debug, Clone)]
enum ArenaOp {
    /// `id` was stored; `reused`: taken from the free list (else appended).
    Inserted { id: FolioId, reused: bool },
    /// `id` was removed; it was `folio` (`None`: an older entry of the
    /// log restores its value, only the slot and free list matter).
    Removed {
        id: FolioId,
        folio: Option<Box<Folio>>,
    },
    /// `id` was handed out mutable for the first time; it was `folio`.
    Changed { id: FolioId, folio: Box<Folio> },
}

/// The undo log of an open transaction: the changes, and the ids whose
/// value before the transaction the log can already restore (so a folio
/// changed many times is saved once).
#[derive(Debug, Clone, Default)]
struct ArenaUndo {
    ops: Vec<ArenaOp>,
    saved: std::collections::HashSet<FolioId, IdHash>,
}

/// Hashing of folio ids for the undo log's set: one multiply (ids are
/// small dense integers; SipHash would cost more than the rest of the log).
#[derive(Debug, Clone, Copy, Default)]
struct IdHash;

impl std::hash::BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

/// The hasher of [`IdHash`].
#[derive(Debug, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (u64::from(n) ^ self.0).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl FolioArena {
    /// An empty arena.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts recording how to undo every change (see
    /// [`Self::rollback_undo`]): the cost is one copy of each folio changed
    /// or removed, not of the arena.
    pub fn begin_undo(&mut self) {
        self.undo = Some(ArenaUndo::default());
    }

    /// Keeps the changes since [`Self::begin_undo`] and stops recording.
    pub fn commit_undo(&mut self) {
        self.undo = None;
    }

    /// Undoes every change since [`Self::begin_undo`], newest first: every
    /// folio, the free list's order and the live count are exactly as before.
    pub fn rollback_undo(&mut self) {
        let Some(u) = self.undo.take() else { return };
        for op in u.ops.into_iter().rev() {
            match op {
                ArenaOp::Inserted { id, reused } => {
                    self.live -= 1;
                    if reused {
                        self.slots[id as usize] = None;
                        self.free.push(id);
                    } else {
                        debug_assert_eq!(self.slots.len(), id as usize + 1);
                        self.slots.pop();
                    }
                }
                ArenaOp::Removed { id, folio } => {
                    let back = self.free.pop();
                    debug_assert_eq!(back, Some(id));
                    // Without a value, an older entry overwrites this one.
                    let folio = folio.map_or_else(|| Folio::new(Backing::Small(0), 0), |f| *f);
                    self.slots[id as usize] = Some(folio);
                    self.live += 1;
                }
                ArenaOp::Changed { id, folio } => self.slots[id as usize] = Some(*folio),
            }
        }
    }

    /// Stores `folio`, returns its id.
    pub fn insert(&mut self, folio: Folio) -> FolioId {
        self.live += 1;
        let (id, reused) = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(folio);
                (id, true)
            }
            None => {
                self.slots.push(Some(folio));
                ((self.slots.len() - 1) as FolioId, false)
            }
        };
        if let Some(u) = self.undo.as_mut() {
            u.ops.push(ArenaOp::Inserted { id, reused });
            u.saved.insert(id);
        }
        id
    }

    /// Removes a folio, returning it.
    pub fn remove(&mut self, id: FolioId) -> Option<Folio> {
        let f = self.slots.get_mut(id as usize)?.take()?;
        self.free.push(id);
        self.live -= 1;
        if let Some(u) = self.undo.as_mut() {
            let folio = u.saved.insert(id).then(|| Box::new(f.clone()));
            u.ops.push(ArenaOp::Removed { id, folio });
        }
        Some(f)
    }

    /// The folio `id`, if live.
    pub fn get(&self, id: FolioId) -> Option<&Folio> {
        self.slots.get(id as usize)?.as_ref()
    }

    /// The folio `id`, mutable, if live.
    pub fn get_mut(&mut self, id: FolioId) -> Option<&mut Folio> {
        let f = self.slots.get_mut(id as usize)?.as_mut()?;
        if let Some(u) = self.undo.as_mut() {
            if u.saved.insert(id) {
                u.ops.push(ArenaOp::Changed {
                    id,
                    folio: Box::new(f.clone()),
                });
            }
        }
        Some(f)
    }

    /// Number of live folios.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Iterates over live folios.
    pub fn iter(&self) -> impl Iterator<Item = (FolioId, &Folio)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().map(|f| (i as FolioId, f)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached PTE sums follow every change, and the O(1) answers built
    /// on them equal the per-page counts' (`folio_mapcount`,
    /// `folio_mapped`, partially mapped).
    #[test]
    fn cached_pte_sums_follow_the_per_page_counts() {
        let mut f = Folio::new(Backing::Huge(0), 0);
        assert_eq!(
            (f.total_mapcount(), f.is_mapped(), f.partially_mapped()),
            (0, false, false)
        );
        f.entire_mapcount = 1;
        assert_eq!(
            (f.total_mapcount(), f.is_mapped(), f.partially_mapped()),
            (1, true, false)
        );
        // split_huge_pmd: every page one PTE, the PMD gone.
        for i in 0..f.nr_pages() {
            f.add_pte_mapping(i);
        }
        f.entire_mapcount = 0;
        assert_eq!(f.pte_sums(), (512, 512));
        assert!(!f.partially_mapped());
        f.add_pte_mappings(7, 2);
        f.remove_pte_mapping(3);
        assert_eq!(f.pte_sums(), f.pte_sums_recomputed());
        assert_eq!(f.pte_sums(), (513, 511));
        assert_eq!(f.total_mapcount(), 513);
        assert!(f.partially_mapped());
        for i in (0..f.nr_pages()).filter(|i| *i != 3) {
            while f.pte_mapcounts()[i] > 0 {
                f.remove_pte_mapping(i);
            }
        }
        assert_eq!(f.pte_sums(), (0, 0));
        assert_eq!(
            (f.total_mapcount(), f.is_mapped(), f.partially_mapped()),
            (0, false, false)
        );
        // A small folio is never partially mapped.
        let mut s = Folio::new(Backing::Small(1), 0);
        s.add_pte_mapping(0);
        assert_eq!(
            (s.total_mapcount(), s.is_mapped(), s.partially_mapped()),
            (1, true, false)
        );
    }

    /// The undo log restores removed and changed folios exactly (their
    /// saved values are boxed).
    #[test]
    fn rollback_restores_removed_and_changed_folios() {
        let mut a = FolioArena::default();
        let x = a.insert(Folio::new(Backing::Small(1), 0));
        let y = a.insert(Folio::new(Backing::Huge(2), 1));
        let before = (a.get(x).cloned(), a.get(y).cloned(), a.live());
        a.begin_undo();
        if let Some(f) = a.get_mut(y) {
            f.add_pte_mapping(5);
        }
        a.remove(x);
        a.insert(Folio::new(Backing::Small(3), 2));
        assert_eq!(a.live(), 2);
        a.rollback_undo();
        assert_eq!((a.get(x).cloned(), a.get(y).cloned(), a.live()), before);
    }
}
