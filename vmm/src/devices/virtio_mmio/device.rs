//! The contract between the virtio-mmio transport and a device model, and the
//! shared interrupt state both of them raise interrupts through.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// InterruptStatus bit: the device used a buffer in at least one virtqueue.
pub const INT_VRING: u32 = VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device configuration space changed.
pub const INT_CONFIG: u32 = VIRTIO_MMIO_INT_CONFIG;

/// The interrupt line of one virtio-mmio device, as the VMM wires it (an
/// irqfd on KVM, a recorder in tests).
pub trait Interrupt: Send + Sync {
    /// Raise the line. `status_bits` are the InterruptStatus bits that were
    /// just set (`INT_VRING`, `INT_CONFIG`); the driver reads InterruptStatus
    /// and acknowledges them through InterruptACK.
    fn trigger(&self, status_bits: u32);
}

/// InterruptStatus and ConfigGeneration of one device, shared by the
/// transport (which exposes them as registers) and the device model (which
/// raises device-initiated interrupts: config change, returned buffers).
pub struct InterruptState {
    status: AtomicU32,
    config_generation: AtomicU32,
    line: Arc<dyn Interrupt>,
}

impl std::fmt::Debug for InterruptState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterruptState")
            .field("status", &self.status())
            .field("config_generation", &self.config_generation())
            .finish_non_exhaustive()
    }
}

impl InterruptState {
    /// State for a device whose interrupts go to `line`.
    pub fn new(line: Arc<dyn Interrupt>) -> Arc<Self> {
        Arc::new(InterruptState {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            line,
        })
    }

    /// Set `INT_VRING` and raise the line.
    pub fn signal_used_queue(&self) {
        self.raise(INT_VRING);
    }

    /// Bump ConfigGeneration, set `INT_CONFIG` and raise the line.
    pub fn signal_config_change(&self) {
        self.bump_config_generation();
        self.raise(INT_CONFIG);
    }

    /// Bump ConfigGeneration without an interrupt (config changed before
    /// the driver is ready to be told).
    pub fn bump_config_generation(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Current InterruptStatus register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Current ConfigGeneration register value.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// InterruptACK: clear `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Device reset: no interrupt pending.
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.line.trigger(bits);
    }
}

/// Why a device refused to start on DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not make a queue the device cannot work without ready.
    #[error("required virtqueue {index} ({name}) was not set up by the driver")]
    MissingQueue {
        /// Transport queue index.
        index: usize,
        /// What the queue is for.
        name: &'static str,
    },
}

/// A virtio device model behind a transport.
///
/// Life cycle: the transport calls `attach_interrupt` once, then the driver
/// negotiates features and sets up queues through the transport; on
/// DRIVER_OK the transport hands the ready queues to `activate`; every
/// QueueNotify becomes `process_queue`; writing 0 to Status calls `reset`.
/// No method may panic on anything the guest controls.
pub trait VirtioDevice: Send {
    /// Virtio device ID (5 for a memory balloon).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (including `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Maximum size of each virtqueue the device may use, by queue index
    /// (each a power of two, at most 32768).
    fn queue_max_sizes(&self) -> &[u16];
    /// Read device configuration space at `offset` (any width); bytes past
    /// the end of the configuration read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Driver write to configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Called once by the transport, before anything else, with the state
    /// the device raises its own interrupts through.
    fn attach_interrupt(&mut self, irq: Arc<InterruptState>);
    /// DRIVER_OK: start operating on `queues` (indexed like the transport;
    /// `None` for a queue the driver did not make ready; each `Some` queue
    /// was validated against `mem`) with the negotiated `acked_features`.
    fn activate(
        &mut self,
        acked_features: u64,
        queues: Vec<Option<Queue>>,
        mem: GuestMemoryMmap,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index`: consume it. Returns whether
    /// buffers were used and the driver must be interrupted.
    fn process_queue(&mut self, index: usize) -> bool;
    /// Device reset (Status written with 0): drop queues and memory, return
    /// to the pre-activation state.
    fn reset(&mut self);
}
