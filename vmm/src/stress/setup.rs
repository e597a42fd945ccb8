//! Building the stress machine through [`crate::builder`]: guest RAM, the
//! VM, the stress test guest and the shared machine state (like `vmm run
//! --test-guest`, minus the serial console: the stress guest talks only
//! through the test device).

use std::sync::Arc;

use guest_mem::Backing;

use crate::builder::RunError;
use crate::builder::{self, GuestConfig, SerialConfig, VmConfig};
use crate::host::HostInfo;
use crate::machine::Machine;
use crate::testguest::{self, GuestPageSize, TestGuestImage, TestGuestName, TestGuestParams};
use crate::vm::Vm;

/// A machine ready to run (vCPU fds still in `vm.vcpus`).
pub struct Built {
    /// The VM.
    pub vm: Vm,
    /// Shared state.
    pub machine: Arc<Machine>,
    /// The stress guest.
    pub image: Box<TestGuestImage>,
}

/// Build everything for `memory` bytes on `backing` with `vcpus`: the
/// stress guest is assembled (and the size checked) before KVM is opened.
pub fn build(
    kvm_dev: &std::path::Path,
    memory: u64,
    vcpus: u8,
    backing: Backing,
) -> Result<Built, RunError> {
    guest_mem::check_ram_size(memory)?;
    let mut p = TestGuestParams::new(TestGuestName::Stress, memory);
    p.vcpus = usize::from(vcpus);
    p.guest_pages = GuestPageSize::Size2M;
    p.generations = 1;
    let image = testguest::build(&p)?;
    let built = builder::build_vm(VmConfig {
        kvm_dev: kvm_dev.to_path_buf(),
        memory,
        memslot_size: None,
        vcpus,
        backing,
        // The model's default policy: stress collapses what khugepaged would.
        khugepaged: None,
        guest: GuestConfig::Test(Box::new(image)),
        serial: SerialConfig::Discard,
        balloon: None,
        host: HostInfo::detect(),
    })?;
    let image = built
        .image
        .ok_or_else(|| RunError::Usage("internal: the stress VM has no test guest".into()))?;
    Ok(Built {
        vm: built.vm,
        machine: built.machine,
        image,
    })
}
