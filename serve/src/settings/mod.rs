//! The daemon's settings: declared once ([`ServeOptions`]: flags and TOML keys alike), merged
//! (flags over the file over the defaults) and validated once into [`Settings`]; the HTTP
//! listener's in [`http`].

pub mod http;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use lipsync_pipelines::graph::Layout;
use lipsync_pipelines::runtime::PinPolicy;
use lipsync_stages::unet::{BatchSetting, PrecisionSetting, Provider, RemoteSettings};
use serde::{Deserialize, Serialize};

pub use http::{HttpSettings, Secret};

/// `lipsync serve` settings: each is a flag and a key of the `--config` TOML file (flags win).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeOptions {
    /// TOML file with any of the settings below (flags override it).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
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
    /// Permissions of the socket file, octal [default: 0600]; a mode that lets others write
    /// (connect) needs --allow-shared-socket.
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Allow a --socket-mode that gives others (not just the group) write access.
    #[arg(long)]
    #[serde(default)]
    pub allow_shared_socket: bool,
    /// Avatars to load at start (comma-separated names, or `all`).
    #[arg(long, value_delimiter = ',')]
    pub preload: Option<Vec<String>>,
    /// Memory bound of the avatar cache (loaded templates), MiB [default: 2048].
    #[arg(long)]
    pub cache_mb: Option<usize>,
    /// Decoded template frames each session keeps for the ping-pong's backward pass, MiB
    /// (1..=4096) [default: 24].
    #[arg(long)]
    pub template_cache_mb: Option<usize>,
    /// Most an avatar's JPEG frames may take, MiB (0..=16384; 0: none) [default: 256]: each
    /// template frame's JPEG at the avatar's quality and its face region, shared by the
    /// avatar's sessions at that quality, which then decode nothing and encode only the mouth
    /// region. A template too large for it is decoded by each session instead.
    #[arg(long)]
    pub jpeg_template_mb: Option<usize>,
    /// Most frames per UNet run, across sessions: auto (1 on the CPU, measured on a GPU) or
    /// 1..=32 [default: auto].
    #[arg(long)]
    pub max_batch: Option<BatchSetting>,
    /// Longest a frame waits for its UNet batch to fill, ms (0..=1000) [default: 2].
    #[arg(long)]
    pub max_wait_ms: Option<f64>,
    /// Frames a session may have in flight before its audio intake blocks [default: 8].
    #[arg(long)]
    pub session_queue: Option<usize>,
    /// Real-time sessions: how long after its slot on the session's clock a frame is sent,
    /// ms (0..=5000): room for a speech frame's image work and UNet batch [default: 200].
    #[arg(long)]
    pub realtime_delay_ms: Option<f64>,
    /// ONNX Runtime intra-op threads of each UNet [default: 2].
    #[arg(long)]
    pub intra_threads: Option<usize>,
    /// UNet execution provider: cpu or cuda [default: cpu].
    #[arg(long)]
    pub provider: Option<String>,
    /// Inference server of `--provider remote`, grpc://HOST:PORT (Open Inference Protocol).
    #[arg(long)]
    pub remote_url: Option<String>,
    /// The UNet's model name on the remote server.
    #[arg(long)]
    pub remote_model: Option<String>,
    /// Deadline of each remote request, ms (1..=600000) [default: 10000].
    #[arg(long)]
    pub remote_timeout_ms: Option<u64>,
    /// Retries of a request the remote server could not take (0..=10) [default: 3].
    #[arg(long)]
    pub remote_retries: Option<u32>,
    /// Which of each avatar's UNets to run: auto (its int8 model on the CPU when it names one,
    /// made by `lipsync model quantize`), fp32 or int8 [default: auto].
    #[arg(long)]
    pub precision: Option<PrecisionSetting>,
    /// Pinning of each session's stage threads: none, auto or a core list [default: none].
    #[arg(long)]
    pub pin: Option<String>,
    /// Threads of each session: staged (one per stage), compact (three) or auto (staged with
    /// at least 4 cores, else compact) [default: auto].
    #[arg(long)]
    pub session_layout: Option<String>,
    /// Seconds to let open sessions finish after SIGTERM/SIGINT (0..=3600) [default: 30].
    #[arg(long)]
    pub drain_timeout: Option<f64>,
    /// Seconds a client may leave its frames unread (socket full) before its session is
    /// dropped (0.1..=3600) [default: 30].
    #[arg(long)]
    pub client_timeout: Option<f64>,
    /// Seconds a new connection has to send its whole Hello (0.1..=60) [default: 10].
    #[arg(long)]
    pub handshake_timeout: Option<f64>,
    /// Seconds a connection without a streaming session may send nothing (1..=86400)
    /// [default: 120].
    #[arg(long)]
    pub idle_timeout: Option<f64>,
    /// Seconds a message may take to arrive whole once it has begun (0.1..=3600) [default: 30].
    #[arg(long)]
    pub message_timeout: Option<f64>,
    /// Also serve HTTP on this address, e.g. 127.0.0.1:9100: the browser page (`/`), its
    /// WebSocket (`/ws`) and `/metrics` (Prometheus text). A non-loopback address needs
    /// --http-token; a wildcard one (0.0.0.0) needs --http-host too.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// The token every HTTP request must carry (16..=512 letters, digits or
    /// !#$%&'*+-.^_`|~): `Authorization: Bearer TOKEN`; a browser loads
    /// `/?token=TOKEN` once and gets a cookie; a WebSocket client may offer the subprotocol
    /// `lipsync.token.TOKEN`. Required to bind a non-loopback address. The command line is
    /// visible to other users (ps): prefer `http_token` in a --config file only you can read.
    #[arg(long, value_name = "TOKEN")]
    pub http_token: Option<Secret>,
    /// A host name (NAME or NAME:PORT) the HTTP listener answers to besides its own address
    /// (repeatable); requests naming any other `Host` get 421 (DNS rebinding). Its http and
    /// https origins may use the WebSocket.
    #[arg(long, value_name = "NAME")]
    pub http_host: Option<Vec<String>>,
    /// An origin (http://HOST[:PORT] or https://...) whose pages may open the WebSocket
    /// (repeatable); pages of any origin other than the listener's own get 403.
    #[arg(long, value_name = "ORIGIN")]
    pub http_allow_origin: Option<Vec<String>>,
    /// Most HTTP connections open at once (1..=65536, and no more than the descriptor limit
    /// leaves after the Unix socket's connections) [default: 256, or what that leaves]; one
    /// more is answered 503 and closed.
    #[arg(long, value_name = "N")]
    pub http_max_connections: Option<usize>,
    /// Most WebSocket relays open at once (1..=4 x max sessions: each takes one of the Unix
    /// socket's connections, and 16 always stay for Unix-socket clients)
    /// [default: 2 x max sessions + 8]; one more is answered 503.
    #[arg(long, value_name = "N")]
    pub http_max_websockets: Option<usize>,
    /// Seconds a request's head may take to arrive whole, counted from the connection's open
    /// or the end of its previous response (0.1..=300) [default: 10].
    #[arg(long, value_name = "S")]
    pub http_header_timeout: Option<f64>,
    /// Seconds an HTTP connection may move no bytes (an idle keep-alive connection, one that
    /// sends nothing) before it is closed (0.1..=3600) [default: 5].
    #[arg(long, value_name = "S")]
    pub http_idle_timeout: Option<f64>,
    /// WebSocket messages per second one browser connection may send, two seconds' worth at
    /// once (1..=100000) [default: 200]; past it that connection alone is closed (code 1008).
    #[arg(long, value_name = "N")]
    pub http_ws_message_rate: Option<f64>,
    /// WebSocket MiB per second one browser connection may send, likewise (0.1..=4096)
    /// [default: 16].
    #[arg(long, value_name = "MIB")]
    pub http_ws_mib_rate: Option<f64>,
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The remote inference server's settings are missing or out of range.
    #[error("{0}")]
    Remote(String),
    /// The HTTP listener's address or token cannot be used.
    #[error("{0}")]
    Http(String),
    /// A required setting is missing.
    #[error("no {0}: give --{1} or `{2}` in the config")]
    Missing(&'static str, &'static str, &'static str),
    /// The config file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: toml::de::Error,
    },
    /// The config file is not valid TOML, on a line that holds the token (not quoted).
    #[error("invalid config {path}{}: {message} (the line holds http_token: not shown)", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    ParseSecret {
        /// The file.
        path: PathBuf,
        /// Where.
        line: Option<usize>,
        /// What is wrong, without the line.
        message: String,
    },
    /// The avatars directory does not exist.
    #[error("avatars directory {0} does not exist")]
    NoAvatars(PathBuf),
    /// A value outside its range.
    #[error("{name} {value} is out of range: expected {allowed}")]
    Range {
        /// The setting.
        name: &'static str,
        /// The value given.
        value: String,
        /// The allowed range.
        allowed: &'static str,
    },
    /// A value outside the range that this machine or the other settings allow.
    #[error("{name} {value} is out of range: expected {allowed} ({why})")]
    Budget {
        /// The setting.
        name: &'static str,
        /// The value given or derived.
        value: usize,
        /// The allowed range.
        allowed: String,
        /// What sets the range.
        why: String,
    },
    /// A value that does not parse.
    #[error("{name} `{value}` is not valid: expected {expected}")]
    Invalid {
        /// The setting.
        name: &'static str,
        /// The value given.
        value: String,
        /// What is expected.
        expected: &'static str,
    },
}

/// The daemon's settings, merged and validated.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Socket path.
    pub socket: PathBuf,
    /// Avatars directory.
    pub avatars: PathBuf,
    /// Most sessions at once.
    pub max_sessions: usize,
    /// Socket file mode.
    #[serde(serialize_with = "octal")]
    pub socket_mode: u32,
    /// Avatars loaded at start.
    pub preload: Vec<String>,
    /// Avatar cache bound, bytes.
    #[serde(rename = "cache_mb", serialize_with = "mib")]
    pub cache_bytes: usize,
    /// Decoded template frames per session, bytes.
    #[serde(rename = "template_cache_mb", serialize_with = "mib")]
    pub template_cache: usize,
    /// Most bytes of an avatar's JPEG frames.
    #[serde(rename = "jpeg_template_mb", serialize_with = "mib")]
    pub jpeg_template: usize,
    /// Most frames per UNet run.
    pub max_batch: BatchSetting,
    /// Longest wait for a batch to fill.
    #[serde(rename = "max_wait_ms", serialize_with = "millis")]
    pub max_wait: Duration,
    /// Frame jobs per session.
    pub session_queue: usize,
    /// Real-time sessions: delay of each frame after its slot on the clock.
    #[serde(rename = "realtime_delay_ms", serialize_with = "millis")]
    pub realtime_delay: Duration,
    /// ORT intra-op threads per UNet.
    pub intra_threads: usize,
    /// UNet execution provider.
    #[serde(serialize_with = "debug_lower")]
    pub provider: Provider,
    /// Which of an avatar's UNets runs.
    pub precision: PrecisionSetting,
    /// The inference server of `--provider remote`.
    #[serde(skip)]
    pub remote: Option<RemoteSettings>,
    /// Session thread pinning.
    #[serde(serialize_with = "debug_lower")]
    pub pin: PinPolicy,
    /// Threads of each session.
    pub session_layout: Layout,
    /// Drain timeout.
    #[serde(rename = "drain_timeout_s", serialize_with = "secs")]
    pub drain_timeout: Duration,
    /// Slow-client timeout.
    #[serde(rename = "client_timeout_s", serialize_with = "secs")]
    pub client_timeout: Duration,
    /// Time for the whole Hello.
    #[serde(rename = "handshake_timeout_s", serialize_with = "secs")]
    pub handshake_timeout: Duration,
    /// Idle time allowed without a streaming session.
    #[serde(rename = "idle_timeout_s", serialize_with = "secs")]
    pub idle_timeout: Duration,
    /// Time for a begun message to arrive whole.
    #[serde(rename = "message_timeout_s", serialize_with = "secs")]
    pub message_timeout: Duration,
    /// The HTTP listener, if any.
    pub http: Option<HttpSettings>,
}

fn octal<S: serde::Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{mode:04o}"))
}

fn mib<S: serde::Serializer>(bytes: &usize, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64((*bytes >> 20) as u64)
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn debug_lower<T: std::fmt::Debug, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:?}").to_lowercase())
}

fn in_range(name: &'static str, v: f64, lo: f64, hi: f64, allowed: &'static str) -> Result<f64, SettingsError> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(SettingsError::Range { name, value: v.to_string(), allowed })
    }
}

fn at_least_one(name: &'static str, v: usize) -> Result<usize, SettingsError> {
    if v >= 1 {
        Ok(v)
    } else {
        Err(SettingsError::Range { name, value: v.to_string(), allowed: "at least 1" })
    }
}

impl ServeOptions {
    /// Reads a config file's settings.
    pub fn from_file(path: &std::path::Path) -> Result<Self, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|source| {
            // The error quotes the line it points at: never one that holds the token.
            let shown = source.to_string();
            let quotes_token = text.lines().filter(|l| l.contains("http_token")).any(|l| {
                let value = l.split_once('=').map_or("", |(_, v)| v.trim());
                !value.is_empty() && shown.contains(value)
            });
            if quotes_token {
                let line = source.span().map(|r| text[..r.start.min(text.len())].matches('\n').count() + 1);
                SettingsError::ParseSecret { path: path.into(), line, message: source.message().to_string() }
            } else {
                SettingsError::Parse { path: path.into(), source }
            }
        })
    }

    /// These options over `base` (each setting given here wins).
    pub fn over(self, base: ServeOptions) -> ServeOptions {
        macro_rules! merge {
            ($($f:ident),*) => {
                ServeOptions {
                    config: self.config,
                    allow_shared_socket: self.allow_shared_socket || base.allow_shared_socket,
                    $($f: self.$f.or(base.$f)),*
                }
            };
        }
        merge!(
            socket,
            avatars,
            max_sessions,
            socket_mode,
            preload,
            cache_mb,
            template_cache_mb,
            jpeg_template_mb,
            max_batch,
            max_wait_ms,
            session_queue,
            realtime_delay_ms,
            intra_threads,
            provider,
            remote_url,
            remote_model,
            remote_timeout_ms,
            remote_retries,
            precision,
            pin,
            session_layout,
            drain_timeout,
            client_timeout,
            handshake_timeout,
            idle_timeout,
            message_timeout,
            http,
            http_token,
            http_host,
            http_allow_origin,
            http_max_connections,
            http_max_websockets,
            http_header_timeout,
            http_idle_timeout,
            http_ws_message_rate,
            http_ws_mib_rate
        )
    }

    /// The flags over the config file (if `--config` names one), validated.
    pub fn resolve(self) -> Result<Settings, SettingsError> {
        let merged = match &self.config {
            Some(path) => {
                let file = ServeOptions::from_file(path)?;
                self.over(file)
            }
            None => self,
        };
        merged.validate()
    }

    /// Fills in the defaults and checks every setting.
    pub fn validate(self) -> Result<Settings, SettingsError> {
        let max_sessions = at_least_one("max sessions", self.max_sessions.unwrap_or(16))?;
        let http = http::resolve(&self, max_connections(max_sessions))?;
        let socket = self.socket.ok_or(SettingsError::Missing("socket path", "socket", "socket"))?;
        let avatars = self.avatars.ok_or(SettingsError::Missing("avatars directory", "avatars", "avatars"))?;
        if !avatars.is_dir() {
            return Err(SettingsError::NoAvatars(avatars));
        }
        let mode = self.socket_mode.unwrap_or_else(|| "0600".into());
        let socket_mode = u32::from_str_radix(mode.trim_start_matches("0o"), 8).ok().filter(|m| *m <= 0o777).ok_or(
            SettingsError::Invalid {
                name: "socket mode",
                value: mode.clone(),
                expected: "an octal permission like 0600",
            },
        )?;
        if socket_mode & 0o002 != 0 && !self.allow_shared_socket {
            return Err(SettingsError::Invalid {
                name: "socket mode",
                value: mode,
                expected: "a mode without write access for others (or --allow-shared-socket)",
            });
        }
        let provider = self.provider.unwrap_or_else(|| "cpu".into());
        let provider: Provider = provider.parse().map_err(|_| SettingsError::Invalid {
            name: "provider",
            value: provider,
            expected: "cpu, cuda or remote",
        })?;
        let remote = RemoteSettings::from_flags(
            provider,
            self.remote_url.as_deref(),
            self.remote_model.as_deref(),
            self.remote_timeout_ms,
            self.remote_retries,
        )
        .map_err(SettingsError::Remote)?;
        let intra_threads = at_least_one("intra threads", self.intra_threads.unwrap_or(2))?;
        let pin = self.pin.unwrap_or_else(|| "none".into());
        let pin = PinPolicy::parse(&pin, intra_threads).map_err(|_| SettingsError::Invalid {
            name: "pin",
            value: pin,
            expected: "auto, none or a list like 0,1,2",
        })?;
        let layout = self.session_layout.unwrap_or_else(|| "auto".into());
        let session_layout = match layout.as_str() {
            "auto" => auto_layout(std::thread::available_parallelism().map_or(1, |n| n.get())),
            other => other.parse().map_err(|_| SettingsError::Invalid {
                name: "session layout",
                value: layout.clone(),
                expected: "staged, compact or auto",
            })?,
        };
        let wait = in_range("max wait (ms)", self.max_wait_ms.unwrap_or(2.0), 0.0, 1000.0, "0..=1000")?;
        let drain = in_range("drain timeout (s)", self.drain_timeout.unwrap_or(30.0), 0.0, 3600.0, "0..=3600")?;
        let client = in_range("client timeout (s)", self.client_timeout.unwrap_or(30.0), 0.1, 3600.0, "0.1..=3600")?;
        let hello = in_range("handshake timeout (s)", self.handshake_timeout.unwrap_or(10.0), 0.1, 60.0, "0.1..=60")?;
        let idle = in_range("idle timeout (s)", self.idle_timeout.unwrap_or(120.0), 1.0, 86400.0, "1..=86400")?;
        let template_cache_mb = self.template_cache_mb.unwrap_or(lipsync_stages::template::DEFAULT_CACHE >> 20);
        if !(1..=4096).contains(&template_cache_mb) {
            return Err(SettingsError::Range {
                name: "template cache (MiB)",
                value: template_cache_mb.to_string(),
                allowed: "1..=4096",
            });
        }
        let jpeg_template_mb = self.jpeg_template_mb.unwrap_or(256);
        if jpeg_template_mb > 16384 {
            return Err(SettingsError::Range {
                name: "JPEG template (MiB)",
                value: jpeg_template_mb.to_string(),
                allowed: "0..=16384",
            });
        }
        let delay = in_range("real-time delay (ms)", self.realtime_delay_ms.unwrap_or(200.0), 0.0, 5000.0, "0..=5000")?;
        let message = in_range("message timeout (s)", self.message_timeout.unwrap_or(30.0), 0.1, 3600.0, "0.1..=3600")?;
        Ok(Settings {
            socket,
            avatars,
            max_sessions,
            socket_mode,
            preload: self.preload.unwrap_or_default(),
            cache_bytes: self.cache_mb.unwrap_or(2048) << 20,
            template_cache: template_cache_mb << 20,
            jpeg_template: jpeg_template_mb << 20,
            max_batch: self.max_batch.unwrap_or_default(),
            max_wait: Duration::from_secs_f64(wait / 1000.0),
            session_queue: at_least_one("session queue", self.session_queue.unwrap_or(8))?,
            realtime_delay: Duration::from_secs_f64(delay / 1000.0),
            intra_threads,
            provider,
            precision: self.precision.unwrap_or_default(),
            remote,
            pin,
            session_layout,
            drain_timeout: Duration::from_secs_f64(drain),
            client_timeout: Duration::from_secs_f64(client),
            handshake_timeout: Duration::from_secs_f64(hello),
            idle_timeout: Duration::from_secs_f64(idle),
            message_timeout: Duration::from_secs_f64(message),
            http,
        })
    }
}

/// The session layout for a machine with `cores` cores: one thread per stage when there are
/// cores for them to overlap on, else three (fewer hops; measured in docs/architecture.md).
pub fn auto_layout(cores: usize) -> Layout {
    if cores >= 4 {
        Layout::Staged
    } else {
        Layout::Compact
    }
}

/// Unix-socket connections allowed at once for `max_sessions` sessions.
fn max_connections(max_sessions: usize) -> usize {
    4 * max_sessions + 16
}

impl Settings {
    /// The settings as JSON (for `Stats`).
    pub fn summary(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// Connections allowed at once: sessions, plus room for clients that only ask for stats
    /// or manage avatars.
    pub fn max_connections(&self) -> usize {
        max_connections(self.max_sessions)
    }
}

#[cfg(test)]
mod tests;
