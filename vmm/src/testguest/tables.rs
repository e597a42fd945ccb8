//! Descriptor tables of a test guest (GDT, IDT, TSS), built at image build
//! time as plain data: the guest only loads them (`lgdt`, `lidt`, `ltr`).
//!
//! GDT: `0x00` null, `0x08` null, `0x10` kernel code64, `0x18` kernel data,
//! `0x20` user code64 (DPL3, selector `0x23`), `0x28` user data (DPL3,
//! selector `0x2b`), `0x30 + 16 * cpu` the 64-bit TSS of vCPU `cpu`.

use crate::boot::long_mode::{gdt_entry, GDT_CODE64, GDT_DATA};

use super::layout::{Layout, GDT_SIZE, KCODE_SEL, MAX_VCPUS, TSS_ADDR, TSS_STRIDE};

/// User code64, DPL3.
pub const GDT_UCODE64: u64 = gdt_entry(0xa0fb, 0, 0xfffff);
/// User data, DPL3.
pub const GDT_UDATA: u64 = gdt_entry(0xc0f3, 0, 0xfffff);
/// Size of a 64-bit TSS.
pub const TSS_SIZE: u64 = 104;

/// The guest's GDT as bytes (`GDT_SIZE` long).
pub fn gdt(vcpus: usize) -> Vec<u8> {
    let mut e = vec![0u64, 0, GDT_CODE64, GDT_DATA, GDT_UCODE64, GDT_UDATA];
    for cpu in 0..MAX_VCPUS {
        if cpu < vcpus {
            let base = TSS_ADDR + cpu as u64 * TSS_STRIDE;
            e.push(gdt_entry(0x0089, base as u32, (TSS_SIZE - 1) as u32));
            e.push(base >> 32);
        } else {
            e.extend([0, 0]);
        }
    }
    let out: Vec<u8> = e.iter().flat_map(|v| v.to_le_bytes()).collect();
    debug_assert_eq!(out.len() as u64, GDT_SIZE);
    out
}

/// A pseudo-descriptor for `lgdt`/`lidt` (limit, base), 10 bytes.
pub fn pseudo_descriptor(base: u64, size: u64) -> Vec<u8> {
    let mut v = ((size - 1) as u16).to_le_bytes().to_vec();
    v.extend(base.to_le_bytes());
    v
}

/// One 64-bit interrupt gate (16 bytes), present, to `handler` in the
/// kernel code segment; `dpl` 3 lets CPL3 `int n` reach it.
pub fn idt_gate(handler: u64, dpl: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&KCODE_SEL.to_le_bytes());
    g[4] = 0; // IST
    g[5] = 0x8e | ((dpl & 3) << 5);
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

/// The IDT from the handler address and DPL of each of the 256 vectors.
pub fn idt(handlers: &[(u64, u8)]) -> Vec<u8> {
    handlers
        .iter()
        .flat_map(|(h, dpl)| idt_gate(*h, *dpl))
        .collect()
}

/// The TSS of vCPU `cpu`: RSP0 = top of its CPL0 stack, no I/O bitmap.
pub fn tss(cpu: usize) -> [u8; TSS_SIZE as usize] {
    let mut t = [0u8; TSS_SIZE as usize];
    t[4..12].copy_from_slice(&Layout::kstack_top(cpu).to_le_bytes());
    // I/O map base beyond the limit: no bitmap (IOPL=3 grants port access).
    t[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::long_mode::segment_from_gdt;

    #[test]
    fn user_segments_are_dpl3() {
        let cs = segment_from_gdt(GDT_UCODE64, 0x23);
        assert_eq!((cs.dpl, cs.l, cs.type_), (3, 1, 0xb));
        let ds = segment_from_gdt(GDT_UDATA, 0x2b);
        assert_eq!((ds.dpl, ds.type_), (3, 3));
        let g = gdt(2);
        let tss1 = u64::from_le_bytes(g[0x40..0x48].try_into().unwrap());
        let s = segment_from_gdt(tss1, 0x40);
        assert_eq!(
            (s.base, s.limit, s.type_, s.s),
            (TSS_ADDR + TSS_STRIDE, 103, 9, 0)
        );
        assert_eq!(&g[0x50..0x60], &[0u8; 16]);
    }

    #[test]
    fn gate_encodes_handler() {
        let g = idt_gate(0x1234_5678_9abc, 3);
        assert_eq!(u16::from_le_bytes([g[0], g[1]]), 0x9abc);
        assert_eq!(u16::from_le_bytes([g[6], g[7]]), 0x5678);
        assert_eq!(u32::from_le_bytes([g[8], g[9], g[10], g[11]]), 0x1234);
        assert_eq!(g[5], 0xee);
        assert_eq!(idt_gate(0, 0)[5], 0x8e);
    }
}
