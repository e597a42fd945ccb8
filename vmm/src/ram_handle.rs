//! The narrow handle the services of a running VM (the collapser, the
//! balloon backend, the deferred-split worker) get instead of the whole `Machine`: guest RAM, the vCPUs
//! to pause while a frame is copied, and where give-backs and collapses are
//! counted. `Machine` implements it; the services never import `machine`.

use std::sync::MutexGuard;

use guest_mem::GuestRam;

use crate::control::VcpuControl;
use crate::give_back_stats::GiveBackRecorder;
use crate::unmap_stats::UnmapRecorder;

/// Guest RAM and what acting on it needs.
pub trait RamHandle: Send + Sync {
    /// Guest RAM, locked alone.
    fn ram(&self) -> MutexGuard<'_, GuestRam>;
    /// Runs `f` on guest RAM with the balloon transport (if any) locked
    /// first: the lock order of the balloon's path, for a service that does
    /// not come through the balloon (the collapser).
    fn with_ram_after_balloon(&self, f: &mut dyn FnMut(&mut GuestRam));
    /// Runs `f` on guest RAM and the balloon's give-back counters with the
    /// balloon transport locked first; `false` (and `f` not run) when the VM
    /// has no balloon.
    fn with_balloon_ram(&self, f: &mut dyn FnMut(&mut GuestRam, &GiveBackRecorder)) -> bool;
    /// The vCPUs (a `guest_mem::Quiesce`).
    fn vcpus(&self) -> &VcpuControl;
    /// Where give-backs, refills and collapses are counted.
    fn recorder(&self) -> &UnmapRecorder;
}
