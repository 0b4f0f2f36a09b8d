//! The one stage graph behind `lipsync render` and every `lipsync serve` session.
//!
//! ```text
//! source -> audio -> frames -> prep -> [UNet batcher] -> composite -> encode -> sink
//!          (16 kHz, mel,  (template   (model   (shared,    (paste-back) (JPEG/PNG/  (files, stdout,
//!           windows,       frame +     input)   batches               H.264)       socket)
//!           encoder, F)    audio)               across graphs)
//! ```
//!
//! Render and a session differ only in their source (a file read whole, or audio pushed as it
//! arrives from a socket) and their sink (files or stdout, or the socket). Each stage is a
//! [`Stage`](crate::runtime::Stage) of this module on its own thread; channels are
//! bounded; frame jobs come from a fixed pool taken by `frames` and given back by `sink`, so
//! the frames in flight (and the memory and the latency a backlog adds) are bounded by
//! `jobs`, whatever the length of the audio. A frame leaves `audio` as soon as its audio is
//! final (docs/spec.md section 7), so for the same samples every source gives the same
//! frames, bit for bit.
//!
//! The stages, one file each (compute comes from `lipsync-stages`; these add the per-item glue
//! the runtime drives): [`audio`], [`frames`], [`prep`], the [`unet`] batcher, [`composite`],
//! [`encode`] and [`sink`].

pub mod audio;
pub mod composite;
pub mod encode;
pub mod frames;
pub mod prep;
pub mod sink;
pub mod unet;

use std::sync::{Arc, Mutex};

use crossbeam_channel::{bounded, Receiver, Sender};
use lipsync_stages::audio::{AudioError, StreamResampler, SAMPLE_RATE};
use lipsync_stages::face::Blend;
use lipsync_stages::features::AudioEncoder;
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::unet::Batch;

use crate::graph::audio::AudioStage;
use crate::graph::composite::CompositeStage;
use crate::graph::encode::{EncodeStage, Encoding};
use crate::graph::frames::{FramesStage, Template};
use crate::graph::prep::PrepStage;
use crate::graph::sink::{FrameSink, ProgressFn, SinkStage};
use crate::graph::unet::{UnetReply, UnetService};
use crate::job::{AudioIn, AudioTensor, FrameJob, FrameStats};
use crate::live::Live;
use crate::runtime::{Chain, Discard, Pipeline, PipelineError, Placement, Pool};

/// A stage of the graph, in graph order. Its [`name`](StageId::name) names its thread
/// (`ls-NAME`) and its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StageId {
    /// 16 kHz audio -> mel -> windows -> audio encoder -> per-frame features.
    Audio,
    /// The template frame and the audio of each frame.
    Frames,
    /// The UNet's input.
    Prep,
    /// The UNet batcher (shared between graphs: not one of a graph's threads).
    Unet,
    /// Paste-back.
    Composite,
    /// JPEG, PNG, raw or H.264.
    Encode,
    /// Files, stdout or the socket.
    Sink,
}

impl StageId {
    /// The stages each graph runs on threads of its own, in order.
    pub const THREADS: [StageId; 6] =
        [StageId::Audio, StageId::Frames, StageId::Prep, StageId::Composite, StageId::Encode, StageId::Sink];

    /// Its name in metrics, reports and thread names.
    pub const fn name(self) -> &'static str {
        match self {
            StageId::Audio => "audio",
            StageId::Frames => "frames",
            StageId::Prep => "prep",
            StageId::Unet => "unet",
            StageId::Composite => "composite",
            StageId::Encode => "encode",
            StageId::Sink => "sink",
        }
    }

    /// The names of [`StageId::THREADS`], in order.
    pub fn thread_names() -> [&'static str; 6] {
        StageId::THREADS.map(StageId::name)
    }
}

impl std::fmt::Display for StageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The name of one thread running `parts` fused in order (`frames+prep`).
fn fused_name(parts: &[StageId]) -> String {
    parts.iter().map(|p| p.name()).collect::<Vec<_>>().join("+")
}

/// How the graph's stages map to threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One thread per stage: the most overlap (a render, or a daemon with cores to spare).
    #[default]
    Staged,
    /// Three threads: `audio`, `frames+prep`, `composite+encode+sink` (the same stages, fewer
    /// hops and threads: many sessions on few cores). Metrics still come per stage.
    Compact,
}

/// Audio chunks queued between the source and the audio stage.
pub const AUDIO_QUEUE: usize = 4;

/// Everything one graph needs (render and sessions fill it the same way).
pub struct GraphConfig {
    /// This graph's id among the UNet batcher's producers.
    pub id: u64,
    /// The avatar (boxes, crop geometry, frame rate).
    pub avatar: Arc<Avatar>,
    /// Its template frames.
    pub template: Template,
    /// Where the ping-pong walk through the template starts.
    pub start_frame: usize,
    /// Frame `i` takes the template position of frame `first_index + i` (a render that
    /// reproduces a live session's utterance that began at that frame; 0 otherwise).
    pub first_index: usize,
    /// A live session's clock (idle frames, interrupts, pacing); `None` for a render or a
    /// session that streams as fast as it can.
    pub live: Option<Arc<Live>>,
    /// The audio encoder (shared by the graphs that use the model).
    pub encoder: Arc<Mutex<AudioEncoder>>,
    /// The UNet batcher of the avatar's model.
    pub unet: Arc<UnetService>,
    /// Sample rate of the audio the source sends (resampled to 16 kHz in the graph).
    pub input_rate: u32,
    /// What the encode stage makes.
    pub encoding: Encoding,
    /// Paste-back blending.
    pub blend: Blend,
    /// At most this many of this graph's frames per UNet run.
    pub batch: Batch,
    /// Frame jobs in flight, from `frames` to `sink` (at least 1).
    pub jobs: usize,
    /// Capacity of the channels between image stages (at least 1).
    pub capacity: usize,
    /// Audio tensors queued ahead of `frames` (at least 1).
    pub audio_ahead: usize,
    /// Stop after this many frames.
    pub max_frames: Option<usize>,
    /// Called by the sink after each frame.
    pub progress: Option<ProgressFn>,
    /// Threads per stage.
    pub layout: Layout,
}

/// A graph setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// A count that must be positive is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// JPEG quality outside 1..=100.
    #[error("JPEG quality {0} is out of range: expected 1..=100")]
    Quality(u8),
    /// A JPEG template that cannot serve this graph's output.
    #[error("the template's JPEG frames {0}")]
    JpegTemplate(String),
    /// The avatar's crop geometry is not the one its UNet batcher was opened for.
    #[error("the avatar's crop geometry differs from its UNet service's")]
    Crop,
    /// The input sample rate cannot be resampled.
    #[error(transparent)]
    Rate(#[from] AudioError),
    /// A stage thread could not start.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

impl GraphConfig {
    /// Checks every setting once, before anything starts.
    pub fn validate(&self) -> Result<(), GraphError> {
        for (name, v) in [("jobs", self.jobs), ("capacity", self.capacity), ("audio_ahead", self.audio_ahead)] {
            if v == 0 {
                return Err(GraphError::Zero(name));
            }
        }
        if self.max_frames == Some(0) {
            return Err(GraphError::Zero("max_frames"));
        }
        if let Encoding::Jpeg(q) = self.encoding {
            if !(1..=100).contains(&q) {
                return Err(GraphError::Quality(q));
            }
        }
        if let Some(store) = &self.template.jpeg {
            match self.encoding {
                Encoding::Jpeg(q) if q == store.quality() => {}
                Encoding::Jpeg(q) => {
                    let why = format!("are at quality {}, the output at {q} (expected the same)", store.quality());
                    return Err(GraphError::JpegTemplate(why));
                }
                _ => return Err(GraphError::JpegTemplate("serve JPEG output only".into())),
            }
            if store.len() != self.avatar.boxes.len() {
                let why = format!(
                    "are {}, the avatar has {} boxes (expected one each)",
                    store.len(),
                    self.avatar.boxes.len()
                );
                return Err(GraphError::JpegTemplate(why));
            }
        }
        if *self.unet.crop() != self.avatar.config.crop {
            return Err(GraphError::Crop);
        }
        Ok(())
    }
}

/// A built graph: the source's end of it.
pub struct Graph {
    /// Where the source sends audio.
    pub input: Sender<AudioIn>,
    /// Sample buffers coming back from the audio stage for reuse.
    pub recycle: Receiver<Vec<f32>>,
    /// What the graph has done so far.
    pub stats: Arc<FrameStats>,
}

/// Adds the graph's stages to `p`, writing frames to `sink`; the caller adds the source (or
/// feeds [`Graph::input`] itself) and joins `p`.
pub fn build(p: &mut Pipeline, cfg: GraphConfig, sink: Box<dyn FrameSink>) -> Result<Graph, GraphError> {
    cfg.validate()?;
    let resampler = if cfg.input_rate == SAMPLE_RATE { None } else { Some(StreamResampler::new(cfg.input_rate)?) };
    let crop = cfg.avatar.config.crop;
    let stats = Arc::new(FrameStats::default());
    let clock = p.clock().clone();
    let cap = cfg.capacity;

    let (audio_tx, audio_rx) = bounded::<AudioIn>(AUDIO_QUEUE);
    let (recycle_tx, recycle_rx) = bounded::<Vec<f32>>(AUDIO_QUEUE + 2);
    let (tensor_tx, tensor_rx) = bounded::<AudioTensor>(cfg.audio_ahead);
    let (reply_tx, reply_rx) = bounded::<UnetReply>(cfg.jobs);
    let tensors = Pool::new(cfg.audio_ahead + 1, || AudioTensor::new(clock.now()));
    let live = cfg.live.clone();
    let jobs = Pool::new(cfg.jobs, || FrameJob::new(&crop, clock.now(), live.clone()));
    let max_frames = cfg.max_frames.unwrap_or(usize::MAX);
    let port = cfg.unet.port(cfg.id, cfg.batch, reply_tx, p.cancel_flag());

    let mut audio =
        AudioStage::new(resampler, cfg.encoder, tensors.clone(), Some(recycle_tx), stats.clone(), max_frames);
    if let Some(l) = &cfg.live {
        audio = audio.live(l.clone(), (cfg.input_rate != SAMPLE_RATE).then_some(cfg.input_rate));
    }
    p.stage(StageId::Audio.name(), Placement::Worker, audio, audio_rx, tensor_tx)?;
    let boxes = cfg.avatar.boxes.len();
    let start = (cfg.start_frame, cfg.first_index);
    let store = cfg.template.jpeg.clone();
    let (template, job_pool, st) = (cfg.template, jobs.clone(), stats.clone());
    let frames = move || FramesStage::new(template, boxes, start, job_pool, tensors, st);
    let prep = PrepStage::new(cfg.avatar.clone());
    let composite = CompositeStage::new(cfg.avatar, cfg.blend);
    let encoding = cfg.encoding;
    let enc_stats = stats.clone();
    let mut sink = SinkStage::new(sink, jobs, stats.clone(), cfg.progress);
    if let Some(l) = cfg.live {
        sink = sink.live(l);
    }
    let [_, f, pr, c, e, s] = StageId::thread_names();
    match cfg.layout {
        Layout::Staged => {
            let (frames_tx, frames_rx) = bounded::<FrameJob>(cap);
            let (comp_tx, comp_rx) = bounded::<FrameJob>(cap);
            let (enc_tx, enc_rx) = bounded::<FrameJob>(cap);
            p.stage_built(f, Placement::Worker, frames, tensor_rx, frames_tx)?;
            p.stage(pr, Placement::Worker, prep, frames_rx, port)?;
            p.stage(c, Placement::Worker, composite, reply_rx, comp_tx)?;
            p.stage_built(e, Placement::Worker, move || EncodeStage::new(encoding, enc_stats, store), comp_rx, enc_tx)?;
            p.stage(s, Placement::Worker, sink, enc_rx, Discard)?;
        }
        Layout::Compact => {
            let front = move || Chain::new(f, frames(), Some(pr), prep);
            let name = fused_name(&[StageId::Frames, StageId::Prep]);
            p.stage_built(&name, Placement::Worker, front, tensor_rx, port)?;
            let back = move || {
                Chain::new(
                    c,
                    composite,
                    None,
                    Chain::new(e, EncodeStage::new(encoding, enc_stats, store), Some(s), sink),
                )
            };
            let name = fused_name(&[StageId::Composite, StageId::Encode, StageId::Sink]);
            p.stage_built(&name, Placement::Worker, back, reply_rx, Discard)?;
        }
    }
    Ok(Graph { input: audio_tx, recycle: recycle_rx, stats })
}
