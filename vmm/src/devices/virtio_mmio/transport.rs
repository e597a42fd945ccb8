//! The virtio-mmio register file (virtio 1.x section 4.2.2, Version 2 —
//! "modern"), generic over a [`VirtioDevice`].
//!
//! The VMM forwards every guest access to `[base, base + MMIO_SIZE)` here as
//! `read(offset, data)` / `write(offset, data)`. Nothing the guest writes
//! can panic the VMM: bad accesses are logged and ignored, bad queue
//! configurations are refused and put the device in DEVICE_NEEDS_RESET.

use std::sync::Arc;

use crate::devices::warn_limit::guest_warn;
use log::{debug, info};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::device::{Interrupt, InterruptState, VirtioDevice};

/// Size of the register window of one device (registers + config space).
pub const MMIO_SIZE: u64 = 0x200;
/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Modern virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// VendorID register value (no vendor-specific behaviour).
pub const MMIO_VENDOR_ID: u32 = 0;
/// Offset of the device configuration space.
pub const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

/// Driver-written configuration of one queue, applied on QueueReady.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    max: u16,
    num: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max: u16) -> Self {
        QueueRegs {
            max,
            num: u32::from(max),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Build the virtio-queue `Queue` this configuration describes, checked
    /// for size, alignment and placement in `mem`.
    fn build(&self, mem: &GuestMemoryMmap) -> Result<Queue, String> {
        let mut q = Queue::new(self.max).map_err(|e| format!("max size {}: {e}", self.max))?;
        let size = u16::try_from(self.num)
            .map_err(|_| format!("size {} is larger than the maximum {}", self.num, self.max))?;
        q.try_set_size(size).map_err(|_| {
            format!(
                "size {} is not a power of two between 1 and {}",
                self.num, self.max
            )
        })?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|e| format!("descriptor table {:#x}: {e}", self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|e| format!("driver area {:#x}: {e}", self.driver))?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|e| format!("device area {:#x}: {e}", self.device))?;
        if self.driver == 0 {
            // virtio-queue treats a driver area at 0 as "not configured".
            return Err("driver area at guest address 0 is not supported".into());
        }
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err(format!(
                "rings (desc {:#x}, driver {:#x}, device {:#x}, size {size}) are not inside guest memory",
                self.desc, self.driver, self.device
            ));
        }
        Ok(q)
    }
}

/// One virtio-mmio device: registers, feature negotiation, queue setup,
/// status state machine, and dispatch to the device model.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    irq: Arc<InterruptState>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    /// The driver set bits in a feature word past the second.
    acked_unknown_word: bool,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    activated: bool,
    /// Queues notified before DRIVER_OK (Linux's balloon kicks its stats
    /// queue before setting DRIVER_OK); processed on activation.
    pending_notify: Vec<bool>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Put `device` behind a virtio-mmio register file. `mem` is guest RAM;
    /// `line` is the device's interrupt line.
    pub fn new(mut device: D, mem: GuestMemoryMmap, line: Arc<dyn Interrupt>) -> Self {
        let irq = InterruptState::new(line);
        device.attach_interrupt(irq.clone());
        let queues: Vec<QueueRegs> = device
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueRegs::new(m))
            .collect();
        let pending_notify = vec![false; queues.len()];
        MmioTransport {
            device,
            mem,
            irq,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            acked_unknown_word: false,
            queue_sel: 0,
            queues,
            activated: false,
            pending_notify,
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, e.g. to set a balloon target.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Device status register value.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether DRIVER_OK activated the device.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// InterruptStatus / ConfigGeneration shared with the device.
    pub fn interrupt_state(&self) -> &Arc<InterruptState> {
        &self.irq
    }

    /// Guest read of `data.len()` bytes at `offset` from the window base.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            let end = offset.checked_add(data.len() as u64);
            if end.is_some_and(|e| e <= MMIO_SIZE) && data.len() <= 8 {
                self.device.read_config(offset - CONFIG_OFFSET, data);
            } else {
                guest_warn!(
                    "virtio-mmio: config read of {} bytes at {offset:#x} outside the window",
                    data.len()
                );
                data.fill(0);
            }
            return;
        }
        data.fill(0);
        if data.len() != 4 || offset & 3 != 0 {
            guest_warn!(
                "virtio-mmio: {}-byte register read at {offset:#x} (registers are 32-bit aligned); reads 0",
                data.len()
            );
            return;
        }
        let v = self.read_reg(offset as u32);
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Guest write of `data` at `offset` from the window base.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            let end = offset.checked_add(data.len() as u64);
            if end.is_some_and(|e| e <= MMIO_SIZE) && data.len() <= 8 {
                self.device.write_config(offset - CONFIG_OFFSET, data);
            } else {
                guest_warn!(
                    "virtio-mmio: config write of {} bytes at {offset:#x} outside the window",
                    data.len()
                );
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!(
                "virtio-mmio: {}-byte register write at {offset:#x} ignored (registers are 32-bit)",
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            guest_warn!("virtio-mmio: unaligned register write at {offset:#x} ignored");
            return;
        }
        self.write_reg(offset as u32, u32::from_le_bytes(bytes));
    }

    fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_reg(&self, reg: u32) -> u32 {
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max)),
            VIRTIO_MMIO_QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.irq.status(),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.irq.config_generation(),
            // No shared memory regions: length reads as all ones (virtio 1.2, 4.2.2).
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => {
                guest_warn!(
                    "virtio-mmio: read of unknown or write-only register {reg:#x}; reads 0"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, reg: u32, v: u32) {
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(v),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => self.with_queue_regs(reg, |q| q.num = v),
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.with_queue_regs(reg, |q| set_low(&mut q.desc, v)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.with_queue_regs(reg, |q| set_high(&mut q.desc, v)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.with_queue_regs(reg, |q| set_low(&mut q.driver, v)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.with_queue_regs(reg, |q| set_high(&mut q.driver, v))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => self.with_queue_regs(reg, |q| set_low(&mut q.device, v)),
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.with_queue_regs(reg, |q| set_high(&mut q.device, v))
            }
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(v),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.irq.ack(v),
            VIRTIO_MMIO_STATUS => self.write_status(v),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => {
                guest_warn!(
                    "virtio-mmio: write {v:#x} to unknown or read-only register {reg:#x} ignored"
                )
            }
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        if !negotiating {
            guest_warn!("virtio-mmio: DriverFeatures written outside feature negotiation (status {:#x}); ignored", self.status);
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
            sel if v != 0 => {
                guest_warn!("virtio-mmio: driver acked features {v:#x} in unknown word {sel}; FEATURES_OK will be refused");
                self.acked_unknown_word = true;
            }
            _ => {}
        }
    }

    /// Apply a write to the selected queue's configuration registers.
    fn with_queue_regs(&mut self, reg: u32, f: impl FnOnce(&mut QueueRegs)) {
        let sel = self.queue_sel;
        let activated = self.activated;
        match self.queues.get_mut(sel as usize) {
            None => {
                guest_warn!(
                    "virtio-mmio: write to register {reg:#x} of nonexistent queue {sel} ignored"
                )
            }
            Some(q) if q.ready || activated => guest_warn!(
                "virtio-mmio: write to register {reg:#x} of queue {sel} while it is live ignored"
            ),
            Some(q) => f(q),
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        let sel = self.queue_sel as usize;
        let Some(regs) = self.queues.get(sel).copied() else {
            guest_warn!("virtio-mmio: QueueReady for nonexistent queue {sel} ignored");
            return;
        };
        if v == 0 {
            if self.activated && regs.ready {
                guest_warn!("virtio-mmio: driver disabled queue {sel} of a running device; it is no longer serviced");
            }
            self.queues[sel].ready = false;
            return;
        }
        if regs.ready {
            return;
        }
        if self.activated {
            guest_warn!("virtio-mmio: QueueReady for queue {sel} after DRIVER_OK ignored");
            return;
        }
        match regs.build(&self.mem) {
            Ok(_) => {
                debug!("virtio-mmio: queue {sel} ready: {regs:?}");
                self.queues[sel].ready = true;
            }
            Err(reason) => {
                self.set_needs_reset(&format!("queue {sel} rejected: {reason}"));
            }
        }
    }

    fn notify(&mut self, v: u32) {
        // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index.
        let index = v as usize;
        if index >= self.queues.len() {
            guest_warn!("virtio-mmio: notify for nonexistent queue {v} ignored");
            return;
        }
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            debug!("virtio-mmio: notify for queue {v} while the device needs reset; ignored");
            return;
        }
        if !self.queues[index].ready {
            guest_warn!("virtio-mmio: notify for queue {v}, which is not ready; ignored");
            return;
        }
        if !self.activated {
            debug!("virtio-mmio: queue {v} notified before DRIVER_OK; deferred");
            self.pending_notify[index] = true;
            return;
        }
        if self.device.process_queue(index) {
            self.irq.signal_used_queue();
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = (v & !VIRTIO_CONFIG_S_NEEDS_RESET) | (old & VIRTIO_CONFIG_S_NEEDS_RESET);
        let set = new & !old;
        if old & !new != 0 {
            guest_warn!(
                "virtio-mmio: driver cleared status bits {:#x} without a reset",
                old & !new
            );
        }
        if set & VIRTIO_CONFIG_S_FAILED != 0 {
            guest_warn!("virtio-mmio: driver set FAILED (status {v:#x})");
        }
        if set & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            if let Err(reason) = self.check_features() {
                guest_warn!("virtio-mmio: refusing FEATURES_OK: {reason}");
                new &= !VIRTIO_CONFIG_S_FEATURES_OK;
            } else {
                info!(
                    "virtio-mmio: device {} negotiated features {:#x}",
                    self.device.device_type(),
                    self.acked_features
                );
            }
        }
        self.status = new;
        if set & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn check_features(&self) -> Result<(), String> {
        if self.status & (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
            != (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        {
            return Err("ACKNOWLEDGE and DRIVER were not set first".into());
        }
        let unknown = self.acked_features & !self.device.features();
        if self.acked_unknown_word {
            return Err("driver acked feature bits past bit 63".into());
        }
        if unknown != 0 {
            return Err(format!(
                "driver acked features {unknown:#x} the device does not offer"
            ));
        }
        if self.acked_features & (1u64 << VIRTIO_F_VERSION_1) == 0 {
            return Err("VIRTIO_F_VERSION_1 not acked (legacy drivers are not supported)".into());
        }
        Ok(())
    }

    fn activate(&mut self) {
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            guest_warn!("virtio-mmio: DRIVER_OK on a device that needs reset; not activated");
            self.irq.signal_config_change();
            return;
        }
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            self.set_needs_reset("DRIVER_OK without FEATURES_OK");
            return;
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, regs) in self.queues.iter().enumerate() {
            if !regs.ready {
                queues.push(None);
                continue;
            }
            match regs.build(&self.mem) {
                Ok(q) => queues.push(Some(q)),
                Err(reason) => {
                    self.set_needs_reset(&format!("queue {i} invalid at DRIVER_OK: {reason}"));
                    return;
                }
            }
        }
        match self
            .device
            .activate(self.acked_features, queues, self.mem.clone())
        {
            Ok(()) => {
                self.activated = true;
                info!(
                    "virtio-mmio: device {} activated",
                    self.device.device_type()
                );
                let pending =
                    std::mem::replace(&mut self.pending_notify, vec![false; self.queues.len()]);
                let mut interrupt = false;
                for (index, _) in pending.iter().enumerate().filter(|(_, &p)| p) {
                    interrupt |= self.device.process_queue(index);
                }
                if interrupt {
                    self.irq.signal_used_queue();
                }
            }
            Err(e) => self.set_needs_reset(&format!("activation failed: {e}")),
        }
    }

    /// Enter DEVICE_NEEDS_RESET (virtio 1.x 2.1.2): the driver must reset
    /// the device; if it already set DRIVER_OK it gets a config interrupt.
    fn set_needs_reset(&mut self, reason: &str) {
        guest_warn!(
            "virtio-mmio: device {} needs reset: {reason}",
            self.device.device_type()
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.irq.signal_config_change();
        }
    }

    fn reset(&mut self) {
        debug!("virtio-mmio: device {} reset", self.device.device_type());
        self.device.reset();
        self.irq.clear();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.acked_unknown_word = false;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max);
        }
        self.activated = false;
        self.pending_notify.fill(false);
    }
}

fn set_low(field: &mut u64, v: u32) {
    *field = (*field & !0xffff_ffff) | u64::from(v);
}

fn set_high(field: &mut u64, v: u32) {
    *field = (*field & 0xffff_ffff) | (u64::from(v) << 32);
}
