//! `lipsync render`: file source -> the graph -> file sink.
//!
//! The source decodes the audio file to 16 kHz and feeds it to the graph in 200 ms chunks;
//! the UNet batcher has this render as its only producer; the sink writes a frames directory
//! or stdout (the encode stage writes a video file). Frames come out in order, exactly
//! `L + 2` of them (or `max_frames`), and the output is complete or absent.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use lipsync_stages::audio::{AudioError, AudioFile16k, SAMPLE_RATE};
use lipsync_stages::face::Blend;
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::jpeg::MCU;
use lipsync_stages::onnx::OrtRuntime;
use lipsync_stages::unet::{BatchSetting, PrecisionSetting, Provider, RemoteSettings};
use lipsync_stages::video_writer::track_samples;

pub use crate::file_sink::{ImageFormat, Output};
use crate::graph::encode::Encoding;
use crate::graph::frames::Template;
pub use crate::graph::sink::ProgressFn;
use crate::graph::unet::{UnetService, UnetServiceConfig};
use crate::graph::{build, GraphConfig, Layout, StageId};
use crate::job::{AudioIn, FrameJob};
use crate::metrics::{rss_bytes, Clock, LatencyRecorder, Percentiles, RunReport, StageMetrics, StageSummary};
pub use crate::resources::DEFAULT_MEMORY_BUDGET;
use crate::resources::{
    auto_cache, jpeg_template_limit, AvatarModels, AvatarResources, ModelCache, ModelSettings, TemplatePlan,
    VIDEO_ENCODER_BYTES,
};
use crate::runtime::{lock, Out, PinPolicy, Pipeline, PipelineError, StageError};

/// How long the batcher waits for a full batch from render's one producer (which fills a
/// batch in a few ms per frame): a bound, not a pace.
const MAX_WAIT: Duration = Duration::from_secs(1);

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
    /// live session's utterance that began at that frame (docs/protocol.md).
    pub first_index: usize,
    /// Paste-back blending.
    pub blend: Blend,
    /// Bytes of decoded template frames kept for the ping-pong's backward pass (a frames
    /// directory: raw frames held, the rest compressed); `None`: sized by [`auto_cache`] to
    /// what `memory_budget` leaves.
    pub template_cache: Option<usize>,
    /// The most the template's JPEG frames may take (JPEG output); `None`: `template_cache`, else
    /// what `memory_budget` leaves.
    pub jpeg_template: Option<usize>,
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
            jpeg_template: None,
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

/// Runs the render and returns when every frame is written (or the first error): the avatar's
/// resources, then its graph fed by the audio file, then the report.
pub fn render(rt: &OrtRuntime, cfg: RenderConfig) -> Result<RenderOutcome, PipelineError> {
    cfg.output.check().map_err(|e| PipelineError::setup("sink", e))?;
    let opened = open(rt, &cfg)?;
    let sink = cfg.output.sink().map_err(|e| PipelineError::setup("sink", e))?;
    let settings = settings_json(&cfg, &opened);
    let unet = opened.resources.models.unet.clone();

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
    let track = Track::new(&cfg, fps, track_tx);
    let graph = graph_config(&cfg, opened, encoding(&cfg, fps, track_rx));
    let g = build(&mut p, graph, sink).map_err(|e| PipelineError::setup("graph", e))?;
    let (input, recycle) = (g.input, g.recycle);
    let audio = cfg.audio.clone();
    p.source("source", input, move |out| feed(&audio, track, &recycle, out))?;
    let reports = p.join()?;

    let frames = g.stats.frames() as usize;
    let wall = started.elapsed();
    let (steady, first) = match *lock(&g.stats.span) {
        Some((a, b)) if frames > 1 => {
            ((frames - 1) as f64 / b.duration_since(a).as_secs_f64().max(1e-9), a.duration_since(t0).as_secs_f64())
        }
        _ => (0.0, wall.as_secs_f64()),
    };
    let mut histograms: Vec<StageRun> = reports
        .into_iter()
        .map(|r| StageRun { name: r.name, metrics: r.metrics, cpu: r.cpu_seconds, core: r.core })
        .collect();
    // The UNet batcher is not one of the graph's threads: its figures go after `prep`, where
    // it runs in the graph.
    let at = histograms.iter().position(|h| h.name == StageId::Prep.name()).map_or(histograms.len(), |i| i + 1);
    histograms.insert(at, unet_run(&unet));
    let e2e = lock(&g.stats.e2e).clone();
    let report = RunReport {
        kind: "render".into(),
        frames: frames as u64,
        wall_seconds: wall.as_secs_f64(),
        frames_per_second: frames as f64 / wall.as_secs_f64().max(1e-9),
        steady_frames_per_second: steady,
        first_frame_seconds: first,
        end_to_end_ms: Percentiles::of(&e2e.e2e),
        stages: histograms.iter().map(StageRun::summary).collect(),
        settings,
    };
    let histograms = histograms.into_iter().map(|h| (h.name, h.metrics)).collect();
    Ok(RenderOutcome { frames, report, histograms, e2e })
}

/// A render's resources, and the sizes it chose for them.
struct Opened {
    resources: AvatarResources,
    /// Frame jobs in flight.
    jobs: usize,
    /// Bytes of decoded template frames its reader keeps (0 with JPEG frames: no reader).
    template_cache: usize,
}

/// Frame jobs for a UNet batch of `batch` and channels of `capacity`: room for a batch being
/// filled, one in the UNet, and a channel's worth beside them (more only holds frames, 3 MiB
/// each at 720p, without feeding the UNet faster).
fn jobs_for(batch: usize, capacity: usize) -> usize {
    2 * batch + capacity + 2
}

/// Opens the avatar's models (a cache of the render's own), then its template sized to the
/// memory the models left; JPEG output keeps it as JPEGs and face regions when they fit.
fn open(rt: &OrtRuntime, cfg: &RenderConfig) -> Result<Opened, PipelineError> {
    let settings = ModelSettings {
        unet: UnetServiceConfig {
            max_batch: cfg.batch,
            max_wait: MAX_WAIT,
            intra_threads: cfg.intra_threads.max(1),
            spinning: cfg.spinning,
            provider: cfg.provider,
            remote: cfg.remote.clone(),
        },
        precision: cfg.precision,
        encoder_batch: cfg.encoder_batch,
    };
    let cap = cfg.capacity.max(1);
    let plan = |models: &AvatarModels| TemplatePlan {
        budget: cfg.template_cache.unwrap_or(lipsync_stages::template::DEFAULT_CACHE),
        jpeg: (jpeg_output(&cfg.output) && cfg.jpeg_template != Some(0))
            .then(|| (cfg.jpeg_quality, jpeg_limit(cfg, jobs_for(models.unet.max_batch().get(), cap)))),
    };
    let resources = AvatarResources::open(rt, &ModelCache::default(), cfg.avatar.clone(), &settings, plan)
        .map_err(|e| PipelineError::setup(e.stage(), e))?;
    let jobs = jobs_for(resources.models.unet.max_batch().get(), cap);
    let template = &resources.template;
    let template_cache = match &template.jpeg {
        // The reader is not used.
        Some(_) => 0,
        None => cfg.template_cache.unwrap_or_else(|| {
            let (w, h) = template.template.size();
            let video = if matches!(cfg.output, Output::Video(_)) { VIDEO_ENCODER_BYTES } else { 0 };
            let frames = jobs * FrameJob::bytes(&cfg.avatar.config.crop, w, h);
            auto_cache(&template.template, cfg.memory_budget, frames + video)
        }),
    };
    tracing::debug!(
        template_cache_mib = template_cache >> 20,
        jpeg_template = template.jpeg.is_some(),
        "template cache"
    );
    if template.jpeg.is_none() {
        template.template.warn_if_slow_backward(template_cache);
    }
    if let Some(rss) = rss_bytes().filter(|&r| r > cfg.memory_budget) {
        tracing::warn!(
            rss_mb = rss / 1_000_000,
            template_mb = template.template.memory_bytes() / 1_000_000,
            budget_mb = cfg.memory_budget / 1_000_000,
            "over the memory budget before the first frame (the models and the template's packets)"
        );
    }
    Ok(Opened { resources, jobs, template_cache })
}

/// Whether the output is JPEG frames (then the template may be held as JPEGs).
fn jpeg_output(output: &Output) -> bool {
    matches!(output, Output::Dir { format: ImageFormat::Jpeg, .. } | Output::Stdout)
}

/// The bytes the template's JPEG frames may take: `--jpeg-template-mb` or `--template-cache-mb`
/// when given, else what
/// the memory budget leaves after the memory in use, the `jobs` frame jobs (a face region each:
/// the box widened to whole restart intervals, up to 8 MCUs a side) and the template's own
/// packets, held beside it (about the video file's size).
fn jpeg_limit(cfg: &RenderConfig, jobs: usize) -> usize {
    cfg.jpeg_template.or(cfg.template_cache).unwrap_or_else(|| {
        let (w, h) =
            cfg.avatar.boxes.iter().fold((0, 0), |(w, h), b| {
                (w.max(b.width() as usize + 2 * 8 * MCU), h.max(b.height() as usize + 2 * MCU))
            });
        let packets = std::fs::metadata(&cfg.avatar.video).ok().filter(|m| m.is_file()).map_or(0, |m| m.len());
        let reserve = jobs * FrameJob::bytes(&cfg.avatar.config.crop, w, h) + packets as usize;
        jpeg_template_limit(cfg.memory_budget, reserve)
    })
}

/// The settings the render ran with, for its report.
fn settings_json(cfg: &RenderConfig, opened: &Opened) -> serde_json::Value {
    let unet = &opened.resources.models.unet;
    let template = &opened.resources.template;
    serde_json::json!({
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
        "template_cache_bytes": opened.template_cache,
        "template_store": if template.jpeg.is_some() { "jpeg" } else { "decoder" },
        "template_store_bytes": template.memory_bytes(),
    })
}

/// What the encode stage makes of the output.
fn encoding(cfg: &RenderConfig, fps: i32, track: Receiver<Vec<f32>>) -> Encoding {
    match &cfg.output {
        Output::Dir { format: ImageFormat::Png, .. } => Encoding::Png,
        Output::Dir { format: ImageFormat::Raw, .. } => Encoding::Raw,
        Output::Dir { format: ImageFormat::Jpeg, .. } | Output::Stdout => Encoding::Jpeg(cfg.jpeg_quality),
        Output::Video(path) => Encoding::H264 { path: path.clone(), fps, audio: track },
    }
}

/// The render's one graph.
fn graph_config(cfg: &RenderConfig, opened: Opened, encoding: Encoding) -> GraphConfig {
    let AvatarResources { avatar, models, template } = opened.resources;
    let cap = cfg.capacity.max(1);
    let batch = models.unet.max_batch();
    GraphConfig {
        id: 0,
        template: Template { template: template.template, cache: opened.template_cache, jpeg: template.jpeg },
        start_frame: avatar.config.start_frame,
        first_index: cfg.first_index,
        live: None,
        avatar,
        encoder: models.encoder,
        unet: models.unet,
        input_rate: SAMPLE_RATE,
        encoding,
        blend: cfg.blend,
        batch,
        jobs: opened.jobs,
        capacity: cap,
        audio_ahead: cap.max(batch.get()),
        max_frames: cfg.max_frames,
        progress: cfg.progress.clone(),
        layout: Layout::Staged,
    }
}

/// The sound track of an H.264 output, sent to its encoder as the source reads it.
struct Track {
    tx: Option<Sender<Vec<f32>>>,
    /// Samples still to send: with `max_frames` the track stops with the video (the graph still
    /// reads the rest).
    left: usize,
}

impl Track {
    fn new(cfg: &RenderConfig, fps: i32, tx: Sender<Vec<f32>>) -> Self {
        Self {
            tx: matches!(cfg.output, Output::Video(_)).then_some(tx),
            left: cfg.max_frames.map_or(usize::MAX, |m| track_samples(m, fps)),
        }
    }

    fn send(&mut self, chunk: &[f32]) {
        if let Some(tx) = &self.tx {
            let n = chunk.len().min(self.left);
            let _ = tx.send(chunk[..n].to_vec());
            self.left -= n;
            if self.left == 0 {
                // The track is complete: the encoder need not wait for the rest.
                self.tx = None;
            }
        }
    }
}

/// The source: the audio file decoded and resampled packet by packet (memory flat in its
/// length) and sent in whole chunks of [`CHUNK`] samples as they fill (the rest with the end),
/// so the graph sees the same chunks whatever the file's packet size.
fn feed(
    audio: &Path,
    mut track: Track,
    recycle: &Receiver<Vec<f32>>,
    out: &mut Out<AudioIn>,
) -> Result<(), StageError> {
    let fail = |e: AudioError| StageError::failed(None, e);
    let mut file = AudioFile16k::open(audio).map_err(fail)?;
    let mut pending = Vec::new();
    let mut more = true;
    while more {
        more = file.read(&mut pending).map_err(fail)?;
        let whole = if more { pending.len() - pending.len() % CHUNK } else { pending.len() };
        for chunk in pending[..whole].chunks(CHUNK) {
            // The track first, so the encoder has each frame's audio by the time the frame comes.
            track.send(chunk);
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
}

/// One stage's figures for the report.
struct StageRun {
    name: String,
    metrics: StageMetrics,
    cpu: f64,
    core: Option<usize>,
}

impl StageRun {
    fn summary(&self) -> StageSummary {
        StageSummary {
            name: self.name.clone(),
            service_ms: Percentiles::of(&self.metrics.service),
            wait_ms: Percentiles::of(&self.metrics.wait),
            cpu_seconds: self.cpu,
            core: self.core,
        }
    }
}

/// The UNet batcher's figures.
fn unet_run(unet: &UnetService) -> StageRun {
    let st = unet.stats();
    StageRun {
        name: StageId::Unet.name().into(),
        metrics: StageMetrics { service: lock(&st.service).clone(), wait: lock(&st.wait).clone() },
        cpu: st.cpu_us.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-6,
        core: None,
    }
}
