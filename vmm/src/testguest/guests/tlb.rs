//! `tlb`: a TLB-heavy CPL3 workload for `vmm bench tlb`.
//!
//! Every vCPU works on the first `ws` bytes of its slice (the *table*,
//! `base = slice start`). Two modes:
//!
//! * **chase** (`mode = 0`): one *slot* per 4K page of the table, at a
//!   pseudo-random cache line of the page ([`slot_offset`]), so consecutive
//!   slots neither share a page nor a cache set. Set-up (untimed): slot `p`
//!   gets its own address (this also touches every page: the warm-up), then
//!   Sattolo's algorithm with [`xorshift64`] shuffles the slot contents into one
//!   random cycle through all pages (`j = mulhi(x, i)`). Then
//!   `min(pages, accesses)` untimed steps warm the TLB and caches, and the
//!   timed loop (`lfence; rdtsc`) runs `accesses` dependent loads
//!   `rax = [rax]` starting at slot 0: every load needs the previous one, so
//!   the hardware cannot prefetch and each step pays a full translation.
//!   Checksum: offset of the final slot from `base`.
//! * **gups** (`mode = 1`): every page is touched once (warm-up), then
//!   `min(pages, accesses)` untimed and `accesses` timed updates
//!   `table[mulhi(x, ws / 8)] ^= x` with `x` = the next [`xorshift64`] value.
//!   Checksum: the XOR of all qwords of the table afterwards, which equals the
//!   XOR of every `x` used (the table starts zero).
//!
//! Reports `cycles` (TSC cycles of the timed loop), `checksum`,
//! [`KEY_ACCESSES`] (timed accesses) and [`KEY_SETUP_CYCLES`] (TSC cycles
//! from entry to the start of the timed loop). Always succeeds; a wrong
//! checksum is detected by the VMM (see [`expected_checksum`]).

use iced_x86::code_asm::*;

use crate::testguest::builder::{Arg, GuestBuilder};
use crate::testguest::device::{ReportKey, CMD_REPORT};
use crate::testguest::{TestGuestError, TestGuestName, TestGuestParams};

/// Arguments: `ws` (table bytes per vCPU, multiple of 4K, default the whole
/// slice), `accesses` (timed accesses, default [`DEFAULT_ACCESSES`]), `mode`
/// ([`MODE_CHASE`] or [`MODE_GUPS`], default chase), `seed` (PRNG seed, non-zero).
pub const ARGS: &[&str] = &["ws", "accesses", "mode", "seed"];
/// Default number of timed accesses.
pub const DEFAULT_ACCESSES: u64 = 1_000_000;
/// Largest number of timed accesses.
pub const MAX_ACCESSES: u64 = 1 << 40;
/// Default PRNG seed.
pub const DEFAULT_SEED: u64 = 0x2545_F491_4F6C_DD1D;
/// Pointer chase.
pub const MODE_CHASE: u64 = 0;
/// GUPS-style random read-modify-write.
pub const MODE_GUPS: u64 = 1;
/// Raw REPORT key: timed accesses performed.
pub const KEY_ACCESSES: u64 = 0x7401;
/// Raw REPORT key: TSC cycles from entry to the timed loop (set-up, warm-up).
pub const KEY_SETUP_CYCLES: u64 = 0x7402;

/// Multiplier of the slot-line hash.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const PAGE: u64 = 4096;

/// The validated parameters of a `tlb` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlbParams {
    /// Table bytes (multiple of 4K).
    pub ws: u64,
    /// Timed accesses.
    pub accesses: u64,
    /// [`MODE_CHASE`] or [`MODE_GUPS`].
    pub mode: u64,
    /// PRNG seed (non-zero).
    pub seed: u64,
}

impl TlbParams {
    /// Pages of the table.
    pub fn pages(&self) -> u64 {
        self.ws / PAGE
    }

    /// Untimed warm-up accesses.
    pub fn warm_accesses(&self) -> u64 {
        self.pages().min(self.accesses)
    }
}

/// One step of the xorshift64 generator (13, 7, 17).
pub fn xorshift64(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// High 64 bits of `x * n`: a value in `[0, n)`.
pub fn mulhi(x: u64, n: u64) -> u64 {
    ((u128::from(x) * u128::from(n)) >> 64) as u64
}

/// Offset of the chase slot of page `p` from the table base.
pub fn slot_offset(p: u64) -> u64 {
    (p << 12) + ((p.wrapping_mul(GOLDEN) >> 58) << 6)
}

/// The chase cycle as "next page" indices: Sattolo's algorithm exactly as the
/// guest (and the native benchmark) runs it.
pub fn chase_permutation(pages: u64, seed: u64) -> Vec<u32> {
    let mut a: Vec<u32> = (0..pages).map(|p| p as u32).collect();
    let mut x = seed;
    let mut i = pages.saturating_sub(1);
    while i > 0 {
        x = xorshift64(x);
        let j = mulhi(x, i);
        a.swap(i as usize, j as usize);
        i -= 1;
    }
    a
}

/// The checksum a correct run reports.
pub fn expected_checksum(p: &TlbParams) -> u64 {
    match p.mode {
        MODE_CHASE => {
            let next = chase_permutation(p.pages(), p.seed);
            let mut cur = 0usize;
            for _ in 0..p.accesses {
                cur = next[cur] as usize;
            }
            slot_offset(cur as u64)
        }
        _ => {
            let mut x = p.seed;
            let mut acc = 0u64;
            for _ in 0..p.warm_accesses() + p.accesses {
                x = xorshift64(x);
                acc ^= x;
            }
            acc
        }
    }
}

fn bad(arg: &'static str, value: u64, why: String) -> TestGuestError {
    TestGuestError::BadArg {
        guest: TestGuestName::Tlb,
        arg,
        value,
        why,
    }
}

/// Validates the arguments against the layout of `b`.
pub fn params(b: &GuestBuilder, params: &TestGuestParams) -> Result<TlbParams, TestGuestError> {
    let slice = b
        .layout
        .slices
        .iter()
        .map(|s| s.end - s.start)
        .min()
        .unwrap_or(0);
    let get = |k: &str, d: u64| params.args.get(k).copied().unwrap_or(d);
    let p = TlbParams {
        ws: get("ws", slice),
        accesses: get("accesses", DEFAULT_ACCESSES),
        mode: get("mode", MODE_CHASE),
        seed: get("seed", DEFAULT_SEED),
    };
    if p.ws == 0 || !p.ws.is_multiple_of(PAGE) || p.ws > slice {
        return Err(bad(
            "ws",
            p.ws,
            format!("must be a non-zero multiple of 4096 and at most the slice size {slice:#x}"),
        ));
    }
    if p.pages() > u64::from(u32::MAX) {
        return Err(bad("ws", p.ws, "too many pages".into()));
    }
    if p.accesses == 0 || p.accesses > MAX_ACCESSES {
        return Err(bad(
            "accesses",
            p.accesses,
            format!("must be in 1..={MAX_ACCESSES}"),
        ));
    }
    if p.mode != MODE_CHASE && p.mode != MODE_GUPS {
        return Err(bad("mode", p.mode, "must be 0 (chase) or 1 (gups)".into()));
    }
    if p.seed == 0 {
        return Err(bad("seed", 0, "xorshift needs a non-zero seed".into()));
    }
    Ok(p)
}

/// `dst = tsc` (lfence; rdtsc). Clobbers rax, rdx.
fn emit_tsc(a: &mut CodeAssembler, dst: AsmRegister64) -> Result<(), TestGuestError> {
    a.lfence()?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(dst, rax)?;
    Ok(())
}

/// `rbx = xorshift64(rbx)`. Clobbers rax.
fn emit_xorshift(a: &mut CodeAssembler) -> Result<(), TestGuestError> {
    a.mov(rax, rbx)?;
    a.shl(rax, 13)?;
    a.xor(rbx, rax)?;
    a.mov(rax, rbx)?;
    a.shr(rax, 7)?;
    a.xor(rbx, rax)?;
    a.mov(rax, rbx)?;
    a.shl(rax, 17)?;
    a.xor(rbx, rax)?;
    Ok(())
}

/// `dst = r12 + slot_offset(p)`; `r10` = GOLDEN. Clobbers rdx.
fn emit_slot(
    a: &mut CodeAssembler,
    dst: AsmRegister64,
    p: AsmRegister64,
) -> Result<(), TestGuestError> {
    a.mov(dst, p)?;
    a.imul_2(dst, r10)?;
    a.shr(dst, 58)?;
    a.shl(dst, 6)?;
    a.mov(rdx, p)?;
    a.shl(rdx, 12)?;
    a.add(dst, rdx)?;
    a.add(dst, r12)?;
    Ok(())
}

/// Chase set-up: slots, Sattolo, warm steps. r9 = pages.
fn emit_chase_setup(a: &mut CodeAssembler, p: &TlbParams) -> Result<(), TestGuestError> {
    let mut init = a.create_label();
    let mut init_done = a.create_label();
    let mut satt = a.create_label();
    let mut satt_done = a.create_label();
    let mut warm = a.create_label();
    a.mov(r10, GOLDEN)?;
    a.xor(esi, esi)?;
    a.set_label(&mut init)?;
    a.cmp(rsi, r9)?;
    a.jae(init_done)?;
    emit_slot(a, r8, rsi)?;
    a.mov(qword_ptr(r8), r8)?;
    a.inc(rsi)?;
    a.jmp(init)?;
    a.set_label(&mut init_done)?;
    a.mov(rbx, p.seed)?;
    a.mov(rsi, r9)?;
    a.dec(rsi)?;
    a.set_label(&mut satt)?;
    a.test(rsi, rsi)?;
    a.jz(satt_done)?;
    emit_xorshift(a)?;
    a.mov(rax, rbx)?;
    a.mul(rsi)?;
    a.mov(rdi, rdx)?;
    emit_slot(a, r8, rsi)?;
    emit_slot(a, r11, rdi)?;
    a.mov(rax, qword_ptr(r8))?;
    a.mov(rdx, qword_ptr(r11))?;
    a.mov(qword_ptr(r8), rdx)?;
    a.mov(qword_ptr(r11), rax)?;
    a.dec(rsi)?;
    a.jmp(satt)?;
    a.set_label(&mut satt_done)?;
    a.mov(rax, r12)?;
    a.mov(rcx, p.warm_accesses())?;
    a.set_label(&mut warm)?;
    a.mov(rax, qword_ptr(rax))?;
    a.dec(rcx)?;
    a.jnz(warm)?;
    Ok(())
}

/// The timed chase; leaves cycles in rbp, checksum in rbx.
fn emit_chase_timed(a: &mut CodeAssembler, p: &TlbParams) -> Result<(), TestGuestError> {
    let mut lp = a.create_label();
    emit_tsc(a, rbp)?;
    a.mov(rcx, p.accesses)?;
    a.mov(rax, r12)?;
    a.set_label(&mut lp)?;
    a.mov(rax, qword_ptr(rax))?;
    a.dec(rcx)?;
    a.jnz(lp)?;
    a.mov(rbx, rax)?;
    emit_tsc(a, rax)?;
    a.sub(rax, rbp)?;
    a.mov(rbp, rax)?;
    a.sub(rbx, r12)?;
    Ok(())
}

/// `rcx` GUPS updates (rcx > 0); r9 = qwords, rbx = PRNG state.
fn emit_gups_loop(a: &mut CodeAssembler) -> Result<(), TestGuestError> {
    let mut lp = a.create_label();
    a.set_label(&mut lp)?;
    emit_xorshift(a)?;
    a.mov(rax, rbx)?;
    a.mul(r9)?;
    a.xor(qword_ptr(r12 + rdx * 8), rbx)?;
    a.dec(rcx)?;
    a.jnz(lp)?;
    Ok(())
}

/// GUPS: touch, warm, timed (cycles in rbp), XOR of the table in rbx.
fn emit_gups(a: &mut CodeAssembler, p: &TlbParams) -> Result<(), TestGuestError> {
    let mut touch = a.create_label();
    let mut sum = a.create_label();
    a.mov(rdi, r12)?;
    a.mov(rsi, r12)?;
    a.add(rsi, r9)?; // r9 = ws here
    a.set_label(&mut touch)?;
    a.mov(qword_ptr(rdi), 0)?;
    a.add(rdi, PAGE as i32)?;
    a.cmp(rdi, rsi)?;
    a.jb(touch)?;
    a.shr(r9, 3)?;
    a.mov(rbx, p.seed)?;
    a.mov(rcx, p.warm_accesses())?;
    emit_gups_loop(a)?;
    emit_tsc(a, r11)?;
    a.sub(r11, r13)?; // set-up cycles
    a.add(r13, r11)?; // = start of the timed loop
    a.mov(rcx, p.accesses)?;
    emit_gups_loop(a)?;
    emit_tsc(a, rbp)?;
    a.sub(rbp, r13)?;
    a.xor(ebx, ebx)?;
    a.mov(rdi, r12)?;
    a.set_label(&mut sum)?;
    a.xor(rbx, qword_ptr(rdi))?;
    a.add(rdi, 8)?;
    a.cmp(rdi, rsi)?;
    a.jb(sum)?;
    Ok(())
}

/// Emits the workload.
pub fn emit(b: &mut GuestBuilder, params_in: &TestGuestParams) -> Result<(), TestGuestError> {
    let p = params(b, params_in)?;
    let a = &mut b.a;
    emit_tsc(a, r13)?; // entry time (the slice end is not needed)
    match p.mode {
        MODE_CHASE => {
            a.mov(r9, p.pages())?;
            emit_chase_setup(a, &p)?;
            emit_tsc(a, r11)?;
            a.sub(r11, r13)?;
            emit_chase_timed(a, &p)?;
        }
        _ => {
            a.mov(r9, p.ws)?;
            emit_gups(a, &p)?;
        }
    }
    a.mov(r8, p.accesses)?;
    b.report(ReportKey::Cycles, rbp)?;
    b.report(ReportKey::Checksum, rbx)?;
    b.command(CMD_REPORT, &[Arg::Imm(KEY_ACCESSES as i32), Arg::Reg(r8)])?;
    b.command(
        CMD_REPORT,
        &[Arg::Imm(KEY_SETUP_CYCLES as i32), Arg::Reg(r11)],
    )?;
    b.a.xor(eax, eax)?;
    b.a.ret()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sattolo_makes_one_cycle() {
        for pages in [1u64, 2, 3, 17, 4096] {
            let next = chase_permutation(pages, DEFAULT_SEED);
            let mut seen = vec![false; pages as usize];
            let mut cur = 0usize;
            for _ in 0..pages {
                assert!(!seen[cur], "pages {pages}: revisited {cur}");
                seen[cur] = true;
                cur = next[cur] as usize;
            }
            assert_eq!(cur, 0, "pages {pages}: not one cycle");
        }
    }

    #[test]
    fn slots_stay_in_their_page_and_spread_lines() {
        let lines: std::collections::BTreeSet<u64> =
            (0..4096).map(|p| (slot_offset(p) >> 6) & 63).collect();
        assert!(lines.len() > 48, "{}", lines.len());
        for p in 0..10_000u64 {
            assert_eq!(slot_offset(p) >> 12, p);
            assert_eq!(slot_offset(p) % 64, 0);
        }
        assert_eq!(slot_offset(0), 0);
    }

    #[test]
    fn mulhi_is_in_range() {
        for x in [0u64, 1, u64::MAX, GOLDEN] {
            for n in [1u64, 7, 1 << 30] {
                assert!(mulhi(x, n) < n);
            }
        }
    }

    #[test]
    fn gups_checksum_is_xor_of_the_stream() {
        let p = TlbParams {
            ws: 8192,
            accesses: 3,
            mode: MODE_GUPS,
            seed: 5,
        };
        let (a, b2, c, d, e) = {
            let a = xorshift64(5);
            let b2 = xorshift64(a);
            let c = xorshift64(b2);
            let d = xorshift64(c);
            (a, b2, c, d, xorshift64(d))
        };
        // 2 warm-up + 3 timed.
        assert_eq!(expected_checksum(&p), a ^ b2 ^ c ^ d ^ e);
    }
}
