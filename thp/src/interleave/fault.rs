//! The fault path of the interleaver's actors: [`Actor::KvmFault`] (seq,
//! translate, lock, retry, install) and the whole vCPU fault
//! [`Actor::VcpuFault`] (memslot + generation, GUP with host fault-in / COW
//! break / `-EFAULT`, lock, retry, install with write permission).

use super::world::World;
use super::{Actor, HostOp};
use crate::kvm_mirror::{FaultResult, MirrorError, Translation};
use crate::units::{Level, PAGES_PER_HPAGE};

impl World {
    /// What GUP of fault actor `i` (at its translate step) has to do on the
    /// host: `None` nothing (mapped with the needed permission, or a write
    /// to a write-protected VMA: `-EFAULT`), `Some(invalidates)` a host fault.
    pub(super) fn gup_host_fault(&self, i: usize) -> Option<bool> {
        let a = &self.actors[i];
        let Actor::VcpuFault { write, .. } = a.actor else {
            return None;
        };
        let af = a.access.as_ref()?;
        let mm = self.primary.mm(self.mm).ok()?;
        let page = mm.page_of_hva(af.fault.hva)?;
        match mm.lookup(page) {
            None => Some(false),
            Some((.., writable)) => {
                let wp = mm.write_protected((page / PAGES_PER_HPAGE) as usize);
                (write && !writable && !wp).then_some(true)
            }
        }
    }

    pub(super) fn gup_invalidates(&self, i: usize) -> bool {
        self.gup_host_fault(i) == Some(true)
    }

    /// One step of a whole vCPU fault ([`Actor::VcpuFault`]).
    pub(super) fn vcpu_fault_step(&mut self, i: usize, pc: u8, gfn: u64, lvl: Level, write: bool) {
        match pc {
            0 => match self.mmu.access_begin(gfn, lvl, write) {
                Ok(af) => self.actors[i].access = Some(af),
                Err(e) => {
                    self.outcomes.mmio_exits += 1;
                    log::debug!("access_begin: {e}");
                }
            },
            1 => self.gup(i, write),
            2 => {
                if self.model_lock {
                    self.lock = Some(i);
                }
            }
            3 => {
                self.actors[i].retry = match &self.actors[i].access {
                    None => true,
                    Some(af) => {
                        let inval = self.retry_check && self.mmu.fault_must_retry(&af.fault);
                        let stale = self.generation_check && self.mmu.access_slot_stale(af);
                        if stale && !inval {
                            self.outcomes.stale_slot_retries += 1;
                        }
                        inval || stale
                    }
                };
            }
            _ => {
                if let (Some(af), false) = (self.actors[i].access, self.actors[i].retry) {
                    if let Ok(mm) = self.primary.mm(self.mm) {
                        let r = self.mmu.access_install(&af, mm);
                        self.count_install(r);
                    }
                } else if self.actors[i].access.is_some() {
                    self.outcomes.retries += 1;
                    if self.actors[i].retries_left > 0 {
                        // The vCPU re-enters the guest and faults again.
                        self.actors[i].retries_left -= 1;
                        self.actors[i].pc = 0;
                    }
                }
                self.actors[i].access = None;
                self.finish_fault(i);
            }
        }
    }

    /// GUP (`hva_to_pfn`) for fault actor `i`: host fault if needed (COW
    /// break inside an invalidation), `-EFAULT` for a write to a
    /// write-protected VMA, then the pfn and a reference on its folio.
    fn gup(&mut self, i: usize, write: bool) {
        let Some(mut af) = self.actors[i].access else {
            return;
        };
        let Ok(mm) = self.primary.mm(self.mm) else {
            return;
        };
        let Some(page) = mm.page_of_hva(af.fault.hva) else {
            self.actors[i].access = None;
            return;
        };
        if let Some(invalidates) = self.gup_host_fault(i) {
            self.outcomes.host_fault_ins += 1;
            let r = if invalidates {
                let op = HostOp::WriteFault { page };
                let range = self.required_range(&op);
                self.mmu.invalidate_range_start(range.0, range.1);
                let r = self.primary.fault(self.mm, page, true);
                self.end_invalidation(range);
                r
            } else {
                self.primary.fault(self.mm, page, write)
            };
            if let Err(e) = r {
                // -EFAULT (write-protected VMA) or -ENOMEM to the vCPU.
                log::debug!("GUP host fault at page {page}: {e}");
                self.outcomes.efaults += 1;
                self.actors[i].access = None;
                return;
            }
        }
        let Ok(mm) = self.primary.mm(self.mm) else {
            return;
        };
        match self.mmu.access_translate(&mut af, mm) {
            Translation::Pfn(_) | Translation::NotPresent => {}
            Translation::WriteDenied if !self.write_check => {
                // The injected bug: trust the write without the host's permission.
                af.fault.pfn = mm
                    .page_of_hva(af.fault.hva)
                    .and_then(|p| mm.lookup(p))
                    .map(|l| l.1);
                af.map_writable = true;
            }
            Translation::WriteDenied => {
                self.outcomes.efaults += 1;
                self.actors[i].access = None;
                return;
            }
        }
        if af.fault.pfn.is_some() {
            let folio = mm.lookup(page).map(|(_, _, f, _)| f);
            if let Some(f) = folio {
                if self.primary.get_folio(f).is_ok() {
                    self.actors[i].held = Some(f);
                }
            }
        }
        self.actors[i].access = Some(af);
    }

    fn count_install(&mut self, r: Result<FaultResult, MirrorError>) {
        match r {
            Ok(FaultResult::Installed { level, .. }) | Ok(FaultResult::AlreadyMapped { level }) => {
                self.outcomes.installed += 1;
                if level == Level::M2 {
                    self.outcomes.installed_2m += 1;
                }
            }
            Ok(FaultResult::NoHostPage) => self.outcomes.no_host_page += 1,
            Ok(FaultResult::Retry) => self.outcomes.retries += 1,
            Err(e) => log::debug!("fault install: {e}"),
        }
    }

    /// Unlock, then `kvm_release_pfn`: drop the GUP reference.
    fn finish_fault(&mut self, i: usize) {
        if self.lock == Some(i) {
            self.lock = None;
        }
        if let Some(f) = self.actors[i].held.take() {
            if let Err(e) = self.primary.put_folio(f) {
                log::error!("put_folio: {e}");
            }
        }
    }

    pub(super) fn fault_step(&mut self, i: usize, pc: u8, gfn: u64, lvl: Level) {
        match pc {
            0 => match self.mmu.fault_begin(gfn, lvl) {
                Ok(p) => self.actors[i].pending = Some(p),
                Err(e) => {
                    self.outcomes.mmio_exits += 1;
                    log::debug!("fault_begin: {e}");
                }
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
                    .is_none_or(|p| self.retry_check && self.mmu.fault_must_retry(&p));
            }
            _ => {
                if let (Some(p), false) = (self.actors[i].pending, self.actors[i].retry) {
                    if let Ok(mm) = self.primary.mm(self.mm) {
                        let r = self.mmu.fault_install(&p, mm);
                        self.count_install(r);
                    }
                } else if self.actors[i].pending.is_some() {
                    self.outcomes.retries += 1;
                }
                self.finish_fault(i);
            }
        }
    }
}
