//! The items that travel through the graph: audio in, per-frame audio tensors, frame jobs;
//! and the per-run counters every graph keeps.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hdrhistogram::Histogram;
use lipsync_stages::crop::{CropBox, CropParams};
use lipsync_stages::face::{output_len, template_len};
use lipsync_stages::features::FRAME_AUDIO_LEN;
use lipsync_stages::frame::BgrFrame;
use lipsync_stages::jpeg::McuRegion;

use crate::live::Live;
use crate::metrics::{histogram, LatencyRecorder, Percentiles};
use crate::runtime::lock;

/// Audio into the graph (from a file source or a socket source).
pub enum AudioIn {
    /// Mono samples at the graph's input rate, and when they arrived.
    Samples(Vec<f32>, quanta::Instant),
    /// The end of the audio, and when it was announced (a live session: the end of the
    /// session, after its current utterance).
    End(quanta::Instant),
    /// Live sessions: the end of the current utterance (idle frames follow it).
    EndUtterance(quanta::Instant),
    /// Live sessions: the clock has reached this slot; idle frames are due up to it.
    Tick(usize),
    /// Live sessions: drop the audio before this and resume at frame `resume`, in
    /// generation `generation` ([`crate::live::Live::interrupt`]).
    Interrupt {
        /// The new generation.
        generation: u64,
        /// The index of the next frame.
        resume: usize,
    },
}

/// What kind of frame a job makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FrameKind {
    /// Frame `frame` of utterance `utterance` (a render, or a session without real time, is
    /// utterance 0): the UNet's mouth on the template frame.
    #[default]
    Speech,
    /// A live session's idle frame: the template frame as it is (no UNet run).
    Idle,
}

/// Where a frame stands in its session (live sessions number utterances from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameMark {
    /// Speech or idle.
    pub kind: FrameKind,
    /// The interrupt generation that made it ([`crate::live::Live`]).
    pub generation: u64,
    /// The utterance (speech frames).
    pub utterance: u32,
    /// The frame's index within its utterance (speech frames).
    pub frame: u32,
}

/// One frame's audio tensor (`[32, 16, 16]`, docs/spec.md section 2), from the audio stage to
/// the frames stage.
pub struct AudioTensor {
    /// Output frame index.
    pub index: usize,
    /// Speech or idle, its utterance and generation.
    pub mark: FrameMark,
    /// Whether this is the last frame of the audio.
    pub last: bool,
    /// The tensor.
    pub data: Vec<f32>,
    /// When the audio that made it final arrived.
    pub t_audio: quanta::Instant,
}

impl AudioTensor {
    /// An empty tensor (for pools).
    pub fn new(t: quanta::Instant) -> Self {
        Self { index: 0, mark: FrameMark::default(), last: false, data: vec![0.0; FRAME_AUDIO_LEN], t_audio: t }
    }
}

/// One frame on its way through the graph: taken from the graph's pool by the frames stage,
/// given back by the sink. Every buffer is sized once, so steady state allocates nothing.
pub struct FrameJob {
    /// Output frame index.
    pub index: usize,
    /// Speech or idle, its utterance and generation.
    pub mark: FrameMark,
    /// The live session it belongs to, if any (set once, when the pool is made).
    pub live: Option<Arc<Live>>,
    /// Whether this is the last frame of the audio (the UNet batcher does not wait after it).
    pub last: bool,
    /// Template frame used.
    pub template: usize,
    /// The frame being built (the template frame, then the composited frame): all of it, or
    /// (JPEG output from a [`lipsync_stages::template::JpegTemplate`]) the region around the
    /// face box.
    pub frame: BgrFrame,
    /// Where `frame` lies in the template frame.
    pub region: McuRegion,
    /// The 328 crop: the UNet's image input is made from it in the batch (so a job carries
    /// bytes, not the 6-channel float tensor), and it is kept for paste-back.
    pub c328: Vec<u8>,
    /// UNet audio input (`[32, 16, 16]`).
    pub audio: Vec<f32>,
    /// UNet output as bytes (`[3, S, S]`, [`lipsync_stages::face::quantize_output`]).
    pub pred: Vec<u8>,
    /// Encoded bytes (JPEG/PNG), when the encoding makes them.
    pub encoded: Vec<u8>,
    /// When the audio that made this frame final arrived.
    pub t_audio: quanta::Instant,
    /// When the frame entered the image path (its job was taken).
    pub t_in: quanta::Instant,
}

impl FrameJob {
    /// Bytes a job's buffers hold for `crop` on a `width x height` template (the encoded frame
    /// not counted).
    pub fn bytes(crop: &CropParams, width: usize, height: usize) -> usize {
        width * height * 3 + template_len(crop) + output_len(crop) + FRAME_AUDIO_LEN * 4
    }

    /// An empty job with buffers sized for `crop` (for pools), of live session `live`.
    pub fn new(crop: &CropParams, t: quanta::Instant, live: Option<Arc<Live>>) -> Self {
        Self {
            index: 0,
            mark: FrameMark::default(),
            live,
            last: false,
            template: 0,
            frame: BgrFrame::default(),
            region: McuRegion::default(),
            c328: vec![0; template_len(crop)],
            audio: vec![0.0; FRAME_AUDIO_LEN],
            pred: vec![0; output_len(crop)],
            encoded: Vec::new(),
            t_audio: t,
            t_in: t,
        }
    }
}

/// Gives `buf` room for `total` elements in all, once (a job's buffers are sized for their
/// worst case on first use, so steady state never regrows them).
pub(crate) fn reserve_total<T>(buf: &mut Vec<T>, total: usize) {
    if buf.capacity() < total {
        buf.reserve_exact(total - buf.len());
    }
}

impl FrameJob {
    /// Whether an interrupt has made this frame unwanted (it is then dropped, not sent).
    pub fn is_stale(&self) -> bool {
        self.live.as_ref().is_some_and(|l| !l.is_current(self.mark.generation))
    }

    /// Face box `b` (template frame coordinates) in `frame`'s coordinates.
    pub fn local(&self, b: CropBox) -> CropBox {
        self.region.local(b)
    }

    /// Whether the frame needs no UNet run (idle, or stale).
    pub fn skips_unet(&self) -> bool {
        self.mark.kind == FrameKind::Idle || self.is_stale()
    }
}

/// What one run of the graph has done so far: read live (daemon stats, progress bars) and at
/// the end (reports).
pub struct FrameStats {
    /// When the run started.
    pub started: Instant,
    /// Frames the audio makes (`L + 2`, or the frame cap), once known; `usize::MAX` before.
    pub total: AtomicUsize,
    /// Frames written by the sink.
    pub frames: AtomicU64,
    /// Time to the first frame (µs after start; 0 until then).
    pub first_frame_us: AtomicU64,
    /// Frames prepared and not yet written.
    pub in_flight: AtomicU64,
    /// Per frame: from the arrival of the audio that made it final to the frame written.
    pub latency: Mutex<Histogram<u64>>,
    /// Per frame: from entering the image path to the frame written.
    pub e2e: Mutex<LatencyRecorder>,
    /// When the first and the last frame were written.
    pub span: Mutex<Option<(quanta::Instant, quanta::Instant)>>,
}

impl Default for FrameStats {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            total: AtomicUsize::new(usize::MAX),
            frames: AtomicU64::new(0),
            first_frame_us: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            latency: Mutex::new(histogram()),
            e2e: Mutex::new(LatencyRecorder::default()),
            span: Mutex::new(None),
        }
    }
}

impl FrameStats {
    /// The frame count, once the audio has ended.
    pub fn total(&self) -> Option<usize> {
        Some(self.total.load(Ordering::SeqCst)).filter(|&t| t != usize::MAX)
    }

    /// Frames written.
    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::SeqCst)
    }

    /// Audio-to-frame latency percentiles (ms).
    pub fn latency(&self) -> Percentiles {
        Percentiles::of(&lock(&self.latency))
    }
}
