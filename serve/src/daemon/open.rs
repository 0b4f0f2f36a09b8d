//! Opening a session on a connection: the request checked, a slot among the daemon's sessions
//! and the avatar claimed, the session's graph configured and started with a sink that writes
//! its frames to the client, and `Opened` sent before its first frame.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lipsync_pipelines::graph::sink::{FrameSink, SinkError};
use lipsync_pipelines::job::{FrameJob, FrameKind};
use lipsync_pipelines::live::LiveConfig;
use lipsync_pipelines::runtime::{lock, PipelineError};
use lipsync_pipelines::session::{OnFinish, Session, SessionConfig, SessionOutcome};
use lipsync_stages::audio::RATE_RANGE;
use lipsync_stages::unet::Batch;

use crate::daemon::registry::Loaded;
use crate::daemon::shared::Shared;
use crate::daemon::writer::{send_error, Writer};
use crate::protocol::{write_parts, Done, ErrorCode, FrameHead, Kind, OpenRequest, Opened, SpeechStart};

/// Why an Open was refused: the error reply's code and text (the connection stays open).
pub(super) type Refusal = (ErrorCode, String);

/// An Open request, checked.
pub(super) fn parse(payload: &[u8]) -> Result<OpenRequest, Refusal> {
    let req: OpenRequest =
        serde_json::from_slice(payload).map_err(|e| (ErrorCode::BadRequest, format!("invalid Open: {e}")))?;
    if req.channels == 0 || req.channels > 32 {
        return Err((ErrorCode::BadRequest, format!("{} channels is not in 1..=32", req.channels)));
    }
    if !RATE_RANGE.contains(&req.sample_rate) {
        let (lo, hi) = (RATE_RANGE.start(), RATE_RANGE.end());
        let why = format!("sample rate {} Hz is out of range: expected {lo}..={hi}", req.sample_rate);
        return Err((ErrorCode::BadRequest, why));
    }
    Ok(req)
}

/// Gives back a session's slot, and its count on its avatar.
fn release(sh: &Shared, loaded: Option<&Loaded>) {
    if let Some(l) = loaded {
        l.sessions.fetch_sub(1, Ordering::SeqCst);
    }
    sh.active.fetch_sub(1, Ordering::SeqCst);
}

/// A slot among the daemon's sessions, and the avatar once acquired: given back when dropped,
/// unless the session started (its end gives them back).
struct Claim<'a> {
    shared: &'a Arc<Shared>,
    loaded: Option<Arc<Loaded>>,
    started: bool,
}

impl<'a> Claim<'a> {
    /// A slot, unless the daemon is draining or serving its maximum.
    fn new(shared: &'a Arc<Shared>) -> Result<Self, Refusal> {
        if shared.draining.load(Ordering::SeqCst) {
            return Err((ErrorCode::ShuttingDown, "the daemon is shutting down".into()));
        }
        let max = shared.registry.settings.max_sessions;
        if shared.active.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1)).is_err() {
            return Err((ErrorCode::Busy, format!("the daemon is serving its maximum of {max} sessions; retry later")));
        }
        Ok(Self { shared, loaded: None, started: false })
    }

    /// The avatar, loaded if needed, with this session counted on it.
    fn avatar(&mut self, name: &str) -> Result<Arc<Loaded>, Refusal> {
        let l = self.shared.registry.acquire(name, true).map_err(|e| (e.code(), e.to_string()))?;
        self.loaded = Some(l.clone());
        Ok(l)
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.started {
            release(self.shared, self.loaded.as_deref());
        }
    }
}

/// The session's graph for `req` on `loaded`.
fn session_config(sh: &Shared, loaded: &Loaded, req: &OpenRequest, id: u64) -> Result<SessionConfig, Refusal> {
    let settings = &sh.registry.settings;
    let max_batch = loaded.unet.max_batch().get();
    // A session cannot have more frames in one run than it may have in flight.
    let batch = req.batch.unwrap_or(max_batch.min(settings.session_queue));
    let quality = req.jpeg_quality.unwrap_or(loaded.avatar.config.jpeg_quality);
    let batch = match Batch::new(batch) {
        Ok(b) if b.get() <= max_batch && (1..=100).contains(&quality) => b,
        _ => {
            let why = format!("batch {batch} must be in 1..={max_batch} and JPEG quality {quality} in 1..=100");
            return Err((ErrorCode::BadRequest, why));
        }
    };
    let fps = loaded.avatar.config.fps;
    Ok(SessionConfig {
        id,
        name: loaded.name.clone(),
        avatar: loaded.avatar.clone(),
        template: loaded.template.clone(),
        template_cache: settings.template_cache,
        jpeg_template: loaded.jpeg.clone(),
        encoder: loaded.encoder.clone(),
        unet: loaded.unet.clone(),
        sample_rate: req.sample_rate,
        jpeg_quality: quality,
        batch,
        queue: settings.session_queue.max(batch.get()),
        start_frame: req.start_frame.unwrap_or(loaded.avatar.config.start_frame),
        pin: settings.pin.clone(),
        layout: settings.session_layout,
        shared: sh.stages.clone(),
        live: req.realtime.then_some(LiveConfig { fps, delay: settings.live_delay }),
    })
}

/// What runs when session `id` ends: its slot given back first (a client that reads `Done` may
/// open the next session at once), then `Done` or the error, then the drain told.
fn on_finish(writer: Writer, shared: Arc<Shared>, loaded: Arc<Loaded>, id: u64, idle: Arc<AtomicU64>) -> OnFinish {
    Box::new(move |r: Result<SessionOutcome, PipelineError>| {
        lock(&shared.sessions).remove(&id);
        release(&shared, Some(&loaded));
        match r {
            Ok(out) => {
                let (p50_ms, p99_ms) = (out.latency.p50, out.latency.p99);
                tracing::info!(session = id, frames = out.frames, p50_ms, p99_ms, "session done");
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
}

/// Opens the session `req` asks for, its frames written by `writer`; `Opened` is out before
/// its first frame.
pub(super) fn open(sh: &Arc<Shared>, writer: &Writer, req: &OpenRequest) -> Result<Session, Refusal> {
    let mut claim = Claim::new(sh)?;
    let loaded = claim.avatar(&req.avatar)?;
    let id = sh.next_id.fetch_add(1, Ordering::SeqCst);
    let cfg = session_config(sh, &loaded, req, id)?;
    let fps = loaded.avatar.config.fps;
    let idle = Arc::new(AtomicU64::new(0));
    let sink =
        SocketSink { writer: writer.clone(), fps, loaded: loaded.clone(), shared: sh.clone(), idle: idle.clone() };
    let finish = on_finish(writer.clone(), sh.clone(), loaded.clone(), id, idle);
    // The write half is held until `Opened` is out: a live session's clock starts with
    // the session, and its first frame must not come before `Opened`.
    let mut held = writer.hold();
    // Held across the start, so that a session that ends at once is removed after it is added.
    let mut live = lock(&sh.sessions);
    sh.finishing.fetch_add(1, Ordering::SeqCst);
    let session = match Session::start(cfg, Box::new(sink), finish) {
        Ok(s) => s,
        Err(e) => {
            sh.finishing.fetch_sub(1, Ordering::SeqCst);
            return Err((ErrorCode::Session, e.to_string()));
        }
    };
    claim.started = true;
    live.insert(id, session.counters().clone());
    drop(live);
    sh.sessions_total.fetch_add(1, Ordering::Relaxed);
    let (width, height) = loaded.template.size();
    tracing::info!(session = id, avatar = %req.avatar, rate = req.sample_rate, "session open");
    let delay_ms = if req.realtime { sh.registry.settings.live_delay.as_secs_f64() * 1e3 } else { 0.0 };
    let _ = held.json(Kind::Opened, &Opened { session: id, fps, width, height, realtime: req.realtime, delay_ms });
    Ok(session)
}

/// Writes a session's frames to its client.
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
