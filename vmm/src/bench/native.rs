//! The `tlb` loop in a host thread on host memory whose page size matches
//! the guest's: 4K = anonymous memory with `MADV_NOHUGEPAGE`; 2M =
//! `MAP_HUGETLB` (2 MiB hugetlb pages), or, if the pool cannot supply them,
//! anonymous memory with `MADV_HUGEPAGE` (THP); 1G = `MAP_HUGETLB` of 1 GiB
//! pages, or, without a 1G pool, as 2M. Set-up follows the guest
//! step for step ([`crate::testguest::guests::tlb`]); the timed loops are the
//! same instructions as the guest's, in inline assembly.

use crate::testguest::guests::tlb::{self, TlbParams, MODE_CHASE};
use crate::testguest::GuestPageSize;

use super::error::BenchError;
use super::tsc::rdtsc;

const HPAGE: usize = 2 << 20;
const GPAGE: usize = 1 << 30;

/// What backs the native table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NativeBacking {
    /// Anonymous 4K pages (MADV_NOHUGEPAGE).
    Anon4k,
    /// MAP_HUGETLB 2M pages.
    Hugetlb,
    /// MAP_HUGETLB 1G pages.
    Hugetlb1g,
    /// Anonymous memory with MADV_HUGEPAGE.
    Thp,
}

impl NativeBacking {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            NativeBacking::Anon4k => "4k",
            NativeBacking::Hugetlb => "hugetlb",
            NativeBacking::Hugetlb1g => "hugetlb1g",
            NativeBacking::Thp => "thp",
        }
    }
}

/// Host memory owned by the native run (unmapped on drop).
struct HostTable {
    map: *mut libc::c_void,
    map_len: usize,
    base: *mut u8,
    backing: NativeBacking,
}

fn os_err(what: &str) -> BenchError {
    BenchError::Native {
        what: what.to_string(),
        source: std::io::Error::last_os_error(),
    }
}

fn mmap_anon(len: usize, extra: libc::c_int) -> *mut libc::c_void {
    // SAFETY: an anonymous private mapping at a kernel-chosen address touches
    // no existing memory; the result is checked against MAP_FAILED by callers.
    unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
            -1,
            0,
        )
    }
}

impl HostTable {
    fn new(ws: usize, pages: GuestPageSize) -> Result<HostTable, BenchError> {
        if pages == GuestPageSize::Size1G {
            let len = ws.div_ceil(GPAGE) * GPAGE;
            let m = mmap_anon(len, libc::MAP_HUGETLB | (30 << libc::MAP_HUGE_SHIFT));
            if m != libc::MAP_FAILED {
                return Ok(HostTable {
                    map: m,
                    map_len: len,
                    base: m.cast(),
                    backing: NativeBacking::Hugetlb1g,
                });
            }
            log::info!(
                "native: MAP_HUGETLB of {len} bytes of 1G pages failed ({}), using 2M pages",
                std::io::Error::last_os_error()
            );
        }
        let len = ws.div_ceil(HPAGE) * HPAGE;
        if pages != GuestPageSize::Size4K {
            let m = mmap_anon(len, libc::MAP_HUGETLB | (21 << libc::MAP_HUGE_SHIFT));
            if m != libc::MAP_FAILED {
                return Ok(HostTable {
                    map: m,
                    map_len: len,
                    base: m.cast(),
                    backing: NativeBacking::Hugetlb,
                });
            }
            log::info!(
                "native: MAP_HUGETLB of {len} bytes failed ({}), using MADV_HUGEPAGE",
                std::io::Error::last_os_error()
            );
        }
        // 2M-aligned inside a larger mapping, so THP can map whole PMDs.
        let map_len = len + HPAGE;
        let m = mmap_anon(map_len, libc::MAP_NORESERVE);
        if m == libc::MAP_FAILED {
            return Err(os_err("mmap"));
        }
        let off = (HPAGE - (m as usize) % HPAGE) % HPAGE;
        // SAFETY: `off < HPAGE` and the mapping is `len + HPAGE` long.
        let base = unsafe { m.cast::<u8>().add(off) };
        let (advice, backing) = match pages {
            GuestPageSize::Size4K => (libc::MADV_NOHUGEPAGE, NativeBacking::Anon4k),
            GuestPageSize::Size2M | GuestPageSize::Size1G => {
                (libc::MADV_HUGEPAGE, NativeBacking::Thp)
            }
        };
        let t = HostTable {
            map: m,
            map_len,
            base,
            backing,
        };
        // SAFETY: madvise on a range inside our own mapping.
        if unsafe { libc::madvise(base.cast(), len, advice) } != 0 {
            return Err(os_err("madvise"));
        }
        Ok(t)
    }

    /// Pointer to the qword at byte `off` of the table. Computing it is safe
    /// (`wrapping_add`); callers that dereference it pass offsets below the
    /// working set, which lies inside the mapping, 8-byte aligned.
    fn qword(&self, off: u64) -> *mut u64 {
        self.base.wrapping_add(off as usize).cast()
    }
}

// SAFETY: the table is plain memory owned by this value; the native run
// hands it to exactly one thread at a time (scoped spawn, then join).
unsafe impl Send for HostTable {}
// SAFETY: as above: no two threads access it concurrently.
unsafe impl Sync for HostTable {}

impl Drop for HostTable {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created and owns.
        unsafe {
            libc::munmap(self.map, self.map_len);
        }
    }
}

/// One native run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NativeRun {
    /// TSC cycles of the timed loop.
    pub cycles: u64,
    /// The loop's checksum (as the guest computes it).
    pub checksum: u64,
    /// The memory used.
    pub backing: NativeBacking,
}

/// `accesses` dependent loads from `start`; returns the final pointer.
///
/// # Safety
/// `start` must begin a cycle of pointers to readable qwords.
unsafe fn chase(start: u64, accesses: u64) -> u64 {
    let mut p = start;
    // SAFETY: the caller guarantees every pointer on the cycle is readable.
    unsafe {
        std::arch::asm!(
            "2:",
            "mov {p}, [{p}]",
            "dec {n}",
            "jnz 2b",
            p = inout(reg) p,
            n = inout(reg) accesses => _,
            options(nostack, readonly),
        );
    }
    p
}

/// `n` GUPS updates of the table of `nwords` qwords at `base`; returns the
/// PRNG state.
///
/// # Safety
/// `base` must point to `nwords` writable qwords; `n > 0`.
unsafe fn gups(base: *mut u64, nwords: u64, mut x: u64, n: u64) -> u64 {
    // SAFETY: mulhi(x, nwords) < nwords keeps every access inside the table.
    unsafe {
        std::arch::asm!(
            "2:",
            "mov rax, {x}",
            "shl rax, 13",
            "xor {x}, rax",
            "mov rax, {x}",
            "shr rax, 7",
            "xor {x}, rax",
            "mov rax, {x}",
            "shl rax, 17",
            "xor {x}, rax",
            "mov rax, {x}",
            "mul {nw}",
            "xor [{base} + rdx*8], {x}",
            "dec {n}",
            "jnz 2b",
            x = inout(reg) x,
            nw = in(reg) nwords,
            base = in(reg) base,
            n = inout(reg) n => _,
            out("rax") _,
            out("rdx") _,
            options(nostack),
        );
    }
    x
}

fn run_chase(t: &HostTable, p: &TlbParams) -> (u64, u64) {
    let pages = p.pages();
    let base = t.base as u64;
    for i in 0..pages {
        let s = t.qword(tlb::slot_offset(i));
        // SAFETY: `slot_offset(i)` is page `i` plus a cache-line offset below
        // 4096 (8-aligned), `i < pages = ws / 4096` and the table maps `ws`
        // bytes read-write, so the qword is inside it.
        unsafe { s.write_volatile(s as u64) };
    }
    let mut x = p.seed;
    let mut i = pages.saturating_sub(1);
    while i > 0 {
        x = tlb::xorshift64(x);
        let j = tlb::mulhi(x, i);
        let (a, b) = (t.qword(tlb::slot_offset(i)), t.qword(tlb::slot_offset(j)));
        // SAFETY: `j <= i < pages` (`mulhi(x, i) < i`), so both slots are
        // inside the table, as in the loop above; this thread is its only user.
        unsafe {
            let (va, vb) = (a.read_volatile(), b.read_volatile());
            a.write_volatile(vb);
            b.write_volatile(va);
        }
        i -= 1;
    }
    // SAFETY: every slot holds the address of a slot (first loop) and the
    // swaps (Sattolo) only permute those values: one cycle through the table.
    unsafe { chase(base, p.warm_accesses()) };
    let t0 = rdtsc();
    // SAFETY: as above.
    let fin = unsafe { chase(base, p.accesses) };
    let t1 = rdtsc();
    (t1.wrapping_sub(t0), fin - base)
}

fn run_gups(t: &HostTable, p: &TlbParams) -> (u64, u64) {
    let mut off = 0;
    while off < p.ws {
        // SAFETY: `off < ws`, 4096-aligned, and the table maps `ws` bytes.
        unsafe { t.qword(off).write_volatile(0) };
        off += 4096;
    }
    let nwords = p.ws / 8;
    let base: *mut u64 = t.qword(0);
    // SAFETY: the table has `nwords` qwords; warm and timed counts are > 0.
    let x = unsafe { gups(base, nwords, p.seed, p.warm_accesses()) };
    let t0 = rdtsc();
    // SAFETY: as above.
    unsafe { gups(base, nwords, x, p.accesses) };
    let t1 = rdtsc();
    let mut sum = 0u64;
    for w in 0..nwords {
        // SAFETY: `w < nwords = ws / 8`, so byte `w * 8` is a qword of the table.
        sum ^= unsafe { t.qword(w * 8).read_volatile() };
    }
    (t1.wrapping_sub(t0), sum)
}

/// Runs the loop of `p` in a new host thread on fresh host memory.
pub fn run(p: &TlbParams, pages: GuestPageSize) -> Result<NativeRun, BenchError> {
    let ws =
        usize::try_from(p.ws).map_err(|_| BenchError::Usage("working set too large".into()))?;
    let t = HostTable::new(ws, pages)?;
    let backing = t.backing;
    let p = *p;
    let (cycles, checksum) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            if p.mode == MODE_CHASE {
                run_chase(&t, &p)
            } else {
                run_gups(&t, &p)
            }
        });
        h.join()
    })
    .map_err(|_| BenchError::Native {
        what: "the native thread panicked".into(),
        source: std::io::Error::other("panic"),
    })?;
    Ok(NativeRun {
        cycles,
        checksum,
        backing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testguest::guests::tlb::{expected_checksum, DEFAULT_SEED, MODE_GUPS};

    #[test]
    fn native_loops_compute_the_expected_checksums() {
        for mode in [MODE_CHASE, MODE_GUPS] {
            let p = TlbParams {
                ws: 4 << 20,
                accesses: 100_000,
                mode,
                seed: DEFAULT_SEED,
            };
            let r = run(&p, GuestPageSize::Size4K).unwrap();
            assert_eq!(r.backing, NativeBacking::Anon4k);
            assert_eq!(r.checksum, expected_checksum(&p), "mode {mode}");
            assert!(r.cycles > 0);
        }
    }
}
