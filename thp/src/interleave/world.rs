//! The interleaver's world: primary + secondary + actors, and how one step
//! of an actor executes.

use super::event::{KvmOp, Phase};
use super::{Actor, HostOp, Scenario};
use crate::folio::FolioId;
use crate::invariants::{self, InvariantViolation};
use crate::kvm_mirror::{AccessFault, Memslot, PendingFault, SecondaryMmu};
use crate::primary::{FrameMap, MmId, Primary};
use crate::units::{PAGES_PER_HPAGE, PAGE_SIZE};

/// Host virtual address of guest page 0 in interleaver worlds (2M aligned).
pub const BASE_HVA: u64 = 0x4000_0000;

/// Counts of what happened across schedules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Faults that installed a leaf.
    pub installed: u64,
    /// Faults that retried.
    pub retries: u64,
    /// Faults that found no host page.
    pub no_host_page: u64,
    /// Host operations that failed (busy, pool empty, injected failures...).
    pub host_op_failures: u64,
    /// Nested invalidations issued by a host change (e.g. split_huge_pmd).
    pub nested_invalidations: u64,
    /// Faults that found no memslot (emulated MMIO exit, nothing installed).
    pub mmio_exits: u64,
    /// Write faults refused by GUP on a write-protected page (`-EFAULT`),
    /// or whose host fault failed.
    pub efaults: u64,
    /// Host faults taken by GUP (fault-in of an absent page, COW break).
    pub host_fault_ins: u64,
    /// Retries caused by a stale memslot generation alone.
    pub stale_slot_retries: u64,
    /// Installs (counted in `installed`) that ended with a 2M leaf.
    pub installed_2m: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct ActorState {
    pub(crate) actor: Actor,
    pub(crate) pc: u8,
    pub(super) pending: Option<PendingFault>,
    pub(super) access: Option<AccessFault>,
    pub(super) held: Option<FolioId>,
    pub(super) retry: bool,
    pub(super) announced: Option<(u64, u64)>,
    /// Re-runs left for a [`Actor::VcpuFault`] that retried.
    pub(super) retries_left: u8,
    /// Phases of a host or event actor (empty for faults).
    pub(super) phases: Vec<Phase>,
}

#[derive(Debug, Clone)]
pub(crate) struct World {
    pub(crate) primary: Primary,
    pub(super) mm: MmId,
    pub(crate) mmu: SecondaryMmu,
    pub(super) lock: Option<usize>,
    pub(super) model_lock: bool,
    pub(super) retry_check: bool,
    pub(super) generation_check: bool,
    pub(super) write_check: bool,
    /// The memslot deleted by a `slot` event, until re-created.
    pub(super) removed_slot: Option<Memslot>,
    pub(super) pins: Vec<FolioId>,
    pub(crate) actors: Vec<ActorState>,
    pub(crate) outcomes: Outcomes,
}

impl Actor {
    /// Number of steps this actor takes.
    pub fn steps(&self) -> u8 {
        match self {
            Actor::KvmFault { .. } | Actor::VcpuFault { .. } => 5,
            _ => self.phases().iter().map(Phase::steps).sum(),
        }
    }

    fn phases(&self) -> Vec<Phase> {
        match self {
            Actor::KvmFault { .. } | Actor::VcpuFault { .. } => Vec::new(),
            Actor::Host(op) if op.invalidates() => vec![Phase::Invalidate(op.clone())],
            Actor::Host(op) => vec![Phase::Plain(op.clone())],
            Actor::Event(e) => e.phases(),
        }
    }
}

/// The phase of `phases` that step `pc` belongs to, and the step inside it.
fn phase_at(phases: &[Phase], pc: u8) -> Option<(&Phase, u8)> {
    let mut at = pc;
    for p in phases {
        if at < p.steps() {
            return Some((p, at));
        }
        at -= p.steps();
    }
    None
}

impl World {
    pub(crate) fn new(s: &Scenario) -> Result<World, String> {
        let mut primary = Primary::new(s.huge_capacity, s.small_limit, s.policy);
        let mm = primary.new_mm(s.frames, BASE_HVA, true);
        let mut mmu = SecondaryMmu::new();
        mmu.add_slot(Memslot {
            id: 0,
            base_gfn: 0,
            npages: s.frames as u64 * PAGES_PER_HPAGE,
            userspace_addr: BASE_HVA,
            dirty_logging: false,
        })
        .map_err(|e| e.to_string())?;
        let mut w = World {
            primary,
            mm,
            mmu,
            lock: None,
            model_lock: s.model_mmu_lock,
            retry_check: s.model_retry_check,
            generation_check: s.model_generation_check,
            write_check: s.model_write_check,
            removed_slot: None,
            pins: Vec::new(),
            actors: Vec::new(),
            outcomes: Outcomes::default(),
        };
        for op in &s.setup {
            w.apply_host_op(op, true);
        }
        for &(gfn, lvl) in &s.prefault_secondary {
            let mm = w.primary.mm(w.mm).map_err(|e| e.to_string())?;
            w.mmu.fault(gfn, lvl, mm).map_err(|e| e.to_string())?;
        }
        w.outcomes = Outcomes::default();
        w.actors = s
            .actors
            .iter()
            .map(|a| ActorState {
                actor: a.clone(),
                pc: 0,
                pending: None,
                access: None,
                held: None,
                retry: false,
                announced: None,
                retries_left: s.fault_retries,
                phases: a.phases(),
            })
            .collect();
        Ok(w)
    }

    pub(crate) fn done(&self, i: usize) -> bool {
        let a = &self.actors[i];
        a.pc >= a.actor.steps()
    }

    pub(crate) fn all_done(&self) -> bool {
        (0..self.actors.len()).all(|i| self.done(i))
    }

    /// Whether actor `i` can take its next step now (mmu_lock).
    pub(crate) fn enabled(&self, i: usize) -> bool {
        if self.done(i) {
            return false;
        }
        if !self.model_lock || self.lock.is_none() {
            return true;
        }
        let a = &self.actors[i];
        match &a.actor {
            // Retry check and install run with the lock this fault holds.
            Actor::KvmFault { .. } => a.pc != 2,
            // GUP's own host fault may invalidate (COW break), which zaps
            // under mmu_lock.
            Actor::VcpuFault { .. } => match a.pc {
                1 => !self.gup_invalidates(i),
                2 => false,
                _ => true,
            },
            _ => match phase_at(&a.phases, a.pc) {
                Some((Phase::Invalidate(op), 1)) => !self.needs_nested(op, a.announced),
                Some((Phase::Invalidate(_), _)) | Some((Phase::Kvm(_), _)) => false,
                Some((Phase::Plain(_), _)) | None => true,
            },
        }
    }

    pub(crate) fn enabled_actors(&self) -> Vec<usize> {
        (0..self.actors.len())
            .filter(|&i| self.enabled(i))
            .collect()
    }

    fn hva(&self, page: u64) -> u64 {
        BASE_HVA + page * PAGE_SIZE
    }

    fn frame_is_pmd(&self, frame: usize) -> bool {
        self.primary
            .mm(self.mm)
            .is_ok_and(|m| frame < m.frames() && matches!(m.frame(frame), FrameMap::Pmd(_)))
    }

    fn pages(&self) -> u64 {
        self.primary.mm(self.mm).map_or(0, |m| m.pages())
    }

    /// The mmu-notifier range (hva) the host change of `op` needs now.
    pub(super) fn required_range(&self, op: &HostOp) -> (u64, u64) {
        let fr = |f: usize| (f as u64 * PAGES_PER_HPAGE, (f as u64 + 1) * PAGES_PER_HPAGE);
        let (a, b) = match *op {
            HostOp::Unmap { first, npages } => {
                let (mut a, mut b) = (first, first + npages);
                if npages > 0 && self.frame_is_pmd((a / PAGES_PER_HPAGE) as usize) {
                    a = a / PAGES_PER_HPAGE * PAGES_PER_HPAGE;
                }
                if npages > 0 && self.frame_is_pmd(((b - 1) / PAGES_PER_HPAGE) as usize) {
                    b = b.div_ceil(PAGES_PER_HPAGE) * PAGES_PER_HPAGE;
                }
                (a, b)
            }
            HostOp::WriteFault { page } => {
                let f = (page / PAGES_PER_HPAGE) as usize;
                if self.frame_is_pmd(f) {
                    fr(f)
                } else {
                    (page, page + 1)
                }
            }
            HostOp::Collapse { frame }
            | HostOp::SplitFolio { frame }
            | HostOp::Migrate { frame }
            | HostOp::Mprotect { frame, .. }
            | HostOp::Pageout { frame } => fr(frame),
            HostOp::Shrink | HostOp::Fork => (0, self.pages()),
            _ => (0, 0),
        };
        (self.hva(a), self.hva(b))
    }

    fn needs_nested(&self, op: &HostOp, announced: Option<(u64, u64)>) -> bool {
        let (a, b) = self.required_range(op);
        match announced {
            Some((x, y)) => a < b && (a < x || b > y),
            None => a < b,
        }
    }

    /// Executes the next step of actor `i`.
    pub(crate) fn step(&mut self, i: usize) {
        let pc = self.actors[i].pc;
        self.actors[i].pc += 1;
        let actor = self.actors[i].actor.clone();
        match actor {
            Actor::KvmFault {
                gfn,
                guest_max_level,
            } => self.fault_step(i, pc, gfn, guest_max_level),
            Actor::VcpuFault {
                gfn,
                guest_max_level,
                write,
            } => self.vcpu_fault_step(i, pc, gfn, guest_max_level, write),
            _ => {
                let Some((phase, sub)) = phase_at(&self.actors[i].phases, pc) else {
                    return;
                };
                match phase.clone() {
                    Phase::Invalidate(op) => self.invalidating_step(i, &op, sub),
                    Phase::Plain(op) => self.apply_host_op(&op, false),
                    Phase::Kvm(op) => self.kvm_op(op),
                }
            }
        }
    }

    /// Step `sub` of a host change inside an invalidation: start (zap),
    /// change (with a nested invalidation if the needed range grew), end.
    fn invalidating_step(&mut self, i: usize, op: &HostOp, sub: u8) {
        match sub {
            0 => {
                let r = self.required_range(op);
                self.actors[i].announced = Some(r);
                self.mmu.invalidate_range_start(r.0, r.1);
            }
            1 => {
                let announced = self.actors[i].announced;
                if self.needs_nested(op, announced) {
                    let r = self.required_range(op);
                    self.outcomes.nested_invalidations += 1;
                    self.mmu.invalidate_range_start(r.0, r.1);
                    self.apply_host_op(op, false);
                    self.end_invalidation(r);
                } else {
                    self.apply_host_op(op, false);
                }
            }
            _ => {
                let r = self.actors[i].announced.take().unwrap_or((0, 0));
                self.end_invalidation(r);
            }
        }
    }

    /// A memslot update (`KVM_SET_USER_MEMORY_REGION`) on slot 0.
    fn kvm_op(&mut self, op: KvmOp) {
        let r = match op {
            KvmOp::DirtyLog { on } => match self.primary.mm(self.mm) {
                Ok(host) => self
                    .mmu
                    .set_dirty_logging(0, on, host)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            KvmOp::DeleteSlot => match self.mmu.remove_slot(0) {
                Ok(s) => {
                    self.removed_slot = Some(s);
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            },
            KvmOp::CreateSlot => match self.removed_slot.take() {
                Some(s) => self.mmu.add_slot(s).map_err(|e| e.to_string()),
                None => Err("no deleted memslot to re-create".into()),
            },
        };
        if let Err(e) = r {
            self.outcomes.host_op_failures += 1;
            log::debug!("kvm op {op:?}: {e}");
        }
    }

    pub(super) fn end_invalidation(&mut self, r: (u64, u64)) {
        if self.mmu.invalidate_range_end(r.0, r.1).is_err() {
            log::error!("unbalanced invalidation in interleaver");
        }
    }

    /// Applies a host operation to the primary (errors count as failures).
    fn apply_host_op(&mut self, op: &HostOp, setup: bool) {
        let mm = self.mm;
        let p = &mut self.primary;
        let r: Result<(), String> = match *op {
            HostOp::Unmap { first, npages } => {
                p.unmap(mm, first, npages).map_err(|e| e.to_string())
            }
            HostOp::ReadFault { page } => p
                .fault(mm, page, false)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            HostOp::WriteFault { page } => p
                .fault(mm, page, true)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            HostOp::Collapse { frame } => {
                p.collapse(mm, frame).map(|_| ()).map_err(|e| e.to_string())
            }
            HostOp::Migrate { frame } => p
                .migrate_frame_to_small(mm, frame)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            HostOp::SplitFolio { frame } => {
                let folio = p.mm(mm).ok().and_then(|m| match m.frame(frame) {
                    FrameMap::Pmd(x) => Some(x.folio),
                    FrameMap::Table(t) => t
                        .iter()
                        .map(|(_, pte)| pte.folio)
                        .find(|f| p.folio(*f).is_ok_and(|f| f.is_large())),
                    FrameMap::None => None,
                });
                match folio {
                    Some(f) => p.split_folio(f).map(|_| ()).map_err(|e| e.to_string()),
                    None => Err("no large folio".into()),
                }
            }
            HostOp::Shrink => {
                self.primary.shrink_deferred_split();
                Ok(())
            }
            HostOp::Fork => self.primary.fork(mm).map(|_| ()).map_err(|e| e.to_string()),
            HostOp::Pin { page } => match self.primary.pin(mm, page) {
                Ok(f) => {
                    self.pins.push(f);
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            },
            HostOp::Unpin => match self.pins.pop() {
                Some(f) => self.primary.unpin(f).map_err(|e| e.to_string()),
                None => Err("nothing pinned".into()),
            },
            HostOp::InjectHugeFailures { n } => {
                self.primary.huge_pool_mut().inject_failures(n);
                Ok(())
            }
            HostOp::InjectSmallFailures { n } => {
                self.primary.small_pool_mut().inject_failures(n);
                Ok(())
            }
            HostOp::Mprotect { frame, writable } => self
                .primary
                .mprotect(mm, frame, writable)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            HostOp::Pageout { frame } => self
                .primary
                .pageout(mm, frame)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = r {
            if !setup {
                self.outcomes.host_op_failures += 1;
            }
            log::debug!("host op {op:?}: {e}");
        }
    }

    /// Invariant check: primary consistent, no stale secondary entry.
    pub(crate) fn check(&self) -> Result<(), InvariantViolation> {
        invariants::check_primary(&self.primary)?;
        let mm = self
            .primary
            .mm(self.mm)
            .map_err(|e| InvariantViolation::new(e.to_string()))?;
        invariants::check_secondary(&self.mmu, mm)
    }
}
