//! Output paths (`--stats-json`, stress `--json` / `--replay-out`, bench
//! `--json` / `--svg` / `--markdown`) are checked before a run starts, so a
//! bad path never costs a run its report or its real exit code.
//!
//! The check opens the path for writing the way the report will be written
//! later (without truncating, `O_NONBLOCK` so a FIFO with no reader fails
//! instead of hanging); a file the check had to create is removed again.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::input_file::kind_name;

/// An output path is not writable.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {why}: pick a writable file path (checked before the run starts)")]
pub struct OutputPathError {
    /// The option.
    pub what: &'static str,
    /// The path.
    pub path: PathBuf,
    /// Why not.
    pub why: String,
}

/// Check that `path` can take the output of option `what`.
pub fn check(what: &'static str, path: &Path) -> Result<(), OutputPathError> {
    let err = |why: String| OutputPathError {
        what,
        path: path.to_path_buf(),
        why,
    };
    let existed = match std::fs::metadata(path) {
        Ok(md) if md.is_dir() => return Err(err("is a directory".into())),
        Ok(md) if md.file_type().is_file() || is_char_device(&md) => true,
        Ok(md) => {
            let ft = md.file_type();
            if !is_fifo(&md) {
                return Err(err(format!("is a {}", kind_name(ft))));
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(err(e.to_string())),
    };
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => err("is a FIFO nobody reads".into()),
            _ => err(e.to_string()),
        })?;
    if !existed {
        std::fs::remove_file(path).map_err(|e| err(format!("removing the probe file: {e}")))?;
    }
    Ok(())
}

fn is_char_device(md: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    md.file_type().is_char_device()
}

fn is_fifo(md: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    md.file_type().is_fifo()
}

/// Check every `(option, path)` given.
pub fn check_all<'a>(
    outputs: impl IntoIterator<Item = (&'static str, Option<&'a Path>)>,
) -> Result<(), OutputPathError> {
    for (what, p) in outputs {
        if let Some(p) = p {
            check(what, p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_paths_are_named_and_nothing_is_left_behind() {
        let d = std::env::temp_dir().join(format!("vmm-outpath-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let missing_dir = d.join("no-such-dir").join("r.json");
        let e = check("--stats-json", &missing_dir).unwrap_err();
        assert!(e.to_string().starts_with("--stats-json"), "{e}");
        let e = check("--json", &d).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        let fresh = d.join("fresh.json");
        check("--json", &fresh).unwrap();
        assert!(!fresh.exists(), "the probe file stays");
        std::fs::write(&fresh, "old").unwrap();
        check("--json", &fresh).unwrap();
        assert_eq!(std::fs::read_to_string(&fresh).unwrap(), "old", "truncated");
        check("--json", Path::new("/dev/null")).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
