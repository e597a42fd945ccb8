//! Prediction of KVM's `pages_4k` / `pages_2m` for a sequence of guest
//! accesses.

use super::host::HostMap;
use super::mmu::{Access, FaultResult, SecondaryMmu};
use super::params::MmuParams;
use super::slots::Memslot;
use super::MirrorError;
use crate::units::Level;

/// One guest access the prediction replays as a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touch {
    /// The gfn.
    pub gfn: u64,
    /// The fault's own cap: on the shadow MMU the guest's page size at the
    /// gfn; on the TDP MMU [`Level::G1`] (the guest's tables do not matter).
    pub guest_max_level: Level,
    /// Write / exec.
    pub access: Access,
}

/// Runs a fault for every touched gfn (in order) against a fresh TDP MMU
/// with `slots` over `host`, and returns `(pages_4k, pages_2m)` as KVM's
/// binary stats would report them. `guest_max_level(gfn)` is the fault's own
/// cap. A gfn outside every slot is an error (KVM would exit to userspace for
/// MMIO); a gfn the host does not map installs nothing.
pub fn predict<I, G>(
    slots: &[Memslot],
    host: &dyn HostMap,
    guest_max_level: G,
    touched: I,
) -> Result<(u64, u64), MirrorError>
where
    I: IntoIterator<Item = u64>,
    G: Fn(u64) -> Level,
{
    let mmu = predict_with(
        MmuParams::tdp(),
        slots,
        host,
        &[],
        touched.into_iter().map(|gfn| Touch {
            gfn,
            guest_max_level: guest_max_level(gfn),
            access: Access::default(),
        }),
    )?;
    Ok((mmu.pages_4k(), mmu.pages_2m()))
}

/// A fresh secondary MMU of `params` with `slots`, the guest page tables at
/// `shadowed` (write-tracked on the shadow MMU, ignored on the TDP MMU, as
/// `account_shadowed` runs before the guest's first fault through them),
/// after every access of `touches` faulted in order. Leaves are keyed by gfn:
/// exact for the TDP MMU; on the shadow MMU exact when each gfn is mapped
/// through one guest mapping (KVM counts one SPTE per shadow page that maps it).
pub fn predict_with<I>(
    params: MmuParams,
    slots: &[Memslot],
    host: &dyn HostMap,
    shadowed: &[u64],
    touches: I,
) -> Result<SecondaryMmu, MirrorError>
where
    I: IntoIterator<Item = Touch>,
{
    let mut mmu = SecondaryMmu::with_params(params);
    for s in slots {
        mmu.add_slot(*s)?;
    }
    if params.shadow_paging() {
        for g in shadowed {
            mmu.account_shadowed(*g)?;
        }
    }
    for t in touches {
        match mmu.fault_access(t.gfn, t.guest_max_level, t.access, host)? {
            FaultResult::Installed { .. }
            | FaultResult::AlreadyMapped { .. }
            | FaultResult::NoHostPage => {}
            FaultResult::Retry => {
                log::warn!(
                    "predict: unexpected retry at gfn {:#x} with no invalidation",
                    t.gfn
                );
            }
        }
    }
    Ok(mmu)
}
