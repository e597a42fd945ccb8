//! Inflate / deflate buffers: arrays of le32 4K page frame numbers, checked
//! element by element against the set of inflated pages.

use crate::devices::warn_limit::guest_warn;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::pfn_set::{PfnError, PfnSet};
use super::BalloonCounters;

/// Largest PFN array read from one chain (256 Ki PFNs = 1 GiB of guest
/// pages; Linux sends at most 256 per buffer). Bytes past it are ignored.
pub const MAX_PFN_BUFFER_BYTES: usize = 1 << 20;

/// Individual rejections logged per buffer before only counting them.
const LOG_LIMIT: usize = 8;

/// Which way pages move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageOp {
    /// Guest gives pages to the host.
    Inflate,
    /// Guest takes pages back.
    Deflate,
}

impl PageOp {
    /// Queue name for logs.
    pub fn name(self) -> &'static str {
        match self {
            PageOp::Inflate => "balloon inflate",
            PageOp::Deflate => "balloon deflate",
        }
    }
}

/// Read the PFN array carried by the device-readable buffers of a chain.
pub fn read_pfns(mem: &GuestMemoryMmap, descs: &[Descriptor], op: PageOp) -> Vec<u32> {
    let mut bytes = Vec::new();
    for d in descs {
        if d.is_write_only() {
            guest_warn!(
                "{} queue: ignoring device-writable buffer {:#x}+{:#x} (PFN arrays are driver-written)",
                op.name(),
                d.addr().0,
                d.len()
            );
            continue;
        }
        let room = MAX_PFN_BUFFER_BYTES - bytes.len();
        let take = (d.len() as usize).min(room);
        if take < d.len() as usize {
            guest_warn!(
                "{} queue: PFN array longer than {MAX_PFN_BUFFER_BYTES} bytes; ignoring {} bytes",
                op.name(),
                d.len() as usize - take
            );
        }
        let start = bytes.len();
        bytes.resize(start + take, 0);
        if let Err(e) = mem.read_slice(&mut bytes[start..], d.addr()) {
            guest_warn!(
                "{} queue: cannot read buffer {:#x}+{take:#x}: {e}; ignoring it",
                op.name(),
                d.addr().0
            );
            bytes.truncate(start);
        }
    }
    let chunks = bytes.chunks_exact(4);
    if !chunks.remainder().is_empty() {
        guest_warn!(
            "{} queue: PFN array of {} bytes is not a multiple of 4; ignoring the last {}",
            op.name(),
            bytes.len(),
            chunks.remainder().len()
        );
    }
    chunks
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Apply `op` to each PFN against `set`: valid ones are recorded and
/// returned (for the backend), invalid ones are logged with their reason,
/// counted and skipped.
pub fn apply(
    set: &mut PfnSet,
    op: PageOp,
    pfns: &[u32],
    counters: &mut BalloonCounters,
) -> Vec<u64> {
    let mut accepted = Vec::with_capacity(pfns.len());
    let mut rejected = 0usize;
    for &pfn in pfns {
        let pfn = u64::from(pfn);
        let res = match op {
            PageOp::Inflate => set.insert(pfn),
            PageOp::Deflate => set.remove(pfn),
        };
        match res {
            Ok(()) => accepted.push(pfn),
            Err(e) => {
                match e {
                    PfnError::OutOfRange { .. } => counters.pfn_out_of_range += 1,
                    PfnError::AlreadyInflated { .. } => counters.pfn_already_inflated += 1,
                    PfnError::NotInflated { .. } => counters.pfn_not_inflated += 1,
                }
                rejected += 1;
                if rejected <= LOG_LIMIT {
                    guest_warn!("{} queue: ignoring element: {e}", op.name());
                }
            }
        }
    }
    if rejected > LOG_LIMIT {
        guest_warn!(
            "{} queue: {} more invalid PFNs in the same buffer ignored",
            op.name(),
            rejected - LOG_LIMIT
        );
    }
    match op {
        PageOp::Inflate => counters.inflated_pfns += accepted.len() as u64,
        PageOp::Deflate => counters.deflated_pfns += accepted.len() as u64,
    }
    accepted
}
