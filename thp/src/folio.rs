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
    /// Number of PTE mappings of each page (`_mapcount + 1` per page).
    pub page_mapcount: Vec<u32>,
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
            page_mapcount: vec![0; n],
            backing,
            held: 0,
            frame,
            on_deferred_split: false,
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
        self.page_mapcount[idx] + self.entire_mapcount
    }

    /// `folio_mapcount`: entire mappings plus all PTE mappings.
    pub fn total_mapcount(&self) -> u32 {
        self.entire_mapcount + self.page_mapcount.iter().sum::<u32>()
    }

    /// Whether any page is mapped (`folio_mapped`).
    pub fn is_mapped(&self) -> bool {
        self.entire_mapcount > 0 || self.page_mapcount.iter().any(|m| *m > 0)
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
            && self.page_mapcount.iter().any(|m| *m > 0)
            && self.page_mapcount.contains(&0)
    }

    /// `folio_likely_mapped_shared` as in Linux 6.7-6.10:
    /// `page_mapcount(folio_page(folio, 0)) > 1`, i.e. only the first page's
    /// mapcount plus the entire mapcount is looked at.
    ///
    /// Documented approximation: for a large folio this has false negatives
    /// when the first page is not mapped (or not shared) while other pages
    /// are, and false positives when the first page is mapped twice into the
    /// same process. For a small folio it is exact (`mapcount > 1`).
    pub fn likely_mapped_shared(&self) -> bool {
        self.page_mapcount(0) > 1
    }
}

/// Owner of all folios; ids are reused after a folio is freed.
#[derive(Debug, Clone, Default)]
pub struct FolioArena {
    slots: Vec<Option<Folio>>,
    free: Vec<FolioId>,
    live: usize,
}

impl FolioArena {
    /// An empty arena.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `folio`, returns its id.
    pub fn insert(&mut self, folio: Folio) -> FolioId {
        self.live += 1;
        match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(folio);
                id
            }
            None => {
                self.slots.push(Some(folio));
                (self.slots.len() - 1) as FolioId
            }
        }
    }

    /// Removes a folio, returning it.
    pub fn remove(&mut self, id: FolioId) -> Option<Folio> {
        let f = self.slots.get_mut(id as usize)?.take()?;
        self.free.push(id);
        self.live -= 1;
        Some(f)
    }

    /// The folio `id`, if live.
    pub fn get(&self, id: FolioId) -> Option<&Folio> {
        self.slots.get(id as usize)?.as_ref()
    }

    /// The folio `id`, mutable, if live.
    pub fn get_mut(&mut self, id: FolioId) -> Option<&mut Folio> {
        self.slots.get_mut(id as usize)?.as_mut()
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
