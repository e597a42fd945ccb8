//! The virtio-balloon device over virtio-mmio, driven the way a guest driver
//! drives it: registers through `MmioTransport::read/write`, rings and
//! buffers written into an anonymous `GuestMemoryMmap`. No KVM needed.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio_balloon::{
    tag, Balloon, BalloonBackend, BalloonConfig, F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT,
    F_MUST_TELL_HOST, F_REPORTING, F_STATS_VQ,
};
use vmm::devices::virtio_mmio::{
    cmdline_arg, Interrupt, MmioTransport, VirtioDevice, INT_CONFIG, INT_VRING, MMIO_SIZE,
};

const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const PAGE: u64 = 4096;

// ---------------------------------------------------------------------------
// Log capture: warnings emitted on this thread while `capture_logs` runs.

struct CaptureLogger;

thread_local! {
    static CAPTURE: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

impl log::Log for CaptureLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if r.level() <= log::Level::Warn {
            CAPTURE.with(|c| {
                if let Some(v) = c.borrow_mut().as_mut() {
                    v.push(r.args().to_string());
                }
            });
        }
    }
    fn flush(&self) {}
}

static LOGGER: CaptureLogger = CaptureLogger;

fn capture_logs<R>(f: impl FnOnce() -> R) -> (R, Vec<String>) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Warn);
    CAPTURE.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let r = f();
    let logs = CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (r, logs)
}

fn logged(logs: &[String], needle: &str) -> bool {
    logs.iter().any(|l| l.contains(needle))
}

// ---------------------------------------------------------------------------
// Backend and interrupt line that record what they see.

#[derive(Default)]
struct Recorder {
    inflates: Vec<Vec<u64>>,
    deflates: Vec<Vec<u64>>,
    reports: Vec<(u64, u64)>,
    ram_pages: u64,
    /// Net inflated set as the backend sees it, to catch any double
    /// inflate / unknown deflate the device lets through.
    held: HashSet<u64>,
    violations: Vec<String>,
}

impl Recorder {
    fn new(ram_size: u64) -> Self {
        Recorder {
            ram_pages: ram_size / PAGE,
            ..Default::default()
        }
    }
}

impl BalloonBackend for Recorder {
    fn inflate(&mut self, pfns: &[u64]) {
        for &p in pfns {
            if p >= self.ram_pages {
                self.violations
                    .push(format!("inflate of out-of-range pfn {p:#x}"));
            }
            if !self.held.insert(p) {
                self.violations
                    .push(format!("double inflate of pfn {p:#x}"));
            }
        }
        self.inflates.push(pfns.to_vec());
    }
    fn deflate(&mut self, pfns: &[u64]) {
        for &p in pfns {
            if !self.held.remove(&p) {
                self.violations
                    .push(format!("deflate of pfn {p:#x} not inflated"));
            }
        }
        self.deflates.push(pfns.to_vec());
    }
    fn report_free(&mut self, gpa: u64, len: u64) {
        let end = gpa.checked_add(len);
        if (gpa | len) & (PAGE - 1) != 0 || !matches!(end, Some(e) if e <= self.ram_pages * PAGE) {
            self.violations
                .push(format!("bad report {gpa:#x}+{len:#x}"));
        }
        self.reports.push((gpa, len));
    }
}

#[derive(Default)]
struct IrqLog(Mutex<Vec<u32>>);

impl Interrupt for IrqLog {
    fn trigger(&self, status_bits: u32) {
        self.0.lock().unwrap().push(status_bits);
    }
}

impl IrqLog {
    fn count(&self, bit: u32) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|&&b| b & bit != 0)
            .count()
    }
}

// ---------------------------------------------------------------------------
// A guest driver: register access and split rings in guest memory.

/// Ring layout of queue `i`: desc at QBASE + i*QSTRIDE, avail +0x1000, used +0x2000.
const QBASE: u64 = 0x1_0000;
const QSTRIDE: u64 = 0x4000;
/// Where buffers go.
const BUF: u64 = 0x10_0000;

struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

struct Driver {
    t: MmioTransport<Balloon<Recorder>>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqLog>,
    queues: Vec<Option<DriverQueue>>,
    next_buf: u64,
}

impl Driver {
    fn new(cfg: BalloonConfig) -> Driver {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), cfg.ram_size as usize)])
            .expect("anonymous guest memory");
        let irq = Arc::new(IrqLog::default());
        let balloon = Balloon::new(cfg, Recorder::new(cfg.ram_size)).expect("balloon");
        let t = MmioTransport::new(balloon, mem.clone(), irq.clone());
        Driver {
            t,
            mem,
            irq,
            queues: (0..8).map(|_| None).collect(),
            next_buf: BUF,
        }
    }

    fn r32(&self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&mut self, reg: u32, v: u32) {
        self.t.write(u64::from(reg), &v.to_le_bytes());
    }

    fn status(&self) -> u32 {
        self.r32(VIRTIO_MMIO_STATUS)
    }

    fn device_features(&mut self) -> u64 {
        self.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(VIRTIO_MMIO_DEVICE_FEATURES);
        self.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = self.r32(VIRTIO_MMIO_DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// ACKNOWLEDGE, DRIVER, write features, FEATURES_OK; returns whether the
    /// device kept FEATURES_OK.
    fn negotiate(&mut self, features: u64) -> bool {
        self.w32(VIRTIO_MMIO_STATUS, 0);
        self.w32(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.w32(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.w32(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        self.status() & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    /// Program queue `i` with `size` and try to make it ready; returns the
    /// QueueReady read-back.
    fn setup_queue(&mut self, i: u32, size: u32) -> bool {
        let base = QBASE + u64::from(i) * QSTRIDE;
        self.w32(VIRTIO_MMIO_QUEUE_SEL, i);
        self.w32(VIRTIO_MMIO_QUEUE_NUM, size);
        for (lo, hi, addr) in [
            (
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                base,
            ),
            (
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                base + 0x1000,
            ),
            (
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
                base + 0x2000,
            ),
        ] {
            self.w32(lo, addr as u32);
            self.w32(hi, (addr >> 32) as u32);
        }
        self.w32(VIRTIO_MMIO_QUEUE_READY, 1);
        let ready = self.r32(VIRTIO_MMIO_QUEUE_READY) == 1;
        if ready {
            self.queues[i as usize] = Some(DriverQueue {
                size: size as u16,
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                next_desc: 0,
                avail_idx: 0,
            });
        }
        ready
    }

    fn driver_ok(&mut self) {
        let s = self.status();
        self.w32(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    /// Full bring-up with `features` and all of their queues.
    fn bring_up(&mut self, features: u64) {
        assert!(self.negotiate(features), "FEATURES_OK refused");
        let nq = 2 + u32::from(features & F_STATS_VQ != 0) + u32::from(features & F_REPORTING != 0);
        for i in 0..nq {
            assert!(self.setup_queue(i, 256), "queue {i} not ready");
        }
        self.driver_ok();
        assert_eq!(self.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(self.t.is_activated());
    }

    /// Copy `bytes` to fresh buffer space; returns its gpa.
    fn put(&mut self, bytes: &[u8]) -> u64 {
        let at = self.next_buf;
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        self.next_buf += (bytes.len() as u64).div_ceil(64).max(1) * 64;
        at
    }

    fn put_pfns(&mut self, pfns: &[u32]) -> u64 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.put(&bytes)
    }

    /// Write raw descriptor `idx` of queue `q`.
    fn write_desc(&self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let dq = self.queues[q].as_ref().unwrap();
        let at = dq.desc + u64::from(idx) * 16;
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Make `head` available on queue `q` (no notify).
    fn publish(&mut self, q: usize, head: u16) {
        let dq = self.queues[q].as_mut().unwrap();
        let slot = dq.avail + 4 + u64::from(dq.avail_idx % dq.size) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(dq.avail_idx, GuestAddress(dq.avail + 2))
            .unwrap();
    }

    /// Chain `bufs` (gpa, len, device-writable) into fresh descriptors and
    /// publish the chain; returns its head.
    fn add_chain(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let (size, first) = {
            let dq = self.queues[q].as_ref().unwrap();
            (dq.size, dq.next_desc)
        };
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (first + k as u16) % size;
            let last = k + 1 == bufs.len();
            let flags = if last { 0 } else { VRING_DESC_F_NEXT as u16 }
                | if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            self.write_desc(q, idx, addr, len, flags, (idx + 1) % size);
        }
        self.queues[q].as_mut().unwrap().next_desc = (first + bufs.len() as u16) % size;
        self.publish(q, first);
        first
    }

    fn kick(&mut self, q: u32) {
        self.w32(VIRTIO_MMIO_QUEUE_NOTIFY, q);
    }

    fn used_idx(&self, q: usize) -> u16 {
        let dq = self.queues[q].as_ref().unwrap();
        self.mem.read_obj(GuestAddress(dq.used + 2)).unwrap()
    }

    fn used_elem(&self, q: usize, i: u16) -> (u32, u32) {
        let dq = self.queues[q].as_ref().unwrap();
        let at = dq.used + 4 + u64::from(i % dq.size) * 8;
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn inflate(&mut self, pfns: &[u32]) {
        let at = self.put_pfns(pfns);
        self.add_chain(0, &[(at, (pfns.len() * 4) as u32, false)]);
        self.kick(0);
    }

    fn deflate(&mut self, pfns: &[u32]) {
        let at = self.put_pfns(pfns);
        self.add_chain(1, &[(at, (pfns.len() * 4) as u32, false)]);
        self.kick(1);
    }

    fn config32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(0x100 + off, &mut b);
        u32::from_le_bytes(b)
    }

    fn backend(&self) -> &Recorder {
        self.t.device().backend()
    }
}

const MB: u64 = 1 << 20;

// ---------------------------------------------------------------------------

#[test]
fn registers_identify_a_modern_balloon() {
    let mut d = Driver::new(BalloonConfig::new(64 * MB));
    assert_eq!(d.r32(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(d.r32(VIRTIO_MMIO_VERSION), 2);
    assert_eq!(d.r32(VIRTIO_MMIO_DEVICE_ID), 5);
    let f = d.device_features();
    assert_eq!(f, VERSION_1 | F_MUST_TELL_HOST | F_STATS_VQ | F_REPORTING);
    assert_eq!(f & F_FREE_PAGE_HINT, 0);
    for q in 0..4 {
        d.w32(VIRTIO_MMIO_QUEUE_SEL, q);
        assert_eq!(d.r32(VIRTIO_MMIO_QUEUE_NUM_MAX), 256, "queue {q}");
    }
    d.w32(VIRTIO_MMIO_QUEUE_SEL, 4);
    assert_eq!(d.r32(VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    // No shared memory regions.
    assert_eq!(d.r32(VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);

    let mut oom = BalloonConfig::new(64 * MB);
    oom.deflate_on_oom = true;
    oom.stats = false;
    let mut d2 = Driver::new(oom);
    assert_eq!(
        d2.device_features(),
        VERSION_1 | F_MUST_TELL_HOST | F_DEFLATE_ON_OOM | F_REPORTING
    );
    d2.w32(VIRTIO_MMIO_QUEUE_SEL, 3);
    assert_eq!(d2.r32(VIRTIO_MMIO_QUEUE_NUM_MAX), 0);

    assert_eq!(MMIO_SIZE, 0x200);
    assert_eq!(
        cmdline_arg(0x1000, 0xd000_0000, 5),
        "virtio_mmio.device=4K@0xd0000000:5"
    );
}

#[test]
fn feature_negotiation_refuses_what_is_not_offered() {
    let mut d = Driver::new(BalloonConfig::new(64 * MB));
    let ((), logs) = capture_logs(|| {
        assert!(!d.negotiate(VERSION_1 | F_FREE_PAGE_HINT));
        assert!(!d.negotiate(F_STATS_VQ), "legacy (no VERSION_1) accepted");
    });
    assert!(logged(&logs, "does not offer"), "{logs:?}");
    assert!(logged(&logs, "VIRTIO_F_VERSION_1"), "{logs:?}");
    assert!(d.negotiate(VERSION_1 | F_STATS_VQ));
    assert_eq!(d.t.acked_features(), VERSION_1 | F_STATS_VQ);
    // DRIVER_OK without a ready inflate queue: needs reset, config interrupt.
    let ((), logs) = capture_logs(|| d.driver_ok());
    assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(!d.t.is_activated());
    assert!(logged(&logs, "inflate"), "{logs:?}");
    assert_eq!(d.irq.count(INT_CONFIG), 1);
    // Reset clears it and a full bring-up works.
    d.bring_up(VERSION_1 | F_STATS_VQ | F_REPORTING);
}

#[test]
fn config_space_target_actual_and_config_interrupt() {
    let mut d = Driver::new(BalloonConfig::new(64 * MB));
    assert_eq!(d.t.device_mut().set_target(100), 100);
    let gen0 = d.r32(VIRTIO_MMIO_CONFIG_GENERATION);
    assert_eq!(
        gen0, 1,
        "set_target before the driver runs bumps the generation"
    );
    assert_eq!(d.irq.count(INT_CONFIG), 0, "no interrupt before DRIVER_OK");
    d.bring_up(VERSION_1 | F_STATS_VQ);
    assert_eq!(d.config32(0), 100);
    // Driver writes actual (offset 4); num_pages is read-only.
    d.t.write(0x104, &42u32.to_le_bytes());
    d.t.write(0x100, &7u32.to_le_bytes());
    assert_eq!(d.config32(4), 42);
    assert_eq!(d.t.device().actual(), 42);
    assert_eq!(d.config32(0), 100);
    // Byte-wise config reads.
    let mut b = [0u8; 1];
    d.t.read(0x104, &mut b);
    assert_eq!(b[0], 42);

    // Target clamped to RAM; config interrupt raised and acknowledged.
    let ram_pages = (64 * MB / PAGE) as u32;
    assert_eq!(d.t.device_mut().set_target(1 << 40), ram_pages);
    assert_eq!(d.config32(0), ram_pages);
    assert_eq!(d.irq.count(INT_CONFIG), 1);
    assert_eq!(d.r32(VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
    assert_eq!(d.r32(VIRTIO_MMIO_CONFIG_GENERATION), gen0 + 1);
    d.w32(VIRTIO_MMIO_INTERRUPT_ACK, INT_CONFIG);
    assert_eq!(d.r32(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn inflate_and_deflate_reach_the_backend_exactly() {
    let mut d = Driver::new(BalloonConfig::new(64 * MB));
    d.bring_up(VERSION_1 | F_STATS_VQ | F_REPORTING);
    d.inflate(&[1, 2, 3, 100, 16383]);
    assert_eq!(d.backend().inflates, vec![vec![1, 2, 3, 100, 16383]]);
    assert_eq!(d.used_idx(0), 1);
    assert_eq!(d.used_elem(0, 0), (0, 0));
    assert_eq!(d.r32(VIRTIO_MMIO_INTERRUPT_STATUS) & INT_VRING, INT_VRING);
    assert_eq!(d.irq.count(INT_VRING), 1);
    assert_eq!(d.t.device().inflated_pages(), 5);

    // A chain of two buffers: both arrays count.
    let a = d.put_pfns(&[10, 11]);
    let b = d.put_pfns(&[12]);
    let head = d.add_chain(0, &[(a, 8, false), (b, 4, false)]);
    d.kick(0);
    assert_eq!(d.backend().inflates[1], vec![10, 11, 12]);
    assert_eq!(d.used_elem(0, 1).0, u32::from(head));

    d.deflate(&[2, 100, 11]);
    assert_eq!(d.backend().deflates, vec![vec![2, 100, 11]]);
    assert_eq!(d.used_idx(1), 1);
    assert!(d.t.device().is_inflated(1) && !d.t.device().is_inflated(2));
    assert_eq!(d.t.device().inflated_pages(), 5);
    assert!(d.backend().violations.is_empty());
    let c = d.t.device().counters();
    assert_eq!((c.inflated_pfns, c.deflated_pfns), (8, 3));
}

#[test]
fn bad_pfns_are_logged_and_skipped_while_the_rest_is_processed() {
    let mut d = Driver::new(BalloonConfig::new(64 * MB)); // 16384 pages
    d.bring_up(VERSION_1);
    let ((), logs) = capture_logs(|| d.inflate(&[5, 16384, 5, 6, 0xffff_ffff]));
    assert_eq!(d.backend().inflates, vec![vec![5, 6]]);
    assert_eq!(d.used_idx(0), 1, "used ring advanced despite bad elements");
    assert!(logged(&logs, "PFN 0x4000 is outside guest RAM"), "{logs:?}");
    assert!(
        logged(&logs, "PFN 0xffffffff is outside guest RAM"),
        "{logs:?}"
    );
    assert!(logged(&logs, "PFN 0x5 is already inflated"), "{logs:?}");

    let ((), logs) = capture_logs(|| d.inflate(&[6, 7]));
    assert_eq!(d.backend().inflates[1], vec![7]);
    assert!(logged(&logs, "PFN 0x6 is already inflated"), "{logs:?}");

    let ((), logs) = capture_logs(|| d.deflate(&[5, 9, 7, 5]));
    assert_eq!(d.backend().deflates, vec![vec![5, 7]]);
    assert!(logged(&logs, "PFN 0x9 was never inflated"), "{logs:?}");
    assert!(logged(&logs, "PFN 0x5 was never inflated"), "{logs:?}");
    assert_eq!(d.used_idx(1), 1);

    // A trailing partial element is ignored with a warning.
    let at = d.put(&[8, 0, 0, 0, 9, 0]);
    d.add_chain(0, &[(at, 6, false)]);
    let ((), logs) = capture_logs(|| d.kick(0));
    assert_eq!(d.backend().inflates[2], vec![8]);
    assert!(logged(&logs, "not a multiple of 4"), "{logs:?}");

    let c = d.t.device().counters();
    assert_eq!(c.pfn_out_of_range, 2);
    assert_eq!(c.pfn_already_inflated, 2);
    assert_eq!(c.pfn_not_inflated, 2);
    assert_eq!(d.t.device().inflated_pages(), 2); // 6 and 8
    assert!(d.backend().violations.is_empty());
    assert_eq!(
        d.status() & VIRTIO_CONFIG_S_NEEDS_RESET,
        0,
        "guest keeps running"
    );
}

/// RAM above the 32-bit MMIO hole (5 GiB of RAM: gpa [0, 3G) and
/// [4G, 6G)): PFNs above 4 GiB inflate and deflate, PFNs and reported runs
/// in the hole are refused with a logged reason.
#[test]
fn pfns_above_4g_are_ram_and_the_hole_is_not() {
    const G: u64 = 1 << 30;
    let cfg = BalloonConfig {
        hole: Some((3 * G, 4 * G)),
        ..BalloonConfig::new(6 * G)
    };
    let mut d = Driver::new(cfg);
    d.bring_up(VERSION_1 | F_REPORTING);
    let (hole, high, last) = (
        (3 * G / PAGE) as u32,
        (4 * G / PAGE) as u32,
        (6 * G / PAGE - 1) as u32,
    );
    let ((), logs) = capture_logs(|| d.inflate(&[high, hole, last, hole + 5, 7]));
    assert_eq!(
        d.backend().inflates,
        vec![vec![u64::from(high), u64::from(last), 7]]
    );
    assert!(
        logged(&logs, &format!("PFN {hole:#x} is outside guest RAM")),
        "{logs:?}"
    );
    assert_eq!(d.t.device().counters().pfn_out_of_range, 2);
    d.deflate(&[high]);
    assert_eq!(d.backend().deflates, vec![vec![u64::from(high)]]);
    // Free page reporting: a run above 4 GiB goes through, one in the hole
    // (or straddling its start) does not.
    // (Reporting is queue 2 without the stats queue.)
    for (gpa, len) in [
        (4 * G + 2 * MB, 2 * MB),
        (3 * G, 4096),
        (3 * G - 4096, 8192),
    ] {
        d.add_chain(2, &[(gpa, len as u32, true)]);
    }
    let ((), logs) = capture_logs(|| d.kick(2));
    assert_eq!(d.backend().reports, vec![(4 * G + 2 * MB, 2 * MB)]);
    assert!(logged(&logs, "not guest RAM"), "{logs:?}");
    assert_eq!(d.t.device().counters().runs_rejected, 2);
    assert!(
        d.backend().violations.is_empty(),
        "{:?}",
        d.backend().violations
    );
}

#[test]
fn malformed_chains_are_rejected_and_the_queue_keeps_going() {
    let mut d = Driver::new(BalloonConfig::new(64 * MB));
    d.bring_up(VERSION_1);
    let pfns = d.put_pfns(&[40, 41]);
    let good = d.put_pfns(&[50]);
    // Chain 0: 0 -> 1 -> 0 (loop).
    d.write_desc(0, 0, pfns, 4, VRING_DESC_F_NEXT as u16, 1);
    d.write_desc(0, 1, pfns + 4, 4, VRING_DESC_F_NEXT as u16, 0);
    d.publish(0, 0);
    // Chain 2: buffer past the end of guest RAM.
    d.write_desc(0, 2, 64 * MB - 4, 8, 0, 0);
    d.publish(0, 2);
    // Chain 3: next index past the table.
    d.write_desc(0, 3, pfns, 4, VRING_DESC_F_NEXT as u16, 300);
    d.publish(0, 3);
    // Chain 4: a good one.
    d.write_desc(0, 4, good, 4, 0, 0);
    d.publish(0, 4);
    // Head index past the table.
    d.publish(0, 999);
    let ((), logs) = capture_logs(|| d.kick(0));
    assert!(
        logged(&logs, "loops or is longer than the queue"),
        "{logs:?}"
    );
    assert!(logged(&logs, "outside guest memory"), "{logs:?}");
    assert!(logged(&logs, "past the descriptor table"), "{logs:?}");
    assert_eq!(d.backend().inflates, vec![vec![50]]);
    // Every chain with a valid head went to the used ring, in order.
    assert_eq!(d.used_idx(0), 4);
    let heads: Vec<u32> = (0..4).map(|i| d.used_elem(0, i).0).collect();
    assert_eq!(heads, vec![0, 2, 3, 4]);
    assert_eq!(d.t.device().counters().chains_rejected, 4);
    assert_eq!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);

    // An available index more than a queue ahead is refused as a whole.
    let before = d.backend().inflates.len();
    d.mem
        .write_obj(
            d.used_idx(0).wrapping_add(1000),
            GuestAddress(QBASE + 0x1002),
        )
        .unwrap();
    let ((), logs) = capture_logs(|| d.kick(0));
    assert!(logged(&logs, "available ring"), "{logs:?}");
    assert_eq!(d.backend().inflates.len(), before);
}

#[test]
fn bad_queue_sizes_and_placements_are_rejected() {
    let mut d = Driver::new(BalloonConfig::new(64 * MB));
    assert!(d.negotiate(VERSION_1));
    for bad in [100u32, 0, 512, 0x1_0000] {
        let ((), logs) = capture_logs(|| assert!(!d.setup_queue(0, bad), "size {bad} accepted"));
        assert!(logged(&logs, "rejected"), "{bad}: {logs:?}");
        assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(d.negotiate(VERSION_1), "reset clears NEEDS_RESET");
    }
    // Rings outside guest memory or misaligned.
    d.w32(VIRTIO_MMIO_QUEUE_SEL, 1);
    d.w32(VIRTIO_MMIO_QUEUE_NUM, 16);
    d.w32(VIRTIO_MMIO_QUEUE_DESC_LOW, 0);
    d.w32(VIRTIO_MMIO_QUEUE_DESC_HIGH, 1); // 4 GiB: not RAM
    d.w32(VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
    d.w32(VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
    d.w32(VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(d.r32(VIRTIO_MMIO_QUEUE_READY), 0);
    assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(d.negotiate(VERSION_1));
    d.w32(VIRTIO_MMIO_QUEUE_SEL, 1);
    d.w32(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1008); // not 16-byte aligned
    d.w32(VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
    d.w32(VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
    d.w32(VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(d.r32(VIRTIO_MMIO_QUEUE_READY), 0);
    // DRIVER_OK on a device that needs reset does not activate it.
    d.driver_ok();
    assert!(!d.t.is_activated());
    // Power-of-two sizes below the maximum are fine.
    assert!(d.negotiate(VERSION_1));
    assert!(d.setup_queue(0, 1));
    assert!(d.setup_queue(1, 128));
    d.driver_ok();
    assert!(d.t.is_activated());
    d.inflate(&[3]);
    assert_eq!(d.backend().inflates, vec![vec![3]]);
}

#[test]
fn reporting_queue_discards_runs() {
    // Without stats, reporting is queue 2 (queue indices follow features).
    let mut d = Driver::new(BalloonConfig::new(64 * MB));
    d.bring_up(VERSION_1 | F_REPORTING);
    d.add_chain(
        2,
        &[
            (2 * MB, 2 * MB as u32, true),
            (6 * MB, 4096, true),
            (8 * MB + 512, 4096, true),
        ],
    );
    let ((), logs) = capture_logs(|| d.kick(2));
    assert_eq!(d.backend().reports, vec![(2 * MB, 2 * MB), (6 * MB, 4096)]);
    assert!(logged(&logs, "not 4K aligned"), "{logs:?}");
    assert_eq!(d.used_idx(2), 1);
    let c = d.t.device().counters();
    assert_eq!(
        (c.reported_runs, c.reported_bytes, c.runs_rejected),
        (2, 2 * MB + 4096, 1)
    );

    // With stats, reporting moves to queue 3; queue 2 is stats.
    let mut d = Driver::new(BalloonConfig::new(64 * MB));
    d.bring_up(VERSION_1 | F_STATS_VQ | F_REPORTING);
    d.add_chain(3, &[(4 * MB, 2 * MB as u32, true)]);
    d.kick(3);
    assert_eq!(d.backend().reports, vec![(4 * MB, 2 * MB)]);
    assert!(d.backend().inflates.is_empty());
}

fn stats_buf(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect()
}

#[test]
fn stats_queue_keeps_last_values_and_returns_the_buffer_on_request() {
    let mut d = Driver::new(BalloonConfig::new(64 * MB));
    assert!(d.negotiate(VERSION_1 | F_STATS_VQ));
    for q in 0..3 {
        assert!(d.setup_queue(q, 64));
    }
    // Like Linux: the first stats buffer is queued and kicked before DRIVER_OK.
    let buf = d.put(&stats_buf(&[
        (tag::MEMFREE, 10 << 20),
        (tag::MEMTOT, 64 << 20),
    ]));
    let head = d.add_chain(2, &[(buf, 20, false)]);
    d.kick(2);
    assert_eq!(
        d.t.device().stats().updates,
        0,
        "not processed before DRIVER_OK"
    );
    d.driver_ok();
    let s = d.t.device().stats();
    assert_eq!(s.get(tag::MEMFREE), Some(10 << 20));
    assert_eq!(s.get(tag::MEMTOT), Some(64 << 20));
    assert_eq!(d.used_idx(2), 0, "device holds the stats buffer");

    assert!(d.t.device_mut().request_stats());
    assert_eq!(d.used_idx(2), 1);
    assert_eq!(d.used_elem(2, 0).0, u32::from(head));
    assert_eq!(d.irq.count(INT_VRING), 1);
    assert!(!d.t.device_mut().request_stats(), "no buffer held any more");

    // Driver refills and re-queues.
    d.mem
        .write_slice(&stats_buf(&[(tag::MEMFREE, 3 << 20)]), GuestAddress(buf))
        .unwrap();
    d.add_chain(2, &[(buf, 10, false)]);
    d.kick(2);
    let s = d.t.device().stats();
    assert_eq!(s.get(tag::MEMFREE), Some(3 << 20));
    assert_eq!(s.get(tag::MEMTOT), Some(64 << 20), "last value kept");
    assert_eq!(s.updates, 2);
}

#[test]
fn reset_gives_every_inflated_page_back() {
    let mut d = Driver::new(BalloonConfig::new(64 * MB));
    d.bring_up(VERSION_1);
    d.inflate(&[9, 3, 700]);
    d.t.write(0x104, &3u32.to_le_bytes());
    d.w32(VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING);
    d.w32(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(d.status(), 0);
    assert!(!d.t.is_activated());
    assert_eq!(d.backend().deflates, vec![vec![3, 9, 700]]);
    assert_eq!(d.t.device().inflated_pages(), 0);
    assert_eq!(d.t.device().actual(), 0);
    assert!(d.backend().held.is_empty());
    // The same pages can be inflated again after a new bring-up.
    d.queues.iter_mut().for_each(|q| *q = None);
    d.bring_up(VERSION_1);
    d.inflate(&[9]);
    assert_eq!(d.backend().inflates.last(), Some(&vec![9]));
}

#[test]
fn a_guest_cannot_flood_the_log() {
    let mut d = Driver::new(BalloonConfig::new(64 * MB));
    let ((), logs) = capture_logs(|| {
        for _ in 0..1000 {
            d.w32(VIRTIO_MMIO_MAGIC_VALUE, 0); // read-only register
            d.w32(VIRTIO_MMIO_QUEUE_SEL, 77);
            d.w32(VIRTIO_MMIO_QUEUE_NUM, 8); // nonexistent queue
        }
    });
    for needle in ["read-only register", "nonexistent queue"] {
        let n = logs.iter().filter(|l| l.contains(needle)).count();
        // The first 10 of each cause, then the 100th and the 1000th.
        assert_eq!(n, 12, "{needle}: {n} lines");
    }
    assert!(logged(&logs, "1000 times from this thread"), "{logs:?}");
    assert_eq!(d.r32(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
}

#[test]
fn odd_register_accesses_are_ignored() {
    let mut d = Driver::new(BalloonConfig::new(64 * MB));
    let ((), logs) = capture_logs(|| {
        let mut b2 = [0xffu8; 2];
        d.t.read(0x70, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b4 = [0xffu8; 4];
        d.t.read(0x71, &mut b4);
        assert_eq!(b4, [0; 4]);
        d.t.read(0x1fe, &mut b4); // crosses the window end
        assert_eq!(b4, [0; 4]);
        d.t.write(0x70, &[1]);
        d.t.write(0x1000, &[1, 2, 3, 4]);
        d.w32(VIRTIO_MMIO_QUEUE_SEL, 77);
        d.w32(VIRTIO_MMIO_QUEUE_NUM, 8);
        d.w32(VIRTIO_MMIO_QUEUE_READY, 1);
        d.w32(VIRTIO_MMIO_QUEUE_NOTIFY, 9);
        d.w32(VIRTIO_MMIO_MAGIC_VALUE, 0);
    });
    assert!(logged(&logs, "32-bit"), "{logs:?}");
    assert!(logged(&logs, "nonexistent queue"), "{logs:?}");
    assert_eq!(d.status(), 0);
    assert_eq!(d.r32(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
}

// ---------------------------------------------------------------------------
// Fuzzing: random rings, PFN arrays and register writes. The device must
// never panic, the backend must only ever see in-range, consistent PFNs.

const FUZZ_RAM: u64 = 4 * MB;

#[derive(Debug, Clone)]
struct FuzzDesc {
    kind: u8,
    off: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[derive(Debug, Clone)]
struct FuzzCase {
    features: u64,
    sizes: Vec<u32>,
    descs: Vec<FuzzDesc>,
    avail: Vec<u16>,
    avail_extra: u16,
    pfns: Vec<u32>,
    kicks: Vec<u32>,
    regs: Vec<(u64, u8, u64)>,
}

fn fuzz_case() -> impl Strategy<Value = FuzzCase> {
    let pages = (FUZZ_RAM / PAGE) as u32;
    // `next == u16::MAX` stands for "the following descriptor".
    let desc = (
        0u8..6,
        any::<u64>(),
        any::<u32>(),
        prop_oneof![4 => Just(0u16), 2 => Just(VRING_DESC_F_NEXT as u16), 1 => 0u16..16],
        prop_oneof![3 => Just(u16::MAX), 1 => 0u16..40],
    )
        .prop_map(|(kind, off, len, flags, next)| FuzzDesc {
            kind,
            off,
            len,
            flags,
            next,
        });
    let pfn = prop_oneof![0..pages + 8, any::<u32>(), Just(pages), Just(0)];
    let size = prop_oneof![
        8 => (0u32..=8).prop_map(|s| 1 << s),
        1 => any::<u32>(),
        1 => 0u32..300,
    ];
    let reg = (
        prop_oneof![
            (0u64..0x5a).prop_map(|r| r * 4),
            0u64..0x220,
            Just(0x50u64),
            Just(0x70u64),
        ],
        prop_oneof![Just(4u8), Just(1), Just(2), Just(8)],
        prop_oneof![0u64..8, any::<u64>(), (0u64..=8).prop_map(|s| 1 << s)],
    );
    (
        any::<u64>(),
        proptest::collection::vec(size, 4),
        proptest::collection::vec(desc, 0..24),
        proptest::collection::vec(
            prop_oneof![4 => 0u16..4, 2 => 0u16..32, 1 => any::<u16>()],
            0..24,
        ),
        prop_oneof![Just(0u16), any::<u16>()],
        proptest::collection::vec(pfn, 0..64),
        proptest::collection::vec(0u32..6, 0..6),
        proptest::collection::vec(reg, 0..24),
    )
        .prop_map(
            |(features, sizes, descs, avail, avail_extra, pfns, kicks, regs)| FuzzCase {
                features,
                sizes,
                descs,
                avail,
                avail_extra,
                pfns,
                kicks,
                regs,
            },
        )
}

/// What one fuzz case reached, to show the fuzzing is not vacuous.
#[derive(Default, Clone, Copy)]
struct Reach {
    activated: u64,
    inflated_pfns: u64,
    deflated_pfns: u64,
    rejected_pfns: u64,
    rejected_chains: u64,
    reported_runs: u64,
}

fn run_fuzz_case(c: &FuzzCase, reach: &Cell<Reach>) -> Result<(), TestCaseError> {
    let mut d = Driver::new(BalloonConfig::new(FUZZ_RAM));
    let offered = d.device_features();
    let features = VERSION_1 | (c.features & offered);
    prop_assert!(d.negotiate(features));
    let pfn_buf = d.put_pfns(&c.pfns);
    for (q, &size) in c.sizes.iter().enumerate() {
        // Rings for a bad size are still written (with a fallback size) so
        // a device that wrongly accepts the queue reads garbage, not nothing.
        let ready = d.setup_queue(q as u32, size);
        let valid = size.is_power_of_two() && size <= 256;
        prop_assert_eq!(ready, valid, "queue {} size {}", q, size);
    }
    d.driver_ok();
    let activated = d.t.is_activated();
    for q in 0..4usize {
        let Some(dq) = d.queues[q].as_ref() else {
            continue;
        };
        let size = dq.size;
        let pfn_bytes = c.pfns.len() as u64 * 4;
        for (i, fd) in c.descs.iter().enumerate().take(usize::from(size)) {
            let (addr, len) = match fd.kind {
                // The PFN array, whole or in part.
                0 => (pfn_buf, fd.len % (pfn_bytes as u32 + 8)),
                1 => (pfn_buf + fd.off % (pfn_bytes + 1), fd.len % 256),
                // Anywhere at all.
                2 => (fd.off, fd.len),
                // Straddling the end of RAM.
                3 => (FUZZ_RAM - fd.off % 64, fd.len % 128),
                // Over the descriptor table itself.
                4 => (dq.desc + fd.off % 64, fd.len % 64),
                // A page-aligned run inside RAM (free page reporting).
                _ => (
                    (fd.off % (FUZZ_RAM / PAGE - 16)) * PAGE,
                    (fd.len % 16 + 1) * PAGE as u32,
                ),
            };
            let next = if fd.next == u16::MAX {
                (i as u16 + 1) % size
            } else {
                fd.next % (size + 4)
            };
            d.write_desc(q, i as u16, addr, len, fd.flags, next);
        }
        for &h in &c.avail {
            d.publish(q, h % (size + 2));
        }
        if c.avail_extra != 0 {
            let dq = d.queues[q].as_ref().unwrap();
            d.mem
                .write_obj(
                    dq.avail_idx.wrapping_add(c.avail_extra),
                    GuestAddress(dq.avail + 2),
                )
                .unwrap();
        }
    }
    for k in (0..4).chain(c.kicks.iter().copied()) {
        d.kick(k);
    }
    for &(off, width, val) in &c.regs {
        let bytes = val.to_le_bytes();
        d.t.write(off, &bytes[..usize::from(width)]);
        let mut r = [0u8; 8];
        d.t.read(off, &mut r[..usize::from(width)]);
    }
    for &k in &c.kicks {
        d.kick(k);
    }
    d.t.device_mut().request_stats();
    let b = d.backend();
    prop_assert!(b.violations.is_empty(), "{:?}", b.violations);
    prop_assert_eq!(b.held.len() as u64, d.t.device().inflated_pages());
    for pfns in b.inflates.iter().chain(&b.deflates) {
        prop_assert!(pfns.iter().all(|&p| p < FUZZ_RAM / PAGE));
    }
    let k = d.t.device().counters();
    let mut r = reach.get();
    r.activated += u64::from(activated);
    r.inflated_pfns += k.inflated_pfns;
    r.deflated_pfns += k.deflated_pfns;
    r.rejected_pfns += k.pfn_out_of_range + k.pfn_already_inflated + k.pfn_not_inflated;
    r.rejected_chains += k.chains_rejected;
    r.reported_runs += k.reported_runs;
    reach.set(r);
    // Reset returns everything.
    d.w32(VIRTIO_MMIO_STATUS, 0);
    prop_assert!(d.backend().held.is_empty());
    Ok(())
}

#[test]
fn fuzz_rings_pfns_and_registers() {
    // VMM_FUZZ_CASES (every fuzz test) or BALLOON_FUZZ_CASES (this one).
    let cases: u32 = std::env::var("BALLOON_FUZZ_CASES")
        .or_else(|_| std::env::var("VMM_FUZZ_CASES"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12_000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let ran = Cell::new(0u64);
    let reach = Cell::new(Reach::default());
    let ring_inputs = Cell::new(0u64);
    let result = runner.run(&fuzz_case(), |c| {
        ran.set(ran.get() + 1);
        ring_inputs.set(
            ring_inputs.get() + c.descs.len() as u64 + c.avail.len() as u64 + c.pfns.len() as u64,
        );
        run_fuzz_case(&c, &reach)
    });
    let (ran, ring_inputs) = (ran.get(), ring_inputs.get());
    if let Err(e) = result {
        panic!("fuzz failure: {e}");
    }
    let r = reach.get();
    println!(
        "balloon fuzz: {ran} inputs ({ring_inputs} descriptors/avail entries/PFNs) without a panic \
         or out-of-range PFN; {} activated, backend saw {} inflated / {} deflated PFNs and {} \
         reported runs; device refused {} PFNs and {} chains",
        r.activated, r.inflated_pfns, r.deflated_pfns, r.reported_runs, r.rejected_pfns,
        r.rejected_chains
    );
    assert!(ran >= u64::from(cases));
    // The inputs must reach the interesting paths, or the fuzzing proves nothing.
    if cases >= 1000 {
        assert!(r.activated > u64::from(cases) / 10, "too few activations");
        assert!(r.inflated_pfns > 0 && r.deflated_pfns > 0 && r.reported_runs > 0);
        assert!(r.rejected_pfns > 0 && r.rejected_chains > 0);
    }
}

/// The device model used directly (without the transport) must also
/// tolerate process_queue before activation and unknown queue indices.
#[test]
fn device_model_tolerates_calls_out_of_order() {
    let mut b = Balloon::new(BalloonConfig::new(64 * MB), Recorder::new(64 * MB)).unwrap();
    assert!(!b.process_queue(0));
    assert!(!b.request_stats());
    assert!(Balloon::new(BalloonConfig::new(0), Recorder::default()).is_err());
    assert!(Balloon::new(BalloonConfig::new(4097), Recorder::default()).is_err());
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MB as usize)]).unwrap();
    assert!(b.activate(VERSION_1, vec![None, None], mem).is_err());
    assert!(!b.process_queue(7));
}

#[test]
fn a_queue_the_driver_disables_is_no_longer_serviced() {
    let mut d = Driver::new(BalloonConfig::new(64 * MB));
    d.bring_up(VERSION_1);
    d.inflate(&[1]);
    // Like Linux's vm_del_vq: QueueReady 0 must read back 0.
    d.w32(VIRTIO_MMIO_QUEUE_SEL, 0);
    d.w32(VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(d.r32(VIRTIO_MMIO_QUEUE_READY), 0);
    let ((), logs) = capture_logs(|| d.inflate(&[2]));
    assert!(logged(&logs, "not ready"), "{logs:?}");
    assert_eq!(d.backend().inflates, vec![vec![1]]);
    assert_eq!(d.used_idx(0), 1);
}
