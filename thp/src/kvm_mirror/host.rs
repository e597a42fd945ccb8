//! The host (primary) side as KVM sees it: the page-table level and pfn
//! behind a host virtual address.

use crate::primary::Mm;
use crate::units::{Level, PAGES_PER_HPAGE, PAGE_SIZE};

/// The host mapping KVM consults: `host_pfn_mapping_level` walks the host
/// page tables at `hva`; `pfn` is what GUP (`hva_to_pfn`) returns.
pub trait HostMap {
    /// Level of the host leaf mapping `hva` (4K when not mapped).
    fn host_level(&self, hva: u64) -> Level;
    /// Pfn mapped at `hva`, `None` when not mapped.
    fn pfn(&self, hva: u64) -> Option<u64>;
    /// Whether the host mapping at `hva` is writable (PTE/PMD write bit and
    /// VMA `PROT_WRITE`); `false` when not mapped. Default: mapped = writable.
    fn writable(&self, hva: u64) -> bool {
        self.pfn(hva).is_some()
    }
}

impl HostMap for Mm {
    fn host_level(&self, hva: u64) -> Level {
        self.page_of_hva(hva)
            .and_then(|p| self.lookup(p))
            .map_or(Level::K4, |(l, ..)| l)
    }
    fn pfn(&self, hva: u64) -> Option<u64> {
        self.page_of_hva(hva)
            .and_then(|p| self.lookup(p))
            .map(|(_, pfn, ..)| pfn)
    }
    fn writable(&self, hva: u64) -> bool {
        self.page_of_hva(hva)
            .and_then(|p| self.lookup(p))
            .is_some_and(|(.., w)| w)
    }
}

impl<T: HostMap + ?Sized> HostMap for &T {
    fn host_level(&self, hva: u64) -> Level {
        (**self).host_level(hva)
    }
    fn pfn(&self, hva: u64) -> Option<u64> {
        (**self).pfn(hva)
    }
    fn writable(&self, hva: u64) -> bool {
        (**self).writable(hva)
    }
}

/// A [`HostMap`] from a per-2M-frame level list: frame `i` covers
/// `[base_hva + i*2M, base_hva + (i+1)*2M)`; `None` = not mapped. Pfns are
/// synthetic (`hva / 4096`), which keeps 2M frames 2M-aligned in pfn space
/// when `base_hva` is 2M aligned. Handy for predictions from frame states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelMap {
    base_hva: u64,
    frames: Vec<Option<Level>>,
}

impl LevelMap {
    /// A map of `frames.len()` frames starting at `base_hva`.
    pub fn new(base_hva: u64, frames: Vec<Option<Level>>) -> Self {
        LevelMap { base_hva, frames }
    }

    fn frame(&self, hva: u64) -> Option<Level> {
        let off = hva.checked_sub(self.base_hva)?;
        *self
            .frames
            .get((off / PAGE_SIZE / PAGES_PER_HPAGE) as usize)?
    }
}

impl HostMap for LevelMap {
    fn host_level(&self, hva: u64) -> Level {
        self.frame(hva).unwrap_or(Level::K4)
    }
    fn pfn(&self, hva: u64) -> Option<u64> {
        self.frame(hva).map(|_| hva / PAGE_SIZE)
    }
}
