//! The encode stage: each composited frame to JPEG or PNG bytes in the job, or into an H.264
//! video file (whose audio track is the signal that drove the lips).

use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use lipsync_stages::encode::VideoWriter;
use lipsync_stages::image_io::{encode_png, JpegEncoder};

use crate::job::{FrameJob, FrameStats};
use crate::runtime::{Out, Stage, StageError};

/// What the encode stage makes of a frame.
pub enum Encoding {
    /// JPEG bytes in `FrameJob::encoded` (quality 1..=100).
    Jpeg(u8),
    /// PNG bytes in `FrameJob::encoded`.
    Png,
    /// Nothing: the sink takes the raw BGR frame.
    Raw,
    /// H.264 frames into a video file; the 16 kHz audio track comes on `audio` before the
    /// first frame is written.
    H264 {
        /// The output file (written under a temporary name, renamed by `finish`).
        path: PathBuf,
        /// Frames per second.
        fps: i32,
        /// The whole 16 kHz signal, sent once by the source.
        audio: Receiver<Arc<Vec<f32>>>,
    },
}

/// Frame in, encoded frame out. Not `Send` (FFmpeg's contexts are not): build it on its own
/// thread with [`crate::runtime::Pipeline::stage_built`].
pub struct EncodeStage {
    encoding: Encoding,
    stats: Arc<FrameStats>,
    written: usize,
    jpeg: Option<JpegEncoder>,
    scratch: Vec<u8>,
    writer: Option<VideoWriter>,
}

impl EncodeStage {
    /// A stage for `encoding` (the JPEG encoder and video writer are made on the stage's own
    /// thread, on first use).
    pub fn new(encoding: Encoding, stats: Arc<FrameStats>) -> Self {
        Self { encoding, stats, written: 0, jpeg: None, scratch: Vec::new(), writer: None }
    }
}

impl Stage for EncodeStage {
    type In = FrameJob;
    type Out = FrameJob;

    fn process(&mut self, mut job: FrameJob, out: &mut Out<'_, FrameJob>) -> Result<(), StageError> {
        let at = |e: &dyn std::fmt::Display| StageError::at(job.index, e);
        match &self.encoding {
            Encoding::Png => encode_png(&job.frame, &mut job.encoded, &mut self.scratch).map_err(|e| at(&e))?,
            Encoding::Raw => {}
            Encoding::Jpeg(quality) => {
                if self.jpeg.is_none() {
                    self.jpeg = Some(JpegEncoder::new(*quality).map_err(|e| at(&e))?);
                }
                let jpeg = self.jpeg.as_mut().expect("made above");
                // Size each job's buffer for the worst case once, so it never regrows.
                let max = jpeg.max_len(job.frame.width, job.frame.height);
                if job.encoded.capacity() < max {
                    job.encoded.reserve_exact(max - job.encoded.len());
                }
                let bytes = jpeg.encode(&job.frame).map_err(|e| at(&e))?;
                job.encoded.clear();
                job.encoded.extend_from_slice(bytes);
            }
            Encoding::H264 { path, fps, audio } => {
                if self.writer.is_none() {
                    let audio = recv_audio(audio, out)?;
                    let w = VideoWriter::create(path, job.frame.width, job.frame.height, *fps, audio)
                        .map_err(|e| at(&e))?;
                    self.writer = Some(w);
                }
                self.writer.as_mut().expect("made above").write(&job.frame).map_err(|e| at(&e))?;
                self.written += 1;
            }
        }
        out.send(job)
    }

    /// Completes the video, only when every frame of the audio is in it (else it is removed).
    fn finish(&mut self, _out: &mut Out<'_, FrameJob>) -> Result<(), StageError> {
        if let Some(w) = self.writer.take() {
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
            w.finish().map_err(|e| StageError::failed(None, e))?;
        }
        Ok(())
    }
}

/// Waits for the audio track (the source sends it before its first samples).
fn recv_audio(rx: &Receiver<Arc<Vec<f32>>>, out: &Out<'_, FrameJob>) -> Result<Arc<Vec<f32>>, StageError> {
    loop {
        if out.cancelled() {
            return Err(StageError::Cancelled);
        }
        match rx.recv_timeout(std::time::Duration::from_millis(20)) {
            Ok(a) => return Ok(a),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Err(StageError::Cancelled),
        }
    }
}
