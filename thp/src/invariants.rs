//! Invariant checker, run after every operation in tests.
//!
//! Primary: every mapping points at a live folio and the right pfn;
//! mapcounts equal the mappings found in the page tables; refcounts equal
//! mappings + pins + held references; no live folio is unreferenced (leak);
//! pool accounting is exact; the deferred-split queue agrees with the folio
//! flags. Secondary: every entry maps what the primary maps there now, and a
//! 2M entry sits only over a PMD-mapped folio in a slot that allows 2M.

use crate::folio::Backing;
use crate::kvm_mirror::{HostMap, SecondaryMmu};
use crate::primary::{FrameMap, Primary};
use crate::units::{Level, PAGES_PER_HPAGE, PAGE_SIZE};

/// A broken invariant, with a description of what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invariant violated: {what}")]
pub struct InvariantViolation {
    /// What is wrong.
    pub what: String,
}

impl InvariantViolation {
    /// A violation described by `what`.
    pub fn new(what: impl Into<String>) -> Self {
        InvariantViolation { what: what.into() }
    }
}

fn fail<T>(what: String) -> Result<T, InvariantViolation> {
    Err(InvariantViolation::new(what))
}

/// Mappings found in the page tables, per folio id: PMD count, PTE count of
/// page 0 (all a small folio has) and, for large folios, per-page counts.
struct Seen {
    entire: Vec<u32>,
    small: Vec<u32>,
    large: std::collections::HashMap<u32, Vec<u32>>,
}

/// Checks every invariant of the primary model.
pub fn check_primary(p: &Primary) -> Result<(), InvariantViolation> {
    let arena = p.folios();
    let max_id = arena
        .iter()
        .map(|(id, _)| id as usize + 1)
        .max()
        .unwrap_or(0);
    let mut seen = Seen {
        entire: vec![0; max_id],
        small: vec![0; max_id],
        large: std::collections::HashMap::new(),
    };
    for mm_id in p.mm_ids() {
        let mm = p
            .mm(mm_id)
            .map_err(|e| InvariantViolation::new(e.to_string()))?;
        for frame in 0..mm.frames() {
            match mm.frame(frame) {
                FrameMap::None => {}
                FrameMap::Pmd(pmd) => {
                    let Some(f) = arena.get(pmd.folio) else {
                        return fail(format!(
                            "mm {mm_id} frame {frame}: PMD to dead folio {}",
                            pmd.folio
                        ));
                    };
                    if !f.is_large()
                        || f.frame != frame
                        || pmd.pfn != f.pfn(0)
                        || pmd.pfn % PAGES_PER_HPAGE != 0
                    {
                        return fail(format!(
                            "mm {mm_id} frame {frame}: bad PMD {pmd:?} for folio {f:?}"
                        ));
                    }
                    seen.entire[pmd.folio as usize] += 1;
                }
                FrameMap::Table(t) => {
                    let mut present = 0;
                    for (i, pte) in t.iter() {
                        present += 1;
                        let Some(f) = arena.get(pte.folio) else {
                            return fail(format!(
                                "mm {mm_id} frame {frame} page {i}: PTE to dead folio {}",
                                pte.folio
                            ));
                        };
                        let idx = pte.idx as usize;
                        if idx >= f.nr_pages()
                            || pte.pfn != f.pfn(idx)
                            || f.frame != frame
                            || (f.is_large() && idx != i)
                        {
                            return fail(format!(
                                "mm {mm_id} frame {frame} page {i}: bad PTE {pte:?}"
                            ));
                        }
                        if f.is_large() {
                            seen.large
                                .entry(pte.folio)
                                .or_insert_with(|| vec![0; f.nr_pages()])[idx] += 1;
                        } else {
                            seen.small[pte.folio as usize] += 1;
                        }
                    }
                    if present != t.present() {
                        return fail(format!(
                            "mm {mm_id} frame {frame}: present count {} != {present}",
                            t.present()
                        ));
                    }
                }
            }
        }
    }
    let mut huge_used = vec![0u32; p.huge_pool().capacity()];
    let mut parts = vec![0u16; p.huge_pool().capacity()];
    let mut small_used = 0usize;
    let mut small_seen = vec![false; p.small_pool().high_water()];
    let mut queued = 0usize;
    for (id, f) in arena.iter() {
        let entire = seen.entire[id as usize];
        let pages_ok = if f.is_large() {
            match seen.large.get(&id) {
                Some(v) => v.as_slice() == f.pte_mapcounts(),
                None => f.pte_mapcounts().iter().all(|m| *m == 0),
            }
        } else {
            f.pte_mapcounts()[0] == seen.small[id as usize]
        };
        if f.pte_sums() != f.pte_sums_recomputed() {
            return fail(format!(
                "folio {id}: cached (PTE mappings, pages PTE-mapped) {:?} != counted {:?}",
                f.pte_sums(),
                f.pte_sums_recomputed()
            ));
        }
        if entire != f.entire_mapcount || !pages_ok {
            return fail(format!(
                "folio {id}: mapcounts (entire {}, pages sum {}) disagree with the page tables (entire {entire})",
                f.entire_mapcount,
                f.pte_sums_recomputed().0,
            ));
        }
        let expected = f.total_mapcount() + f.pincount + f.held;
        if f.refcount != expected {
            return fail(format!(
                "folio {id}: refcount {} != mappings + pins + held = {expected}",
                f.refcount
            ));
        }
        if f.refcount == 0 {
            return fail(format!("folio {id} leaked: live with no reference"));
        }
        if f.on_deferred_split {
            queued += 1;
            if !p.deferred_queue().any(|q| q == id) {
                return fail(format!("folio {id} flagged deferred but not queued"));
            }
        }
        match f.backing {
            Backing::Huge(slot) => {
                let Some(u) = huge_used.get_mut(slot as usize) else {
                    return fail(format!("folio {id}: huge slot {slot} beyond capacity"));
                };
                *u += 1;
                if !p.huge_pool().is_used(slot) {
                    return fail(format!("folio {id}: huge slot {slot} is free in the pool"));
                }
            }
            Backing::HugePart { slot, .. } => {
                let Some(n) = parts.get_mut(slot as usize) else {
                    return fail(format!("folio {id}: huge slot {slot} beyond capacity"));
                };
                *n += 1;
                if !p.huge_pool().is_used(slot) {
                    return fail(format!("folio {id}: part of free huge slot {slot}"));
                }
            }
            Backing::Small(slot) => {
                small_used += 1;
                let dup = small_seen
                    .get_mut(slot as usize)
                    .is_none_or(|seen| std::mem::replace(seen, true));
                if dup || !p.small_pool().is_used(slot) {
                    return fail(format!("folio {id}: small slot {slot} doubly used or free"));
                }
            }
        }
    }
    if queued != p.deferred_queue().count() {
        return fail("deferred-split queue holds dead or unflagged folios".into());
    }
    let mut used_slots = 0;
    for (slot, (&u, &n)) in huge_used.iter().zip(parts.iter()).enumerate() {
        if n != p.parts_live(slot as u32) {
            return fail(format!(
                "huge slot {slot}: {n} live parts, recorded {}",
                p.parts_live(slot as u32)
            ));
        }
        if u > 1 || (u == 1 && n > 0) {
            return fail(format!("huge slot {slot} used by several folios"));
        }
        let used = u == 1 || n > 0;
        if used != p.huge_pool().is_used(slot as u32) {
            return fail(format!(
                "huge slot {slot}: pool says used={}, folios say {used}",
                !used
            ));
        }
        used_slots += used as usize;
    }
    if used_slots != p.huge_pool().used_count() || !p.huge_pool().is_consistent() {
        return fail(format!(
            "huge pool: {} used, folios hold {used_slots}",
            p.huge_pool().used_count()
        ));
    }
    if small_used != p.small_pool().used_count() || !p.small_pool().is_consistent() {
        return fail(format!(
            "small pool: {} used, folios hold {small_used}",
            p.small_pool().used_count()
        ));
    }
    Ok(())
}

/// Checks the secondary MMU against the host mapping: every entry lies in a
/// memslot and maps the pfn the host maps now (aligned down to 2M for a 2M
/// entry), a writable entry only where the host page is writable, a 2M
/// entry only where the host maps a PMD, the slot allows 2M and dirty
/// logging is off.
pub fn check_secondary(s: &SecondaryMmu, host: &dyn HostMap) -> Result<(), InvariantViolation> {
    let (mut n4, mut n2, mut n1) = (0u64, 0u64, 0u64);
    for (gfn, level, pfn, writable) in s.entries_access() {
        let Some(slot) = s.slot_for_gfn(gfn) else {
            return fail(format!(
                "secondary entry at gfn {gfn:#x} outside every memslot (deleted slot)"
            ));
        };
        let hva = slot.gfn_to_hva(gfn);
        match level {
            Level::K4 => {
                n4 += 1;
                if host.pfn(hva) != Some(pfn) {
                    return fail(format!(
                        "stale 4K entry gfn {gfn:#x} -> pfn {pfn:#x}, host maps {:?}",
                        host.pfn(hva)
                    ));
                }
            }
            Level::M2 | Level::G1 => {
                if level == Level::M2 {
                    n2 += 1;
                } else {
                    n1 += 1;
                }
                let n = level.pages();
                if gfn % n != 0 || pfn % n != 0 {
                    return fail(format!(
                        "{level:?} entry gfn {gfn:#x} pfn {pfn:#x} not aligned"
                    ));
                }
                // Dirty logging without eager split and write tracking keep
                // a huge leaf, read-only; a writable one there is a bug.
                if slot.dirty_logging && writable {
                    return fail(format!(
                        "writable {level:?} entry at gfn {gfn:#x} while dirty logging is on"
                    ));
                }
                if !s.lpage_allowed_at(gfn, level) && writable {
                    return fail(format!(
                        "writable {level:?} entry at gfn {gfn:#x} where lpage_info disallows it"
                    ));
                }
                for i in [0, n / 2, n - 1] {
                    let h = hva + i * PAGE_SIZE;
                    if host.host_level(h) < level || host.pfn(h) != Some(pfn + i) {
                        return fail(format!(
                            "stale 2M entry gfn {gfn:#x} -> pfn {pfn:#x}: host page {i} is {:?} at {:?}",
                            host.pfn(h),
                            host.host_level(h)
                        ));
                    }
                }
            }
        }
        if writable && !host.writable(hva) {
            return fail(format!(
                "writable {level:?} entry gfn {gfn:#x} -> pfn {pfn:#x} over a write-protected host page"
            ));
        }
    }
    if (n4, n2, n1) != (s.pages_4k(), s.pages_2m(), s.pages_1g()) {
        return fail(format!(
            "counters pages_4k/pages_2m/pages_1g = {}/{}/{} but entries are {n4}/{n2}/{n1}",
            s.pages_4k(),
            s.pages_2m(),
            s.pages_1g()
        ));
    }
    Ok(())
}
