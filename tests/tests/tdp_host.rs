//! Tests on the emulated hardware-virtualization host: KVM with AMD-V + NPT (the TDP
//! MMU, what every real user runs) inside QEMU in software mode
//! (`integration_tests::l1host`). One L1 boot runs every command of this file in a
//! batch; each test checks its own command's result.
//!
//! Host kinds: the emulated AMD-V + NPT host only (QEMU TCG runs on any x86-64
//! machine: /dev/kvm is not needed outside). Timings inside the emulator mean
//! nothing: these tests check what KVM maps, guest behaviour and exit codes.

use std::path::PathBuf;
use std::sync::OnceLock;

use integration_tests::images::{
    self, INITRD, INITRD_MEMWORK, INITRD_WORKLOAD, INIT_OK_MARKER, KERNEL,
};
use integration_tests::json::num;
use integration_tests::l1host::{self, Batch, BatchOutcome, CommandResult, Image, Mode};
use integration_tests::skip;
use integration_tests::vmm_bin::{tail, vmm_bin};
use serde_json::Value;
use vmm::testguest::guests::tlb;

/// Separates a command's own output from the JSON report it prints at its end.
const JSON_MARK: &str = "@@JSON";

/// The shell tail of a command that wrote its JSON report to `json`: print the
/// report after [`JSON_MARK`] (to stderr with `to = ">&2"`), keep the exit code.
fn then_report(json: &str, to: &str) -> String {
    format!("rc=$?; echo {JSON_MARK} {to}; cat {json} {to}; exit $rc")
}

/// A `vmm` command line that writes `--stats-json` and prints it after [`JSON_MARK`],
/// keeping vmm's exit code.
fn with_report(id: &str, vmm_args: &str) -> String {
    let json = format!("/tmp/{id}.json");
    format!(
        "/bin/vmm {vmm_args} --stats-json {json}; {}",
        then_report(&json, "")
    )
}

/// Waits (in L1's shell) for `$1` on the guest console file `$C`, at most 150 s.
const WAIT_CONSOLE: &str = r#"wait_console() { i=0; while ! grep -q "$1" "$C" 2>/dev/null; do i=$((i+1)); if [ $i -gt 300 ]; then echo "TIMEOUT waiting for $1 on the console"; return 1; fi; if ! kill -0 $pid 2>/dev/null; then echo "vmm ended while waiting for $1"; return 1; fi; sleep 0.5; done; }"#;
/// Waits for `$1` in `vmm ctl --json stats`, at most 150 s.
const WAIT_STATS: &str = r#"wait_stats() { i=0; while ! /bin/vmm ctl --api-socket "$S" --json stats 2>/dev/null | grep -q "$1"; do i=$((i+1)); if [ $i -gt 300 ]; then echo "TIMEOUT waiting for $1 in the stats"; /bin/vmm ctl --api-socket "$S" --json stats; return 1; fi; sleep 0.5; done; }"#;

/// The balloon scenario: boot with a 32M balloon, let `memwork` start, inflate to
/// 64M while it works, wait until memwork saw MemTotal fall (MEMWORK-LOW), deflate
/// to 0, let it see MemTotal rise, finish and power off. Each step is echoed.
fn balloon_script() -> String {
    [
        "C=/tmp/balloon.console S=/tmp/balloon.sock",
        WAIT_CONSOLE,
        WAIT_STATS,
        "/bin/vmm run --kernel /images/vmlinux --initrd /images/memwork.cpio --memory 256M \
         --backing hugetlb --balloon --balloon-target 32M --api-socket $S --serial $C \
         --collapse-interval-ms 200 --timeout 240 --stats-json /tmp/balloon.json 2>/tmp/balloon.err & pid=$!",
        // The guest console also streams to L1's console: in a failure message it
        // shows how far the guest got even if L1 itself stops.
        "(sleep 1; tail -f $C >/dev/console) & tailer=$!",
        "wait_console MEMWORK-START && /bin/vmm ctl --api-socket $S balloon 64M \
         && wait_stats '\"actual_pages\":16384' && echo inflated-64M-while-working \
         && wait_console MEMWORK-LOW && echo guest-saw-the-inflate \
         && /bin/vmm ctl --api-socket $S balloon 0 && wait_stats '\"actual_pages\":0,' \
         && echo deflated-to-0",
        "wait $pid; vmm_rc=$?; kill $tailer",
        "echo --- vmm stderr; tail -n 20 /tmp/balloon.err",
        "echo --- console; cat $C",
        &format!("(exit $vmm_rc); {}", then_report("/tmp/balloon.json", "")),
    ]
    .join("\n")
}

/// The `vmm bench workload` commands (id, guest command): a 64M working set in
/// 256M of guest RAM, few accesses (each command ~30 s in the emulator, two guest
/// boots; 4k then hugetlb).
const WORKLOAD_BENCHES: &[(&str, &str)] = &[
    ("bench-workload-chase", "chase 64M 200000"),
    ("bench-workload-gups", "gups 64M 200000"),
];
/// `vmm bench tlb --guest linux` (two guest boots).
const TLB_LINUX: &str = "bench-tlb-linux";
/// Time limit of one workload command in L1 (two guest boots).
const WORKLOAD_LIMIT_S: u64 = 200;

/// Why the `workload` initramfs is missing, when it is (its commands are then dropped).
static NO_WORKLOAD_IMAGE: OnceLock<String> = OnceLock::new();

/// Everything this file runs on L1, by command id (`VMM_L1_ONLY=id,id` keeps only
/// those: for a developer re-running one test's command).
fn plan() -> Batch {
    let mut b = Batch::default();
    let tg = |name: &str, backing: &str| {
        format!("run --test-guest {name} --backing {backing} --memory 256M --stats")
    };
    b.command(
        "linux-hello",
        300,
        Mode::Console,
        // stdout (the guest console) on L1's own slow serial console; the report on stderr.
        format!(
            "/bin/vmm run --kernel /images/vmlinux --initrd /images/hello.cpio --memory 256M \
             --backing hugetlb --timeout 280 --stats-json /tmp/lh.json; {}",
            then_report("/tmp/lh.json", ">&2")
        ),
    );
    b.command(
        "hello-hugetlb",
        120,
        Mode::Capture,
        with_report("hello-hugetlb", &tg("hello", "hugetlb")),
    );
    for backing in ["hugetlb", "thp"] {
        let id = format!("verify-{backing}");
        b.command(
            &id,
            180,
            Mode::Capture,
            with_report(&id, &tg("verify", backing)),
        );
        let id = format!("unmap-{backing}");
        b.command(
            &id,
            180,
            Mode::Capture,
            with_report(&id, &tg("unmap", backing)),
        );
    }
    b.command("balloon-memwork", 300, Mode::Capture, balloon_script());
    // Every backing. On thp, L1's 6.1 kernel splits a shmem THP on page-out and can
    // leave a frame the books call split in one 2M folio; the quiescent
    // points read the host's own per-frame truth (kpageflags + smaps there,
    // no PAGEMAP_SCAN before 6.7), so the mirror still predicts exactly.
    for backing in ["hugetlb", "thp", "4k"] {
        let json = format!("/tmp/stress-{backing}.json");
        b.command(
            &format!("stress-{backing}"),
            240,
            Mode::Capture,
            format!(
                "/bin/vmm stress --backing {backing} --memory 128M --vcpus 1 --seconds 20 \
                 --seed 5 --quiesce-every 4 --json {json}; {}",
                then_report(&json, "")
            ),
        );
    }
    // `vmm bench workload` end to end: the chase workload of the `workload`
    // initramfs on 4k and hugetlb, guest THP on (timings mean nothing here).
    for (id, cmd) in WORKLOAD_BENCHES {
        let json = format!("/tmp/{id}.json");
        let svg = format!("/tmp/{id}.svg");
        b.command(
            id,
            WORKLOAD_LIMIT_S,
            Mode::Capture,
            format!(
                "/bin/vmm bench workload --kernel /images/vmlinux --initrd /images/workload.cpio \
                 --run '{cmd}' --backing 4k,hugetlb --memory 256M --repeat 1 --guest-thp always \
                 --timeout 200 --json {json} --svg {svg}; rc=$?; \
                 echo \"SVG-HEAD $(head -c 4 {svg}) rects=$(grep -o '<rect' {svg} | wc -l)\"; (exit $rc); {}",
                then_report(&json, "")
            ),
        );
    }
    // `vmm bench tlb --guest linux`: the tlb matrix through the same path. (L1
    // froze here and in `balloon-memwork` now and then under QEMU 7.2: a timer
    // interrupt its nested SVM lost, see resources/l1host/qemu.sh; QEMU 10 runs L1.)
    b.command(
        TLB_LINUX,
        150,
        Mode::Capture,
        format!(
            "/bin/vmm bench tlb --guest linux --kernel /images/vmlinux \
             --initrd /images/workload.cpio --working-set 64M --accesses 100000 \
             --backing 4k,hugetlb --guest-pages 2m --repeat 1 \
             --json /tmp/{TLB_LINUX}.json; {}",
            then_report(&format!("/tmp/{TLB_LINUX}.json"), "")
        ),
    );
    if let Ok(only) = std::env::var("VMM_L1_ONLY") {
        let keep: Vec<&str> = only.split(',').map(str::trim).collect();
        b.commands.retain(|c| keep.contains(&c.id.as_str()));
    }
    b
}

/// The batch's outcome (run once for all tests of this file), or why it cannot run here.
fn batch() -> Result<&'static BatchOutcome, String> {
    static BATCH: OnceLock<Result<BatchOutcome, String>> = OnceLock::new();
    BATCH
        .get_or_init(|| {
            let img = Image::locate()?;
            let mut b = plan();
            let file = |name: &str| images::image(name).map_err(|e| format!("guest image: {e}"));
            b.file("/images/vmlinux", file(KERNEL)?);
            b.file("/images/hello.cpio", file(INITRD)?);
            b.file("/images/memwork.cpio", file(INITRD_MEMWORK)?);
            match file(INITRD_WORKLOAD) {
                Ok(p) => b.file("/images/workload.cpio", p),
                Err(why) => {
                    b.commands.retain(|c| {
                        c.id != TLB_LINUX && !WORKLOAD_BENCHES.iter().any(|(id, _)| *id == c.id)
                    });
                    let _ = NO_WORKLOAD_IMAGE.set(why);
                }
            }
            boot(&img, &b)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// MiB of L1 RAM the batches of this file may boot at once: the tests run
/// in parallel and an L1's QEMU holds what its guests touch (the 8 GiB guest
/// on 1G pages touches all of it). 12 GiB lets the main batch and the
/// above-4G one run together and the 11 GiB one alone.
const L1_MEMORY_BUDGET_MIB: u32 = 12 * 1024;

/// Waits until `mib` more of L1 RAM fit in [`L1_MEMORY_BUDGET_MIB`] (or
/// nothing else is booted), takes them, and gives them back on drop.
struct L1Memory(u32);

static L1_IN_USE: std::sync::Mutex<u32> = std::sync::Mutex::new(0);
static L1_FREED: std::sync::Condvar = std::sync::Condvar::new();

impl L1Memory {
    fn take(mib: u32) -> L1Memory {
        let g = L1_IN_USE.lock().unwrap_or_else(|p| p.into_inner());
        let mut g = L1_FREED
            .wait_while(g, |used| *used > 0 && *used + mib > L1_MEMORY_BUDGET_MIB)
            .unwrap_or_else(|p| p.into_inner());
        *g += mib;
        L1Memory(mib)
    }
}

impl Drop for L1Memory {
    fn drop(&mut self) {
        let mut g = L1_IN_USE.lock().unwrap_or_else(|p| p.into_inner());
        *g = g.saturating_sub(self.0);
        L1_FREED.notify_all();
    }
}

/// One L1 boot running batch `b` (when its RAM fits the budget).
fn boot(img: &Image, b: &Batch) -> Result<BatchOutcome, String> {
    let _memory = L1Memory::take(b.memory_mib);
    let vmm: PathBuf = vmm_bin();
    eprintln!(
        "booting the emulated AMD-V + NPT host ({} MiB) for {} commands (deadline {} s)",
        b.memory_mib,
        b.commands.len(),
        b.deadline().as_secs()
    );
    let out = l1host::run(img, &vmm, b).map_err(|e| e.to_string())?;
    eprintln!(
        "L1 batch: {:.0} s wall, complete {}, {} boots again after a lost interrupt",
        out.wall.as_secs_f64(),
        out.complete(),
        out.lost_interrupts.len()
    );
    Ok(out)
}

/// Guest RAM of the above-4G run: 3 GiB below the 32-bit MMIO hole, 1.5 GiB
/// from 4 GiB up (2304 huge pages).
const ABOVE_4G_MEMORY: &str = "4608M";
const ABOVE_4G: &str = "unmap-above-4g";

/// 8 GiB of guest RAM on 1G pages with 1G guest pages (`hugetlb-1g`): issue
/// 18's done-when command.
const ON_1G: &str = "unmap-8g-1g";

/// A second, larger L1 (6 GiB, 2400 huge pages) for a guest with RAM above
/// 4 GiB, booted only for that test (about 2 minutes of wall time).
fn batch_above_4g() -> Result<&'static BatchOutcome, String> {
    static BATCH: OnceLock<Result<BatchOutcome, String>> = OnceLock::new();
    BATCH
        .get_or_init(|| {
            let img = Image::locate()?;
            let mut b = Batch {
                memory_mib: 6144,
                hugepages: 2400,
                ..Batch::default()
            };
            b.command(
                ABOVE_4G,
                600,
                Mode::Capture,
                with_report(
                    ABOVE_4G,
                    &format!(
                        "run --test-guest unmap --backing hugetlb --memory {ABOVE_4G_MEMORY} \
                         --guest-arg stride=256 --stats"
                    ),
                ),
            );
            boot(&img, &b)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A third L1 (11 GiB: eight 1G pages reserved at boot, 600 2M pages) for 8
/// GiB of guest RAM on 1G pages, booted only for that test (about 2 minutes
/// of wall time).
fn batch_1g() -> Result<&'static BatchOutcome, String> {
    static BATCH: OnceLock<Result<BatchOutcome, String>> = OnceLock::new();
    BATCH
        .get_or_init(|| {
            let img = Image::locate()?;
            let mut b = Batch {
                memory_mib: 11264,
                hugepages: 600,
                gigpages: 8,
                ..Batch::default()
            };
            b.command(
                ON_1G,
                900,
                Mode::Capture,
                with_report(
                    ON_1G,
                    "run --test-guest unmap --backing hugetlb-1g --guest-pages 1g --memory 8G \
                     --stats",
                ),
            );
            boot(&img, &b)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Command `id`'s result; fails with the batch's diagnosis when it did not run.
fn result<'a>(out: &'a BatchOutcome, id: &str) -> &'a CommandResult {
    out.transcript
        .result(id)
        .unwrap_or_else(|| panic!("command {id} did not finish.\n{}", out.diagnosis()))
}

/// The JSON after [`JSON_MARK`] in `text`.
fn report(text: &str) -> Value {
    let json = text.rsplit_once(JSON_MARK).map_or("", |(_, j)| j.trim());
    serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("no JSON report ({e}) in:\n{}", tail(text, 40)))
}

macro_rules! batch_or_skip {
    () => {
        match batch() {
            Ok(b) => b,
            Err(why) => skip!("the emulated AMD-V host cannot run here: {why}"),
        }
    };
}

#[test]
fn l1_runs_kvm_with_npt_and_the_tdp_mmu() {
    let out = batch_or_skip!();
    let t = &out.transcript;
    assert!(t.booted, "{}", out.diagnosis());
    assert!(t.errors.is_empty(), "{}", out.diagnosis());
    assert_eq!(t.host_value("kvm"), Some("yes"), "{:?}", t.host);
    assert_eq!(t.host_value("npt"), Some("Y"), "{:?}", t.host);
    assert_eq!(t.host_value("tdp_mmu"), Some("Y"), "{:?}", t.host);
    assert_ne!(t.host_value("svm"), Some("0"), "{:?}", t.host);
    assert!(out.complete(), "{}", out.diagnosis());
}

#[test]
fn linux_prints_init_ok_and_vmm_exits_0_with_stdout_on_the_console() {
    let out = batch_or_skip!();
    let r = result(out, "linux-hello");
    assert!(
        out.console.contains(INIT_OK_MARKER),
        "{INIT_OK_MARKER} not on L1's console.\n{}\n--- vmm stderr:\n{}",
        out.diagnosis(),
        tail(&r.output, 30)
    );
    assert_eq!(
        r.rc,
        0,
        "vmm run did not exit 0 by itself:\n{}",
        tail(&r.output, 40)
    );
    // The VMM offers the TSC-deadline timer: no LAPIC timer calibration, which
    // fails now and then on an emulated host and leaves the guest on the PIT.
    assert!(
        out.console.contains("TSC deadline timer available"),
        "{}",
        out.diagnosis()
    );
    let rep = report(&r.output);
    let outcome = rep["outcome"].as_str().unwrap_or_default();
    assert!(
        outcome.contains("halted for good") && outcome.contains("System halted"),
        "{outcome}"
    );
    assert_eq!(num(&rep, &["console", "bytes_dropped"]), 0, "{rep:#}");
    assert!(num(&rep, &["console", "bytes_written"]) > 1000, "{rep:#}");
}

/// KVM's counters equal the mirror's at the end and at every checkpoint (TDP MMU:
/// exact for 2M and 4K).
fn kvm_equals_mirror(out: &BatchOutcome, id: &str) -> Value {
    let r = result(out, id);
    assert_eq!(r.rc, 0, "{id}:\n{}", tail(&r.output, 40));
    let rep = report(&r.output);
    assert_eq!(rep["host"]["kind"], "HardwareVirt", "{}", rep["host"]);
    let kvm = |v: &Value| {
        (
            num(v, &["kvm", "pages_1g"]),
            num(v, &["kvm", "pages_2m"]),
            num(v, &["kvm", "pages_4k"]),
        )
    };
    assert_eq!(
        kvm(&rep),
        (
            num(&rep, &["mirror", "pages_1g"]),
            num(&rep, &["mirror", "pages_2m"]),
            num(&rep, &["mirror", "pages_4k"])
        ),
        "{id} at the end: KVM (1g, 2m, 4k) vs mirror"
    );
    for c in rep["checkpoints"].as_array().into_iter().flatten() {
        assert_eq!(
            kvm(c),
            (
                num(c, &["mirror_pages_1g"]),
                num(c, &["mirror_pages_2m"]),
                num(c, &["mirror_pages_4k"])
            ),
            "{id} checkpoint {}: KVM (1g, 2m, 4k) vs mirror",
            c["phase"]
        );
    }
    rep
}

#[test]
fn hello_maps_every_frame_2m_as_the_mirror_predicts() {
    let out = batch_or_skip!();
    let rep = kvm_equals_mirror(out, "hello-hugetlb");
    assert_eq!(
        num(&rep, &["kvm", "pages_2m"]),
        128,
        "256 MiB = 128 frames, all 2M"
    );
}

#[test]
fn verify_hugetlb_kvm_equals_mirror() {
    let out = batch_or_skip!();
    kvm_equals_mirror(out, "verify-hugetlb");
}

#[test]
fn verify_thp_kvm_equals_mirror() {
    let out = batch_or_skip!();
    kvm_equals_mirror(out, "verify-thp");
}

fn unmap(id: &str) {
    let out = batch_or_skip!();
    unmap_in(out, id);
}

/// `unmap` (K = 8) exact on the TDP MMU: `pages_2m` down by K and back.
fn unmap_in(out: &BatchOutcome, id: &str) -> Value {
    let rep = kvm_equals_mirror(out, id);
    let k = num(&rep, &["report_totals", "pages_discarded"]);
    assert_eq!(k, 8);
    assert_eq!(num(&rep, &["report_totals", "mismatches"]), 0);
    let phase = |p: u64| {
        rep["checkpoints"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["phase"].as_u64() == Some(p)))
            .unwrap_or_else(|| panic!("no checkpoint {p}"))
            .clone()
    };
    let two_m = |p: u64| num(&phase(p), &["kvm", "pages_2m"]);
    assert_eq!(two_m(1) - two_m(2), k, "give-back splits exactly K frames");
    assert_eq!(two_m(5), two_m(1), "collapse brings them back");
    rep
}

/// `unmap` with 4.5 GiB of guest RAM, two memslots around the 32-bit MMIO
/// hole, 8 frames given back of which 2 above 4 GiB (`stride=256`): KVM's
/// TDP MMU equals the mirror at every checkpoint, and at checkpoint 3 the
/// two frames above the hole are mapped with 512 4K leaves each.
#[test]
fn unmap_above_4g_hugetlb_on_tdp() {
    let out = match batch_above_4g() {
        Ok(b) => b,
        Err(why) => skip!("the emulated AMD-V host cannot run here: {why}"),
    };
    let rep = unmap_in(out, ABOVE_4G);
    let slots: Vec<(u64, u64)> = rep["slots"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| (num(s, &["gpa"]), num(s, &["size"])))
        .collect();
    assert_eq!(slots, vec![(0, 3 << 30), (4 << 30, 3 << 29)], "{rep:#}");
    let c3 = rep["checkpoints"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["phase"].as_u64() == Some(3)))
        .expect("checkpoint 3");
    let slot1 = c3["mirror"]["per_slot"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["id"].as_u64() == Some(1)))
        .expect("slot 1 in the prediction");
    assert_eq!(
        (num(slot1, &["pages_4k"]), num(slot1, &["pages_2m"])),
        (2 * 512, 768 - 2),
        "{c3:#}"
    );
}

/// Issue 18's done-when: `unmap` in 8 GiB of guest RAM on eight 1G pages,
/// with 1G guest pages (both sides of the 32-bit MMIO hole): the TDP MMU maps
/// it with eight 1G leaves; the give-back splits the first GiB 1G -> 2M and
/// only its 8 frames to 4K; the collapse climbs back to eight 1G leaves. KVM
/// equals the mirror (1g, 2m, 4k) at every checkpoint.
#[test]
fn unmap_on_1g_pages_maps_1g_splits_to_2m_and_4k_and_climbs_back_on_tdp() {
    let out = match batch_1g() {
        Ok(b) => b,
        Err(why) => skip!("the emulated AMD-V host cannot run here: {why}"),
    };
    let rep = kvm_equals_mirror(out, ON_1G);
    assert_eq!(num(&rep, &["report_totals", "mismatches"]), 0);
    assert_eq!(num(&rep, &["report_totals", "nonzero_discarded"]), 0);
    let c = |p: u64| {
        rep["checkpoints"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["phase"].as_u64() == Some(p)))
            .unwrap_or_else(|| panic!("no checkpoint {p}: {rep:#}"))
    };
    let (c1, c2, c5) = (c(1), c(2), c(5));
    let (gig, small, one_g) = (
        |c: &Value| num(c, &["frames", "gig"]),
        |c: &Value| num(c, &["frames", "small"]),
        |c: &Value| num(c, &["kvm", "pages_1g"]),
    );
    assert_eq!(
        (gig(c1), one_g(c1)),
        (8 * 512, 8),
        "eight 1G leaves: {c1:#}"
    );
    assert_eq!((gig(c2), small(c2)), (7 * 512, 8), "{c2:#}");
    assert_eq!(one_g(c2), 7, "{c2:#}");
    assert_eq!((gig(c5), one_g(c5)), (8 * 512, 8), "back to eight: {c5:#}");
    // The mirror's per-memslot counts hold the 1G leaves too.
    let slots_1g = |c: &Value| -> u64 {
        c["mirror"]["per_slot"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| num(s, &["pages_1g"]))
            .sum()
    };
    assert_eq!((slots_1g(c1), slots_1g(c2)), (8, 7), "{c1:#}");
}

#[test]
fn unmap_hugetlb_splits_and_collapses_exactly_on_tdp() {
    let out = batch_or_skip!();
    let rep = unmap_in(out, "unmap-hugetlb");
    // No vCPU paused for a split: each copied under the frame's write-hold
    // and swapped in one mmap (the L1 kernel has userfaultfd write-protect
    // on hugetlbfs). Nor for a collapse: every page of each frame was taken
    // back, so its small pages are write-held (userfaultfd write-protect on
    // shmem) while they are copied into the huge page.
    let u = &rep["unmap"];
    assert_eq!(num(u, &["split_pause", "count"]), 0, "{u:#}");
    assert_eq!(num(u, &["split_write_hold", "count"]), 8, "{u:#}");
    assert_eq!(num(u, &["collapse_pause", "count"]), 0, "{u:#}");
    assert_eq!(num(u, &["collapse_write_hold", "count"]), 8, "{u:#}");
}

#[test]
fn unmap_thp_splits_and_collapses_exactly_on_tdp() {
    unmap("unmap-thp");
}

fn stress_in(out: &BatchOutcome, id: &str) -> Value {
    let r = result(out, id);
    assert_eq!(r.rc, 0, "{id}:\n{}", tail(&r.output, 60));
    let rep = report(&r.output);
    assert_eq!(
        rep["violations"].as_array().map(Vec::len),
        Some(0),
        "{rep:#}"
    );
    assert!(num(&rep, &["pages_verified"]) > 0);
    let points = rep["quiescent_points"]
        .as_array()
        .expect("quiescent points");
    assert!(!points.is_empty(), "{rep:#}");
    assert!(points.iter().all(|p| p["agrees"] == true), "{rep:#}");
    // The prediction stood on the host's per-frame truth, not our books.
    assert!(
        points.iter().all(|p| p["host_pmd_frames"].is_u64()),
        "{rep:#}"
    );
    rep
}

#[test]
fn stress_hugetlb_on_tdp_has_no_violations() {
    let out = batch_or_skip!();
    let rep = stress_in(out, "stress-hugetlb");
    // The splits ran with the vCPUs running (writes to each frame held).
    assert!(num(&rep, &["unpaused_splits"]) > 0, "{rep:#}");
}

#[test]
fn stress_thp_on_tdp_has_no_violations() {
    let out = batch_or_skip!();
    stress_in(out, "stress-thp");
}

#[test]
fn stress_4k_on_tdp_has_no_violations() {
    let out = batch_or_skip!();
    stress_in(out, "stress-4k");
}

#[test]
fn linux_balloon_while_user_space_works_then_clean_power_off() {
    let out = batch_or_skip!();
    let r = result(out, "balloon-memwork");
    // The script's own lines and the guest console, without the JSON report.
    let text = &r
        .output
        .split(JSON_MARK)
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        text.contains("inflated-64M-while-working"),
        "{}",
        tail(text, 60)
    );
    assert!(text.contains("guest-saw-the-inflate"), "{}", tail(text, 60));
    assert!(text.contains("deflated-to-0"), "{}", tail(text, 60));
    assert!(text.contains("MEMWORK-HIGH"), "{}", tail(text, 60));
    assert!(
        text.contains("MEMWORK-OK"),
        "user-space memory work failed:\n{}",
        tail(text, 60)
    );
    assert!(text.contains("MEMWORK-EXIT rc=0"), "{}", tail(text, 60));
    assert_eq!(
        r.rc,
        0,
        "vmm run did not exit 0 after the guest's power-off:\n{}",
        tail(text, 60)
    );
    let rep = report(&r.output);
    assert!(rep["outcome"]
        .as_str()
        .unwrap_or_default()
        .contains("halted for good"));
    let b = &rep["balloon"];
    assert!(num(b, &["inflated_total"]) >= 16384, "{b:#}");
    assert_eq!(
        num(b, &["inflated_total"]),
        num(b, &["deflated_total"]),
        "{b:#}"
    );
    assert_eq!(num(b, &["inflated_pages"]), 0, "{b:#}");
    assert_eq!(num(b, &["rejected"]), 0, "{b:#}");
    // The give-back split hugetlb frames (partial frames) or freed whole ones.
    let u = &rep["unmap"];
    assert!(
        num(u, &["frames_split"]) + num(u, &["huge_frames_freed"]) > 0,
        "{u:#}"
    );
}

/// `vmm bench workload` ran both backings end to end: every field in the JSON, the
/// command's RESULT, the guest's THP counters, KVM's counts sampled during the run.
fn bench_workload(id: &str, mode: u64) {
    let out = batch_or_skip!();
    if let Some(why) = NO_WORKLOAD_IMAGE.get() {
        skip!("no workload initramfs: {why}");
    }
    let r = result(out, id);
    assert_eq!(r.rc, 0, "{id}:\n{}", tail(&r.output, 60));
    let rep = report(&r.output);
    // The SVG chart was written: a document with a bar per backing and measure.
    let svg = r
        .output
        .lines()
        .find_map(|l| l.strip_prefix("SVG-HEAD "))
        .unwrap_or_default();
    let rects: usize = svg
        .split_once("rects=")
        .and_then(|(_, n)| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        svg.starts_with("<svg") && rects >= 6,
        "{id}: --svg wrote {svg:?}\n{}",
        tail(&r.output, 20)
    );
    for key in [
        "command",
        "host",
        "kernel",
        "initrd",
        "run",
        "guest_thp",
        "memory",
        "repeat",
        "seconds",
        "runs",
        "backings",
    ] {
        assert!(rep.get(key).is_some(), "{id}: no {key} in {rep:#}");
    }
    let kind = rep["host"]["kvm_kind"].as_str().unwrap_or_default();
    assert!(kind.starts_with("hardware-virt"), "{}", rep["host"]);
    assert_eq!(rep["guest_thp"], "always");
    let runs = rep["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{rep:#}");
    let want = format!(
        "{:#x}",
        tlb::expected_checksum(&tlb::TlbParams {
            ws: 64 << 20,
            accesses: 200_000,
            mode,
            seed: tlb::DEFAULT_SEED,
        })
    );
    for run in runs {
        let b = run["backing"].as_str().unwrap_or_default();
        assert_eq!(run["rc"], 0, "{run:#}");
        assert!(
            run["wall_seconds"].as_f64().is_some_and(|w| w > 0.0),
            "{run:#}"
        );
        let res = &run["result"];
        assert!(
            res["ns_per_access"].as_f64().is_some_and(|v| v > 0.0),
            "{run:#}"
        );
        assert_eq!(num(res, &["accesses"]), 200_000, "{run:#}");
        assert_eq!(num(res, &["ws"]), 64 << 20, "{run:#}");
        // The same loop as the `tlb` test guest: the same checksum.
        assert_eq!(
            res["checksum"].as_str(),
            Some(want.as_str()),
            "{b}: {run:#}"
        );
        // The guest's THP counters came back (mode set by vmm.thp=always).
        assert_eq!(run["guest"]["thp_enabled"], "always", "{run:#}");
        assert!(run["guest"]["AnonHugePages_kb"].is_u64(), "{run:#}");
        // Sampled while the guest ran, not only at the end.
        let samples = run["kvm_samples"].as_array().expect("kvm_samples");
        assert!(samples.len() >= 2, "{b}: {} samples", samples.len());
        assert!(samples
            .iter()
            .all(|s| s["pages_2m"].is_u64() && s["pages_4k"].is_u64()));
        assert!(run["kvm_end"]["pages_2m"].is_u64(), "{run:#}");
        assert!(run["host_memory_end"]["total_bytes"].is_u64(), "{run:#}");
        let peak_2m = num(run, &["kvm_peak", "pages_2m"]);
        match b {
            "4k" => {
                assert_eq!(peak_2m, 0, "4k backing: KVM must map no 2M page");
                // The 64M working set alone is 16384 pages.
                assert!(num(run, &["kvm_peak", "pages_4k"]) >= 16384, "{run:#}");
            }
            "hugetlb" => assert!(peak_2m > 0, "hugetlb backing: KVM mapped no 2M page"),
            other => panic!("unexpected backing {other}"),
        }
        // The most 2M pages any sample saw is the peak.
        let max_sample = samples.iter().filter_map(|s| s["pages_2m"].as_u64()).max();
        assert!(max_sample <= Some(peak_2m), "{run:#}");
    }
    let backings = rep["backings"].as_array().expect("backings");
    let names: Vec<&str> = backings
        .iter()
        .filter_map(|b| b["backing"].as_str())
        .collect();
    assert_eq!(names, ["4k", "hugetlb"]);
    for b in backings {
        assert_eq!(b["runs"], 1, "{b:#}");
        assert!(b["wall_seconds"]["median"].is_f64(), "{b:#}");
        assert!(b["result"]["ns_per_access"]["median"].is_f64(), "{b:#}");
        assert!(b["ns_per_access_ratio_to_4k"].is_f64(), "{b:#}");
        assert!(b["wall_ratio_to_4k"].is_f64(), "{b:#}");
        assert!(b["kvm_pages_2m_peak"].is_u64(), "{b:#}");
    }
    assert_eq!(backings[0]["ns_per_access_ratio_to_4k"], 1.0);
    // The table on stdout names both backings.
    let text = r.output.split(JSON_MARK).next().unwrap_or_default();
    assert!(
        text.contains("KVM 2m peak") && text.contains("hugetlb"),
        "{}",
        tail(text, 20)
    );
}

#[test]
fn bench_workload_chase_runs_end_to_end_with_kvm_counts_by_backing() {
    bench_workload("bench-workload-chase", tlb::MODE_CHASE);
}

#[test]
fn bench_workload_gups_runs_end_to_end_with_kvm_counts_by_backing() {
    bench_workload("bench-workload-gups", tlb::MODE_GUPS);
}

#[test]
fn bench_tlb_guest_linux_runs_the_chase_program_with_kvm_counts_by_backing() {
    let out = batch_or_skip!();
    if let Some(why) = NO_WORKLOAD_IMAGE.get() {
        skip!("no workload initramfs: {why}");
    }
    let r = result(out, TLB_LINUX);
    // A wrong checksum from the guest program would have exited 4.
    assert_eq!(r.rc, 0, "{}", tail(&r.output, 60));
    let rep = report(&r.output);
    assert_eq!(rep["guest"], "linux", "{rep:#}");
    let configs = rep["configs"].as_array().expect("configs");
    assert_eq!(configs.len(), 2, "{rep:#}");
    for c in configs {
        assert!(
            c["ns_per_access"]["median"]
                .as_f64()
                .is_some_and(|v| v > 0.0),
            "{c:#}"
        );
        assert_eq!(num(c, &["guest_memory"]), (64 + 192) << 20, "{c:#}");
        let p2m = num(c, &["kvm_pages_2m"]);
        match c["backing"].as_str() {
            Some("4k") => assert_eq!(p2m, 0, "{c:#}"),
            Some("hugetlb") => assert!(p2m > 0, "{c:#}"),
            other => panic!("unexpected backing {other:?}"),
        }
    }
}
