//! The lipsync daemon (`lipsync serve`) as a library: many sessions stream audio in over a Unix
//! socket and get frames back, each session being the one stage graph of
//! [`lipsync_pipelines::graph`] with a socket source and a socket sink.
//!
//! - [`protocol`]: the wire format (docs/protocol.md) and its error codes.
//! - [`settings`]: every setting declared once (flags and TOML), validated once.
//! - [`registry`]: avatars (LRU cache bounded in memory) and the models they share.
//! - [`listener`]: bind, accept, drain; [`Daemon`] runs one in-process; `shared`: what the
//!   daemon's threads share; `error`: [`ServeError`].
//! - `connection`: one connection's state machine.
//! - [`stats`]: the `Stats` reply; `metrics`: the same and more for Prometheus on the `http`
//!   listener (`--http`: Host, Origin and token checked, connections capped and timed; `fds`
//!   sizes its cap so that the Unix socket always has descriptors; docs/security.md).
//! - [`client`]: the client library ([`client_live`]: real-time sessions); [`bench`]: rounds of concurrent sessions, measured.
//! - [`fuzzing`]: entry points for the fuzzer (protocol, audio decoder, avatar formats).
//!
//! Threads: a daemon runs one thread per connection (at most `4 * max_sessions + 16`), six
//! stage threads and a supervisor per open session (at most `max_sessions`), plus a source
//! thread (the clock) per real-time session, and one batcher thread per UNet model (plus ONNX
//! Runtime's intra-op pool): at most `12 * max_sessions + 16 + models` threads, whatever the
//! load. Stage threads are pinned as
//! `--pin` says (none by default).

pub mod bench;
pub mod client;
pub mod client_live;
mod connection;
mod deadline;
mod error;
mod fds;
pub mod frame_out;
pub mod fuzzing;
mod http;
mod http_stats;
pub mod listener;
mod metrics;
pub mod protocol;
pub mod registry;
pub mod settings;
mod shared;
pub mod stats;
mod writer;

pub use error::ServeError;
pub use listener::{run, Daemon};
pub use settings::{ServeOptions, Settings, SettingsError};
