//! `vmm ctl --api-socket PATH <cmd>`: send one request to a running VMM and
//! print its reply.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{Reply, Request};
use crate::exit_code;

/// How long the client waits for a reply (a pause may take up to 20 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why `vmm ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Nothing at the path.
    #[error(
        "no API socket at {path}: no VM is running with --api-socket {path} \
         (start one with `vmm run ... --api-socket {path}`)"
    )]
    NoSocket {
        /// The path tried.
        path: PathBuf,
    },
    /// A socket file nobody listens on.
    #[error(
        "{path} exists but no VMM listens on it: the VM that created it is not running any more \
         (stale socket; remove it or start a VM)"
    )]
    NotListening {
        /// The path tried.
        path: PathBuf,
    },
    /// Something that is not a socket is at the path.
    #[error(
        "{path} is a {kind}, not an API socket: pass the path given to `vmm run --api-socket`"
    )]
    NotASocket {
        /// The path tried.
        path: PathBuf,
        /// What is there.
        kind: &'static str,
    },
    /// Other I/O errors.
    #[error("talking to the VMM at {path}: {what}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// The VMM closed the connection or sent garbage.
    #[error("the VMM at {path} {why}")]
    Protocol {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The VMM refused the request.
    #[error("the VMM refused: {0}")]
    Refused(String),
}

impl CtlError {
    /// Process exit code: 2 when the VM cannot be reached at that path,
    /// 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            CtlError::NoSocket { .. }
            | CtlError::NotListening { .. }
            | CtlError::NotASocket { .. } => exit_code::BAD_INPUT,
            _ => exit_code::INTERNAL,
        }
    }
}

/// Send `req` to the VMM at `path`; the reply on success.
pub fn request(
    path: &Path,
    req: &Request,
) -> Result<serde_json::Map<String, serde_json::Value>, CtlError> {
    let io = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| CtlError::Io { path, what, source }
    };
    let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CtlError::NoSocket {
            path: path.to_path_buf(),
        },
        std::io::ErrorKind::ConnectionRefused => match std::fs::symlink_metadata(path) {
            Ok(md) if !md.file_type().is_socket() => CtlError::NotASocket {
                path: path.to_path_buf(),
                kind: crate::input_file::kind_name(md.file_type()),
            },
            _ => CtlError::NotListening {
                path: path.to_path_buf(),
            },
        },
        _ => CtlError::Io {
            path: path.to_path_buf(),
            what: "connecting",
            source: e,
        },
    })?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(io("setting a timeout"))?;
    let mut line = serde_json::to_string(req).map_err(|e| CtlError::Protocol {
        path: path.to_path_buf(),
        why: format!("request not serializable: {e}"),
    })?;
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .map_err(io("sending the request"))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(io("reading the reply"))?;
    if reply.trim().is_empty() {
        return Err(CtlError::Protocol {
            path: path.to_path_buf(),
            why: "closed the connection without a reply".into(),
        });
    }
    match Reply::from_line(&reply).map_err(|why| CtlError::Protocol {
        path: path.to_path_buf(),
        why,
    })? {
        Reply::Ok(m) => Ok(m),
        Reply::Error(e) => Err(CtlError::Refused(e)),
    }
}

fn num(v: &serde_json::Value, path: &[&str]) -> String {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(n) => cur = n,
            None => return "n/a".into(),
        }
    }
    if cur.is_null() {
        "n/a".into()
    } else {
        cur.to_string()
    }
}

/// Human-readable text of a `stats` reply.
pub fn stats_text(v: &serde_json::Value) -> String {
    let mut s = format!(
        "{} backing; frames: {} huge, {} small, {} unpopulated\n",
        v.get("backing").and_then(|b| b.as_str()).unwrap_or("?"),
        num(v, &["frames", "huge"]),
        num(v, &["frames", "small"]),
        num(v, &["frames", "unpopulated"])
    );
    s.push_str(&format!(
        "  {:<10} {:>10} {:>16}\n",
        "", "KVM", "mirror predicts"
    ));
    for k in ["pages_4k", "pages_2m"] {
        s.push_str(&format!(
            "  {:<10} {:>10} {:>16}\n",
            k,
            num(v, &["kvm", k]),
            num(v, &["mirror", k])
        ));
    }
    s.push_str(&format!(
        "  pool: {} of {} huge slots used; host memory {} bytes (hugetlb {}, rss {})\n",
        num(v, &["pool", "used"]),
        num(v, &["pool", "capacity"]),
        num(v, &["host_memory", "total_bytes"]),
        num(v, &["host_memory", "hugetlb_bytes"]),
        num(v, &["host_memory", "rss_bytes"])
    ));
    if v.get("balloon").is_some_and(|b| !b.is_null()) {
        s.push_str(&format!(
            "  balloon: target {} pages, actual {} pages, inflated {} pages\n",
            num(v, &["balloon", "target_pages"]),
            num(v, &["balloon", "actual_pages"]),
            num(v, &["balloon", "inflated_pages"])
        ));
    }
    s.push_str(&format!(
        "  frames split {}, collapsed {}; paused: {}\n",
        num(v, &["unmap", "frames_split"]),
        num(v, &["unmap", "frames_collapsed"]),
        num(v, &["paused"])
    ));
    s
}

/// Run `vmm ctl`: send `req` to the API socket at `socket`; returns the
/// text to print (the raw JSON reply with `json`).
pub fn ctl(socket: &Path, json: bool, req: &Request) -> Result<String, CtlError> {
    let reply = serde_json::Value::Object(request(socket, req)?);
    if json {
        return Ok(format!("{reply}\n"));
    }
    Ok(match req {
        Request::Stats => stats_text(&reply),
        Request::Balloon { .. } => format!(
            "balloon target {} pages (actual {} pages, driver active: {})\n",
            num(&reply, &["target_pages"]),
            num(&reply, &["actual_pages"]),
            num(&reply, &["driver_active"])
        ),
        Request::Pause => "vCPUs paused\n".into(),
        Request::Resume => "vCPUs resumed\n".into(),
        Request::Stop => "VM stopping\n".into(),
        Request::Split => format!(
            "deferred split: {} frame(s) split, {} pages freed\n",
            num(&reply, &["frames_split"]),
            num(&reply, &["pages_freed"])
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_socket_says_so() {
        let p = std::env::temp_dir().join(format!("vmm-ctl-missing-{}", std::process::id()));
        let e = request(&p, &Request::Stats).unwrap_err();
        assert!(matches!(e, CtlError::NoSocket { .. }), "{e}");
        assert_eq!(e.exit_code(), exit_code::BAD_INPUT);
        assert!(e.to_string().contains("no VM is running"), "{e}");
        assert!(e.to_string().contains(&p.display().to_string()));
    }

    #[test]
    fn a_regular_file_is_not_called_a_stale_socket() {
        let p = std::env::temp_dir().join(format!("vmm-ctl-regular-{}", std::process::id()));
        std::fs::write(&p, "x").unwrap();
        let e = request(&p, &Request::Stats).unwrap_err();
        let _ = std::fs::remove_file(&p);
        assert!(matches!(e, CtlError::NotASocket { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("is a regular file, not an API socket"),
            "{e}"
        );
        assert!(!e.to_string().contains("stale"), "{e}");
        assert_eq!(e.exit_code(), exit_code::BAD_INPUT);
    }

    #[test]
    fn stale_socket_says_so() {
        let p = std::env::temp_dir().join(format!("vmm-ctl-stale-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        let e = request(&p, &Request::Stats).unwrap_err();
        let _ = std::fs::remove_file(&p);
        assert!(matches!(e, CtlError::NotListening { .. }), "{e}");
        assert!(e.to_string().contains("not running any more"), "{e}");
    }
}
