//! Why the daemon could not run.

use std::path::PathBuf;

use crate::daemon::registry::RegistryError;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A file that is not a regular file sits where the lock file goes.
    #[error("{0} exists and is not a regular file")]
    LockNotAFile(PathBuf),
    /// Another daemon holds the lock of this socket path.
    #[error("another daemon is starting or running on {socket} (it holds {lock})")]
    Locked {
        /// The socket path.
        socket: PathBuf,
        /// Its lock file.
        lock: PathBuf,
    },
    /// A file that is not a socket sits at the socket path.
    #[error("{0} exists and is not a socket: refusing to replace it")]
    NotASocket(PathBuf),
    /// Another daemon answers on the socket path.
    #[error("another daemon is listening on {0}")]
    InUse(PathBuf),
    /// The in-process daemon's thread ended before it listened.
    #[error("the daemon stopped during start-up")]
    StoppedAtStart,
    /// The in-process daemon's thread panicked.
    #[error("the daemon panicked")]
    Panicked,
    /// The socket could not be bound or set up.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP listener could not start.
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A setting that this machine cannot honour (the descriptor limit).
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    /// An avatar named by `preload` could not be loaded.
    #[error("preloading avatar `{name}`: {source}")]
    Preload {
        /// The avatar.
        name: String,
        /// Why.
        source: RegistryError,
    },
}
