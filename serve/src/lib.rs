//! The lipsync daemon (`lipsync serve`) as a library: many sessions stream audio in over a Unix
//! socket and get frames back, each session being the one stage graph of
//! [`lipsync_pipelines::graph`] with a socket source and a socket sink.
//!
//! - [`protocol`]: the wire format (docs/protocol.md) and its error codes.
//! - [`settings`]: every setting declared once (flags and TOML), validated once.
//! - [`daemon`]: the daemon itself: listener, connections, avatar registry, stats, the HTTP
//!   side; [`Daemon`] runs one in-process.
//! - [`client`]: the client library (streamed and live sessions, `bench` rounds, frame
//!   outputs).
//! - [`fuzzing`]: entry points for the fuzzer (protocol, audio decoder, avatar formats).
//!
//! Threads: a daemon runs one thread per connection (at most `4 * max_sessions + 16`), six
//! stage threads and a supervisor per open session (at most `max_sessions`), plus a source
//! thread (the clock) per live session, and one batcher thread per UNet model (plus ONNX
//! Runtime's intra-op pool): at most `12 * max_sessions + 16 + models` threads, whatever the
//! load. Stage threads are pinned as
//! `--pin` says (none by default).

pub mod client;
pub mod daemon;
pub mod fuzzing;
pub mod protocol;
pub mod settings;

pub use daemon::{run, Daemon, ServeError};
pub use settings::{ServeOptions, Settings, SettingsError};
