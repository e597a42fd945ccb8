//! Opening the files the user names (`--kernel`, `--initrd`, `--replay`,
//! `--serial`) without ever blocking: a FIFO (or socket, directory, device
//! where a file is due) is refused by its type, checked on the open file, and
//! the open itself uses `O_NONBLOCK` so a FIFO swapped in after a check cannot
//! hang it either.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A named file is not usable.
#[derive(Debug, thiserror::Error)]
pub enum InputFileError {
    /// Opening or inspecting it failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// Which option.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// It is not a regular file (a FIFO would block forever).
    #[error("{what} {path} is a {kind}, not a regular file: name a regular file{hint}")]
    NotRegular {
        /// Which option.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
}

/// A name for the type of `ft`.
pub fn kind_name(ft: std::fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_symlink() {
        "symbolic link"
    } else {
        "regular file"
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InputFileError {
    let path = path.to_path_buf();
    move |source| InputFileError::Io { what, path, source }
}

/// Clear `O_NONBLOCK` on `f` (set only to keep the open from blocking).
fn clear_nonblock(f: &File, what: &'static str, path: &Path) -> Result<(), InputFileError> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: F_GETFL / F_SETFL on a file descriptor we own; no memory is passed.
    let r = unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 {
            fl
        } else {
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        return Err(io(what, path)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Open `path` for reading; only a regular file is accepted (`what` names
/// the option in messages).
pub fn open_regular(what: &'static str, path: &Path) -> Result<File, InputFileError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io(what, path))?;
    let ft = f.metadata().map_err(io(what, path))?.file_type();
    if !ft.is_file() {
        return Err(InputFileError::NotRegular {
            what,
            path: path.to_path_buf(),
            kind: kind_name(ft),
            hint: "",
        });
    }
    clear_nonblock(&f, what, path)?;
    Ok(f)
}

/// Read the whole regular file at `path` as text.
pub fn read_regular(what: &'static str, path: &Path) -> Result<String, InputFileError> {
    use std::io::Read;
    let mut f = open_regular(what, path)?;
    let mut s = String::new();
    f.read_to_string(&mut s).map_err(io(what, path))?;
    Ok(s)
}

/// Open (create or truncate) `path` for writing an output stream such as the
/// serial console: a regular file or a character device (`/dev/null`, a
/// terminal); a FIFO, socket or directory is refused before anything is
/// truncated.
pub fn create_output(what: &'static str, path: &Path) -> Result<File, InputFileError> {
    let refuse = |ft: std::fs::FileType| InputFileError::NotRegular {
        what,
        path: path.to_path_buf(),
        kind: kind_name(ft),
        hint: " or a terminal (for a pipe use `stdout` and redirect it)",
    };
    if let Ok(md) = std::fs::metadata(path) {
        let ft = md.file_type();
        if !(ft.is_file() || ft.is_char_device()) {
            return Err(refuse(ft));
        }
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io(what, path))?;
    let ft = f.metadata().map_err(io(what, path))?.file_type();
    if !(ft.is_file() || ft.is_char_device()) {
        return Err(refuse(ft));
    }
    if ft.is_file() {
        f.set_len(0).map_err(io(what, path))?;
    }
    clear_nonblock(&f, what, path)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-input-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        p
    }

    #[test]
    fn fifos_are_refused_without_blocking() {
        let p = fifo("in");
        let e = open_regular("--initrd", &p).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        let e = create_output("--serial", &p).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        std::fs::remove_file(&p).unwrap();
        let e = open_regular("--kernel", Path::new("/dev/null")).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = open_regular("--kernel", Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }

    #[test]
    fn regular_files_and_devices_work() {
        let p = std::env::temp_dir().join(format!("vmm-input-{}-reg", std::process::id()));
        std::fs::write(&p, "abc").unwrap();
        assert_eq!(read_regular("--replay", &p).unwrap(), "abc");
        drop(create_output("--serial", &p).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"");
        std::fs::remove_file(&p).unwrap();
        assert!(create_output("--serial", Path::new("/dev/null")).is_ok());
    }
}
