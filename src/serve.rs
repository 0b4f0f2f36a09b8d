//! `lipsync serve`: the streaming daemon on a Unix socket (protocol in `docs/protocol.md`).
//!
//! One thread per connection reads messages; each open session is a streaming pipeline
//! ([`lipsync_pipelines::session`]); sessions of avatars sharing a UNet share one
//! [`UnetService`] that batches their frames. Avatars load on first use (or at start with
//! `--preload`) into an LRU cache bounded by `--cache-mb`.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use lipsync_pipelines::metrics::Percentiles;
use lipsync_pipelines::session::{
    FrameSink, LiveStats, Session, SessionConfig, SessionLive, SessionOutcome, UnetService, UnetServiceConfig,
};
use lipsync_stages::audio::{pcm_to_mono, AudioError, PcmFormat};
use lipsync_stages::avatar::Avatar;
use lipsync_stages::features::AudioEncoder;
use lipsync_stages::onnx::{OrtRuntime, SessionOptions};
use lipsync_stages::template::{SharedTemplate, TemplateFrames};
use lipsync_stages::unet::Provider;
use serde::{Deserialize, Serialize};

use crate::protocol::{
    read_message, write_json, write_parts, AudioFormat, AvatarName, Done, ErrorReply, Hello, Kind, OpenRequest, Opened,
    WireError, MAX_MESSAGE, PROTOCOL_VERSION,
};
use crate::Cli;

/// `lipsync serve` flags (each overrides the same key of `--config`).
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Unix socket path to listen on.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Directory whose subdirectories are avatars (the name is the subdirectory's).
    #[arg(long, value_name = "DIR")]
    pub avatars: Option<PathBuf>,
    /// Most sessions open at once (more get a `busy` error) [default: 16].
    #[arg(long)]
    pub max_sessions: Option<usize>,
    /// Permissions of the socket file, octal [default: 0600].
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Avatars to load at start (comma-separated names, or `all`).
    #[arg(long, value_delimiter = ',')]
    pub preload: Option<Vec<String>>,
    /// Memory bound of the avatar cache (decoded templates), MiB [default: 2048].
    #[arg(long)]
    pub cache_mb: Option<usize>,
    /// Most frames per UNet run, across sessions [default: 8].
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Longest a frame waits for its UNet batch to fill, ms [default: 2].
    #[arg(long)]
    pub max_wait_ms: Option<f64>,
    /// Frames a session may have in flight before its audio intake blocks [default: 8].
    #[arg(long)]
    pub session_queue: Option<usize>,
    /// ONNX Runtime intra-op threads of each UNet [default: 2].
    #[arg(long)]
    pub intra_threads: Option<usize>,
    /// UNet execution provider: cpu or cuda [default: cpu].
    #[arg(long)]
    pub provider: Option<String>,
    /// Seconds to let open sessions finish after SIGTERM/SIGINT [default: 30].
    #[arg(long)]
    pub drain_timeout: Option<f64>,
    /// Seconds a client may leave its frames unread (socket full) before its session is
    /// dropped [default: 30].
    #[arg(long)]
    pub client_timeout: Option<f64>,
}

/// `serve.toml`: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    socket: Option<PathBuf>,
    avatars: Option<PathBuf>,
    max_sessions: Option<usize>,
    socket_mode: Option<String>,
    preload: Option<Vec<String>>,
    cache_mb: Option<usize>,
    max_batch: Option<usize>,
    max_wait_ms: Option<f64>,
    session_queue: Option<usize>,
    intra_threads: Option<usize>,
    provider: Option<String>,
    drain_timeout: Option<f64>,
    client_timeout: Option<f64>,
}

/// Resolved daemon settings.
#[derive(Debug, Clone)]
struct Settings {
    socket: PathBuf,
    avatars: PathBuf,
    max_sessions: usize,
    socket_mode: u32,
    preload: Vec<String>,
    cache_bytes: usize,
    max_batch: usize,
    max_wait: Duration,
    session_queue: usize,
    intra_threads: usize,
    provider: Provider,
    drain_timeout: Duration,
    client_timeout: Duration,
}

impl Settings {
    /// The settings as JSON (for `Stats`).
    fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "socket": self.socket.display().to_string(),
            "avatars": self.avatars.display().to_string(),
            "max_sessions": self.max_sessions,
            "socket_mode": format!("{:04o}", self.socket_mode),
            "preload": self.preload,
            "cache_mb": self.cache_bytes >> 20,
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait.as_secs_f64() * 1e3,
            "session_queue": self.session_queue,
            "intra_threads": self.intra_threads,
            "provider": format!("{:?}", self.provider).to_lowercase(),
            "drain_timeout_s": self.drain_timeout.as_secs_f64(),
            "client_timeout_s": self.client_timeout.as_secs_f64(),
        })
    }

    fn resolve(args: &ServeArgs) -> Result<Self> {
        let file = match &args.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
                toml::from_str::<ServeFile>(&text).with_context(|| format!("invalid config {}", path.display()))?
            }
            None => ServeFile::default(),
        };
        macro_rules! pick {
            ($f:ident) => {
                args.$f.clone().or(file.$f.clone())
            };
        }
        let socket = pick!(socket).context("no socket path: give --socket or `socket` in the config")?;
        let avatars = pick!(avatars).context("no avatars directory: give --avatars or `avatars` in the config")?;
        if !avatars.is_dir() {
            bail!("avatars directory {} does not exist", avatars.display());
        }
        let mode = pick!(socket_mode).unwrap_or_else(|| "0600".into());
        let socket_mode = u32::from_str_radix(mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .with_context(|| format!("socket mode `{mode}` is not an octal permission like 0600"))?;
        let max_batch = pick!(max_batch).unwrap_or(8);
        if !(1..=32).contains(&max_batch) {
            bail!("max batch {max_batch} is not in 1..=32");
        }
        let max_sessions = pick!(max_sessions).unwrap_or(16);
        if max_sessions == 0 {
            bail!("max sessions must be at least 1");
        }
        let session_queue = pick!(session_queue).unwrap_or(8);
        if session_queue == 0 {
            bail!("session queue must be at least 1");
        }
        let wait = pick!(max_wait_ms).unwrap_or(2.0);
        if !(0.0..=1000.0).contains(&wait) {
            bail!("max wait {wait} ms is not in 0..=1000");
        }
        let drain = pick!(drain_timeout).unwrap_or(30.0);
        if !(0.0..=3600.0).contains(&drain) {
            bail!("drain timeout {drain} s is not in 0..=3600");
        }
        let client = pick!(client_timeout).unwrap_or(30.0);
        if !(0.1..=3600.0).contains(&client) {
            bail!("client timeout {client} s is not in 0.1..=3600");
        }
        let provider: Provider = pick!(provider).unwrap_or_else(|| "cpu".into()).parse().map_err(anyhow::Error::msg)?;
        Ok(Self {
            socket,
            avatars,
            max_sessions,
            socket_mode,
            preload: pick!(preload).unwrap_or_default(),
            cache_bytes: pick!(cache_mb).unwrap_or(2048) << 20,
            max_batch,
            max_wait: Duration::from_secs_f64(wait / 1000.0),
            session_queue,
            intra_threads: pick!(intra_threads).unwrap_or(2).max(1),
            provider,
            drain_timeout: Duration::from_secs_f64(drain),
            client_timeout: Duration::from_secs_f64(client),
        })
    }
}

/// Why a request for an avatar failed.
#[derive(Debug, thiserror::Error)]
enum RegistryError {
    #[error("no avatar named `{0}` (expected a directory with avatar.toml under the avatars directory)")]
    Unknown(String),
    #[error("avatar name `{0}` is not valid (expected a plain directory name)")]
    BadName(String),
    #[error("avatar `{0}` is in use by {1} session(s)")]
    InUse(String, usize),
    #[error("avatar `{name}` cannot be loaded: {message}")]
    Load { name: String, message: String },
}

impl RegistryError {
    fn code(&self) -> &'static str {
        match self {
            RegistryError::Unknown(_) | RegistryError::BadName(_) => "unknown_avatar",
            RegistryError::InUse(..) => "in_use",
            RegistryError::Load { .. } => "avatar_load",
        }
    }
}

/// A loaded avatar and what serves it.
struct Loaded {
    name: String,
    avatar: Arc<Avatar>,
    template: Arc<SharedTemplate>,
    encoder: Arc<Mutex<AudioEncoder>>,
    unet: Arc<UnetService>,
    unet_key: PathBuf,
    encoder_key: PathBuf,
    memory: usize,
    sessions: AtomicUsize,
    frames: AtomicU64,
    last_used: Mutex<Instant>,
}

/// Avatars by name (LRU, memory-bounded) and models by path (shared by avatars).
struct Registry {
    settings: Settings,
    rt: OrtRuntime,
    loaded: Mutex<HashMap<String, Arc<Loaded>>>,
    loading: Mutex<()>,
    unets: Mutex<HashMap<PathBuf, Arc<UnetService>>>,
    encoders: Mutex<HashMap<PathBuf, Arc<Mutex<AudioEncoder>>>>,
}

/// One row of `ListAvatars`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AvatarInfo {
    /// Name.
    pub name: String,
    /// Whether it is in the cache.
    pub loaded: bool,
    /// Bytes its decoded template holds.
    pub memory_bytes: usize,
    /// Sessions using it.
    pub sessions: usize,
    /// Frames served since loaded.
    pub frames_served: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    fn dir_of(&self, name: &str) -> Result<PathBuf, RegistryError> {
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !plain {
            return Err(RegistryError::BadName(name.to_string()));
        }
        let dir = self.settings.avatars.join(name);
        if !dir.join("avatar.toml").is_file() {
            return Err(RegistryError::Unknown(name.to_string()));
        }
        Ok(dir)
    }

    /// The avatar, loading it if needed; counts a session on it when `session`.
    fn acquire(&self, name: &str, session: bool) -> Result<Arc<Loaded>, RegistryError> {
        let dir = self.dir_of(name)?;
        if let Some(l) = self.get(name, session) {
            return Ok(l);
        }
        let _loading = lock(&self.loading);
        if let Some(l) = self.get(name, session) {
            return Ok(l);
        }
        let failed = |message: String| RegistryError::Load { name: name.to_string(), message };
        let started = Instant::now();
        let avatar = Avatar::open(&dir).map_err(|e| failed(e.to_string()))?;
        let budget = self.settings.cache_bytes.min(lipsync_stages::template::DEFAULT_BUDGET);
        let template = TemplateFrames::open(&avatar.video, budget)
            .and_then(TemplateFrames::into_shared)
            .map_err(|e| failed(e.to_string()))?;
        if template.len() < avatar.boxes.len() {
            return Err(failed(format!(
                "the template has {} frames but the avatar has {} boxes",
                template.len(),
                avatar.boxes.len()
            )));
        }
        let io = avatar.config.models.io.clone();
        // Models are shared by file, whatever path an avatar names them by.
        let encoder_key = std::fs::canonicalize(&avatar.encoder).unwrap_or_else(|_| avatar.encoder.clone());
        let unet_key = std::fs::canonicalize(&avatar.unet).unwrap_or_else(|_| avatar.unet.clone());
        let encoder = {
            let mut map = lock(&self.encoders);
            match map.get(&encoder_key) {
                Some(e) => e.clone(),
                None => {
                    let opts = SessionOptions { intra_threads: 1, spinning: false };
                    let e = AudioEncoder::open(&self.rt, &avatar.encoder, &io, 64, &opts)
                        .map_err(|e| failed(e.to_string()))?;
                    let e = Arc::new(Mutex::new(e));
                    map.insert(encoder_key.clone(), e.clone());
                    e
                }
            }
        };
        let unet = {
            let mut map = lock(&self.unets);
            match map.get(&unet_key) {
                Some(u) if *u.crop() == avatar.config.crop => u.clone(),
                Some(_) => {
                    return Err(failed("its crop geometry differs from another avatar using the same UNet".into()))
                }
                None => {
                    let cfg = UnetServiceConfig {
                        max_batch: self.settings.max_batch,
                        max_wait: self.settings.max_wait,
                        intra_threads: self.settings.intra_threads,
                        spinning: false,
                        provider: self.settings.provider,
                    };
                    let u = UnetService::start(&self.rt, &avatar.unet, &io, avatar.config.crop, &cfg)
                        .map_err(|e| failed(e.to_string()))?;
                    let u = Arc::new(u);
                    map.insert(unet_key.clone(), u.clone());
                    u
                }
            }
        };
        let memory = template.memory_bytes();
        self.evict_for(memory);
        self.prune_models();
        let loaded = Arc::new(Loaded {
            name: name.to_string(),
            avatar: Arc::new(avatar),
            template: Arc::new(template),
            encoder,
            unet,
            unet_key,
            encoder_key,
            memory,
            sessions: AtomicUsize::new(usize::from(session)),
            frames: AtomicU64::new(0),
            last_used: Mutex::new(Instant::now()),
        });
        tracing::info!(
            avatar = name,
            frames = loaded.template.len(),
            memory_mb = memory >> 20,
            "loaded avatar in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        lock(&self.loaded).insert(name.to_string(), loaded.clone());
        Ok(loaded)
    }

    fn get(&self, name: &str, session: bool) -> Option<Arc<Loaded>> {
        let map = lock(&self.loaded);
        let l = map.get(name)?.clone();
        if session {
            l.sessions.fetch_add(1, Ordering::SeqCst);
        }
        *lock(&l.last_used) = Instant::now();
        Some(l)
    }

    /// Evicts unused avatars, least recently used first, until `extra` more bytes fit.
    fn evict_for(&self, extra: usize) {
        let mut map = lock(&self.loaded);
        loop {
            let total: usize = map.values().map(|l| l.memory).sum();
            if total + extra <= self.settings.cache_bytes {
                return;
            }
            let victim = map
                .values()
                .filter(|l| l.sessions.load(Ordering::SeqCst) == 0)
                .min_by_key(|l| *lock(&l.last_used))
                .map(|l| l.name.clone());
            match victim {
                Some(name) => {
                    map.remove(&name);
                    tracing::info!(avatar = name, "evicted from the avatar cache");
                }
                None => {
                    tracing::warn!(
                        "avatar cache over its bound ({} MiB in use by sessions + {} MiB new)",
                        total >> 20,
                        extra >> 20
                    );
                    return;
                }
            }
        }
    }

    /// Closes the models no loaded avatar uses any more (their sessions and threads end).
    fn prune_models(&self) {
        let loaded = lock(&self.loaded);
        let unets: Vec<PathBuf> = loaded.values().map(|l| l.unet_key.clone()).collect();
        let encoders: Vec<PathBuf> = loaded.values().map(|l| l.encoder_key.clone()).collect();
        drop(loaded);
        lock(&self.unets).retain(|path, u| unets.contains(path) || Arc::strong_count(u) > 1);
        lock(&self.encoders).retain(|path, e| encoders.contains(path) || Arc::strong_count(e) > 1);
    }

    fn unload(&self, name: &str) -> Result<bool, RegistryError> {
        self.dir_of(name)?;
        let mut map = lock(&self.loaded);
        match map.get(name) {
            None => Ok(false),
            Some(l) => {
                let n = l.sessions.load(Ordering::SeqCst);
                if n > 0 {
                    return Err(RegistryError::InUse(name.to_string(), n));
                }
                map.remove(name);
                drop(map);
                tracing::info!(avatar = name, "unloaded");
                self.prune_models();
                Ok(true)
            }
        }
    }

    fn list(&self) -> Vec<AvatarInfo> {
        let map = lock(&self.loaded);
        let mut names: Vec<String> = std::fs::read_dir(&self.settings.avatars)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().join("avatar.toml").is_file())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        for n in map.keys() {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names.sort();
        names
            .into_iter()
            .map(|name| match map.get(&name) {
                Some(l) => AvatarInfo {
                    name,
                    loaded: true,
                    memory_bytes: l.memory,
                    sessions: l.sessions.load(Ordering::SeqCst),
                    frames_served: l.frames.load(Ordering::SeqCst),
                },
                None => AvatarInfo { name, loaded: false, memory_bytes: 0, sessions: 0, frames_served: 0 },
            })
            .collect()
    }
}

/// Everything connection threads share.
struct Shared {
    registry: Registry,
    live: Arc<LiveStats>,
    sessions: Mutex<HashMap<u64, Arc<SessionLive>>>,
    active: AtomicUsize,
    next_id: AtomicU64,
    sessions_total: AtomicU64,
    started: Instant,
    connections: Mutex<HashMap<u64, UnixStream>>,
    draining: AtomicBool,
    /// Sessions started whose last message (Done or Error) is not out yet.
    finishing: AtomicUsize,
}

impl Shared {
    /// Sessions being opened, running, or sending their last message.
    fn in_progress(&self) -> usize {
        self.active.load(Ordering::SeqCst).max(self.finishing.load(Ordering::SeqCst))
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(cli: &Cli, args: &ServeArgs) -> Result<()> {
    let settings = Settings::resolve(args)?;
    release_big_buffers();
    let rt = OrtRuntime::load(cli.ort_lib.as_deref()).context("loading ONNX Runtime")?;
    let listener = bind(&settings.socket, settings.socket_mode)?;
    let socket = settings.socket.clone();
    // From here on the socket file is ours: remove it however we leave.
    let mut socket_file = SocketFile::new(socket.clone());
    let shared = Arc::new(Shared {
        registry: Registry {
            settings: settings.clone(),
            rt,
            loaded: Mutex::new(HashMap::new()),
            loading: Mutex::new(()),
            unets: Mutex::new(HashMap::new()),
            encoders: Mutex::new(HashMap::new()),
        },
        live: Arc::new(LiveStats::default()),
        sessions: Mutex::new(HashMap::new()),
        active: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
        sessions_total: AtomicU64::new(0),
        started: Instant::now(),
        connections: Mutex::new(HashMap::new()),
        draining: AtomicBool::new(false),
        finishing: AtomicUsize::new(0),
    });
    let preload: Vec<String> = if settings.preload.iter().any(|p| p == "all") {
        shared.registry.list().into_iter().map(|a| a.name).collect()
    } else {
        settings.preload.clone()
    };
    for name in &preload {
        shared.registry.acquire(name, false).with_context(|| format!("preloading avatar `{name}`"))?;
    }

    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone()).context("installing signal handlers")?;
    }
    listener.set_nonblocking(true).context("socket")?;
    tracing::info!(
        socket = %socket.display(),
        avatars = %settings.avatars.display(),
        max_sessions = settings.max_sessions,
        max_batch = settings.max_batch,
        "lipsync serve listening (protocol {PROTOCOL_VERSION})"
    );
    let mut conn_id = 0u64;
    while !term.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                conn_id += 1;
                let id = conn_id;
                if let Err(e) = stream.set_nonblocking(false) {
                    tracing::warn!("dropping connection: {e}");
                    continue;
                }
                let max_connections = MAX_CONNECTIONS_PER_SESSION * settings.max_sessions + 16;
                if lock(&shared.connections).len() >= max_connections {
                    tracing::warn!("refusing a connection: {max_connections} are open");
                    let mut stream = stream;
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                    let reply = ErrorReply {
                        code: "busy".into(),
                        message: format!("the daemon has its maximum of {max_connections} connections open"),
                    };
                    let _ = write_json(&mut stream, Kind::Error, &reply);
                    continue;
                }
                if let Ok(c) = stream.try_clone() {
                    lock(&shared.connections).insert(id, c);
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
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(25)),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    drop(listener);
    // The name is free at once: a new daemon may start while this one drains.
    socket_file.remove();
    shared.draining.store(true, Ordering::SeqCst);
    let open = shared.in_progress();
    tracing::info!("shutting down: draining {open} open session(s)");
    let deadline = Instant::now() + settings.drain_timeout;
    while shared.in_progress() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = shared.in_progress();
    if left > 0 {
        tracing::warn!("{left} session(s) still open after the drain timeout: closing them");
    }
    for (_, c) in lock(&shared.connections).drain() {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while shared.in_progress() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(frames = shared.live.frames.load(Ordering::SeqCst), "stopped");
    Ok(())
}

/// Makes glibc hand big buffers (a session's frame jobs and tensors: 0.3 to 2.5 MiB each,
/// allocated when it opens, freed when it closes) straight back to the OS. By default glibc
/// raises its mmap threshold after the first such free and keeps later ones in its heaps, so the
/// daemon's resident memory would follow the peak of concurrent sessions instead of the sessions
/// open now.
fn release_big_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before the daemon's threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

/// Connections allowed per session slot (clients that only ask for stats or manage avatars
/// also hold one).
const MAX_CONNECTIONS_PER_SESSION: usize = 4;

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
/// path that is not a socket, is refused.
fn bind(path: &Path, mode: u32) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket: refusing to replace it", path.display());
        }
        match UnixStream::connect(path) {
            Ok(_) => bail!("another daemon is listening on {}", path.display()),
            Err(_) => {
                tracing::info!("removing stale socket {}", path.display());
                std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            }
        }
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

/// The write half of a connection, shared by the reader and the session's output stage. The
/// first failed or timed-out write (possibly after part of a message) breaks it for good: the
/// socket is shut down, so the client never sees a torn message followed by more.
#[derive(Clone)]
struct Writer(Arc<Mutex<WriteHalf>>);

struct WriteHalf {
    stream: UnixStream,
    broken: bool,
}

impl Writer {
    fn new(stream: UnixStream, timeout: Duration) -> Self {
        // A client that leaves its frames unread for this long loses its session.
        let _ = stream.set_write_timeout(Some(timeout));
        Self(Arc::new(Mutex::new(WriteHalf { stream, broken: false })))
    }

    /// Runs `f` on the stream unless the connection is broken; breaks it if `f` fails.
    fn write(&self, f: impl FnOnce(&mut UnixStream) -> std::io::Result<()>) -> std::io::Result<()> {
        let mut w = lock(&self.0);
        if w.broken {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the connection was closed"));
        }
        let r = f(&mut w.stream);
        if r.is_err() {
            w.broken = true;
            let _ = w.stream.shutdown(std::net::Shutdown::Both);
        }
        r
    }

    fn json(&self, kind: Kind, value: &impl Serialize) -> std::io::Result<()> {
        self.write(|s| write_json(s, kind, value))
    }

    /// Closes both directions: blocked writes and reads on the connection return at once.
    fn close(&self) {
        let _ = self.0.lock().unwrap_or_else(|p| p.into_inner()).stream.shutdown(std::net::Shutdown::Both);
    }

    /// Like [`Writer::close`], without waiting for a write in progress (which then fails).
    fn close_now(&self, raw: &UnixStream) {
        let _ = raw.shutdown(std::net::Shutdown::Both);
        if let Ok(mut w) = self.0.try_lock() {
            w.broken = true;
        }
    }

    /// Sends an error, then closes. If a frame write holds the connection for more than a
    /// moment (a client that does not read), closes at once instead: the error cannot be put
    /// after a frame that is half sent.
    fn error_then_close(&self, raw: &UnixStream, code: &str, message: &str) {
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            match self.0.try_lock() {
                Ok(mut w) => {
                    if !w.broken {
                        let reply = ErrorReply { code: code.to_string(), message: message.to_string() };
                        let _ = write_json(&mut w.stream, Kind::Error, &reply);
                    }
                    w.broken = true;
                    let _ = w.stream.shutdown(std::net::Shutdown::Both);
                    return;
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return self.close_now(raw),
            }
        }
    }
}

fn send_error(w: &Writer, code: &str, message: impl std::fmt::Display) {
    let reply = ErrorReply { code: code.to_string(), message: message.to_string() };
    let _ = w.json(Kind::Error, &reply);
}

/// Writes frames to the client.
struct SocketSink {
    writer: Writer,
    fps: f64,
    loaded: Arc<Loaded>,
}

impl FrameSink for SocketSink {
    fn frame(&mut self, index: usize, jpeg: &[u8]) -> Result<(), String> {
        let ts = ((index as f64) * 1000.0 / self.fps).round() as u32;
        let head_index = (index as u32).to_be_bytes();
        let head_ts = ts.to_be_bytes();
        self.writer
            .write(|s| write_parts(s, Kind::Frame, &[&head_index, &head_ts, jpeg]))
            .map_err(|e| format!("cannot send frame to the client: {e}"))?;
        self.loaded.frames.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// How long a new connection has to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Payload capacity a connection keeps between messages.
const KEEP_PAYLOAD: usize = 1 << 20;

/// Audio handed to a session at once, ms: a huge Audio message is split so that the session's
/// buffers (and the time it holds the shared encoder) stay small.
const AUDIO_PIECE_MS: usize = 250;

/// Reasons a connection is closed after an error reply.
struct Fatal(&'static str, String);

/// The per-connection state.
struct Conn<'a> {
    shared: &'a Arc<Shared>,
    writer: Writer,
    session: Option<Session>,
    format: PcmFormat,
    channels: usize,
    rate: u32,
    scratch: Vec<f32>,
    mono: Vec<f32>,
}

/// How a connection's message loop ended.
enum End {
    /// The client closed its side.
    Eof,
    /// The client sent `Close`.
    Close,
}

fn connection(shared: &Arc<Shared>, id: u64, stream: UnixStream) {
    let writer = match stream.try_clone() {
        Ok(w) => Writer::new(w, shared.registry.settings.client_timeout),
        Err(e) => {
            tracing::warn!("connection {id}: {e}");
            return;
        }
    };
    let mut reader = std::io::BufReader::with_capacity(64 << 10, stream);
    let mut conn = Conn {
        shared,
        writer,
        session: None,
        format: PcmFormat::S16Le,
        channels: 1,
        rate: 16_000,
        scratch: Vec::new(),
        mono: Vec::new(),
    };
    let mut payload = Vec::new();
    // Handshake: Hello within 10 s.
    let _ = reader.get_ref().set_read_timeout(Some(HELLO_TIMEOUT));
    let result = match read_message(&mut reader, &mut payload) {
        Ok(Kind::Hello) => match serde_json::from_slice::<Hello>(&payload) {
            Ok(h) if h.protocol == PROTOCOL_VERSION => {
                let welcome = serde_json::json!({
                    "protocol": PROTOCOL_VERSION,
                    "server": format!("lipsync {}", env!("CARGO_PKG_VERSION")),
                    "max_message": MAX_MESSAGE,
                });
                let _ = reader.get_ref().set_read_timeout(None);
                match conn.writer.json(Kind::Welcome, &welcome) {
                    Ok(()) => conn.serve(&mut reader, &mut payload),
                    Err(_) => Ok(End::Eof),
                }
            }
            Ok(h) => Err(Fatal(
                "version",
                format!("protocol version {} is not supported (this server speaks {PROTOCOL_VERSION})", h.protocol),
            )),
            Err(e) => Err(Fatal("bad_request", format!("invalid Hello: {e}"))),
        },
        Ok(k) => Err(Fatal("handshake", format!("expected Hello first, got {k:?}"))),
        Err(WireError::Closed) => Ok(End::Eof),
        Err(WireError::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            Err(Fatal("handshake", format!("no Hello within {} s", HELLO_TIMEOUT.as_secs())))
        }
        Err(e) => Err(Fatal(e.code(), e.to_string())),
    };
    let raw = reader.get_ref();
    match result {
        Err(Fatal(code, message)) => {
            tracing::warn!(connection = id, code, "{message}");
            // The session stops first (no more frames), then the error goes out, then the
            // connection closes.
            if let Some(s) = &conn.session {
                s.cancel();
            }
            conn.writer.error_then_close(raw, code, &message);
        }
        Ok(End::Close) => {
            if let Some(s) = &conn.session {
                s.cancel();
            }
            conn.writer.close_now(raw);
        }
        Ok(End::Eof) => match &conn.session {
            // The client half-closed after EndAudio: its last frames and Done still go out
            // (if it is gone altogether, the next write fails and frees the session).
            Some(s) if s.audio_ended() && !s.is_stopped() => {}
            Some(s) => {
                s.cancel();
                conn.writer.close_now(raw);
            }
            None => {}
        },
    }
    if let Some(session) = conn.session.take() {
        session.wait();
    }
    conn.writer.close();
}

impl Conn<'_> {
    fn serve(&mut self, reader: &mut impl std::io::Read, payload: &mut Vec<u8>) -> Result<End, Fatal> {
        loop {
            // One big message does not pin its buffer for the rest of the connection.
            if payload.capacity() > KEEP_PAYLOAD {
                payload.clear();
                payload.shrink_to(KEEP_PAYLOAD);
            }
            let kind = match read_message(reader, payload) {
                Ok(k) => k,
                Err(WireError::Closed) => return Ok(End::Eof),
                Err(e) => return Err(Fatal(e.code(), e.to_string())),
            };
            match kind {
                Kind::Open => self.open(payload)?,
                Kind::Audio => self.audio(payload)?,
                Kind::EndAudio => {
                    let s = self.session.as_mut().ok_or_else(|| Fatal("no_session", "EndAudio before Open".into()))?;
                    match s.end_audio() {
                        Ok(()) => {}
                        Err(lipsync_pipelines::session::SessionError::Ended) => {
                            return Err(Fatal("no_session", "EndAudio after the audio was already ended".into()))
                        }
                        // The session failed: its error reply is on its way.
                        Err(_) => {}
                    }
                }
                Kind::Close => return Ok(End::Close),
                Kind::StatsRequest => {
                    let stats = stats(self.shared);
                    self.reply(Kind::Stats, &stats);
                }
                Kind::ListAvatars => {
                    let list = serde_json::json!({ "avatars": self.shared.registry.list() });
                    self.reply(Kind::Avatars, &list);
                }
                Kind::LoadAvatar | Kind::UnloadAvatar => {
                    let name: AvatarName = serde_json::from_slice(payload)
                        .map_err(|e| Fatal("bad_request", format!("expected {{\"name\": ...}}: {e}")))?;
                    let r = if kind == Kind::LoadAvatar {
                        self.shared.registry.acquire(&name.name, false).map(|l| {
                            serde_json::json!({"loaded": name.name, "memory_bytes": l.memory, "frames": l.template.len()})
                        })
                    } else {
                        self.shared
                            .registry
                            .unload(&name.name)
                            .map(|was| serde_json::json!({"unloaded": name.name, "was_loaded": was}))
                    };
                    match r {
                        Ok(v) => self.reply(Kind::Ok, &v),
                        Err(e) => send_error(&self.writer, e.code(), e),
                    }
                }
                Kind::Hello => return Err(Fatal("handshake", "Hello sent twice".into())),
                other => return Err(Fatal("unexpected", format!("{other:?} is a server-to-client message"))),
            }
        }
    }

    fn reply(&self, kind: Kind, value: &impl Serialize) {
        let _ = self.writer.json(kind, value);
    }

    /// A failed Open gets an error reply and leaves the connection open, without a session.
    fn open(&mut self, payload: &[u8]) -> Result<(), Fatal> {
        if let Err((code, message)) = self.try_open(payload) {
            send_error(&self.writer, code, message);
        }
        Ok(())
    }

    fn try_open(&mut self, payload: &[u8]) -> Result<(), (&'static str, String)> {
        if self.session.as_ref().is_some_and(|s| !s.audio_ended() && !s.is_stopped()) {
            return Err((
                "session_open",
                "Open while a session is streaming on this connection (send EndAudio first)".into(),
            ));
        }
        // The previous session of this connection has had its audio: let it finish first.
        if let Some(s) = self.session.take() {
            s.wait();
        }
        let req: OpenRequest =
            serde_json::from_slice(payload).map_err(|e| ("bad_request", format!("invalid Open: {e}")))?;
        if req.channels == 0 || req.channels > 32 {
            return Err(("bad_request", format!("{} channels is not in 1..=32", req.channels)));
        }
        if !(4_000..=384_000).contains(&req.sample_rate) {
            return Err(("bad_request", format!("sample rate {} Hz is not in 4000..=384000", req.sample_rate)));
        }
        let sh = self.shared;
        if sh.draining.load(Ordering::SeqCst) {
            return Err(("shutting_down", "the daemon is shutting down".into()));
        }
        let max = sh.registry.settings.max_sessions;
        if sh.active.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1)).is_err() {
            return Err(("busy", format!("the daemon is serving its maximum of {max} sessions; retry later")));
        }
        let release = |sh: &Shared, loaded: Option<&Loaded>| {
            if let Some(l) = loaded {
                l.sessions.fetch_sub(1, Ordering::SeqCst);
            }
            sh.active.fetch_sub(1, Ordering::SeqCst);
        };
        let loaded = match sh.registry.acquire(&req.avatar, true) {
            Ok(l) => l,
            Err(e) => {
                release(sh, None);
                return Err((e.code(), e.to_string()));
            }
        };
        let max_batch = loaded.unet.max_batch();
        // A session cannot have more frames in one run than it may have in flight.
        let batch = req.batch.unwrap_or(max_batch.min(sh.registry.settings.session_queue));
        let quality = req.jpeg_quality.unwrap_or(loaded.avatar.config.jpeg_quality);
        if batch == 0 || batch > max_batch || !(1..=100).contains(&quality) {
            release(sh, Some(&loaded));
            return Err((
                "bad_request",
                format!("batch {batch} must be in 1..={max_batch} and JPEG quality {quality} in 1..=100"),
            ));
        }
        let id = sh.next_id.fetch_add(1, Ordering::SeqCst);
        let fps = loaded.avatar.config.fps;
        let cfg = SessionConfig {
            id,
            name: loaded.name.clone(),
            avatar: loaded.avatar.clone(),
            template: loaded.template.clone(),
            encoder: loaded.encoder.clone(),
            unet: loaded.unet.clone(),
            sample_rate: req.sample_rate,
            jpeg_quality: quality,
            batch,
            queue: sh.registry.settings.session_queue.max(batch),
            start_frame: req.start_frame.unwrap_or(loaded.avatar.config.start_frame),
            live: sh.live.clone(),
        };
        let sink = SocketSink { writer: self.writer.clone(), fps, loaded: loaded.clone() };
        let on_finish = {
            let writer = self.writer.clone();
            let shared = sh.clone();
            let loaded = loaded.clone();
            Box::new(move |r: Result<SessionOutcome, lipsync_pipelines::runtime::PipelineError>| {
                // Free the slot first: a client that reads Done may open the next session at once.
                lock(&shared.sessions).remove(&id);
                release(&shared, Some(&loaded));
                match r {
                    Ok(out) => {
                        tracing::info!(
                            session = id,
                            frames = out.frames,
                            p50_ms = out.latency.p50,
                            p99_ms = out.latency.p99,
                            "session done"
                        );
                        let _ = writer.json(Kind::Done, &Done { session: id, frames: out.frames });
                    }
                    Err(e) if e.message == "cancelled" => tracing::info!(session = id, "session cancelled"),
                    Err(e) => {
                        tracing::warn!(session = id, "session failed: {e}");
                        send_error(&writer, "session", &e);
                    }
                }
                // Draining waits for this: the last message is out.
                shared.finishing.fetch_sub(1, Ordering::SeqCst);
            })
        };
        // Held across the start, so that a session that ends at once is removed after it is added.
        let mut live = lock(&sh.sessions);
        sh.finishing.fetch_add(1, Ordering::SeqCst);
        let session = match Session::start(cfg, Box::new(sink), on_finish) {
            Ok(s) => s,
            Err(e) => {
                sh.finishing.fetch_sub(1, Ordering::SeqCst);
                release(sh, Some(&loaded));
                return Err(("session", e.to_string()));
            }
        };
        live.insert(id, session.live().clone());
        drop(live);
        sh.sessions_total.fetch_add(1, Ordering::Relaxed);
        self.format = match req.format {
            AudioFormat::S16le => PcmFormat::S16Le,
            AudioFormat::F32le => PcmFormat::F32Le,
        };
        self.channels = req.channels as usize;
        self.rate = req.sample_rate;
        let (width, height) = loaded.template.size();
        tracing::info!(session = id, avatar = %req.avatar, rate = req.sample_rate, "session open");
        self.reply(Kind::Opened, &Opened { session: id, fps, width, height });
        self.session = Some(session);
        Ok(())
    }

    fn audio(&mut self, payload: &[u8]) -> Result<(), Fatal> {
        let s = match &self.session {
            Some(s) if !s.audio_ended() => s,
            Some(_) => return Err(Fatal("no_session", "Audio after EndAudio".into())),
            None => return Err(Fatal("no_session", "Audio before Open".into())),
        };
        let frame_bytes = self.format.sample_bytes() * self.channels;
        if payload.len() % frame_bytes != 0 {
            let e = AudioError::PartialFrame { format: self.format.name(), frame_bytes, len: payload.len() };
            return Err(Fatal("bad_audio", e.to_string()));
        }
        // In pieces of at most a quarter second (and 64 Ki sample frames).
        let piece = (self.rate as usize * AUDIO_PIECE_MS / 1000).clamp(1, 1 << 16) * frame_bytes;
        for chunk in payload.chunks(piece) {
            self.mono.clear();
            pcm_to_mono(chunk, self.format, self.channels, &mut self.scratch, &mut self.mono)
                .map_err(|e| Fatal("bad_audio", e.to_string()))?;
            // Blocks while the session's queue is full: that is the client's backpressure. A
            // stopped session has sent (or is sending) its error; its audio is dropped.
            if s.push_audio(&self.mono).is_err() {
                break;
            }
        }
        Ok(())
    }
}

/// The `Stats` reply.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsReply {
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// Sessions open now.
    pub sessions_open: usize,
    /// Sessions opened since start.
    pub sessions_total: u64,
    /// Frames sent since start.
    pub frames_total: u64,
    /// Per-stage service time since start (ms).
    pub stages: Vec<(String, Percentiles)>,
    /// One entry per UNet model.
    pub unet: Vec<UnetInfo>,
    /// Open sessions.
    pub sessions: Vec<SessionInfo>,
    /// The daemon's settings (after the config file and flags).
    pub settings: serde_json::Value,
}

/// A UNet service in `Stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct UnetInfo {
    /// Model path.
    pub model: String,
    /// Execution provider in use (`cpu`, or `cuda` when it could be started).
    pub provider: String,
    /// Runs.
    pub batches: u64,
    /// Frames.
    pub frames: u64,
    /// Mean frames per run.
    pub mean_batch: f64,
    /// Runs per batch size: entry `k` counts runs of `k + 1` frames.
    pub batch_sizes: Vec<u64>,
    /// Run time per batch (ms).
    pub service_ms: Percentiles,
}

/// An open session in `Stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Id.
    pub id: u64,
    /// Avatar.
    pub avatar: String,
    /// Seconds open.
    pub seconds: f64,
    /// Frames sent.
    pub frames: u64,
    /// Frames per second since open.
    pub frames_per_second: f64,
    /// Time from open to the first frame (ms), when sent.
    pub first_frame_ms: Option<f64>,
    /// Frames prepared and not yet sent.
    pub in_flight: u64,
    /// Latency from the audio that made a frame final to the frame sent (ms).
    pub latency_ms: Percentiles,
}

fn stats(sh: &Shared) -> StatsReply {
    let sessions = {
        let map = lock(&sh.sessions);
        let mut v: Vec<SessionInfo> = map
            .values()
            .map(|s| {
                let secs = s.started.elapsed().as_secs_f64();
                let frames = s.frames.load(Ordering::Relaxed);
                let ff = s.first_frame_us.load(Ordering::Relaxed);
                SessionInfo {
                    id: s.id,
                    avatar: s.avatar.clone(),
                    seconds: secs,
                    frames,
                    frames_per_second: frames as f64 / secs.max(1e-9),
                    first_frame_ms: (ff > 0).then_some(ff as f64 / 1000.0),
                    in_flight: s.in_flight.load(Ordering::Relaxed),
                    latency_ms: s.latency(),
                }
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    };
    let unet = lock(&sh.registry.unets)
        .iter()
        .map(|(path, u)| {
            let st = u.stats();
            let batches = st.batches();
            let frames = st.frames();
            UnetInfo {
                model: path.display().to_string(),
                provider: format!("{:?}", u.provider()).to_lowercase(),
                batches,
                frames,
                mean_batch: frames as f64 / (batches.max(1)) as f64,
                batch_sizes: st.sizes.iter().skip(1).map(|n| n.load(Ordering::Relaxed)).collect(),
                service_ms: Percentiles::of(&lock(&st.service)),
            }
        })
        .collect();
    StatsReply {
        uptime_seconds: sh.started.elapsed().as_secs_f64(),
        sessions_open: sh.active.load(Ordering::SeqCst),
        sessions_total: sh.sessions_total.load(Ordering::Relaxed),
        frames_total: sh.live.frames.load(Ordering::Relaxed),
        stages: sh.live.summary().into_iter().map(|(n, p)| (n.to_string(), p)).collect(),
        unet,
        sessions,
        settings: sh.registry.settings.summary(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_config_parses() {
        let file: ServeFile = toml::from_str(include_str!("../docs/serve.example.toml")).unwrap();
        assert_eq!(file.max_sessions, Some(16));
        assert_eq!(file.preload, Some(vec!["alice".to_string()]));
        assert_eq!(file.client_timeout, Some(30.0));
    }
}
