//! memfd creation, sizing, hole punching and allocation.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::GuestMemError;

/// What kind of memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemfdKind {
    /// `MFD_HUGETLB | MFD_HUGE_2MB`: a file of 2M hugetlb pages.
    Hugetlb2M,
    /// An ordinary shmem memfd (4K pages, or shmem THP when madvised).
    Shmem,
}

/// An owned memfd.
#[derive(Debug)]
pub struct Memfd {
    fd: OwnedFd,
    name: String,
    kind: MemfdKind,
}

impl Memfd {
    /// `memfd_create(name, MFD_CLOEXEC [| MFD_HUGETLB | MFD_HUGE_2MB])`.
    pub fn create(name: &str, kind: MemfdKind) -> Result<Self, GuestMemError> {
        let cname = CString::new(name).map_err(|_| GuestMemError::Memfd {
            name: name.to_string(),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let mut flags = libc::MFD_CLOEXEC;
        if kind == MemfdKind::Hugetlb2M {
            flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
        }
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
        if fd < 0 {
            return Err(GuestMemError::Memfd {
                name: name.to_string(),
                source: GuestMemError::last_os(),
            });
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            name: name.to_string(),
            kind,
        })
    }

    /// Name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Kind given at creation.
    pub fn kind(&self) -> MemfdKind {
        self.kind
    }

    /// `ftruncate` to `len` bytes (sparse: allocates nothing).
    pub fn set_len(&self, len: u64) -> Result<(), GuestMemError> {
        let err = |source| GuestMemError::Truncate {
            name: self.name.clone(),
            len,
            source,
        };
        let l = libc::off_t::try_from(len)
            .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EFBIG)))?;
        // SAFETY: ftruncate on an fd we own; no memory is touched.
        let r = unsafe { libc::ftruncate(self.fd.as_raw_fd(), l) };
        if r < 0 {
            return Err(err(GuestMemError::last_os()));
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> Result<(), std::io::Error> {
        let (o, l) = match (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
            (Ok(o), Ok(l)) => (o, l),
            _ => return Err(std::io::Error::from_raw_os_error(libc::EFBIG)),
        };
        loop {
            // SAFETY: fallocate on an fd we own; no memory of ours is touched.
            let r = unsafe { libc::fallocate(self.fd.as_raw_fd(), mode, o, l) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    /// Free `[offset, offset + len)`: `fallocate(PUNCH_HOLE | KEEP_SIZE)`.
    /// The pages read as zero afterwards and every mapping of them is zapped.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), GuestMemError> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
        .map_err(|source| GuestMemError::Fallocate {
            what: self.what("punch hole"),
            offset,
            len,
            source,
        })
    }

    /// Allocate `[offset, offset + len)` (`fallocate` mode 0). For a hugetlb
    /// memfd this takes huge pages from the host pool; the raw `io::Error`
    /// is returned so the caller can tell ENOSPC (pool empty) apart.
    pub fn allocate(&self, offset: u64, len: u64) -> Result<(), std::io::Error> {
        self.fallocate(0, offset, len)
    }

    /// Bytes of the file backed by memory now (`st_blocks * 512`): the host's
    /// own count, independent of our books.
    pub fn allocated_bytes(&self) -> Result<u64, GuestMemError> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
        // SAFETY: fstat writes a `struct stat` into `st`, which is large enough.
        let r = unsafe { libc::fstat(self.fd.as_raw_fd(), st.as_mut_ptr()) };
        if r < 0 {
            return Err(GuestMemError::HostRead {
                path: format!("fstat(memfd {})", self.name),
                source: GuestMemError::last_os(),
            });
        }
        // SAFETY: fstat returned 0, so it filled the struct.
        let st = unsafe { st.assume_init() };
        Ok(u64::try_from(st.st_blocks).unwrap_or(0) * 512)
    }

    fn what(&self, op: &'static str) -> &'static str {
        match (self.kind, op) {
            (MemfdKind::Hugetlb2M, "punch hole") => "hugetlb memfd, punch hole",
            (MemfdKind::Shmem, "punch hole") => "shmem memfd, punch hole",
            (MemfdKind::Hugetlb2M, _) => "hugetlb memfd",
            (MemfdKind::Shmem, _) => "shmem memfd",
        }
    }
}

impl AsRawFd for Memfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shmem_allocate_and_punch_changes_blocks() {
        let m = Memfd::create("t-shmem", MemfdKind::Shmem).unwrap();
        m.set_len(1 << 20).unwrap();
        assert_eq!(m.allocated_bytes().unwrap(), 0);
        m.allocate(0, 64 * 1024).unwrap();
        assert_eq!(m.allocated_bytes().unwrap(), 64 * 1024);
        m.punch_hole(4096, 4096).unwrap();
        assert_eq!(m.allocated_bytes().unwrap(), 60 * 1024);
    }

    #[test]
    fn bad_name_is_an_error() {
        let e = Memfd::create("a\0b", MemfdKind::Shmem).unwrap_err();
        assert!(
            e.to_string().starts_with("memfd_create(a\0b) failed"),
            "{e}"
        );
    }
}
