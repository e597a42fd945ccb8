//! What the balloon asks of the VMM.

/// The VMM side of the balloon: acts on guest memory the driver gives back
/// or takes back. Every PFN passed here was validated by the device (inside
/// guest RAM; inflated at most once; deflated only if inflated); the VMM
/// implements it with `guest_mem::GuestRam::discard` / `refill` with vCPUs
/// quiesced. Calls happen synchronously on the thread that performed the
/// QueueNotify MMIO write (a vCPU thread), before the buffer is returned to
/// the driver.
pub trait BalloonBackend: Send {
    /// The guest gave these 4K pages (PFN = gpa >> 12) to the host; their
    /// contents may be discarded.
    fn inflate(&mut self, pfns: &[u64]);
    /// The guest takes these previously inflated 4K pages back; they must be
    /// usable (contents undefined, zero after a discard) once this returns.
    fn deflate(&mut self, pfns: &[u64]);
    /// Free page reporting: `[gpa, gpa + len)` (4K aligned) is free in the
    /// guest and may be discarded; the guest may reuse it at any time
    /// afterwards without telling the device.
    fn report_free(&mut self, gpa: u64, len: u64);
}
