//! The streaming topology behind `lipsync serve`: one [`Session`] per client stream, and one
//! shared [`UnetService`] per UNet model that batches frames across sessions.
//!
//! ```text
//!                 (per session)                          (shared)            (per session)
//! audio in -> audio (resample, mel, windows, encoder, F) -> prep -> [UnetService] -> output -> sink
//! ```
//!
//! - Frames leave `audio` as soon as their audio is final (SPEC streaming rule), so for the same
//!   samples a session produces exactly the frames of the offline render, bit for bit (the
//!   encoder and the UNet are batch-invariant on the CPU).
//! - Each session owns a fixed pool of frame jobs (its credits). A job is taken before prep and
//!   returned after the sink has written the frame, so a client that does not read its frames
//!   stalls only its own prep, then its audio stage, then its audio intake
//!   ([`Session::push_audio`] blocks). The UNet service never blocks on a session: each
//!   session's reply channel has room for all of its jobs.
//! - The UNet service collects requests until it has `max_batch` frames or the oldest has
//!   waited `max_wait`, taking at most a session's own `batch` frames per run, so more sessions
//!   mean bigger batches, not more model copies.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use hdrhistogram::Histogram;
use lipsync_stages::audio::{StreamResampler, SAMPLE_RATE};
use lipsync_stages::avatar::{Avatar, CropParams};
use lipsync_stages::face::{input_len, output_len, template_index, template_len, Blend, Compositor, FacePrep};
use lipsync_stages::features::{
    AudioEncoder, FeatureAssembler, WindowTracker, FEATURE_DIM, FRAME_AUDIO_LEN, WINDOW_LEN,
};
use lipsync_stages::frame::BgrFrame;
use lipsync_stages::image_io::JpegEncoder;
use lipsync_stages::mel::{MelSpectrogram, N_MELS};
use lipsync_stages::onnx::{ModelIo, OrtRuntime, SessionOptions};
use lipsync_stages::template::SharedTemplate;
use lipsync_stages::unet::{Provider, Unet, UnetError};

use crate::metrics::{histogram, Clock, Percentiles};
use crate::runtime::{panic_message, send_unless_cancelled, PinPolicy, Pipeline, PipelineError, Pool, StageError};

/// Errors of the streaming topology.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The UNet could not be opened.
    #[error("cannot open the UNet service: {0}")]
    Unet(String),
    /// A setting is out of range.
    #[error("{0}")]
    Config(String),
    /// The session has stopped (failed, cancelled or finished); no more audio is taken.
    #[error("the session has stopped")]
    Stopped,
    /// The audio stream was already ended.
    #[error("audio was already ended for this session")]
    Ended,
    /// The session's threads could not start.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

/// One frame on its way through a session: taken from the session's pool before prep, back
/// to it after the sink.
pub struct SessionJob {
    /// Output frame index.
    pub index: usize,
    /// Template frame used.
    pub template: usize,
    /// The frame being built.
    pub frame: BgrFrame,
    /// The 328 crop, kept for paste-back.
    pub c328: Vec<u8>,
    /// UNet image input (`[6, S, S]`).
    pub input: Vec<f32>,
    /// UNet audio input (`[32, 16, 16]`).
    pub audio: Vec<f32>,
    /// UNet output (`[3, S, S]`).
    pub output: Vec<f32>,
    /// When the audio that made this frame final reached the session.
    pub t_audio: quanta::Instant,
}

/// What the UNet service sends back: the job with its output filled, or why it failed.
pub type UnetReply = Result<SessionJob, (usize, String)>;

/// A frame waiting for the UNet.
pub struct UnetRequest {
    job: SessionJob,
    reply: Sender<UnetReply>,
    session: u64,
    limit: usize,
    cancel: Arc<AtomicBool>,
    arrived: Instant,
}

/// Settings of a [`UnetService`].
#[derive(Debug, Clone)]
pub struct UnetServiceConfig {
    /// Most frames per UNet run (1..=32).
    pub max_batch: usize,
    /// Longest the oldest waiting frame waits for a batch to fill.
    pub max_wait: Duration,
    /// ONNX Runtime intra-op threads.
    pub intra_threads: usize,
    /// Whether ORT threads spin.
    pub spinning: bool,
    /// Execution provider.
    pub provider: Provider,
}

/// Counters of a [`UnetService`].
pub struct UnetStats {
    /// Runs per batch size (index = size).
    pub sizes: Vec<AtomicU64>,
    /// Service time per run (ns).
    pub service: Mutex<Histogram<u64>>,
}

impl UnetStats {
    /// UNet runs so far.
    pub fn batches(&self) -> u64 {
        self.sizes.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// Frames run so far.
    pub fn frames(&self) -> u64 {
        self.sizes.iter().enumerate().map(|(k, n)| k as u64 * n.load(Ordering::Relaxed)).sum()
    }
}

/// One UNet session shared by every stream of every avatar that uses the model: a thread that
/// batches frames across sessions.
pub struct UnetService {
    tx: Option<Sender<UnetRequest>>,
    handle: Option<JoinHandle<()>>,
    crop: CropParams,
    max_batch: usize,
    provider: Provider,
    stats: Arc<UnetStats>,
}

impl std::fmt::Debug for UnetService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnetService").field("max_batch", &self.max_batch).field("provider", &self.provider).finish()
    }
}

impl UnetService {
    /// Opens the model (signature checked for `crop`) and starts the batching thread.
    pub fn start(
        rt: &OrtRuntime,
        path: &Path,
        io: &ModelIo,
        crop: CropParams,
        cfg: &UnetServiceConfig,
    ) -> Result<Self, SessionError> {
        let opts = SessionOptions { intra_threads: cfg.intra_threads.max(1), spinning: cfg.spinning };
        let mut unet = Unet::open(rt, path, io, &crop, cfg.max_batch, &opts, cfg.provider)
            .map_err(|e| SessionError::Unet(e.to_string()))?;
        let provider = unet.provider();
        let max_batch = cfg.max_batch;
        let max_wait = cfg.max_wait;
        let stats = Arc::new(UnetStats {
            sizes: (0..=max_batch).map(|_| AtomicU64::new(0)).collect(),
            service: Mutex::new(histogram()),
        });
        let (tx, rx) = bounded::<UnetRequest>(max_batch * 8);
        let st = stats.clone();
        let handle = std::thread::Builder::new()
            .name("ls-unet-service".into())
            .spawn(move || batch_loop(&mut unet, &crop, &rx, max_batch, max_wait, &st))
            .map_err(|e| SessionError::Unet(format!("could not start the UNet thread: {e}")))?;
        Ok(Self { tx: Some(tx), handle: Some(handle), crop, max_batch, provider, stats })
    }

    /// The crop geometry the model was checked against.
    pub fn crop(&self) -> &CropParams {
        &self.crop
    }

    /// Most frames per run.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The provider in use.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// Batch counters.
    pub fn stats(&self) -> &UnetStats {
        &self.stats
    }

    fn sender(&self) -> Sender<UnetRequest> {
        self.tx.clone().expect("the service is running until dropped")
    }
}

impl Drop for UnetService {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn batch_loop(
    unet: &mut Unet,
    crop: &CropParams,
    rx: &Receiver<UnetRequest>,
    max_batch: usize,
    max_wait: Duration,
    stats: &UnetStats,
) {
    let slot = input_len(crop);
    let out_len = output_len(crop);
    let mut images = vec![0f32; max_batch * slot];
    let mut audio = vec![0f32; max_batch * FRAME_AUDIO_LEN];
    let mut out = vec![0f32; max_batch * out_len];
    let mut pending: VecDeque<UnetRequest> = VecDeque::with_capacity(max_batch * 8);
    let mut batch: Vec<UnetRequest> = Vec::with_capacity(max_batch);
    let mut counts: Vec<(u64, usize)> = Vec::with_capacity(max_batch);
    let mut open = true;
    loop {
        // Drop the frames of sessions that were cancelled.
        pending.retain(|r| !r.cancel.load(Ordering::Relaxed));
        if pending.is_empty() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(r) => pending.push_back(r),
                Err(_) => return,
            }
        }
        let deadline = pending.front().map(|r| r.arrived + max_wait).unwrap_or_else(Instant::now);
        while open && pending.len() < max_batch {
            match rx.recv_deadline(deadline) {
                Ok(r) => pending.push_back(r),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => break,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => open = false,
            }
        }
        while let Ok(r) = rx.try_recv() {
            pending.push_back(r);
        }
        // Oldest first, at most `limit` frames of one session per run.
        counts.clear();
        let mut k = 0;
        while k < pending.len() && batch.len() < max_batch {
            let r = &pending[k];
            let n = match counts.iter_mut().find(|(s, _)| *s == r.session) {
                Some((_, n)) => n,
                None => {
                    counts.push((r.session, 0));
                    &mut counts.last_mut().expect("just pushed").1
                }
            };
            if *n < r.limit {
                *n += 1;
                batch.push(pending.remove(k).expect("index in range"));
            } else {
                k += 1;
            }
        }
        let n = batch.len();
        if n == 0 {
            continue;
        }
        for (j, r) in batch.iter().enumerate() {
            images[j * slot..(j + 1) * slot].copy_from_slice(&r.job.input);
            audio[j * FRAME_AUDIO_LEN..(j + 1) * FRAME_AUDIO_LEN].copy_from_slice(&r.job.audio);
        }
        let t = Instant::now();
        // A panic inside ONNX Runtime fails this batch's frames, not the service.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unet.run(n, &images, &audio, &mut out)))
            .unwrap_or_else(|panic| {
                Err(UnetError::Run { batch: n, message: format!("panicked: {}", panic_message(&*panic)) })
            });
        let took = t.elapsed();
        stats.sizes[n].fetch_add(1, Ordering::Relaxed);
        stats.service.lock().unwrap_or_else(|p| p.into_inner()).saturating_record((took.as_nanos() as u64).max(1));
        for (j, mut r) in batch.drain(..).enumerate() {
            let reply = match &result {
                Ok(()) => {
                    r.job.output.copy_from_slice(&out[j * out_len..(j + 1) * out_len]);
                    Ok(r.job)
                }
                Err(e) => Err((r.job.index, e.to_string())),
            };
            // Room for every job of the session: never blocks. A gone session drops it.
            let _ = r.reply.try_send(reply);
        }
    }
}

/// Where a session's frames go (the daemon writes them to the client's socket).
pub trait FrameSink: Send + 'static {
    /// Writes frame `index` (JPEG bytes). An error stops the session.
    fn frame(&mut self, index: usize, jpeg: &[u8]) -> Result<(), String>;
}

/// Live per-stage service times shared by all sessions of a daemon (ns histograms).
pub struct LiveStats {
    stages: Vec<(&'static str, Mutex<Histogram<u64>>)>,
    /// Frames written by all sessions.
    pub frames: AtomicU64,
}

/// The stages [`LiveStats`] tracks, in pipeline order (`unet` is the service's run time per
/// batch, kept by [`UnetStats`]).
pub const LIVE_STAGES: [&str; 4] = ["audio", "prep", "composite", "encode"];

impl Default for LiveStats {
    fn default() -> Self {
        Self { stages: LIVE_STAGES.iter().map(|&n| (n, Mutex::new(histogram()))).collect(), frames: AtomicU64::new(0) }
    }
}

impl LiveStats {
    fn record(&self, stage: usize, d: Duration) {
        if let Some((_, h)) = self.stages.get(stage) {
            h.lock().unwrap_or_else(|p| p.into_inner()).saturating_record((d.as_nanos() as u64).max(1));
        }
    }

    /// Percentiles (ms) of each stage's service time since the daemon started.
    pub fn summary(&self) -> Vec<(&'static str, Percentiles)> {
        self.stages.iter().map(|(n, h)| (*n, Percentiles::of(&h.lock().unwrap_or_else(|p| p.into_inner())))).collect()
    }
}

/// What one session has done so far (read by `stats` while it runs).
pub struct SessionLive {
    /// Session id.
    pub id: u64,
    /// Avatar name.
    pub avatar: String,
    /// When it started.
    pub started: Instant,
    /// Frames written.
    pub frames: AtomicU64,
    /// Time to the first frame (µs after start; 0 until then).
    pub first_frame_us: AtomicU64,
    /// Frames prepared and not yet written.
    pub in_flight: AtomicU64,
    /// Latency per frame: from the arrival of the audio that made it final to the frame
    /// written (ns).
    pub latency: Mutex<Histogram<u64>>,
}

impl SessionLive {
    /// Latency percentiles (ms).
    pub fn latency(&self) -> Percentiles {
        Percentiles::of(&self.latency.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A session's settings.
pub struct SessionConfig {
    /// Session id (unique in the daemon).
    pub id: u64,
    /// Avatar name (for stats).
    pub name: String,
    /// The avatar.
    pub avatar: Arc<Avatar>,
    /// Its template frames, decoded (shared read-only).
    pub template: Arc<SharedTemplate>,
    /// The audio encoder shared by sessions using the model.
    pub encoder: Arc<Mutex<AudioEncoder>>,
    /// The UNet service of the avatar's model.
    pub unet: Arc<UnetService>,
    /// Sample rate of the audio pushed (resampled to 16 kHz).
    pub sample_rate: u32,
    /// JPEG quality.
    pub jpeg_quality: u8,
    /// Most frames of this session per UNet run.
    pub batch: usize,
    /// Frame jobs in flight (prep to sink): bounds memory and the queue a slow client builds.
    pub queue: usize,
    /// Start offset into the ping-pong template sequence.
    pub start_frame: usize,
    /// Daemon-wide stage statistics.
    pub live: Arc<LiveStats>,
}

/// How a session ended.
#[derive(Debug, Clone)]
pub struct SessionOutcome {
    /// Frames written.
    pub frames: u64,
    /// Latency percentiles (ms).
    pub latency: Percentiles,
}

/// Audio chunks queued between `push_audio` and the audio stage.
const AUDIO_QUEUE: usize = 4;

/// Audio tensors queued between the audio stage and prep.
const TENSORS_AHEAD: usize = 2;

/// Audio into a session.
enum AudioIn {
    Samples(Vec<f32>, quanta::Instant),
    End(quanta::Instant),
}

/// One frame's audio tensor, from the audio stage to prep.
struct AudioTensor {
    index: usize,
    data: Vec<f32>,
    t_audio: quanta::Instant,
}

/// A running streaming session.
pub struct Session {
    audio_tx: Option<Sender<AudioIn>>,
    recycle: Receiver<Vec<f32>>,
    cancel: Arc<AtomicBool>,
    clock: Clock,
    live: Arc<SessionLive>,
    supervisor: Option<JoinHandle<()>>,
}

/// Called once with the session's result, after every frame was written (or it failed).
pub type OnFinish = Box<dyn FnOnce(Result<SessionOutcome, PipelineError>) + Send>;

impl Session {
    /// Starts the session's stage threads; `on_finish` runs on a supervisor thread when they
    /// have all stopped.
    pub fn start(cfg: SessionConfig, mut sink: Box<dyn FrameSink>, on_finish: OnFinish) -> Result<Self, SessionError> {
        if cfg.batch == 0 || cfg.queue == 0 {
            return Err(SessionError::Config("batch and queue must be at least 1".into()));
        }
        if !(1..=100).contains(&cfg.jpeg_quality) {
            return Err(SessionError::Config(format!("JPEG quality {} is not in 1..=100", cfg.jpeg_quality)));
        }
        let crop = *cfg.unet.crop();
        if crop != cfg.avatar.config.crop {
            return Err(SessionError::Config("the avatar's crop geometry differs from its UNet service's".into()));
        }
        let mut resampler = if cfg.sample_rate == SAMPLE_RATE {
            None
        } else {
            Some(StreamResampler::new(cfg.sample_rate).map_err(|e| SessionError::Config(e.to_string()))?)
        };
        let clock = Clock::new();
        let mut p = Pipeline::new(PinPolicy::None, clock.clone());
        let cancel = p.cancel_flag();
        let live = Arc::new(SessionLive {
            id: cfg.id,
            avatar: cfg.name.clone(),
            started: Instant::now(),
            frames: AtomicU64::new(0),
            first_frame_us: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            latency: Mutex::new(histogram()),
        });
        let queue = cfg.queue;
        // Frames the audio makes (L + 2), known at the end of the audio.
        let total = Arc::new(AtomicUsize::new(usize::MAX));
        let (audio_tx, audio_rx) = bounded::<AudioIn>(AUDIO_QUEUE);
        // Sample buffers go back from the audio stage to `push_audio` (no allocation per chunk).
        let (recycle_tx, recycle_rx) = bounded::<Vec<f32>>(AUDIO_QUEUE + 2);
        // Few audio tensors ahead of prep: frames in flight (the latency a backlog adds) are
        // the `queue` jobs plus these.
        let (tensor_tx, tensor_rx) = bounded::<AudioTensor>(TENSORS_AHEAD);
        let (reply_tx, reply_rx) = bounded::<UnetReply>(queue);
        let tensor_pool = Pool::new(TENSORS_AHEAD + 1, || AudioTensor {
            index: 0,
            data: vec![0.0; FRAME_AUDIO_LEN],
            t_audio: clock.now(),
        });
        let job_pool = Pool::new(queue, || SessionJob {
            index: 0,
            template: 0,
            frame: BgrFrame::default(),
            c328: vec![0; template_len(&crop)],
            input: vec![0.0; input_len(&crop)],
            audio: vec![0.0; FRAME_AUDIO_LEN],
            output: vec![0.0; output_len(&crop)],
            t_audio: clock.now(),
        });

        // audio: resample, mel, windows, encoder, F -> per-frame tensors as soon as final.
        {
            let encoder = cfg.encoder.clone();
            let pool = tensor_pool.clone();
            let live = cfg.live.clone();
            let total = total.clone();
            p.spawn("audio", false, move |ctx| {
                let mut mel = MelSpectrogram::new();
                let mut tracker = WindowTracker::new();
                let mut asm = FeatureAssembler::new();
                let mut pcm = Vec::with_capacity(8192);
                let mut rows = Vec::with_capacity(64 * N_MELS);
                let mut windows = Vec::with_capacity(16 * WINDOW_LEN);
                let mut o = Vec::with_capacity(16 * FEATURE_DIM);
                let mut ready: Vec<usize> = Vec::with_capacity(16);
                let mut flat: Vec<f32> = Vec::with_capacity(16 * FRAME_AUDIO_LEN);
                let mut end = false;
                while !end {
                    let (samples, t_audio) = match ctx.recv(&audio_rx)? {
                        Some(AudioIn::Samples(s, t)) => (Some(s), t),
                        Some(AudioIn::End(t)) => {
                            end = true;
                            (None, t)
                        }
                        // The session was dropped without an end: nothing more will come.
                        None => return Err(StageError::Cancelled),
                    };
                    let t = ctx.clock.now();
                    pcm.clear();
                    if let Some(samples) = samples {
                        match &mut resampler {
                            Some(rs) => rs.push(&samples, &mut pcm).map_err(StageError::msg)?,
                            None => pcm.extend_from_slice(&samples),
                        }
                        // Back to the intake for the next chunk (dropped if it has enough).
                        let _ = recycle_tx.try_send(samples);
                    }
                    if end {
                        if let Some(rs) = &mut resampler {
                            rs.finish(&mut pcm).map_err(StageError::msg)?;
                        }
                    }
                    rows.clear();
                    mel.push(&pcm, &mut rows);
                    if end {
                        mel.finish(&mut rows);
                    }
                    windows.clear();
                    tracker.push(&rows, &mut windows);
                    if end {
                        tracker.finish(&mut windows).map_err(StageError::msg)?;
                    }
                    o.clear();
                    if !windows.is_empty() {
                        let mut enc = encoder.lock().unwrap_or_else(|p| p.into_inner());
                        enc.encode(&windows, &mut o).map_err(StageError::msg)?;
                    }
                    asm.push(&o, |i, tensor| {
                        ready.push(i);
                        flat.extend_from_slice(tensor);
                    });
                    if end {
                        let n = asm.finish(|i, tensor| {
                            ready.push(i);
                            flat.extend_from_slice(tensor);
                        });
                        total.store(n, Ordering::SeqCst);
                    }
                    let took = ctx.clock.now().duration_since(t);
                    ctx.metrics.record_service(took);
                    live.record(0, took);
                    for (k, &i) in ready.iter().enumerate() {
                        let mut tensor = pool.take(ctx)?;
                        tensor.index = i;
                        tensor.t_audio = t_audio;
                        tensor.data.copy_from_slice(&flat[k * FRAME_AUDIO_LEN..(k + 1) * FRAME_AUDIO_LEN]);
                        ctx.send(&tensor_tx, tensor)?;
                    }
                    ready.clear();
                    flat.clear();
                }
                Ok(())
            })?;
        }
        // prep: template frame + model input into a job, then to the shared UNet.
        {
            let pool = job_pool.clone();
            let tpool = tensor_pool.clone();
            let avatar = cfg.avatar.clone();
            let template = cfg.template.clone();
            let unet_tx = cfg.unet.sender();
            let session_live = live.clone();
            let live = cfg.live.clone();
            let (id, limit, start, cancel) = (cfg.id, cfg.batch, cfg.start_frame, cancel.clone());
            p.spawn("prep", false, move |ctx| {
                let mut prep = FacePrep::new();
                let boxes = avatar.boxes.len();
                while let Some(tensor) = ctx.recv(&tensor_rx)? {
                    let mut job = pool.take(ctx)?;
                    let t = ctx.clock.now();
                    job.index = tensor.index;
                    job.t_audio = tensor.t_audio;
                    job.template = template_index(tensor.index, boxes, start);
                    job.audio.copy_from_slice(&tensor.data);
                    tpool.give(tensor);
                    template.get(job.template, &mut job.frame).map_err(|e| StageError::at(job.index, e))?;
                    let SessionJob { frame, c328, input, template: ti, .. } = &mut job;
                    prep.prep(frame, avatar.boxes[*ti], &crop, c328, input);
                    let took = ctx.clock.now().duration_since(t);
                    ctx.metrics.record_service(took);
                    live.record(1, took);
                    session_live.in_flight.fetch_add(1, Ordering::Relaxed);
                    let req = UnetRequest {
                        job,
                        reply: reply_tx.clone(),
                        session: id,
                        limit,
                        cancel: cancel.clone(),
                        arrived: Instant::now(),
                    };
                    let index = req.job.index;
                    if let Err(e) = ctx.send(&unet_tx, req) {
                        // Not cancelled: the service itself is gone.
                        return Err(if ctx.cancelled() {
                            e
                        } else {
                            StageError::at(index, "the UNet service has stopped")
                        });
                    }
                }
                Ok(())
            })?;
        }
        // output: paste-back, JPEG, sink; jobs back to the pool.
        {
            let pool = job_pool.clone();
            let avatar = cfg.avatar.clone();
            let session_live = live.clone();
            let live = cfg.live.clone();
            let quality = cfg.jpeg_quality;
            p.spawn("output", false, move |ctx| {
                let mut comp = Compositor::new();
                let mut jpeg = JpegEncoder::new(quality).map_err(StageError::msg)?;
                let mut next = 0usize;
                let total = total.clone();
                while let Some(reply) = ctx.recv(&reply_rx)? {
                    let mut job = reply.map_err(|(i, e)| StageError::at(i, e))?;
                    if job.index != next {
                        return Err(StageError::at(job.index, format!("frame {} arrived out of order", job.index)));
                    }
                    let t = ctx.clock.now();
                    let SessionJob { frame, c328, output, template: ti, .. } = &mut job;
                    comp.paste(frame, avatar.boxes[*ti], &crop, c328, output, Blend::Hard);
                    let t2 = ctx.clock.now();
                    live.record(2, t2.duration_since(t));
                    let bytes = jpeg.encode(&job.frame).map_err(|e| StageError::at(job.index, e))?;
                    live.record(3, ctx.clock.now().duration_since(t2));
                    sink.frame(job.index, bytes).map_err(|e| StageError::at(job.index, e))?;
                    let now = ctx.clock.now();
                    ctx.metrics.record_service(now.duration_since(t));
                    let lat = now.duration_since(job.t_audio);
                    session_live
                        .latency
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .saturating_record((lat.as_nanos() as u64).max(1));
                    if next == 0 {
                        let us = session_live.started.elapsed().as_micros() as u64;
                        session_live.first_frame_us.store(us.max(1), Ordering::Relaxed);
                    }
                    session_live.frames.fetch_add(1, Ordering::Relaxed);
                    session_live.in_flight.fetch_sub(1, Ordering::Relaxed);
                    live.frames.fetch_add(1, Ordering::Relaxed);
                    next += 1;
                    pool.give(job);
                }
                // Every frame of the audio, or a failure: never a short, quiet Done.
                match total.load(Ordering::SeqCst) {
                    t if t == next => Ok(()),
                    usize::MAX => Err(StageError::msg("the audio stream stopped without its end")),
                    t => Err(StageError::at(next, format!("only {next} of {t} frames were produced"))),
                }
            })?;
        }
        drop(job_pool);
        drop(tensor_pool);

        let sl = live.clone();
        let supervisor = std::thread::Builder::new()
            .name(format!("ls-session-{}", cfg.id))
            .spawn(move || {
                let result = p
                    .join()
                    .map(|_| SessionOutcome { frames: sl.frames.load(Ordering::SeqCst), latency: sl.latency() });
                on_finish(result);
            })
            .map_err(|e| SessionError::Config(format!("could not start the session thread: {e}")))?;
        Ok(Self { audio_tx: Some(audio_tx), recycle: recycle_rx, cancel, clock, live, supervisor: Some(supervisor) })
    }

    /// Live counters of this session.
    pub fn live(&self) -> &Arc<SessionLive> {
        &self.live
    }

    /// Pushes mono samples at the session's sample rate (copied into a recycled buffer).
    /// Blocks while the session's queue is full (backpressure); fails once the session has
    /// stopped.
    pub fn push_audio(&self, samples: &[f32]) -> Result<(), SessionError> {
        if self.audio_tx.is_none() {
            return Err(SessionError::Ended);
        }
        let mut buf = self.recycle.try_recv().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(samples);
        self.send(AudioIn::Samples(buf, self.clock.now()))
    }

    /// Ends the audio stream: the remaining frames (which wait for the end of the stream) are
    /// produced, then the session finishes.
    pub fn end_audio(&mut self) -> Result<(), SessionError> {
        let sent = self.send(AudioIn::End(self.clock.now()));
        if !matches!(sent, Err(SessionError::Ended)) {
            self.audio_tx = None;
        }
        sent
    }

    /// Whether the session has stopped early (failed or cancelled): it takes no more audio and
    /// will not finish its frames.
    pub fn is_stopped(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Whether [`Session::end_audio`] was called.
    pub fn audio_ended(&self) -> bool {
        self.audio_tx.is_none()
    }

    fn send(&self, item: AudioIn) -> Result<(), SessionError> {
        let tx = self.audio_tx.as_ref().ok_or(SessionError::Ended)?;
        if send_unless_cancelled(tx, item, &self.cancel) {
            Ok(())
        } else {
            Err(SessionError::Stopped)
        }
    }

    /// Stops the session now (frames in flight are dropped).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Waits until the session has finished (after [`Session::end_audio`] or
    /// [`Session::cancel`]).
    pub fn wait(mut self) {
        self.join();
    }

    fn join(&mut self) {
        self.audio_tx = None;
        if let Some(h) = self.supervisor.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Session {
    /// A dropped session that was not ended is cancelled; either way its threads are joined.
    fn drop(&mut self) {
        if self.audio_tx.is_some() {
            self.cancel();
        }
        self.join();
    }
}
