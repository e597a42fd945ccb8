//! Blocks of small slots set aside for splits: the VMM's allocator places
//! a split frame's 512 small pages at `base + page` of one block (so one
//! mapping replaces the huge one); a block prepared ahead
//! ([`crate::pool::SmallPool::prepare_block`]) lets the host allocate its
//! pages before a split needs them, off the split's path. A placement
//! choice of the VMM's own allocator: no kernel rule and no effect on what
//! KVM maps.

use super::RamModel;

impl RamModel {
    /// Sets aside the next block for a split; returns its base slot. Call
    /// it between operations (not inside a transaction).
    pub fn prepare_split_block(&mut self) -> u32 {
        self.primary.small_pool_mut().prepare_block()
    }

    /// Sets aside the block at `base` if its slots are all free (a frame
    /// collapsed off it); `false` otherwise. Between operations only.
    pub fn prepare_split_block_at(&mut self, base: u32) -> bool {
        self.primary.small_pool_mut().prepare_block_at(base)
    }

    /// Whether the block at `base` is still set aside: no split or other
    /// allocation took a slot of it.
    pub fn split_block_prepared(&self, base: u32) -> bool {
        self.primary.small_pool().is_prepared(base)
    }

    /// Gives the block at `base` back to ordinary allocation.
    pub fn release_split_block(&mut self, base: u32) -> bool {
        self.primary.small_pool_mut().release_block(base)
    }

    /// Number of blocks set aside.
    pub fn prepared_split_blocks(&self) -> usize {
        self.primary.small_pool().prepared_count()
    }

    /// Whether small slot `slot` is in use (backs a page of guest RAM).
    pub fn small_slot_used(&self, slot: u32) -> bool {
        self.primary.small_pool().is_used(slot)
    }
}
