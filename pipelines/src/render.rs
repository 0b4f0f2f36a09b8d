//! `lipsync render`: file source -> the graph -> file sink.
//!
//! The source decodes the audio file to 16 kHz and feeds it to the graph in 200 ms chunks;
//! the UNet batcher has this render as its only producer; the sink writes a frames directory
//! or stdout (the encode stage writes a video file). Frames come out in order, exactly
//! `L + 2` of them (or `max_frames`), and the output is complete or absent.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;
use lipsync_stages::audio::{AudioError, AudioFile16k, SAMPLE_RATE};
use lipsync_stages::face::Blend;
use lipsync_stages::features::AudioEncoder;
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::jpeg::MCU;
use lipsync_stages::onnx::{OrtRuntime, SessionOptions};
use lipsync_stages::template::SharedTemplate;
use lipsync_stages::unet::{BatchSetting, PrecisionSetting, Provider, RemoteSettings};
use lipsync_stages::video_writer::track_samples;

pub use crate::file_sink::{ImageFormat, Output};
use crate::graph::{build, GraphConfig, Layout};
use crate::job::{AudioIn, FrameJob};
use crate::metrics::{rss_bytes, Clock, LatencyRecorder, Percentiles, RunReport, StageMetrics, StageSummary};
use crate::runtime::{lock, PinPolicy, Pipeline, PipelineError, StageError};
use crate::stages::encode::Encoding;
use crate::stages::frames::{open_template, Template};
pub use crate::stages::sink::ProgressFn;
use crate::stages::unet::{UnetService, UnetServiceConfig};

/// How long the batcher waits for a full batch from render's one producer (which fills a
/// batch in a few ms per frame): a bound, not a pace.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// The memory budget `render` sizes its template cache to by default (400 MB).
pub const DEFAULT_MEMORY_BUDGET: usize = 400_000_000;

/// The smallest template cache [`auto_cache`] picks.
pub const MIN_TEMPLATE_CACHE: usize = 16 << 20;

/// What [`auto_cache`] leaves for what it cannot see yet: the audio encoder's working memory,
/// the template decoder's own frames, image encoders, allocator slack. Measured on the sample
/// (720p): without it renders peaked 12-20 MiB over the budget.
const CACHE_MARGIN: usize = 40 << 20;

/// [`CACHE_MARGIN`] for a render from a [`lipsync_stages::template::JpegTemplate`], which has no
/// decoder at work once it is open and no whole frames in its jobs: the audio encoder's working
/// memory, the JPEG encoders, the frame in flight while the template opens, allocator slack. Measured on the sample (720p, full model): peaks came 16 MiB over the models, the
/// JPEG template and the frame jobs.
const JPEG_MARGIN: usize = 20 << 20;

/// What an H.264 output's encoder holds (libx264 at the settings of
/// `lipsync_stages::video_writer`, 720p: measured 22 MB).
const VIDEO_ENCODER_BYTES: usize = 24 << 20;

/// The template cache that keeps the process within `budget`: every decoded frame when they
/// fit in what is left after the memory in use now and `reserve` (what the run will add:
/// frame jobs, an encoder), else what is left, at least [`MIN_TEMPLATE_CACHE`]. Without a
/// resident-memory reading (not Linux), the default cache.
pub fn auto_cache(template: &SharedTemplate, budget: usize, reserve: usize) -> usize {
    match rss_bytes() {
        Some(rss) => fit_cache(template.len() * template.decoded_frame_bytes(), budget, rss + reserve),
        None => lipsync_stages::template::DEFAULT_CACHE,
    }
}

/// [`auto_cache`]'s rule: `whole` (every decoded frame) if it fits in `budget` less `used` and
/// the margin, else what is left, at least [`MIN_TEMPLATE_CACHE`].
pub fn fit_cache(whole: usize, budget: usize, used: usize) -> usize {
    budget.saturating_sub(used + CACHE_MARGIN).min(whole).max(MIN_TEMPLATE_CACHE)
}

/// The bytes a [`JpegTemplate`] may hold within `budget` with `used` in use now and `reserve`
/// still to come and [`JPEG_MARGIN`]; without a resident-memory reading, the default template
/// cache.
pub fn jpeg_template_limit(budget: usize, reserve: usize) -> usize {
    let rss = rss_bytes();
    let limit = match rss {
        Some(rss) => budget.saturating_sub(rss + reserve + JPEG_MARGIN),
        None => lipsync_stages::template::DEFAULT_CACHE,
    };
    tracing::debug!(rss, limit, "JPEG template limit");
    limit
}

/// Samples per chunk the source sends (200 ms).
const CHUNK: usize = SAMPLE_RATE as usize / 5;

/// Everything `render` needs.
pub struct RenderConfig {
    /// The validated avatar.
    pub avatar: Avatar,
    /// The audio file.
    pub audio: PathBuf,
    /// Where frames go.
    pub output: Output,
    /// UNet batch (`auto`: for the provider, [`lipsync_stages::unet::auto_batch`]).
    pub batch: BatchSetting,
    /// Audio encoder batch.
    pub encoder_batch: usize,
    /// Capacity of every inter-stage channel.
    pub capacity: usize,
    /// ONNX Runtime intra-op threads of the UNet session.
    pub intra_threads: usize,
    /// Whether ORT threads spin.
    pub spinning: bool,
    /// UNet execution provider.
    pub provider: Provider,
    /// Which of the avatar's UNets runs (fp32, or its int8 model).
    pub precision: PrecisionSetting,
    /// The inference server of `Provider::Remote`.
    pub remote: Option<RemoteSettings>,
    /// Thread pinning.
    pub pin: PinPolicy,
    /// JPEG quality.
    pub jpeg_quality: u8,
    /// Stop after this many frames.
    pub max_frames: Option<usize>,
    /// Frame `i` takes the template position of frame `first_index + i`: the frames of a
    /// real-time session's utterance that began at that frame (docs/protocol.md).
    pub first_index: usize,
    /// Paste-back blending.
    pub blend: Blend,
    /// Bytes of decoded template frames kept for the ping-pong's backward pass (a frames
    /// directory: raw frames held, the rest compressed); `None`: sized by [`auto_cache`] to
    /// what `memory_budget` leaves.
    pub template_cache: Option<usize>,
    /// Resident memory the render aims to stay within when it sizes the template cache.
    pub memory_budget: usize,
    /// Called by the sink after each frame with (frames done, total when known).
    pub progress: Option<ProgressFn>,
    /// Set from outside (a signal) to stop the render: it then fails as cancelled and leaves
    /// no output.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl RenderConfig {
    /// A render of `audio` by `avatar` into `output` with the defaults: batch auto, the
    /// default encoder batch, channel capacity 2, one ONNX Runtime thread without spinning, CPU, no
    /// pinning, the avatar's JPEG quality, every frame, hard paste, the default template cache.
    pub fn new(avatar: Avatar, audio: PathBuf, output: Output) -> Self {
        Self {
            jpeg_quality: avatar.config.jpeg_quality,
            avatar,
            audio,
            output,
            batch: BatchSetting::Auto,
            encoder_batch: lipsync_stages::features::DEFAULT_ENCODER_BATCH,
            capacity: 2,
            intra_threads: 1,
            spinning: false,
            provider: Provider::Cpu,
            precision: PrecisionSetting::Auto,
            remote: None,
            pin: PinPolicy::None,
            max_frames: None,
            first_index: 0,
            blend: Blend::Hard,
            template_cache: None,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            progress: None,
            cancel: None,
        }
    }
}

/// What a finished render returns.
pub struct RenderOutcome {
    /// Frames written.
    pub frames: usize,
    /// The latency report.
    pub report: RunReport,
    /// Raw histograms per stage (for HdrHistogram log export).
    pub histograms: Vec<(String, StageMetrics)>,
    /// End-to-end latency histogram.
    pub e2e: LatencyRecorder,
}

/// Runs the render and returns when every frame is written (or the first error).
pub fn render(rt: &OrtRuntime, cfg: RenderConfig) -> Result<RenderOutcome, PipelineError> {
    cfg.output.check().map_err(|e| PipelineError::setup("sink", e))?;
    let io = cfg.avatar.config.models.io.clone();
    let crop = cfg.avatar.config.crop;
    let unet_cfg = UnetServiceConfig {
        max_batch: cfg.batch,
        max_wait: MAX_WAIT,
        intra_threads: cfg.intra_threads.max(1),
        spinning: cfg.spinning,
        provider: cfg.provider,
        remote: cfg.remote.clone(),
    };
    let model = cfg.avatar.unet_model(cfg.precision, cfg.provider).map_err(|e| PipelineError::setup("unet", e))?;
    let unet = UnetService::start(rt, &model, &unet_cfg).map_err(|e| PipelineError::setup("unet", e))?;
    tracing::info!(backend = %unet.backend(), batch = unet.max_batch().get(), "UNet");
    let unet = Arc::new(unet);
    let enc_opts = SessionOptions { intra_threads: 1, spinning: false };
    let encoder = AudioEncoder::open(rt, &cfg.avatar.encoder, &io, cfg.encoder_batch, &enc_opts)
        .map_err(|e| PipelineError::setup("encoder", e))?;
    let sink = cfg.output.sink().map_err(|e| PipelineError::setup("sink", e))?;
    let n = unet.max_batch().get();
    let cap = cfg.capacity.max(1);
    // Room for a batch being filled, one in the UNet, and a channel's worth beside them: more
    // only holds frames (3 MiB each at 720p) without feeding the UNet faster.
    let jobs = 2 * n + cap + 2;
    // The template opens after the models, so that its memory is sized to what they left. JPEG
    // output keeps it as JPEGs and face regions when they fit (jobs then hold a region each).
    let open_budget = cfg.template_cache.unwrap_or(lipsync_stages::template::DEFAULT_CACHE);
    let jpeg = matches!(cfg.output, Output::Dir { format: ImageFormat::Jpeg, .. } | Output::Stdout).then(|| {
        // A job's region: the box widened to whole restart intervals (up to 8 MCUs a side).
        let (w, h) =
            cfg.avatar.boxes.iter().fold((0, 0), |(w, h), b| {
                (w.max(b.width() as usize + 2 * 8 * MCU), h.max(b.height() as usize + 2 * MCU))
            });
        // The template's own packets stay held beside it (about the video file's size).
        let packets = std::fs::metadata(&cfg.avatar.video).ok().filter(|m| m.is_file()).map_or(0, |m| m.len());
        let reserve = jobs * FrameJob::bytes(&crop, w, h) + packets as usize;
        let limit = cfg.template_cache.unwrap_or_else(|| jpeg_template_limit(cfg.memory_budget, reserve));
        (cfg.jpeg_quality, limit)
    });
    let (template, store) =
        open_template(&cfg.avatar, open_budget, jpeg).map_err(|e| PipelineError::setup("template", e))?;
    let (template, store) = (Arc::new(template), store.map(Arc::new));

    let clock = Clock::new();
    let started = Instant::now();
    let t0 = clock.now();
    let mut p = Pipeline::new(cfg.pin.clone(), clock);
    if let Some(flag) = cfg.cancel.clone() {
        p = p.with_cancel(flag);
    }
    // The sound track goes to the encoder in chunks: unbounded, as the graph already bounds how
    // far the source runs ahead of the encoder.
    let (track_tx, track_rx) = unbounded::<Vec<f32>>();
    let fps = cfg.avatar.config.fps.round().max(1.0) as i32;
    let encoding = match &cfg.output {
        Output::Dir { format: ImageFormat::Png, .. } => Encoding::Png,
        Output::Dir { format: ImageFormat::Raw, .. } => Encoding::Raw,
        Output::Dir { format: ImageFormat::Jpeg, .. } | Output::Stdout => Encoding::Jpeg(cfg.jpeg_quality),
        Output::Video(path) => Encoding::H264 { path: path.clone(), fps, audio: track_rx },
    };
    let mut track = matches!(cfg.output, Output::Video(_)).then_some(track_tx);
    // With `max_frames` the sound track stops with the video (the graph still reads the rest).
    let mut track_left = cfg.max_frames.map_or(usize::MAX, |m| track_samples(m, fps));
    let mut settings = serde_json::json!({
        "avatar": cfg.avatar.root.display().to_string(),
        "audio": cfg.audio.display().to_string(),
        "batch": unet.max_batch(),
        "batch_setting": cfg.batch,
        "encoder_batch": cfg.encoder_batch,
        "capacity": cfg.capacity,
        "intra_threads": cfg.intra_threads,
        "provider": unet.provider().to_string(),
        "provider_setting": cfg.provider.to_string(),
        "precision": unet.backend().precision,
        "unet_model": unet.backend().model.display().to_string(),
        "pin": format!("{:?}", cfg.pin),
    });
    let template_cache = match &store {
        // The reader is not used.
        Some(_) => 0,
        None => cfg.template_cache.unwrap_or_else(|| {
            let (w, h) = template.size();
            let video = if matches!(cfg.output, Output::Video(_)) { VIDEO_ENCODER_BYTES } else { 0 };
            auto_cache(&template, cfg.memory_budget, jobs * FrameJob::bytes(&crop, w, h) + video)
        }),
    };
    tracing::debug!(template_cache_mib = template_cache >> 20, jpeg_template = store.is_some(), "template cache");
    if store.is_none() {
        template.warn_if_slow_backward(template_cache);
    }
    if let Some(rss) = rss_bytes().filter(|&r| r > cfg.memory_budget) {
        tracing::warn!(
            rss_mb = rss / 1_000_000,
            template_mb = template.memory_bytes() / 1_000_000,
            budget_mb = cfg.memory_budget / 1_000_000,
            "over the memory budget before the first frame (the models and the template's packets)"
        );
    }
    settings["template_cache_bytes"] = template_cache.into();
    settings["template_store"] = if store.is_some() { "jpeg" } else { "decoder" }.into();
    settings["template_store_bytes"] =
        (template.memory_bytes() + store.as_ref().map_or(0, |s| s.memory_bytes())).into();
    let avatar = Arc::new(cfg.avatar);
    let graph = GraphConfig {
        id: 0,
        template: Template { template, cache: template_cache, jpeg: store },
        start_frame: avatar.config.start_frame,
        first_index: cfg.first_index,
        live: None,
        avatar,
        encoder: Arc::new(Mutex::new(encoder)),
        unet: unet.clone(),
        input_rate: SAMPLE_RATE,
        encoding,
        blend: cfg.blend,
        batch: unet.max_batch(),
        jobs,
        capacity: cap,
        audio_ahead: cap.max(n),
        max_frames: cfg.max_frames,
        progress: cfg.progress,
        layout: Layout::Staged,
    };
    let g = build(&mut p, graph, sink).map_err(|e| PipelineError::setup("graph", e))?;
    let (input, recycle) = (g.input, g.recycle);
    let audio = cfg.audio.clone();
    p.source("source", input, move |out| {
        // Decoded and resampled packet by packet: memory is flat in the audio's length.
        let fail = |e: AudioError| StageError::failed(None, e);
        let mut file = AudioFile16k::open(&audio).map_err(fail)?;
        let mut pending = Vec::new();
        let mut more = true;
        while more {
            more = file.read(&mut pending).map_err(fail)?;
            // Whole chunks go out as they fill (the rest with the end), so the graph sees the
            // same chunks whatever the file's packet size.
            let whole = if more { pending.len() - pending.len() % CHUNK } else { pending.len() };
            for chunk in pending[..whole].chunks(CHUNK) {
                // The track first, so the encoder has each frame's audio by the time the frame comes.
                if let Some(tx) = &track {
                    let n = chunk.len().min(track_left);
                    let _ = tx.send(chunk[..n].to_vec());
                    track_left -= n;
                    if track_left == 0 {
                        // The track is complete: the encoder need not wait for the rest.
                        track = None;
                    }
                }
                let mut buf = recycle.try_recv().unwrap_or_default();
                buf.clear();
                buf.extend_from_slice(chunk);
                let now = out.clock().now();
                out.send(AudioIn::Samples(buf, now))?;
            }
            pending.drain(..whole);
        }
        drop(track);
        let now = out.clock().now();
        out.send(AudioIn::End(now))
    })?;
    let reports = p.join()?;

    let stats = g.stats;
    let frames = stats.frames() as usize;
    let wall = started.elapsed();
    let (steady, first) = match *lock(&stats.span) {
        Some((a, b)) if frames > 1 => {
            ((frames - 1) as f64 / b.duration_since(a).as_secs_f64().max(1e-9), a.duration_since(t0).as_secs_f64())
        }
        _ => (0.0, wall.as_secs_f64()),
    };
    let ust = unet.stats();
    let unet_metrics = StageMetrics { service: lock(&ust.service).clone(), wait: lock(&ust.wait).clone() };
    let unet_cpu = ust.cpu_us.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-6;
    let mut histograms: Vec<(String, StageMetrics, f64, Option<usize>)> =
        reports.into_iter().map(|r| (r.name, r.metrics, r.cpu_seconds, r.core)).collect();
    let at = histograms.iter().position(|h| h.0 == "prep").map_or(histograms.len(), |i| i + 1);
    histograms.insert(at, ("unet".into(), unet_metrics, unet_cpu, None));
    let e2e = lock(&stats.e2e).clone();
    let report = RunReport {
        kind: "render".into(),
        frames: frames as u64,
        wall_seconds: wall.as_secs_f64(),
        frames_per_second: frames as f64 / wall.as_secs_f64().max(1e-9),
        steady_frames_per_second: steady,
        first_frame_seconds: first,
        end_to_end_ms: Percentiles::of(&e2e.e2e),
        stages: histograms
            .iter()
            .map(|(name, m, cpu, core)| StageSummary {
                name: name.clone(),
                service_ms: Percentiles::of(&m.service),
                wait_ms: Percentiles::of(&m.wait),
                cpu_seconds: *cpu,
                core: *core,
            })
            .collect(),
        settings,
    };
    let histograms = histograms.into_iter().map(|(n, m, _, _)| (n, m)).collect();
    Ok(RenderOutcome { frames, report, histograms, e2e })
}
