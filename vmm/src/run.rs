//! `vmm run`: create guest RAM and the VM, load a kernel or a test guest, run
//! the vCPUs until the guest ends, then report.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mem::{GuestMemError, GuestRam, GuestRamConfig, HPAGE_SIZE};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiServer, ApiServerError};
use crate::balloon_backend::{BalloonDevice, IrqfdLine, BALLOON_SLOT};
use crate::boot::linux::{self, BootError, LinuxBootSpec};
use crate::boot::long_mode::{self, LongModeError};
use crate::collapser::{Collapser, CollapserConfig};
use crate::config::RunConfig;
use crate::deferred_split::DeferredSplitter;
use crate::devices::console::{self, Console};
use crate::devices::serial::{self, SerialFlags, SerialOut};
use crate::devices::virtio_balloon::BalloonError;
use crate::exit_code;
use crate::halt::HaltTracker;
use crate::host::{HostInfo, PV_CMDLINE};
use crate::input_file::{self, InputFileError};
use crate::machine::{GuestKind, Machine, MachineParts};
use crate::mirror;
use crate::outcome::Outcome;
use crate::output_path::{self, OutputPathError};
use crate::report::{self, RunReport};
use crate::snapshot::HostMemory;
use crate::stats::{KvmSample, KvmStats};
use crate::testguest::{self, TestGuestError, TestGuestName, TestGuestParams};
use crate::vm::{self, Vm, VmError};
use guest_mem::SplitPolicy;

/// How long after a panic line the VMM waits for the guest to reset by itself.
const PANIC_GRACE: Duration = Duration::from_secs(2);
/// How long the vCPU threads get to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the console's reader gets to take the last bytes at the end.
const CONSOLE_DRAIN: Duration = Duration::from_secs(5);
/// How often KVM's mapping counters are sampled while the guest runs.
pub const KVM_SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// Most samples kept (about 2.8 hours at the interval); later ones replace the last.
const MAX_KVM_SAMPLES: usize = 20_000;
/// How often a Linux guest is probed for a halt for good ([`crate::halt`]).
const HALT_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Errors before the guest runs.
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

fn check_args(a: &RunConfig) -> Result<(), RunError> {
    match guest_mem::check_ram_size(a.memory) {
        Ok(_) => {}
        Err(GuestMemError::SizeNotMultipleOf2M { .. }) => {
            return Err(RunError::Usage(format!(
                "--memory {} ({:#x} bytes) is not a multiple of 2 MiB: guest RAM is managed in 2M \
                 frames (--backing {} needs whole 2M pages); round it, e.g. to {}M",
                a.memory,
                a.memory,
                a.backing,
                a.memory.div_ceil(HPAGE_SIZE).max(1) * 2
            )));
        }
        Err(GuestMemError::SizeTooLarge { size, max }) => {
            return Err(RunError::Usage(format!(
                "--memory {size:#x} is larger than the maximum {max:#x} (511 GiB: 3 GiB below the \
                 32-bit MMIO hole, the rest from 4 GiB up to 512 GiB)"
            )));
        }
        Err(e) => return Err(RunError::Usage(format!("--memory: {e}"))),
    }
    if let Some(size) = a.memslot_size {
        // The layout itself is checked above; here the cut into memslots.
        if let Err(e) = guest_mem::RamLayout::new(a.memory).and_then(|l| l.memslots(0, Some(size)))
        {
            return Err(RunError::Usage(format!("--memslot-size {size}: {e}")));
        }
    }
    if let Some(t) = a.timeout {
        if !(t > 0.0 && t.is_finite()) {
            return Err(RunError::Usage(format!(
                "--timeout {t} must be a positive number of seconds"
            )));
        }
    }
    // Input files: regular files only (a FIFO would hang the open).
    if let Some(k) = &a.kernel {
        input_file::open_regular("--kernel", k)?;
    }
    if let Some(i) = &a.initrd {
        let f = input_file::open_regular("--initrd", i)?;
        if f.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
            return Err(RunError::Usage(format!(
                "--initrd {} is empty: name an initramfs (cpio, optionally compressed)",
                i.display()
            )));
        }
    }
    if let Some((k, _)) = duplicate_guest_arg(&a.guest_args) {
        return Err(RunError::Usage(format!(
            "--guest-arg {k} is given more than once: give each key once"
        )));
    }
    // Outputs: checked now so a bad path never costs the run its report.
    output_path::check_all([("--stats-json", a.stats_json.as_deref())])?;
    Ok(())
}

/// The first key given twice in `--guest-arg`, if any.
fn duplicate_guest_arg(args: &[(String, u64)]) -> Option<&(String, u64)> {
    args.iter()
        .enumerate()
        .find(|(i, (k, _))| args[..*i].iter().any(|(k2, _)| k2 == k))
        .map(|(_, a)| a)
}

/// The serial console's sink: `--serial` (stdout or a file) behind a
/// [`Console`] buffer, so a slow or gone reader never blocks a vCPU.
fn serial_sink(a: &RunConfig, flags: Arc<SerialFlags>) -> Result<(SerialOut, Console), RunError> {
    let out: Box<dyn Write + Send> = if a.serial == "stdout" {
        Box::new(std::io::stdout())
    } else {
        Box::new(input_file::create_output(
            "--serial",
            &PathBuf::from(&a.serial),
        )?)
    };
    let (console, writer) =
        Console::spawn(out, console::DEFAULT_CAPACITY).map_err(|source| RunError::Os {
            what: "spawning the console writer thread",
            source,
        })?;
    Ok((SerialOut::new(Box::new(writer), flags), console))
}

/// Run per `args`; `Ok` carries the report of a run that started the guest.
pub fn run(args: &RunConfig) -> Result<RunReport, RunError> {
    crate::signals::install().map_err(|source| RunError::Os {
        what: "installing the SIGINT/SIGTERM/SIGHUP handler",
        source,
    })?;
    check_args(args)?;
    let host = HostInfo::detect();
    log::info!("host: {:?}", host);

    // Cheap checks first: KVM, then the test guest's parameters.
    let kvm = vm::open_kvm(&args.kvm_dev)?;
    let image = match args.test_guest {
        Some(name) => {
            let mut p = TestGuestParams::new(name, args.memory);
            p.vcpus = usize::from(args.vcpus);
            p.guest_pages = args.guest_pages;
            if let Some(g) = args.generations {
                if name != TestGuestName::Verify {
                    return Err(RunError::Usage(format!(
                        "--generations {g}: only the verify test guest takes generations \
                         (--test-guest {name} does not); drop the option"
                    )));
                }
                p.generations = g;
            }
            p.args = args.guest_arg_map();
            Some(testguest::build(&p)?)
        }
        None => None,
    };

    let collapser_cfg = collapser_config(args);
    let mut ram_cfg = GuestRamConfig::new(args.memory, args.backing);
    ram_cfg.memslot_size = args.memslot_size;
    // The model refuses collapses the collapser's policy would not ask for.
    ram_cfg.policy.khugepaged = collapser_cfg.khugepaged;
    let mut ram = GuestRam::new(&ram_cfg)?;
    ram.populate_all()?;
    let mem = ram.memory();
    let layout = ram.layout();

    // SAFETY: GuestRam keeps its host range mapped (frames are only remapped
    // in place with MAP_FIXED) until it is dropped; the Machine below owns
    // `ram` and outlives every vCPU thread, and the VM fd is dropped first.
    let mut vm = unsafe { Vm::new(kvm, usize::from(args.vcpus), ram.memslots())? };

    let tables = long_mode::setup(&mem, layout.low_size())?;
    let (kind, test_device) = match &image {
        Some(img) => {
            img.load(&mem)?;
            vm.setup_long_mode(&tables, |i| img.initial_regs(i), true)?;
            (GuestKind::TestGuest, Some(img.device()))
        }
        None => {
            let kernel = args.kernel.clone().ok_or_else(|| {
                RunError::Usage("either --kernel or --test-guest is required".into())
            })?;
            let extra = host.needs_emulator_workarounds().then_some(PV_CMDLINE);
            let balloon = args.balloon.then(|| BALLOON_SLOT.cmdline_arg());
            let user: Vec<&str> = balloon
                .iter()
                .map(String::as_str)
                .chain(args.cmdline.as_deref())
                .collect();
            let (cmdline, defaults_len) = linux::compose_cmdline(extra, &user)?;
            let spec = LinuxBootSpec {
                kernel,
                initrd: args.initrd.clone(),
                cmdline,
                defaults_len,
                vcpus: args.vcpus,
            };
            let entry = linux::load(&mem, layout, &spec)?;
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
            (GuestKind::Linux, None)
        }
    };

    let flags = Arc::new(SerialFlags::default());
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| RunError::Os {
        what: "creating the serial irq eventfd",
        source,
    })?;
    vm.fd
        .register_irqfd(&irq, serial::COM1_IRQ)
        .map_err(|source| VmError::Kvm {
            op: "KVM_IRQFD (serial)",
            source,
        })?;
    let irq_clone = irq.try_clone().map_err(|source| RunError::Os {
        what: "cloning the serial irq eventfd",
        source,
    })?;
    let (serial_out, console) = serial_sink(args, flags.clone())?;
    let serial_dev = serial::new_serial(irq_clone, serial_out);

    let stats = match KvmStats::open(&vm.fd) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("KVM statistics unavailable: {e}");
            None
        }
    };

    let mirror_ctx = mirror::MirrorContext {
        mmu: crate::mmu_params::detect(&host),
        guest: image
            .as_ref()
            .map(crate::testguest::touch::GuestTouches::of),
    };
    let balloon_irq = if args.balloon {
        let e = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| RunError::Os {
            what: "creating the balloon irq eventfd",
            source,
        })?;
        vm.fd
            .register_irqfd(&e, BALLOON_SLOT.irq)
            .map_err(|source| VmError::Kvm {
                op: "KVM_IRQFD (balloon)",
                source,
            })?;
        Some(e)
    } else {
        None
    };

    // The machine holds its own view; ours must go before guest RAM does.
    drop(mem);
    let vcpu_fds = std::mem::take(&mut vm.vcpus);
    let machine = Arc::new(Machine::new(MachineParts {
        vcpus: vcpu_fds.len(),
        serial: serial_dev,
        serial_flags: flags,
        ram,
        test_device,
        host,
        kind,
        stats,
    }));

    machine.set_mirror_context(mirror_ctx);
    if let Some(e) = balloon_irq {
        let mut dev = BalloonDevice::new(
            Arc::downgrade(&machine),
            machine.mem.clone(),
            layout,
            Arc::new(IrqfdLine(e)),
            args.balloon_target,
            !args.no_free_page_reporting,
        )?;
        dev.set_split_policy(args.split_policy());
        log::info!("virtio-balloon at {}", BALLOON_SLOT.cmdline_arg());
        machine.set_balloon(Arc::new(dev));
    }
    let splitter = match args.split_policy() {
        SplitPolicy::Deferred { delay, max_wait } if args.balloon => {
            let s = DeferredSplitter::new(delay, max_wait);
            let h = s
                .spawn(Arc::downgrade(&machine))
                .map_err(|source| RunError::Os {
                    what: "spawning the deferred-split thread",
                    source,
                })?;
            Some((s, h))
        }
        _ => None,
    };
    let collapser = if args.no_collapser || !args.backing.has_huge_frames() {
        None
    } else {
        let c = Collapser::new(collapser_cfg);
        machine.set_collapser(c.clone());
        let h = c
            .spawn(Arc::downgrade(&machine))
            .map_err(|source| RunError::Os {
                what: "spawning the collapser thread",
                source,
            })?;
        Some((c, h))
    };
    let api = match &args.api_socket {
        Some(p) => Some(ApiServer::start(p, Arc::downgrade(&machine))?),
        None => None,
    };
    let host_memory_start = HostMemory::read(&machine.ram());

    let started = Instant::now();
    let mut handles = Vec::new();
    for (i, fd) in vcpu_fds.into_iter().enumerate() {
        let m = machine.clone();
        let h = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || crate::vcpu::run_vcpu(i, fd, m))
            .map_err(|source| RunError::Os {
                what: "spawning a vCPU thread",
                source,
            });
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                machine.control.stop(STOP_TIMEOUT);
                return Err(e);
            }
        }
    }

    let mut kvm_samples = Vec::new();
    let outcome = wait(
        &machine,
        args.timeout.map(Duration::from_secs_f64),
        started,
        &mut kvm_samples,
    );
    drop(api);
    if let Some((c, h)) = collapser {
        c.stop();
        if let Some(h) = h {
            if h.join().is_err() {
                log::error!("the collapser thread panicked");
            }
        }
    }
    if let Some((s, h)) = splitter {
        s.stop();
        if h.join().is_err() {
            log::error!("the deferred-split thread panicked");
        }
    }
    let stopped = machine.control.stop(STOP_TIMEOUT);
    if stopped {
        for h in handles {
            if h.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    } else {
        log::error!("vCPU threads did not stop within {STOP_TIMEOUT:?}");
    }
    let elapsed = started.elapsed();
    let console_stats = console.finish(CONSOLE_DRAIN);
    if console_stats.bytes_dropped > 0 {
        log::warn!(
            "guest console: {} bytes dropped (reader too slow or gone{})",
            console_stats.bytes_dropped,
            console_stats
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    let mut rep = report::collect(&machine, &vm, args, outcome, elapsed, host_memory_start);
    rep.console = console_stats;
    rep.kvm_samples = kvm_samples;
    drop(vm);
    Ok(rep)
}

/// The collapser's policy from the run configuration.
pub fn collapser_config(a: &RunConfig) -> CollapserConfig {
    CollapserConfig {
        khugepaged: thp::policy::Khugepaged {
            max_ptes_none: a.collapse_max_ptes_none,
            pages_to_scan: a.collapse_pages_to_scan,
            scan_sleep_ms: a.collapse_interval_ms,
            ..thp::policy::Khugepaged::default()
        },
        background: a.collapse_interval_ms > 0,
    }
}

/// Appends KVM's mapping counters now to `samples` (the last one is replaced
/// once [`MAX_KVM_SAMPLES`] are kept).
fn sample_kvm(m: &Machine, started: Instant, samples: &mut Vec<KvmSample>) {
    let Some(stats) = m.stats.as_ref() else {
        return;
    };
    match stats.mapping() {
        Ok(kvm) => {
            if samples.len() >= MAX_KVM_SAMPLES {
                samples.pop();
            }
            samples.push(KvmSample {
                seconds: started.elapsed().as_secs_f64(),
                kvm,
            });
        }
        Err(e) => log::warn!("sampling KVM stats: {e}"),
    }
}

fn wait(
    m: &Machine,
    timeout: Option<Duration>,
    started: Instant,
    samples: &mut Vec<KvmSample>,
) -> Outcome {
    let mut panic_seen: Option<Instant> = None;
    let mut halt = HaltTracker::default();
    let mut next_probe = Instant::now() + HALT_PROBE_INTERVAL;
    let mut next_sample = Instant::now();
    loop {
        if Instant::now() >= next_sample {
            next_sample = Instant::now() + KVM_SAMPLE_INTERVAL;
            sample_kvm(m, started, samples);
        }
        if let Some(o) = m.wait_outcome(Duration::from_millis(50)) {
            return o;
        }
        if let Some(sig) = crate::signals::received() {
            log::info!("{} received: stopping the VM", crate::signals::name(sig));
            m.finish(Outcome::Signal(sig));
            continue;
        }
        if let Some(t) = timeout {
            if started.elapsed() >= t {
                m.finish(Outcome::Timeout);
                continue;
            }
        }
        if m.serial_flags.panicked.load(Ordering::SeqCst) {
            let since = *panic_seen.get_or_insert_with(Instant::now);
            if since.elapsed() >= PANIC_GRACE {
                m.finish(Outcome::GuestPanic(
                    "the kernel panicked (see the serial output) and did not reset".into(),
                ));
            }
        }
        if m.kind == GuestKind::Linux && Instant::now() >= next_probe {
            next_probe = Instant::now() + HALT_PROBE_INTERVAL;
            if halt.step(&m.halt, || m.control.kick()) {
                m.finish(Outcome::Halted(halt_reason(m)));
            }
        }
    }
}

/// What the VMM saw of a guest that halted for good.
fn halt_reason(m: &Machine) -> String {
    let all = "every vCPU executes hlt with interrupts disabled";
    if m.serial_flags.halting.load(Ordering::SeqCst) {
        format!(
            "the kernel printed `{}` (a power-off without a power-off method) and {all}",
            serial::HALT_MARKER
        )
    } else {
        all.to_string()
    }
}
