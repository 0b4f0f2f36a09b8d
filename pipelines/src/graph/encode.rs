//! The encode stage: each composited frame to JPEG or PNG bytes in the job, or into an H.264
//! video file (whose audio track is the signal that drove the lips). With a [`JpegTemplate`],
//! a JPEG is the template frame's with the composited region's restart intervals spliced in
//! (the same bytes as encoding the whole frame, [`lipsync_stages::jpeg`]), and an idle frame is
//! the template frame's JPEG as it is.

use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use lipsync_stages::image_io::encode_png;
use lipsync_stages::jpeg::{max_len, JpegEncoder, JpegSplicer};
use lipsync_stages::template::JpegTemplate;
use lipsync_stages::video_writer::VideoWriter;

use crate::job::{reserve_total, FrameJob, FrameStats};
use crate::runtime::{Out, Stage, StageError};

/// What the encode stage makes of a frame.
pub enum Encoding {
    /// JPEG bytes in `FrameJob::encoded` (quality 1..=100).
    Jpeg(u8),
    /// PNG bytes in `FrameJob::encoded`.
    Png,
    /// Nothing: the sink takes the raw BGR frame.
    Raw,
    /// H.264 frames into a video file with its 16 kHz sound track, which the source sends on
    /// `audio` in chunks as it reads them and ends by dropping its sender (so the track is never
    /// held whole).
    H264 {
        /// The output file (written under a temporary name, renamed by `finish`).
        path: PathBuf,
        /// Frames per second.
        fps: i32,
        /// The 16 kHz signal, in chunks, ahead of the frames it belongs to.
        audio: Receiver<Vec<f32>>,
    },
}

/// Frame in, encoded frame out. Not `Send` (FFmpeg's contexts are not): build it on its own
/// thread with [`crate::runtime::Pipeline::stage_built`].
pub struct EncodeStage {
    encoding: Encoding,
    stats: Arc<FrameStats>,
    written: usize,
    jpeg: Option<JpegEncoder>,
    store: Option<Arc<JpegTemplate>>,
    splicer: Option<JpegSplicer>,
    scratch: Vec<u8>,
    writer: Option<VideoWriter>,
}

impl EncodeStage {
    /// A stage for `encoding` (the JPEG encoder and video writer are made on the stage's own
    /// thread, on first use); JPEG frames are spliced into `store`'s when there is one (the
    /// graph checks its quality is the encoding's).
    pub fn new(encoding: Encoding, stats: Arc<FrameStats>, store: Option<Arc<JpegTemplate>>) -> Self {
        Self { encoding, stats, written: 0, jpeg: None, store, splicer: None, scratch: Vec::new(), writer: None }
    }
}

impl Stage for EncodeStage {
    type In = FrameJob;
    type Out = FrameJob;

    fn process(&mut self, mut job: FrameJob, out: &mut Out<'_, FrameJob>) -> Result<(), StageError> {
        if job.is_stale() {
            // Interrupted: the sink drops it.
            return out.send(job);
        }
        let at = |e: &dyn std::fmt::Display| StageError::at(job.index, e);
        match &self.encoding {
            Encoding::Png => encode_png(&job.frame, &mut job.encoded, &mut self.scratch).map_err(|e| at(&e))?,
            Encoding::Raw => {}
            Encoding::Jpeg(quality) => {
                // Size each job's buffer for the frame's worst case once, so it never regrows.
                let (w, h) = self.store.as_ref().map_or((job.frame.width, job.frame.height), |s| s.size());
                reserve_total(&mut job.encoded, max_len(w, h));
                match &self.store {
                    Some(store) => {
                        let base = store
                            .frame(job.template)
                            .ok_or_else(|| at(&format!("template frame {} is not held", job.template)))?;
                        if self.splicer.is_none() {
                            self.splicer = Some(JpegSplicer::new(*quality).map_err(|e| at(&e))?);
                        }
                        let splicer = self.splicer.as_mut().expect("made above");
                        if job.skips_unet() {
                            // Idle: the template frame as it is.
                            job.encoded.clear();
                            job.encoded.extend_from_slice(&base.jpeg);
                        } else {
                            let index = job.index;
                            let FrameJob { frame, region, encoded, .. } = &mut job;
                            splicer
                                .splice(&base.jpeg, &base.layout, (w, h), frame, *region, encoded)
                                .map_err(|e| StageError::at(index, e))?;
                        }
                    }
                    None => {
                        if self.jpeg.is_none() {
                            self.jpeg = Some(JpegEncoder::new(*quality).map_err(|e| at(&e))?);
                        }
                        let bytes = self.jpeg.as_mut().expect("made above").encode(&job.frame).map_err(|e| at(&e))?;
                        job.encoded.clear();
                        job.encoded.extend_from_slice(bytes);
                    }
                }
            }
            Encoding::H264 { path, fps, audio } => {
                if self.writer.is_none() {
                    let w = VideoWriter::create(path, job.frame.width, job.frame.height, *fps).map_err(|e| at(&e))?;
                    self.writer = Some(w);
                }
                let w = self.writer.as_mut().expect("made above");
                // What the source has sent; the writer encodes the track up to each frame's end
                // as far as it has it, and catches up on later frames. Waiting here could block
                // the graph: frames run on the audio's 25 frames/s clock, the track on the
                // avatar's frame rate.
                recv_audio(audio, w, false, out)?;
                w.write(&job.frame).map_err(|e| at(&e))?;
                self.written += 1;
            }
        }
        out.send(job)
    }

    /// Completes the video, only when every frame of the audio is in it (else it is removed).
    fn finish(&mut self, out: &mut Out<'_, FrameJob>) -> Result<(), StageError> {
        if let Some(mut w) = self.writer.take() {
            match self.stats.total() {
                Some(t) if t == self.written => {}
                t => {
                    let total = t.map_or("an unknown number".to_string(), |t| t.to_string());
                    return Err(StageError::msg(format!(
                        "only {} of {total} frames reached the encoder",
                        self.written
                    )));
                }
            }
            if let Encoding::H264 { audio, .. } = &self.encoding {
                recv_audio(audio, &mut w, true, out)?;
            }
            w.finish().map_err(|e| StageError::failed(None, e))?;
        }
        Ok(())
    }
}

/// Takes the sound-track chunks the source has sent; with `to_end`, waits until the source is
/// done (it drops its sender).
fn recv_audio(
    rx: &Receiver<Vec<f32>>,
    w: &mut VideoWriter,
    to_end: bool,
    out: &Out<'_, FrameJob>,
) -> Result<(), StageError> {
    loop {
        let chunk = if to_end {
            if out.cancelled() {
                return Err(StageError::Cancelled);
            }
            match rx.recv_timeout(std::time::Duration::from_millis(20)) {
                Ok(c) => c,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        } else {
            match rx.try_recv() {
                Ok(c) => c,
                Err(_) => return Ok(()),
            }
        };
        w.push_audio(&chunk);
    }
}
