//! Prediction of KVM's `pages_4k` / `pages_2m` for a set of touched gfns.

use super::host::HostMap;
use super::mmu::{FaultResult, SecondaryMmu};
use super::slots::Memslot;
use super::MirrorError;
use crate::units::Level;

/// Runs a fault for every touched gfn (in order) against a fresh secondary
/// MMU with `slots` over `host`, and returns `(pages_4k, pages_2m)` as KVM's
/// binary stats would report them. `guest_max_level(gfn)` is the fault's own
/// cap: on shadow paging the guest's page size at that gfn; on TDP hosts
/// `Level::M2`. A gfn outside every slot is an error (KVM would exit to
/// userspace for MMIO); a gfn the host does not map installs nothing.
///
/// Leaves are keyed by gfn, which is exact for TDP (EPT/NPT). On shadow
/// paging KVM keys shadow pages by guest virtual address; the prediction
/// matches when each gfn is mapped once by the guest (e.g. an identity map
/// with one page size per 2M frame), as the built-in test guests do.
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
    let mut mmu = SecondaryMmu::new();
    for s in slots {
        mmu.add_slot(*s)?;
    }
    for gfn in touched {
        match mmu.fault(gfn, guest_max_level(gfn), host)? {
            FaultResult::Installed { .. }
            | FaultResult::AlreadyMapped { .. }
            | FaultResult::NoHostPage => {}
            FaultResult::Retry => {
                log::warn!("predict: unexpected retry at gfn {gfn:#x} with no invalidation");
            }
        }
    }
    Ok((mmu.pages_4k(), mmu.pages_2m()))
}
