//! The frames stage: each frame's audio tensor meets its template frame (ping-pong order,
//! docs/spec.md section 6) in a job taken from the graph's pool: the whole frame from the
//! template's reader, or, for JPEG output from a [`JpegTemplate`], the exact pixels of the
//! region around the face box (nothing is decoded; an idle frame takes none).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use lipsync_stages::face::template_index;
use lipsync_stages::io::video::VideoError;
use lipsync_stages::jpeg::McuRegion;
use lipsync_stages::template::{JpegTemplate, RegionReader, SharedTemplate, TemplateReader};

use crate::job::{reserve_total, AudioTensor, FrameJob, FrameKind, FrameStats};
use crate::runtime::{Out, Pool, Stage, StageError};

/// The template a graph reads, and how many bytes of decoded frames its reader keeps.
pub struct Template {
    /// The template, opened once and shared read-only (by a daemon's sessions).
    pub template: Arc<SharedTemplate>,
    /// Bytes of decoded frames this graph's reader keeps.
    pub cache: usize,
    /// For JPEG output at its quality: the template's frames ready for compositing in the JPEG
    /// domain (then the reader is not used).
    pub jpeg: Option<Arc<JpegTemplate>>,
}

/// Audio tensor in, job with the template frame and the audio out. The template's reader (its
/// FFmpeg decoder) is made by the stage's own thread on first use, as FFmpeg's contexts stay on
/// one thread: build the stage there with [`crate::runtime::Pipeline::stage_built`].
pub struct FramesStage {
    template: Template,
    reader: Option<TemplateReader>,
    regions: Option<RegionReader>,
    boxes: usize,
    start: usize,
    first_index: usize,
    jobs: Pool<FrameJob>,
    tensors: Pool<AudioTensor>,
    stats: Arc<FrameStats>,
}

impl FramesStage {
    /// A stage over `template` with `boxes` face boxes, starting the ping-pong at `start`;
    /// frame `i` takes the template position of frame `first_index + i` (docs/spec.md section 6).
    pub fn new(
        template: Template,
        boxes: usize,
        (start, first_index): (usize, usize),
        jobs: Pool<FrameJob>,
        tensors: Pool<AudioTensor>,
        stats: Arc<FrameStats>,
    ) -> Self {
        Self { template, reader: None, regions: None, boxes, start, first_index, jobs, tensors, stats }
    }
}

impl FramesStage {
    /// The reader, made on first use (on the stage's own thread).
    fn reader(&mut self) -> &mut TemplateReader {
        let t = &self.template;
        self.reader.get_or_insert_with(|| t.template.clone().reader(t.cache))
    }
}

impl Stage for FramesStage {
    type In = AudioTensor;
    type Out = FrameJob;

    fn process(&mut self, tensor: AudioTensor, out: &mut Out<'_, FrameJob>) -> Result<(), StageError> {
        let mut job = out.take(&self.jobs)?;
        job.index = tensor.index;
        job.mark = tensor.mark;
        job.last = tensor.last;
        job.t_audio = tensor.t_audio;
        job.t_in = out.clock().now();
        job.template = template_index(self.first_index + tensor.index, self.boxes, self.start);
        if job.mark.kind == FrameKind::Speech {
            job.audio.copy_from_slice(&tensor.data);
        }
        self.tensors.give(tensor);
        let boxes = self.boxes;
        if let Some(store) = &self.template.jpeg {
            let f = store.frame(job.template).ok_or_else(|| {
                StageError::at(job.index, format!("template frame {} of {boxes} is not held", job.template))
            })?;
            job.region = f.region;
            if job.mark.kind == FrameKind::Speech {
                // Sized for the largest region once, so it never regrows.
                reserve_total(&mut job.frame.data, store.max_region_bytes());
                if self.regions.is_none() {
                    self.regions = Some(RegionReader::new().map_err(|e| StageError::failed(Some(job.index), e))?);
                }
                let regions = self.regions.as_mut().expect("made above");
                f.read_region(regions, &mut job.frame).map_err(|e| StageError::failed(Some(job.index), e))?;
            }
        } else {
            self.reader().get(job.template, &mut job.frame).map_err(|e: VideoError| {
                StageError::at(job.index, format!("{e} (the avatar has {boxes} boxes: truncated or corrupt video?)"))
            })?;
            job.region = McuRegion::whole(job.frame.width, job.frame.height);
        }
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        out.send(job)
    }

    fn finish(&mut self, _out: &mut Out<'_, FrameJob>) -> Result<(), StageError> {
        if let Some(r) = &self.reader {
            tracing::debug!(decoded = r.decoded(), cache_bytes = self.template.cache, "template frames decoded");
        }
        Ok(())
    }
}
