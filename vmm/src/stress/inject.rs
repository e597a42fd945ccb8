//! The injector: resolves drawn events against the machine and fires them.
//! Runs on the main thread; events are strictly sequential.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use guest_mem::page_moves::{Moved, PageFrames};
use guest_mem::{
    quiesce, Backing, FrameView, GuestMemError, PageOut, QuiesceError, HPAGE_SIZE, PAGE_SIZE,
};
use kvm_ioctls::VmFd;
use serde::Serialize;

use super::args::InjectBug;
use super::events::{Draw, Event, EventKind, HostKind};
use super::shared::{SharedError, SharedLog};
use super::slot::{SlotError, Slots};
use super::vcpu::StressVcpuShared;
use crate::machine::Machine;
use crate::mirror::{self, KvmCounts, Prediction};
use crate::stats::StatsError;

/// How long a write-protect waits for the first vCPU write to fault.
const WRPROTECT_HOLD: Duration = Duration::from_millis(5);
/// How long the injector waits for guest progress before giving up.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// Guest pages each vCPU must check while dirty logging is on (`dirtylog`).
const DIRTYLOG_PAGES: u64 = 1024;
/// The dirty bit of an x86 page-table entry.
const PDE_DIRTY: u64 = 1 << 6;

/// The injector failed (the run ends with an internal error).
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// Pausing the vCPUs failed.
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
    /// Guest RAM refused an operation that must work.
    #[error("{op} of gpa {gpa:#x}: {source}")]
    GuestMem {
        /// Operation.
        op: &'static str,
        /// Where.
        gpa: u64,
        /// Cause.
        source: GuestMemError,
    },
    /// Memslot ioctl.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// Shared log.
    #[error(transparent)]
    Shared(#[from] SharedError),
    /// KVM statistics.
    #[error("reading KVM statistics: {0}")]
    Stats(#[from] StatsError),
    /// An event names a frame events may not act on.
    #[error("event {event}: the frame is outside the work frames {frames:?}")]
    FrameOutside {
        /// The event.
        event: String,
        /// The frames events act on.
        frames: Range<u64>,
    },
    /// The guest made no progress.
    #[error("the guest made no progress for {0:?} (vCPU stuck?)")]
    NoProgress(Duration),
}

/// What an event did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// It acted on the machine.
    Done,
    /// Nothing to do (e.g. no huge frame left to split).
    Noop,
    /// The host refused (reason); counted, not an error.
    Refused(String),
}

/// Per-kind measurements beside the effect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Extra {
    /// wrprotect: vCPU write faults taken while the frame was read-only.
    pub faults: u64,
    /// dirtylog: KVM's pages_2m before and while logging.
    pub pages_2m_before: u64,
    /// dirtylog: KVM's pages_2m while logging.
    pub pages_2m_during: u64,
    /// dirtylog: pages in KVM's dirty bitmap.
    pub dirty_pages: u64,
    /// slot: KVM's pages_4k + pages_2m right after the delete.
    pub mapped_after_delete: u64,
    /// The memslot the event acted in (`slot`: the one deleted and
    /// re-created; frame events: the one holding the frame).
    pub slot: Option<u32>,
    /// pageout: resident pages of the frame before and after.
    pub resident_before: u64,
    /// pageout: resident after.
    pub resident_after: u64,
}

/// A quiescent point's comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuiescePoint {
    /// Event sequence number.
    pub seq: u64,
    /// Dirty logging on during the point.
    pub dirty_logging: bool,
    /// KVM's pages_4k.
    pub kvm_pages_4k: u64,
    /// KVM's pages_2m.
    pub kvm_pages_2m: u64,
    /// KVM's pages_1g.
    pub kvm_pages_1g: u64,
    /// The mirror's prediction.
    pub prediction: Prediction,
    /// Whether they agree (pages_2m exactly, pages_4k exactly or within
    /// the printed bound).
    pub agrees: bool,
    /// Frames our books (the RAM model) hold huge.
    pub huge_frames: u64,
    /// Frames the host maps with a PMD (`PAGEMAP_SCAN`), when the kernel says.
    pub host_pmd_frames: Option<u64>,
    /// Frames where our books and the host's page tables disagree (huge vs
    /// small). The mirror is fed the host's truth, so KVM's logic is
    /// checked either way; a disagreement is a finding about guest-mem.
    pub books_vs_host: Option<Vec<u64>>,
    /// Pages the host kernel migrated (`pgmigrate_success`) between the start
    /// of the guest's last pass and the read of KVM's counters, if it says.
    pub host_migrated: Option<u64>,
    /// Times this point was taken again because KVM disagreed with the mirror
    /// while the host migrated pages (an invalidation no event caused).
    pub retakes: u32,
    /// Guest pages (and their 2M frames) the host kernel moved to other
    /// host pages between the start of the guest's last pass and the read
    /// of KVM's counters (`guest_mem::page_moves`), when the host says.
    pub guest_pages_moved: Option<Moved>,
    /// KVM disagreed, and by no more than those moves explain
    /// (`Prediction::short_by_host_moves`): not a violation.
    pub explained_by_host_moves: bool,
}

impl QuiescePoint {
    /// KVM's counters at this point.
    pub fn kvm(&self) -> KvmCounts {
        KvmCounts {
            pages_4k: self.kvm_pages_4k,
            pages_2m: self.kvm_pages_2m,
            pages_1g: self.kvm_pages_1g,
        }
    }
}

/// `quiescent point at event #N: KVM pages_4k … pages_2m …, mirror …`: what
/// was compared (not whether it agreed).
impl std::fmt::Display for QuiescePoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "quiescent point at event #{}{}: KVM pages_4k {} pages_2m {}, mirror predicts {}{} / {} \
             ({})",
            self.seq,
            if self.dirty_logging {
                " (dirty logging on)"
            } else {
                ""
            },
            self.kvm_pages_4k,
            self.kvm_pages_2m,
            self.prediction.pages_4k,
            if self.prediction.pages_4k_max != self.prediction.pages_4k {
                format!("..{}", self.prediction.pages_4k_max)
            } else {
                String::new()
            },
            self.prediction.pages_2m,
            self.prediction.describe(self.kvm())
        )?;
        if let Some(n) = self.host_migrated.filter(|&n| n > 0) {
            write!(f, " [the host migrated {n} pages meanwhile]")?;
        }
        if let Some(m) = self.guest_pages_moved.filter(|m| m.pages > 0) {
            write!(
                f,
                " [{} guest pages in {} frames moved to other host pages]",
                m.pages, m.frames
            )?;
        }
        if self.explained_by_host_moves {
            write!(f, " [short by no more than the host's moves explain]")?;
        }
        if self.retakes > 0 {
            write!(f, " [taken {} times]", self.retakes + 1)?;
        }
        Ok(())
    }
}

/// How many times a quiescent point is taken again when the host migrated
/// pages while KVM disagreed with the mirror.
const MAX_RETAKES: u32 = 3;

/// Fires events at one machine.
pub struct Injector<'a> {
    /// The machine.
    pub m: &'a Machine,
    /// The VM fd (memslots).
    pub vm: &'a VmFd,
    /// Slot 0.
    pub slot: Slots,
    /// The shared log.
    pub log: SharedLog,
    /// vCPU-side shared state (write gate).
    pub vshared: &'a StressVcpuShared,
    /// Backing.
    pub backing: Backing,
    /// Deliberate bug.
    pub bug: Option<InjectBug>,
    /// Frames of the work region.
    pub work_frames: Range<u64>,
    /// Reserved region end (gpa).
    pub reserved_end: u64,
    /// Frames that may carry orphan SPTEs of a read-only direct shadow page
    /// (`thp::kvm_mirror` `validate_direct_spte`): host-small at some moment
    /// while the guest's PDE of the frame was clean (so the guest's first
    /// access, a read, may have made a read-only direct page that its first
    /// write unlinked), and not invalidated whole (nor zapped by a memslot
    /// delete) since that PDE became dirty.
    pub clean_small: Mutex<BTreeSet<u64>>,
}

impl std::fmt::Debug for Injector<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector")
            .field("backing", &self.backing)
            .field("work_frames", &self.work_frames)
            .finish_non_exhaustive()
    }
}

/// The guest-physical frame of guest frame `f`: events name frames of the
/// stress guest's virtual space, where RAM above the 32-bit MMIO hole
/// continues RAM below it (`testguest::layout`).
fn gframe(f: u64) -> u64 {
    crate::testguest::layout::Layout::gpa_of(f * HPAGE_SIZE) / HPAGE_SIZE
}

impl Injector<'_> {
    /// Whether the guest's PDE of `frame` (the stress guest runs on the
    /// bootstrap 2M map) has its dirty bit set. Unreadable counts as clean
    /// (the conservative answer). The bit only ever goes from 0 to 1 (KVM
    /// sets it on the first write fault through it; the guest never clears
    /// it), so a set bit read at any time stays true.
    fn guest_pde_dirty(&self, frame: u64) -> bool {
        use vm_memory::{Bytes, GuestAddress};
        let gpa = crate::testguest::layout::BOOT_PD + 8 * frame;
        self.m
            .mem
            .read_obj::<u64>(GuestAddress(gpa))
            .is_ok_and(|pde| pde & PDE_DIRTY != 0)
    }

    fn candidates(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.clean_small
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// At start: every work frame the guest may first touch while it is
    /// host-small (not huge now, and not a hugetlb frame that faults in huge).
    /// The host decides, not our books: a shmem THP the kernel could not
    /// allocate (fragmented memory) is small whatever the books say.
    pub fn note_start(&self) {
        let states = self.states();
        let pmd = {
            let ram = self.m.ram();
            guest_mem::pagemap::pmd_mapped_frames(ram.host_addr(), states.len())
                .ok()
                .flatten()
        };
        let mut c = self.candidates();
        for f in self.work_frames.clone() {
            let g = gframe(f) as usize;
            let small = match states.get(g) {
                Some(FrameView::Huge { .. }) => {
                    pmd.as_ref().is_some_and(|p| p.get(g) == Some(&false))
                }
                None => false,
                Some(FrameView::Unpopulated) => self.backing != Backing::Hugetlb,
                Some(FrameView::Small { .. }) => true,
                // No backing of `vmm stress` has 1G pages.
                Some(FrameView::Gig { .. }) => false,
            };
            // Whatever the PDE says now: the guest may have touched the
            // frame already, small.
            if small {
                c.insert(f);
            }
        }
    }

    /// After a host event on `frame` (`whole`: the whole frame was
    /// invalidated), with `dirty_before` the PDE's dirty bit read before it.
    fn note_frame_event(&self, frame: u64, whole: bool, dirty_before: bool) {
        let small = !matches!(
            self.m.ram().frame_state(gframe(frame) as usize),
            FrameView::Huge { .. }
        );
        let mut c = self.candidates();
        if whole && dirty_before {
            // Orphans (if any) were made before and are zapped now; none
            // can come again.
            c.remove(&frame);
        }
        if small && !dirty_before {
            c.insert(frame);
        }
    }

    fn states(&self) -> Vec<FrameView> {
        self.m.ram().frame_states()
    }

    fn find(&self, start: u64, pred: impl Fn(&FrameView) -> bool) -> Option<u64> {
        // Frame by frame: no copy of every frame's state per event.
        let ram = self.m.ram();
        let w = &self.work_frames;
        let n = w.end - w.start;
        (0..n)
            .map(|i| w.start + (start - w.start + i) % n)
            .find(|f| {
                let g = gframe(*f) as usize;
                g < ram.frames() && pred(&ram.frame_state(g))
            })
    }

    /// Resolve a drawn event to the frame it acts on now.
    pub fn resolve(&self, d: Draw, seq: u64) -> Result<Event, InjectError> {
        let w = &self.work_frames;
        let base = w.start + d.target % (w.end - w.start);
        let huge = |s: &FrameView| matches!(s, FrameView::Huge { .. });
        let small = |s: &FrameView| matches!(s, FrameView::Small { .. });
        let frame = match d.kind {
            EventKind::Host(HostKind::Discard4k | HostKind::Discard2m) => Some(base),
            EventKind::Host(HostKind::Split) => self.find(base, huge),
            EventKind::Host(HostKind::Collapse) => self.find(base, small),
            EventKind::Host(HostKind::Pageout) if self.backing == Backing::Hugetlb => {
                self.find(base, small)
            }
            EventKind::Host(HostKind::Pageout) => Some(base),
            EventKind::Host(HostKind::Wrprotect) => {
                let v = (d.target % self.log.vcpus() as u64) as usize;
                let cursor = self.log.counters(&self.m.mem, v)?.cursor;
                let f = cursor / HPAGE_SIZE;
                Some(if w.contains(&f) { f } else { base })
            }
            EventKind::Host(HostKind::Dirtylog | HostKind::Slot)
            | EventKind::Quiesce
            | EventKind::QuiesceDirty => None,
        };
        Ok(Event {
            seq,
            kind: d.kind,
            frame,
            page: if d.kind == EventKind::Host(HostKind::Discard4k) {
                d.page
            } else {
                0
            },
        })
    }

    /// Fire `ev`.
    pub fn fire(&self, ev: &Event) -> Result<(Effect, Extra), InjectError> {
        let mut x = Extra::default();
        let Some(frame) = ev.frame else {
            let e = match ev.kind {
                EventKind::Host(HostKind::Dirtylog) => self.dirtylog(&mut x)?,
                EventKind::Host(HostKind::Slot) => self.slot_cycle(&mut x)?,
                EventKind::Quiesce | EventKind::QuiesceDirty => Effect::Done,
                _ => Effect::Noop,
            };
            return Ok((e, x));
        };
        // Never reached with a validated replay file; a guard all the same:
        // nothing below may touch host memory outside guest RAM.
        if !self.work_frames.contains(&frame) {
            return Err(InjectError::FrameOutside {
                event: ev.to_string(),
                frames: self.work_frames.clone(),
            });
        }
        let gpa = gframe(frame) * HPAGE_SIZE;
        x.slot = self.slot.slot_of(gpa);
        let dirty_before = self.guest_pde_dirty(frame);
        let e = match ev.kind {
            EventKind::Host(HostKind::Discard4k) => {
                self.discard(gpa + u64::from(ev.page) * PAGE_SIZE, PAGE_SIZE)?
            }
            EventKind::Host(HostKind::Discard2m) => self.discard(gpa, HPAGE_SIZE)?,
            EventKind::Host(HostKind::Split) => {
                refused(self.m.ram().split(gframe(frame) as usize, &self.m.control))
            }
            EventKind::Host(HostKind::Collapse) => refused(
                self.m
                    .ram()
                    .collapse(gframe(frame) as usize, &self.m.control),
            ),
            EventKind::Host(HostKind::Wrprotect) => self.wrprotect(gpa, &mut x)?,
            EventKind::Host(HostKind::Pageout) => self.pageout(gpa, &mut x)?,
            _ => Effect::Noop,
        };
        let whole = ev.kind != EventKind::Host(HostKind::Discard4k);
        self.note_frame_event(frame, whole && e == Effect::Done, dirty_before);
        Ok((e, x))
    }

    fn discard(&self, gpa: u64, len: u64) -> Result<Effect, InjectError> {
        let _paused = quiesce::pause(&self.m.control)?;
        if self.bug != Some(InjectBug::SkipLog) {
            self.log.log_discard(&self.m.mem, gpa, len)?;
        }
        if self.bug != Some(InjectBug::SkipDiscard) {
            let mut ram = self.m.ram();
            let ge = |op| guest_mem_err(op, gpa);
            ram.discard(gpa, len, &self.m.control)
                .map_err(ge("discard"))?;
            ram.refill(gpa, len, &self.m.control)
                .map_err(ge("refill"))?;
        }
        Ok(Effect::Done)
    }

    fn wrprotect(&self, gpa: u64, x: &mut Extra) -> Result<Effect, InjectError> {
        let mut ram = self.m.ram();
        let gate = &self.vshared.gate;
        gate.close(gpa..gpa + HPAGE_SIZE);
        // The RAM lock is held: nothing else touches the frame's mapping
        // until its protection is back.
        let r = ram.write_protect_frame(frame_of(gpa), || gate.wait_fault(WRPROTECT_HOLD));
        x.faults = gate.episode_faults();
        gate.open();
        r.map(|_| Effect::Done)
            .map_err(guest_mem_err("write-protect", gpa))
    }

    fn pageout(&self, gpa: u64, x: &mut Extra) -> Result<Effect, InjectError> {
        let mut ram = self.m.ram();
        let frame = frame_of(gpa);
        let ge = |op| guest_mem_err(op, gpa);
        x.resident_before = ram.resident_pages(frame).map_err(ge("mincore"))?;
        let e = match ram.page_out_frame(frame).map_err(ge("page-out"))? {
            PageOut::Done => Effect::Done,
            PageOut::Refused(why) => Effect::Refused(why),
        };
        x.resident_after = ram.resident_pages(frame).map_err(ge("mincore"))?;
        Ok(e)
    }

    fn pages_2m(&self) -> Result<u64, InjectError> {
        Ok(self.mapping()?.pages_2m)
    }

    fn mapping(&self) -> Result<KvmCounts, InjectError> {
        match &self.m.stats {
            Some(s) => Ok(s.mapping()?.counts().unwrap_or_default()),
            None => Ok(KvmCounts::default()),
        }
    }

    fn dirtylog(&self, x: &mut Extra) -> Result<Effect, InjectError> {
        x.pages_2m_before = self.pages_2m()?;
        // With dirty logging on every fault maps 4K (no prefetch): a first
        // access in a clean frame makes a read-only direct page with one
        // SPTE that the first write orphans; turning logging off zaps it
        // where the host maps huge (collapsible), not where it is small.
        let clean: Vec<u64> = self
            .work_frames
            .clone()
            .filter(|f| !self.guest_pde_dirty(*f))
            .collect();
        self.slot.set_dirty_logging(self.vm, true)?;
        let r = self.wait_pages(DIRTYLOG_PAGES).and_then(|()| {
            x.pages_2m_during = self.pages_2m()?;
            x.dirty_pages = self.slot.dirty_pages(self.vm)?;
            Ok(())
        });
        self.slot.set_dirty_logging(self.vm, false)?;
        for f in clean {
            self.note_frame_event(f, false, false);
        }
        r.map(|()| Effect::Done)
    }

    fn slot_cycle(&self, x: &mut Extra) -> Result<Effect, InjectError> {
        let Some(slot) = self.slot.next_slot() else {
            return Ok(Effect::Noop);
        };
        x.slot = Some(slot.id);
        let _paused = quiesce::pause(&self.m.control)?;
        self.slot.delete(self.vm, &slot)?;
        // kvm_mmu_zap_all_fast: everything KVM mapped is gone.
        {
            let mut ram = self.m.ram();
            ram.take_changed_frames();
            ram.take_changed_pages();
        }
        // Orphans are gone with everything else; a frame whose PDE is dirty
        // can get none again.
        self.candidates().retain(|f| !self.guest_pde_dirty(*f));
        let after = self.mapping();
        self.slot.create(self.vm, &slot)?;
        let k = after?;
        x.mapped_after_delete = k.pages_4k + k.pages_2m + k.pages_1g;
        Ok(Effect::Done)
    }

    fn wait_until(
        &self,
        done: impl Fn(&[super::shared::GuestCounters]) -> bool,
    ) -> Result<(), InjectError> {
        let t = Instant::now();
        loop {
            let c = self.log.all_counters(&self.m.mem)?;
            if done(&c) {
                return Ok(());
            }
            if self.m.outcome().is_some() {
                // The guest ended (violation or error): the caller finds out.
                return Ok(());
            }
            if t.elapsed() > PROGRESS_TIMEOUT {
                return Err(InjectError::NoProgress(PROGRESS_TIMEOUT));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    fn wait_pages(&self, n: u64) -> Result<(), InjectError> {
        let start = self.log.all_counters(&self.m.mem)?;
        self.wait_until(|c| c.iter().zip(&start).all(|(a, b)| a.pages >= b.pages + n))
    }

    /// A quiescent point: let every vCPU finish a whole pass with no event
    /// in between (so it touched every page of its slice since the last
    /// invalidation), pause, compare KVM's counters with the mirror.
    pub fn quiesce_point(&self, seq: u64, dirty: bool) -> Result<QuiescePoint, InjectError> {
        if dirty {
            self.slot.set_dirty_logging(self.vm, true)?;
        }
        let mut r = self.quiesce_compare(seq, dirty);
        let mut retakes = 0;
        // A host migration (compaction, khugepaged) of a page the guest had
        // already touched in its pass drops KVM's entry for it: not the VMM's
        // doing, nothing the mirror can know. Take the point again.
        while let Ok(q) = &r {
            let host_moved = q.host_migrated.unwrap_or(0) > 0
                || q.guest_pages_moved.is_some_and(|m| m.pages > 0);
            if q.agrees || !host_moved || retakes >= MAX_RETAKES {
                break;
            }
            log::info!("{q}: the host migrated pages meanwhile; taking the point again");
            retakes += 1;
            r = self.quiesce_compare(seq, dirty);
        }
        // Still short after the retakes (the host kept migrating): not a
        // violation when this guest's own moved pages explain the shortfall.
        let r = r.map(|q| {
            let explained = !q.agrees
                && q.guest_pages_moved
                    .is_some_and(|m| q.prediction.short_by_host_moves(q.kvm(), m.pages, m.frames));
            QuiescePoint {
                retakes,
                explained_by_host_moves: explained,
                ..q
            }
        });
        if dirty {
            self.slot.set_dirty_logging(self.vm, false)?;
        }
        r
    }

    /// Wait until every vCPU completed a whole pass that started after
    /// now: it checked every page of its slice since the last event.
    pub fn wait_whole_pass(&self) -> Result<(), InjectError> {
        let start = self.log.all_counters(&self.m.mem)?;
        self.wait_until(|c| c.iter().zip(&start).all(|(a, b)| a.passes >= b.passes + 2))
    }

    /// The host pages behind guest RAM now, when the host says.
    fn page_frames(&self) -> Option<PageFrames> {
        let (start, pages) = {
            let ram = self.m.ram();
            (
                ram.host_addr(),
                ram.frames() * guest_mem::PAGES_PER_HPAGE as usize,
            )
        };
        PageFrames::read(start, pages)
            .inspect_err(|e| log::debug!("reading the guest's host pages: {e}"))
            .ok()
            .flatten()
    }

    fn quiesce_compare(&self, seq: u64, dirty: bool) -> Result<QuiescePoint, InjectError> {
        let migrated_before = guest_mem::smaps::pages_migrated();
        let frames_before = self.page_frames();
        self.wait_whole_pass()?;
        let _paused = quiesce::pause(&self.m.control)?;
        let kvm = self.mapping()?;
        let host_migrated = migrated_before
            .zip(guest_mem::smaps::pages_migrated())
            .map(|(a, b)| b.saturating_sub(a));
        let guest_pages_moved = frames_before
            .zip(self.page_frames())
            .map(|(a, b)| a.moved_to(&b));
        let mut ram = self.m.ram();
        ram.take_changed_frames();
        ram.take_changed_pages();
        let states = ram.frame_states();
        let huge_frames = states
            .iter()
            .filter(|s| matches!(s, FrameView::Huge { .. }))
            .count() as u64;
        let host_pmd = guest_mem::pagemap::pmd_mapped_frames(ram.host_addr(), states.len())
            .map_err(|source| InjectError::GuestMem {
                op: "PAGEMAP_SCAN",
                gpa: 0,
                source,
            })?;
        let levels = mirror::frame_levels(&states, host_pmd.as_deref());
        // Frames that may hold orphan SPTEs (`validate_direct_spte`): only
        // where the host maps small now (a huge frame was invalidated whole).
        let orphan_frames = self
            .candidates()
            .iter()
            .filter(|f| levels.get(gframe(**f) as usize) == Some(&Some(thp::units::Level::K4)))
            .count() as u64;
        let books_vs_host = host_pmd.as_ref().map(|pmd| {
            states
                .iter()
                .zip(pmd)
                .enumerate()
                .filter(|(_, (s, h))| matches!(s, FrameView::Huge { .. }) != **h)
                .map(|(f, _)| f as u64)
                .collect::<Vec<u64>>()
        });
        let prediction = match self.m.mirror_context() {
            None => Prediction::unavailable("no mirror context".into()),
            Some(ctx) => mirror::predict_quiescent(ctx, &ram, levels, dirty, orphan_frames)
                .unwrap_or_else(|e| Prediction::unavailable(format!("the mirror refused: {e}"))),
        };
        let agrees = self.m.stats.is_none() || (prediction.comparable && prediction.agrees(kvm));
        Ok(QuiescePoint {
            seq,
            dirty_logging: dirty,
            kvm_pages_4k: kvm.pages_4k,
            kvm_pages_2m: kvm.pages_2m,
            kvm_pages_1g: kvm.pages_1g,
            prediction,
            agrees,
            huge_frames,
            host_pmd_frames: host_pmd.map(|v| v.iter().filter(|b| **b).count() as u64),
            books_vs_host,
            host_migrated,
            retakes: 0,
            guest_pages_moved,
            explained_by_host_moves: false,
        })
    }
}

/// The guest-physical frame holding `gpa`.
fn frame_of(gpa: u64) -> usize {
    (gpa / HPAGE_SIZE) as usize
}

/// A guest-RAM error of `op` at `gpa` as the injector's.
fn guest_mem_err(op: &'static str, gpa: u64) -> impl Fn(GuestMemError) -> InjectError {
    move |source| InjectError::GuestMem { op, gpa, source }
}

fn refused(r: Result<(), GuestMemError>) -> Effect {
    match r {
        Ok(()) => Effect::Done,
        Err(e) => Effect::Refused(e.to_string()),
    }
}
