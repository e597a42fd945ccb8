//! Guest RAM on memfd huge pages with split, collapse and discard on real memory.
//!
//! Backings: `hugetlb` (our own allocator over a hugetlb memfd pool plus a
//! small-page memfd; `hugetlb-1g` adds a pool of 1G pages above it), `thp` (shmem THP, the kernel splits and collapses) and
//! `4k`. Every decision comes from [`thp::ram_model::RamModel`]; this crate
//! acts on its plans with memfd, mmap, fallocate and madvise, and reads back
//! the host's own accounting.

#![deny(missing_docs)]

pub mod backing;
mod collapse_reserve;
pub mod error;
mod gig_frames;
mod give_back;
mod give_back_state;
pub mod guest_ram;
pub mod host_actions;
mod host_mem;
pub mod kpageflags;
pub mod layout;
pub mod mapping;
pub mod memfd;
pub mod page_moves;
pub mod pagemap;
pub mod quiesce;
pub mod smaps;
mod split_reserve;
pub mod split_windows;
pub mod stats;
mod vma_probe;
mod write_hold;

pub use backing::{Backing, HostPaths, ParseBackingError};
pub use collapse_reserve::{HugePagePrep, WarmHugePage};
pub use error::{GuestMemError, ProtectError};
pub use give_back::{GiveBackReport, GiveBackStatus, SplitPolicy};
pub use guest_ram::{check_ram_size, FrameView, GuestRam, GuestRamConfig, MAX_RAM_SIZE};
pub use host_actions::PageOut;
pub use layout::{RamLayout, RamRegion, RamSlot, HIGH_RAM_START, MMIO_HOLE_START};
pub use quiesce::{NoVcpus, Quiesce, QuiesceError, QuiesceGuard};
pub use split_reserve::{SplitBlockMap, SplitBlockPrep, WarmBlock};
pub use split_windows::{SplitWindow, SplitWindows};
pub use stats::{DiscardReport, HostView, PoolStats};

pub use thp::units::{HPAGE_SIZE, PAGES_PER_HPAGE, PAGE_SIZE};
pub use thp::FRAMES_PER_GIG;

/// Size of a 1G page (`hugetlb-1g`).
pub const GIG_SIZE: u64 = 1 << 30;
