//! Building the stress machine: guest RAM, the VM, the stress test guest and
//! the shared machine state (like `vmm run --test-guest`, minus the serial
//! console: the stress guest talks only through the test device).

use std::sync::Arc;

use guest_mem::{Backing, GuestRam, GuestRamConfig};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::long_mode;
use crate::devices::serial::{self, SerialFlags, SerialOut};
use crate::host::HostInfo;
use crate::machine::{GuestKind, Machine, MachineParts};
use crate::run::RunError;
use crate::stats::KvmStats;
use crate::testguest::{self, GuestPageSize, TestGuestImage, TestGuestName, TestGuestParams};
use crate::vm::{self, Vm};

/// A machine ready to run (vCPU fds still in `vm.vcpus`).
pub struct Built {
    /// The VM.
    pub vm: Vm,
    /// Shared state.
    pub machine: Arc<Machine>,
    /// The stress guest.
    pub image: TestGuestImage,
}

/// Build everything for `memory` bytes on `backing` with `vcpus`.
pub fn build(
    kvm_dev: &std::path::Path,
    memory: u64,
    vcpus: u8,
    backing: Backing,
) -> Result<Built, RunError> {
    guest_mem::check_ram_size(memory)?;
    let host = HostInfo::detect();
    let kvm = vm::open_kvm(kvm_dev)?;
    let mut p = TestGuestParams::new(TestGuestName::Stress, memory);
    p.vcpus = usize::from(vcpus);
    p.guest_pages = GuestPageSize::Size2M;
    p.generations = 1;
    let image = testguest::build(&p)?;

    let mut ram = GuestRam::new(&GuestRamConfig::new(memory, backing))?;
    ram.populate_all()?;
    let mem = ram.memory();
    // SAFETY: GuestRam keeps its host range mapped (frames are only remapped
    // in place with MAP_FIXED) until it is dropped; the Machine owns `ram`
    // and outlives every vCPU thread, and the caller drops the VM first.
    let vm = unsafe { Vm::new(kvm, usize::from(vcpus), ram.memslots())? };
    let tables = long_mode::setup(&mem, ram.layout().low_size())?;
    image.load(&mem)?;
    vm.setup_long_mode(&tables, |i| image.initial_regs(i), true)?;
    drop(mem);

    let flags = Arc::new(SerialFlags::default());
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| RunError::Os {
        what: "creating the serial irq eventfd",
        source,
    })?;
    let serial_dev = serial::new_serial(
        irq,
        SerialOut::new(Box::new(std::io::sink()), flags.clone()),
    );
    let stats = match KvmStats::open(&vm.fd) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("KVM statistics unavailable, the mirror comparison is skipped: {e}");
            None
        }
    };
    let machine = Arc::new(Machine::new(MachineParts {
        vcpus: vm.vcpus.len(),
        serial: serial_dev,
        serial_flags: flags,
        ram,
        test_device: Some(image.device()),
        host,
        kind: GuestKind::TestGuest,
        stats,
    }));
    machine.set_mirror_context(crate::mirror::MirrorContext {
        mmu: crate::mmu_params::detect(&host),
        guest: Some(testguest::touch::GuestTouches::of(&image)),
    });
    Ok(Built { vm, machine, image })
}
