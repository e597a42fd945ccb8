//! `vmm run`: create guest RAM and the VM, load a kernel or a test guest, run
//! the vCPUs until the guest ends, then report.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_mem::{GuestMemError, SplitPolicy, HPAGE_SIZE};

use crate::api::ApiServer;
use crate::balloon_backend::BALLOON_SLOT;
use crate::boot::linux::{self, LinuxBootSpec};
use crate::builder::{self, BalloonSpec, BuiltVm, GuestConfig, SerialConfig, VmConfig};
use crate::collapser::{Collapser, CollapserConfig};
use crate::config::RunConfig;
use crate::deferred_split::DeferredSplitter;
use crate::devices::console::{Console, ConsoleStats};
use crate::devices::serial;
use crate::halt::HaltTracker;
use crate::host::{HostInfo, PV_CMDLINE};
use crate::input_file;
use crate::machine::{GuestKind, Machine};
use crate::outcome::Outcome;
use crate::output_path;
use crate::report::{self, RunReport};
use crate::snapshot::HostMemory;
use crate::split_reserve::{self, SplitReserve};
use crate::stats::KvmSample;
use crate::testguest::{self, TestGuestName, TestGuestParams};

pub use crate::builder::RunError;

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

/// Every check of `a` and the VM it describes, without KVM: sizes, files,
/// options, the test guest assembled (its arguments checked) or the kernel
/// command line composed.
pub fn vm_config(a: &RunConfig) -> Result<VmConfig, RunError> {
    check_args(a)?;
    let host = HostInfo::detect();
    log::info!("host: {:?}", host);
    let guest = guest_config(a, &host)?;
    Ok(VmConfig {
        kvm_dev: a.kvm_dev.clone(),
        memory: a.memory,
        memslot_size: a.memslot_size,
        vcpus: a.vcpus,
        backing: a.backing,
        khugepaged: Some(collapser_config(a).khugepaged),
        guest,
        serial: SerialConfig::Console(serial_out(a)?),
        balloon: a.balloon.then(|| BalloonSpec {
            target: a.balloon_target,
            free_page_reporting: !a.no_free_page_reporting,
            split_policy: a.split_policy(),
        }),
        host,
    })
}

/// The serial console's writer: stdout, or the `--serial` file (a regular
/// file or a character device; created or truncated now, before KVM).
fn serial_out(a: &RunConfig) -> Result<Box<dyn std::io::Write + Send>, RunError> {
    if a.serial == "stdout" {
        return Ok(Box::new(std::io::stdout()));
    }
    let path = std::path::Path::new(&a.serial);
    Ok(Box::new(input_file::create_output("--serial", path)?))
}

/// The test guest assembled, or the Linux boot spec with its command line.
fn guest_config(a: &RunConfig, host: &HostInfo) -> Result<GuestConfig, RunError> {
    if let Some(name) = a.test_guest {
        let mut p = TestGuestParams::new(name, a.memory);
        p.vcpus = usize::from(a.vcpus);
        p.guest_pages = a.guest_pages;
        if let Some(g) = a.generations {
            if name != TestGuestName::Verify {
                return Err(RunError::Usage(format!(
                    "--generations {g}: only the verify test guest takes generations \
                     (--test-guest {name} does not); drop the option"
                )));
            }
            p.generations = g;
        }
        p.args = a.guest_arg_map();
        return Ok(GuestConfig::Test(Box::new(testguest::build(&p)?)));
    }
    let kernel = a
        .kernel
        .clone()
        .ok_or_else(|| RunError::Usage("either --kernel or --test-guest is required".into()))?;
    let extra = host.needs_emulator_workarounds().then_some(PV_CMDLINE);
    let balloon = a.balloon.then(|| BALLOON_SLOT.cmdline_arg());
    let user: Vec<&str> = balloon
        .iter()
        .map(String::as_str)
        .chain(a.cmdline.as_deref())
        .collect();
    let (cmdline, defaults_len) = linux::compose_cmdline(extra, &user)?;
    let spec = LinuxBootSpec {
        kernel,
        initrd: a.initrd.clone(),
        cmdline,
        defaults_len,
        vcpus: a.vcpus,
    };
    // What the kernel file is and whether it fits, before any guest memory.
    linux::check_kernel(guest_mem::RamLayout::new(a.memory)?, &spec)?;
    Ok(GuestConfig::Linux(spec))
}

/// Run per `args`; `Ok` carries the report of a run that started the guest.
pub fn run(args: &RunConfig) -> Result<RunReport, RunError> {
    crate::signals::install().map_err(|source| RunError::Os {
        what: "installing the SIGINT/SIGTERM/SIGHUP handler",
        source,
    })?;
    let config = vm_config(args)?;
    let BuiltVm {
        mut vm,
        machine,
        console,
        ..
    } = builder::build_vm(config)?;
    let services = Services::start(args, &machine)?;
    let host_memory_start = HostMemory::read(&machine.ram());

    let started = Instant::now();
    let m = machine.clone();
    let body = move |i, fd| crate::vcpu::run_vcpu(i, fd, m.clone());
    let handles =
        builder::spawn_vcpus(&mut vm, &machine.control, STOP_TIMEOUT, body).map_err(|source| {
            RunError::Os {
                what: "spawning a vCPU thread",
                source,
            }
        })?;

    let mut kvm_samples = Vec::new();
    let timeout = args.timeout.map(Duration::from_secs_f64);
    let outcome = wait(&machine, timeout, started, &mut kvm_samples);
    services.stop();
    stop_vcpus(&machine, handles);
    let elapsed = started.elapsed();
    let mut rep = report::collect(&machine, &vm, args, outcome, elapsed, host_memory_start);
    rep.console = finish_console(console);
    rep.kvm_samples = kvm_samples;
    drop(vm);
    Ok(rep)
}

/// The threads a `vmm run` starts beside the vCPUs: the deferred splitter,
/// the collapser and the API server.
struct Services {
    api: Option<ApiServer>,
    collapser: Option<(Arc<Collapser>, Option<JoinHandle<()>>)>,
    splitter: Option<(Arc<DeferredSplitter>, JoinHandle<()>)>,
    reserve: Option<split_reserve::Running>,
}

impl Services {
    /// Start the services `args` asks for on `machine`.
    fn start(args: &RunConfig, machine: &Arc<Machine>) -> Result<Services, RunError> {
        let os = |what| move |source| RunError::Os { what, source };
        let splitter = match args.split_policy() {
            SplitPolicy::Deferred { delay, max_wait } if args.balloon => {
                let s = DeferredSplitter::new(delay, max_wait);
                let h = s
                    .spawn(Arc::downgrade(machine))
                    .map_err(os("spawning the deferred-split thread"))?;
                Some((s, h))
            }
            _ => None,
        };
        let collapser = if args.no_collapser || !args.backing.has_huge_frames() {
            None
        } else {
            let c = Collapser::new(collapser_config(args));
            machine.set_collapser(c.clone());
            let h = c
                .spawn(Arc::downgrade(machine))
                .map_err(os("spawning the collapser thread"))?;
            Some((c, h))
        };
        let reserve = SplitReserve::start_for(
            split_reserve::ReserveSizes {
                split_blocks: args.split_reserve as usize,
                huge_pages: args.collapse_reserve as usize,
            },
            args.backing,
            machine,
        )
        .map_err(os("spawning the split-reserve thread"))?;
        if let Some(r) = &reserve {
            machine.set_split_reserve(Arc::clone(r.worker()));
        }
        let api = match &args.api_socket {
            Some(p) => Some(ApiServer::start(p, Arc::downgrade(machine))?),
            None => None,
        };
        Ok(Services {
            api,
            collapser,
            splitter,
            reserve,
        })
    }

    /// Stop them: the API first (no new requests), then the workers.
    fn stop(self) {
        drop(self.api);
        if let Some((c, h)) = self.collapser {
            c.stop();
            if h.is_some_and(|h| h.join().is_err()) {
                log::error!("the collapser thread panicked");
            }
        }
        if let Some((s, h)) = self.splitter {
            s.stop();
            if h.join().is_err() {
                log::error!("the deferred-split thread panicked");
            }
        }
        if let Some(r) = self.reserve {
            r.shutdown();
        }
    }
}

/// Stop the vCPU threads and join them.
fn stop_vcpus(m: &Machine, handles: Vec<JoinHandle<()>>) {
    if m.control.stop(STOP_TIMEOUT) {
        for h in handles {
            if h.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    } else {
        log::error!("vCPU threads did not stop within {STOP_TIMEOUT:?}");
    }
}

/// Let the console's reader take the last bytes; what it dropped is logged.
fn finish_console(console: Option<Console>) -> ConsoleStats {
    let Some(console) = console else {
        return ConsoleStats::default();
    };
    let stats = console.finish(CONSOLE_DRAIN);
    if stats.bytes_dropped > 0 {
        log::warn!(
            "guest console: {} bytes dropped (reader too slow or gone{})",
            stats.bytes_dropped,
            stats
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    stats
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
