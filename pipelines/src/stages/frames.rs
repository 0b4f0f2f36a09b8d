//! The frames stage: each frame's audio tensor meets its template frame (ping-pong order,
//! docs/spec.md section 6) in a job taken from the graph's pool: the whole frame from the
//! template's reader, or, for JPEG output from a [`JpegTemplate`], the exact pixels of the
//! region around the face box (nothing is decoded; an idle frame takes none).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use lipsync_stages::face::template_index;
use lipsync_stages::frame::BgrFrame;
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::io::video::VideoError;
use lipsync_stages::jpeg::McuRegion;
use lipsync_stages::template::{JpegTemplate, JpegTemplateBuilder, RegionReader, SharedTemplate, TemplateReader};

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

/// Opens the avatar's template; for JPEG output at `quality`, builds its [`JpegTemplate`] in
/// the same decode when it fits in `limit` bytes (else frames are decoded as they are needed).
/// The JPEG frames are made on a second thread while the next frame decodes.
pub fn open_template(
    avatar: &Avatar,
    budget: usize,
    jpeg: Option<(u8, usize)>,
) -> Result<(SharedTemplate, Option<JpegTemplate>), String> {
    let Some((quality, limit)) = jpeg else {
        return SharedTemplate::open(&avatar.video, budget).map(|t| (t, None)).map_err(|e| e.to_string());
    };
    let mut builder = JpegTemplateBuilder::new(quality, &avatar.boxes, limit).map_err(|e| e.to_string())?;
    let boxes = avatar.boxes.len();
    // Set once the builder is over its limit: the decode then sends it nothing more.
    let over = &std::sync::atomic::AtomicBool::new(false);
    // One frame goes to the builder and comes back: it is made into a JPEG while the decoder
    // makes the next frame in its own buffer (a second copy would cost 2.8 MB at 720p and
    // gain little: the copy is short).
    let (frames_tx, frames_rx) = crossbeam_channel::bounded::<(usize, BgrFrame)>(1);
    let (spare_tx, spare_rx) = crossbeam_channel::bounded::<BgrFrame>(1);
    spare_tx.send(BgrFrame::default()).expect("room for one");
    let (opened, built) = std::thread::scope(|s| {
        let worker = std::thread::Builder::new().name("ls-template".into()).spawn_scoped(s, move || {
            for (i, frame) in frames_rx {
                builder.push(i, &frame)?;
                over.store(builder.over_limit(), Ordering::Relaxed);
                let _ = spare_tx.send(frame);
            }
            Ok::<_, lipsync_stages::image_io::ImageError>(builder)
        });
        let worker = match worker {
            Ok(w) => w,
            Err(e) => return (Err(format!("could not start a thread: {e}")), None),
        };
        let mut visit = |i: usize, f: &BgrFrame| {
            if i >= boxes || over.load(Ordering::Relaxed) {
                return Ok(());
            }
            // A closed channel means the builder stopped with an error, reported below.
            let mut buf = spare_rx.recv().map_err(|_| "the JPEG frames builder stopped".to_string())?;
            buf.copy_from(f);
            frames_tx.send((i, buf)).map_err(|_| "the JPEG frames builder stopped".to_string())
        };
        let opened = SharedTemplate::open_with(&avatar.video, budget, &mut visit).map_err(|e| e.to_string());
        drop(frames_tx);
        (opened, Some(worker.join()))
    });
    let builder = match built {
        Some(Ok(Ok(b))) => b,
        Some(Ok(Err(e))) => return Err(format!("making the template's JPEG frames: {e}")),
        Some(Err(_)) => return Err("the JPEG frames builder panicked".into()),
        None => return opened.map(|t| (t, None)),
    };
    let template = opened?;
    if builder.over_limit() {
        tracing::info!("the template's JPEG frames would not fit in memory: decoding frames as needed");
    }
    Ok((template, builder.finish()))
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
                    self.regions = Some(RegionReader::new().map_err(|e| StageError::at(job.index, e))?);
                }
                let regions = self.regions.as_mut().expect("made above");
                f.read_region(regions, &mut job.frame).map_err(|e| StageError::at(job.index, e))?;
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
