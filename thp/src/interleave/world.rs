//! The interleaver's world: primary + secondary + actors, and how one step
//! of an actor executes.

use super::{Actor, HostOp, Scenario};
use crate::folio::FolioId;
use crate::invariants::{self, InvariantViolation};
use crate::kvm_mirror::{FaultResult, Memslot, PendingFault, SecondaryMmu};
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
}

#[derive(Debug, Clone)]
pub(crate) struct ActorState {
    pub(crate) actor: Actor,
    pub(crate) pc: u8,
    pending: Option<PendingFault>,
    held: Option<FolioId>,
    retry: bool,
    announced: Option<(u64, u64)>,
}

#[derive(Debug, Clone)]
pub(crate) struct World {
    pub(crate) primary: Primary,
    mm: MmId,
    pub(crate) mmu: SecondaryMmu,
    lock: Option<usize>,
    model_lock: bool,
    pins: Vec<FolioId>,
    pub(crate) actors: Vec<ActorState>,
    pub(crate) outcomes: Outcomes,
}

impl Actor {
    /// Number of steps this actor takes.
    pub fn steps(&self) -> u8 {
        match self {
            Actor::KvmFault { .. } => 5,
            Actor::Host(op) if op.invalidates() => 3,
            Actor::Host(_) => 1,
        }
    }
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
                held: None,
                retry: false,
                announced: None,
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
            Actor::Host(op) if op.invalidates() => match a.pc {
                0 | 2 => false,
                _ => !self.needs_nested(op, a.announced),
            },
            Actor::Host(_) => true,
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
    fn required_range(&self, op: &HostOp) -> (u64, u64) {
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
            | HostOp::Migrate { frame } => fr(frame),
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
            Actor::Host(op) if op.invalidates() => match pc {
                0 => {
                    let r = self.required_range(&op);
                    self.actors[i].announced = Some(r);
                    self.mmu.invalidate_range_start(r.0, r.1);
                }
                1 => {
                    let announced = self.actors[i].announced;
                    if self.needs_nested(&op, announced) {
                        let r = self.required_range(&op);
                        self.outcomes.nested_invalidations += 1;
                        self.mmu.invalidate_range_start(r.0, r.1);
                        self.apply_host_op(&op, false);
                        self.end_invalidation(r);
                    } else {
                        self.apply_host_op(&op, false);
                    }
                }
                _ => {
                    let r = self.actors[i].announced.unwrap_or((0, 0));
                    self.end_invalidation(r);
                }
            },
            Actor::Host(op) => self.apply_host_op(&op, false),
        }
    }

    fn end_invalidation(&mut self, r: (u64, u64)) {
        if self.mmu.invalidate_range_end(r.0, r.1).is_err() {
            log::error!("unbalanced invalidation in interleaver");
        }
    }

    fn fault_step(&mut self, i: usize, pc: u8, gfn: u64, lvl: crate::units::Level) {
        match pc {
            0 => match self.mmu.fault_begin(gfn, lvl) {
                Ok(p) => self.actors[i].pending = Some(p),
                Err(e) => log::debug!("fault_begin: {e}"),
            },
            1 => {
                let Some(mut p) = self.actors[i].pending else {
                    return;
                };
                let Ok(mm) = self.primary.mm(self.mm) else {
                    return;
                };
                self.mmu.fault_translate(&mut p, mm);
                // GUP takes a reference on the page (hva_to_pfn).
                let folio = mm
                    .page_of_hva(p.hva)
                    .and_then(|pg| mm.lookup(pg))
                    .map(|(_, _, f, _)| f);
                if let Some(f) = folio {
                    if self.primary.get_folio(f).is_ok() {
                        self.actors[i].held = Some(f);
                    }
                }
                self.actors[i].pending = Some(p);
            }
            2 => {
                if self.model_lock {
                    self.lock = Some(i);
                }
            }
            3 => {
                self.actors[i].retry = self.actors[i]
                    .pending
                    .is_none_or(|p| self.mmu.fault_must_retry(&p));
            }
            _ => {
                if let (Some(p), false) = (self.actors[i].pending, self.actors[i].retry) {
                    if let Ok(mm) = self.primary.mm(self.mm) {
                        match self.mmu.fault_install(&p, mm) {
                            Ok(FaultResult::Installed { .. })
                            | Ok(FaultResult::AlreadyMapped { .. }) => self.outcomes.installed += 1,
                            Ok(FaultResult::NoHostPage) => self.outcomes.no_host_page += 1,
                            Ok(FaultResult::Retry) => self.outcomes.retries += 1,
                            Err(e) => log::debug!("fault_install: {e}"),
                        }
                    }
                } else if self.actors[i].pending.is_some() {
                    self.outcomes.retries += 1;
                }
                if self.lock == Some(i) {
                    self.lock = None;
                }
                // kvm_release_pfn: drop the GUP reference after unlocking.
                if let Some(f) = self.actors[i].held.take() {
                    if let Err(e) = self.primary.put_folio(f) {
                        log::error!("put_folio: {e}");
                    }
                }
            }
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
