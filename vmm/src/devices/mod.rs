//! Devices: serial (vm-superio), i8042, port decoding, virtio-mmio balloon.

pub mod bus;
pub mod console;
pub mod i8042;
pub mod serial;
pub mod virtio_balloon;
pub mod virtio_mmio;
pub mod warn_limit;
