//! The API socket server of `vmm run --api-socket PATH`: a thread accepting
//! connections on a Unix socket; each connection is served by its own thread,
//! one JSON request line in, one JSON reply line out.
//!
//! The socket is created owner-only (0600, whatever the umask) and only a
//! peer with the VMM's uid or root is served; connections are bounded
//! ([`ServerLimits`]): how many at once, how long idle, how long a line.
//! Nothing but a stale socket is ever replaced at the path, and on exit the
//! file is removed only while it is still the socket this server bound.

use std::io::{BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use super::framing::{read_frame, Frame};
use super::pause::ApiPause;
use super::peer;
use super::protocol::{parse_request, Reply, Request};
use crate::api_handle::ApiHandle;
use crate::input_file::kind_name;

/// How often the accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// The server's bounds on what clients may hold.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Connections served at once; one more is told so and closed.
    pub max_connections: usize,
    /// A connection that sends nothing (or reads no reply) this long is closed.
    pub idle_timeout: Duration,
    /// Longest request line (bytes, newline excluded); a longer line is
    /// refused whole and the connection closed.
    pub max_line: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 16,
            idle_timeout: Duration::from_secs(60),
            max_line: 64 * 1024,
        }
    }
}

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Another process serves the path.
    #[error("--api-socket {path}: another VMM is already listening there; pick another path")]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// Another process created the path while this VMM was binding it.
    #[error(
        "--api-socket {path}: another process created this path while the VMM was starting; \
         pick another path"
    )]
    Appeared {
        /// The path.
        path: PathBuf,
    },
    /// Something that is not a socket is at the path: never replaced.
    #[error(
        "--api-socket {path}: a {kind} exists there and is not a socket; the VMM never removes \
         what it did not create: pick another path (or remove it yourself)"
    )]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// What is there.
        kind: &'static str,
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
    machine: Weak<dyn ApiHandle>,
    stop: AtomicBool,
    /// The API's pause of the vCPUs.
    pause: ApiPause,
    /// Connections being served.
    connections: AtomicUsize,
    limits: ServerLimits,
}

/// The running server; dropping it stops it and removes the socket file
/// if it is still the one it created (same device and inode).
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket file at bind time.
    identity: (u64, u64),
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

/// Clear the way for a socket at `path`: nothing there, or a stale socket
/// (nobody listening), which is removed. Anything else is refused.
fn clear_stale(path: &Path) -> Result<(), ApiServerError> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path, "inspecting the path")(e)),
    };
    if !md.file_type().is_socket() {
        return Err(ApiServerError::NotASocket {
            path: path.to_path_buf(),
            kind: kind_name(md.file_type()),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ApiServerError::InUse {
            path: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(io_err(path, "removing the stale socket"))
}

/// The name the socket is bound at before it is linked to `path`: hidden,
/// in the same directory (a link cannot cross file systems), unique to this
/// process.
fn staging_path(path: &Path) -> PathBuf {
    let name = format!(".vmm-api-{}.binding", std::process::id());
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => PathBuf::from(name),
    }
}

/// Bind a socket that only its owner may connect to, whatever the process
/// umask, and make it appear at `path` only once it listens: it is bound at
/// [`staging_path`] and hard-linked to `path` (a link never replaces what is
/// there), so a client that finds the path can always connect. Where that
/// cannot be done (a staging name too long for a socket address, a file
/// system without links) `path` is bound directly.
fn bind_owner_only(path: &Path) -> Result<(UnixListener, (u64, u64)), ApiServerError> {
    let listener = match bind_staged(path) {
        Ok(listener) => listener,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(ApiServerError::Appeared {
                path: path.to_path_buf(),
            })
        }
        Err(e) => {
            log::debug!("binding {} through a staging name: {e}", path.display());
            bind_listening(path).map_err(io_err(path, "binding the socket"))?
        }
    };
    let md = std::fs::symlink_metadata(path).map_err(io_err(path, "inspecting the socket"))?;
    Ok((listener, (md.dev(), md.ino())))
}

/// Bind at [`staging_path`], listen, link to `path`; the staging name is
/// removed whatever happens (it is this process's, bound just now).
fn bind_staged(path: &Path) -> std::io::Result<UnixListener> {
    let staging = staging_path(path);
    let listener = bind_listening(&staging)?;
    let linked = std::fs::hard_link(&staging, path);
    let _ = std::fs::remove_file(&staging);
    linked.map(|()| listener)
}

/// Bind and listen at `at` with mode 0600.
fn bind_listening(at: &Path) -> std::io::Result<UnixListener> {
    // SAFETY: umask only swaps the process file-mode mask; it is put back
    // right after the bind (other threads create no files meanwhile, and
    // would get stricter modes at worst).
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(at);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound?;
    if let Err(e) = std::fs::set_permissions(at, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(at);
        return Err(e);
    }
    Ok(listener)
}

impl ApiServer {
    /// Listen on `path` for `m` with the default [`ServerLimits`]: a stale
    /// socket there is replaced, anything else refused.
    pub fn start(
        path: &Path,
        m: Weak<impl ApiHandle + 'static>,
    ) -> Result<ApiServer, ApiServerError> {
        ApiServer::start_with(path, m, ServerLimits::default())
    }

    /// The same with explicit limits.
    pub fn start_with(
        path: &Path,
        m: Weak<impl ApiHandle + 'static>,
        limits: ServerLimits,
    ) -> Result<ApiServer, ApiServerError> {
        clear_stale(path)?;
        let (listener, identity) = bind_owner_only(path)?;
        let shared = Arc::new(Shared {
            machine: m as Weak<dyn ApiHandle>,
            stop: AtomicBool::new(false),
            pause: ApiPause::default(),
            connections: AtomicUsize::new(0),
            limits,
        });
        // From here on, a failure drops `server`, which removes the socket.
        let mut server = ApiServer {
            path: path.to_path_buf(),
            identity,
            shared: shared.clone(),
            thread: None,
        };
        listener
            .set_nonblocking(true)
            .map_err(io_err(path, "making the socket non-blocking"))?;
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(&listener, &shared))
            .map_err(io_err(path, "spawning the API thread"))?;
        log::info!("API socket listening at {}", path.display());
        server.thread = Some(thread);
        Ok(server)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove the socket file if it is still ours.
    fn remove_socket(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(md) if (md.dev(), md.ino()) == self.identity => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    log::warn!("removing the API socket {}: {e}", self.path.display());
                }
            }
            Ok(_) => log::info!(
                "{} is no longer the socket this VMM created; left in place",
                self.path.display()
            ),
            Err(e) => log::info!("API socket {}: {e}; nothing to remove", self.path.display()),
        }
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
        if let Some(m) = self.shared.machine.upgrade() {
            self.shared.pause.release(m.vcpus());
        }
        self.remove_socket();
    }
}

/// Counts a connection while it is served.
struct ConnSlot(Arc<Shared>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Tell a client why it is not served, and close.
fn refuse(mut stream: UnixStream, why: String) {
    let _ = stream.set_write_timeout(Some(POLL));
    let mut out = Reply::Error(why).to_line();
    out.push('\n');
    let _ = stream.write_all(out.as_bytes());
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => admit(stream, shared),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => {
                log::warn!("API: accept failed: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

/// Check a new connection's peer and the connection cap; serve it on its
/// own thread.
fn admit(stream: UnixStream, shared: &Arc<Shared>) {
    match peer::allowed(&stream) {
        Ok(()) => {}
        Err(why) => {
            log::warn!("API: {why}");
            return refuse(stream, why);
        }
    }
    let max = shared.limits.max_connections;
    if shared.connections.fetch_add(1, Ordering::SeqCst) >= max {
        shared.connections.fetch_sub(1, Ordering::SeqCst);
        log::info!("API: connection refused: {max} connections are open");
        return refuse(
            stream,
            format!("too many connections ({max} open): close one and retry"),
        );
    }
    let slot = ConnSlot(shared.clone());
    let r = std::thread::Builder::new()
        .name("api-conn".into())
        .spawn(move || {
            let slot = slot;
            serve(stream, &slot.0);
        });
    if let Err(e) = r {
        log::warn!("API: cannot start a connection thread: {e}");
    }
}

fn serve(stream: UnixStream, shared: &Shared) {
    let idle = Some(shared.limits.idle_timeout);
    let configured = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(idle))
        .and_then(|()| stream.set_write_timeout(idle));
    if let Err(e) = configured {
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
    let max = shared.limits.max_line;
    loop {
        let (reply, last) = match read_frame(&mut reader, max) {
            Ok(Frame::Eof) => return,
            Err(e) => {
                // Idle past the timeout (EAGAIN) or a broken connection.
                log::debug!("API: closing a connection: {e}");
                return;
            }
            Ok(Frame::TooLong) => (
                Reply::Error(format!(
                    "request line longer than {max} bytes: refused whole; connection closed"
                )),
                true,
            ),
            Ok(Frame::Line(bytes)) => {
                let reply = match std::str::from_utf8(&bytes) {
                    Err(_) => {
                        Reply::Error("request is not UTF-8: send one JSON object per line".into())
                    }
                    Ok(line) if line.trim().is_empty() => continue,
                    Ok(line) => match parse_request(line) {
                        Ok(req) => handle(req, shared),
                        Err(e) => Reply::Error(e),
                    },
                };
                (reply, false)
            }
        };
        let mut out = reply.to_line();
        out.push('\n');
        if writer.write_all(out.as_bytes()).is_err() || last {
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
struct SplitDone {
    frames_split: u64,
    pages_freed: u64,
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
    if m.vcpus().stopping() {
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
            let mut r = Reply::ok(m.snapshot());
            if let Reply::Ok(map) = &mut r {
                map.insert(
                    "paused".into(),
                    serde_json::Value::Bool(shared.pause.is_paused()),
                );
            }
            r
        }
        Request::Pause => match shared.pause.pause(m.vcpus()) {
            Ok(()) => Reply::ok(Paused { paused: true }),
            Err(e) => Reply::Error(e),
        },
        Request::Resume => match shared.pause.resume(m.vcpus()) {
            Ok(()) => Reply::ok(Paused { paused: false }),
            Err(e) => Reply::Error(e),
        },
        Request::Split => match m.balloon() {
            None => Reply::Error(
                "this VM has no balloon: start `vmm run` with --balloon (Linux guests)".into(),
            ),
            Some(_) => match m.split_queued() {
                Ok(r) => Reply::ok(SplitDone {
                    frames_split: r.frames_split,
                    pages_freed: r.pages_freed,
                }),
                Err(e) => Reply::Error(format!("deferred split failed: {e}")),
            },
        },
        Request::Stop => {
            log::info!("API: stop requested");
            m.finish(crate::outcome::Outcome::Stopped);
            Reply::ok(Stopping { stopping: true })
        }
    }
}
