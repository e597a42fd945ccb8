//! Page pools: the fixed-capacity pool of 2M frames ([`HugePool`], slots index
//! 2M pages of the hugetlb memfd) and the pool of 4K pages ([`SmallPool`],
//! slots index 4K pages of the small memfd). Accounting is exact: every slot is
//! either free or used, and freeing a free slot is an error.

use std::collections::BTreeSet;

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
    fail_next: u32,
}

impl HugePool {
    /// A pool with `capacity` free 2M slots, `0..capacity`. Slot 0 is handed out first.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity as u32;
        HugePool {
            capacity,
            free: (0..capacity).rev().collect(),
            used: vec![false; capacity as usize],
            fail_next: 0,
        }
    }

    /// Total number of slots.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Number of free slots.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Number of allocated slots.
    pub fn used_count(&self) -> usize {
        self.capacity as usize - self.free.len()
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
            return None;
        }
        let slot = self.free.pop()?;
        self.used[slot as usize] = true;
        Some(slot)
    }

    /// Returns `slot` to the pool.
    pub fn free(&mut self, slot: u32) -> Result<(), PoolError> {
        match self.used.get_mut(slot as usize) {
            Some(u) if *u => {
                *u = false;
                self.free.push(slot);
                Ok(())
            }
            _ => Err(PoolError::NotAllocated { pool: "huge", slot }),
        }
    }

    /// Checks that free list and used map agree.
    pub fn is_consistent(&self) -> bool {
        let used = self.used.iter().filter(|u| **u).count();
        used + self.free.len() == self.capacity as usize
            && self.free.iter().all(|s| !self.used[*s as usize])
    }
}

/// Pool of 4K pages, unbounded unless a limit is set (fault injection).
#[derive(Debug, Clone, Default)]
pub struct SmallPool {
    limit: Option<usize>,
    /// Free slots, ordered: allocation takes the lowest, so the slots one
    /// split asks for in a row come out ascending and, where a run is free,
    /// contiguous (one mmap of the small memfd covers them).
    free: BTreeSet<u32>,
    used: Vec<bool>,
    in_use: usize,
    fail_next: u32,
}

impl SmallPool {
    /// An empty pool that grows on demand, at most `limit` slots in use when set.
    pub fn new(limit: Option<usize>) -> Self {
        SmallPool {
            limit,
            ..Default::default()
        }
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
            return None;
        }
        if self.available() == 0 {
            return None;
        }
        let slot = match self.free.pop_first() {
            Some(s) => s,
            None => {
                self.used.push(false);
                (self.used.len() - 1) as u32
            }
        };
        self.used[slot as usize] = true;
        self.in_use += 1;
        Some(slot)
    }

    /// Returns `slot` to the pool.
    pub fn free(&mut self, slot: u32) -> Result<(), PoolError> {
        match self.used.get_mut(slot as usize) {
            Some(u) if *u => {
                *u = false;
                self.free.insert(slot);
                self.in_use -= 1;
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
        used == self.in_use
            && used + self.free.len() == self.used.len()
            && self.free.iter().all(|s| !self.used[*s as usize])
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
}
