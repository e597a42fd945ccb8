//! `stress`: the guest side of `vmm stress` (mmu-notifier fault injection).
//!
//! A variant of `verify` that never stops on its own: every vCPU makes pass
//! after pass `g = 1, 2, ...` over its slice; for each 4K page it checks the
//! stamp of the previous pass (generation `g - 1`; generation 0 = all zero),
//! then writes the stamp of generation `g`; at the end of each pass it reads
//! every page of the reserved region (so a quiescent point finds all of it
//! mapped, whatever the host zapped before). It stops at the end of a pass
//! once the VMM set `stop` in its control block, reports and exits.
//!
//! # Stamp
//!
//! qword 0 = `gfn | generation << 32`, qword `i >= 1` = `q0 * GOLDEN + i`:
//! every qword depends on both gfn and generation, so a qword left over from
//! an older generation (a stale read) never matches.
//!
//! # The shared log (written by the VMM with all vCPUs paused)
//!
//! * `expect_zero[page]`, one byte per page of the work region at
//!   [`SharedArea::flags`]: the VMM sets it to 1 *before* it discards the page, in
//!   the same pause. The guest consumes it with `xchg` (atomic with respect to
//!   a pause: a vCPU is stopped between instructions) right before checking
//!   the page, and then expects the page to read all zero.
//! * `epoch` in each vCPU's control block: the VMM increments it with every
//!   discard in that vCPU's slice. A page step snapshots it first; a check
//!   that fails while the epoch moved is not a violation (the discard landed
//!   in the middle of the check) and the step starts again; a step whose
//!   page was discarded during its own stamp writes the stamp again.
//!
//! So every discard that does not hit the page a vCPU is working on at that
//! moment is checked strictly: the page must read all zero (not stale data),
//! and every other page must hold exactly the previous generation (no lost
//! write).
//!
//! # Control block per vCPU ([`SharedArea::ctrl`] + 128 * vCPU, u64 fields)
//!
//! See the `OFF_*` constants. The guest writes its counters there as it
//! goes, so the VMM can read them whenever the vCPUs are paused.

use iced_x86::code_asm::*;

use super::pattern::GOLDEN;
use crate::testguest::builder::GuestBuilder;
use crate::testguest::device::ReportKey;
use crate::testguest::layout::{Layout, MAX_VCPUS, PAGE};
use crate::testguest::{TestGuestError, TestGuestName, TestGuestParams};

/// Distance between two control blocks.
pub const CTRL_STRIDE: u64 = 128;

/// Where the shared area lives: right after the guest's page tables, inside
/// the reserved region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedArea {
    /// Control blocks, one per vCPU, [`CTRL_STRIDE`] apart.
    pub ctrl: u64,
    /// The expect-zero byte map: byte `gfn - first_gfn`.
    pub flags: u64,
    /// First gfn of the work region.
    pub first_gfn: u64,
    /// Pages of the work region (bytes of the map).
    pub pages: u64,
}

impl SharedArea {
    /// Bytes the area needs at most for `ram_size` bytes of RAM (control
    /// blocks, one expect-zero byte per page, alignment).
    pub fn bytes_needed(ram_size: u64) -> u64 {
        PAGE + CTRL_STRIDE * MAX_VCPUS as u64 + ram_size / PAGE
    }

    /// The area for `layout`, or why it does not fit.
    pub fn new(layout: &Layout) -> Result<SharedArea, String> {
        let ctrl = layout
            .tables_end
            .max(layout.boot_tables_end())
            .next_multiple_of(PAGE);
        let flags = ctrl + CTRL_STRIDE * MAX_VCPUS as u64;
        let pages = (layout.ram_size - layout.reserved.end) / PAGE;
        if flags + pages > layout.reserved.end {
            return Err(format!(
                "the stress guest's expect-zero map of {pages} bytes at {flags:#x} does not fit \
                 below the end of the reserved region {:#x}; use 2M guest pages or another RAM size",
                layout.reserved.end
            ));
        }
        Ok(SharedArea {
            ctrl,
            flags,
            first_gfn: layout.reserved.end / PAGE,
            pages,
        })
    }

    /// Gpa of vCPU `cpu`'s control block.
    pub fn ctrl_block(&self, cpu: usize) -> u64 {
        self.ctrl + cpu as u64 * CTRL_STRIDE
    }

    /// Gpa of the expect-zero byte of the page at virtual address `va`
    /// (the guest's; `Layout::va_of` of a guest-physical address).
    pub fn flag(&self, va: u64) -> u64 {
        self.flags + va / PAGE - self.first_gfn
    }
}

/// VMM → guest: discard epoch of this vCPU's slice.
pub const OFF_EPOCH: u64 = 0;
/// VMM → guest: stop at the end of the pass when non-zero.
pub const OFF_STOP: u64 = 8;
/// Guest: passes completed.
pub const OFF_PASSES: u64 = 16;
/// Guest: pages checked.
pub const OFF_PAGES: u64 = 24;
/// Guest: violations (pages that did not read as expected).
pub const OFF_VIOLATIONS: u64 = 32;
/// Guest: gfn of the first violation.
pub const OFF_BAD_GFN: u64 = 40;
/// Guest: qword index of the first bad qword of that page.
pub const OFF_BAD_INDEX: u64 = 48;
/// Guest: the value expected there.
pub const OFF_BAD_EXPECTED: u64 = 56;
/// Guest: the value read there.
pub const OFF_BAD_ACTUAL: u64 = 64;
/// Guest: generation expected (0 = the page was logged as discarded).
pub const OFF_BAD_GEN: u64 = 72;
/// Guest: the pass during which it was found.
pub const OFF_BAD_PASS: u64 = 80;
/// Guest: gpa of the page being worked on (a hint for the VMM).
pub const OFF_CURSOR: u64 = 88;
/// Guest: steps restarted because a discard landed in the middle.
pub const OFF_RETRIES: u64 = 96;

/// No arguments.
pub const ARGS: &[&str] = &[];

/// Qword `i` of the stamp of the page at `gpa` in generation `generation`
/// (generation 0: zero).
pub fn stamp_qword(gpa: u64, generation: u64, i: usize) -> u64 {
    if generation == 0 {
        return 0;
    }
    let q0 = (gpa >> 12) | (generation << 32);
    if i == 0 {
        q0
    } else {
        q0.wrapping_mul(GOLDEN).wrapping_add(i as u64)
    }
}

/// Emits the workload. Registers: r12/r13 slice, r14 command block, r15
/// vCPU (preserved); rbx = generation, rdi = page, rsi = control block,
/// rbp = flag base (FLAGS_ADDR - first work gfn), r10 = GOLDEN, r8 = epoch
/// snapshot, r9 = expected generation, r11 = flag address.
pub fn emit(b: &mut GuestBuilder, params: &TestGuestParams) -> Result<(), TestGuestError> {
    let area = SharedArea::new(&b.layout).map_err(|why| TestGuestError::BadArg {
        guest: TestGuestName::Stress,
        arg: "memory",
        value: params.ram_size,
        why,
    })?;
    // The reserved region ends below 2 GiB (it holds at most the 4K tables
    // of MAX_RAM), so it fits the sweep's 32-bit immediates.
    let reserved_start = b.layout.reserved.start as u32;
    let reserved_end = b.layout.reserved.end as i32;
    let a = &mut b.a;
    let mut pass = a.create_label();
    let mut page_loop = a.create_label();
    let mut pass_done = a.create_label();
    let mut again = a.create_label();
    let mut not_zero = a.create_label();
    let mut check_stamp = a.create_label();
    let mut zl = a.create_label();
    let mut sl = a.create_label();
    let mut bad = a.create_label();
    let mut counted = a.create_label();
    let mut stamp = a.create_label();
    let mut st = a.create_label();
    let mut next = a.create_label();
    let mut finish = a.create_label();

    a.mov(rsi, r15)?;
    a.shl(rsi, 7)?;
    a.mov(rax, area.ctrl)?;
    a.add(rsi, rax)?;
    a.mov(rbp, area.flags.wrapping_sub(area.first_gfn))?;
    a.mov(r10, GOLDEN)?;
    a.mov(ebx, 1)?;
    a.set_label(&mut pass)?;
    a.mov(rdi, r12)?;
    a.set_label(&mut page_loop)?;
    a.cmp(rdi, r13)?;
    a.jae(pass_done)?;
    a.mov(qword_ptr(rsi + OFF_CURSOR as i32), rdi)?;

    // again: snapshot the epoch, consume the flag, pick the expectation.
    a.set_label(&mut again)?;
    a.mov(r8, qword_ptr(rsi + OFF_EPOCH as i32))?;
    a.mov(r11, rdi)?;
    a.shr(r11, 12)?;
    a.add(r11, rbp)?;
    a.xor(eax, eax)?;
    a.xchg(byte_ptr(r11), al)?;
    a.mov(r9, rbx)?;
    a.dec(r9)?;
    a.test(al, al)?;
    a.jz(not_zero)?;
    a.xor(r9d, r9d)?;
    a.set_label(&mut not_zero)?;
    a.test(r9, r9)?;
    a.jnz(check_stamp)?;
    // Expect all zero: rdx = expected (0), rcx = index.
    a.xor(edx, edx)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut zl)?;
    a.cmp(qword_ptr(rdi + rcx * 8), rdx)?;
    a.jne(bad)?;
    a.inc(ecx)?;
    a.cmp(ecx, 512)?;
    a.jb(zl)?;
    a.jmp(stamp)?;
    // Expect the stamp of generation r9.
    a.set_label(&mut check_stamp)?;
    a.mov(rdx, r9)?;
    a.shl(rdx, 32)?;
    a.mov(rax, rdi)?;
    a.shr(rax, 12)?;
    a.or(rdx, rax)?;
    a.xor(ecx, ecx)?;
    a.cmp(qword_ptr(rdi), rdx)?;
    a.jne(bad)?;
    a.imul_2(rdx, r10)?;
    a.inc(rdx)?;
    a.mov(ecx, 1)?;
    a.set_label(&mut sl)?;
    a.cmp(qword_ptr(rdi + rcx * 8), rdx)?;
    a.jne(bad)?;
    a.inc(rdx)?;
    a.inc(ecx)?;
    a.cmp(ecx, 512)?;
    a.jb(sl)?;

    // stamp generation rbx.
    a.set_label(&mut stamp)?;
    a.mov(rdx, rbx)?;
    a.shl(rdx, 32)?;
    a.mov(rax, rdi)?;
    a.shr(rax, 12)?;
    a.or(rdx, rax)?;
    a.mov(qword_ptr(rdi), rdx)?;
    a.imul_2(rdx, r10)?;
    a.inc(rdx)?;
    a.mov(ecx, 1)?;
    a.set_label(&mut st)?;
    a.mov(qword_ptr(rdi + rcx * 8), rdx)?;
    a.inc(rdx)?;
    a.inc(ecx)?;
    a.cmp(ecx, 512)?;
    a.jb(st)?;
    // A discard of this very page during the step: stamp it again.
    a.cmp(r8, qword_ptr(rsi + OFF_EPOCH as i32))?;
    a.je(next)?;
    a.mov(r8, qword_ptr(rsi + OFF_EPOCH as i32))?;
    a.xor(eax, eax)?;
    a.xchg(byte_ptr(r11), al)?;
    a.test(al, al)?;
    a.jz(next)?;
    a.inc(qword_ptr(rsi + OFF_RETRIES as i32))?;
    a.jmp(stamp)?;
    a.set_label(&mut next)?;
    a.inc(qword_ptr(rsi + OFF_PAGES as i32))?;
    a.add(rdi, 0x1000)?;
    a.jmp(page_loop)?;

    // bad: rcx = index, rdx = expected.
    a.set_label(&mut bad)?;
    a.cmp(r8, qword_ptr(rsi + OFF_EPOCH as i32))?;
    a.je(counted)?;
    a.inc(qword_ptr(rsi + OFF_RETRIES as i32))?;
    a.jmp(again)?;
    a.set_label(&mut counted)?;
    let mut recorded = a.create_label();
    a.cmp(qword_ptr(rsi + OFF_VIOLATIONS as i32), 0)?;
    a.jne(recorded)?;
    a.mov(rax, rdi)?;
    a.shr(rax, 12)?;
    a.mov(qword_ptr(rsi + OFF_BAD_GFN as i32), rax)?;
    a.mov(qword_ptr(rsi + OFF_BAD_INDEX as i32), rcx)?;
    a.mov(qword_ptr(rsi + OFF_BAD_EXPECTED as i32), rdx)?;
    a.mov(rax, qword_ptr(rdi + rcx * 8))?;
    a.mov(qword_ptr(rsi + OFF_BAD_ACTUAL as i32), rax)?;
    a.mov(qword_ptr(rsi + OFF_BAD_GEN as i32), r9)?;
    a.mov(qword_ptr(rsi + OFF_BAD_PASS as i32), rbx)?;
    a.set_label(&mut recorded)?;
    a.inc(qword_ptr(rsi + OFF_VIOLATIONS as i32))?;
    a.jmp(stamp)?;

    // End of a pass: read one byte of every page of the reserved region,
    // so that every pass maps all of it again whatever the host zapped
    // (e.g. 6.1's `kvm_mmu_zap_collapsible_sptes` when dirty logging
    // stops) and a quiescent point finds it mapped: the mirror counts
    // it touched (`GuestTouches::data`).
    a.set_label(&mut pass_done)?;
    let mut sweep = a.create_label();
    a.mov(eax, reserved_start)?;
    a.set_label(&mut sweep)?;
    a.mov(dl, byte_ptr(rax))?;
    a.add(rax, PAGE as i32)?;
    a.cmp(rax, reserved_end)?;
    a.jb(sweep)?;
    a.inc(qword_ptr(rsi + OFF_PASSES as i32))?;
    a.cmp(qword_ptr(rsi + OFF_STOP as i32), 0)?;
    a.jne(finish)?;
    a.inc(rbx)?;
    a.jmp(pass)?;

    a.set_label(&mut finish)?;
    a.mov(r8, qword_ptr(rsi + OFF_VIOLATIONS as i32))?;
    a.mov(r9, qword_ptr(rsi + OFF_PAGES as i32))?;
    b.report(ReportKey::Mismatches, r8)?;
    b.report(ReportKey::PagesChecked, r9)?;
    b.a.mov(rbx, qword_ptr(rsi + OFF_PASSES as i32))?;
    b.report(ReportKey::Generations, rbx)?;
    b.status_from(r8)?;
    b.a.ret()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_differ_by_generation_in_every_qword() {
        for i in 0..512 {
            let a = stamp_qword(0x40_0000, 3, i);
            let b = stamp_qword(0x40_0000, 4, i);
            assert_ne!(a, b, "qword {i}");
            assert_ne!(a, 0);
            assert_eq!(stamp_qword(0x40_0000, 0, i), 0);
        }
        assert_eq!(stamp_qword(0x40_0000, 3, 0), 0x400 | 3 << 32);
    }

    #[test]
    fn control_area_and_map_fit_the_reserved_region() {
        use crate::testguest::GuestPageSize;
        for pages in [GuestPageSize::Size2M, GuestPageSize::Size4K] {
            for ram in [64u64 << 20, 256 << 20, 3 << 30] {
                let l = Layout::new(ram, 8, pages).unwrap();
                let a = SharedArea::new(&l).unwrap();
                assert!(a.ctrl >= l.tables_end);
                assert_eq!(a.flag(l.reserved.end), a.flags);
                assert!(a.flag(ram - 4096) < l.reserved.end);
            }
        }
    }
}
