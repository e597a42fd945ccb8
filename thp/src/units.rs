//! Units shared by every crate: page and huge-page sizes, frame arithmetic and
//! the mapping [`Level`].

/// Size of a base page (4 KiB).
pub const PAGE_SIZE: u64 = 4096;
/// Size of a PMD-mapped huge page (2 MiB).
pub const HPAGE_SIZE: u64 = 2 << 20;
/// Number of base pages in a huge page (`HPAGE_PMD_NR`).
pub const PAGES_PER_HPAGE: u64 = 512;
/// `PAGES_PER_HPAGE` as a `usize`, for indexing.
pub const PAGES_PER_HPAGE_USIZE: usize = 512;

/// Frame (2M-aligned 2M piece) containing the 4K page number `page`.
pub fn frame_of(page: u64) -> usize {
    (page / PAGES_PER_HPAGE) as usize
}

/// Index (0..512) of the 4K page number `page` inside its frame.
pub fn page_in_frame(page: u64) -> u16 {
    (page % PAGES_PER_HPAGE) as u16
}

/// First 4K page number of `frame`.
pub fn first_page_of(frame: usize) -> u64 {
    frame as u64 * PAGES_PER_HPAGE
}

/// Byte address of the start of `frame`.
pub fn frame_addr(frame: usize) -> u64 {
    frame as u64 * HPAGE_SIZE
}

/// Whether `addr` is 2M aligned.
pub fn is_hpage_aligned(addr: u64) -> bool {
    addr.is_multiple_of(HPAGE_SIZE)
}

/// Whether `addr` is 4K aligned.
pub fn is_page_aligned(addr: u64) -> bool {
    addr.is_multiple_of(PAGE_SIZE)
}

/// Number of 4K pages in a 1G page (`KVM_PAGES_PER_HPAGE(PG_LEVEL_1G)`).
pub const PAGES_PER_GPAGE: u64 = PAGES_PER_HPAGE * PAGES_PER_HPAGE;

/// A mapping level, as in KVM's `PG_LEVEL_4K` / `PG_LEVEL_2M` / `PG_LEVEL_1G`.
/// No backing maps 1G yet; the KVM mirror's `lpage_info` and host-level
/// rules already work per level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// A 4K leaf (PTE).
    K4,
    /// A 2M leaf (PMD).
    M2,
    /// A 1G leaf (PUD).
    G1,
}

impl Level {
    /// The huge levels, smallest first (`PG_LEVEL_2M ..= KVM_MAX_HUGEPAGE_LEVEL`).
    pub const HUGE: [Level; 2] = [Level::M2, Level::G1];

    /// Number of 4K pages a leaf at this level covers (`KVM_PAGES_PER_HPAGE`).
    pub fn pages(self) -> u64 {
        match self {
            Level::K4 => 1,
            Level::M2 => PAGES_PER_HPAGE,
            Level::G1 => PAGES_PER_GPAGE,
        }
    }

    /// The next level down (4K stays 4K).
    pub fn below(self) -> Level {
        match self {
            Level::G1 => Level::M2,
            Level::M2 | Level::K4 => Level::K4,
        }
    }

    /// Index of the leaf of this level that covers `gfn` (`gfn >> shift`).
    pub fn index(self, gfn: u64) -> u64 {
        gfn / self.pages()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_arithmetic_round_trips() {
        assert_eq!(frame_of(0), 0);
        assert_eq!(frame_of(511), 0);
        assert_eq!(frame_of(512), 1);
        assert_eq!(page_in_frame(513), 1);
        assert_eq!(first_page_of(3), 1536);
        assert_eq!(frame_addr(2), 4 << 20);
        assert!(is_hpage_aligned(4 << 20));
        assert!(!is_hpage_aligned(4096));
        assert!(Level::K4 < Level::M2);
        assert_eq!(Level::M2.pages(), 512);
    }
}
