//! Holding back writes to one 2M frame while the vCPUs run: a userfaultfd
//! in write-protect mode.
//!
//! A split copies the frame's pages into small pages. While it copies, any
//! write to the frame would land in the huge page after its page was copied
//! and be lost with it. Pausing every vCPU for the copy (what a split did
//! before) holds back vCPUs that never touch the frame. Write-protecting the
//! frame through a userfaultfd holds back only a writer of that frame:
//! * a vCPU's write faults in KVM, whose `get_user_pages` takes the
//!   userfault and sleeps (interruptibly: a kick still takes the vCPU out of
//!   `KVM_RUN` with `EINTR`) until the frame is woken;
//! * a write from a VMM thread sleeps in its own page fault the same way;
//! * reads go on: the huge page is still mapped, read-only. Write-protecting
//!   fires the mmu notifier, so KVM drops its writable mapping first.
//!
//! The frame's mapping is then replaced (`mmap`, which drops the
//! registration with the old VMA) and the sleepers are woken: they fault
//! again, now into the small pages that hold every byte. Nobody reads this
//! userfaultfd: a fault only queues a message, and waking the range lets the
//! faulting thread go whether or not its message was read.
//!
//! Needs Linux 5.19+ (write-protect on hugetlbfs/shmem,
//! `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`); where the kernel lacks it,
//! [`WriteHold::open`] says why and the split copies under the pause.

use std::os::fd::{AsRawFd, OwnedFd};

use linux_raw_sys::general::{
    uffdio_api, uffdio_range, uffdio_register, uffdio_writeprotect, _UFFDIO_WAKE,
    _UFFDIO_WRITEPROTECT, UFFDIO_REGISTER_MODE_WP, UFFD_API, UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
};
use linux_raw_sys::ioctl::{
    UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_WRITEPROTECT,
};
use rustix::mm::{userfaultfd, UserfaultfdFlags};

/// `UFFDIO_WRITEPROTECT_MODE_WP` (linux/userfaultfd.h; not in linux-raw-sys).
const MODE_WP: u64 = 1;

/// A userfaultfd ioctl failed.
#[derive(Debug, thiserror::Error)]
#[error("userfaultfd {op} on [{start:#x}, +{len:#x}): {source}")]
pub(crate) struct WriteHoldError {
    /// The operation.
    pub op: &'static str,
    /// Host address of the range.
    pub start: u64,
    /// Bytes.
    pub len: u64,
    /// The kernel's error.
    #[source]
    pub source: std::io::Error,
}

/// A userfaultfd that write-protects guest RAM one frame at a time.
#[derive(Debug)]
pub(crate) struct WriteHold {
    fd: OwnedFd,
}

impl WriteHold {
    /// Open a userfaultfd with write-protect on hugetlbfs and shmem, or say
    /// why this kernel cannot.
    pub(crate) fn open() -> Result<WriteHold, String> {
        // SAFETY: creating a userfaultfd has no memory-safety preconditions;
        // the fd only acts on ranges this crate registers (its own guest RAM).
        let fd = unsafe { userfaultfd(UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK) }
            .map_err(|e| format!("userfaultfd(2): {e}"))?;
        let want = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        let mut api = uffdio_api {
            api: u64::from(UFFD_API),
            features: u64::from(want),
            ioctls: 0,
        };
        ioctl(&fd, UFFDIO_API, &mut api, "UFFDIO_API", 0, 0).map_err(|e| {
            format!("{e} (write-protect on hugetlbfs and shmem needs Linux 5.19 or later)")
        })?;
        Ok(WriteHold { fd })
    }

    /// Register `[start, start + len)` for write-protect faults and
    /// write-protect it: from here on a write there sleeps until
    /// [`Self::wake`] or [`Self::release`].
    pub(crate) fn hold(&self, start: u64, len: u64) -> Result<(), WriteHoldError> {
        let mut reg = uffdio_register {
            range: uffdio_range { start, len },
            mode: u64::from(UFFDIO_REGISTER_MODE_WP),
            ioctls: 0,
        };
        ioctl(
            &self.fd,
            UFFDIO_REGISTER,
            &mut reg,
            "UFFDIO_REGISTER",
            start,
            len,
        )?;
        // The range's ioctls: this kernel may not write-protect this memory.
        let need = (1u64 << _UFFDIO_WRITEPROTECT) | (1u64 << _UFFDIO_WAKE);
        if reg.ioctls & need != need {
            self.unregister(start, len);
            return Err(WriteHoldError {
                op: "UFFDIO_REGISTER (no UFFDIO_WRITEPROTECT here)",
                start,
                len,
                source: std::io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            });
        }
        let r = self.write_protect(start, len, true);
        if r.is_err() {
            self.unregister(start, len);
        }
        r
    }

    /// `UFFDIO_WRITEPROTECT` on `[start, start + len)`: on, or off (which
    /// wakes the sleepers).
    fn write_protect(&self, start: u64, len: u64, on: bool) -> Result<(), WriteHoldError> {
        let mut wp = uffdio_writeprotect {
            range: uffdio_range { start, len },
            mode: if on { MODE_WP } else { 0 },
        };
        ioctl(
            &self.fd,
            UFFDIO_WRITEPROTECT,
            &mut wp,
            "UFFDIO_WRITEPROTECT",
            start,
            len,
        )
    }

    /// Wake every writer sleeping on `[start, start + len)`: after the
    /// range's mapping was replaced, they fault again into the new one.
    pub(crate) fn wake(&self, start: u64, len: u64) -> Result<(), WriteHoldError> {
        let mut r = uffdio_range { start, len };
        ioctl(&self.fd, UFFDIO_WAKE, &mut r, "UFFDIO_WAKE", start, len)
    }

    /// Undo [`Self::hold`] where the mapping was not replaced (a split that
    /// failed): lift the write-protect (which wakes the sleepers),
    /// unregister, and wake whatever is left. Best effort, each step logged
    /// on failure: after a replaced mapping the first two find nothing.
    pub(crate) fn release(&self, start: u64, len: u64) {
        if let Err(e) = self.write_protect(start, len, false) {
            log::debug!("{e}");
        }
        self.unregister(start, len);
        if let Err(e) = self.wake(start, len) {
            log::warn!("{e}");
        }
    }

    fn unregister(&self, start: u64, len: u64) {
        let mut r = uffdio_range { start, len };
        if let Err(e) = ioctl(
            &self.fd,
            UFFDIO_UNREGISTER,
            &mut r,
            "UFFDIO_UNREGISTER",
            start,
            len,
        ) {
            log::debug!("{e}");
        }
    }
}

/// One userfaultfd ioctl whose argument is `arg`.
fn ioctl<T>(
    fd: &OwnedFd,
    request: u32,
    arg: &mut T,
    op: &'static str,
    start: u64,
    len: u64,
) -> Result<(), WriteHoldError> {
    // SAFETY: `fd` is an open userfaultfd and `request` is a userfaultfd
    // ioctl whose argument is a `T` (each caller pairs them as in
    // linux/userfaultfd.h); `arg` is a live, exclusive reference for the call.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::c_ulong::from(request),
            std::ptr::from_mut(arg).cast::<libc::c_void>(),
        )
    };
    if r < 0 {
        return Err(WriteHoldError {
            op,
            start,
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
