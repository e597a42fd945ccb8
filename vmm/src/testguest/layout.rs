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
//! | `0x10_0000..boot_tables_end` | bootstrap page tables, 2M pages (PML4, PDPT, one PD per GiB of RAM, at least 4: `0x10_6000` up to 4 GiB) |
//! | `boot_tables_end..` | 4K-page tables when `guest_pages = 4k` (PML4, PDPT, the PDs, `ram/512` bytes of PTs) |
//!
//! The image the VMM loads covers `[IMAGE_ADDR, boot_tables_end)`
//! (zeros included); the 4K tables are zeroed and filled by the guest.
//!
//! # RAM above the 32-bit MMIO hole
//!
//! Guest RAM beyond 3 GiB lies at guest-physical 4 GiB and up
//! (`guest_mem::RamLayout`). The guest's page tables map it where its
//! virtual address space continues: virtual `[0, 3 GiB)` is guest-physical
//! `[0, 3 GiB)`, virtual `[3 GiB, ram_size)` is guest-physical `[4 GiB,
//! 4 GiB + ram_size - 3 GiB)` ([`Layout::gpa_of`]). So the workloads see
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
/// Bootstrap page directories (one per GiB of RAM, at least 4).
pub const BOOT_PD: u64 = 0x10_2000;
/// End of the bootstrap tables and of the loaded image for RAM up to 4 GiB
/// ([`Layout::boot_tables_end`] in general).
pub const BOOT_TABLES_END: u64 = 0x10_6000;
/// 1 GiB: what one page directory maps.
const GIB: u64 = 1 << 30;

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
    /// Page directories per table set (one per GiB of RAM, at least 4).
    pub pds: u64,
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
        let pds = ram_size.div_ceil(GIB).max(4);
        let boot_end = BOOT_PD + pds * PAGE;
        let tables_end = match guest_pages {
            GuestPageSize::Size2M => boot_end,
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
            GuestPageSize::Size2M => BOOT_PML4,
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

#[cfg(test)]
mod tests {
    use super::*;

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
