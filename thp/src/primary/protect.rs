//! `mprotect` of a frame: the VMA's write permission.

use super::{MmError, MmId, Primary};
use crate::units::PAGES_PER_HPAGE;

impl Primary {
    /// `mprotect(PROT_READ)` (`writable == false`) or back to
    /// `PROT_READ|PROT_WRITE` of `frame` of `mm` (`change_protection`).
    ///
    /// Read-only: every mapping of the frame becomes read-only and host write
    /// faults fail with [`MmError::WriteProtected`]. Restore: mappings whose
    /// PTE/PMD bit is set become writable again, as `can_change_pte_writable`
    /// does for exclusive anonymous pages; COW-shared ones stay read-only.
    /// Callers wrap this in an mmu-notifier invalidation
    /// (`MMU_NOTIFY_PROTECTION_VMA`). Returns whether the protection changed.
    pub fn mprotect(&mut self, mm: MmId, frame: usize, writable: bool) -> Result<bool, MmError> {
        let m = self.mm_mut(mm)?;
        let pages = m.pages();
        let Some(w) = m.wrprotected.get_mut(frame) else {
            return Err(MmError::OutOfRange {
                first: frame as u64 * PAGES_PER_HPAGE,
                npages: PAGES_PER_HPAGE,
                pages,
            });
        };
        let changed = *w == writable;
        *w = !writable;
        Ok(changed)
    }
}
