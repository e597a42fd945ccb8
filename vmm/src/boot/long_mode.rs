//! 64-bit entry set-up: a GDT, identity-mapped page tables and the vCPU's
//! special registers, so a vCPU starts executing 64-bit code at CPL0.
//!
//! Shared by the Linux 64-bit boot protocol and the built-in test guests.
//!
//! # Guest-physical layout (all below 64 KiB)
//!
//! | gpa | size | content |
//! |---|---|---|
//! | `0x0500` | `0x30` | GDT ([`BOOT_GDT_ADDR`]), layout below |
//! | `0x9000` | 4 KiB | PML4 ([`BOOT_PML4_ADDR`]) |
//! | `0xa000` | 4 KiB | PDPT ([`BOOT_PDPT_ADDR`]) |
//! | `0xb000..0xf000` | 4 × 4 KiB | page directories, one per GiB ([`BOOT_PD_ADDR`]) |
//!
//! [`BOOT_RESERVED`] lists these ranges; whoever places other data in guest
//! memory (zero page, command line, initrd, test-guest image) must avoid them.
//!
//! # GDT (Linux boot protocol selectors)
//!
//! | selector | descriptor |
//! |---|---|
//! | `0x00` | null |
//! | `0x08` | null (unused) |
//! | `0x10` | 64-bit code, DPL0 (`__BOOT_CS`, [`BOOT_CS`]) |
//! | `0x18` | data, DPL0 (`__BOOT_DS`, [`BOOT_DS`]) |
//! | `0x20` | 64-bit TSS (16 bytes, base 0, limit 0x67) ([`BOOT_TSS`]) |
//!
//! # Page tables
//!
//! The first 4 GiB (RAM, at most 3 GiB, plus the 32-bit MMIO hole) are
//! identity mapped with 2 MiB pages, present + writable, supervisor only.
//!
//! # Registers
//!
//! CR0 = PE | MP | ET | NE | PG, CR4 = PAE | OSFXSR | OSXMMEXCPT,
//! EFER = LME | LMA, CR3 = [`BOOT_PML4_ADDR`], CS = 0x10 (L=1), DS/ES/FS/GS/SS = 0x18,
//! TR = 0x20, IDT base 0 limit 0 (any exception before the guest loads its
//! own IDT escalates to a triple fault, i.e. `KVM_EXIT_SHUTDOWN`).
//! KVM refuses EFER.LME unless the vCPU's CPUID advertises long mode, so set
//! the CPUID (`KVM_SET_CPUID2`) before [`configure_vcpu`].

use std::ops::Range;

use kvm_bindings::{kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest-physical address of the boot GDT.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Number of 8-byte GDT slots (the TSS descriptor takes two).
pub const BOOT_GDT_ENTRIES: usize = 6;
/// Guest-physical address of the PML4.
pub const BOOT_PML4_ADDR: u64 = 0x9000;
/// Guest-physical address of the PDPT.
pub const BOOT_PDPT_ADDR: u64 = 0xa000;
/// Guest-physical address of the first of the four page directories.
pub const BOOT_PD_ADDR: u64 = 0xb000;
/// Number of page directories (one per GiB identity mapped).
pub const BOOT_PD_COUNT: u64 = 4;
/// Bytes identity mapped by the boot page tables.
pub const BOOT_IDENTITY_MAPPED: u64 = BOOT_PD_COUNT << 30;
/// 64-bit code selector (`__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Data selector (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// TSS selector.
pub const BOOT_TSS: u16 = 0x20;
/// Guest-physical ranges written by [`setup`].
pub const BOOT_RESERVED: [Range<u64>; 2] = [
    BOOT_GDT_ADDR..BOOT_GDT_ADDR + (BOOT_GDT_ENTRIES as u64) * 8,
    BOOT_PML4_ADDR..BOOT_PD_ADDR + BOOT_PD_COUNT * 0x1000,
];

/// CR0 bits.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0.MP
pub const X86_CR0_MP: u64 = 1 << 1;
/// CR0.ET
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0.NE
pub const X86_CR0_NE: u64 = 1 << 5;
/// CR0.PG
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE
pub const X86_CR4_PAE: u64 = 1 << 5;
/// CR4.OSFXSR
pub const X86_CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT
pub const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
/// EFER.LME
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA
pub const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

/// Errors of the 64-bit entry set-up.
#[derive(Debug, thiserror::Error)]
pub enum LongModeError {
    /// Guest RAM does not cover the boot structures.
    #[error(
        "guest RAM of {ram_size:#x} bytes does not cover the boot page tables at {needed:#x}; give the guest at least 1 MiB"
    )]
    RamTooSmall {
        /// RAM size given.
        ram_size: u64,
        /// End of the boot structures.
        needed: u64,
    },
    /// Guest RAM extends past what the boot page tables identity map.
    #[error("guest RAM of {ram_size:#x} bytes exceeds the {BOOT_IDENTITY_MAPPED:#x} bytes the boot page tables identity map")]
    RamTooLarge {
        /// RAM size given.
        ram_size: u64,
    },
    /// Writing the boot structures into guest memory failed.
    #[error("writing {what} at guest address {gpa:#x}: {source}")]
    GuestWrite {
        /// Structure being written.
        what: &'static str,
        /// Where.
        gpa: u64,
        /// Cause.
        source: vm_memory::GuestMemoryError,
    },
    /// A vCPU ioctl failed.
    #[error("{op} on vCPU failed: {source}")]
    Vcpu {
        /// Ioctl name.
        op: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
}

/// What [`setup`] wrote: everything [`configure_vcpu`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootPageTables {
    /// CR3 value (PML4 address).
    pub pml4: u64,
    /// GDT base.
    pub gdt_base: u64,
    /// GDT limit (size - 1).
    pub gdt_limit: u16,
    /// Bytes identity mapped from gpa 0.
    pub identity_mapped: u64,
}

/// Builds a GDT entry from flags (access byte in bits 0..8, flags nibble in
/// bits 12..16), base and limit (20 bits).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// 64-bit code, DPL0, present, readable, accessed, L=1, G=1.
pub const GDT_CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// Data, DPL0, present, writable, accessed, D/B=1, G=1.
pub const GDT_DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// Low half of a 64-bit available TSS descriptor at base 0, limit 0x67.
pub const GDT_TSS64_LOW: u64 = gdt_entry(0x0089, 0, 0x67);

/// The boot GDT as written by [`setup`].
pub const fn boot_gdt() -> [u64; BOOT_GDT_ENTRIES] {
    [0, 0, GDT_CODE64, GDT_DATA, GDT_TSS64_LOW, 0]
}

/// Decodes a GDT entry into KVM's segment cache format.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write_u64s(
    mem: &GuestMemoryMmap,
    gpa: u64,
    values: &[u64],
    what: &'static str,
) -> Result<(), LongModeError> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(gpa))
        .map_err(|source| LongModeError::GuestWrite { what, gpa, source })
}

/// The page-table contents [`setup`] writes: (gpa, qwords) per table page.
pub fn boot_page_tables() -> Vec<(u64, Vec<u64>)> {
    let mut pml4 = vec![0u64; 512];
    pml4[0] = BOOT_PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE;
    let mut pdpt = vec![0u64; 512];
    for (i, e) in pdpt.iter_mut().take(BOOT_PD_COUNT as usize).enumerate() {
        *e = (BOOT_PD_ADDR + (i as u64) * 0x1000) | PTE_PRESENT | PTE_WRITABLE;
    }
    let mut out = vec![(BOOT_PML4_ADDR, pml4), (BOOT_PDPT_ADDR, pdpt)];
    for d in 0..BOOT_PD_COUNT {
        let pd = (0..512u64)
            .map(|j| ((d << 30) + (j << 21)) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE)
            .collect();
        out.push((BOOT_PD_ADDR + d * 0x1000, pd));
    }
    out
}

/// Writes the boot GDT and the identity-mapping page tables into guest memory.
///
/// `ram_size` is the size of guest RAM starting at gpa 0; it must cover the
/// boot structures and fit in the identity-mapped 4 GiB.
pub fn setup(mem: &GuestMemoryMmap, ram_size: u64) -> Result<BootPageTables, LongModeError> {
    let needed = BOOT_RESERVED[1].end;
    if ram_size < needed {
        return Err(LongModeError::RamTooSmall { ram_size, needed });
    }
    if ram_size > BOOT_IDENTITY_MAPPED {
        return Err(LongModeError::RamTooLarge { ram_size });
    }
    write_u64s(mem, BOOT_GDT_ADDR, &boot_gdt(), "boot GDT")?;
    for (gpa, table) in boot_page_tables() {
        write_u64s(mem, gpa, &table, "boot page table")?;
    }
    log::debug!(
        "long mode: GDT at {BOOT_GDT_ADDR:#x}, PML4 at {BOOT_PML4_ADDR:#x}, identity map of {BOOT_IDENTITY_MAPPED:#x} bytes (RAM {ram_size:#x}, {} regions)",
        mem.num_regions()
    );
    Ok(BootPageTables {
        pml4: BOOT_PML4_ADDR,
        gdt_base: BOOT_GDT_ADDR,
        gdt_limit: (BOOT_GDT_ENTRIES * 8 - 1) as u16,
        identity_mapped: BOOT_IDENTITY_MAPPED,
    })
}

/// Returns `sregs` changed for 64-bit CPL0 entry on `tables`.
pub fn long_mode_sregs(mut sregs: kvm_sregs, tables: &BootPageTables) -> kvm_sregs {
    let gdt = boot_gdt();
    let code = segment_from_gdt(gdt[(BOOT_CS / 8) as usize], BOOT_CS);
    let data = segment_from_gdt(gdt[(BOOT_DS / 8) as usize], BOOT_DS);
    let mut tss = segment_from_gdt(gdt[(BOOT_TSS / 8) as usize], BOOT_TSS);
    // The CPU marks a loaded TSS busy; VM entry checks want type 11.
    tss.type_ = 0xb;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = tables.gdt_base;
    sregs.gdt.limit = tables.gdt_limit;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = tables.pml4;
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// Sets the vCPU's special registers for 64-bit CPL0 entry on `tables`.
/// General registers (RIP, RSP, RFLAGS, arguments) are the caller's job.
pub fn configure_vcpu(vcpu: &VcpuFd, tables: &BootPageTables) -> Result<(), LongModeError> {
    let sregs = vcpu.get_sregs().map_err(|source| LongModeError::Vcpu {
        op: "KVM_GET_SREGS",
        source,
    })?;
    vcpu.set_sregs(&long_mode_sregs(sregs, tables))
        .map_err(|source| LongModeError::Vcpu {
            op: "KVM_SET_SREGS",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_as_expected() {
        let cs = segment_from_gdt(GDT_CODE64, BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT_DATA, BOOT_DS);
        assert_eq!((ds.l, ds.db, ds.type_, ds.g), (0, 1, 3, 1));
        let tss = segment_from_gdt(GDT_TSS64_LOW, BOOT_TSS);
        assert_eq!((tss.s, tss.type_, tss.limit, tss.g), (0, 9, 0x67, 0));
        assert_eq!(GDT_CODE64, 0x00af_9b00_0000_ffff);
        assert_eq!(GDT_DATA, 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn tables_identity_map_four_gib() {
        let tables = boot_page_tables();
        assert_eq!(tables.len(), 2 + BOOT_PD_COUNT as usize);
        let pd3 = &tables[5].1;
        assert_eq!(pd3[511] & !0xfff, (4u64 << 30) - (2 << 20));
        assert_eq!(pd3[511] & 0xfff, 0x83);
    }

    #[test]
    fn setup_writes_and_validates() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let t = setup(&mem, 1 << 20).unwrap();
        assert_eq!(t.pml4, BOOT_PML4_ADDR);
        let e: u64 = mem.read_obj(GuestAddress(BOOT_PD_ADDR + 8)).unwrap();
        assert_eq!(e, (2 << 20) | 0x83);
        let g: u64 = mem.read_obj(GuestAddress(BOOT_GDT_ADDR + 0x10)).unwrap();
        assert_eq!(g, GDT_CODE64);
        assert!(matches!(
            setup(&mem, 0x1000),
            Err(LongModeError::RamTooSmall { .. })
        ));
        assert!(matches!(
            setup(&mem, 5 << 30),
            Err(LongModeError::RamTooLarge { .. })
        ));
        let s = long_mode_sregs(kvm_sregs::default(), &t);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.cr3, BOOT_PML4_ADDR);
    }
}
