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
        let (offset, len) = (
            u64::from(self.base) * PAGE_SIZE,
            PAGES_PER_HPAGE * PAGE_SIZE,
        );
        self.file
            .allocate(offset, len)
            .map_err(|source| GuestMemError::Fallocate {
                what: "shmem memfd, allocate a split block ahead",
                offset,
                len,
                source,
            })?;
        let map = TempMap::new(&self.file, offset, len, "split block staging map")?;
        map.populate_in_chunks(POPULATE_CHUNK)?;
        Ok(WarmBlock { map })
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
        if !self.backing.is_hugetlb() || self.model.prepared_split_blocks() >= blocks {
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
        // Taken by a split meanwhile, or not allocated: the slots no page
        // uses go back to holes.
        let free: Vec<u32> = (base..base + PAGES_PER_HPAGE as u32)
            .filter(|&s| !self.model.small_slot_used(s))
            .collect();
        self.host.small_free(&free)?;
        allocated.map(|()| false)
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
