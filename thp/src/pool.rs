//! Page pools: the fixed-capacity pool of 2M frames ([`HugePool`], slots index
//! 2M pages of the hugetlb memfd) and the pool of 4K pages ([`SmallPool`],
//! slots index 4K pages of the small memfd). Accounting is exact: every slot is
//! either free or used, and freeing a free slot is an error.

use std::collections::BTreeSet;

use crate::units::PAGES_PER_HPAGE;

/// Slots in one split block: a 2M frame's 4K pages.
const BLOCK: u32 = PAGES_PER_HPAGE as u32;

/// A slot freed twice or out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The slot is not currently allocated.
    #[error("{pool} slot {slot} freed while not allocated (double free or never allocated)")]
    NotAllocated {
        /// `"huge"` or `"small"`.
        pool: &'static str,
        /// The slot.
        slot: u32,
    },
}

/// Fixed-capacity pool of 2M pages.
#[derive(Debug, Clone)]
pub struct HugePool {
    capacity: u32,
    free: Vec<u32>,
    used: Vec<bool>,
    /// Free slots set aside whose host page is allocated ahead (zeroed by
    /// the kernel off any operation's path, [`Self::prepare_warm`]): not in
    /// `free`; [`Self::alloc`] takes them first (newest first), so a
    /// collapse or populate finds its page ready.
    warm: Vec<u32>,
    fail_next: u32,
    /// While a transaction is open: how to undo each change.
    pub(crate) undo: UndoLog,
}

/// How to undo each change to a pool since [`UndoLog::begin`], in order
/// (recording only between `begin` and `commit`).
#[derive(Debug, Clone, Default)]
pub(crate) struct UndoLog(Option<Vec<PoolUndo>>);

impl UndoLog {
    /// Starts recording.
    pub(crate) fn begin(&mut self) {
        self.0 = Some(Vec::new());
    }
    /// Whether a transaction is open.
    fn recording(&self) -> bool {
        self.0.is_some()
    }
    /// Forgets the log and stops recording.
    pub(crate) fn commit(&mut self) {
        self.0 = None;
    }
    fn record(&mut self, op: PoolUndo) {
        if let Some(u) = self.0.as_mut() {
            u.push(op);
        }
    }
    /// The changes to undo, newest first; stops recording.
    fn take_newest_first(&mut self) -> impl Iterator<Item = PoolUndo> {
        self.0.take().unwrap_or_default().into_iter().rev()
    }
}

/// One change to a pool, as the undo log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolUndo {
    /// `slot` was allocated; `grew`: past the high-water mark (small pool).
    Alloc { slot: u32, grew: bool },
    /// `slot` was freed.
    Free(u32),
    /// An injected failure was consumed.
    Failed,
    /// The small pool grew by one free slot (`alloc_at` past the
    /// high-water mark).
    Grew,
    /// Huge `slot` was taken from position `pos` of the free list
    /// ([`HugePool::alloc_at`]).
    AllocAt { slot: u32, pos: usize },
    /// The prepared block at `base` was taken by an allocation inside it
    /// (small pool, [`SmallPool::alloc_at`]).
    Unprepared(u32),
    /// Warm huge `slot` was taken from position `pos` of the warm list
    /// ([`HugePool::alloc`], [`HugePool::alloc_at`]).
    AllocWarm { slot: u32, pos: usize },
}

impl HugePool {
    /// A pool with `capacity` free 2M slots, `0..capacity`. Slot 0 is handed out first.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity as u32;
        HugePool {
            capacity,
            free: (0..capacity).rev().collect(),
            used: vec![false; capacity as usize],
            warm: Vec::new(),
            fail_next: 0,
            undo: UndoLog::default(),
        }
    }

    /// Undoes every change since the undo log began, newest first (the
    /// free list's order included), and stops recording.
    pub(crate) fn rollback_undo(&mut self) {
        for op in self.undo.take_newest_first() {
            match op {
                PoolUndo::Alloc { slot, .. } => {
                    self.used[slot as usize] = false;
                    self.free.push(slot);
                }
                PoolUndo::Free(slot) => {
                    let s = self.free.pop();
                    debug_assert_eq!(s, Some(slot));
                    self.used[slot as usize] = true;
                }
                PoolUndo::AllocAt { slot, pos } => {
                    self.used[slot as usize] = false;
                    self.free.insert(pos, slot);
                }
                PoolUndo::AllocWarm { slot, pos } => {
                    self.used[slot as usize] = false;
                    self.warm.insert(pos, slot);
                }
                PoolUndo::Failed => self.fail_next += 1,
                // The huge pool never grows and sets no block aside.
                PoolUndo::Grew | PoolUndo::Unprepared(_) => {}
            }
        }
    }

    fn record(&mut self, op: PoolUndo) {
        self.undo.record(op);
    }

    /// Total number of slots.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Number of free slots (warm ones included).
    pub fn free_count(&self) -> usize {
        self.free.len() + self.warm.len()
    }

    /// Number of allocated slots.
    pub fn used_count(&self) -> usize {
        self.capacity as usize - self.free_count()
    }

    /// Sets aside the free slot [`Self::alloc`] would take next as warm
    /// (the host allocates its page ahead); `None` when no slot is free
    /// outside the warm ones. Between operations only (not undone).
    pub fn prepare_warm(&mut self) -> Option<u32> {
        debug_assert!(!self.undo.recording(), "prepare_warm inside a transaction");
        let slot = self.free.pop()?;
        self.warm.push(slot);
        Some(slot)
    }

    /// Gives warm `slot` back to the free list; `false` if it is not warm.
    pub fn release_warm(&mut self, slot: u32) -> bool {
        debug_assert!(!self.undo.recording(), "release_warm inside a transaction");
        match self.warm.iter().position(|s| *s == slot) {
            Some(pos) => {
                self.warm.remove(pos);
                self.free.push(slot);
                true
            }
            None => false,
        }
    }

    /// Whether `slot` is warm (set aside, not taken since).
    pub fn is_warm(&self, slot: u32) -> bool {
        self.warm.contains(&slot)
    }

    /// The warm slots, oldest first.
    pub fn warm_slots(&self) -> &[u32] {
        &self.warm
    }

    /// Number of warm slots.
    pub fn warm_count(&self) -> usize {
        self.warm.len()
    }

    /// Whether `slot` is allocated.
    pub fn is_used(&self, slot: u32) -> bool {
        self.used.get(slot as usize).copied().unwrap_or(false)
    }

    /// Fault injection: the next `n` allocations fail as if the pool were empty.
    pub fn inject_failures(&mut self, n: u32) {
        self.fail_next = n;
    }

    /// Takes a free slot, `None` when the pool is empty (or a failure is injected).
    pub fn alloc(&mut self) -> Option<u32> {
        if self.fail_next > 0 {
            self.fail_next -= 1;
            self.record(PoolUndo::Failed);
            return None;
        }
        if let Some(slot) = self.warm.pop() {
            self.used[slot as usize] = true;
            let pos = self.warm.len();
            self.record(PoolUndo::AllocWarm { slot, pos });
            return Some(slot);
        }
        let slot = self.free.pop()?;
        self.used[slot as usize] = true;
        self.record(PoolUndo::Alloc { slot, grew: false });
        Some(slot)
    }

    /// The lowest slot `base` with `base..base + n` all free, if any: where
    /// a 1G split places its 512 frames, so that one mapping of the pool
    /// memfd replaces the whole 1G page at once.
    pub fn free_block(&self, n: usize) -> Option<u32> {
        let mut run = 0usize;
        for (s, used) in self.used.iter().enumerate() {
            run = if *used { 0 } else { run + 1 };
            if run == n && n > 0 {
                return Some((s + 1 - n) as u32);
            }
        }
        None
    }

    /// Takes free slot `slot`; `None` when it is taken or an injected
    /// failure is due.
    pub fn alloc_at(&mut self, slot: u32) -> Option<u32> {
        if self.fail_next > 0 {
            self.fail_next -= 1;
            self.record(PoolUndo::Failed);
            return None;
        }
        if let Some(pos) = self.warm.iter().position(|s| *s == slot) {
            self.warm.remove(pos);
            self.used[slot as usize] = true;
            self.record(PoolUndo::AllocWarm { slot, pos });
            return Some(slot);
        }
        let pos = self.free.iter().position(|s| *s == slot)?;
        self.free.remove(pos);
        self.used[slot as usize] = true;
        self.record(PoolUndo::AllocAt { slot, pos });
        Some(slot)
    }

    /// Returns `slot` to the pool.
    pub fn free(&mut self, slot: u32) -> Result<(), PoolError> {
        match self.used.get_mut(slot as usize) {
            Some(u) if *u => {
                *u = false;
                self.free.push(slot);
                self.record(PoolUndo::Free(slot));
                Ok(())
            }
            _ => Err(PoolError::NotAllocated { pool: "huge", slot }),
        }
    }

    /// Checks that free list, warm list and used map agree.
    pub fn is_consistent(&self) -> bool {
        let used = self.used.iter().filter(|u| **u).count();
        used + self.free.len() + self.warm.len() == self.capacity as usize
            && self.free.iter().all(|s| !self.used[*s as usize])
            && self.warm.iter().all(|s| !self.used[*s as usize])
            && self.warm.iter().all(|s| !self.free.contains(s))
    }
}

/// Pool of 4K pages, unbounded unless a limit is set (fault injection).
#[derive(Debug, Clone, Default)]
pub struct SmallPool {
    limit: Option<usize>,
    /// Free slots, ordered: `alloc` takes the lowest, so slots asked for
    /// in a row come out ascending and, where a run is free, contiguous; a
    /// split takes a whole block (`free_block`, `alloc_at`).
    free: BTreeSet<u32>,
    used: Vec<bool>,
    in_use: usize,
    fail_next: u32,
    /// Bases of blocks of 512 free slots set aside for splits
    /// ([`Self::prepare_block`]): below the high-water mark, disjoint;
    /// [`Self::alloc`] takes no slot of them, [`Self::free_block`] hands
    /// out the lowest. The host allocates their pages ahead, so a split
    /// onto one allocates nothing.
    prepared: BTreeSet<u32>,
    /// While a transaction is open: how to undo each change.
    pub(crate) undo: UndoLog,
}

impl SmallPool {
    /// An empty pool that grows on demand, at most `limit` slots in use when set.
    pub fn new(limit: Option<usize>) -> Self {
        SmallPool {
            limit,
            ..Default::default()
        }
    }

    /// Undoes every change since the undo log began, newest first, and
    /// stops recording: free set, used map, high-water mark and counters
    /// are exactly as before.
    pub(crate) fn rollback_undo(&mut self) {
        for op in self.undo.take_newest_first() {
            match op {
                PoolUndo::Alloc { slot, grew } => {
                    self.in_use -= 1;
                    if grew {
                        debug_assert_eq!(self.used.len(), slot as usize + 1);
                        self.used.pop();
                    } else {
                        self.used[slot as usize] = false;
                        self.free.insert(slot);
                    }
                }
                PoolUndo::Free(slot) => {
                    self.free.remove(&slot);
                    self.used[slot as usize] = true;
                    self.in_use += 1;
                }
                PoolUndo::Failed => self.fail_next += 1,
                // Only the huge pool takes a slot at a free-list position.
                PoolUndo::AllocAt { .. } | PoolUndo::AllocWarm { .. } => {}
                PoolUndo::Unprepared(base) => {
                    self.prepared.insert(base);
                }
                PoolUndo::Grew => {
                    if let Some(last) = self.used.len().checked_sub(1) {
                        self.free.remove(&(last as u32));
                        self.used.pop();
                    }
                }
            }
        }
    }

    fn record(&mut self, op: PoolUndo) {
        self.undo.record(op);
    }

    /// The lowest slot `base` with `base..base + n` all free or not yet
    /// created: where a split places a frame's pages at `base + page`, so
    /// that one mapping of the small memfd covers the whole frame. A split
    /// (`n` = 512) gets the lowest prepared block when there is one; no
    /// other run overlaps a prepared block.
    pub fn free_block(&self, n: usize) -> u32 {
        if n == BLOCK as usize {
            if let Some(&base) = self.prepared.first() {
                return base;
            }
        }
        self.lowest_run(n as u32)
    }

    /// The lowest run of `n` free slots outside the prepared blocks, or
    /// where the pool would grow to hold one.
    fn lowest_run(&self, n: u32) -> u32 {
        let end = self.used.len() as u32;
        let mut run: Option<(u32, u32)> = None;
        for &s in self.free.iter().filter(|&&s| !self.in_prepared(s)) {
            run = match run {
                Some((start, len)) if start + len == s => Some((start, len + 1)),
                _ => Some((s, 1)),
            };
            if let Some((start, len)) = run {
                if len >= n {
                    return start;
                }
            }
        }
        match run {
            // A free run that reaches the high-water mark grows past it.
            Some((start, len)) if start + len == end => start,
            _ => end,
        }
    }

    /// The prepared block holding `slot`, if any.
    fn prepared_block_of(&self, slot: u32) -> Option<u32> {
        self.prepared
            .range(..=slot)
            .next_back()
            .copied()
            .filter(|&b| slot < b + BLOCK)
    }

    fn in_prepared(&self, slot: u32) -> bool {
        self.prepared_block_of(slot).is_some()
    }

    /// The lowest free slot in no prepared block: each prepared block in
    /// the way is jumped over whole (a lookup per block, not per slot:
    /// every small page a refill takes calls this).
    fn lowest_free_outside_prepared(&self) -> Option<u32> {
        let mut from = 0;
        loop {
            let s = *self.free.range(from..).next()?;
            match self.prepared_block_of(s) {
                Some(b) => from = b + BLOCK,
                None => return Some(s),
            }
        }
    }

    /// Sets aside the lowest run of 512 free slots for a split (growing
    /// the pool to hold it) and returns its base: [`Self::alloc`] leaves
    /// it alone and the next split ([`Self::free_block`]) gets it. Not part
    /// of a transaction: call it between operations.
    pub fn prepare_block(&mut self) -> u32 {
        debug_assert!(
            !self.undo.recording(),
            "prepare_block inside a transaction: its growth would not be undone"
        );
        let base = self.lowest_run(BLOCK);
        while (self.used.len() as u32) < base + BLOCK {
            self.free.insert(self.used.len() as u32);
            self.used.push(false);
        }
        self.prepared.insert(base);
        base
    }

    /// Sets aside the block at `base` when its 512 slots are all free,
    /// below the high-water mark and in no other prepared block (a
    /// collapsed frame's block, whose pages the host still holds). Not part
    /// of a transaction. `false` (nothing changes) otherwise.
    pub fn prepare_block_at(&mut self, base: u32) -> bool {
        debug_assert!(
            !self.undo.recording(),
            "prepare_block_at inside a transaction: it would not be undone"
        );
        let end = base.saturating_add(BLOCK);
        let ok = end <= self.used.len() as u32
            && (base..end).all(|s| self.free.contains(&s))
            && self
                .prepared
                .range(..end)
                .next_back()
                .is_none_or(|&b| b + BLOCK <= base);
        if ok {
            self.prepared.insert(base);
        }
        ok
    }

    /// Whether the block at `base` is still set aside (no slot of it taken).
    pub fn is_prepared(&self, base: u32) -> bool {
        self.prepared.contains(&base)
    }

    /// Number of blocks set aside.
    pub fn prepared_count(&self) -> usize {
        self.prepared.len()
    }

    /// The bases of the blocks set aside, ascending.
    pub fn prepared_blocks(&self) -> impl Iterator<Item = u32> + '_ {
        self.prepared.iter().copied()
    }

    /// Gives the block at `base` back to ordinary allocation (the host
    /// could not allocate its pages). `false` when it was not set aside.
    pub fn release_block(&mut self, base: u32) -> bool {
        self.prepared.remove(&base)
    }

    /// Takes `slot`: a free one, or one past the high-water mark (the pool
    /// grows to it; the slots in between become free). `None` when `slot`
    /// is taken, the limit is reached or an injected failure is due.
    pub fn alloc_at(&mut self, slot: u32) -> Option<u32> {
        if self.fail_next > 0 {
            self.fail_next -= 1;
            self.record(PoolUndo::Failed);
            return None;
        }
        if self.available() == 0 || self.is_used(slot) {
            return None;
        }
        if let Some(base) = self.prepared_block_of(slot) {
            self.prepared.remove(&base);
            self.record(PoolUndo::Unprepared(base));
        }
        while self.used.len() <= slot as usize {
            self.free.insert(self.used.len() as u32);
            self.used.push(false);
            self.record(PoolUndo::Grew);
        }
        self.free.remove(&slot);
        self.used[slot as usize] = true;
        self.in_use += 1;
        self.record(PoolUndo::Alloc { slot, grew: false });
        Some(slot)
    }

    /// Changes the limit (fault injection). Slots already in use stay.
    pub fn set_limit(&mut self, limit: Option<usize>) {
        self.limit = limit;
    }

    /// Fault injection: the next `n` allocations fail.
    pub fn inject_failures(&mut self, n: u32) {
        self.fail_next = n;
    }

    /// Number of slots in use.
    pub fn used_count(&self) -> usize {
        self.in_use
    }

    /// High-water mark: slots `0..high_water()` have ever existed (size of the small memfd in pages).
    pub fn high_water(&self) -> usize {
        self.used.len()
    }

    /// How many more slots can be allocated now (`usize::MAX` without a limit).
    pub fn available(&self) -> usize {
        if self.fail_next > 0 {
            return 0;
        }
        match self.limit {
            Some(l) => l.saturating_sub(self.in_use),
            None => usize::MAX,
        }
    }

    /// Whether `slot` is allocated.
    pub fn is_used(&self, slot: u32) -> bool {
        self.used.get(slot as usize).copied().unwrap_or(false)
    }

    /// Takes a slot: the lowest free one, else a new one past the high-water mark.
    pub fn alloc(&mut self) -> Option<u32> {
        if self.fail_next > 0 {
            self.fail_next -= 1;
            self.record(PoolUndo::Failed);
            return None;
        }
        if self.available() == 0 {
            return None;
        }
        // The lowest free slot outside the prepared blocks; they lie below
        // the high-water mark, so a new slot is never inside one.
        let lowest = self.lowest_free_outside_prepared();
        let (slot, grew) = match lowest {
            Some(s) => {
                self.free.remove(&s);
                (s, false)
            }
            None => {
                self.used.push(false);
                ((self.used.len() - 1) as u32, true)
            }
        };
        self.used[slot as usize] = true;
        self.in_use += 1;
        self.record(PoolUndo::Alloc { slot, grew });
        Some(slot)
    }

    /// Returns `slot` to the pool.
    pub fn free(&mut self, slot: u32) -> Result<(), PoolError> {
        match self.used.get_mut(slot as usize) {
            Some(u) if *u => {
                *u = false;
                self.free.insert(slot);
                self.in_use -= 1;
                self.record(PoolUndo::Free(slot));
                Ok(())
            }
            _ => Err(PoolError::NotAllocated {
                pool: "small",
                slot,
            }),
        }
    }

    /// Checks that free list, used map and counter agree.
    pub fn is_consistent(&self) -> bool {
        let used = self.used.iter().filter(|u| **u).count();
        let mut last_end = 0;
        let prepared_ok = self.prepared.iter().all(|&b| {
            let ok = b >= last_end && (b..b + BLOCK).all(|s| self.free.contains(&s));
            last_end = b + BLOCK;
            ok
        });
        used == self.in_use
            && used + self.free.len() == self.used.len()
            && self.free.iter().all(|s| !self.used[*s as usize])
            && prepared_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pool_exact_accounting_and_double_free() {
        let mut p = HugePool::new(2);
        assert_eq!(p.alloc(), Some(0));
        assert_eq!(p.alloc(), Some(1));
        assert_eq!(p.alloc(), None);
        assert_eq!((p.used_count(), p.free_count()), (2, 0));
        p.free(0).unwrap();
        assert!(p.free(0).is_err());
        assert!(p.free(7).is_err());
        p.inject_failures(1);
        assert_eq!(p.alloc(), None);
        assert_eq!(p.alloc(), Some(0));
        assert!(p.is_consistent());
    }

    #[test]
    fn huge_free_block_and_alloc_at_and_their_exact_rollback() {
        let mut p = HugePool::new(8);
        assert_eq!(p.free_block(8), Some(0));
        assert_eq!(p.alloc(), Some(0));
        assert_eq!(p.alloc(), Some(1));
        p.free(0).unwrap();
        // Free: 0, 2..8; the lowest run of 4 starts at 2; no run of 7.
        assert_eq!(p.free_block(4), Some(2));
        assert_eq!(p.free_block(7), None);
        p.inject_failures(1);
        let before = format!("{p:?}");
        p.undo.begin();
        assert_eq!(p.alloc_at(4), None, "injected");
        assert_eq!(p.alloc_at(3), Some(3));
        assert_eq!(p.alloc_at(3), None, "taken");
        assert_eq!(p.alloc_at(4), Some(4));
        assert!(p.is_consistent());
        p.rollback_undo();
        // The free list's order too: the next plain alloc is as before.
        assert_eq!(format!("{p:?}"), before);
    }

    #[test]
    fn small_pool_limit_and_reuse() {
        let mut p = SmallPool::new(Some(2));
        let a = p.alloc().unwrap();
        let _b = p.alloc().unwrap();
        assert_eq!(p.alloc(), None);
        p.free(a).unwrap();
        assert_eq!(p.alloc(), Some(a));
        assert!(p.free(99).is_err());
        assert_eq!(p.high_water(), 2);
        assert!(p.is_consistent());
    }

    #[test]
    fn small_pool_reuses_lowest_free_slots_so_runs_stay_contiguous() {
        let mut p = SmallPool::new(None);
        let a: Vec<u32> = (0..8).map(|_| p.alloc().unwrap()).collect();
        assert_eq!(a, (0..8).collect::<Vec<_>>());
        // Free in descending order (as a frame's pages are often given back).
        for s in (2..6).rev() {
            p.free(s).unwrap();
        }
        let again: Vec<u32> = (0..4).map(|_| p.alloc().unwrap()).collect();
        assert_eq!(again, vec![2, 3, 4, 5]);
        assert_eq!(p.alloc(), Some(8));
        assert!(p.is_consistent());
    }

    #[test]
    fn free_block_finds_the_lowest_run_of_n_and_alloc_at_grows_to_it() {
        let mut p = SmallPool::new(None);
        assert_eq!(p.free_block(512), 0, "an empty pool: from 0");
        let a: Vec<u32> = (0..8).map(|_| p.alloc().unwrap()).collect();
        assert_eq!(a, (0..8).collect::<Vec<_>>());
        p.free(2).unwrap();
        p.free(3).unwrap();
        p.free(7).unwrap();
        assert_eq!(p.free_block(2), 2, "slots 2 and 3");
        assert_eq!(p.free_block(3), 7, "slot 7 reaches the end and grows");
        // A block past the high-water mark: the pool grows to it, the slots
        // between stay free.
        p.undo.begin();
        assert_eq!(p.alloc_at(7 + 4), Some(11));
        assert_eq!(p.high_water(), 12);
        assert!(!p.is_used(9) && p.is_used(11));
        assert_eq!(p.alloc_at(11), None, "taken");
        assert!(p.is_consistent());
        // Rolled back: as before, high-water mark included.
        p.rollback_undo();
        assert_eq!(p.high_water(), 8);
        assert_eq!(p.free_block(3), 7);
        assert!(p.is_consistent());
    }

    #[test]
    fn prepared_blocks_are_left_alone_by_alloc_and_handed_to_the_next_split() {
        let mut p = SmallPool::new(None);
        let a: Vec<u32> = (0..8).map(|_| p.alloc().unwrap()).collect();
        p.free(a[3]).unwrap();
        // Free: 3; the lowest run of 512 starts at the high-water mark 8.
        assert_eq!(p.prepare_block(), 8);
        assert_eq!(p.high_water(), 8 + 512, "grown to hold the block");
        assert_eq!(p.prepare_block(), 520);
        assert_eq!(p.prepared_count(), 2);
        assert!(p.is_consistent());
        // Plain allocations take slot 3, then grow past both blocks.
        assert_eq!(p.alloc(), Some(3));
        assert_eq!(p.alloc(), Some(1032));
        // A split gets the lowest block; a run search skips the blocks.
        assert_eq!(p.free_block(512), 8);
        assert_eq!(p.free_block(2), 1033);
        // Taking a slot of a block unprepares it, exactly undone on rollback.
        let before = format!("{p:?}");
        p.undo.begin();
        assert_eq!(p.alloc_at(8 + 5), Some(13));
        assert!(!p.is_prepared(8) && p.is_prepared(520));
        assert_eq!(p.free_block(512), 520);
        assert!(p.is_consistent());
        p.rollback_undo();
        assert_eq!(format!("{p:?}"), before);
        assert!(p.release_block(520));
        assert!(!p.release_block(520));
        assert_eq!(p.prepared_blocks().collect::<Vec<_>>(), vec![8]);
        // Released slots are ordinary free slots again.
        assert_eq!(p.free_block(500), 520);
        assert!(p.is_consistent());
        // Set aside again where it was (a collapsed frame's block): only a
        // whole free block, below the high-water mark, overlapping none.
        assert!(!p.prepare_block_at(8), "already set aside");
        assert!(!p.prepare_block_at(300), "overlaps the block at 8");
        assert!(
            !p.prepare_block_at(1000),
            "slots 1032.. are in use or beyond"
        );
        assert!(p.prepare_block_at(520));
        assert_eq!(p.prepared_blocks().collect::<Vec<_>>(), vec![8, 520]);
        assert!(p.is_consistent());
    }

    #[test]
    fn warm_huge_slots_are_taken_first_and_exactly_undone() {
        let mut p = HugePool::new(4);
        assert_eq!(p.alloc(), Some(0));
        // The slot alloc would take next (1) is set aside warm.
        assert_eq!(p.prepare_warm(), Some(1));
        assert!(p.is_warm(1));
        assert_eq!((p.free_count(), p.used_count(), p.warm_count()), (3, 1, 1));
        assert!(p.is_consistent());
        // A freed slot goes on top of the free list, yet alloc takes the warm one.
        assert_eq!(p.alloc_at(2), Some(2));
        p.free(2).unwrap();
        let before = format!("{p:?}");
        p.undo.begin();
        assert_eq!(p.alloc(), Some(1), "warm first");
        assert!(!p.is_warm(1));
        assert_eq!(p.alloc(), Some(2), "then the free list, newest first");
        assert!(p.is_consistent());
        p.rollback_undo();
        assert_eq!(format!("{p:?}"), before, "rollback puts the slot back warm");
        // alloc_at of a warm slot takes it out of the warm list, undone too.
        p.undo.begin();
        assert_eq!(p.alloc_at(1), Some(1));
        assert_eq!(p.warm_count(), 0);
        p.rollback_undo();
        assert_eq!(format!("{p:?}"), before);
        // Released: an ordinary free slot again, on top.
        assert!(p.release_warm(1));
        assert!(!p.release_warm(1));
        assert_eq!(p.alloc(), Some(1));
        assert_eq!(p.alloc(), Some(2));
        assert_eq!(p.alloc(), Some(3));
        assert_eq!(p.prepare_warm(), None, "no free slot left");
        assert!(p.is_consistent());
    }
}
