//! memfd creation, sizing, hole punching and allocation.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use rustix::fs::{self, FallocateFlags, MemfdFlags};
use rustix::io::{retry_on_intr, Errno};

use crate::error::GuestMemError;

/// What kind of memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemfdKind {
    /// `MFD_HUGETLB | MFD_HUGE_2MB`: a file of 2M hugetlb pages.
    Hugetlb2M,
    /// `MFD_HUGETLB | MFD_HUGE_1GB`: a file of 1G hugetlb pages.
    Hugetlb1G,
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
    /// `memfd_create(name, MFD_CLOEXEC [| MFD_HUGETLB | MFD_HUGE_2MB or _1GB])`.
    /// A name with an interior NUL is refused with `EINVAL`.
    pub fn create(name: &str, kind: MemfdKind) -> Result<Self, GuestMemError> {
        let mut flags = MemfdFlags::CLOEXEC;
        match kind {
            MemfdKind::Hugetlb2M => flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB,
            MemfdKind::Hugetlb1G => flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_1GB,
            MemfdKind::Shmem => {}
        }
        let fd = fs::memfd_create(name, flags).map_err(|e| GuestMemError::Memfd {
            name: name.to_string(),
            source: e.into(),
        })?;
        Ok(Self {
            fd,
            name: name.to_string(),
            kind,
        })
    }

    /// A second handle on the same file (`dup`): for work on the file
    /// (`fallocate`) away from the owner's lock.
    pub fn try_clone(&self) -> Result<Self, GuestMemError> {
        let fd = self.fd.try_clone().map_err(|source| GuestMemError::Memfd {
            name: self.name.clone(),
            source,
        })?;
        Ok(Self {
            fd,
            name: self.name.clone(),
            kind: self.kind,
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
        // Lengths past `off_t` are refused here, as before the kernel sees them.
        if i64::try_from(len).is_err() {
            return Err(err(Errno::FBIG.into()));
        }
        fs::ftruncate(&self.fd, len).map_err(|e| err(e.into()))
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> Result<(), std::io::Error> {
        if i64::try_from(offset).is_err() || i64::try_from(len).is_err() {
            return Err(Errno::FBIG.into());
        }
        retry_on_intr(|| fs::fallocate(&self.fd, mode, offset, len)).map_err(Into::into)
    }

    /// Free `[offset, offset + len)`: `fallocate(PUNCH_HOLE | KEEP_SIZE)`.
    /// The pages read as zero afterwards and every mapping of them is zapped.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), GuestMemError> {
        self.fallocate(
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
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

    /// Write all of `buf` at `offset` (`pwrite`, repeated after a short
    /// write or `EINTR`). On shmem this allocates the pages it fills
    /// without zeroing them first, and maps them nowhere.
    pub fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> Result<(), GuestMemError> {
        while !buf.is_empty() {
            match rustix::io::pwrite(&self.fd, buf, offset) {
                Ok(0) => {
                    return Err(GuestMemError::MemfdWrite {
                        what: self.what("pwrite"),
                        offset,
                        len: buf.len() as u64,
                        source: std::io::Error::from(std::io::ErrorKind::WriteZero),
                    })
                }
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(Errno::INTR) => {}
                Err(e) => {
                    return Err(GuestMemError::MemfdWrite {
                        what: self.what("pwrite"),
                        offset,
                        len: buf.len() as u64,
                        source: e.into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Allocate `[offset, offset + len)` (`fallocate` mode 0). For a hugetlb
    /// memfd this takes huge pages from the host pool; the raw `io::Error`
    /// is returned so the caller can tell ENOSPC (pool empty) apart.
    pub fn allocate(&self, offset: u64, len: u64) -> Result<(), std::io::Error> {
        self.fallocate(FallocateFlags::empty(), offset, len)
    }

    /// Bytes of the file backed by memory now (`st_blocks * 512`): the host's
    /// own count, independent of our books.
    pub fn allocated_bytes(&self) -> Result<u64, GuestMemError> {
        let st = fs::fstat(&self.fd).map_err(|e| GuestMemError::HostRead {
            path: format!("fstat(memfd {})", self.name),
            source: e.into(),
        })?;
        Ok(u64::try_from(st.st_blocks).unwrap_or(0) * 512)
    }

    fn what(&self, op: &'static str) -> &'static str {
        match (self.kind, op) {
            (MemfdKind::Hugetlb2M, "punch hole") => "hugetlb memfd, punch hole",
            (MemfdKind::Hugetlb1G, "punch hole") => "1G hugetlb memfd, punch hole",
            (MemfdKind::Shmem, "punch hole") => "shmem memfd, punch hole",
            (MemfdKind::Hugetlb2M, _) => "hugetlb memfd",
            (MemfdKind::Hugetlb1G, _) => "1G hugetlb memfd",
            (MemfdKind::Shmem, _) => "shmem memfd",
        }
    }
}

impl AsRawFd for Memfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Memfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
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
