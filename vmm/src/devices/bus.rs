//! Port I/O address decoding: which device a port belongs to.

use super::{i8042, serial};

/// First port of the test device.
pub const TEST_DEVICE_BASE: u16 = 0x0f00;
/// Ports of the test device.
pub const TEST_DEVICE_LEN: u16 = 0x10;

/// The device behind a port, with the offset inside the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioTarget {
    /// COM1, offset 0..8.
    Serial(u8),
    /// i8042 data or command port.
    I8042(u16),
    /// The test device, offset 0..0x10.
    TestDevice(u16),
    /// Nothing here: reads return all ones, writes are ignored.
    Unclaimed,
}

/// Decode `port`.
pub fn decode(port: u16) -> PioTarget {
    match port {
        p if (serial::COM1_BASE..serial::COM1_BASE + serial::COM1_LEN).contains(&p) => {
            PioTarget::Serial((p - serial::COM1_BASE) as u8)
        }
        i8042::DATA_PORT | i8042::COMMAND_PORT => PioTarget::I8042(port),
        p if (TEST_DEVICE_BASE..TEST_DEVICE_BASE + TEST_DEVICE_LEN).contains(&p) => {
            PioTarget::TestDevice(p - TEST_DEVICE_BASE)
        }
        _ => PioTarget::Unclaimed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_ranges() {
        assert_eq!(decode(0x3f8), PioTarget::Serial(0));
        assert_eq!(decode(0x3ff), PioTarget::Serial(7));
        assert_eq!(decode(0x400), PioTarget::Unclaimed);
        assert_eq!(decode(0x64), PioTarget::I8042(0x64));
        assert_eq!(decode(0x0f00), PioTarget::TestDevice(0));
        assert_eq!(decode(0x0f0f), PioTarget::TestDevice(0xf));
        assert_eq!(decode(0x0f10), PioTarget::Unclaimed);
        assert_eq!(decode(0x2f8), PioTarget::Unclaimed);
    }
}
