//! The builder: a validated [`VmConfig`] becomes a VM ready to run (KVM VM,
//! memslots over guest RAM, the guest loaded, vCPU fds set for a 64-bit
//! entry, devices, the shared [`Machine`]). `vmm run` (and `vmm bench`,
//! through it) and `vmm stress` all build their VM here, after Firecracker's
//! `build_microvm_for_boot`: what to build (`config` / `VmConfig`) →
//! [`build_vm`] → the running state (`vm`, `machine`, the vCPU threads of
//! [`spawn_vcpus`]).
//!
//! Everything a user can get wrong is checked before [`build_vm`] opens the
//! KVM device: the caller turns its own configuration into a [`VmConfig`]
//! (the test guest already assembled, the Linux command line composed).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use guest_mem::{Backing, GuestMemError, GuestRam, GuestRamConfig, RamLayout, SplitPolicy};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::eventfd::EventFd;

use crate::api::ApiServerError;
use crate::balloon_backend::{BalloonDevice, IrqfdLine, BALLOON_SLOT};
use crate::boot::linux::{self, BootError, LinuxBootSpec};
use crate::boot::long_mode::{self, LongModeError};
use crate::control::VcpuControl;
use crate::cpuid;
use crate::devices::console::{self, Console};
use crate::devices::serial::{self, SerialFlags, SerialOut};
use crate::devices::virtio_balloon::BalloonError;
use crate::exit_code;
use crate::host::HostInfo;
use crate::input_file::InputFileError;
use crate::machine::{GuestKind, Machine, MachineParts};
use crate::mirror::MirrorContext;
use crate::output_path::OutputPathError;
use crate::stats::KvmStats;
use crate::testguest::touch::GuestTouches;
use crate::testguest::{TestGuestError, TestGuestImage};
use crate::vm::{self, Vm, VmError};

/// Errors before the guest runs (building the VM, or the checks before it).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad option combination or value.
    #[error("{0}")]
    Usage(String),
    /// Guest RAM.
    #[error("guest RAM: {0}")]
    GuestMem(#[from] GuestMemError),
    /// KVM set-up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Linux boot.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Test guest.
    #[error(transparent)]
    TestGuest(#[from] TestGuestError),
    /// Long-mode set-up.
    #[error(transparent)]
    LongMode(#[from] LongModeError),
    /// Serial output file.
    #[error("cannot open the serial output {path}: {source}")]
    SerialFile {
        /// The path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The balloon device.
    #[error("virtio-balloon: {0}")]
    Balloon(#[from] BalloonError),
    /// The API socket.
    #[error(transparent)]
    Api(#[from] ApiServerError),
    /// An output path (`--stats-json`) that cannot be written.
    #[error(transparent)]
    Output(#[from] OutputPathError),
    /// An input or serial file that is not a regular file.
    #[error(transparent)]
    Input(#[from] InputFileError),
    /// eventfd / thread creation and other OS failures.
    #[error("{what}: {source}")]
    Os {
        /// What failed.
        what: &'static str,
        /// OS error.
        source: std::io::Error,
    },
}

impl RunError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        let bad = match self {
            RunError::Usage(_)
            | RunError::SerialFile { .. }
            | RunError::Api(_)
            | RunError::Output(_)
            | RunError::Input(_) => true,
            RunError::Balloon(_) => false,
            RunError::GuestMem(e) => matches!(
                e,
                GuestMemError::PoolTooSmall { .. }
                    | GuestMemError::HugetlbUnavailable { .. }
                    | GuestMemError::ShmemThpDisabled { .. }
                    | GuestMemError::SizeNotMultipleOf2M { .. }
                    | GuestMemError::SizeTooLarge { .. }
                    | GuestMemError::HostCannotBack { .. }
                    | GuestMemError::BadMemslotSize { .. }
                    | GuestMemError::Memfd { .. }
            ),
            RunError::Vm(e) => e.is_bad_input(),
            RunError::Boot(e) => e.is_bad_input(),
            RunError::TestGuest(e) => !matches!(
                e,
                TestGuestError::Assemble(_)
                    | TestGuestError::TooLarge { .. }
                    | TestGuestError::Load { .. }
            ),
            RunError::LongMode(e) => matches!(
                e,
                LongModeError::RamTooSmall { .. } | LongModeError::RamTooLarge { .. }
            ),
            RunError::Os { .. } => false,
        };
        if bad {
            exit_code::BAD_INPUT
        } else {
            exit_code::INTERNAL
        }
    }
}

/// What runs in the VM, ready to load.
pub enum GuestConfig {
    /// A built-in test guest, already assembled.
    Test(Box<TestGuestImage>),
    /// A Linux kernel (command line already composed).
    Linux(LinuxBootSpec),
}

/// Where the guest's serial console goes.
pub enum SerialConfig {
    /// This writer (stdout, or the `--serial` file the caller opened),
    /// behind a [`Console`] buffer.
    Console(Box<dyn Write + Send>),
    /// Nowhere (a guest that talks only through the test device).
    Discard,
}

/// The virtio-balloon of a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct BalloonSpec {
    /// Initial target in bytes.
    pub target: Option<u64>,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
    /// When a partly given-back frame is split.
    pub split_policy: SplitPolicy,
}

/// A validated description of one VM: what [`build_vm`] builds.
pub struct VmConfig {
    /// KVM device node.
    pub kvm_dev: PathBuf,
    /// Guest RAM in bytes (checked by `guest_mem::check_ram_size`).
    pub memory: u64,
    /// Memslots of at most this size (`None`: one per RAM region).
    pub memslot_size: Option<u64>,
    /// vCPUs.
    pub vcpus: u8,
    /// What backs guest RAM.
    pub backing: Backing,
    /// The model's collapse policy (`None`: guest-mem's default).
    pub khugepaged: Option<thp::policy::Khugepaged>,
    /// The guest.
    pub guest: GuestConfig,
    /// The serial console.
    pub serial: SerialConfig,
    /// The balloon, if any.
    pub balloon: Option<BalloonSpec>,
    /// Host facts (detected without KVM).
    pub host: HostInfo,
}

/// A VM ready to run: its vCPU fds are still in `vm.vcpus`.
pub struct BuiltVm {
    /// The VM (drop it before the machine's guest RAM goes).
    pub vm: Vm,
    /// State shared by the vCPU threads.
    pub machine: Arc<Machine>,
    /// The test guest, if one runs.
    pub image: Option<Box<TestGuestImage>>,
    /// The console buffer of [`SerialConfig::Console`].
    pub console: Option<Console>,
    /// Guest RAM's layout.
    pub layout: RamLayout,
}

/// Build the VM `c` describes: open KVM, create and populate guest RAM,
/// create the VM with its memslots and vCPUs, load the guest, create the
/// devices and the [`Machine`].
pub fn build_vm(c: VmConfig) -> Result<BuiltVm, RunError> {
    let kvm = vm::open_kvm(&c.kvm_dev)?;
    if let GuestConfig::Test(img) = &c.guest {
        // The CPUID every vCPU gets (`Vm::new`), checked before guest RAM
        // is allocated: a test guest the CPU cannot run fails here.
        let base = cpuid::supported(&kvm).map_err(VmError::from)?;
        img.params
            .check_cpuid(&cpuid::for_vcpu(&base, 0, c.vcpus))?;
    }
    let ram = guest_ram(&c)?;
    let layout = ram.layout();
    // SAFETY: GuestRam keeps its host range mapped (frames are only remapped
    // in place with MAP_FIXED) until it is dropped; the Machine below owns
    // `ram` and outlives every vCPU thread, and `BuiltVm::vm` is dropped
    // before it (every caller drops the VM first).
    let vm = unsafe { Vm::new(kvm, usize::from(c.vcpus), ram.memslots())? };
    let kind = load_guest(&vm, &ram, &c.guest)?;
    let flags = Arc::new(SerialFlags::default());
    let (serial_out, console) = serial_sink(c.serial, flags.clone())?;
    let serial_dev =
        serial::new_serial(register_irq(&vm, serial::COM1_IRQ, SERIAL_IRQ)?, serial_out);
    let stats = match KvmStats::open(&vm.fd) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("KVM statistics unavailable (no mirror comparison): {e}");
            None
        }
    };
    let balloon_irq = match &c.balloon {
        Some(_) => Some(register_irq(&vm, BALLOON_SLOT.irq, BALLOON_IRQ)?),
        None => None,
    };
    let image = match c.guest {
        GuestConfig::Test(img) => Some(img),
        GuestConfig::Linux(_) => None,
    };
    let machine = Arc::new(Machine::new(MachineParts {
        vcpus: vm.vcpus.len(),
        serial: serial_dev,
        serial_flags: flags,
        ram,
        test_device: image.as_ref().map(|i| i.device()),
        host: c.host,
        kind,
        stats,
    }));
    machine.set_mirror_context(MirrorContext {
        mmu: crate::mmu_params::detect(&c.host),
        guest: image.as_deref().map(GuestTouches::of),
    });
    if let (Some(spec), Some(irq)) = (&c.balloon, balloon_irq) {
        attach_balloon(&machine, layout, spec, irq)?;
    }
    Ok(BuiltVm {
        vm,
        machine,
        image,
        console,
        layout,
    })
}

/// Guest RAM of `c`, every page populated.
fn guest_ram(c: &VmConfig) -> Result<GuestRam, RunError> {
    let mut cfg = GuestRamConfig::new(c.memory, c.backing);
    cfg.memslot_size = c.memslot_size;
    if let Some(k) = c.khugepaged {
        // The model refuses collapses the collapser's policy would not ask for.
        cfg.policy.khugepaged = k;
    }
    let mut ram = GuestRam::new(&cfg)?;
    ram.populate_all()?;
    Ok(ram)
}

/// Boot page tables, the guest image and the vCPUs' entry state.
fn load_guest(vm: &Vm, ram: &GuestRam, guest: &GuestConfig) -> Result<GuestKind, RunError> {
    let mem = ram.memory();
    let layout = ram.layout();
    let tables = long_mode::setup(&mem, layout.low_size())?;
    match guest {
        GuestConfig::Test(img) => {
            img.load(&mem)?;
            vm.setup_long_mode(&tables, |i| img.initial_regs(i), true)?;
            Ok(GuestKind::TestGuest)
        }
        GuestConfig::Linux(spec) => {
            let entry = linux::load(&mem, layout, spec)?;
            log::info!(
                "kernel entry {:#x}, image end {:#x}, initrd {:x?}, command line {:?}",
                entry.entry,
                entry.kernel_end,
                entry.initrd,
                spec.cmdline
            );
            vm.setup_long_mode(
                &tables,
                |_| vm::entry_regs(entry.entry, linux::BOOT_STACK_POINTER, entry.zero_page),
                false,
            )?;
            Ok(GuestKind::Linux)
        }
    }
}

/// What an irq eventfd is for: (what creating it is called, the ioctl's name).
type IrqUse = (&'static str, &'static str);
const SERIAL_IRQ: IrqUse = ("creating the serial irq eventfd", "KVM_IRQFD (serial)");
const BALLOON_IRQ: IrqUse = ("creating the balloon irq eventfd", "KVM_IRQFD (balloon)");

/// An eventfd wired to the in-kernel irqchip's line `irq`.
fn register_irq(vm: &Vm, irq: u32, (what, op): IrqUse) -> Result<EventFd, RunError> {
    let e = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| RunError::Os { what, source })?;
    vm.fd
        .register_irqfd(&e, irq)
        .map_err(|source| VmError::Kvm { op, source })?;
    Ok(e)
}

/// The serial console's sink: the writer behind a [`Console`] buffer, so a
/// slow or gone reader never blocks a vCPU; or nowhere.
fn serial_sink(
    c: SerialConfig,
    flags: Arc<SerialFlags>,
) -> Result<(SerialOut, Option<Console>), RunError> {
    let out = match c {
        SerialConfig::Discard => {
            return Ok((SerialOut::new(Box::new(std::io::sink()), flags), None));
        }
        SerialConfig::Console(out) => out,
    };
    let (console, writer) =
        Console::spawn(out, console::DEFAULT_CAPACITY).map_err(|source| RunError::Os {
            what: "spawning the console writer thread",
            source,
        })?;
    Ok((SerialOut::new(Box::new(writer), flags), Some(console)))
}

/// The virtio-balloon on `irq`, attached to `machine`.
fn attach_balloon(
    machine: &Arc<Machine>,
    layout: RamLayout,
    spec: &BalloonSpec,
    irq: EventFd,
) -> Result<(), RunError> {
    let mut dev = BalloonDevice::new(
        Arc::downgrade(machine),
        machine.mem.clone(),
        layout,
        Arc::new(IrqfdLine(irq)),
        spec.target,
        spec.free_page_reporting,
    )?;
    dev.set_split_policy(spec.split_policy);
    log::info!("virtio-balloon at {}", BALLOON_SLOT.cmdline_arg());
    machine.set_balloon(Arc::new(dev));
    Ok(())
}

/// Start one thread per vCPU fd of `vm` (named `vcpuN`), each running
/// `body(index, fd)`. If a thread cannot start, the ones started are stopped
/// through `control` (waiting at most `stop_timeout`).
pub fn spawn_vcpus<F>(
    vm: &mut Vm,
    control: &VcpuControl,
    stop_timeout: std::time::Duration,
    body: F,
) -> Result<Vec<JoinHandle<()>>, std::io::Error>
where
    F: Fn(usize, VcpuFd) + Clone + Send + 'static,
{
    let mut handles = Vec::new();
    for (i, fd) in std::mem::take(&mut vm.vcpus).into_iter().enumerate() {
        let b = body.clone();
        match std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || b(i, fd))
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                control.stop(stop_timeout);
                return Err(e);
            }
        }
    }
    Ok(handles)
}
