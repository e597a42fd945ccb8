//! The API socket server of `vmm run --api-socket PATH`: a thread accepting
//! connections on a Unix socket; each connection is served by its own thread,
//! one JSON request line in, one JSON reply line out.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use guest_mem::Quiesce;
use serde::Serialize;

use super::protocol::{parse_request, Reply, Request};
use crate::machine::Machine;
use crate::snapshot;

/// How often the accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Another process serves the path.
    #[error("--api-socket {path}: another VMM is already listening there; pick another path")]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// Binding or configuring the socket failed.
    #[error("--api-socket {path}: {what}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// OS error.
        source: std::io::Error,
    },
}

/// State shared by the server's threads.
struct Shared {
    machine: Weak<Machine>,
    stop: AtomicBool,
    /// Whether the API holds a pause of the vCPUs.
    paused: AtomicBool,
}

/// The running server; dropping it stops it and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> ApiServerError {
    let path = path.to_path_buf();
    move |source| ApiServerError::Io { path, what, source }
}

impl ApiServer {
    /// Listen on `path` (a stale socket file there is replaced) for `m`.
    pub fn start(path: &Path, m: Weak<Machine>) -> Result<ApiServer, ApiServerError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiServerError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(io_err(path, "removing the stale socket"))?;
        }
        let listener = UnixListener::bind(path).map_err(io_err(path, "binding the socket"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err(path, "making the socket non-blocking"))?;
        let shared = Arc::new(Shared {
            machine: m,
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(&listener, &s))
            .map_err(io_err(path, "spawning the API thread"))?;
        log::info!("API socket listening at {}", path.display());
        Ok(ApiServer {
            path: path.to_path_buf(),
            shared,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the API thread panicked");
            }
        }
        if self.shared.paused.swap(false, Ordering::SeqCst) {
            if let Some(m) = self.shared.machine.upgrade() {
                m.control.resume();
            }
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("removing the API socket {}: {e}", self.path.display());
        }
    }
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let s = shared.clone();
                let r = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || serve(stream, &s));
                if let Err(e) = r {
                    log::warn!("API: cannot start a connection thread: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => {
                log::warn!("API: accept failed: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

fn serve(stream: UnixStream, shared: &Shared) {
    if let Err(e) = stream.set_nonblocking(false) {
        log::warn!("API: configuring a connection: {e}");
        return;
    }
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            log::warn!("API: cloning a connection: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE as u64).read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                log::debug!("API: reading a request: {e}");
                return;
            }
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = match parse_request(&line) {
            Ok(req) => handle(req, shared),
            Err(e) => Reply::Error(e),
        };
        let mut out = reply.to_line();
        out.push('\n');
        if writer.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

#[derive(Serialize)]
struct BalloonSet {
    target_pages: u32,
    target_bytes: u64,
    actual_pages: u32,
    driver_active: bool,
}

#[derive(Serialize)]
struct Stopping {
    stopping: bool,
}

#[derive(Serialize)]
struct Paused {
    paused: bool,
}

/// Carry out one request for the machine behind `shared`.
fn handle(req: Request, shared: &Shared) -> Reply {
    let Some(m) = shared.machine.upgrade() else {
        return Reply::Error("the VM has ended".into());
    };
    if m.control.stopping() {
        return Reply::Error("the VM is stopping".into());
    }
    match req {
        Request::Balloon { bytes } => match m.balloon() {
            None => Reply::Error(
                "this VM has no balloon: start `vmm run` with --balloon (Linux guests)".into(),
            ),
            Some(b) => {
                let target_pages = b.set_target_bytes(bytes);
                let st = b.status();
                Reply::ok(BalloonSet {
                    target_pages,
                    target_bytes: u64::from(target_pages) * guest_mem::PAGE_SIZE,
                    actual_pages: st.actual_pages,
                    driver_active: st.driver_active,
                })
            }
        },
        Request::Stats => {
            let mut r = Reply::ok(snapshot::take(&m));
            if let Reply::Ok(map) = &mut r {
                map.insert(
                    "paused".into(),
                    serde_json::Value::Bool(shared.paused.load(Ordering::SeqCst)),
                );
            }
            r
        }
        Request::Pause => {
            if shared.paused.swap(true, Ordering::SeqCst) {
                return Reply::Error("the vCPUs are already paused (send resume)".into());
            }
            match m.control.pause() {
                Ok(()) => Reply::ok(Paused { paused: true }),
                Err(e) => {
                    shared.paused.store(false, Ordering::SeqCst);
                    Reply::Error(e.to_string())
                }
            }
        }
        Request::Resume => {
            if !shared.paused.swap(false, Ordering::SeqCst) {
                return Reply::Error("the vCPUs are not paused (send pause first)".into());
            }
            m.control.resume();
            Reply::ok(Paused { paused: false })
        }
        Request::Stop => {
            log::info!("API: stop requested");
            m.finish(crate::outcome::Outcome::Stopped);
            Reply::ok(Stopping { stopping: true })
        }
    }
}
