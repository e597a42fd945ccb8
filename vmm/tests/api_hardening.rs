//! The API socket against hostile files and clients, in-process (no VM: the
//! server answers "the VM has ended" to every well-formed request, which is
//! enough to see which requests ran).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use vmm::api::{ApiServer, ApiServerError, ServerLimits};
use vmm::machine::Machine;

fn sock_path(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-api-hard-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = d.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

fn start(p: &Path, limits: ServerLimits) -> ApiServer {
    ApiServer::start_with(p, Weak::<Machine>::new(), limits).unwrap()
}

fn connect(p: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(p).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

/// The next reply line ("" at EOF).
fn reply(r: &mut BufReader<UnixStream>) -> String {
    let mut l = String::new();
    r.read_line(&mut l).expect("a reply or EOF, not a timeout");
    l
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[test]
fn a_non_socket_at_the_path_is_never_removed() {
    let p = sock_path("regular");
    std::fs::write(&p, "precious").unwrap();
    let e = ApiServer::start(&p, Weak::<Machine>::new()).unwrap_err();
    assert!(matches!(e, ApiServerError::NotASocket { .. }), "{e}");
    assert!(e.to_string().contains("regular file"), "{e}");
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "precious");
    std::fs::remove_file(&p).unwrap();

    let f = sock_path("fifo");
    mkfifo(&f);
    let e = ApiServer::start(&f, Weak::<Machine>::new()).unwrap_err();
    assert!(e.to_string().contains("FIFO"), "{e}");
    assert!(std::fs::symlink_metadata(&f).unwrap().file_type().is_fifo());
    std::fs::remove_file(&f).unwrap();
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let p = sock_path("stale");
    drop(UnixListener::bind(&p).unwrap());
    let s = start(&p, ServerLimits::default());
    let e = ApiServer::start(&p, Weak::<Machine>::new()).unwrap_err();
    assert!(matches!(e, ApiServerError::InUse { .. }), "{e}");
    drop(s);
    assert!(!p.exists(), "its own socket is removed on exit");
}

#[test]
fn socket_is_owner_only_whatever_the_umask() {
    let p = sock_path("umask");
    // SAFETY: umask only changes this process's file-mode mask.
    let old = unsafe { libc::umask(0) };
    let s = ApiServer::start(&p, Weak::<Machine>::new());
    // SAFETY: as above, putting the mask back.
    unsafe { libc::umask(old) };
    let s = s.unwrap();
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    drop(s);
}

#[test]
fn exit_leaves_a_socket_another_vmm_now_owns() {
    let p = sock_path("owner");
    let s = start(&p, ServerLimits::default());
    // Someone removed ours and another VMM bound the path.
    std::fs::remove_file(&p).unwrap();
    let other = UnixListener::bind(&p).unwrap();
    drop(s);
    assert!(
        std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_socket(),
        "the other VMM's socket was removed"
    );
    UnixStream::connect(&p).expect("the other VMM still serves");
    drop(other);
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn an_over_long_line_is_refused_once_never_run_in_pieces() {
    let p = sock_path("long");
    let limits = ServerLimits::default();
    let _s = start(&p, limits);
    let (mut w, mut r) = connect(&p);
    let mut line = vec![b' '; limits.max_line];
    line.extend_from_slice(b"{\"cmd\":\"pause\"}\n{\"cmd\":\"stats\"}\n");
    // The server may close before reading everything: ignore EPIPE.
    let _ = w.write_all(&line);
    let first = reply(&mut r);
    assert!(first.contains("longer than 65536 bytes"), "{first}");
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "more replies after the refusal");
}

#[test]
fn error_replies_echo_a_short_prefix_only() {
    let p = sock_path("echo");
    let _s = start(&p, ServerLimits::default());
    let (mut w, mut r) = connect(&p);
    for req in [
        format!("{}\n", "z".repeat(60_000)),
        format!("{{\"cmd\":\"{}\"}}\n", "q".repeat(60_000)),
    ] {
        w.write_all(req.as_bytes()).unwrap();
        let rep = reply(&mut r);
        assert!(rep.contains("bad request"), "{rep}");
        assert!(rep.len() < 512, "reply of {} bytes", rep.len());
    }
    // A unit command with an extra field is refused too.
    w.write_all(b"{\"cmd\":\"stats\",\"x\":1}\n").unwrap();
    assert!(reply(&mut r).contains("unknown field"));
}

#[test]
fn connections_are_bounded() {
    let p = sock_path("cap");
    let _s = start(
        &p,
        ServerLimits {
            max_connections: 2,
            ..ServerLimits::default()
        },
    );
    let mut held = Vec::new();
    for _ in 0..2 {
        let (mut w, mut r) = connect(&p);
        w.write_all(b"{\"cmd\":\"stats\"}\n").unwrap();
        assert!(reply(&mut r).contains("the VM has ended"));
        held.push((w, r));
    }
    let (_w, mut r) = connect(&p);
    let rep = reply(&mut r);
    assert!(rep.contains("too many connections (2 open)"), "{rep}");
    assert_eq!(reply(&mut r), "", "refused connection closed");
    // A slot frees when a client leaves.
    drop(held.pop());
    let mut served = false;
    for _ in 0..200 {
        let (mut w, mut r) = connect(&p);
        let _ = w.write_all(b"{\"cmd\":\"stats\"}\n");
        if reply(&mut r).contains("the VM has ended") {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(served, "no slot came free after a client left");
}

#[test]
fn idle_connections_are_closed() {
    let p = sock_path("idle");
    let _s = start(
        &p,
        ServerLimits {
            idle_timeout: Duration::from_millis(200),
            ..ServerLimits::default()
        },
    );
    let (_w, mut r) = connect(&p);
    assert_eq!(reply(&mut r), "", "the server closes an idle connection");
}

#[test]
fn other_users_are_refused_by_peer_credentials() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root to connect as another uid");
        return;
    }
    let p = sock_path("peer");
    let _s = start(&p, ServerLimits::default());
    // Open the file mode so only the credential check stands in the way.
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().unwrap();
    // The test binary itself, as nobody, runs the client side below.
    let o = std::process::Command::new(exe)
        .args(["--exact", "peer_client_helper", "--nocapture", "--ignored"])
        .env("VMM_PEER_SOCKET", &p)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("REPLY: {\"error\":\"permission denied: peer uid 65534"),
        "{out}"
    );
}

/// Run by `other_users_are_refused_by_peer_credentials` as another uid.
#[test]
#[ignore = "helper: runs as another uid"]
fn peer_client_helper() {
    let Some(p) = std::env::var_os("VMM_PEER_SOCKET") else {
        return;
    };
    let (mut w, mut r) = connect(Path::new(&p));
    let _ = w.write_all(b"{\"cmd\":\"stop\"}\n");
    println!("REPLY: {}", reply(&mut r).trim());
}

/// A client that connects the moment the socket path appears is served: the
/// path must not exist before the socket listens (`vmm ctl` racing a VM that
/// was starting was told "no VMM listens" by a socket bound but not yet
/// listening). Busy threads make the starting thread lose its CPU often, as
/// on a loaded host.
#[test]
fn the_socket_path_appears_only_once_it_listens() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let p = sock_path("appears");
    let done = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..4)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let mut refused = Vec::new();
    for round in 0..1000 {
        let watched = p.clone();
        let watcher = std::thread::spawn(move || loop {
            if std::fs::symlink_metadata(&watched).is_ok() {
                return UnixStream::connect(&watched).map(drop);
            }
        });
        let s = start(&p, ServerLimits::default());
        if let Err(e) = watcher.join().unwrap() {
            refused.push((round, e));
        }
        drop(s);
        assert!(!p.exists());
    }
    done.store(true, Ordering::Relaxed);
    busy.into_iter().for_each(|b| b.join().unwrap());
    assert!(
        refused.is_empty(),
        "connections refused as the path appeared: {refused:?}"
    );
}

/// A path near the socket-address limit whose staging name would not fit
/// is bound directly: still served, still removed on exit.
#[test]
fn a_path_too_long_for_the_staging_name_is_bound_directly() {
    let base = sock_path("x");
    let dir = base.parent().unwrap();
    // sun_path holds 107 bytes and a NUL: a 100-byte path fits, its staging
    // name (".vmm-api-PID.binding" in the same directory) does not.
    let fill = 100 - dir.as_os_str().len() - 3;
    let sub = dir.join("d".repeat(fill));
    std::fs::create_dir_all(&sub).unwrap();
    let p = sub.join("s");
    assert_eq!(p.as_os_str().len(), 100);
    let s = start(&p, ServerLimits::default());
    UnixStream::connect(&p).expect("served");
    drop(s);
    assert!(!p.exists(), "its own socket is removed on exit");
    std::fs::remove_dir(&sub).unwrap();
}
