//! Runs the built-in test guests on real KVM with a minimal, self-contained
//! runner (kvm-ioctls directly, anonymous guest memory, no irqchip) and
//! checks what they did: exit status, reports, FAULTs and bytes in memory.
//!
//! Skips (with a printed reason) when /dev/kvm is unusable.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::boot::long_mode;
use vmm::testguest::guests::hello::{hello_stamp, GREETING};
use vmm::testguest::guests::pattern::stamp_qword;
use vmm::testguest::layout::PAGE;
use vmm::testguest::{
    build, GuestPageSize, ReportKey, TestDevice, TestDeviceAction, TestGuestImage, TestGuestName,
    TestGuestParams,
};

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);
/// How long the other vCPUs get to park (HLT) after the guest's exit
/// before they are kicked.
const PARK_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Outcome {
    exit: Option<u64>,
    fault: Option<TestDeviceAction>,
    problem: Option<String>,
    prints: Vec<String>,
    reports: Vec<(usize, u64, u64)>,
    checkpoints: Vec<(usize, u64)>,
    discards: Vec<(u64, u64)>,
    refills: Vec<(u64, u64)>,
    parked: Vec<usize>,
    elapsed: Duration,
}

impl Outcome {
    fn sum(&self, key: ReportKey) -> u64 {
        self.reports
            .iter()
            .filter(|r| r.1 == key as u64)
            .map(|r| r.2)
            .sum()
    }
    fn count(&self, key: ReportKey) -> usize {
        self.reports.iter().filter(|r| r.1 == key as u64).count()
    }
}

struct Shared<'a> {
    mem: &'a GuestMemoryMmap,
    dev: TestDevice,
    stop: AtomicBool,
    out: Mutex<Outcome>,
    hook: &'a (dyn Fn(usize, u64, &GuestMemoryMmap) + Sync),
}

impl Shared<'_> {
    fn finish(&self, f: impl FnOnce(&mut Outcome)) {
        f(&mut self.out.lock().unwrap());
        self.stop.store(true, Ordering::SeqCst);
    }
}

extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Give back [gpa, gpa + len) of anonymous guest memory.
fn discard(mem: &GuestMemoryMmap, gpa: u64, len: u64) {
    let host = mem.get_host_address(GuestAddress(gpa)).unwrap();
    // SAFETY: the device validated [gpa, gpa + len) lies in guest RAM, which
    // is one anonymous private mapping; MADV_DONTNEED makes it read as zero.
    let r = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
    assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
}

fn vcpu_loop(cpu: usize, vcpu: &mut kvm_ioctls::VcpuFd, sh: &Shared<'_>) {
    while !sh.stop.load(Ordering::SeqCst) {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if TestDevice::handles(port) => {
                match sh.dev.io_out(cpu, port, data, sh.mem) {
                    TestDeviceAction::None => {}
                    TestDeviceAction::Print(s) => {
                        println!("guest vCPU {cpu}: {s}");
                        sh.out.lock().unwrap().prints.push(s);
                    }
                    TestDeviceAction::Report { key, value } => {
                        sh.out.lock().unwrap().reports.push((cpu, key, value))
                    }
                    TestDeviceAction::Checkpoint { phase } => {
                        (sh.hook)(cpu, phase, sh.mem);
                        sh.out.lock().unwrap().checkpoints.push((cpu, phase));
                    }
                    TestDeviceAction::Discard { gpa, len } => {
                        discard(sh.mem, gpa, len);
                        sh.out.lock().unwrap().discards.push((gpa, len));
                    }
                    TestDeviceAction::Refill { gpa, len } => {
                        sh.mem
                            .write_slice(&vec![0u8; len as usize], GuestAddress(gpa))
                            .unwrap();
                        sh.out.lock().unwrap().refills.push((gpa, len));
                    }
                    TestDeviceAction::Exit(s) => return sh.finish(|o| o.exit = Some(s)),
                    f @ TestDeviceAction::Fault { .. } => {
                        return sh.finish(|o| o.fault = Some(f));
                    }
                }
            }
            Ok(VcpuExit::IoIn(port, data)) if TestDevice::handles(port) => {
                sh.dev.io_in(cpu, port, data);
            }
            Ok(VcpuExit::Hlt) if cpu != 0 => {
                sh.out.lock().unwrap().parked.push(cpu);
                return;
            }
            Err(e) if e.errno() == libc::EINTR => {}
            other => {
                let what = format!("vCPU {cpu}: unexpected exit {other:?}");
                let regs = vcpu.get_regs().ok();
                return sh.finish(|o| o.problem = Some(format!("{what}, regs {regs:x?}")));
            }
        }
    }
}

/// Runs `params` on a fresh VM; `None` if the host has no usable KVM.
fn run(
    params: &TestGuestParams,
    hook: &(dyn Fn(usize, u64, &GuestMemoryMmap) + Sync),
) -> Option<(TestGuestImage, GuestMemoryMmap, Outcome)> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            common::skip(&format!("/dev/kvm unusable: {e}"));
            return None;
        }
    };
    static HANDLER: Once = Once::new();
    HANDLER.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick).unwrap();
    });
    let vm = kvm.create_vm().unwrap();
    let size = params.ram_size;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: the region is a live mapping of `size` bytes owned by `mem`;
    // the VM is dropped below before `mem` is returned or dropped.
    unsafe { vm.set_user_memory_region(region).unwrap() };
    let tables = long_mode::setup(&mem, size).unwrap();
    let image = build(params).unwrap();
    image.load(&mem).unwrap();
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let mut vcpus: Vec<_> = (0..params.vcpus)
        .map(|i| {
            let v = vm.create_vcpu(i as u64).unwrap();
            v.set_cpuid2(&cpuid).unwrap();
            long_mode::configure_vcpu(&v, &tables).unwrap();
            v.set_regs(&image.initial_regs(i)).unwrap();
            v
        })
        .collect();
    let sh = Shared {
        mem: &mem,
        dev: image.device(),
        stop: AtomicBool::new(false),
        out: Mutex::new(Outcome::default()),
        hook,
    };
    let start = Instant::now();
    let tids: Mutex<Vec<Option<libc::pthread_t>>> = Mutex::new(vec![None; params.vcpus]);
    std::thread::scope(|s| {
        let handles: Vec<_> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(cpu, v)| {
                let (sh, tids) = (&sh, &tids);
                s.spawn(move || {
                    // SAFETY: pthread_self has no preconditions.
                    tids.lock().unwrap()[cpu] = Some(unsafe { libc::pthread_self() });
                    vcpu_loop(cpu, v, sh)
                })
            })
            .collect();
        let mut stopped_at: Option<Instant> = None;
        while handles.iter().any(|h| !h.is_finished()) {
            if !sh.stop.load(Ordering::SeqCst) && start.elapsed() > TIMEOUT {
                sh.finish(|o| o.problem = Some(format!("timeout after {TIMEOUT:?}")));
            }
            // After the guest's exit the other vCPUs are on their way to
            // HLT (they counted themselves done first): a kick before they
            // get there would lose their park, so they get PARK_GRACE; a
            // fault or a problem kicks at once.
            let kick_now = sh.stop.load(Ordering::SeqCst) && {
                let since = *stopped_at.get_or_insert_with(Instant::now);
                sh.out.lock().unwrap().exit.is_none() || since.elapsed() > PARK_GRACE
            };
            if kick_now {
                let tids = tids.lock().unwrap().clone();
                for (h, t) in handles.iter().zip(&tids) {
                    if let (false, Some(t)) = (h.is_finished(), t) {
                        // SAFETY: the thread is alive (not joined: the scope
                        // joins at its end), so its pthread_t is valid.
                        unsafe { libc::pthread_kill(*t, kick_signal()) };
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let mut out = sh.out.into_inner().unwrap();
    out.elapsed = start.elapsed();
    println!(
        "{} {} vCPUs {} guest pages {} MiB: exit {:?} fault {:?} problem {:?} in {:?}",
        params.name,
        params.vcpus,
        params.guest_pages,
        size / MIB,
        out.exit,
        out.fault,
        out.problem,
        out.elapsed
    );
    drop(vcpus);
    drop(vm);
    Some((image, mem, out))
}

fn no_hook(_: usize, _: u64, _: &GuestMemoryMmap) {}

fn params(name: TestGuestName, mib: u64, vcpus: usize, pages: GuestPageSize) -> TestGuestParams {
    let mut p = TestGuestParams::new(name, mib * MIB);
    p.vcpus = vcpus;
    p.guest_pages = pages;
    p
}

const BOTH: [GuestPageSize; 2] = [GuestPageSize::Size4K, GuestPageSize::Size2M];

fn work_pages(image: &TestGuestImage) -> u64 {
    let w = image.work();
    (w.end - w.start) / PAGE
}

#[test]
fn hello_writes_every_page_outside_the_reserved_region() {
    for (pages, vcpus) in [
        (GuestPageSize::Size4K, 1),
        (GuestPageSize::Size2M, 1),
        (GuestPageSize::Size4K, 2),
    ] {
        let p = params(TestGuestName::Hello, 64, vcpus, pages);
        let Some((image, mem, out)) = run(&p, &no_hook) else {
            return;
        };
        assert_eq!(out.problem, None);
        assert_eq!(out.fault, None);
        assert_eq!(out.exit, Some(0), "{pages} {vcpus}");
        assert_eq!(out.prints, vec![GREETING.to_owned()]);
        assert_eq!(out.sum(ReportKey::PagesTouched), work_pages(&image));
        assert_eq!(out.count(ReportKey::PagesTouched), vcpus);
        let mut parked = out.parked.clone();
        parked.sort();
        assert_eq!(parked, (1..vcpus).collect::<Vec<_>>());
        let w = image.work();
        assert_eq!(w.start, image.reserved.end);
        for gpa in (w.start..w.end).step_by(PAGE as usize) {
            let v: u64 = mem.read_obj(GuestAddress(gpa)).unwrap();
            assert_eq!(
                v,
                hello_stamp(gpa),
                "page {gpa:#x} ({pages}, {vcpus} vCPUs)"
            );
        }
        // The guest's own tables live in the reserved region: the 4K page
        // table entry of the last page maps it, user RW.
        if pages == GuestPageSize::Size4K {
            let pte_gpa = image.layout.pt4k_pt() + (p.ram_size / PAGE - 1) * 8;
            let pte: u64 = mem.read_obj(GuestAddress(pte_gpa)).unwrap();
            // Ignore the accessed and dirty bits the CPU sets.
            assert_eq!(pte & !0x60, (p.ram_size - PAGE) | 7, "pte {pte:#x}");
        }
    }
}

fn check_verify_memory(image: &TestGuestImage, mem: &GuestMemoryMmap, generation: u64) {
    let w = image.work();
    for (n, gpa) in (w.start..w.end).step_by(PAGE as usize).enumerate() {
        let q = |i: usize| -> u64 { mem.read_obj(GuestAddress(gpa + 8 * i as u64)).unwrap() };
        assert_eq!((q(0), q(1)), (gpa >> 12, generation), "page {gpa:#x}");
        if n % 61 == 0 {
            for i in 2..512 {
                assert_eq!(
                    q(i),
                    stamp_qword(gpa, generation, i),
                    "page {gpa:#x} qword {i}"
                );
            }
        }
    }
}

#[test]
fn verify_finds_no_mismatch_and_checks_every_page() {
    for pages in BOTH {
        for vcpus in [1, 2] {
            let mut p = params(TestGuestName::Verify, 64, vcpus, pages);
            p.generations = 3;
            let Some((image, mem, out)) = run(&p, &no_hook) else {
                return;
            };
            assert_eq!(out.problem, None);
            assert_eq!(out.fault, None);
            assert_eq!(out.exit, Some(0), "{pages} {vcpus}");
            assert_eq!(out.count(ReportKey::Mismatches), vcpus);
            assert_eq!(out.sum(ReportKey::Mismatches), 0);
            assert_eq!(out.sum(ReportKey::PagesChecked), work_pages(&image) * 3);
            assert_eq!(out.checkpoints.len(), vcpus * 3);
            check_verify_memory(&image, &mem, 3);
        }
    }
}

#[test]
fn verify_detects_a_corrupted_page() {
    for pages in BOTH {
        let p = params(TestGuestName::Verify, 32, 2, pages);
        let target = std::sync::OnceLock::new();
        let hook = |cpu: usize, phase: u64, mem: &GuestMemoryMmap| {
            if cpu == 1 && phase == 1 {
                // Flip one qword in the middle of a page of vCPU 1's slice,
                // between the guest's write and read passes.
                let gpa = *target.get().unwrap();
                let v: u64 = mem.read_obj(GuestAddress(gpa)).unwrap();
                mem.write_obj(!v, GuestAddress(gpa)).unwrap();
            }
        };
        let image = build(&p).unwrap();
        target
            .set(image.slices[1].start + 5 * PAGE + 8 * 300)
            .unwrap();
        let Some((_, _, out)) = run(&p, &hook) else {
            return;
        };
        assert_eq!(out.problem, None);
        assert_eq!(out.exit, Some(1), "{pages}");
        let by_cpu: Vec<(usize, u64)> = out
            .reports
            .iter()
            .filter(|r| r.1 == ReportKey::Mismatches as u64)
            .map(|r| (r.0, r.2))
            .collect();
        assert!(by_cpu.contains(&(1, 1)), "{by_cpu:?}");
        assert!(by_cpu.contains(&(0, 0)), "{by_cpu:?}");
    }
}

#[test]
fn page_fault_is_reported_with_vector_14() {
    for pages in BOTH {
        let p = params(TestGuestName::Fault, 32, 1, pages);
        let Some((_, _, out)) = run(&p, &no_hook) else {
            return;
        };
        assert_eq!(out.problem, None);
        assert_eq!(out.exit, None, "a faulting guest must not exit 0");
        match out.fault {
            Some(TestDeviceAction::Fault {
                vector,
                error_code,
                rip,
                cr2,
            }) => {
                assert_eq!(vector, 14);
                assert_eq!(cr2, p.ram_size);
                // User-mode read of a not-present page.
                assert_eq!(error_code & 0x7, 0x4, "error code {error_code:#x}");
                assert!(
                    (vmm::testguest::layout::CODE_ADDR..vmm::testguest::layout::CODE_END)
                        .contains(&rip),
                    "rip {rip:#x}"
                );
            }
            other => panic!("expected a FAULT, got {other:?}"),
        }
    }
}

#[test]
fn unmap_gives_back_one_page_per_frame_and_refills() {
    for pages in BOTH {
        let mut p = params(TestGuestName::Unmap, 32, 2, pages);
        p.args.insert("frames".into(), 3);
        p.args.insert("page".into(), 7);
        let Some((image, mem, out)) = run(&p, &no_hook) else {
            return;
        };
        assert_eq!(out.problem, None);
        assert_eq!(out.fault, None);
        assert_eq!(out.exit, Some(0), "{pages}");
        assert_eq!(out.sum(ReportKey::PagesDiscarded), 6);
        assert_eq!(out.sum(ReportKey::NonZeroDiscarded), 0);
        assert_eq!(out.sum(ReportKey::Mismatches), 0);
        assert_eq!(out.sum(ReportKey::PagesChecked), work_pages(&image) * 2);
        let mut expected: Vec<(u64, u64)> = image
            .slices
            .iter()
            .flat_map(|s| (0..3).map(move |f| (s.start + f * 2 * MIB + 7 * PAGE, PAGE)))
            .collect();
        expected.sort();
        let (mut d, mut r) = (out.discards.clone(), out.refills.clone());
        d.sort();
        r.sort();
        assert_eq!(d, expected);
        assert_eq!(r, expected);
        for cpu in 0..2 {
            let phases: Vec<u64> = out
                .checkpoints
                .iter()
                .filter(|c| c.0 == cpu)
                .map(|c| c.1)
                .collect();
            assert_eq!(phases, vec![1, 2, 3, 4, 5]);
        }
        check_verify_memory(&image, &mem, 2);
    }
}
#[test]
#[ignore = "timing only: cargo test --release --test testguest_harness -- --ignored --nocapture"]
fn timing_hello_and_verify_by_ram_size() {
    for mib in [64u64, 512, 2048] {
        for name in [TestGuestName::Hello, TestGuestName::Verify] {
            for pages in BOTH {
                let p = params(name, mib, 1, pages);
                let Some((_, _, out)) = run(&p, &no_hook) else {
                    return;
                };
                assert_eq!(out.exit, Some(0));
            }
        }
    }
}

#[test]
fn unmap_detects_a_discarded_page_that_does_not_read_zero() {
    let mut p = params(TestGuestName::Unmap, 32, 1, GuestPageSize::Size2M);
    p.args.insert("frames".into(), 2);
    let image = build(&p).unwrap();
    let victim = image.slices[0].start + 2 * MIB + PAGE + 64;
    let hook = |_: usize, phase: u64, mem: &GuestMemoryMmap| {
        if phase == 2 {
            // Page 1 of frame 1 was just given back; make it non-zero.
            mem.write_obj(0xbad_u64, GuestAddress(victim)).unwrap();
        }
    };
    let Some((_, _, out)) = run(&p, &hook) else {
        return;
    };
    assert_eq!(out.problem, None);
    assert_eq!(out.exit, Some(1));
    assert_eq!(out.sum(ReportKey::NonZeroDiscarded), 1);
    assert_eq!(out.sum(ReportKey::Mismatches), 0);
}
