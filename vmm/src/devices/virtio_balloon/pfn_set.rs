//! The set of inflated guest pages: one bit per 4K page of guest RAM.

/// Why a PFN was not added to or removed from the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PfnError {
    /// The page is not guest RAM.
    #[error("PFN {pfn:#x} is outside guest RAM ({pages:#x} pages, the 32-bit MMIO hole excluded)")]
    OutOfRange {
        /// The offending PFN.
        pfn: u64,
        /// Pages of guest RAM.
        pages: u64,
    },
    /// Inflate of a page already in the balloon.
    #[error("PFN {pfn:#x} is already inflated")]
    AlreadyInflated {
        /// The offending PFN.
        pfn: u64,
    },
    /// Deflate of a page that is not in the balloon.
    #[error("PFN {pfn:#x} was never inflated")]
    NotInflated {
        /// The offending PFN.
        pfn: u64,
    },
}

/// Bitmap over the PFNs `0..pages` of guest RAM.
#[derive(Debug, Clone)]
pub struct PfnSet {
    words: Vec<u64>,
    pages: u64,
    count: u64,
    /// PFNs below `pages` that are not RAM (the 32-bit MMIO hole).
    hole: std::ops::Range<u64>,
}

impl PfnSet {
    /// Empty set over `pages` pages.
    pub fn new(pages: u64) -> Self {
        PfnSet {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
            count: 0,
            hole: 0..0,
        }
    }

    /// Whether the `n` PFNs from `first` are all guest RAM.
    pub fn covers(&self, first: u64, n: u64) -> bool {
        first.checked_add(n).is_some_and(|end| {
            end <= self.pages && (end <= self.hole.start || first >= self.hole.end)
        })
    }

    /// The same set with the PFNs `hole` (not RAM) out of range.
    pub fn with_hole(mut self, hole: std::ops::Range<u64>) -> Self {
        self.hole = hole;
        self
    }

    /// Pages of guest RAM covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Number of PFNs in the set.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Number of whole 2M frames (512 aligned PFNs) in the set.
    pub fn full_frames(&self) -> u64 {
        self.words
            .chunks_exact(8)
            .filter(|w| w.iter().all(|x| *x == u64::MAX))
            .count() as u64
    }

    /// Number of 2M frames with some but not all of their PFNs in the set.
    pub fn partial_frames(&self) -> u64 {
        self.words
            .chunks(8)
            .filter(|w| w.iter().any(|x| *x != 0) && !w.iter().all(|x| *x == u64::MAX))
            .count() as u64
    }

    /// Whether `pfn` is in the set (false for PFNs outside RAM).
    pub fn contains(&self, pfn: u64) -> bool {
        pfn < self.pages && self.words[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    /// Add `pfn` (inflate).
    pub fn insert(&mut self, pfn: u64) -> Result<(), PfnError> {
        self.check_range(pfn)?;
        let (w, bit) = ((pfn / 64) as usize, 1u64 << (pfn % 64));
        if self.words[w] & bit != 0 {
            return Err(PfnError::AlreadyInflated { pfn });
        }
        self.words[w] |= bit;
        self.count += 1;
        Ok(())
    }

    /// Remove `pfn` (deflate).
    pub fn remove(&mut self, pfn: u64) -> Result<(), PfnError> {
        self.check_range(pfn)?;
        let (w, bit) = ((pfn / 64) as usize, 1u64 << (pfn % 64));
        if self.words[w] & bit == 0 {
            return Err(PfnError::NotInflated { pfn });
        }
        self.words[w] &= !bit;
        self.count -= 1;
        Ok(())
    }

    /// Remove everything, returning the PFNs that were in the set, ascending.
    pub fn take_all(&mut self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.count as usize);
        for (i, w) in self.words.iter_mut().enumerate() {
            let mut bits = std::mem::take(w);
            while bits != 0 {
                out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        self.count = 0;
        out
    }

    fn check_range(&self, pfn: u64) -> Result<(), PfnError> {
        if pfn >= self.pages || self.hole.contains(&pfn) {
            return Err(PfnError::OutOfRange {
                pfn,
                pages: self.pages,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_and_partial_frames() {
        let mut s = PfnSet::new(4 * 512);
        for p in 512..1024 {
            s.insert(p).unwrap();
        }
        s.insert(1500).unwrap();
        assert_eq!((s.full_frames(), s.partial_frames()), (1, 1));
        s.remove(600).unwrap();
        assert_eq!((s.full_frames(), s.partial_frames()), (0, 2));
    }

    #[test]
    fn insert_remove_and_errors() {
        let mut s = PfnSet::new(130);
        assert_eq!(s.insert(0), Ok(()));
        assert_eq!(s.insert(129), Ok(()));
        assert_eq!(s.insert(129), Err(PfnError::AlreadyInflated { pfn: 129 }));
        assert_eq!(
            s.insert(130),
            Err(PfnError::OutOfRange {
                pfn: 130,
                pages: 130
            })
        );
        assert_eq!(s.remove(5), Err(PfnError::NotInflated { pfn: 5 }));
        assert!(s.contains(129) && !s.contains(128) && !s.contains(1 << 40));
        let mut h = PfnSet::new(1024).with_hole(256..512);
        assert!(matches!(h.insert(256), Err(PfnError::OutOfRange { .. })));
        assert!(matches!(h.insert(511), Err(PfnError::OutOfRange { .. })));
        assert!(h.insert(255).is_ok() && h.insert(512).is_ok());
        assert!(h.covers(0, 256) && h.covers(512, 512) && !h.covers(255, 2));
        assert!(!h.covers(300, 1) && !h.covers(1000, 25) && !h.covers(u64::MAX, 2));
        assert_eq!(s.count(), 2);
        assert_eq!(s.remove(0), Ok(()));
        assert_eq!(s.insert(64), Ok(()));
        assert_eq!(s.take_all(), vec![64, 129]);
        assert_eq!(s.count(), 0);
        assert!(!s.contains(64));
    }
}
