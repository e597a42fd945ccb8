//! Who may use the API socket: a peer whose uid is the VMM's effective uid,
//! or root (`SO_PEERCRED`, the credentials at connect time).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// The uid of the process at the other end of `s`.
pub fn peer_uid(s: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes (one `ucred`) into
    // `cred`, which lives on this stack frame; `len` says its size.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether a peer with `peer` uid may talk to a VMM running as `me`.
pub fn uid_allowed(peer: u32, me: u32) -> bool {
    peer == me || peer == 0
}

/// `Ok` if the peer of `s` may use the API, else the reason (for the log
/// and the refusal reply).
pub fn allowed(s: &UnixStream) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match peer_uid(s) {
        Ok(uid) if uid_allowed(uid, me) => Ok(()),
        Ok(uid) => Err(format!(
            "permission denied: peer uid {uid} is neither root nor the VMM's uid {me}"
        )),
        Err(e) => Err(format!(
            "permission denied: peer credentials unreadable: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_uid_and_root_only() {
        assert!(uid_allowed(1000, 1000));
        assert!(uid_allowed(0, 1000));
        assert!(!uid_allowed(1001, 1000));
        assert!(!uid_allowed(1000, 0));
        let (a, _b) = UnixStream::pair().unwrap();
        // SAFETY: geteuid has no preconditions.
        assert_eq!(peer_uid(&a).unwrap(), unsafe { libc::geteuid() });
        assert!(allowed(&a).is_ok());
    }
}
