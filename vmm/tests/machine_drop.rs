//! Dropping a `Machine` with a virtio-balloon: guest RAM must go last, after
//! every vm-memory view of it (the balloon's included), or guest-mem warns
//! that views are alive and leaks the address range. No KVM needed.

use std::sync::{Arc, Mutex};

use guest_mem::{Backing, GuestRam, GuestRamConfig};
use vmm::balloon_backend::{BalloonDevice, IrqfdLine};
use vmm::devices::serial::{self, SerialFlags, SerialOut};
use vmm::host::HostInfo;
use vmm::machine::{GuestKind, Machine, MachineParts};
use vmm_sys_util::eventfd::EventFd;

static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            LOGS.lock().unwrap().push(r.args().to_string());
        }
    }
    fn flush(&self) {}
}

static LOGGER: Capture = Capture;

#[test]
fn machine_with_a_balloon_drops_without_leaking_guest_ram() {
    log::set_logger(&LOGGER).unwrap();
    log::set_max_level(log::LevelFilter::Warn);
    let size = 64 << 20;
    let ram = GuestRam::new(&GuestRamConfig::new(size, Backing::Small4k)).unwrap();
    let flags = Arc::new(SerialFlags::default());
    let serial = serial::new_serial(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        SerialOut::new(Box::new(std::io::sink()), flags.clone()),
    );
    let machine = Arc::new(Machine::new(MachineParts {
        vcpus: 1,
        serial,
        serial_flags: flags,
        ram,
        test_device: None,
        host: HostInfo::detect(),
        kind: GuestKind::Linux,
        stats: None,
    }));
    let dev = BalloonDevice::new(
        Arc::downgrade(&machine),
        machine.mem.clone(),
        guest_mem::RamLayout::new(size).unwrap(),
        Arc::new(IrqfdLine(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        Some(32 << 20),
        true,
    )
    .unwrap();
    machine.set_balloon(Arc::new(dev));
    assert_eq!(Arc::strong_count(&machine), 1);
    drop(machine);
    let logs = LOGS.lock().unwrap();
    assert!(
        !logs.iter().any(|l| l.contains("leaking the address range")),
        "{logs:?}"
    );
}
