//! The event kinds `vmm stress` fires at a running guest (`--ops-mix`
//! names), and how each one runs as phases against the fault path.

use super::HostOp;
use crate::units::PAGES_PER_HPAGE;
use std::fmt;
use std::str::FromStr;

/// A kind of host-side event of `vmm stress`, spelled as in `--ops-mix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    /// `discard4k`: primary unmap of one 4K page (a PMD-mapped frame is
    /// split first: `split_huge_pmd`), inside an invalidation.
    Discard4k,
    /// `discard2m`: primary unmap of a whole frame, inside an invalidation.
    Discard2m,
    /// `split`: split-by-copy of a frame (PMD -> 512 PTEs to new small
    /// folios), inside an invalidation.
    Split,
    /// `collapse`: khugepaged collapse (PTEs -> PMD to a new huge folio),
    /// inside an invalidation.
    Collapse,
    /// `wrprotect`: `mprotect(PROT_READ)` of a frame, then back to
    /// `PROT_READ|PROT_WRITE`, each inside an invalidation
    /// (`MMU_NOTIFY_PROTECTION_VMA`).
    Wrprotect,
    /// `dirtylog`: dirty logging on for the memslot, then off (memslot
    /// updates: the generation moves; on drops 2M leaves under `mmu_lock`).
    Dirtylog,
    /// `slot`: the memslot deleted (all its leaves zapped under `mmu_lock`)
    /// and re-created at the same place.
    Slot,
    /// `pageout`: `MADV_PAGEOUT` of a frame inside an invalidation; the
    /// next fault faults the page back in, possibly at a new pfn.
    Pageout,
}

impl EventKind {
    /// Every kind, in `--ops-mix` order.
    pub const ALL: [EventKind; 8] = [
        EventKind::Discard4k,
        EventKind::Discard2m,
        EventKind::Split,
        EventKind::Collapse,
        EventKind::Wrprotect,
        EventKind::Dirtylog,
        EventKind::Slot,
        EventKind::Pageout,
    ];

    /// The `--ops-mix` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Discard4k => "discard4k",
            EventKind::Discard2m => "discard2m",
            EventKind::Split => "split",
            EventKind::Collapse => "collapse",
            EventKind::Wrprotect => "wrprotect",
            EventKind::Dirtylog => "dirtylog",
            EventKind::Slot => "slot",
            EventKind::Pageout => "pageout",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is no [`EventKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event kind {0:?}; valid: discard4k, discard2m, split, collapse, wrprotect, dirtylog, slot, pageout")]
pub struct UnknownEventKind(pub String);

impl FromStr for EventKind {
    type Err = UnknownEventKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownEventKind(s.to_string()))
    }
}

/// A KVM-side memslot operation (`KVM_SET_USER_MEMORY_REGION` on the one
/// memslot of an interleaver world). Runs as one step that takes `mmu_lock`
/// (zaps), so it cannot run while a fault holds the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmOp {
    /// `KVM_MEM_LOG_DIRTY_PAGES` on or off.
    DirtyLog {
        /// On.
        on: bool,
    },
    /// Delete the memslot (`kvm_arch_flush_shadow_memslot`).
    DeleteSlot,
    /// Re-create the deleted memslot at the same place.
    CreateSlot,
}

/// One event: a kind at a frame (and a page inside it for `discard4k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The kind.
    pub kind: EventKind,
    /// The 2M frame it hits (ignored by `dirtylog` and `slot`, which act on
    /// the whole memslot).
    pub frame: usize,
    /// The 4K page inside the frame (`discard4k` only; taken mod 512).
    pub page: u64,
}

/// One phase of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A host change inside an invalidation: start, change, end (3 steps).
    Invalidate(HostOp),
    /// A host change without invalidation (1 step).
    Plain(HostOp),
    /// A memslot operation under `mmu_lock` (1 step).
    Kvm(KvmOp),
}

impl Phase {
    pub(crate) fn steps(&self) -> u8 {
        match self {
            Phase::Invalidate(_) => 3,
            Phase::Plain(_) | Phase::Kvm(_) => 1,
        }
    }
}

impl Event {
    /// An event of `kind` at `frame` (page 0 of it for `discard4k`).
    pub fn new(kind: EventKind, frame: usize) -> Self {
        Event {
            kind,
            frame,
            page: 0,
        }
    }

    /// The phases in order.
    pub(crate) fn phases(&self) -> Vec<Phase> {
        let frame = self.frame;
        let first = frame as u64 * PAGES_PER_HPAGE;
        let inv = Phase::Invalidate;
        match self.kind {
            EventKind::Discard4k => vec![inv(HostOp::Unmap {
                first: first + self.page % PAGES_PER_HPAGE,
                npages: 1,
            })],
            EventKind::Discard2m => vec![inv(HostOp::Unmap {
                first,
                npages: PAGES_PER_HPAGE,
            })],
            EventKind::Split => vec![inv(HostOp::Migrate { frame })],
            EventKind::Collapse => vec![inv(HostOp::Collapse { frame })],
            EventKind::Wrprotect => vec![
                inv(HostOp::Mprotect {
                    frame,
                    writable: false,
                }),
                inv(HostOp::Mprotect {
                    frame,
                    writable: true,
                }),
            ],
            EventKind::Dirtylog => vec![
                Phase::Kvm(KvmOp::DirtyLog { on: true }),
                Phase::Kvm(KvmOp::DirtyLog { on: false }),
            ],
            EventKind::Slot => vec![Phase::Kvm(KvmOp::DeleteSlot), Phase::Kvm(KvmOp::CreateSlot)],
            EventKind::Pageout => vec![inv(HostOp::Pageout { frame })],
        }
    }
}
