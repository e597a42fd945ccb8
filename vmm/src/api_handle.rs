//! The narrow handle the API server gets of a running VM instead of the
//! whole `Machine`: the vCPUs to pause, the balloon, a live snapshot, the
//! deferred-split queue, and the end of the run. `Machine` implements it
//! here, so the API server never imports `machine`.

use std::sync::Arc;

use guest_mem::{GiveBackReport, GuestMemError};

use crate::balloon_backend::BalloonDevice;
use crate::control::VcpuControl;
use crate::machine::Machine;
use crate::outcome::Outcome;
use crate::snapshot::{self, Snapshot};

/// What the API server may do to a running VM.
pub trait ApiHandle: Send + Sync {
    /// The vCPUs (pause, resume, whether the VM is stopping).
    fn vcpus(&self) -> &VcpuControl;
    /// The virtio-balloon, if the VM has one.
    fn balloon(&self) -> Option<&Arc<BalloonDevice>>;
    /// A live snapshot of the VM (`stats`).
    fn snapshot(&self) -> Snapshot;
    /// Split every frame on the deferred-split queue now (`split`).
    fn split_queued(&self) -> Result<GiveBackReport, GuestMemError>;
    /// End the run with `outcome` (the first end recorded wins).
    fn finish(&self, outcome: Outcome);
}

impl ApiHandle for Machine {
    fn vcpus(&self) -> &VcpuControl {
        &self.control
    }
    fn balloon(&self) -> Option<&Arc<BalloonDevice>> {
        Machine::balloon(self)
    }
    fn snapshot(&self) -> Snapshot {
        snapshot::take(self)
    }
    fn split_queued(&self) -> Result<GiveBackReport, GuestMemError> {
        crate::deferred_split::split_due(self, std::time::Duration::ZERO, std::time::Duration::ZERO)
    }
    fn finish(&self, outcome: Outcome) {
        Machine::finish(self, outcome)
    }
}
