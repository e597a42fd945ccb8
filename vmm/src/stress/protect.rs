//! `mprotect` of a host range that never leaves it half protected: Linux
//! applies a protection change VMA by VMA, so a call that fails part way
//! (`ENOMEM` at a hole, for one) has already changed the start of the range.
//! On failure the original protection is put back on the whole range.

/// `mprotect` failed.
#[derive(Debug, thiserror::Error)]
#[error("mprotect({prot}) of host {addr:#x}+{len:#x}: {source}{restore}")]
pub struct ProtectError {
    /// The protection asked for, as text.
    pub prot: &'static str,
    /// Host address.
    pub addr: u64,
    /// Length.
    pub len: u64,
    /// Cause.
    pub source: std::io::Error,
    /// What restoring the original protection did, as text.
    pub restore: String,
}

fn prot_name(prot: libc::c_int) -> &'static str {
    match prot {
        libc::PROT_READ => "PROT_READ",
        p if p == libc::PROT_READ | libc::PROT_WRITE => "PROT_READ|PROT_WRITE",
        libc::PROT_NONE => "PROT_NONE",
        _ => "other",
    }
}

/// Set `prot` on `[addr, addr + len)`; if that fails, set `original` on the
/// whole range again before returning the error.
///
/// # Safety
/// `[addr, addr + len)` must be memory this process mapped and owns, and no
/// Rust reference to it may be used in a way the new protection forbids
/// while it is in force.
pub unsafe fn protect(
    addr: u64,
    len: u64,
    prot: libc::c_int,
    original: libc::c_int,
) -> Result<(), ProtectError> {
    // SAFETY: the caller guarantees the range is ours (see above).
    let r = unsafe { libc::mprotect(addr as *mut libc::c_void, len as usize, prot) };
    if r == 0 {
        return Ok(());
    }
    let source = std::io::Error::last_os_error();
    // SAFETY: as above; this puts back the protection the range had.
    let back = unsafe { libc::mprotect(addr as *mut libc::c_void, len as usize, original) };
    let restore = if back == 0 {
        "; original protection restored".to_string()
    } else {
        format!(
            "; restoring {}: {} (the mapped parts were restored)",
            prot_name(original),
            std::io::Error::last_os_error()
        )
    };
    Err(ProtectError {
        prot: prot_name(prot),
        addr,
        len,
        source,
        restore,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    /// The permission string of the mapping that contains `addr` in
    /// /proc/self/maps.
    fn perms(addr: usize) -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for l in maps.lines() {
            let (range, rest) = l.split_once(' ').unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (
                usize::from_str_radix(a, 16).unwrap(),
                usize::from_str_radix(b, 16).unwrap(),
            );
            if (a..b).contains(&addr) {
                return rest[..4].to_string();
            }
        }
        panic!("{addr:#x} is not mapped");
    }

    #[test]
    fn partial_failure_restores_the_original_protection() {
        // Four pages with a hole at the third: mprotect over all four
        // changes the first two, then fails with ENOMEM at the hole.
        // SAFETY: a fresh private anonymous mapping, then one page of it unmapped.
        let base = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::munmap(p.cast::<u8>().add(2 * PAGE).cast(), PAGE), 0);
            p as usize
        };
        assert_eq!(perms(base), "rw-p");
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: our own mapping; nothing reads or writes it meanwhile.
        let e = unsafe { protect(base as u64, 4 * PAGE as u64, libc::PROT_READ, rw) }.unwrap_err();
        assert_eq!(e.source.raw_os_error(), Some(libc::ENOMEM), "{e}");
        assert!(e.to_string().contains("mprotect(PROT_READ)"), "{e}");
        assert_eq!(perms(base), "rw-p", "the first pages stayed read-only");
        assert_eq!(perms(base + PAGE), "rw-p");
        // SAFETY: still mapped read-write (checked above); then unmapped.
        unsafe {
            *(base as *mut u8) = 7;
            libc::munmap(base as *mut libc::c_void, 2 * PAGE);
            libc::munmap((base + 3 * PAGE) as *mut libc::c_void, PAGE);
        }
    }

    #[test]
    fn success_changes_the_protection() {
        // SAFETY: a fresh private anonymous mapping, unmapped at the end.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            protect(
                p as u64,
                PAGE as u64,
                libc::PROT_READ,
                libc::PROT_READ | libc::PROT_WRITE,
            )
            .unwrap();
            assert_eq!(perms(p as usize), "r--p");
            libc::munmap(p, PAGE);
        }
    }
}
