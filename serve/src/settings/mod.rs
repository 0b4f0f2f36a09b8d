//! The daemon's settings: declared once ([`ServeOptions`]: flags and TOML keys alike), merged
//! (flags over the file over the defaults) and validated once into [`Settings`]; the HTTP
//! listener's in [`http`].

mod groups;
pub mod http;
mod limits;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use lipsync_pipelines::graph::Layout;
use lipsync_pipelines::runtime::{PinPolicy, PinSetting};
use lipsync_stages::unet::{BatchSetting, PrecisionSetting, Provider, RemoteSettings, RemoteUrlError};
use serde::{Deserialize, Serialize};

pub use groups::{
    cpus, Inference, InferenceOptions, RemoteOptions, TemplateOptions, JPEG_TEMPLATE_MB, REMOTE_RETRIES,
    REMOTE_TIMEOUT_MS, TEMPLATE_CACHE_MB, THREADS,
};
pub use http::{HttpSettings, Secret};
pub use limits::Limit;

/// Most sessions open at once.
pub const MAX_SESSIONS: Limit<usize> = Limit::new("max sessions", 1, 4096, 16);
/// The avatar cache's bound, MiB.
pub const CACHE_MB: Limit<usize> = Limit::new("avatar cache (MiB)", 1, 1 << 20, 2048);
/// Longest a frame waits for its UNet batch to fill, ms.
pub const MAX_WAIT_MS: Limit<f64> = Limit::new("max wait (ms)", 0.0, 1000.0, 2.0);
/// Frames a session may have in flight.
pub const SESSION_QUEUE: Limit<usize> = Limit::new("session queue", 1, 1024, 8);
/// Live sessions: a frame's delay after its slot on the clock, ms.
pub const LIVE_DELAY_MS: Limit<f64> = Limit::new("live delay (ms)", 0.0, 5000.0, 200.0);
/// Seconds open sessions have to finish after SIGTERM/SIGINT.
pub const DRAIN_TIMEOUT_S: Limit<f64> = Limit::new("drain timeout (s)", 0.0, 3600.0, 30.0);
/// Seconds a client may leave its frames unread.
pub const CLIENT_TIMEOUT_S: Limit<f64> = Limit::new("client timeout (s)", 0.1, 3600.0, 30.0);
/// Seconds a new connection has to send its whole Hello.
pub const HANDSHAKE_TIMEOUT_S: Limit<f64> = Limit::new("handshake timeout (s)", 0.1, 60.0, 10.0);
/// Seconds a connection without a streaming session may send nothing.
pub const IDLE_TIMEOUT_S: Limit<f64> = Limit::new("idle timeout (s)", 1.0, 86400.0, 120.0);
/// Seconds a begun message has to arrive whole.
pub const MESSAGE_TIMEOUT_S: Limit<f64> = Limit::new("message timeout (s)", 0.1, 3600.0, 30.0);

/// Threads of each session, as a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LayoutSetting {
    /// Staged with at least 4 cores, else compact ([`auto_layout`]).
    #[default]
    Auto,
    /// One thread per stage.
    Staged,
    /// Three threads.
    Compact,
}

/// `lipsync serve` settings: each is a flag and a key of the `--config` TOML file (flags win).
/// Help texts name each range and default from the constants the checks read.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeOptions {
    #[arg(long, value_name = "FILE", help = "TOML file with any of the settings below (flags override it)")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "PATH", help = "Unix socket path to listen on")]
    pub socket: Option<PathBuf>,
    #[arg(
        long,
        value_name = "DIR",
        help = "Directory whose subdirectories are avatars (the name is the subdirectory's)"
    )]
    pub avatars: Option<PathBuf>,
    #[arg(long, value_name = "N", help = MAX_SESSIONS.help("Most sessions open at once (more get a `busy` error)"))]
    pub max_sessions: Option<usize>,
    #[arg(
        long,
        value_name = "MODE",
        help = "Permissions of the socket file, octal [default: 0600]; a mode that lets others write (connect) needs --allow-shared-socket"
    )]
    pub socket_mode: Option<String>,
    #[arg(long, help = "Allow a --socket-mode that gives others (not just the group) write access")]
    #[serde(default)]
    pub allow_shared_socket: bool,
    #[arg(long, value_delimiter = ',', help = "Avatars to load at start (comma-separated names, or `all`)")]
    pub preload: Option<Vec<String>>,
    #[arg(long, value_name = "MIB", help = CACHE_MB.help("Memory bound of the avatar cache (loaded templates), MiB"))]
    pub cache_mb: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub template: TemplateOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub inference: InferenceOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub remote: RemoteOptions,
    #[arg(long, value_name = "MS", help = MAX_WAIT_MS.help("Longest a frame waits for its UNet batch to fill, ms"))]
    pub max_wait_ms: Option<f64>,
    #[arg(long, value_name = "N", help = SESSION_QUEUE.help("Frames a session may have in flight before its audio intake blocks"))]
    pub session_queue: Option<usize>,
    #[arg(
        long,
        value_name = "MS",
        alias = "realtime-delay-ms",
        help = LIVE_DELAY_MS.help("Live sessions: how long after its slot on the session's clock a frame is sent, ms: room for a speech frame's image work and UNet batch")
    )]
    #[serde(alias = "realtime_delay_ms")]
    pub live_delay_ms: Option<f64>,
    #[arg(long, help = "Pinning of each session's stage threads: none, auto or a core list (0,1,2) [default: none]")]
    pub pin: Option<PinSetting>,
    #[arg(
        long,
        value_enum,
        help = "Threads of each session: staged (one per stage), compact (three) or auto (staged with at least 4 cores, else compact) [default: auto]"
    )]
    pub session_layout: Option<LayoutSetting>,
    #[arg(long, value_name = "S", help = DRAIN_TIMEOUT_S.help("Seconds to let open sessions finish after SIGTERM/SIGINT"))]
    pub drain_timeout: Option<f64>,
    #[arg(
        long,
        value_name = "S",
        help = CLIENT_TIMEOUT_S.help("Seconds a client may leave its frames unread (socket full) before its session is dropped")
    )]
    pub client_timeout: Option<f64>,
    #[arg(long, value_name = "S", help = HANDSHAKE_TIMEOUT_S.help("Seconds a new connection has to send its whole Hello"))]
    pub handshake_timeout: Option<f64>,
    #[arg(long, value_name = "S", help = IDLE_TIMEOUT_S.help("Seconds a connection without a streaming session may send nothing"))]
    pub idle_timeout: Option<f64>,
    #[arg(long, value_name = "S", help = MESSAGE_TIMEOUT_S.help("Seconds a message may take to arrive whole once it has begun"))]
    pub message_timeout: Option<f64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub http: http::HttpOptions,
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// `--provider remote` without its server.
    #[error("--provider remote needs --remote-url grpc://HOST:PORT and --remote-model NAME")]
    NoRemote,
    /// The remote inference server's URL cannot be used.
    #[error(transparent)]
    Remote(#[from] RemoteUrlError),
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
        allowed: String,
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
    /// Live sessions: delay of each frame after its slot on the clock.
    #[serde(rename = "live_delay_ms", serialize_with = "millis")]
    pub live_delay: Duration,
    /// ORT intra-op threads per UNet.
    pub intra_threads: usize,
    /// Whether ORT's threads spin.
    pub spinning: bool,
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
                    template: self.template.over(base.template),
                    inference: self.inference.over(base.inference),
                    remote: self.remote.over(base.remote),
                    http: self.http.over(base.http),
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
            max_wait_ms,
            session_queue,
            live_delay_ms,
            pin,
            session_layout,
            drain_timeout,
            client_timeout,
            handshake_timeout,
            idle_timeout,
            message_timeout
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
        let max_sessions = MAX_SESSIONS.check(self.max_sessions)?;
        let http = http::resolve(&self.http, max_connections(max_sessions))?;
        let socket = self.socket.ok_or(SettingsError::Missing("socket path", "socket", "socket"))?;
        let avatars = self.avatars.ok_or(SettingsError::Missing("avatars directory", "avatars", "avatars"))?;
        if !avatars.is_dir() {
            return Err(SettingsError::NoAvatars(avatars));
        }
        let socket_mode = socket_mode(self.socket_mode, self.allow_shared_socket)?;
        let inference = self.inference.resolve(&self.remote)?;
        let pin = self.pin.unwrap_or(PinSetting::None).policy(inference.threads);
        let session_layout = match self.session_layout.unwrap_or_default() {
            LayoutSetting::Auto => auto_layout(cpus()),
            LayoutSetting::Staged => Layout::Staged,
            LayoutSetting::Compact => Layout::Compact,
        };
        let ms = |v: f64| Duration::from_secs_f64(v / 1000.0);
        Ok(Settings {
            socket,
            avatars,
            max_sessions,
            socket_mode,
            preload: self.preload.unwrap_or_default(),
            cache_bytes: CACHE_MB.check(self.cache_mb)? << 20,
            template_cache: self.template.template_cache()?.unwrap_or(TEMPLATE_CACHE_MB.default << 20),
            jpeg_template: self.template.jpeg_template()?.unwrap_or(JPEG_TEMPLATE_MB.default << 20),
            max_batch: inference.max_batch,
            max_wait: ms(MAX_WAIT_MS.check(self.max_wait_ms)?),
            session_queue: SESSION_QUEUE.check(self.session_queue)?,
            live_delay: ms(LIVE_DELAY_MS.check(self.live_delay_ms)?),
            intra_threads: inference.threads,
            spinning: inference.spin,
            provider: inference.provider,
            precision: inference.precision,
            remote: inference.remote,
            pin,
            session_layout,
            drain_timeout: Duration::from_secs_f64(DRAIN_TIMEOUT_S.check(self.drain_timeout)?),
            client_timeout: Duration::from_secs_f64(CLIENT_TIMEOUT_S.check(self.client_timeout)?),
            handshake_timeout: Duration::from_secs_f64(HANDSHAKE_TIMEOUT_S.check(self.handshake_timeout)?),
            idle_timeout: Duration::from_secs_f64(IDLE_TIMEOUT_S.check(self.idle_timeout)?),
            message_timeout: Duration::from_secs_f64(MESSAGE_TIMEOUT_S.check(self.message_timeout)?),
            http,
        })
    }
}

/// The socket file's mode from `--socket-mode` (octal, 0600 by default); one that lets others
/// write needs `--allow-shared-socket`.
fn socket_mode(given: Option<String>, allow_shared: bool) -> Result<u32, SettingsError> {
    let mode = given.unwrap_or_else(|| "0600".into());
    let bits = u32::from_str_radix(mode.trim_start_matches("0o"), 8).ok().filter(|m| *m <= 0o777).ok_or(
        SettingsError::Invalid { name: "socket mode", value: mode.clone(), expected: "an octal permission like 0600" },
    )?;
    if bits & 0o002 != 0 && !allow_shared {
        return Err(SettingsError::Invalid {
            name: "socket mode",
            value: mode,
            expected: "a mode without write access for others (or --allow-shared-socket)",
        });
    }
    Ok(bits)
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
