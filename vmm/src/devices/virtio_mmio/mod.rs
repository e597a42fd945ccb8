//! virtio-mmio transport (virtio 1.x section 4.2, Version 2) for device
//! models that need no KVM: the VMM forwards MMIO exits in the device's
//! window to [`MmioTransport::read`] / [`MmioTransport::write`] and wires
//! [`Interrupt`] to an irqfd. Linux finds the device through the kernel
//! command line argument from [`cmdline_arg`].
//!
//! * `device` — the [`VirtioDevice`] trait, [`Interrupt`], [`InterruptState`]
//! * `transport` — the register file and status state machine
//! * `chain` — validated draining of a virtqueue for device models

pub mod chain;
pub mod device;
pub mod transport;

pub use chain::{collect_chain, drain_queue, ChainError, Completion, Drained};
pub use device::{ActivateError, Interrupt, InterruptState, VirtioDevice, INT_CONFIG, INT_VRING};
pub use transport::{MmioTransport, CONFIG_OFFSET, MMIO_MAGIC, MMIO_SIZE, MMIO_VERSION};

/// Where one virtio-mmio device lives in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Window size (at least [`MMIO_SIZE`]).
    pub size: u64,
    /// Interrupt line (GSI) the device raises.
    pub irq: u32,
}

impl MmioSlot {
    /// Whether guest-physical `addr` falls in this device's window; returns
    /// the offset to pass to the transport.
    pub fn offset_of(&self, addr: u64) -> Option<u64> {
        let off = addr.checked_sub(self.base)?;
        (off < self.size).then_some(off)
    }

    /// `virtio_mmio.device=<size>@<base>:<irq>` for the Linux command line.
    pub fn cmdline_arg(&self) -> String {
        cmdline_arg(self.size, self.base, self.irq)
    }
}

/// The Linux kernel command line argument that declares a virtio-mmio
/// device: `virtio_mmio.device=<size>@<base>:<irq>`, e.g.
/// `virtio_mmio.device=4K@0xd0000000:5`. The size uses the largest of the
/// K/M/G suffixes that divides it exactly (Linux parses it with `memparse`).
pub fn cmdline_arg(size: u64, base: u64, irq: u32) -> String {
    const K: u64 = 1 << 10;
    let size = if size == 0 {
        "0".to_string()
    } else if size & (K * K * K - 1) == 0 {
        format!("{}G", size / (K * K * K))
    } else if size & (K * K - 1) == 0 {
        format!("{}M", size / (K * K))
    } else if size & (K - 1) == 0 {
        format!("{}K", size / K)
    } else {
        size.to_string()
    };
    format!("virtio_mmio.device={size}@{base:#x}:{irq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_formats_sizes_like_linux_expects() {
        assert_eq!(
            cmdline_arg(0x1000, 0xd000_0000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            cmdline_arg(0x200, 0xd000_1000, 6),
            "virtio_mmio.device=512@0xd0001000:6"
        );
        assert_eq!(
            cmdline_arg(2 << 20, 0xc000_0000, 10),
            "virtio_mmio.device=2M@0xc0000000:10"
        );
        let slot = MmioSlot {
            base: 0xd000_0000,
            size: 0x1000,
            irq: 5,
        };
        assert_eq!(slot.cmdline_arg(), "virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(slot.offset_of(0xd000_0070), Some(0x70));
        assert_eq!(slot.offset_of(0xd000_1000), None);
        assert_eq!(slot.offset_of(0xcfff_ffff), None);
    }
}
