//! Draining a split virtqueue with validation of every descriptor chain, for
//! device models. Ring handling is virtio-queue's; this adds the checks a
//! device needs before trusting a chain: no loop, not longer than the queue,
//! every buffer inside guest memory.

use crate::devices::warn_limit::guest_warn;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

/// Why a descriptor chain was rejected as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The head index is out of the table or the first descriptor is unreadable.
    #[error("head descriptor {head} is out of the descriptor table or unreadable")]
    BadHead {
        /// Head index from the available ring.
        head: u16,
    },
    /// Following `next` never ended within `queue_size` descriptors.
    #[error("chain loops or is longer than the queue ({descriptors} descriptors followed)")]
    LoopOrTooLong {
        /// Descriptors followed before giving up.
        descriptors: usize,
    },
    /// A `next` index points past the descriptor table.
    #[error("descriptor `next` index {next} is past the descriptor table")]
    NextOutOfRange {
        /// The offending index.
        next: u16,
    },
    /// A descriptor could not be read, or the chain's total length overflowed.
    #[error("chain broken after {descriptors} descriptors (unreadable descriptor or total length over 4 GiB)")]
    Broken {
        /// Descriptors read before the break.
        descriptors: usize,
    },
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// Guest-physical address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
}

/// Walk `chain` and return its descriptors if the whole chain is valid.
pub fn collect_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    queue_size: u16,
) -> Result<Vec<Descriptor>, ChainError> {
    let head = chain.head_index();
    let mem = chain.memory();
    let descs: Vec<Descriptor> = chain.clone().collect();
    let Some(last) = descs.last() else {
        return Err(ChainError::BadHead { head });
    };
    if last.has_next() {
        let next = last.next();
        return Err(if next >= queue_size {
            ChainError::NextOutOfRange { next }
        } else if descs.len() >= usize::from(queue_size) {
            ChainError::LoopOrTooLong {
                descriptors: descs.len(),
            }
        } else {
            ChainError::Broken {
                descriptors: descs.len(),
            }
        });
    }
    for d in &descs {
        // A zero-length buffer touches nothing and is always acceptable.
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(ChainError::OutOfMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
    }
    Ok(descs)
}

/// What the device did with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Put it in the used ring with this many bytes written.
    Used(u32),
    /// Keep it (the device returns it later, e.g. the balloon stats buffer).
    Hold,
}

/// What one `drain_queue` call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Chains popped from the available ring.
    pub chains: u64,
    /// Chains rejected as malformed (returned unprocessed).
    pub rejected: u64,
    /// Whether the used ring advanced and the driver should be interrupted.
    pub notify: bool,
}

/// Pop every available chain of `queue`, validate it and hand it to
/// `handle(head, descriptors)`; invalid chains are logged, returned to the
/// driver unprocessed (used length 0) and never reach `handle`. `label`
/// names the queue in log messages.
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    label: &str,
    mut handle: impl FnMut(u16, &[Descriptor]) -> Completion,
) -> Drained {
    let mut out = Drained::default();
    let mut used_any = false;
    loop {
        let chain = match queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                guest_warn!("virtio {label} queue: cannot read available ring: {e}; ignoring the notification");
                break;
            }
        };
        let Some(chain) = chain else { break };
        out.chains += 1;
        let head = chain.head_index();
        let completion = match collect_chain(chain, queue.size()) {
            Ok(descs) => handle(head, &descs),
            Err(e) => {
                guest_warn!("virtio {label} queue: rejecting descriptor chain {head}: {e}");
                out.rejected += 1;
                Completion::Used(0)
            }
        };
        if let Completion::Used(len) = completion {
            used_any |= add_used(queue, mem, head, len, label);
        }
    }
    out.notify = used_any && queue.needs_notification(mem).unwrap_or(true);
    out
}

/// Return chain `head` to the driver; logs and returns false on failure.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    label: &str,
) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            guest_warn!(
                "virtio {label} queue: cannot return descriptor chain {head} to the used ring: {e}"
            );
            false
        }
    }
}
