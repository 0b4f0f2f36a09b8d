//! The offline topology behind `lipsync render`.
//!
//! ```text
//! audio_decode -> mel -> windows -> encoder -> features --\
//!                                                          +-> unet -> composite -> encode -> sink
//! video (template fetch) -> prep (batch tensors) ---------/
//! ```
//!
//! Every stage is a thread; channels are bounded (`capacity` items each); frame jobs and image
//! batches come from fixed pools and go back to them after the sink, so memory in flight is
//! bounded by the pools, not by the length of the input, and steady state allocates nothing per
//! frame on the image path. Frames are produced in order; the count is exactly `L + 2` (or
//! `--max-frames`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use lipsync_stages::audio::{load_16k, SAMPLE_RATE};
use lipsync_stages::avatar::{Avatar, CropParams};
use lipsync_stages::encode::VideoWriter;
use lipsync_stages::face::{input_len, output_len, template_index, template_len, Blend, Compositor, FacePrep};
use lipsync_stages::features::{window_count, AudioEncoder, FeatureAssembler, WindowTracker, FRAME_AUDIO_LEN};
use lipsync_stages::frame::BgrFrame;
use lipsync_stages::image_io::{encode_png, JpegEncoder};
use lipsync_stages::mel::{mel_frames, MelSpectrogram};
use lipsync_stages::onnx::{OrtRuntime, SessionOptions};
use lipsync_stages::staged::{check_new_dir, parent_dir, StagedDir};
use lipsync_stages::template::TemplateFrames;
use lipsync_stages::unet::{Provider, Unet};

use crate::metrics::{Clock, LatencyRecorder, Percentiles, RunReport, StageMetrics, StageSummary};
use crate::runtime::{PinPolicy, Pipeline, PipelineError, Pool, StageCtx, StageError};

/// Image format of a frames directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// `000000.jpg`, ...
    Jpeg,
    /// `000000.png`, ... (lossless)
    Png,
    /// `000000.bgr`, ... raw BGR24 bytes, plus `frames.json` with the size.
    Raw,
}

impl ImageFormat {
    fn ext(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Png => "png",
            ImageFormat::Raw => "bgr",
        }
    }
}

/// Where frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A new directory of numbered frames (built under a temporary name, renamed when complete).
    Dir {
        /// The directory (must not exist, or be empty).
        path: PathBuf,
        /// Frame format.
        format: ImageFormat,
    },
    /// Concatenated JPEGs (an MJPEG stream) on standard output.
    Stdout,
    /// An H.264 `.mp4`/`.mkv`/`.mov` with the audio muxed (temporary file, renamed).
    Video(PathBuf),
}

/// Progress callback: (frames done, total when known).
pub type ProgressFn = Arc<dyn Fn(u64, Option<u64>) + Send + Sync>;

/// Everything `render` needs.
pub struct RenderConfig {
    /// The validated avatar.
    pub avatar: Avatar,
    /// The audio file.
    pub audio: PathBuf,
    /// Where frames go.
    pub output: Output,
    /// UNet batch (1..=32).
    pub batch: usize,
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
    /// Thread pinning.
    pub pin: PinPolicy,
    /// JPEG quality.
    pub jpeg_quality: u8,
    /// Stop after this many frames.
    pub max_frames: Option<usize>,
    /// Paste-back blending.
    pub blend: Blend,
    /// Raw template bytes to keep decoded (the rest is held compressed).
    pub template_budget: usize,
    /// Called by the sink after each frame with (frames done, total when known).
    pub progress: Option<ProgressFn>,
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

/// One frame travelling from the video stage to the sink (then back to the pool).
pub struct FrameJob {
    /// Output frame index.
    pub index: usize,
    /// Template frame used.
    pub template: usize,
    /// The frame being built.
    pub frame: BgrFrame,
    /// The 328 crop, kept for paste-back.
    pub c328: Vec<u8>,
    /// UNet output ([3, 320, 320]).
    pub output: Vec<f32>,
    /// Encoded bytes (JPEG/PNG).
    pub encoded: Vec<u8>,
    /// When the frame entered the pipeline.
    pub t_in: quanta::Instant,
}

/// A batch of prepared frames: their model inputs side by side, and the jobs.
pub struct ImageBatch {
    images: Vec<f32>,
    jobs: Vec<FrameJob>,
}

/// One frame's audio tensor ([32, 16, 16]).
pub struct AudioTensor {
    index: usize,
    data: Vec<f32>,
}

fn failed(e: impl std::fmt::Display) -> StageError {
    StageError::msg(e)
}

/// Runs the offline render and returns when every frame is written (or the first error).
pub fn render(rt: &OrtRuntime, cfg: RenderConfig) -> Result<RenderOutcome, PipelineError> {
    let setup = |stage: &str, e: String| PipelineError { stage: stage.to_string(), frame: None, message: e };
    let crop: CropParams = cfg.avatar.config.crop;
    let n = cfg.batch;
    let cap = cfg.capacity.max(1);
    let io = cfg.avatar.config.models.io.clone();
    let opts = SessionOptions { intra_threads: cfg.intra_threads.max(1), spinning: cfg.spinning };
    let unet = Unet::open(rt, &cfg.avatar.unet, &io, &crop, n, &opts, cfg.provider)
        .map_err(|e| setup("unet", e.to_string()))?;
    let enc_opts = SessionOptions { intra_threads: 1, spinning: false };
    let encoder = AudioEncoder::open(rt, &cfg.avatar.encoder, &io, cfg.encoder_batch, &enc_opts)
        .map_err(|e| setup("encoder", e.to_string()))?;
    prepare_output(&cfg.output).map_err(|e| setup("sink", e))?;

    let clock = Clock::new();
    let started = Instant::now();
    let t0 = clock.now();
    let mut p = Pipeline::new(cfg.pin.clone(), clock.clone());
    let total = Arc::new(AtomicU64::new(u64::MAX));
    let max_frames = cfg.max_frames.unwrap_or(usize::MAX);

    let (pcm_tx, pcm_rx) = bounded::<Vec<f32>>(cap);
    let (full_tx, full_rx) = bounded::<Arc<Vec<f32>>>(1);
    let (rows_tx, rows_rx) = bounded::<Vec<f32>>(cap);
    let (win_tx, win_rx) = bounded::<Vec<f32>>(cap);
    let (o_tx, o_rx) = bounded::<Vec<f32>>(cap);
    let (aud_tx, aud_rx) = bounded::<AudioTensor>(cap.max(n));
    let (job_tx, job_rx) = bounded::<FrameJob>(cap);
    let (batch_tx, batch_rx) = bounded::<ImageBatch>(1);
    let (comp_tx, comp_rx) = bounded::<FrameJob>(cap.max(n));
    let (enc_tx, enc_rx) = bounded::<FrameJob>(cap);
    let (sink_tx, sink_rx) = bounded::<FrameJob>(cap);

    let audio_pool = Pool::new(2 * n + cap + 2, || AudioTensor { index: 0, data: vec![0.0; FRAME_AUDIO_LEN] });
    let job_pool = Pool::new(2 * n + 3 * cap + 4, || FrameJob {
        index: 0,
        template: 0,
        frame: BgrFrame::default(),
        c328: vec![0; template_len(&crop)],
        output: vec![0.0; output_len(&crop)],
        encoded: Vec::new(),
        t_in: clock.now(),
    });
    let batch_pool =
        Pool::new(3, || ImageBatch { images: vec![0.0; n * input_len(&crop)], jobs: Vec::with_capacity(n) });

    // audio_decode: file -> 16 kHz mono, in 200 ms chunks.
    {
        let audio = cfg.audio.clone();
        let total = total.clone();
        let want_full = matches!(cfg.output, Output::Video(_));
        p.spawn("audio_decode", false, move |ctx| {
            let t = ctx.clock.now();
            let samples = load_16k(&audio).map_err(failed)?;
            let l = window_count(mel_frames(samples.len())).map_err(failed)?;
            total.store((l + 2).min(max_frames) as u64, Ordering::SeqCst);
            let samples = Arc::new(samples);
            if want_full {
                ctx.send(&full_tx, samples.clone())?;
            }
            ctx.metrics.record_service(ctx.clock.now().duration_since(t));
            for chunk in samples.chunks(SAMPLE_RATE as usize / 5) {
                ctx.send(&pcm_tx, chunk.to_vec())?;
            }
            Ok(())
        })?;
    }
    // mel: incremental rows.
    p.spawn("mel", false, move |ctx| {
        let mut mel = MelSpectrogram::new();
        while let Some(chunk) = ctx.recv(&pcm_rx)? {
            let t = ctx.clock.now();
            let mut rows = Vec::with_capacity((chunk.len() / 200 + 1) * 80);
            mel.push(&chunk, &mut rows);
            ctx.metrics.record_service(ctx.clock.now().duration_since(t));
            if !rows.is_empty() {
                ctx.send(&rows_tx, rows)?;
            }
        }
        let mut rows = Vec::new();
        mel.finish(&mut rows);
        ctx.send(&rows_tx, rows)?;
        Ok(())
    })?;
    // windows: final windows as soon as their rows are.
    p.spawn("windows", false, move |ctx| {
        let mut tracker = WindowTracker::new();
        while let Some(rows) = ctx.recv(&rows_rx)? {
            let t = ctx.clock.now();
            let mut w = Vec::new();
            tracker.push(&rows, &mut w);
            ctx.metrics.record_service(ctx.clock.now().duration_since(t));
            if !w.is_empty() {
                ctx.send(&win_tx, w)?;
            }
        }
        let mut w = Vec::new();
        tracker.finish(&mut w).map_err(failed)?;
        ctx.send(&win_tx, w)?;
        Ok(())
    })?;
    // encoder: batches of windows through the audio encoder.
    {
        let mut encoder = encoder;
        let batch = cfg.encoder_batch;
        p.spawn("encoder", false, move |ctx| {
            let mut pending: Vec<f32> = Vec::new();
            let mut open = true;
            while open {
                match ctx.recv(&win_rx)? {
                    Some(w) => pending.extend_from_slice(&w),
                    None => open = false,
                }
                let ready = pending.len() / lipsync_stages::features::WINDOW_LEN;
                if ready >= batch || (!open && ready > 0) {
                    let t = ctx.clock.now();
                    let mut o = Vec::with_capacity(ready * 512);
                    encoder.encode(&pending, &mut o).map_err(failed)?;
                    pending.clear();
                    ctx.metrics.record_service(ctx.clock.now().duration_since(t));
                    ctx.send(&o_tx, o)?;
                }
            }
            Ok(())
        })?;
    }
    // features: per-frame audio tensors, in order.
    {
        let pool = audio_pool.clone();
        p.spawn("features", false, move |ctx| {
            let mut asm = FeatureAssembler::new();
            // Ready tensors, flat, reused: (frame index, offset into `flat`).
            let mut ready: Vec<usize> = Vec::new();
            let mut flat: Vec<f32> = Vec::new();
            let emit = |ctx: &mut StageCtx, ready: &mut Vec<usize>, flat: &mut Vec<f32>| -> Result<bool, StageError> {
                for (k, &i) in ready.iter().enumerate() {
                    if i >= max_frames {
                        return Ok(false);
                    }
                    let mut t = pool.take(ctx)?;
                    t.index = i;
                    t.data.copy_from_slice(&flat[k * FRAME_AUDIO_LEN..(k + 1) * FRAME_AUDIO_LEN]);
                    ctx.send(&aud_tx, t)?;
                }
                ready.clear();
                flat.clear();
                Ok(true)
            };
            while let Some(o) = ctx.recv(&o_rx)? {
                let t = ctx.clock.now();
                asm.push(&o, |i, tensor| {
                    ready.push(i);
                    flat.extend_from_slice(tensor);
                });
                ctx.metrics.record_service(ctx.clock.now().duration_since(t));
                if !emit(ctx, &mut ready, &mut flat)? {
                    return Ok(());
                }
            }
            asm.finish(|i, tensor| {
                ready.push(i);
                flat.extend_from_slice(tensor);
            });
            emit(ctx, &mut ready, &mut flat)?;
            Ok(())
        })?;
    }
    // video: template frames in ping-pong order into pooled jobs.
    {
        let pool = job_pool.clone();
        let video = cfg.avatar.video.clone();
        let budget = cfg.template_budget;
        let start = cfg.avatar.config.start_frame;
        let boxes = cfg.avatar.boxes.len();
        let total = total.clone();
        p.spawn("video", false, move |ctx| {
            // Decoded lazily: the first pass of the ping-pong walks the template in order.
            let mut template = TemplateFrames::open(&video, budget).map_err(failed)?;
            let mut i = 0usize;
            loop {
                if i as u64 >= total.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let mut job = pool.take(ctx)?;
                let t = ctx.clock.now();
                job.index = i;
                job.template = template_index(i, boxes, start);
                job.t_in = t;
                template.get(job.template, &mut job.frame).map_err(|e| {
                    StageError::at(i, format!("{e} (the avatar has {boxes} boxes: truncated or corrupt video?)"))
                })?;
                ctx.metrics.record_service(ctx.clock.now().duration_since(t));
                ctx.send(&job_tx, job)?;
                i += 1;
            }
        })?;
    }
    // prep: model inputs straight into the batch tensor.
    {
        let pool = batch_pool.clone();
        let boxes = cfg.avatar.boxes.clone();
        p.spawn("prep", false, move |ctx| {
            let mut prep = FacePrep::new();
            let slot = input_len(&crop);
            let mut batch: Option<ImageBatch> = None;
            while let Some(mut job) = ctx.recv(&job_rx)? {
                if batch.is_none() {
                    batch = Some(pool.take(ctx)?);
                }
                let b = batch.as_mut().expect("taken above");
                let t = ctx.clock.now();
                let k = b.jobs.len();
                prep.prep(
                    &job.frame,
                    boxes[job.template],
                    &crop,
                    &mut job.c328,
                    &mut b.images[k * slot..(k + 1) * slot],
                );
                b.jobs.push(job);
                ctx.metrics.record_service(ctx.clock.now().duration_since(t));
                if b.jobs.len() == n {
                    ctx.send(&batch_tx, batch.take().expect("full batch"))?;
                }
            }
            if let Some(b) = batch.filter(|b| !b.jobs.is_empty()) {
                ctx.send(&batch_tx, b)?;
            }
            Ok(())
        })?;
    }
    // unet: joins image batches with audio tensors; runs batches of up to N.
    {
        let mut unet = unet;
        let apool = audio_pool.clone();
        let bpool = batch_pool.clone();
        p.spawn("unet", true, move |ctx| {
            let slot = input_len(&crop);
            let out_len = output_len(&crop);
            let mut audio = vec![0f32; n * FRAME_AUDIO_LEN];
            let mut out = vec![0f32; n * out_len];
            let mut tensors: Vec<AudioTensor> = Vec::with_capacity(n);
            'outer: while let Some(mut batch) = ctx.recv(&batch_rx)? {
                let mut jobs = std::mem::take(&mut batch.jobs);
                let mut cursor = 0;
                while !jobs.is_empty() {
                    let room = jobs.len();
                    // Wait for the next frame's audio, then take what fills the batch.
                    tensors.clear();
                    while tensors.len() < room {
                        match ctx.recv(&aud_rx)? {
                            Some(t) => tensors.push(t),
                            None => break,
                        }
                    }
                    if tensors.is_empty() {
                        break 'outer;
                    }
                    let k = tensors.len();
                    for (j, t) in tensors.drain(..).enumerate() {
                        if t.index != jobs[j].index {
                            return Err(StageError::at(t.index, "audio and image streams out of step"));
                        }
                        audio[j * FRAME_AUDIO_LEN..(j + 1) * FRAME_AUDIO_LEN].copy_from_slice(&t.data);
                        apool.give(t);
                    }
                    let t = ctx.clock.now();
                    unet.run(k, &batch.images[cursor * slot..(cursor + k) * slot], &audio, &mut out)
                        .map_err(|e| StageError::at(jobs[0].index, e))?;
                    ctx.metrics.record_service(ctx.clock.now().duration_since(t));
                    for (j, mut job) in jobs.drain(..k).enumerate() {
                        job.output.copy_from_slice(&out[j * out_len..(j + 1) * out_len]);
                        ctx.send(&comp_tx, job)?;
                    }
                    cursor += k;
                    if k < room {
                        break 'outer;
                    }
                }
                batch.jobs = jobs;
                bpool.give(batch);
            }
            Ok(())
        })?;
    }
    // composite: paste-back.
    {
        let boxes = cfg.avatar.boxes.clone();
        let blend = cfg.blend;
        p.spawn("composite", false, move |ctx| {
            let mut comp = Compositor::new();
            while let Some(mut job) = ctx.recv(&comp_rx)? {
                let t = ctx.clock.now();
                let b = boxes[job.template];
                let FrameJob { frame, c328, output, .. } = &mut job;
                comp.paste(frame, b, &crop, c328, output, blend);
                ctx.metrics.record_service(ctx.clock.now().duration_since(t));
                ctx.send(&enc_tx, job)?;
            }
            Ok(())
        })?;
    }
    // encode: JPEG / PNG bytes, or H.264 into the video file.
    {
        let output = cfg.output.clone();
        let quality = cfg.jpeg_quality;
        let fps = cfg.avatar.config.fps.round().max(1.0) as i32;
        p.spawn("encode", false, move |ctx| {
            let mut jpeg = JpegEncoder::new(quality).map_err(failed)?;
            let mut scratch = Vec::new();
            let mut writer: Option<VideoWriter> = None;
            while let Some(mut job) = ctx.recv(&enc_rx)? {
                let t = ctx.clock.now();
                match &output {
                    Output::Dir { format: ImageFormat::Png, .. } => {
                        encode_png(&job.frame, &mut job.encoded, &mut scratch)
                            .map_err(|e| StageError::at(job.index, e))?
                    }
                    Output::Dir { format: ImageFormat::Raw, .. } => {}
                    Output::Dir { format: ImageFormat::Jpeg, .. } | Output::Stdout => {
                        // Size each job's buffer for the worst case once, so it never regrows.
                        let max = jpeg.max_len(job.frame.width, job.frame.height);
                        if job.encoded.capacity() < max {
                            job.encoded.reserve_exact(max - job.encoded.len());
                        }
                        let bytes = jpeg.encode(&job.frame).map_err(|e| StageError::at(job.index, e))?;
                        job.encoded.clear();
                        job.encoded.extend_from_slice(bytes);
                    }
                    Output::Video(path) => {
                        if writer.is_none() {
                            let audio = ctx.recv(&full_rx)?.ok_or(StageError::Cancelled)?;
                            writer = Some(
                                VideoWriter::create(path, job.frame.width, job.frame.height, fps, audio)
                                    .map_err(|e| StageError::at(job.index, e))?,
                            );
                        }
                        writer
                            .as_mut()
                            .expect("created above")
                            .write(&job.frame)
                            .map_err(|e| StageError::at(job.index, e))?;
                    }
                }
                ctx.metrics.record_service(ctx.clock.now().duration_since(t));
                ctx.send(&sink_tx, job)?;
            }
            if let Some(w) = writer {
                w.finish().map_err(failed)?;
            }
            Ok(())
        })?;
    }
    // sink: files / stdout; latency; progress; jobs back to the pool.
    let (lat_tx, lat_rx) = bounded::<(LatencyRecorder, usize, Option<(quanta::Instant, quanta::Instant)>)>(1);
    {
        let output = cfg.output.clone();
        let progress = cfg.progress.clone();
        let pool = job_pool.clone();
        let total = total.clone();
        p.spawn("sink", false, move |ctx| {
            let mut lat = LatencyRecorder::default();
            let mut done = 0usize;
            let mut span: Option<(quanta::Instant, quanta::Instant)> = None;
            let mut sink = Sink::open(&output).map_err(failed)?;
            while let Some(job) = ctx.recv(&sink_rx)? {
                let t = ctx.clock.now();
                if job.index != done {
                    return Err(StageError::at(job.index, format!("frame {} arrived out of order", job.index)));
                }
                sink.write(&job).map_err(|e| StageError::at(job.index, e))?;
                done += 1;
                let now = ctx.clock.now();
                span = Some((span.map_or(now, |s| s.0), now));
                lat.record(now.duration_since(job.t_in));
                ctx.metrics.record_service(now.duration_since(t));
                pool.give(job);
                if let Some(cb) = &progress {
                    let t = total.load(Ordering::SeqCst);
                    cb(done as u64, (t != u64::MAX).then_some(t));
                }
            }
            let expected = total.load(Ordering::SeqCst);
            if expected == u64::MAX || done as u64 != expected {
                return Err(failed(format!("only {done} of {expected} frames reached the sink")));
            }
            sink.finish().map_err(failed)?;
            let _ = lat_tx.send((lat, done, span));
            Ok(())
        })?;
    }
    drop(job_pool);
    drop(audio_pool);
    drop(batch_pool);

    let reports = p.join()?;
    let (e2e, frames, span) = lat_rx.try_recv().map_err(|_| setup("sink", "no result".into()))?;
    let wall = started.elapsed();
    let (steady, first) = match span {
        Some((a, b)) if frames > 1 => {
            ((frames - 1) as f64 / b.duration_since(a).as_secs_f64().max(1e-9), a.duration_since(t0).as_secs_f64())
        }
        _ => (0.0, wall.as_secs_f64()),
    };
    let report = RunReport {
        kind: "render".into(),
        frames: frames as u64,
        wall_seconds: wall.as_secs_f64(),
        frames_per_second: frames as f64 / wall.as_secs_f64().max(1e-9),
        steady_frames_per_second: steady,
        first_frame_seconds: first,
        end_to_end_ms: Percentiles::of(&e2e.e2e),
        stages: reports
            .iter()
            .map(|r| StageSummary {
                name: r.name.clone(),
                service_ms: Percentiles::of(&r.metrics.service),
                wait_ms: Percentiles::of(&r.metrics.wait),
                cpu_seconds: r.cpu_seconds,
                core: r.core,
            })
            .collect(),
        settings: serde_json::json!({
            "avatar": cfg.avatar.root.display().to_string(),
            "audio": cfg.audio.display().to_string(),
            "batch": cfg.batch,
            "encoder_batch": cfg.encoder_batch,
            "capacity": cap,
            "intra_threads": cfg.intra_threads,
            "provider": format!("{:?}", cfg.provider),
            "pin": format!("{:?}", cfg.pin),
        }),
    };
    let histograms = reports.into_iter().map(|r| (r.name, r.metrics)).collect();
    Ok(RenderOutcome { frames, report, histograms, e2e })
}

/// Checks the output location before anything runs.
fn prepare_output(output: &Output) -> Result<(), String> {
    match output {
        Output::Dir { path, .. } => check_new_dir(path),
        Output::Stdout => Ok(()),
        Output::Video(path) => {
            let parent = parent_dir(path);
            if !parent.is_dir() {
                return Err(format!("directory {} does not exist", parent.display()));
            }
            Ok(())
        }
    }
}

/// The sink's writer.
enum Sink {
    Dir { dir: StagedDir, format: ImageFormat, size: (usize, usize), frames: usize, file: PathBuf, name: String },
    Stdout(std::io::BufWriter<std::io::Stdout>),
    Video,
}

impl Sink {
    fn open(output: &Output) -> Result<Self, String> {
        Ok(match output {
            Output::Dir { path, format } => {
                let dir = StagedDir::create(path)?;
                let file = dir.dir().join("000000.ext");
                Sink::Dir { dir, format: *format, size: (0, 0), frames: 0, file, name: String::with_capacity(32) }
            }
            Output::Stdout => Sink::Stdout(std::io::BufWriter::new(std::io::stdout())),
            Output::Video(_) => Sink::Video,
        })
    }

    fn write(&mut self, job: &FrameJob) -> Result<(), String> {
        use std::io::Write;
        match self {
            Sink::Dir { format, size, frames, file, name, .. } => {
                use std::fmt::Write as _;
                name.clear();
                let _ = write!(name, "{:06}.{}", job.index, format.ext());
                file.set_file_name(&*name);
                let bytes: &[u8] = if *format == ImageFormat::Raw { &job.frame.data } else { &job.encoded };
                std::fs::write(&*file, bytes).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
                *size = (job.frame.width, job.frame.height);
                *frames += 1;
                Ok(())
            }
            Sink::Stdout(out) => out.write_all(&job.encoded).map_err(|e| format!("cannot write to stdout: {e}")),
            Sink::Video => Ok(()),
        }
    }

    fn finish(&mut self) -> Result<(), String> {
        use std::io::Write;
        match self {
            Sink::Dir { dir, format, size, frames, .. } => {
                if *format == ImageFormat::Raw {
                    let meta =
                        serde_json::json!({"format": "bgr24", "width": size.0, "height": size.1, "frames": frames});
                    std::fs::write(dir.dir().join("frames.json"), format!("{meta}\n")).map_err(|e| e.to_string())?;
                }
                dir.commit()
            }
            Sink::Stdout(out) => out.flush().map_err(|e| format!("cannot write to stdout: {e}")),
            Sink::Video => Ok(()),
        }
    }
}

#[allow(dead_code)]
fn assert_send() {
    fn is_send<T: Send>() {}
    is_send::<FrameJob>();
    is_send::<ImageBatch>();
    is_send::<Receiver<FrameJob>>();
    is_send::<Sender<AudioTensor>>();
}
