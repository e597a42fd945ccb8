//! Guest-physical memory layout of a test guest.
//!
//! Everything the VMM and the guest's own runtime use lives in one reserved
//! region at the start of RAM, `[0, reserved_end)`, with `reserved_end`
//! rounded up to 2 MiB; the rest of RAM (the *work* region, whole 2M frames)
//! belongs to the workload and is split into per-vCPU slices of whole frames.
//!
//! | gpa | content |
//! |---|---|
//! | `0x0500`, `0x9000..0xf000` | VMM boot GDT and identity map (`boot::long_mode`) |
//! | `0x1_0000` | guest GDT ([`GDT_ADDR`]), GDTR/IDTR pseudo-descriptors, sync words, slice table |
//! | `0x1_1000` | IDT, 256 gates ([`IDT_ADDR`]) |
//! | `0x1_2000` | 64-bit TSS per vCPU, 128 bytes apart ([`TSS_ADDR`]) |
//! | `0x1_3000` | command block per vCPU, 64 bytes apart ([`CMD_ADDR`]) |
//! | `0x1_3800` | strings ([`STRINGS_ADDR`]) |
//! | `0x1_4000..0x2_0000` | code ([`CODE_ADDR`]) |
//! | `0x2_0000..0x4_0000` | CPL0 stacks, 4 KiB per vCPU ([`KSTACK_ADDR`]) |
//! | `0x4_0000..0x8_0000` | CPL3 stacks, 8 KiB per vCPU ([`USTACK_ADDR`]) |
//! | `0x10_0000..boot_tables_end` | bootstrap page tables: PML4, PDPT, then the PDs: with `guest_pages = 4k` or `2m`, 2M pages, one PD per GiB of RAM, at least 4 (`0x10_6000` up to 4 GiB); with `1g`, a 1G page in the PDPT for every whole GiB of RAM and one PD of 2M pages only for a partial last GiB (`0x10_2000` or `0x10_3000`) |
//! | `boot_tables_end..` | 4K-page tables when `guest_pages = 4k` (PML4, PDPT, the PDs, `ram/512` bytes of PTs) |
//!
//! The image the VMM loads covers `[IMAGE_ADDR, boot_tables_end)`
//! (zeros included); the guest fills the bootstrap tables (and zeroes and
//! fills the 4K tables) with the stores [`Layout::table_fills`] lists.
//! With `guest_pages = 2m` or `1g` the bootstrap tables are the final ones.
//!
//! | `guest_pages` | leaves of the bootstrap tables | leaves of the final tables |
//! |---|---|---|
//! | `4k` | 2M | 4K |
//! | `2m` | 2M | (bootstrap) |
//! | `1g` | 1G per whole, 1G-aligned GiB of RAM (its PDPTE, PS set); 2M in a partial last GiB | (bootstrap) |
//!
//! # RAM above the 32-bit MMIO hole
//!
//! Guest RAM beyond 3 GiB lies at guest-physical 4 GiB and up
//! (`guest_mem::RamLayout`). The guest's page tables map it where its
//! virtual address space continues: virtual `[0, 3 GiB)` is guest-physical
//! `[0, 3 GiB)`, virtual `[3 GiB, ram_size)` is guest-physical `[4 GiB,
//! 4 GiB + ram_size - 3 GiB)` ([`Layout::gpa_of`]). The hole starts on a
//! GiB boundary, so every virtual GiB is one guest-physical GiB, 1G
//! aligned: with `guest_pages = 1g` each whole one is a 1G page, on either
//! side of the hole, and only the last GiB of RAM can be partial. So the workloads see
//! RAM as one range and their slices never meet the hole; the device
//! commands that name memory (DISCARD, REFILL) translate to guest-physical
//! in the guest ([`super::builder::GuestBuilder::discard`]), and the VMM
//! maps slices to guest-physical ranges ([`Layout::gpa_ranges`]).

use std::ops::Range;

use super::{GuestPageSize, TestGuestError};

/// Maximum number of vCPUs a test guest supports.
pub const MAX_VCPUS: usize = 32;
/// 4 KiB.
pub const PAGE: u64 = 0x1000;
/// 2 MiB.
pub const HPAGE: u64 = 0x20_0000;
/// Largest guest RAM (3 GiB below the 32-bit MMIO hole, the rest above it;
/// one PDPT maps 512 GiB of virtual space).
pub const MAX_RAM: u64 = guest_mem::MAX_RAM_SIZE;
/// Start of the 32-bit MMIO hole: virtual addresses from here map RAM above 4 GiB.
pub const HOLE_START: u64 = guest_mem::MMIO_HOLE_START;
/// Size of the hole (virtual `v >= HOLE_START` is guest-physical `v + HOLE_SIZE`).
pub const HOLE_SIZE: u64 = guest_mem::HIGH_RAM_START - guest_mem::MMIO_HOLE_START;

/// Start of the loaded image.
pub const IMAGE_ADDR: u64 = 0x1_0000;
/// Guest GDT.
pub const GDT_ADDR: u64 = 0x1_0000;
/// GDT size in bytes: 6 segment slots + one 16-byte TSS descriptor per vCPU.
pub const GDT_SIZE: u64 = 0x30 + 16 * MAX_VCPUS as u64;
/// GDTR pseudo-descriptor (limit u16, base u64).
pub const GDTR_ADDR: u64 = 0x1_0300;
/// IDTR pseudo-descriptor.
pub const IDTR_ADDR: u64 = 0x1_0310;
/// u64 set to 1 by vCPU 0 once the bootstrap page tables exist.
pub const BOOT_READY_ADDR: u64 = 0x1_0400;
/// u64 set to 1 by vCPU 0 once the 4K page tables exist.
pub const TABLES_READY_ADDR: u64 = 0x1_0408;
/// u64 count of vCPUs that finished their workload.
pub const DONE_COUNT_ADDR: u64 = 0x1_0410;
/// u64 OR of all workload statuses.
pub const STATUS_ACC_ADDR: u64 = 0x1_0418;
/// Scratch u64s for workloads (barriers etc.), 8 of them.
pub const SCRATCH_ADDR: u64 = 0x1_0440;
/// Slice table: per vCPU (start, end) gpa, 16 bytes each.
pub const SLICES_ADDR: u64 = 0x1_0800;
/// IDT.
pub const IDT_ADDR: u64 = 0x1_1000;
/// TSS array.
pub const TSS_ADDR: u64 = 0x1_2000;
/// Distance between two vCPUs' TSS.
pub const TSS_STRIDE: u64 = 128;
/// Command blocks.
pub const CMD_ADDR: u64 = 0x1_3000;
/// Distance between two vCPUs' command blocks.
pub const CMD_STRIDE: u64 = 64;
/// Strings printed by the guest.
pub const STRINGS_ADDR: u64 = 0x1_3800;
/// End of the string area.
pub const STRINGS_END: u64 = 0x1_4000;
/// Code.
pub const CODE_ADDR: u64 = 0x1_4000;
/// End of the code area.
pub const CODE_END: u64 = 0x2_0000;
/// CPL0 stacks.
pub const KSTACK_ADDR: u64 = 0x2_0000;
/// CPL0 stack size (log2).
pub const KSTACK_SHIFT: u32 = 12;
/// CPL3 stacks.
pub const USTACK_ADDR: u64 = 0x4_0000;
/// CPL3 stack size (log2).
pub const USTACK_SHIFT: u32 = 13;
/// Bootstrap PML4.
pub const BOOT_PML4: u64 = 0x10_0000;
/// Bootstrap PDPT.
pub const BOOT_PDPT: u64 = 0x10_1000;
/// Bootstrap page directories (one per GiB of RAM, at least 4; with
/// `guest_pages = 1g` one for a partial last GiB, if any).
pub const BOOT_PD: u64 = 0x10_2000;
/// End of the bootstrap tables and of the loaded image for RAM up to 4 GiB
/// ([`Layout::boot_tables_end`] in general).
pub const BOOT_TABLES_END: u64 = 0x10_6000;
/// 1 GiB: what one page directory (or one 1G page) maps.
pub const GIB: u64 = 1 << 30;
/// Page-table entry flags of the test guests' tables: present, writable,
/// user (a table, or a 4K page).
pub const PTE_URW: u64 = 0x7;
/// Present, writable, user, PS (bit 7): a 2M page in a PDE, a 1G page in a
/// PDPTE.
pub const PTE_URW_HUGE: u64 = 0x87;
/// Bytes one entry maps at each level below the PML4: PDPT, PD, PT.
const LEVEL_BYTES: [u64; 3] = [GIB, HPAGE, PAGE];

/// GDT selectors of the guest's own GDT (kernel ones match `boot::long_mode`).
pub const KCODE_SEL: u16 = 0x10;
/// Kernel data.
pub const KDATA_SEL: u16 = 0x18;
/// User code (RPL 3).
pub const UCODE_SEL: u16 = 0x23;
/// User data (RPL 3).
pub const UDATA_SEL: u16 = 0x2b;
/// TSS selector of vCPU 0; vCPU `i` uses `TSS_SEL0 + 16 * i`.
pub const TSS_SEL0: u16 = 0x30;

/// Layout of one test guest, computed from its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// RAM size.
    pub ram_size: u64,
    /// vCPU count.
    pub vcpus: usize,
    /// Guest page size of the final page tables.
    pub guest_pages: GuestPageSize,
    /// `[0, reserved_end)`.
    pub reserved: Range<u64>,
    /// Per-vCPU slices of the work region (whole 2M frames).
    pub slices: Vec<Range<u64>>,
    /// CR3 the workload runs on.
    pub final_cr3: u64,
    /// End of the page tables the guest builds.
    pub tables_end: u64,
    /// Page directories per table set (one per GiB of RAM, at least 4;
    /// with `guest_pages = 1g`, bootstrap PDs: 1 for a partial last GiB, else 0).
    pub pds: u64,
}

/// One run of page-table entries the guest stores: `count` qwords from
/// `dst`, the first `value`, each next one `step` more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFill {
    /// Gpa of the first entry.
    pub dst: u64,
    /// The first entry.
    pub value: u64,
    /// Added to the value from one entry to the next.
    pub step: u64,
    /// Entries.
    pub count: u64,
}

/// Where a set of page tables lives: one PML4 and one PDPT, then the PDs
/// and the PTs, each kind in consecutive pages from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSet {
    /// The PML4 (the CR3 of the set).
    pub pml4: u64,
    /// The PDPT.
    pub pdpt: u64,
    /// The first PD.
    pub pd: u64,
    /// The first PT.
    pub pt: u64,
}

/// Appends the entries that map `len` bytes of RAM from guest-physical
/// `gpa` at `level` (0 PDPT, 1 PD, 2 PT) from the entry at `dst` on (the
/// first maps a virtual address aligned to the level): a leaf for each whole
/// entry's worth when the level's size is at most `largest`; the rest
/// through tables of the next level taken in order from `next`.
fn fill_level(
    v: &mut Vec<TableFill>,
    next: &mut [u64; 3],
    level: usize,
    dst: u64,
    gpa: u64,
    len: u64,
    largest: u64,
) {
    let size = LEVEL_BYTES[level];
    let leaves = if size <= largest { len / size } else { 0 };
    if leaves > 0 {
        let flags = if size == PAGE { PTE_URW } else { PTE_URW_HUGE };
        v.push(TableFill {
            dst,
            value: gpa | flags,
            step: size,
            count: leaves,
        });
    }
    let rest = len - leaves * size;
    if rest == 0 {
        return;
    }
    // Never at the PT level: RAM is whole 4K pages.
    let tables = rest.div_ceil(size);
    let first = next[level + 1];
    next[level + 1] += tables * PAGE;
    v.push(TableFill {
        dst: dst + 8 * leaves,
        value: first | PTE_URW,
        step: PAGE,
        count: tables,
    });
    fill_level(
        v,
        next,
        level + 1,
        first,
        gpa + leaves * size,
        rest,
        largest,
    );
}

impl Layout {
    /// Validates parameters and computes the layout.
    pub fn new(
        ram_size: u64,
        vcpus: usize,
        guest_pages: GuestPageSize,
    ) -> Result<Layout, TestGuestError> {
        Self::with_extra(ram_size, vcpus, guest_pages, 0)
    }

    /// As [`Layout::new`], with `extra` bytes after the page tables inside
    /// the reserved region (the stress guest's shared area).
    pub fn with_extra(
        ram_size: u64,
        vcpus: usize,
        guest_pages: GuestPageSize,
        extra: u64,
    ) -> Result<Layout, TestGuestError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(TestGuestError::Vcpus {
                vcpus,
                max: MAX_VCPUS,
            });
        }
        let pds = match guest_pages {
            GuestPageSize::Size1G => u64::from(!ram_size.is_multiple_of(GIB)),
            GuestPageSize::Size4K | GuestPageSize::Size2M => ram_size.div_ceil(GIB).max(4),
        };
        let boot_end = BOOT_PD + pds * PAGE;
        let tables_end = match guest_pages {
            GuestPageSize::Size2M | GuestPageSize::Size1G => boot_end,
            GuestPageSize::Size4K => boot_end + (2 + pds) * PAGE + ram_size / 512,
        };
        let reserved_end = (tables_end + extra).div_ceil(HPAGE) * HPAGE;
        let min = reserved_end + HPAGE * vcpus as u64;
        if !ram_size.is_multiple_of(HPAGE) || ram_size < min || ram_size > MAX_RAM {
            return Err(TestGuestError::RamSize {
                ram_size,
                min,
                max: MAX_RAM,
            });
        }
        let frames = (ram_size - reserved_end) / HPAGE;
        let per = frames / vcpus as u64;
        let extra = frames % vcpus as u64;
        let mut start = reserved_end;
        let slices = (0..vcpus as u64)
            .map(|i| {
                let n = per + u64::from(i < extra);
                let s = start..start + n * HPAGE;
                start = s.end;
                s
            })
            .collect();
        let final_cr3 = match guest_pages {
            GuestPageSize::Size2M | GuestPageSize::Size1G => BOOT_PML4,
            GuestPageSize::Size4K => boot_end,
        };
        Ok(Layout {
            ram_size,
            vcpus,
            guest_pages,
            reserved: 0..reserved_end,
            slices,
            final_cr3,
            tables_end,
            pds,
        })
    }

    /// End of the bootstrap tables and of the loaded image.
    pub fn boot_tables_end(&self) -> u64 {
        BOOT_PD + self.pds * PAGE
    }

    /// The bootstrap tables ([`BOOT_PML4`] on; no PTs).
    pub fn boot_tables(&self) -> TableSet {
        TableSet {
            pml4: BOOT_PML4,
            pdpt: BOOT_PDPT,
            pd: BOOT_PD,
            pt: self.boot_tables_end(),
        }
    }

    /// The 4K-page tables (`guest_pages = 4k`).
    pub fn tables_4k(&self) -> TableSet {
        TableSet {
            pml4: self.pt4k_pml4(),
            pdpt: self.pt4k_pdpt(),
            pd: self.pt4k_pd(),
            pt: self.pt4k_pt(),
        }
    }

    /// Largest page of the bootstrap tables: 1G with `guest_pages = 1g`,
    /// else 2M.
    pub fn boot_largest(&self) -> u64 {
        self.guest_pages.bytes().max(HPAGE)
    }

    /// The page-table stores that make `set` map every byte of RAM
    /// ([`Self::mapped_runs`]: virtual `[0, ram_size)`, the part from 3 GiB
    /// at guest-physical 4 GiB) with pages of `largest` bytes (4K, 2M or
    /// 1G) wherever a whole aligned one is RAM, and the next size down
    /// elsewhere; user accessible, writable. Tables are taken in order
    /// (virtual GiB `i` of a 2M map has PD `i`); the one function behind
    /// the bootstrap tables (`largest` = [`Self::boot_largest`]) and the
    /// 4K tables (4K). Entries it does not list stay zero (not present).
    pub fn table_fills(&self, set: TableSet, largest: u64) -> Vec<TableFill> {
        debug_assert!(LEVEL_BYTES.contains(&largest));
        let mut v = Vec::from([TableFill {
            dst: set.pml4,
            value: set.pdpt | PTE_URW,
            step: 0,
            count: 1,
        }]);
        // The next free table of each level (the PDPT is the only one of its
        // level: never taken from here).
        let mut next = [set.pdpt, set.pd, set.pt];
        for (va, gpa, len) in self.mapped_runs() {
            fill_level(
                &mut v,
                &mut next,
                0,
                set.pdpt + 8 * (va / GIB),
                gpa,
                len,
                largest,
            );
        }
        v
    }

    /// Guest-physical ranges the final page tables map with 1G pages
    /// (empty unless `guest_pages = 1g`).
    pub fn gig_pages(&self) -> Vec<Range<u64>> {
        if self.guest_pages != GuestPageSize::Size1G {
            return Vec::new();
        }
        self.mapped_runs()
            .into_iter()
            .filter(|(_, _, len)| *len >= GIB)
            .map(|(_, gpa, len)| gpa..gpa + len / GIB * GIB)
            .collect()
    }

    /// 4K-page PML4 (`guest_pages = 4k`).
    pub fn pt4k_pml4(&self) -> u64 {
        self.boot_tables_end()
    }

    /// 4K-page PDPT.
    pub fn pt4k_pdpt(&self) -> u64 {
        self.pt4k_pml4() + PAGE
    }

    /// 4K-page page directories ([`Self::pds`] of them).
    pub fn pt4k_pd(&self) -> u64 {
        self.pt4k_pdpt() + PAGE
    }

    /// First 4K page table.
    pub fn pt4k_pt(&self) -> u64 {
        self.pt4k_pd() + self.pds * PAGE
    }

    /// Whether part of RAM lies above the 32-bit MMIO hole.
    pub fn has_high_ram(&self) -> bool {
        self.ram_size > HOLE_START
    }

    /// The guest-physical address of virtual address `va` (`va < ram_size`).
    pub fn gpa_of(va: u64) -> u64 {
        if va < HOLE_START {
            va
        } else {
            va + HOLE_SIZE
        }
    }

    /// The virtual address of guest-physical address `gpa` (RAM).
    pub fn va_of(gpa: u64) -> u64 {
        if gpa < HOLE_START + HOLE_SIZE {
            gpa
        } else {
            gpa - HOLE_SIZE
        }
    }

    /// The guest-physical ranges of virtual range `r` (split at the hole).
    pub fn gpa_ranges(r: &Range<u64>) -> Vec<Range<u64>> {
        if r.start >= r.end {
            return Vec::new();
        }
        if r.end <= HOLE_START || r.start >= HOLE_START {
            let one = Self::gpa_of(r.start)..Self::gpa_of(r.end - 1) + 1;
            return Vec::from([one]);
        }
        vec![
            r.start..HOLE_START,
            HOLE_START + HOLE_SIZE..r.end + HOLE_SIZE,
        ]
    }

    /// The runs of guest RAM the page tables map: `(first virtual address,
    /// first guest-physical address, bytes)`, one below the hole and one
    /// above it when RAM goes there.
    pub fn mapped_runs(&self) -> Vec<(u64, u64, u64)> {
        let low = self.ram_size.min(HOLE_START);
        let mut v = vec![(0, 0, low)];
        if self.ram_size > low {
            v.push((low, low + HOLE_SIZE, self.ram_size - low));
        }
        v
    }

    /// The work region (all slices).
    pub fn work(&self) -> Range<u64> {
        self.reserved.end..self.ram_size
    }

    /// Top of vCPU `cpu`'s CPL0 stack.
    pub fn kstack_top(cpu: usize) -> u64 {
        KSTACK_ADDR + ((cpu as u64 + 1) << KSTACK_SHIFT)
    }

    /// Gpa of vCPU `cpu`'s command block.
    pub fn cmd_block(cpu: usize) -> u64 {
        CMD_ADDR + cpu as u64 * CMD_STRIDE
    }
}

// The fixed areas do not overlap.
const _: () = {
    assert!(GDT_ADDR + GDT_SIZE <= GDTR_ADDR);
    assert!(SLICES_ADDR + 16 * MAX_VCPUS as u64 <= IDT_ADDR);
    assert!(TSS_ADDR + TSS_STRIDE * MAX_VCPUS as u64 <= CMD_ADDR);
    assert!(CMD_ADDR + CMD_STRIDE * MAX_VCPUS as u64 <= STRINGS_ADDR);
    assert!(KSTACK_ADDR + ((MAX_VCPUS as u64) << KSTACK_SHIFT) <= USTACK_ADDR);
    assert!(USTACK_ADDR + ((MAX_VCPUS as u64) << USTACK_SHIFT) <= BOOT_PML4);
};

/// The qwords `fills` store (gpa to value), as the guest leaves them.
#[cfg(test)]
pub(crate) fn apply_fills(fills: &[TableFill]) -> std::collections::BTreeMap<u64, u64> {
    let mut mem = std::collections::BTreeMap::new();
    for f in fills {
        for i in 0..f.count {
            let old = mem.insert(f.dst + 8 * i, f.value + i * f.step);
            assert!(old.is_none(), "entry {:#x} stored twice", f.dst + 8 * i);
        }
    }
    mem
}

/// Walks the 4-level tables at `cr3` in `mem` (absent qwords are zero) as
/// the CPU does: the guest-physical address `va` maps to and the page size,
/// `None` where an entry is not present. Every present entry must be user
/// accessible and writable, PS only in a PDPTE or PDE, a leaf aligned.
#[cfg(test)]
pub(crate) fn walk(
    mem: &std::collections::BTreeMap<u64, u64>,
    cr3: u64,
    va: u64,
) -> Option<(u64, u64)> {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3;
    for shift in [39u32, 30, 21, 12] {
        let e = mem
            .get(&(table + 8 * ((va >> shift) & 511)))
            .copied()
            .unwrap_or(0);
        if e & 1 == 0 {
            return None;
        }
        assert_eq!(e & PTE_URW, PTE_URW, "entry {e:#x} for va {va:#x}");
        if shift == 12 || e & 0x80 != 0 {
            assert!(shift == 12 || shift == 21 || shift == 30, "PS in a PML4E");
            let size = 1u64 << shift;
            let base = e & ADDR;
            assert_eq!(base % size, 0, "misaligned leaf {e:#x}");
            return Some((base + va % size, size));
        }
        table = e & ADDR;
    }
    unreachable!()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bootstrap tables of `l` as the guest leaves them.
    fn boot_mem(l: &Layout) -> std::collections::BTreeMap<u64, u64> {
        let fills = l.table_fills(l.boot_tables(), l.boot_largest());
        let mem = apply_fills(&fills);
        let (lo, hi) = (*mem.keys().next().unwrap(), *mem.keys().last().unwrap());
        assert!(lo >= BOOT_PML4 && hi < l.boot_tables_end(), "{l:?}");
        mem
    }

    #[test]
    fn one_gig_pages_map_exactly_the_whole_gibs() {
        for mib in [64u64, 1024, 1536, 2048, 3072, 3584, 4096, 5122, 8192] {
            let ram = mib << 20;
            let l = Layout::new(ram, 2, GuestPageSize::Size1G).unwrap();
            assert_eq!(l.final_cr3, BOOT_PML4);
            assert_eq!(l.tables_end, l.boot_tables_end());
            assert_eq!(l.pds, u64::from(ram % GIB != 0), "{mib} MiB");
            let mem = boot_mem(&l);
            let mut gig = Vec::new();
            for va in (0..ram).step_by(HPAGE as usize) {
                for off in [0, PAGE, HPAGE - 8] {
                    let (gpa, size) = walk(&mem, l.final_cr3, va + off).unwrap();
                    assert_eq!(gpa, Layout::gpa_of(va + off), "{mib} MiB va {va:#x}");
                    let whole = (va / GIB + 1) * GIB <= ram;
                    assert_eq!(
                        size,
                        if whole { GIB } else { HPAGE },
                        "{mib} MiB va {va:#x}"
                    );
                }
                if va % GIB == 0 && (va / GIB + 1) * GIB <= ram {
                    gig.push(Layout::gpa_of(va)..Layout::gpa_of(va) + GIB);
                }
            }
            assert_eq!(walk(&mem, l.final_cr3, ram), None);
            // The same ranges the mirror is told of, merged per run.
            let merged: u64 = l.gig_pages().iter().map(|r| r.end - r.start).sum();
            assert_eq!(merged, gig.len() as u64 * GIB);
            for g in &gig {
                assert!(l.gig_pages().iter().any(|r| r.contains(&g.start)));
            }
        }
    }

    #[test]
    fn one_gig_tables_read_back() {
        // 1.5 GiB: PDPT[0] a 1G page at 0, PDPT[1] the one PD, 256 2M pages.
        let l = Layout::new(1536 << 20, 1, GuestPageSize::Size1G).unwrap();
        let m = boot_mem(&l);
        let q = |a: u64| m.get(&a).copied().unwrap_or(0);
        assert_eq!(q(BOOT_PML4), BOOT_PDPT | 0x7);
        assert_eq!(q(BOOT_PDPT), 0x87);
        assert_eq!(q(BOOT_PDPT + 8), BOOT_PD | 0x7);
        assert_eq!(q(BOOT_PDPT + 16), 0);
        assert_eq!(q(BOOT_PD), GIB | 0x87);
        assert_eq!(q(BOOT_PD + 8 * 255), (GIB + 255 * HPAGE) | 0x87);
        assert_eq!(q(BOOT_PD + 8 * 256), 0);
        assert_eq!(l.boot_tables_end(), BOOT_PD + PAGE);
        assert_eq!(l.gig_pages(), vec![0..GIB]);
        // 5 GiB + 2 MiB: 1G pages at 0, 1, 2 GiB and, past the hole, at 4
        // and 5 GiB; the last 2 MiB (guest-physical 6 GiB) in the PD.
        let l = Layout::new((5 << 30) + HPAGE, 1, GuestPageSize::Size1G).unwrap();
        let m = boot_mem(&l);
        let q = |a: u64| m.get(&a).copied().unwrap_or(0);
        let pdpt: Vec<u64> = (0..7).map(|i| q(BOOT_PDPT + 8 * i)).collect();
        assert_eq!(
            pdpt,
            vec![
                0x87,
                GIB | 0x87,
                (2 * GIB) | 0x87,
                (4 * GIB) | 0x87,
                (5 * GIB) | 0x87,
                BOOT_PD | 0x7,
                0
            ]
        );
        assert_eq!(q(BOOT_PD), (6 * GIB) | 0x87);
        assert_eq!(q(BOOT_PD + 8), 0);
        assert_eq!(l.gig_pages(), vec![0..3 * GIB, 4 * GIB..6 * GIB]);
        // Whole GiBs only: no PD at all.
        let l = Layout::new(2 << 30, 1, GuestPageSize::Size1G).unwrap();
        assert_eq!((l.pds, l.boot_tables_end()), (0, BOOT_PD));
        assert_eq!(boot_mem(&l).len(), 3);
    }

    #[test]
    fn two_meg_and_4k_tables_are_unchanged() {
        for mib in [64u64, 1536, 3072, 5120] {
            let ram = mib << 20;
            for pages in [GuestPageSize::Size2M, GuestPageSize::Size4K] {
                let l = Layout::new(ram, 1, pages).unwrap();
                assert!(l.gig_pages().is_empty());
                let mem = boot_mem(&l);
                // Virtual GiB i has PD i; 2M pages everywhere.
                for i in 0..ram.div_ceil(GIB) {
                    assert_eq!(mem[&(BOOT_PDPT + 8 * i)], (BOOT_PD + i * PAGE) | 0x7);
                }
                for va in (0..ram).step_by(HPAGE as usize) {
                    assert_eq!(
                        walk(&mem, BOOT_PML4, va + 8),
                        Some((Layout::gpa_of(va) + 8, HPAGE))
                    );
                }
                assert_eq!(walk(&mem, BOOT_PML4, ram), None);
            }
            let l = Layout::new(ram, 1, GuestPageSize::Size4K).unwrap();
            let fills = l.table_fills(l.tables_4k(), PAGE);
            let mem = apply_fills(&fills);
            let (lo, hi) = (*mem.keys().next().unwrap(), *mem.keys().last().unwrap());
            assert!(lo >= l.pt4k_pml4() && hi < l.tables_end);
            assert_eq!(l.final_cr3, l.pt4k_pml4());
            for va in (0..ram).step_by(PAGE as usize * 97) {
                assert_eq!(
                    walk(&mem, l.final_cr3, va),
                    Some((Layout::gpa_of(va), PAGE))
                );
            }
            assert_eq!(walk(&mem, l.final_cr3, ram), None);
        }
    }

    #[test]
    fn boot_structures_stay_below_the_image() {
        assert!(crate::boot::long_mode::BOOT_RESERVED
            .iter()
            .all(|r| r.end <= IMAGE_ADDR));
    }

    #[test]
    fn slices_are_whole_frames_covering_work() {
        let l = Layout::new(64 << 20, 3, GuestPageSize::Size4K).unwrap();
        assert_eq!(l.reserved, 0..2 << 20);
        assert_eq!(l.slices.first().unwrap().start, l.reserved.end);
        assert_eq!(l.slices.last().unwrap().end, 64 << 20);
        for w in l.slices.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        let sizes: Vec<u64> = l.slices.iter().map(|s| (s.end - s.start) / HPAGE).collect();
        assert_eq!(sizes, vec![11, 10, 10]);
        let big = Layout::new(3 << 30, 1, GuestPageSize::Size4K).unwrap();
        assert_eq!(big.reserved.end, 8 << 20);
        assert_eq!(big.pt4k_pt(), 0x10_c000);
        assert_eq!(big.boot_tables_end(), BOOT_TABLES_END);
        assert!(Layout::new(3 << 20, 1, GuestPageSize::Size2M).is_err());
        assert!(Layout::new(64 << 20, 0, GuestPageSize::Size2M).is_err());
        assert!(Layout::new(4 << 20, 2, GuestPageSize::Size2M).is_err());
    }

    #[test]
    fn ram_above_the_hole_continues_virtual_space() {
        let l = Layout::new(8 << 30, 2, GuestPageSize::Size4K).unwrap();
        assert_eq!(l.pds, 8);
        assert_eq!(l.boot_tables_end(), BOOT_PD + 8 * PAGE);
        assert_eq!(l.tables_end, l.pt4k_pt() + (8 << 30) / 512);
        assert_eq!(
            l.mapped_runs(),
            vec![(0, 0, 3 << 30), (3 << 30, 4 << 30, 5 << 30)]
        );
        assert_eq!(Layout::gpa_of((3 << 30) + 4096), (4 << 30) + 4096);
        assert_eq!(Layout::va_of((4 << 30) + 4096), (3 << 30) + 4096);
        assert_eq!(Layout::va_of((3 << 30) - 4096), (3 << 30) - 4096);
        assert_eq!(
            Layout::gpa_ranges(&((2 << 30)..(4 << 30))),
            vec![(2 << 30)..(3 << 30), (4 << 30)..(5 << 30)]
        );
        assert_eq!(
            Layout::gpa_ranges(&((3 << 30)..(4 << 30))),
            vec![(4 << 30)..(5 << 30)]
        );
        assert!(Layout::new(MAX_RAM + HPAGE, 1, GuestPageSize::Size2M).is_err());
    }
}
