//! Huge slots made warm ahead of a collapse: a free 2M slot set aside
//! ([`crate::pool::HugePool::prepare_warm`]) whose host page the VMM
//! allocates (and the kernel zeroes) off any operation's path, so the next
//! collapse (or populate) takes a page that is ready. A placement choice of
//! the VMM's own allocator: which free slot a frame gets changes nothing
//! KVM maps.

use super::RamModel;
use crate::units::PAGES_PER_HPAGE;

impl RamModel {
    /// How many huge slots should be warm for `target` asked for: at most
    /// as many as frames certainly mapped by small pages (only those can be
    /// collapsed): the small pages in use, 512 to a frame at most, so a
    /// guest with no split frame holds no host page beyond its own. O(1).
    pub fn warm_huge_wanted(&self, target: usize) -> usize {
        let small_pages = self.primary.small_pool().used_count();
        target.min(small_pages.div_ceil(PAGES_PER_HPAGE as usize))
    }

    /// Sets aside the free huge slot the next allocation takes, to be made
    /// warm; `None` when no other slot is free. Between operations only.
    pub fn prepare_warm_huge(&mut self) -> Option<u32> {
        self.primary.huge_pool_mut().prepare_warm()
    }

    /// Whether huge `slot` is still set aside warm (no allocation took it).
    pub fn warm_huge_prepared(&self, slot: u32) -> bool {
        self.primary.huge_pool().is_warm(slot)
    }

    /// Gives warm huge `slot` back to the free list.
    pub fn release_warm_huge(&mut self, slot: u32) -> bool {
        self.primary.huge_pool_mut().release_warm(slot)
    }

    /// The oldest huge slot set aside warm, if any.
    pub fn oldest_warm_huge(&self) -> Option<u32> {
        self.primary.huge_pool().warm_slots().first().copied()
    }

    /// Number of huge slots set aside warm.
    pub fn warm_huge_count(&self) -> usize {
        self.primary.huge_pool().warm_count()
    }

    /// Whether huge slot `slot` backs a frame.
    pub fn huge_slot_used(&self, slot: u32) -> bool {
        self.primary.huge_pool().is_used(slot)
    }
}
