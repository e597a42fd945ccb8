//! A small Intel MultiProcessor Specification 1.4 table so Linux finds every
//! vCPU's local APIC (no ACPI here). Placed in the reserved gap below 1 MiB.

/// Where the floating pointer and the table go (start of the EBDA-like gap,
/// which Linux scans: "last KB of base memory").
pub const MPTABLE_START: u64 = 0x9fc00;
/// Address of the local APIC.
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// Address of the I/O APIC.
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// Largest vCPU count the table supports (APIC ids are 8 bit and the table
/// must fit in the 1 KiB gap).
pub const MAX_VCPUS: u8 = 32;

const MP_IRQ_SOURCE_COUNT: u8 = 16;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

/// The table cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    /// Too many or zero vCPUs.
    #[error("the MP table supports 1 to {max} vCPUs, {got} requested")]
    VcpuCount {
        /// Requested.
        got: u8,
        /// Supported.
        max: u8,
    },
}

fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// The bytes to write at [`MPTABLE_START`] for `vcpus` vCPUs.
pub fn build(vcpus: u8) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::VcpuCount {
            got: vcpus,
            max: MAX_VCPUS,
        });
    }
    let table_addr = MPTABLE_START as u32 + 16;
    let ioapic_id = vcpus;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        // cpu signature (family 6), feature flags (FPU | APIC), reserved.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&((1u32 << 0) | (1u32 << 9)).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The I/O APIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    count += 1;
    // ISA IRQs 0..16 to I/O APIC pins 0..16.
    for irq in 0..MP_IRQ_SOURCE_COUNT {
        let ty = if irq == 0 { MP_EXTINT } else { MP_INT };
        entries.extend_from_slice(&[3, ty, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT to LINT0, NMI to LINT1 of every CPU.
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    let len = (44 + entries.len()) as u16;
    table.extend_from_slice(&len.to_le_bytes());
    table.push(4); // spec rev 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"KVMHUGE ");
    table.extend_from_slice(b"VMM-HUGEPAGE");
    table.extend_from_slice(&0u32.to_le_bytes()); // oem table
    table.extend_from_slice(&0u16.to_le_bytes()); // oem table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // ext table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out[..16]);
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        let t = build(4).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
        // 4 processors of 20 bytes, then 20 entries of 8 bytes.
        assert_eq!(len, 44 + 4 * 20 + 20 * 8);
        // Only CPU 0 is the boot processor.
        assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOTPROCESSOR);
        assert_eq!(table[44 + 20 + 3], CPU_ENABLED);
        assert!(MPTABLE_START + t.len() as u64 <= 0xa0000);
    }

    #[test]
    fn largest_fits_below_640k() {
        let t = build(MAX_VCPUS).unwrap();
        assert!(MPTABLE_START + t.len() as u64 <= 0xa0000);
        assert!(build(0).is_err());
        assert!(build(MAX_VCPUS + 1).is_err());
    }
}
