//! One connection: the handshake, then a message loop (open a session, stream its audio,
//! stats and avatar management); frames go out through a [`SocketSink`] on the session's own
//! sink stage. The write half is shared and breaks for good on the first failed write.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lipsync_pipelines::job::{FrameJob, FrameKind};
use lipsync_pipelines::live::LiveConfig;
use lipsync_pipelines::runtime::{lock, PipelineError};
use lipsync_pipelines::session::{Session, SessionConfig, SessionError, SessionOutcome};
use lipsync_pipelines::stages::sink::{FrameSink, SinkError};
use lipsync_stages::audio::{check_finite, pcm_to_mono, AudioError, PcmFormat, RATE_RANGE};
use lipsync_stages::unet::Batch;
use serde::Serialize;

use crate::daemon::deadline::ReadDeadline;
use crate::daemon::registry::Loaded;
use crate::daemon::shared::Shared;
use crate::daemon::stats::stats;
use crate::daemon::steps::{step, SessionState, Step};
use crate::daemon::writer::{send_error, Writer};
use crate::protocol::{
    read_message, write_parts, AudioFormat, AvatarName, Done, ErrorCode, FrameHead, Hello, Interrupted, Kind,
    OpenRequest, Opened, SpeechStart, WireError, MAX_MESSAGE, PROTOCOL_VERSION,
};

/// Writes frames to the client.
struct SocketSink {
    writer: Writer,
    fps: f64,
    loaded: Arc<Loaded>,
    shared: Arc<Shared>,
    /// Idle frames sent (for `Done`).
    idle: Arc<AtomicU64>,
}

impl FrameSink for SocketSink {
    fn frame(&mut self, job: &FrameJob) -> Result<(), SinkError> {
        let idle = job.mark.kind == FrameKind::Idle;
        let head = FrameHead {
            index: job.index as u32,
            pts_ms: ((job.index as f64) * 1000.0 / self.fps).round() as u32,
            idle,
        };
        let fail = SinkError::Client;
        if !idle && job.mark.frame == 0 {
            let start = SpeechStart { utterance: job.mark.utterance, frame: job.index as u32 };
            self.writer.json(Kind::Speech, &start).map_err(fail)?;
        }
        self.writer.write(|s| write_parts(s, Kind::Frame, &[&head.encode(), &job.encoded])).map_err(fail)?;
        if idle {
            self.idle.fetch_add(1, Ordering::Relaxed);
            self.shared.idle_frames_total.fetch_add(1, Ordering::Relaxed);
        }
        self.loaded.frames.fetch_add(1, Ordering::Relaxed);
        self.shared.frames_total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

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
    let handshake = settings.handshake_timeout;
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
    // Handshake: the whole Hello within the handshake timeout (10 s).
    reader.get_mut().next_message(None, Some(Instant::now() + handshake));
    let result = match read_message(&mut reader, &mut payload) {
        Ok(Kind::Hello) => match serde_json::from_slice::<Hello>(&payload) {
            Ok(h) if h.protocol == PROTOCOL_VERSION => {
                let welcome = serde_json::json!({
                    "protocol": PROTOCOL_VERSION,
                    "server": format!("lipsync {}", env!("CARGO_PKG_VERSION")),
                    "max_message": MAX_MESSAGE,
                });
                match conn.writer.json(Kind::Welcome, &welcome) {
                    Ok(()) => conn.serve(&mut reader, &mut payload),
                    Err(_) => Ok(End::Eof),
                }
            }
            Ok(h) => Err(Fatal(
                ErrorCode::Version,
                format!("protocol version {} is not supported (this server speaks {PROTOCOL_VERSION})", h.protocol),
            )),
            Err(e) => Err(Fatal(ErrorCode::BadRequest, format!("invalid Hello: {e}"))),
        },
        Ok(k) => Err(Fatal(ErrorCode::Handshake, format!("expected Hello first, got {k:?}"))),
        Err(WireError::Closed) => Ok(End::Eof),
        Err(WireError::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            Err(Fatal(ErrorCode::Handshake, format!("no Hello within {} s", handshake.as_secs_f64())))
        }
        Err(e) => Err(Fatal(e.code(), e.to_string())),
    };
    let raw = reader.get_ref().get_ref();
    match result {
        Err(Fatal(code, message)) => {
            tracing::warn!(connection = id, code = code.as_str(), "{message}");
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
            Some(s) if s.audio_ended() => SessionState::Ended { realtime: s.is_realtime() },
            Some(s) => SessionState::Streaming { realtime: s.is_realtime(), stopped: s.is_stopped() },
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

    /// Interrupts the real-time session: `Interrupted` with the index the next frame takes.
    fn interrupt(&mut self) {
        let s = self.session.as_ref().expect("a real-time session");
        let id = s.live().id;
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

    fn try_open(&mut self, payload: &[u8]) -> Result<(), (ErrorCode, String)> {
        // The previous session of this connection has had its audio: let it finish first.
        if let Some(s) = self.session.take() {
            s.wait();
        }
        let req: OpenRequest =
            serde_json::from_slice(payload).map_err(|e| (ErrorCode::BadRequest, format!("invalid Open: {e}")))?;
        if req.channels == 0 || req.channels > 32 {
            return Err((ErrorCode::BadRequest, format!("{} channels is not in 1..=32", req.channels)));
        }
        if !RATE_RANGE.contains(&req.sample_rate) {
            return Err((
                ErrorCode::BadRequest,
                format!(
                    "sample rate {} Hz is out of range: expected {}..={}",
                    req.sample_rate,
                    RATE_RANGE.start(),
                    RATE_RANGE.end()
                ),
            ));
        }
        let sh = self.shared;
        if sh.draining.load(Ordering::SeqCst) {
            return Err((ErrorCode::ShuttingDown, "the daemon is shutting down".into()));
        }
        let max = sh.registry.settings.max_sessions;
        if sh.active.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1)).is_err() {
            return Err((ErrorCode::Busy, format!("the daemon is serving its maximum of {max} sessions; retry later")));
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
        let max_batch = loaded.unet.max_batch().get();
        // A session cannot have more frames in one run than it may have in flight.
        let batch = req.batch.unwrap_or(max_batch.min(sh.registry.settings.session_queue));
        let quality = req.jpeg_quality.unwrap_or(loaded.avatar.config.jpeg_quality);
        let batch = match Batch::new(batch) {
            Ok(b) if b.get() <= max_batch && (1..=100).contains(&quality) => b,
            _ => {
                release(sh, Some(&loaded));
                return Err((
                    ErrorCode::BadRequest,
                    format!("batch {batch} must be in 1..={max_batch} and JPEG quality {quality} in 1..=100"),
                ));
            }
        };
        let id = sh.next_id.fetch_add(1, Ordering::SeqCst);
        let fps = loaded.avatar.config.fps;
        let cfg = SessionConfig {
            id,
            name: loaded.name.clone(),
            avatar: loaded.avatar.clone(),
            template: loaded.template.clone(),
            template_cache: sh.registry.settings.template_cache,
            jpeg_template: loaded.jpeg.clone(),
            encoder: loaded.encoder.clone(),
            unet: loaded.unet.clone(),
            sample_rate: req.sample_rate,
            jpeg_quality: quality,
            batch,
            queue: sh.registry.settings.session_queue.max(batch.get()),
            start_frame: req.start_frame.unwrap_or(loaded.avatar.config.start_frame),
            pin: sh.registry.settings.pin.clone(),
            layout: sh.registry.settings.session_layout,
            shared: sh.stages.clone(),
            live: req.realtime.then_some(LiveConfig { fps, delay: sh.registry.settings.realtime_delay }),
        };
        let idle = Arc::new(AtomicU64::new(0));
        let sink = SocketSink {
            writer: self.writer.clone(),
            fps,
            loaded: loaded.clone(),
            shared: sh.clone(),
            idle: idle.clone(),
        };
        let on_finish = {
            let writer = self.writer.clone();
            let shared = sh.clone();
            let loaded = loaded.clone();
            Box::new(move |r: Result<SessionOutcome, PipelineError>| {
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
                        let idle_frames = idle.load(Ordering::Relaxed);
                        let _ = writer.json(Kind::Done, &Done { session: id, frames: out.frames, idle_frames });
                    }
                    Err(e) if e.is_cancelled() => tracing::info!(session = id, "session cancelled"),
                    Err(e) => {
                        shared.sessions_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(session = id, "session failed: {e}");
                        send_error(&writer, ErrorCode::Session, &e);
                    }
                }
                // Draining waits for this: the last message is out.
                shared.finishing.fetch_sub(1, Ordering::SeqCst);
            })
        };
        // The write half is held until `Opened` is out: a real-time session's clock starts with
        // the session, and its first frame must not come before `Opened`.
        let mut held = self.writer.hold();
        // Held across the start, so that a session that ends at once is removed after it is added.
        let mut live = lock(&sh.sessions);
        sh.finishing.fetch_add(1, Ordering::SeqCst);
        let session = match Session::start(cfg, Box::new(sink), on_finish) {
            Ok(s) => s,
            Err(e) => {
                sh.finishing.fetch_sub(1, Ordering::SeqCst);
                release(sh, Some(&loaded));
                return Err((ErrorCode::Session, e.to_string()));
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
        self.received = 0;
        let (width, height) = loaded.template.size();
        tracing::info!(session = id, avatar = %req.avatar, rate = req.sample_rate, "session open");
        let delay_ms = if req.realtime { sh.registry.settings.realtime_delay.as_secs_f64() * 1e3 } else { 0.0 };
        let _ = held.json(Kind::Opened, &Opened { session: id, fps, width, height, realtime: req.realtime, delay_ms });
        drop(held);
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
