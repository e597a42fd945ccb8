//! The THP mirror's prediction of what KVM maps (`thp::kvm_mirror`), and its
//! comparison with KVM's own counters.
//!
//! The mirror knows which MMU it mirrors ([`crate::mmu_params`]: TDP or
//! shadow, `nx_huge_pages`, `eager_page_split`) and, for a test guest, what
//! the guest touches ([`GuestTouches`]: its page tables, its CPL3 code, data
//! and stacks, its work pages per phase). During a test-guest run a
//! [`LiveMirror`] keeps one secondary MMU for the whole run: every host
//! change of a frame (`GuestRam::take_changed_frames`) is replayed as an
//! mmu-notifier invalidation, every phase's accesses as faults. The
//! comparison is exact: `pages_2m` always, `pages_4k` wherever the model is
//! exact, else within a bound whose mechanism is printed with it. A Linux
//! guest touches what it likes: its prediction (all RAM touched) is
//! informative, but KVM's `pages_2m` may never exceed what the host allows.

use std::ops::Range;

use serde::Serialize;
use thp::kvm_mirror::{
    self, Access, LevelMap, Memslot, MirrorError, MmuKind, MmuParams, SecondaryMmu, Touch,
    PTE_PREFETCH_NUM,
};
use thp::ram_model::host_levels;
use thp::units::Level;

use guest_mem::RamSlot;

use crate::testguest::touch::GuestTouches;
use crate::testguest::GuestPageSize;

const PAGE: u64 = 4096;
const HPAGE: u64 = 2 << 20;

/// What the mirror predicts for KVM's counters, and how to compare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Prediction {
    /// Predicted 4K mappings (the lower end when [`Self::pages_4k_max`] is larger).
    pub pages_4k: u64,
    /// Predicted 2M mappings (always exact for a comparable prediction).
    pub pages_2m: u64,
    /// Predicted 1G mappings (always exact for a comparable prediction).
    pub pages_1g: u64,
    /// Upper end of KVM's `pages_4k`; equal to `pages_4k` when exact.
    pub pages_4k_max: u64,
    /// Why `pages_4k` is a range, when it is.
    pub pages_4k_bound: Option<String>,
    /// Most 2M mappings the host allows now (frames mapped by one PMD
    /// on the host whose `lpage_info` allows 2M).
    pub max_pages_2m: u64,
    /// Whether KVM must match (test guests at a checkpoint where every
    /// vCPU's accesses are known) or the numbers are informative (Linux,
    /// `vmm ctl stats` in the middle of a phase).
    pub comparable: bool,
    /// The MMU mirrored, e.g. "shadow MMU (rules of Linux 6.18, host kernel 6.18.44; nx_huge_pages=N, eager_page_split=Y)".
    pub mmu: String,
    /// The predicted mappings per memslot (KVM counts per VM only).
    pub per_slot: Vec<SlotMappings>,
}

/// The mirror's mappings in one memslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlotMappings {
    /// Slot id.
    pub id: u32,
    /// 4K leaves whose gfn is in the slot.
    pub pages_4k: u64,
    /// 2M leaves whose gfn is in the slot.
    pub pages_2m: u64,
    /// 1G leaves whose gfn is in the slot.
    pub pages_1g: u64,
}

/// The mirror's leaves counted per memslot.
pub fn per_slot(mmu: &SecondaryMmu) -> Vec<SlotMappings> {
    let mut v: Vec<SlotMappings> = mmu
        .slots()
        .map(|s| SlotMappings {
            id: s.id,
            pages_4k: 0,
            pages_2m: 0,
            pages_1g: 0,
        })
        .collect();
    let ids: Vec<(u64, u64)> = mmu.slots().map(|s| (s.base_gfn, s.end_gfn())).collect();
    for (gfn, level, _) in mmu.entries() {
        // Slots are sorted by base gfn.
        let i = ids.partition_point(|(b, _)| *b <= gfn);
        let Some(i) = i.checked_sub(1).filter(|i| gfn < ids[*i].1) else {
            continue;
        };
        match level {
            Level::K4 => v[i].pages_4k += 1,
            Level::M2 => v[i].pages_2m += 1,
            Level::G1 => v[i].pages_1g += 1,
        }
    }
    v
}

/// The outcome of comparing KVM's counters with a [`Prediction`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// KVM agrees.
    Match,
    /// KVM disagrees (a failure): what differs.
    Mismatch(String),
    /// Not compared exactly; `Some` when a check that holds for any guest
    /// failed.
    Informative(Option<String>),
}

impl Prediction {
    /// No prediction, for `why`: nothing predicted, not comparable.
    pub fn unavailable(why: String) -> Prediction {
        Prediction {
            pages_4k: 0,
            pages_2m: 0,
            pages_1g: 0,
            pages_4k_max: 0,
            pages_4k_bound: Some(why),
            max_pages_2m: 0,
            comparable: false,
            mmu: String::new(),
            per_slot: Vec::new(),
        }
    }

    /// Compare KVM's counters with the prediction.
    pub fn verdict(&self, kvm: KvmCounts) -> Verdict {
        let KvmCounts {
            pages_4k,
            pages_2m,
            pages_1g,
        } = kvm;
        if !self.comparable {
            return Verdict::Informative((pages_2m > self.max_pages_2m).then(|| {
                format!(
                    "KVM maps {pages_2m} 2M pages but the host allows at most {} (a 2M mapping over \
                     a split frame)",
                    self.max_pages_2m
                )
            }));
        }
        let mut bad = Vec::new();
        if pages_1g != self.pages_1g {
            bad.push(format!("pages_1g {pages_1g} != {}", self.pages_1g));
        }
        if pages_2m != self.pages_2m {
            bad.push(format!("pages_2m {pages_2m} != {}", self.pages_2m));
        }
        if pages_4k < self.pages_4k || pages_4k > self.pages_4k_max {
            if self.pages_4k_max == self.pages_4k {
                bad.push(format!("pages_4k {pages_4k} != {}", self.pages_4k));
            } else {
                bad.push(format!(
                    "pages_4k {pages_4k} outside [{}, {}]",
                    self.pages_4k, self.pages_4k_max
                ));
            }
        }
        if bad.is_empty() {
            Verdict::Match
        } else {
            Verdict::Mismatch(bad.join(", "))
        }
    }

    /// Whether KVM's counters pass ([`Verdict::Match`], or informative with
    /// no violated check).
    pub fn agrees(&self, kvm: KvmCounts) -> bool {
        matches!(
            self.verdict(kvm),
            Verdict::Match | Verdict::Informative(None)
        )
    }

    /// Whether KVM's counters fall short of this prediction by no more than
    /// host-made invalidations explain: the host kernel moved `pages` guest
    /// pages (in `frames` 2M frames) after the guest may have last touched
    /// them (migration: an mmu-notifier invalidation no VMM operation
    /// caused, see `guest_mem::page_moves`). Each move takes at most one
    /// KVM mapping away (a 4K one, or its frame's 2M one) and adds none; the
    /// 1G count and every excess stay violations.
    pub fn short_by_host_moves(&self, kvm: KvmCounts, pages: u64, frames: u64) -> bool {
        self.comparable
            && kvm.pages_1g == self.pages_1g
            && kvm.pages_2m <= self.pages_2m
            && self.pages_2m - kvm.pages_2m <= frames
            && kvm.pages_4k <= self.pages_4k_max
            && self.pages_4k.saturating_sub(kvm.pages_4k) <= pages
    }

    /// One line for the report: the verdict and, for a range, its reason.
    pub fn describe(&self, kvm: KvmCounts) -> String {
        let v = match self.verdict(kvm) {
            Verdict::Match if self.pages_4k_max == self.pages_4k => "match (exact)".to_string(),
            Verdict::Match => "match (pages_2m exact, pages_4k within the bound)".to_string(),
            Verdict::Mismatch(why) => format!("MISMATCH: {why}"),
            Verdict::Informative(None) => {
                "informative (the guest decides what it touches); KVM's pages_2m is within what the \
                 host allows"
                    .to_string()
            }
            Verdict::Informative(Some(why)) => format!("VIOLATION: {why}"),
        };
        match &self.pages_4k_bound {
            Some(b) => format!(
                "{v}; {}; pages_4k in [{}, {}]: {b}",
                self.mmu, self.pages_4k, self.pages_4k_max
            ),
            None => format!("{v}; {}", self.mmu),
        }
    }
}

/// KVM's mapping counters, to compare with a [`Prediction`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmCounts {
    /// `pages_4k`.
    pub pages_4k: u64,
    /// `pages_2m`.
    pub pages_2m: u64,
    /// `pages_1g`.
    pub pages_1g: u64,
}

/// What the mirror needs of a run besides guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorContext {
    /// The MMU mirrored.
    pub mmu: MmuParams,
    /// What the test guest touches (`None`: a Linux guest).
    pub guest: Option<GuestTouches>,
}

impl MirrorContext {
    /// The MMU and its parameters, for reports.
    pub fn mmu_name(&self) -> String {
        let p = &self.mmu;
        format!(
            "{} (rules of {}, host kernel {}; nx_huge_pages={}, eager_page_split={})",
            match p.kind {
                MmuKind::Tdp => "TDP MMU",
                MmuKind::Shadow => "shadow MMU",
            },
            kvm_mirror::KERNEL,
            crate::host::kernel_release(),
            if p.nx_huge_pages { "Y" } else { "N" },
            if p.eager_page_split { "Y" } else { "N" },
        )
    }

    /// The fault's own level cap for a work access to `gfn`: on the shadow
    /// MMU the guest's page size there, on the TDP MMU none.
    fn work_level(&self, g: &GuestTouches, gfn: u64) -> Level {
        match (self.mmu.kind, g.guest_pages) {
            (MmuKind::Shadow, GuestPageSize::Size4K) => Level::K4,
            (MmuKind::Shadow, GuestPageSize::Size2M) => Level::M2,
            (MmuKind::Shadow, GuestPageSize::Size1G) => boot_level(g, gfn),
            (MmuKind::Tdp, _) => Level::G1,
        }
    }
}

/// The guest's page size at `gfn` in its bootstrap tables (the shadow MMU's
/// cap for CPL3 accesses before the switch to 4K tables, and for all of
/// them with `guest_pages = 2m` or `1g`): [`Level::G1`] in a whole GiB of
/// RAM with `guest_pages = 1g`, else [`Level::M2`]. (Where KVM itself maps
/// 2M at most, a 1G cap maps as 2M: `kvm_mmu_max_mapping_level`.)
fn boot_level(g: &GuestTouches, gfn: u64) -> Level {
    if g.gig_page_at(gfn * PAGE) {
        Level::G1
    } else {
        Level::M2
    }
}

fn pages(r: &Range<u64>) -> impl Iterator<Item = u64> {
    r.start / PAGE..r.end.div_ceil(PAGE)
}

fn touch(gfn: u64, guest_max_level: Level, access: Access) -> Touch {
    Touch {
        gfn,
        guest_max_level,
        access,
    }
}

const READ: Access = Access::READ;
const WRITE: Access = Access::WRITE;
const EXEC: Access = Access::EXEC;

/// What the guest touched in one phase, as far as the mirror replays it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseTouches {
    /// Every work page (of `vcpu`).
    pub work: bool,
    /// Its user stack pages.
    pub stack: bool,
    /// Only this vCPU's work (`None`: all).
    pub vcpu: Option<usize>,
    /// Whether KVM's counters can be compared with the prediction now.
    pub comparable: bool,
    /// The checkpoint's phase (`None`: the end of the run, a snapshot).
    pub checkpoint: Option<u64>,
}

impl PhaseTouches {
    /// Everything: work of every vCPU, stacks; comparable.
    pub const ALL: PhaseTouches = PhaseTouches {
        work: true,
        stack: true,
        vcpu: None,
        comparable: true,
        checkpoint: None,
    };
}

/// The reserved-region accesses of a test guest, in order.
struct Reserved {
    /// Faults before the guest's own tables are in use (shadow MMU: through
    /// the bootstrap map).
    before_switch: Vec<Touch>,
    /// Shadow MMU, `guest_pages = 4k`: vCPU 0's writes of its 4K tables
    /// through the bootstrap map, before they are page tables (shadowed
    /// after these writes, see [`LiveMirror::observe`]).
    built: Vec<Touch>,
    /// Faults after the switch to the guest's own tables.
    after_switch: Vec<Touch>,
    /// 4K SPTEs KVM has beyond one per gfn, known exactly.
    extra_exact: u64,
    /// And up to this many more, with why.
    slack: Option<(u64, String)>,
}

/// The reserved-region accesses of `g` up to checkpoint `phase` (`None`:
/// the end or a quiescent point); `stack` whether it touched its stacks.
fn reserved_touches(
    ctx: &MirrorContext,
    g: &GuestTouches,
    stack: bool,
    phase: Option<u64>,
) -> Reserved {
    let stacks = g.stacks.iter().filter(|_| stack);
    let mut t = Vec::new();
    let mut after = Vec::new();
    match ctx.mmu.kind {
        MmuKind::Tdp => {
            // CPL0 runs natively and the CPU walks tables and descriptor
            // tables through the TDP tables: the code first (an exec fault),
            // then every reserved frame.
            t.extend(pages(&g.code).map(|p| touch(p, Level::G1, EXEC)));
            for p in pages(&g.reserved).step_by(512) {
                t.push(touch(p, Level::G1, WRITE));
            }
            for r in &g.swept {
                after.extend(pages(r).map(|p| touch(p, Level::G1, READ)));
            }
            let slack = ctx.mmu.nx_huge_pages.then(|| {
                let frames = g.code.end.div_ceil(HPAGE) - g.code.start / HPAGE;
                (
                    frames * 512,
                    "nx_huge_pages: the frames holding code map 4K and which of their pages the CPU \
                     touches (tables, descriptor tables) is not modelled"
                        .to_string(),
                )
            });
            Reserved {
                before_switch: t,
                built: Vec::new(),
                after_switch: after,
                extra_exact: 0,
                slack,
            }
        }
        MmuKind::Shadow => {
            // CPL3 only (CPL0 is emulated); through the bootstrap map (2M
            // pages, 1G ones in whole GiBs with `guest_pages = 1g`).
            let at = |p: u64, access| touch(p, boot_level(g, p), access);
            t.extend(g.user_code.iter().flat_map(pages).map(|p| at(p, EXEC)));
            for r in g.data.iter().chain(stacks) {
                t.extend(pages(r).map(|p| at(p, WRITE)));
            }
            let built = g
                .built_tables
                .iter()
                .flat_map(pages)
                .map(|p| at(p, WRITE))
                .collect();
            // The sweep runs after the switch to the final tables: one SPTE
            // per page it alone reaches (so not in `extra_exact`).
            for r in &g.swept {
                after.extend(pages(r).map(|p| at(p, READ)));
            }
            let extra_exact = match g.guest_pages {
                GuestPageSize::Size2M | GuestPageSize::Size1G => 0,
                // After the switch to the 4K tables, the code CPL3 runs, data
                // and stacks are mapped again through indirect shadow pages
                // (no prefetch while the guest's PTEs have no accessed bit):
                // one more SPTE for each of their pages (the mirror keys
                // leaves by gfn). The IDT and TSS pages only once prefetched
                // (`GuestTouches::descriptor_tables_remapped_before`).
                GuestPageSize::Size4K => {
                    let descriptors = g.descriptor_tables_remapped_before(phase);
                    let mut second: Vec<u64> = g
                        .user_code
                        .iter()
                        .chain(g.data.iter().chain(&g.stacks))
                        .flat_map(pages)
                        .filter(|p| descriptors || !g.descriptor_tables.contains(&(p * PAGE)))
                        .collect();
                    second.sort_unstable();
                    second.dedup();
                    second.len() as u64
                }
            };
            Reserved {
                before_switch: t,
                built,
                after_switch: after,
                extra_exact,
                slack: None,
            }
        }
    }
}

/// Which of a test guest's page tables [`shadowed`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tables {
    /// Every one.
    All,
    /// Only the 4K tables the guest builds itself (`guest_pages = 4k`).
    Built,
    /// The others (shadowed from the start; the built ones only once the
    /// guest has written them, [`LiveMirror::observe`]).
    NotBuilt,
}

/// The shadowed guest page-table gfns `which` (empty on the TDP MMU).
fn shadowed(ctx: &MirrorContext, g: &GuestTouches, mmu: &SecondaryMmu, which: Tables) -> Vec<u64> {
    if !ctx.mmu.shadow_paging() {
        return Vec::new();
    }
    let is_built = |p: &u64| {
        g.built_tables
            .as_ref()
            .is_some_and(|r| r.contains(&(p * PAGE)))
    };
    let mut v: Vec<u64> = g
        .page_tables
        .iter()
        .flat_map(pages)
        .filter(|p| {
            mmu.slot_for_gfn(*p).is_some()
                && match which {
                    Tables::All => true,
                    Tables::Built => is_built(p),
                    Tables::NotBuilt => !is_built(p),
                }
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The mirror's memslot of a guest RAM memslot.
pub fn memslot(s: &RamSlot, dirty_logging: bool) -> Memslot {
    Memslot {
        id: s.id,
        base_gfn: s.gpa / PAGE,
        npages: s.size / PAGE,
        userspace_addr: s.host_addr,
        dirty_logging,
    }
}

/// A secondary MMU with guest RAM's memslots, logging off.
fn with_slots(ctx: &MirrorContext, slots: &[RamSlot]) -> Result<SecondaryMmu, MirrorError> {
    let mut mmu = SecondaryMmu::with_params(ctx.mmu);
    for s in slots {
        mmu.add_slot(memslot(s, false))?;
    }
    Ok(mmu)
}

/// Frames the host maps with one PMD whose `lpage_info` allows 2M.
fn max_2m(mmu: &SecondaryMmu, levels: &[Option<Level>]) -> u64 {
    levels
        .iter()
        .enumerate()
        .filter(|(f, l)| **l == Some(Level::M2) && mmu.lpage_allowed(*f as u64 * 512))
        .count() as u64
}

/// One secondary MMU for a whole test-guest run.
#[derive(Debug, Clone)]
pub struct LiveMirror {
    mmu: SecondaryMmu,
    host_addr: u64,
    /// Shadow MMU, `guest_pages = 4k`: the guest's own tables are still to
    /// be written (the first [`Self::observe`] replays that, then shadows
    /// them).
    built_pending: bool,
}

impl LiveMirror {
    /// Guest RAM's memslots `slots` (host range at `host_addr`, gpa `g` at
    /// `host_addr + g`); on the shadow MMU the guest's page tables are
    /// shadowed (write-tracked) from the start, but for the 4K tables the
    /// guest writes itself (`guest_pages = 4k`): those after its writes.
    pub fn new(
        ctx: &MirrorContext,
        host_addr: u64,
        slots: &[RamSlot],
    ) -> Result<LiveMirror, MirrorError> {
        let mut mmu = with_slots(ctx, slots)?;
        let mut built_pending = false;
        if let Some(g) = &ctx.guest {
            for gfn in shadowed(ctx, g, &mmu, Tables::NotBuilt) {
                mmu.account_shadowed(gfn)?;
            }
            built_pending = ctx.mmu.shadow_paging() && g.built_tables.is_some();
        }
        Ok(LiveMirror {
            mmu,
            host_addr,
            built_pending,
        })
    }

    /// Replay the host changes of `changed` frames as invalidations.
    pub fn invalidate_frames(&mut self, changed: &[usize]) -> Result<(), MirrorError> {
        for f in changed {
            // A frame outside every memslot (the MMIO hole) hits none:
            // KVM counts nothing and the mirror does the same.
            let a = self.host_addr + *f as u64 * HPAGE;
            self.mmu.invalidate_range_start(a, a + HPAGE);
            self.mmu.invalidate_range_end(a, a + HPAGE)?;
        }
        Ok(())
    }

    /// Replay host changes of single 4K pages `(frame, pages)` as
    /// invalidations of exactly those pages.
    pub fn invalidate_pages(&mut self, changed: &[(usize, Vec<u16>)]) -> Result<(), MirrorError> {
        for (f, pages) in changed {
            for p in pages {
                let a = self.host_addr + *f as u64 * HPAGE + u64::from(*p) * PAGE;
                self.mmu.invalidate_range_start(a, a + PAGE);
                self.mmu.invalidate_range_end(a, a + PAGE)?;
            }
        }
        Ok(())
    }

    /// The guest's accesses of one phase: its reserved-region accesses (its
    /// stack pages if `phase.stack`), and (if `phase.work`) every work page of
    /// `phase.vcpu` (all vCPUs when `None`), over the host as `states` says
    /// now; then the prediction.
    pub fn observe(
        &mut self,
        ctx: &MirrorContext,
        states: &[guest_mem::FrameView],
        phase: PhaseTouches,
    ) -> Result<Prediction, MirrorError> {
        let PhaseTouches {
            work,
            stack,
            vcpu,
            comparable,
            checkpoint,
        } = phase;
        let levels = host_levels(states);
        let host = LevelMap::new(self.host_addr, levels.clone());
        let mut extra = 0;
        let mut slack = (0, None);
        if let Some(g) = &ctx.guest {
            let r = reserved_touches(ctx, g, stack, checkpoint);
            extra = r.extra_exact;
            if let Some((n, why)) = r.slack {
                slack = (n, Some(why));
            }
            let work_pages = g
                .work
                .iter()
                .enumerate()
                .filter(|(i, _)| work && vcpu.is_none_or(|v| v == *i))
                .flat_map(|(_, rs)| rs.iter().flat_map(pages))
                .map(|p| touch(p, ctx.work_level(g, p), WRITE));
            // vCPU 0 writes its 4K tables once, through the bootstrap 2M
            // map, before they are page tables: a frame holding only such
            // tables gets a 2M SPTE; shadowing them then write-protects it
            // and keeps it (`account_shadowed`), and nothing writes there
            // again. Later phases do not write them.
            let built = if std::mem::take(&mut self.built_pending) {
                r.built
            } else {
                Vec::new()
            };
            let shadow_built = !built.is_empty();
            let before = r.before_switch.into_iter().chain(built);
            for x in before {
                if self.mmu.slot_for_gfn(x.gfn).is_some() {
                    self.mmu
                        .fault_access(x.gfn, x.guest_max_level, x.access, &host)?;
                }
            }
            if shadow_built {
                for gfn in shadowed(ctx, g, &self.mmu, Tables::Built) {
                    self.mmu.account_shadowed(gfn)?;
                }
            }
            for x in r.after_switch.into_iter().chain(work_pages) {
                if self.mmu.slot_for_gfn(x.gfn).is_some() {
                    self.mmu
                        .fault_access(x.gfn, x.guest_max_level, x.access, &host)?;
                }
            }
        }
        Ok(Prediction {
            pages_4k: self.mmu.pages_4k() + extra,
            pages_2m: self.mmu.pages_2m(),
            pages_1g: self.mmu.pages_1g(),
            pages_4k_max: self.mmu.pages_4k() + extra + slack.0,
            pages_4k_bound: slack.1,
            max_pages_2m: max_2m(&self.mmu, &levels),
            comparable,
            mmu: ctx.mmu_name(),
            per_slot: per_slot(&self.mmu),
        })
    }
}

/// The host level of every frame of `states` (guest RAM's books): a PMD
/// where the host's page tables say so (`pmd`, per frame, from
/// `guest_mem::pagemap`), else 4K where the books say the frame is
/// populated; without `pmd`, the books alone.
pub fn frame_levels(states: &[guest_mem::FrameView], pmd: Option<&[bool]>) -> Vec<Option<Level>> {
    let mut levels = host_levels(states);
    if let Some(pmd) = pmd {
        for (l, huge) in levels.iter_mut().zip(pmd) {
            *l = match (*huge, *l) {
                (true, _) => Some(Level::M2),
                (false, Some(_)) => Some(Level::K4),
                (false, None) => None,
            };
        }
    }
    levels
}

/// The prediction at a quiescent point of guest RAM `ram` with the frames
/// at `levels` ([`frame_levels`]): every page the guest touches touched
/// (`vmm stress`), or all RAM (a Linux guest's look); `orphan_frames` widen
/// `pages_4k` on a shadow MMU ([`shadow_orphan_slack`]). The one path for
/// `vmm stress` and `Machine::predict` without a test guest.
pub fn predict_quiescent(
    ctx: &MirrorContext,
    ram: &guest_mem::GuestRam,
    levels: Vec<Option<Level>>,
    dirty: bool,
    orphan_frames: u64,
) -> Result<Prediction, MirrorError> {
    let extra = shadow_orphan_slack(ctx, orphan_frames);
    predict_all_touched(ctx, ram.host_addr(), ram.memslots(), levels, dirty, extra)
}

/// A fresh prediction with every page the guest touches touched now (and,
/// with `dirty`, dirty logging turned on in between and everything touched
/// again): `vmm stress` quiescent points, where every vCPU made full passes
/// over its slice after the last event. `extra_4k` widens `pages_4k` with
/// its reason. A Linux guest (no [`GuestTouches`]) gets all RAM touched,
/// informative.
pub fn predict_all_touched(
    ctx: &MirrorContext,
    host_addr: u64,
    slots: &[RamSlot],
    levels: Vec<Option<Level>>,
    dirty: bool,
    extra_4k: Option<(u64, String)>,
) -> Result<Prediction, MirrorError> {
    let host = LevelMap::new(host_addr, levels.clone());
    let mut mmu = with_slots(ctx, slots)?;
    let Some(g) = &ctx.guest else {
        for s in slots {
            for gfn in pages(&s.range()) {
                mmu.fault_access(gfn, Level::G1, WRITE, &host)?;
            }
        }
        return Ok(Prediction {
            pages_4k: mmu.pages_4k(),
            pages_2m: mmu.pages_2m(),
            pages_1g: mmu.pages_1g(),
            pages_4k_max: mmu.pages_4k(),
            pages_4k_bound: None,
            max_pages_2m: max_2m(&mmu, &levels),
            comparable: false,
            mmu: ctx.mmu_name(),
            per_slot: per_slot(&mmu),
        });
    };
    for gfn in shadowed(ctx, g, &mmu, Tables::All) {
        mmu.account_shadowed(gfn)?;
    }
    let r = reserved_touches(ctx, g, true, None);
    let all: Vec<Touch> = r
        .before_switch
        .iter()
        .chain(&r.built)
        .chain(&r.after_switch)
        .copied()
        .chain(
            g.work
                .iter()
                .flatten()
                .flat_map(pages)
                .map(|p| touch(p, ctx.work_level(g, p), WRITE)),
        )
        .filter(|x| mmu.slot_for_gfn(x.gfn).is_some())
        .collect();
    for x in &all {
        mmu.fault_access(x.gfn, x.guest_max_level, x.access, &host)?;
    }
    if dirty {
        for s in slots {
            mmu.set_dirty_logging(s.id, true, &host)?;
        }
        for x in &all {
            mmu.fault_access(x.gfn, x.guest_max_level, x.access, &host)?;
        }
    }
    let model = mmu.pages_4k() + r.extra_exact;
    let (mut below, mut above) = (0, r.slack.as_ref().map_or(0, |s| s.0));
    let mut why: Vec<String> = r.slack.map(|s| s.1).into_iter().collect();
    if ctx.mmu.shadow_paging() {
        // The reserved region's 4K SPTEs: start-up code touched more of it
        // than the steady state does, and prefetch fills groups of 8 around
        // whatever faults first. After a memslot delete
        // (`kvm_mmu_zap_all_fast`) or a dirty-log toggle only what the steady
        // state touches comes back, with or without its prefetch groups.
        // Pages the guest sweeps every pass are all back by then.
        let swept = |gfn: u64| g.swept.iter().any(|r| r.contains(&(gfn * PAGE)));
        below = mmu
            .entries()
            .filter(|(gfn, l, _)| *l == Level::K4 && gfn * PAGE < g.reserved.end && !swept(*gfn))
            .count() as u64
            + r.extra_exact;
        if below > 0 {
            why.push(format!(
                "shadow MMU: the reserved region's {below} 4K SPTEs (the guest's start-up accesses \
                 and their direct_pte_prefetch groups of 8) come back only as far as the guest's \
                 steady state touches them after a memslot delete or a dirty-log toggle"
            ));
        }
    }
    if let Some((n, w)) = extra_4k {
        above += n;
        why.push(w);
    }
    Ok(Prediction {
        pages_4k: model - below,
        pages_2m: mmu.pages_2m(),
        pages_1g: mmu.pages_1g(),
        pages_4k_max: model + above,
        pages_4k_bound: (!why.is_empty()).then(|| why.join("; ")),
        max_pages_2m: max_2m(&mmu, &levels),
        comparable: true,
        mmu: ctx.mmu_name(),
        per_slot: per_slot(&mmu),
    })
}

/// The bound `vmm stress` puts on the shadow MMU's `pages_4k` beyond the
/// gfn-keyed model, with why: up to `PTE_PREFETCH_NUM` (8) orphan SPTEs per
/// frame the host maps small now that was host-small at some moment while
/// the guest's PDE of it was clean and was not invalidated whole since that
/// PDE became dirty (`orphan_frames`, kept by the stress injector from the
/// PDEs' dirty bits).
///
/// The mechanism (`thp::kvm_mirror`, `validate_direct_spte`, traced on this
/// project's shadow host): the guest's first access to a clean 2M page is a
/// read; where the host maps small it makes a read-only direct shadow page
/// (`FNAME(protect_clean_gpte)`) holding the faulting gfn's prefetch group
/// of 8; the first write asks for a writable role and `drop_parent_pte`
/// unlinks the read-only page without zapping its SPTEs. Whether the first
/// read came while the frame was small or huge is decided by the guest's
/// timing against the host event, which the VMM sees only through the
/// dirty bit (set by the write, not the read): hence a bound, not a count.
pub fn shadow_orphan_slack(ctx: &MirrorContext, orphan_frames: u64) -> Option<(u64, String)> {
    (ctx.mmu.shadow_paging() && orphan_frames > 0).then(|| {
        (
            PTE_PREFETCH_NUM * orphan_frames,
            format!(
                "shadow MMU: validate_direct_spte: a guest 2M page first read while the host \
                 mapped it small and its PDE was clean got a read-only direct shadow page whose \
                 prefetch group of up to PTE_PREFETCH_NUM (8) SPTEs the first write unlinked \
                 without zapping (orphans, until the frame is invalidated); {orphan_frames} \
                 frames may hold them (small while clean, small now, not invalidated whole since \
                 their PDE became dirty)"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KVM's counters with no 1G mapping.
    fn kvm(pages_4k: u64, pages_2m: u64) -> KvmCounts {
        KvmCounts {
            pages_4k,
            pages_2m,
            pages_1g: 0,
        }
    }
    use crate::testguest::{build, TestGuestName, TestGuestParams};

    const BASE: u64 = 0x7f00_0000_0000;

    #[test]
    fn host_moves_explain_only_a_shortfall_they_can_cause() {
        let mut p = Prediction::unavailable(String::new());
        p.comparable = true;
        (p.pages_4k, p.pages_4k_max, p.pages_2m) = (60416, 60416, 10);
        // The thp soak's point: 13 4K mappings short, 40 pages moved.
        assert!(p.short_by_host_moves(kvm(60403, 10), 40, 3));
        assert!(
            !p.short_by_host_moves(kvm(60403, 10), 12, 3),
            "more short than moved"
        );
        assert!(
            !p.short_by_host_moves(kvm(60417, 10), 40, 3),
            "an excess is never explained"
        );
        assert!(
            !p.short_by_host_moves(kvm(60416, 11), 40, 3),
            "nor an extra 2M"
        );
        assert!(
            p.short_by_host_moves(kvm(60416, 8), 2, 2),
            "two frames moved, two 2M gone"
        );
        assert!(!p.short_by_host_moves(kvm(60416, 8), 2, 1));
        assert!(!p.short_by_host_moves(
            KvmCounts {
                pages_1g: 1,
                ..kvm(60416, 10)
            },
            9,
            9
        ));
        p.comparable = false;
        assert!(!p.short_by_host_moves(kvm(60403, 10), 40, 3));
    }

    fn ram_slots(base: u64, size: u64) -> Vec<RamSlot> {
        guest_mem::RamLayout::new(size)
            .unwrap()
            .memslots(base, None)
            .unwrap()
    }

    fn ctx(mmu: MmuParams, name: TestGuestName, mib: u64, pages: GuestPageSize) -> MirrorContext {
        let mut p = TestGuestParams::new(name, mib << 20);
        p.guest_pages = pages;
        let img = build(&p).unwrap();
        MirrorContext {
            mmu,
            guest: Some(GuestTouches::of(&img)),
        }
    }

    fn huge(frames: usize) -> Vec<guest_mem::FrameView> {
        vec![guest_mem::FrameView::Huge { slot: 0 }; frames]
    }

    /// The measured `hello` on this project's shadow-paging host:
    /// KVM pages_2m 127, pages_4k 16 (256 MiB hugetlb, 2M guest pages).
    #[test]
    fn hello_on_shadow_is_127_2m_and_16_4k_and_on_tdp_128_2m() {
        let c = ctx(
            MmuParams::shadow(),
            TestGuestName::Hello,
            256,
            GuestPageSize::Size2M,
        );
        let mut l = LiveMirror::new(&c, BASE, &ram_slots(BASE, 256 << 20)).unwrap();
        let p = l.observe(&c, &huge(128), PhaseTouches::ALL).unwrap();
        assert_eq!((p.pages_4k, p.pages_2m, p.pages_4k_max), (16, 127, 16));
        assert_eq!(p.verdict(kvm(16, 127)), Verdict::Match);
        assert!(matches!(p.verdict(kvm(16, 128)), Verdict::Mismatch(_)));
        let c = ctx(
            MmuParams::tdp(),
            TestGuestName::Hello,
            256,
            GuestPageSize::Size2M,
        );
        let mut l = LiveMirror::new(&c, BASE, &ram_slots(BASE, 256 << 20)).unwrap();
        let p = l.observe(&c, &huge(128), PhaseTouches::ALL).unwrap();
        assert_eq!((p.pages_4k, p.pages_2m), (0, 128));
    }

    /// 1G guest pages on the shadow MMU: the fault's cap is 1G in whole
    /// GiBs and 2M in a partial one; over a host that maps 2M at most KVM
    /// maps as with 2M guest pages (`kvm_mmu_max_mapping_level`), GiB 0's
    /// page tables keeping frame 0 at 4K.
    #[test]
    fn one_gig_guest_pages_on_shadow_over_2m_host_frames_map_as_2m() {
        let c = ctx(
            MmuParams::shadow(),
            TestGuestName::Hello,
            1536,
            GuestPageSize::Size1G,
        );
        let g = c.guest.as_ref().unwrap();
        assert_eq!(g.gig_pages, vec![0..1 << 30]);
        assert_eq!(c.work_level(g, 0x200), Level::G1);
        assert_eq!(c.work_level(g, (1 << 30) / PAGE), Level::M2);
        let tdp = MirrorContext {
            mmu: MmuParams::tdp(),
            ..c.clone()
        };
        assert_eq!(tdp.work_level(g, (1 << 30) / PAGE), Level::G1);
        for mib in [1536, 2048] {
            let predict = |pages| {
                let c = ctx(MmuParams::shadow(), TestGuestName::Hello, mib, pages);
                let slots = ram_slots(BASE, mib << 20);
                let mut l = LiveMirror::new(&c, BASE, &slots).unwrap();
                let p = l
                    .observe(&c, &huge(mib as usize / 2), PhaseTouches::ALL)
                    .unwrap();
                (p.pages_4k, p.pages_2m, l.mmu.pages_1g())
            };
            let two = predict(GuestPageSize::Size2M);
            assert_eq!(predict(GuestPageSize::Size1G), two, "{mib} MiB");
            assert_eq!(two, (16, mib / 2 - 1, 0));
        }
    }

    /// The per-memslot counts add up to the totals at every level, 1G
    /// included (2 GiB on 1G host pages, 1G guest pages, TDP: 1G leaves).
    #[test]
    fn per_slot_counts_add_up_to_the_totals_1g_included() {
        let c = ctx(
            MmuParams::tdp(),
            TestGuestName::Hello,
            2048,
            GuestPageSize::Size1G,
        );
        let mut l = LiveMirror::new(&c, BASE, &ram_slots(BASE, 2048 << 20)).unwrap();
        let states: Vec<_> = (0..1024u32)
            .map(|f| guest_mem::FrameView::Gig {
                slot: f / 512,
                index: (f % 512) as u16,
            })
            .collect();
        let p = l.observe(&c, &states, PhaseTouches::ALL).unwrap();
        assert!(p.pages_1g > 0, "{p:?}");
        let sum = |f: fn(&SlotMappings) -> u64| p.per_slot.iter().map(f).sum::<u64>();
        assert_eq!(
            (
                sum(|s| s.pages_4k),
                sum(|s| s.pages_2m),
                sum(|s| s.pages_1g)
            ),
            (p.pages_4k, p.pages_2m, p.pages_1g)
        );
    }

    /// `unmap` checkpoint 2: the K split frames were invalidated and not
    /// touched since: no 4K leaves there (the TDP host's KVM: 0).
    #[test]
    fn unmap_checkpoint_2_has_no_4k_leaves_in_the_split_frames() {
        for mmu in [MmuParams::tdp(), MmuParams::shadow()] {
            let c = ctx(mmu, TestGuestName::Unmap, 64, GuestPageSize::Size2M);
            let mut l = LiveMirror::new(&c, BASE, &ram_slots(BASE, 64 << 20)).unwrap();
            let mut states = huge(32);
            let p1 = l.observe(&c, &states, PhaseTouches::ALL).unwrap();
            for s in &mut states[1..9] {
                *s = guest_mem::FrameView::Small { present: 511 };
            }
            l.invalidate_frames(&(1..9).collect::<Vec<_>>()).unwrap();
            let p2 = l
                .observe(
                    &c,
                    &states,
                    PhaseTouches {
                        work: false,
                        ..PhaseTouches::ALL
                    },
                )
                .unwrap();
            assert_eq!(p1.pages_2m - p2.pages_2m, 8, "{mmu:?}");
            assert_eq!(p2.pages_4k, p1.pages_4k, "{mmu:?}");
            let p3 = l.observe(&c, &states, PhaseTouches::ALL).unwrap();
            assert_eq!(p3.pages_4k - p2.pages_4k, 8 * 512, "{mmu:?}");
        }
    }

    /// `vmm stress` quiescent points on the TDP MMU: exact; with dirty
    /// logging on, eager splitting makes every frame 512 4K leaves.
    #[test]
    fn stress_on_tdp_is_exact_and_dirty_logging_splits_everything() {
        let mut states = huge(128);
        for s in &mut states[10..20] {
            *s = guest_mem::FrameView::Small { present: 512 };
        }
        let predict = |mmu, dirty| {
            let c = ctx(mmu, TestGuestName::Stress, 256, GuestPageSize::Size2M);
            let slots = ram_slots(BASE, 256 << 20);
            predict_all_touched(&c, BASE, &slots, host_levels(&states), dirty, None).unwrap()
        };
        let p = predict(MmuParams::tdp(), false);
        assert_eq!(
            (p.pages_4k, p.pages_4k_max, p.pages_2m),
            (10 * 512, 10 * 512, 118)
        );
        let d = predict(MmuParams::tdp(), true);
        assert_eq!((d.pages_4k, d.pages_4k_max, d.pages_2m), (65536, 65536, 0));
        // Shadow MMU: frame 0 at 4K (page tables), all of it swept by the
        // guest every pass: exact.
        let p = predict(MmuParams::shadow(), false);
        assert_eq!(p.pages_2m, 117);
        assert_eq!((p.pages_4k, p.pages_4k_max), (11 * 512, 11 * 512));
        assert_eq!(p.verdict(kvm(11 * 512, 117)), Verdict::Match);
        for (k4, m2) in [(11 * 512 - 1, 117), (11 * 512, 118)] {
            assert!(matches!(p.verdict(kvm(k4, m2)), Verdict::Mismatch(_)));
        }
    }

    #[test]
    fn linux_prediction_is_informative_but_checks_the_2m_ceiling() {
        let c = MirrorContext {
            mmu: MmuParams::shadow(),
            guest: None,
        };
        let mut states = huge(4);
        states[1] = guest_mem::FrameView::Small { present: 512 };
        let p = predict_all_touched(
            &c,
            BASE,
            &ram_slots(BASE, 8 << 20),
            host_levels(&states),
            false,
            None,
        )
        .unwrap();
        assert!(!p.comparable);
        assert_eq!(p.max_pages_2m, 3);
        assert_eq!(p.verdict(kvm(100, 3)), Verdict::Informative(None));
        assert!(matches!(
            p.verdict(kvm(0, 4)),
            Verdict::Informative(Some(_))
        ));
        assert!(!p.agrees(kvm(0, 4)));
    }

    #[test]
    fn misaligned_host_address_forbids_2m() {
        let c = MirrorContext {
            mmu: MmuParams::tdp(),
            guest: None,
        };
        let p = predict_all_touched(
            &c,
            BASE + PAGE,
            &ram_slots(BASE + PAGE, 4 << 20),
            host_levels(&huge(2)),
            false,
            None,
        )
        .unwrap();
        assert_eq!((p.pages_4k, p.pages_2m, p.max_pages_2m), (1024, 0, 0));
    }
}
