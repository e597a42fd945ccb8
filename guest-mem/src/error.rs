//! `GuestMemError`: every variant says what went wrong and what to do about it.

use std::io;

use crate::quiesce::QuiesceError;

/// Errors of guest RAM set-up and per-frame operations.
#[derive(Debug, thiserror::Error)]
pub enum GuestMemError {
    /// Strict pool mode and the host hugetlb pool cannot hold every frame.
    #[error(
        "hugetlb pool too small: need {need} free 2M pages, have {have}: reserve with \
         `echo {suggest_total} > /proc/sys/vm/nr_hugepages` (strict pool mode; the default \
         policy instead falls back to small pages for the frames that do not fit)"
    )]
    PoolTooSmall {
        /// Free 2M pages the guest RAM needs.
        need: u64,
        /// Free (unreserved) 2M pages the host has now.
        have: u64,
        /// A value for `nr_hugepages` that would make `need` pages available.
        suggest_total: u64,
    },

    /// Strict pool mode and the host's 1G pool cannot hold every whole GiB.
    #[error(
        "1G hugetlb pool too small: need {need} free 1G pages, have {have}: reserve with \
         `echo {suggest_total} > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages` \
         early, before memory fragments (strict pool mode; the default falls back to 2M \
         frames for the GiBs that do not fit)"
    )]
    GigPoolTooSmall {
        /// Free 1G pages the guest RAM needs.
        need: u64,
        /// Free (unreserved) 1G pages the host has now.
        have: u64,
        /// A value for `nr_hugepages` (1G) that would make `need` pages available.
        suggest_total: u64,
    },

    /// A 1G operation on a backing without 1G pages (a bug of the caller).
    #[error("this guest RAM has no 1G pool (only the hugetlb-1g backing has one)")]
    NoGigPool,

    /// The host has no free 2M hugetlb pages at all (or no hugetlb support) and
    /// the hugetlb backing was asked for in strict mode.
    #[error(
        "hugetlb backing needs 2M hugetlb pages but {detail}: reserve them with \
         `echo N > /proc/sys/vm/nr_hugepages`"
    )]
    HugetlbUnavailable {
        /// What was found on the host.
        detail: String,
    },

    /// The `thp` backing needs shmem THP and the host has it disabled.
    #[error(
        "shmem transparent huge pages are disabled ({path} = {value}): set it with \
         `echo advise > {path}` (or use --backing hugetlb / 4k)"
    )]
    ShmemThpDisabled {
        /// The sysfs file that disables it.
        path: String,
        /// The value found there.
        value: String,
    },

    /// Guest RAM size is not a positive multiple of 2 MiB.
    #[error("guest RAM size {size} bytes is not a positive multiple of 2 MiB (2097152): round it to a multiple of 2M")]
    SizeNotMultipleOf2M {
        /// The requested size.
        size: u64,
    },

    /// Guest RAM size above what the guest-physical layout allows.
    #[error("guest RAM size {size:#x} is larger than the maximum {max:#x} (511 GiB: RAM above the 32-bit MMIO hole must end at 512 GiB)")]
    SizeTooLarge {
        /// The requested size.
        size: u64,
        /// The largest allowed size.
        max: u64,
    },

    /// More guest RAM than the host can back (every page is populated at start).
    #[error(
        "guest RAM of {} MiB needs {} MiB of ordinary host memory ({} MiB are on our 2M hugetlb \
         pool) but the host has only {} MiB available (MemAvailable); every page is populated at \
         start: use a smaller --memory, or reserve hugetlb pages for --backing hugetlb",
        .size >> 20, .need >> 20, .huge >> 20, .available >> 20
    )]
    HostCannotBack {
        /// Guest RAM bytes.
        size: u64,
        /// Bytes that must come from ordinary memory.
        need: u64,
        /// Bytes on hugetlb pages of our pool.
        huge: u64,
        /// `MemAvailable`.
        available: u64,
    },

    /// A guest-physical range not inside one RAM region.
    #[error(
        "range gpa {gpa:#x} + {len:#x} is outside guest RAM {ram}: pass a range inside guest RAM"
    )]
    RangeOutsideRam {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
        /// Guest RAM's regions, e.g. `[0, 0xc0000000) and [0x100000000, 0x140000000)`.
        ram: String,
    },

    /// A `--memslot-size` that cannot cut guest RAM into memslots.
    #[error("memslot size {size:#x} is unusable: {why}")]
    BadMemslotSize {
        /// The size asked for.
        size: u64,
        /// Why not.
        why: &'static str,
    },

    /// A range not aligned to 4K pages (or empty).
    #[error("range gpa {gpa:#x} + {len:#x} is not a non-empty range of whole 4K pages: align start and length to 4096")]
    RangeNotPageAligned {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },

    /// A frame in the 32-bit MMIO hole (guest RAM above 3 GiB continues at 4 GiB).
    #[error(
        "frame {frame} lies in the 32-bit MMIO hole (frames 1536..2048 are not RAM): pass a RAM \
         frame"
    )]
    FrameInHole {
        /// The frame asked for.
        frame: usize,
    },

    /// A frame index past the end of guest RAM.
    #[error(
        "frame {frame} is outside guest RAM ({frames} frames of 2M): pass a frame below {frames}"
    )]
    FrameOutOfRange {
        /// The frame asked for.
        frame: usize,
        /// Number of frames of guest RAM.
        frames: usize,
    },

    /// Split or collapse on a backing without huge frames.
    #[error("backing {backing} has no huge frames: {op} needs --backing hugetlb or thp")]
    NoHugeFrames {
        /// The backing in use.
        backing: crate::Backing,
        /// The refused operation.
        op: &'static str,
    },

    /// `memfd_create` failed.
    #[error("memfd_create({name}) failed: {source} (hugetlb memfds need 2M hugetlb support in the kernel)")]
    Memfd {
        /// Name of the memfd.
        name: String,
        /// The OS error (errno).
        source: io::Error,
    },

    /// `ftruncate` of a memfd failed.
    #[error("ftruncate({name}, {len:#x}) failed: {source}")]
    Truncate {
        /// Name of the memfd.
        name: String,
        /// The requested length.
        len: u64,
        /// The OS error (errno).
        source: io::Error,
    },

    /// `mmap` failed.
    #[error("mmap of {what} at {addr:#x} (+{len:#x}) failed: {source}")]
    Mmap {
        /// What was being mapped.
        what: &'static str,
        /// Requested address (0 = any).
        addr: u64,
        /// Length.
        len: u64,
        /// The OS error (errno).
        source: io::Error,
    },

    /// `fallocate` failed (other than the hugetlb pool running dry).
    #[error("fallocate({what}, offset {offset:#x}, len {len:#x}) failed: {source}")]
    Fallocate {
        /// Which memfd and operation.
        what: &'static str,
        /// Offset in the file.
        offset: u64,
        /// Length.
        len: u64,
        /// The OS error (errno).
        source: io::Error,
    },

    /// The host's hugetlb pool ran out while allocating a huge page that our
    /// books had (another process took pages after start-up).
    #[error(
        "the host hugetlb pool ran out allocating huge slot {slot} ({source}): another process took \
         2M pages; reserve more with `echo N > /proc/sys/vm/nr_hugepages`"
    )]
    HostPoolExhausted {
        /// Slot of the hugetlb memfd.
        slot: u32,
        /// The OS error (ENOSPC).
        source: io::Error,
    },

    /// `madvise` failed.
    #[error("madvise({advice}) at {addr:#x} (+{len:#x}) failed: {source}")]
    Madvise {
        /// Name of the advice.
        advice: &'static str,
        /// Address.
        addr: u64,
        /// Length.
        len: u64,
        /// The OS error (errno).
        source: io::Error,
    },

    /// `MADV_COLLAPSE` refused to collapse a frame of the `thp` backing.
    #[error("MADV_COLLAPSE of frame {frame} failed: {source} ({hint})")]
    CollapseFailed {
        /// The frame.
        frame: usize,
        /// The OS error.
        source: io::Error,
        /// What the errno means here.
        hint: &'static str,
    },

    /// Writing pages into a memfd failed.
    #[error("writing {len} bytes at offset {offset:#x} of the {what} failed: {source} (the host may be out of memory)")]
    MemfdWrite {
        /// Which memfd.
        what: &'static str,
        /// Byte offset in the file.
        offset: u64,
        /// Bytes still to write.
        len: u64,
        /// The OS error.
        source: io::Error,
    },

    /// Reading a host accounting file failed.
    #[error("reading {path} failed: {source}")]
    HostRead {
        /// Path of the file.
        path: String,
        /// The OS error.
        source: io::Error,
    },

    /// A host accounting file did not have the expected content.
    #[error("unexpected content in {path}: {detail}")]
    HostParse {
        /// Path of the file.
        path: String,
        /// What was wrong.
        detail: String,
    },

    /// The vCPUs could not be paused.
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),

    /// A hugetlb split reached the host without the vCPU pause it needs (a
    /// bug: every split goes through the paused path).
    #[error("internal error: hugetlb split of frame {frame} (huge slot {huge_slot}) without a vCPU pause; refused")]
    UnpausedSplit {
        /// Guest frame.
        frame: usize,
        /// Its huge slot.
        huge_slot: u32,
    },
    /// The model refused the operation.
    #[error("the RAM model refused: {0}")]
    Model(#[from] thp::ram_model::ModelError),

    /// `mprotect` of a frame failed (the original protection put back).
    #[error(transparent)]
    Protect(#[from] ProtectError),

    /// `mincore` of a frame failed.
    #[error("mincore at host {addr:#x} failed: {source}")]
    Mincore {
        /// Host address.
        addr: u64,
        /// The OS error (errno).
        source: io::Error,
    },

    /// Building the vm-memory view failed.
    #[error("building the vm-memory view of guest RAM failed: {0}")]
    VmMemory(String),
}

impl GuestMemError {
    /// The OS error of the last libc call.
    pub(crate) fn last_os() -> io::Error {
        io::Error::last_os_error()
    }
}

/// `mprotect` failed.
#[derive(Debug, thiserror::Error)]
#[error("mprotect({prot}) of host {addr:#x}+{len:#x}: {source}{restore}")]
pub struct ProtectError {
    /// The protection asked for, as text.
    pub prot: &'static str,
    /// Host address.
    pub addr: u64,
    /// Length.
    pub len: u64,
    /// Cause.
    pub source: std::io::Error,
    /// What restoring the original protection did, as text.
    pub restore: String,
}
