//! The split reserve (`hugetlb` backings): blocks of 512 small slots set
//! aside in the model ([`thp::ram_model::RamModel::prepare_split_block`])
//! whose pages the host allocates ahead, so that a split onto one skips
//! allocating 511 shmem pages (the largest step of a split on its path:
//! about 0.9-1.3 ms of 2 ms on this host). A background thread keeps a few
//! blocks ready, allocating each without the RAM lock:
//!
//! 1. under the lock, [`GuestRam::split_block_to_prepare`]: the model sets
//!    the block aside (no other allocation takes its slots; the next split
//!    does) and hands out a handle on the small memfd;
//! 2. without the lock, [`SplitBlockPrep::allocate`]: `fallocate` of the
//!    block and a mapping of it, faulted in (pages that read zero; a split
//!    meanwhile may take the block and fill it: `fallocate` never changes a
//!    page that exists, and the fault-in of a page that exists keeps its
//!    bytes);
//! 3. under the lock, [`GuestRam::split_block_allocated`]: the block is
//!    warm if it is still set aside; else a split took it meanwhile and the
//!    slots the books call free are punched again (whatever step 2 put
//!    there), so the memfd holds exactly what the books say.
//!
//! Warm blocks are the only memfd pages no guest page uses:
//! [`crate::PoolStats::split_reserve_bytes`] counts them.

use crate::error::GuestMemError;
use crate::guest_ram::GuestRam;
use crate::mapping::TempMap;
use crate::memfd::Memfd;
use crate::{PAGES_PER_HPAGE, PAGE_SIZE};

/// How much of a block one `MADV_POPULATE_WRITE` faults in: it holds the
/// process's mmap lock meanwhile, and a split's remap (under its write-hold)
/// waits for it (the whole 2 MiB took ~1 ms here, 128 KiB ~70 us).
const POPULATE_CHUNK: usize = 128 << 10;

/// A collapse keeps its block while the reserve holds fewer than this many
/// times the blocks it asks for: the worker allocates only below the size
/// asked for, so in split/collapse churn the collapses feed the reserve
/// and the worker rarely allocates (2 MiB of host memory per block kept).
pub const KEEP_FACTOR: usize = 2;

/// A split block set aside whose pages are to be allocated (step 2).
#[derive(Debug)]
pub struct SplitBlockPrep {
    base: u32,
    file: Memfd,
}

impl SplitBlockPrep {
    /// The block's first small slot.
    pub fn base(&self) -> u32 {
        self.base
    }

    /// Allocates the block's pages (`fallocate`) and maps them, faulted
    /// in writable (zeroed: the split's copy then writes through the
    /// mapping, no page to allocate or fault); call it without the RAM lock.
    pub fn allocate(&self) -> Result<WarmBlock, GuestMemError> {
        let (offset, len) = block_bytes(self.base);
        self.file
            .allocate(offset, len)
            .map_err(|source| GuestMemError::Fallocate {
                what: "shmem memfd, allocate a split block ahead",
                offset,
                len,
                source,
            })?;
        map_block(&self.file, self.base)
    }
}

/// Offset and length of the block at `base` in the small memfd.
fn block_bytes(base: u32) -> (u64, u64) {
    (u64::from(base) * PAGE_SIZE, PAGES_PER_HPAGE * PAGE_SIZE)
}

/// A mapping of the block at `base`, every page faulted in writable.
fn map_block(file: &Memfd, base: u32) -> Result<WarmBlock, GuestMemError> {
    let (offset, len) = block_bytes(base);
    let map = TempMap::new(file, offset, len, "split block staging map")?;
    map.populate_in_chunks(POPULATE_CHUNK)?;
    Ok(WarmBlock { map })
}

/// A kept block (a collapse's) to map away from the RAM lock.
#[derive(Debug)]
pub struct SplitBlockMap {
    base: u32,
    file: Memfd,
}

impl SplitBlockMap {
    /// Maps the block's pages, faulted in writable (they exist: nothing is
    /// allocated or zeroed); call it without the RAM lock.
    pub fn make(&self) -> Result<WarmBlock, GuestMemError> {
        map_block(&self.file, self.base)
    }
}

/// A split block's pages, allocated and mapped (step 2's outcome).
#[derive(Debug)]
pub struct WarmBlock {
    map: TempMap,
}

impl GuestRam {
    /// Step 1: the next block to allocate ahead, when fewer than `blocks`
    /// are set aside (none on backings whose splits are the kernel's).
    pub fn split_block_to_prepare(
        &mut self,
        blocks: usize,
    ) -> Result<Option<SplitBlockPrep>, GuestMemError> {
        if !self.backing.is_hugetlb() {
            return Ok(None);
        }
        self.split_reserve_target = blocks;
        if self.model.prepared_split_blocks() >= blocks {
            return Ok(None);
        }
        let base = self.model.prepare_split_block();
        match self.host.split_block_file(base) {
            Ok(file) => Ok(Some(SplitBlockPrep { base, file })),
            Err(e) => {
                self.model.release_split_block(base);
                Err(e)
            }
        }
    }

    /// Step 3: `allocated` is step 2's outcome. `Ok(true)` when the block
    /// is ready for a split; a failed allocation gives the block back to
    /// ordinary allocation (its pages punched) and returns the error.
    pub fn split_block_allocated(
        &mut self,
        prep: SplitBlockPrep,
        allocated: Result<WarmBlock, GuestMemError>,
    ) -> Result<bool, GuestMemError> {
        let base = prep.base;
        let still_aside = self.model.split_block_prepared(base);
        let allocated = match allocated {
            Ok(warm) if still_aside => {
                self.host.mark_split_block_warm(base, warm.map);
                return Ok(true);
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if still_aside {
            self.model.release_split_block(base);
        }
        self.punch_free_slots_of_block(base)?;
        allocated.map(|()| false)
    }

    /// Taken by a split meanwhile, or not allocated: the block's slots no
    /// page uses go back to holes (whatever work away from the lock put
    /// there).
    fn punch_free_slots_of_block(&mut self, base: u32) -> Result<(), GuestMemError> {
        let free: Vec<u32> = (base..base + PAGES_PER_HPAGE as u32)
            .filter(|&s| !self.model.small_slot_used(s))
            .collect();
        self.host.small_free(&free)
    }

    /// After a collapse: the small slots `slots` its frame left. When they
    /// are one whole block (`block`: every page was present, in page order)
    /// and the reserve holds fewer than [`KEEP_FACTOR`] times its size, the
    /// block goes to the reserve as it is:
    /// its pages stay allocated for the next split (which overwrites the
    /// ones it keeps and punches the others before its remap) instead of
    /// being punched now (512 page-cache pages, ~0.3 ms here) and allocated
    /// again by the worker. Else they are punched.
    pub(crate) fn free_collapsed_small(
        &mut self,
        block: Option<u32>,
        slots: &[u32],
    ) -> Result<(), GuestMemError> {
        let whole = slots.len() == PAGES_PER_HPAGE as usize;
        if let Some(base) = block.filter(|_| whole) {
            if self.model.prepared_split_blocks() < KEEP_FACTOR * self.split_reserve_target
                && self.model.prepare_split_block_at(base)
            {
                self.host.keep_split_block(base);
                return Ok(());
            }
        }
        self.host.small_free(slots)
    }

    /// A warm block with no mapping yet (a collapse kept it), to map away
    /// from the RAM lock ([`SplitBlockMap::make`]).
    pub fn split_block_needing_map(&self) -> Result<Option<SplitBlockMap>, GuestMemError> {
        Ok(self
            .host
            .split_block_needing_map()?
            .map(|(base, file)| SplitBlockMap { base, file }))
    }

    /// Gives a kept block the mapping made for it; if it is no longer warm
    /// (a split took it meanwhile), the slots no page uses are punched
    /// again (the fault-in may have allocated them).
    pub fn split_block_mapped(
        &mut self,
        m: SplitBlockMap,
        made: Result<WarmBlock, GuestMemError>,
    ) -> Result<(), GuestMemError> {
        match made {
            Ok(w) => {
                if self.host.attach_split_block_map(m.base, w.map) {
                    Ok(())
                } else {
                    self.punch_free_slots_of_block(m.base)
                }
            }
            Err(e) => {
                // Not mapped: the block leaves the reserve (its pages punched).
                self.host.forget_split_block(m.base);
                self.model.release_split_block(m.base);
                self.punch_free_slots_of_block(m.base)?;
                Err(e)
            }
        }
    }

    /// After a split that failed (its model changes rolled back): a warm
    /// block it took is set aside again in the books, but the host punched
    /// it (`split_unprepare`): it leaves the reserve, so the books count
    /// only blocks that are warm and the worker allocates a new one.
    pub(crate) fn after_failed_split(&mut self, base: u32) {
        if self.model.split_block_prepared(base) && !self.host.is_split_block_warm(base) {
            self.model.release_split_block(base);
            if let Err(e) = self.punch_free_slots_of_block(base) {
                log::warn!("split block {base}: punching it after a failed split: {e}");
            }
        }
    }

    /// The mappings of warm blocks that splits copied into, to drop (unmap)
    /// away from the RAM lock: an unmap flushes TLBs, which is kept off the
    /// split's path.
    pub fn take_used_split_maps(&mut self) -> Vec<WarmBlock> {
        self.host
            .take_used_staging()
            .into_iter()
            .map(|map| WarmBlock { map })
            .collect()
    }

    /// Steps 1-3 in a row, under `&mut self`, until `blocks` are set aside
    /// and allocated (start-up, tests). Returns the blocks allocated.
    pub fn prepare_split_blocks(&mut self, blocks: usize) -> Result<usize, GuestMemError> {
        drop(self.take_used_split_maps());
        while let Some(k) = self.split_block_needing_map()? {
            let made = k.make();
            self.split_block_mapped(k, made)?;
        }
        let mut n = 0;
        while let Some(prep) = self.split_block_to_prepare(blocks)? {
            let r = prep.allocate();
            if self.split_block_allocated(prep, r)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Split blocks allocated ahead now.
    pub fn warm_split_blocks(&self) -> usize {
        self.host.warm_split_blocks()
    }
}
