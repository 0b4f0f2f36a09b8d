//! The write half of a connection: shared by its reader and its session's sink stage, broken
//! for good by the first failed or timed-out write.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lipsync_pipelines::runtime::lock;
use serde::Serialize;

use crate::daemon::deadline::WriteDeadline;
use crate::protocol::{write_json, ErrorCode, ErrorReply, Kind};

/// The write half of a connection, shared by the reader and the session's output stage. The
/// first failed or timed-out write (possibly after part of a message) breaks it for good: the
/// socket is shut down, so the client never sees a torn message followed by more.
#[derive(Clone)]
pub(crate) struct Writer(Arc<Mutex<WriteHalf>>);

pub(crate) struct WriteHalf {
    stream: UnixStream,
    broken: bool,
    timeout: Duration,
}

impl WriteHalf {
    /// Writes a JSON message on a held write half (see [`Writer::hold`]), breaking it on failure.
    pub(crate) fn json(&mut self, kind: Kind, value: &impl Serialize) -> std::io::Result<()> {
        if self.broken {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the connection was closed"));
        }
        let r = write_json(&mut WriteDeadline::new(&mut self.stream, self.timeout), kind, value);
        if r.is_err() {
            self.broken = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
        r
    }
}

impl Writer {
    /// A client that leaves a message unread for `timeout` (in all, however it trickles)
    /// loses its connection.
    pub(crate) fn new(stream: UnixStream, timeout: Duration) -> Self {
        Self(Arc::new(Mutex::new(WriteHalf { stream, broken: false, timeout })))
    }

    /// Runs `f` on the stream unless the connection is broken; breaks it if `f` fails or does
    /// not finish within the timeout.
    pub(crate) fn write(&self, f: impl FnOnce(&mut WriteDeadline<'_>) -> std::io::Result<()>) -> std::io::Result<()> {
        let mut w = lock(&self.0);
        if w.broken {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the connection was closed"));
        }
        let timeout = w.timeout;
        let r = f(&mut WriteDeadline::new(&mut w.stream, timeout));
        if r.is_err() {
            w.broken = true;
            let _ = w.stream.shutdown(std::net::Shutdown::Both);
        }
        r
    }

    pub(crate) fn json(&self, kind: Kind, value: &impl Serialize) -> std::io::Result<()> {
        self.write(|s| write_json(s, kind, value))
    }

    /// Holds the write half: nothing else (a new session's first frame) is written until the
    /// guard is dropped.
    pub(crate) fn hold(&self) -> std::sync::MutexGuard<'_, WriteHalf> {
        lock(&self.0)
    }

    /// Closes both directions: blocked writes and reads on the connection return at once.
    pub(crate) fn close(&self) {
        let _ = self.0.lock().unwrap_or_else(|p| p.into_inner()).stream.shutdown(std::net::Shutdown::Both);
    }

    /// Like [`Writer::close`], without waiting for a write in progress (which then fails).
    pub(crate) fn close_now(&self, raw: &UnixStream) {
        let _ = raw.shutdown(std::net::Shutdown::Both);
        if let Ok(mut w) = self.0.try_lock() {
            w.broken = true;
        }
    }

    /// Sends an error, then closes. If a frame write holds the connection for more than a
    /// moment (a client that does not read), closes at once instead: the error cannot be put
    /// after a frame that is half sent.
    pub(crate) fn error_then_close(&self, raw: &UnixStream, code: ErrorCode, message: &str) {
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            match self.0.try_lock() {
                Ok(mut w) => {
                    if !w.broken {
                        let reply = ErrorReply { code, message: message.to_string() };
                        let mut out = WriteDeadline::new(&mut w.stream, Duration::from_secs(1));
                        let _ = write_json(&mut out, Kind::Error, &reply);
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

pub(crate) fn send_error(w: &Writer, code: ErrorCode, message: impl std::fmt::Display) {
    let reply = ErrorReply { code, message: message.to_string() };
    let _ = w.json(Kind::Error, &reply);
}
