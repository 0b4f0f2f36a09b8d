//! The frames stage: each frame's audio tensor meets its template frame (ping-pong order,
//! docs/spec.md section 6) in a job taken from the graph's pool.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use lipsync_stages::face::template_index;
use lipsync_stages::frame::BgrFrame;
use lipsync_stages::io::video::VideoError;
use lipsync_stages::template::{SharedTemplate, TemplateFrames};

use crate::job::{AudioTensor, FrameJob, FrameStats};
use crate::runtime::{Out, Pool, Stage, StageError};

/// Where template frames come from.
pub enum Template {
    /// A template decoded on first use by this graph, within a raw-frame budget (render).
    Lazy {
        /// The video file or frames directory.
        path: PathBuf,
        /// Raw bytes to keep decoded.
        budget: usize,
    },
    /// A template decoded once and shared read-only by many graphs (a daemon's sessions).
    Shared(Arc<SharedTemplate>),
}

/// Audio tensor in, job with the template frame and the audio out. A lazy template's decoder
/// is opened by the stage's own thread (FFmpeg's contexts stay on it): build the stage there
/// with [`crate::runtime::Pipeline::stage_built`].
pub struct FramesStage {
    template: Template,
    opened: Option<Box<TemplateFrames>>,
    boxes: usize,
    start: usize,
    jobs: Pool<FrameJob>,
    tensors: Pool<AudioTensor>,
    stats: Arc<FrameStats>,
}

impl FramesStage {
    /// A stage over `template` with `boxes` face boxes, starting the ping-pong at `start`.
    pub fn new(
        template: Template,
        boxes: usize,
        start: usize,
        jobs: Pool<FrameJob>,
        tensors: Pool<AudioTensor>,
        stats: Arc<FrameStats>,
    ) -> Self {
        Self { template, opened: None, boxes, start, jobs, tensors, stats }
    }
}

impl FramesStage {
    fn get(&mut self, i: usize, out: &mut BgrFrame) -> Result<(), VideoError> {
        match &self.template {
            Template::Lazy { path, budget } => {
                if self.opened.is_none() {
                    self.opened = Some(Box::new(TemplateFrames::open(path, *budget)?));
                }
                self.opened.as_mut().expect("opened above").get(i, out)
            }
            Template::Shared(t) => t.get(i, out),
        }
    }
}

impl Stage for FramesStage {
    type In = AudioTensor;
    type Out = FrameJob;

    fn process(&mut self, tensor: AudioTensor, out: &mut Out<'_, FrameJob>) -> Result<(), StageError> {
        let mut job = out.take(&self.jobs)?;
        job.index = tensor.index;
        job.last = tensor.last;
        job.t_audio = tensor.t_audio;
        job.t_in = out.clock().now();
        job.template = template_index(tensor.index, self.boxes, self.start);
        job.audio.copy_from_slice(&tensor.data);
        self.tensors.give(tensor);
        let boxes = self.boxes;
        self.get(job.template, &mut job.frame).map_err(|e| {
            StageError::at(job.index, format!("{e} (the avatar has {boxes} boxes: truncated or corrupt video?)"))
        })?;
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        out.send(job)
    }
}
