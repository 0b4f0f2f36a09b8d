//! One connection: the handshake, then a message loop (open a session, stream its audio,
//! stats and avatar management; what each message does in each state is `steps`, how a session
//! opens is `open`). The write half is shared and breaks for good on the first failed write.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lipsync_pipelines::runtime::lock;
use lipsync_pipelines::session::{Session, SessionError};
use lipsync_stages::audio::{check_finite, pcm_to_mono, AudioError, PcmFormat};
use serde::Serialize;

use crate::daemon::deadline::ReadDeadline;
use crate::daemon::open::{self, Refusal};
use crate::daemon::shared::Shared;
use crate::daemon::stats::stats;
use crate::daemon::steps::{step, SessionState, Step};
use crate::daemon::writer::{send_error, Writer};
use crate::protocol::{
    read_message, AudioFormat, AvatarName, ErrorCode, Hello, Interrupted, Kind, WireError, MAX_MESSAGE,
    PROTOCOL_VERSION,
};

/// How often a quiet connection with a streaming session checks whether it has finished.
const STREAMING_POLL: Duration = Duration::from_secs(1);

/// Payload capacity a connection keeps between messages.
const KEEP_PAYLOAD: usize = 1 << 20;

/// Audio handed to a session at once, ms: a huge Audio message is split so that the session's
/// buffers (and the time it holds the shared encoder) stay small.
const AUDIO_PIECE_MS: usize = 250;

/// Reasons a connection is closed after an error reply.
struct Fatal(ErrorCode, String);

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
    /// Mono samples received in the current session (to name a bad one).
    received: usize,
}

/// How a connection's message loop ended.
enum End {
    /// The client closed its side.
    Eof,
    /// The client sent `Close`.
    Close,
}

/// Serves one connection until it closes.
pub(crate) fn connection(shared: &Arc<Shared>, id: u64, stream: UnixStream) {
    let writer = match stream.try_clone() {
        Ok(w) => Writer::new(w, shared.registry.settings.client_timeout),
        Err(e) => {
            tracing::warn!("connection {id}: {e}");
            return;
        }
    };
    if let Some(entry) = lock(&shared.connections).get_mut(&id) {
        entry.1 = Some(writer.clone());
    }
    let settings = &shared.registry.settings;
    let mut reader = std::io::BufReader::with_capacity(64 << 10, ReadDeadline::new(stream, settings.message_timeout));
    let mut conn = Conn {
        shared,
        writer,
        session: None,
        format: PcmFormat::S16Le,
        channels: 1,
        rate: 16_000,
        scratch: Vec::new(),
        mono: Vec::new(),
        received: 0,
    };
    let mut payload = Vec::new();
    let result = conn.handshake(&mut reader, &mut payload).and_then(|greeted| match greeted {
        true => conn.serve(&mut reader, &mut payload),
        false => Ok(End::Eof),
    });
    conn.end(id, result, reader.get_ref().get_ref());
    if let Some(session) = conn.session.take() {
        session.wait();
    }
    conn.writer.close();
}

impl Conn<'_> {
    /// The whole Hello within the handshake timeout, answered by Welcome: `Ok(false)` if the
    /// client left first (or could not be answered).
    fn handshake(
        &mut self,
        reader: &mut std::io::BufReader<ReadDeadline>,
        payload: &mut Vec<u8>,
    ) -> Result<bool, Fatal> {
        let handshake = self.shared.registry.settings.handshake_timeout;
        reader.get_mut().next_message(None, Some(Instant::now() + handshake));
        match read_message(reader, payload) {
            Ok(Kind::Hello) => match serde_json::from_slice::<Hello>(payload) {
                Ok(h) if h.protocol == PROTOCOL_VERSION => {
                    let welcome = serde_json::json!({
                        "protocol": PROTOCOL_VERSION,
                        "server": format!("lipsync {}", env!("CARGO_PKG_VERSION")),
                        "max_message": MAX_MESSAGE,
                    });
                    Ok(self.writer.json(Kind::Welcome, &welcome).is_ok())
                }
                Ok(h) => Err(Fatal(
                    ErrorCode::Version,
                    format!("protocol version {} is not supported (this server speaks {PROTOCOL_VERSION})", h.protocol),
                )),
                Err(e) => Err(Fatal(ErrorCode::BadRequest, format!("invalid Hello: {e}"))),
            },
            Ok(k) => Err(Fatal(ErrorCode::Handshake, format!("expected Hello first, got {k:?}"))),
            Err(WireError::Closed) => Ok(false),
            Err(WireError::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                Err(Fatal(ErrorCode::Handshake, format!("no Hello within {} s", handshake.as_secs_f64())))
            }
            Err(e) => Err(Fatal(e.code(), e.to_string())),
        }
    }

    /// Ends connection `id` as its message loop ended: after a fatal error the session stops
    /// first (no more frames), then the error goes out, then the connection closes; a client
    /// that half-closed after `EndAudio` still gets its last frames and `Done`.
    fn end(&mut self, id: u64, result: Result<End, Fatal>, raw: &UnixStream) {
        match result {
            Err(Fatal(code, message)) => {
                tracing::warn!(connection = id, code = code.as_str(), "{message}");
                if let Some(s) = &self.session {
                    s.cancel();
                }
                self.writer.error_then_close(raw, code, &message);
            }
            Ok(End::Close) => {
                if let Some(s) = &self.session {
                    s.cancel();
                }
                self.writer.close_now(raw);
            }
            Ok(End::Eof) => match &self.session {
                // If the client is gone altogether, the next write fails and frees the session.
                Some(s) if s.audio_ended() && !s.is_stopped() => {}
                Some(s) => {
                    s.cancel();
                    self.writer.close_now(raw);
                }
                None => {}
            },
        }
    }

    fn serve(&mut self, reader: &mut std::io::BufReader<ReadDeadline>, payload: &mut Vec<u8>) -> Result<End, Fatal> {
        let settings = &self.shared.registry.settings;
        let (idle, message) = (settings.idle_timeout, settings.message_timeout);
        let mut quiet_since = Instant::now();
        loop {
            // While a session streams, the client may be quiet (it reads frames): the read then
            // wakes every second to see whether the session has finished. Otherwise a connection
            // may idle only so long. A message, once begun (its first bytes possibly already
            // buffered), must arrive whole in time.
            let streaming = self.session.as_ref().is_some_and(|s| !s.is_finished());
            let now = Instant::now();
            let wake = if streaming { now + STREAMING_POLL } else { quiet_since + idle };
            let begun = !reader.buffer().is_empty();
            reader.get_mut().next_message(Some(wake), begun.then(|| now + message));
            // One big message does not pin its buffer for the rest of the connection.
            if payload.capacity() > KEEP_PAYLOAD {
                payload.clear();
                payload.shrink_to(KEEP_PAYLOAD);
            }
            let kind = match read_message(reader, payload) {
                Ok(k) => {
                    quiet_since = Instant::now();
                    k
                }
                Err(WireError::Closed) => return Ok(End::Eof),
                Err(WireError::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    if streaming && !reader.get_ref().in_message() {
                        // Nothing read: look at the session again.
                        quiet_since = Instant::now();
                        continue;
                    }
                    let why = if reader.get_ref().in_message() {
                        format!("a message was not complete within {} s", message.as_secs_f64())
                    } else {
                        format!("no message for {} s", idle.as_secs_f64())
                    };
                    return Err(Fatal(ErrorCode::Timeout, why));
                }
                Err(e) => return Err(Fatal(e.code(), e.to_string())),
            };
            self.step(kind, payload)?;
            if kind == Kind::Close {
                return Ok(End::Close);
            }
        }
    }

    /// Where this connection's session stands.
    fn state(&self) -> SessionState {
        match &self.session {
            None => SessionState::None,
            Some(s) if s.audio_ended() => SessionState::Ended { live: s.is_live() },
            Some(s) => SessionState::Streaming { live: s.is_live(), stopped: s.is_stopped() },
        }
    }

    /// Does what message `kind` (its payload in `payload`) does in the session's state.
    fn step(&mut self, kind: Kind, payload: &[u8]) -> Result<(), Fatal> {
        match step(self.state(), kind) {
            Step::Open => self.open(payload),
            Step::Audio => self.audio(payload)?,
            end @ (Step::EndUtterance | Step::EndAudio) => {
                let s = self.session.as_mut().expect("a streaming session");
                let r = if end == Step::EndUtterance { s.end_utterance() } else { s.end_audio() };
                match r {
                    Ok(()) => {}
                    Err(SessionError::Ended) => {
                        return Err(Fatal(ErrorCode::NoSession, format!("{kind:?} after the audio was already ended")))
                    }
                    // The session failed: its error reply is on its way.
                    Err(_) => {}
                }
            }
            Step::Interrupt => self.interrupt(),
            Step::Close => {}
            Step::Stats => self.reply(Kind::Stats, &stats(self.shared)),
            Step::ListAvatars => {
                self.reply(Kind::Avatars, &serde_json::json!({ "avatars": self.shared.registry.list() }))
            }
            Step::Avatar { load } => self.avatar(load, payload)?,
            Step::Refuse(code, message) => send_error(&self.writer, code, message),
            Step::Fatal(code, message) => return Err(Fatal(code, message)),
        }
        Ok(())
    }

    /// Loads (`load`) or unloads the avatar that `payload` names.
    fn avatar(&mut self, load: bool, payload: &[u8]) -> Result<(), Fatal> {
        let name: AvatarName = serde_json::from_slice(payload)
            .map_err(|e| Fatal(ErrorCode::BadRequest, format!("expected {{\"name\": ...}}: {e}")))?;
        let registry = &self.shared.registry;
        let r = if load {
            registry
                .acquire(&name.name, false)
                .map(|l| serde_json::json!({"loaded": name.name, "memory_bytes": l.memory, "frames": l.template.len()}))
        } else {
            registry.unload(&name.name).map(|was| serde_json::json!({"unloaded": name.name, "was_loaded": was}))
        };
        match r {
            Ok(v) => self.reply(Kind::Ok, &v),
            Err(e) => send_error(&self.writer, e.code(), e),
        }
        Ok(())
    }

    /// Interrupts the live session: `Interrupted` with the index the next frame takes.
    fn interrupt(&mut self) {
        let s = self.session.as_ref().expect("a live session");
        let id = s.counters().id;
        // An error: the session failed, and its error reply is on its way.
        if let Ok(next) = s.interrupt() {
            self.reply(Kind::Interrupted, &Interrupted { session: id, next_frame: next as u64 });
        }
    }

    fn reply(&self, kind: Kind, value: &impl Serialize) {
        let _ = self.writer.json(kind, value);
    }

    /// A failed Open gets an error reply and leaves the connection open, without a session.
    fn open(&mut self, payload: &[u8]) {
        if let Err((code, message)) = self.try_open(payload) {
            send_error(&self.writer, code, message);
        }
    }

    fn try_open(&mut self, payload: &[u8]) -> Result<(), Refusal> {
        // The previous session of this connection has had its audio: let it finish first.
        if let Some(s) = self.session.take() {
            s.wait();
        }
        let req = open::parse(payload)?;
        let session = open::open(self.shared, &self.writer, &req)?;
        self.format = match req.format {
            AudioFormat::S16le => PcmFormat::S16Le,
            AudioFormat::F32le => PcmFormat::F32Le,
        };
        self.channels = req.channels as usize;
        self.rate = req.sample_rate;
        self.received = 0;
        self.session = Some(session);
        Ok(())
    }

    /// Feeds the streaming session the audio in `payload`.
    fn audio(&mut self, payload: &[u8]) -> Result<(), Fatal> {
        let s = self.session.as_ref().expect("a streaming session");
        let frame_bytes = self.format.sample_bytes() * self.channels;
        if payload.len() % frame_bytes != 0 {
            let e = AudioError::PartialFrame { format: self.format.name(), frame_bytes, len: payload.len() };
            return Err(Fatal(ErrorCode::BadAudio, e.to_string()));
        }
        // In pieces of at most a quarter second (and 64 Ki sample frames).
        let piece = (self.rate as usize * AUDIO_PIECE_MS / 1000).clamp(1, 1 << 16) * frame_bytes;
        for chunk in payload.chunks(piece) {
            self.mono.clear();
            pcm_to_mono(chunk, self.format, self.channels, &mut self.scratch, &mut self.mono)
                .map_err(|e| Fatal(ErrorCode::BadAudio, e.to_string()))?;
            check_finite(&self.mono, self.received, self.rate)
                .map_err(|e| Fatal(ErrorCode::BadAudio, e.to_string()))?;
            self.received += self.mono.len();
            // Blocks while the session's queue is full: that is the client's backpressure. A
            // stopped session has sent (or is sending) its error; its audio is dropped.
            if s.push_audio(&self.mono).is_err() {
                break;
            }
        }
        Ok(())
    }
}
