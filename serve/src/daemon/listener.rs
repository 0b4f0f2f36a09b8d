//! The listener: binds the socket (a stale socket file is replaced, a live daemon's or a
//! non-socket file refused), accepts connections (each on its own thread, capped), and on stop
//! unlinks the socket at once, lets open sessions drain, then closes what is left.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lipsync_pipelines::runtime::lock;
use lipsync_stages::onnx::OrtRuntime;

use crate::daemon::connection::connection;
use crate::daemon::error::ServeError;
use crate::daemon::registry::Registry;
use crate::daemon::shared::Shared;
use crate::protocol::{write_json, ErrorCode, ErrorReply, Kind, PROTOCOL_VERSION};
use crate::settings::Settings;

/// Runs the daemon until `stop` is set (the binary sets it on SIGTERM/SIGINT), then drains.
pub fn run(settings: Settings, rt: OrtRuntime, stop: Arc<AtomicBool>) -> Result<(), ServeError> {
    // The binary has done this already; an in-process daemon has not.
    lipsync_pipelines::allocator::fix_mmap_threshold();
    let nofile = crate::daemon::fds::raise_limit();
    let (listener, lock_file) = bind(&settings.socket, settings.socket_mode)?;
    let socket = settings.socket.clone();
    // From here on the socket file is ours: remove it however we leave.
    let mut socket_file = SocketFile::new(socket.clone());
    let shared = Arc::new(Shared::new(Registry::new(settings.clone(), rt)));
    preload(&shared, &settings.preload)?;
    let _http = match &settings.http {
        Some(h) => {
            let open = crate::daemon::fds::open_now();
            let cap = crate::daemon::fds::http_cap(h, nofile, open, settings.max_connections(), settings.max_sessions)?;
            Some(crate::daemon::http::start(h, cap, shared.clone(), socket.clone())?)
        }
        None => None,
    };
    listener.set_nonblocking(true).map_err(|source| ServeError::Listen { path: socket.clone(), source })?;
    tracing::info!(
        socket = %socket.display(),
        avatars = %settings.avatars.display(),
        max_sessions = settings.max_sessions,
        max_batch = %settings.max_batch,
        "lipsync serve listening (protocol {PROTOCOL_VERSION})"
    );
    accept_until(&listener, &shared, &stop);
    drop(listener);
    // The name is free at once: a new daemon may start while this one drains.
    socket_file.remove();
    // ... and so is the lock: a new daemon may bind while this one drains.
    drop(lock_file);
    drain(&shared, settings.drain_timeout);
    tracing::info!(frames = shared.frames_total.load(Ordering::SeqCst), "stopped");
    Ok(())
}

/// Loads the avatars `names` lists (`all`: every one under the avatars directory).
fn preload(shared: &Shared, names: &[String]) -> Result<(), ServeError> {
    let names: Vec<String> = if names.iter().any(|p| p == "all") {
        shared.registry.list().into_iter().map(|a| a.name).collect()
    } else {
        names.to_vec()
    };
    for name in &names {
        shared.registry.acquire(name, false).map_err(|source| ServeError::Preload { name: name.clone(), source })?;
    }
    Ok(())
}

/// Accepts connections, each on a thread of its own up to the daemon's connection limit (one
/// more gets a `busy` error), until `stop` is set.
fn accept_until(listener: &UnixListener, shared: &Arc<Shared>, stop: &AtomicBool) {
    let max_connections = shared.registry.settings.max_connections();
    let mut conn_id = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(25));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        conn_id += 1;
        let id = conn_id;
        if let Err(e) = stream.set_nonblocking(false) {
            tracing::warn!("dropping connection: {e}");
            continue;
        }
        if lock(&shared.connections).len() >= max_connections {
            tracing::warn!("refusing a connection: {max_connections} are open");
            let mut stream = stream;
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let message = format!("the daemon has its maximum of {max_connections} connections open");
            let _ = write_json(&mut stream, Kind::Error, &ErrorReply { code: ErrorCode::Busy, message });
            continue;
        }
        if let Ok(c) = stream.try_clone() {
            lock(&shared.connections).insert(id, (c, None));
        }
        let sh = shared.clone();
        let spawned = std::thread::Builder::new().name(format!("ls-conn-{id}")).spawn(move || {
            connection(&sh, id, stream);
            lock(&sh.connections).remove(&id);
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start a connection thread: {e}");
            lock(&shared.connections).remove(&id);
        }
    }
}

/// Lets open sessions finish within `timeout`, then closes every connection left (a greeted
/// one gets a `shutting_down` error first).
fn drain(shared: &Shared, timeout: Duration) {
    shared.draining.store(true, Ordering::SeqCst);
    let open = shared.in_progress();
    tracing::info!("shutting down: draining {open} open session(s)");
    let deadline = Instant::now() + timeout;
    while shared.in_progress() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = shared.in_progress();
    if left > 0 {
        tracing::warn!("{left} session(s) still open after the drain timeout: closing them");
    }
    let message = format!("the daemon is shutting down: the drain timeout of {} s was reached", timeout.as_secs_f64());
    for (_, (raw, writer)) in lock(&shared.connections).drain() {
        match writer {
            Some(w) => w.error_then_close(&raw, ErrorCode::ShuttingDown, &message),
            None => {
                let _ = raw.shutdown(std::net::Shutdown::Both);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while shared.in_progress() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The socket file this daemon created: removed once, and only if it is still the same file
/// (not one a newer daemon bound at the same path while this one drained).
struct SocketFile {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl SocketFile {
    fn new(path: PathBuf) -> Self {
        use std::os::unix::fs::MetadataExt;
        let id = std::fs::symlink_metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        Self { path, id }
    }

    fn remove(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Some(id) = self.id.take() {
            let same = std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == id);
            if same {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Binds the socket: a stale socket file (nobody listening) is replaced; a live one, or a
/// path that is not a socket, is refused. An exclusive lock on `PATH.lock` (kept, never
/// removed: removing it would let two daemons lock two files) makes two daemons started at
/// once on the same stale socket safe: one binds, the other is refused. The socket is created
/// under a umask that leaves it no wider than `mode`.
fn bind(path: &Path, mode: u32) -> Result<(UnixListener, std::fs::File), ServeError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let listen = |source| ServeError::Listen { path: path.to_path_buf(), source };
    let parent = lipsync_stages::io::staged::parent_dir(path);
    if let Ok(meta) = std::fs::metadata(parent) {
        let m = meta.permissions().mode();
        if m & 0o002 != 0 && m & 0o1000 == 0 {
            tracing::warn!(
                "the socket's directory {} is writable by others: they can replace the socket",
                parent.display()
            );
        }
    }
    let mut lock_name = path.as_os_str().to_owned();
    lock_name.push(".lock");
    let lock_path = PathBuf::from(lock_name);
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&lock_path)
        .map_err(|source| ServeError::Listen { path: lock_path.clone(), source })?;
    // Never a FIFO or device planted there (O_NONBLOCK kept opening one from hanging).
    if !lock_file.metadata().is_ok_and(|m| m.file_type().is_file()) {
        return Err(ServeError::LockNotAFile(lock_path));
    }
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(ServeError::Locked { socket: path.to_path_buf(), lock: lock_path });
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::NotASocket(path.to_path_buf()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(ServeError::InUse(path.to_path_buf())),
            Err(_) => {
                tracing::info!("removing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(listen)?;
            }
        }
    }
    // SAFETY: umask only changes this process's file-creation mask; restored right after bind.
    let old = unsafe { libc::umask(0o777 & !(mode as libc::mode_t)) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(listen)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(listen)?;
    Ok((listener, lock_file))
}

/// A daemon running in this process (for tests and benchmarks): [`Daemon::stop`] drains it
/// like SIGTERM does.
pub struct Daemon {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(), ServeError>>>,
    socket: PathBuf,
}

impl Daemon {
    /// Starts the daemon on its own thread and waits until its socket accepts connections
    /// (or it fails to start).
    pub fn start(settings: Settings, rt: OrtRuntime) -> Result<Self, ServeError> {
        let stop = Arc::new(AtomicBool::new(false));
        let socket = settings.socket.clone();
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("ls-serve".into())
            .spawn(move || run(settings, rt, flag))
            .map_err(|source| ServeError::Listen { path: socket.clone(), source })?;
        let mut d = Self { stop, handle: Some(handle), socket };
        loop {
            if d.handle.as_ref().is_some_and(|h| h.is_finished()) {
                let r = d.handle.take().expect("present").join();
                return Err(match r {
                    Ok(Err(e)) => e,
                    _ => ServeError::StoppedAtStart,
                });
            }
            if UnixStream::connect(&d.socket).is_ok() {
                return Ok(d);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops accepting, drains open sessions, and waits for the daemon to end.
    pub fn stop(mut self) -> Result<(), ServeError> {
        self.stop.store(true, Ordering::SeqCst);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(ServeError::Panicked),
            None => Ok(()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
