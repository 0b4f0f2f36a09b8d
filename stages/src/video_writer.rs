//! MP4/MKV output: H.264 video (libx264 through libavcodec) with the audio muxed as AAC,
//! both starting at time 0, written to a temporary file and renamed into place when complete.
//!
//! The audio track is the 16 kHz mono signal that drives the lips (what the mel stage saw),
//! encoded at 64 kb/s AAC; video frame i has pts i at the avatar's frame rate.

use std::path::{Path, PathBuf};

use ffmpeg_next as ff;

use crate::frame::BgrFrame;
use crate::io::video::init_ffmpeg;

/// Errors writing a video file.
#[derive(Debug, thiserror::Error)]
#[error("could not write video {}: {failure}", path.display())]
pub struct EncodeError {
    /// The output file.
    pub path: PathBuf,
    /// What went wrong.
    #[source]
    pub failure: EncodeFailure,
}

/// What went wrong writing a video file.
#[derive(Debug, thiserror::Error)]
pub enum EncodeFailure {
    /// The temporary file beside the output could not be made or renamed into place.
    #[error(transparent)]
    Staged(#[from] crate::io::staged::StagedError),
    /// This FFmpeg has no encoder for a track.
    #[error("no {0} encoder in this FFmpeg")]
    NoEncoder(&'static str),
    /// An FFmpeg call failed.
    #[error("{step}: {source}")]
    Ffmpeg {
        /// What was being done.
        step: &'static str,
        /// FFmpeg's error.
        source: ff::Error,
    },
}

/// An [`EncodeFailure::Ffmpeg`] at `step`.
fn at(step: &'static str) -> impl Fn(ff::Error) -> EncodeFailure {
    move |source| EncodeFailure::Ffmpeg { step, source }
}

/// An open MP4/MKV writer (not `Send`: create it on the thread that uses it). Dropped
/// unfinished, it leaves nothing behind.
pub struct VideoWriter {
    path: PathBuf,
    tmp: Option<crate::io::staged::StagedFile>,
    octx: ff::format::context::Output,
    venc: ff::encoder::Video,
    aenc: ff::encoder::Audio,
    vindex: usize,
    aindex: usize,
    vtb: ff::Rational,
    atb: ff::Rational,
    scaler: ff::software::scaling::Context,
    bgr: ff::frame::Video,
    yuv: ff::frame::Video,
    afr: ff::frame::Audio,
    /// Track samples received and not yet encoded; `audio[0]` is sample `audio_pos`.
    audio: Vec<f32>,
    audio_pos: usize,
    frame_size: usize,
    frames: i64,
    fps: i32,
}

/// Sound-track samples (16 kHz) the first `frames` frames at `fps` span: what the writer has
/// encoded once it has written them.
pub fn track_samples(frames: usize, fps: i32) -> usize {
    frames.saturating_mul(crate::audio::SAMPLE_RATE as usize) / fps.max(1) as usize
}

impl std::fmt::Debug for VideoWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoWriter").field("path", &self.path).field("frames", &self.frames).finish()
    }
}

impl VideoWriter {
    /// Opens `path` (`.mp4`, `.mkv`, `.mov`) for `width x height` frames at `fps`; the sound
    /// track (16 kHz mono f32) comes through [`VideoWriter::push_audio`].
    pub fn create(path: &Path, width: usize, height: usize, fps: i32) -> Result<Self, EncodeError> {
        Self::open(path, width, height, fps).map_err(|failure| EncodeError { path: path.to_path_buf(), failure })
    }

    fn open(path: &Path, width: usize, height: usize, fps: i32) -> Result<Self, EncodeFailure> {
        init_ffmpeg();
        // An exclusive, unpredictable temporary beside the output; FFmpeg reopens it by name.
        let tmp = crate::io::staged::StagedFile::create(path)?;
        let mut octx = ff::format::output(&tmp.tmp_path()).map_err(at("cannot create the container"))?;
        let global = octx.format().flags().contains(ff::format::Flags::GLOBAL_HEADER);
        let (venc, vindex) = video_track(&mut octx, width, height, fps, global)?;
        let (aenc, aindex) = audio_track(&mut octx, global)?;
        octx.write_header().map_err(at("header"))?;
        let vtb = octx.stream(vindex).expect("stream").time_base();
        let atb = octx.stream(aindex).expect("stream").time_base();
        let scaler = ff::software::scaling::Context::get(
            ff::format::Pixel::BGR24,
            width as u32,
            height as u32,
            ff::format::Pixel::YUV420P,
            width as u32,
            height as u32,
            ff::software::scaling::Flags::BICUBIC,
        )
        .map_err(at("colour conversion"))?;
        let frame_size = (aenc.frame_size() as usize).max(1);
        Ok(Self {
            path: path.to_path_buf(),
            tmp: Some(tmp),
            octx,
            venc,
            aenc,
            vindex,
            aindex,
            vtb,
            atb,
            scaler,
            bgr: ff::frame::Video::new(ff::format::Pixel::BGR24, width as u32, height as u32),
            yuv: ff::frame::Video::empty(),
            afr: ff::frame::Audio::new(
                ff::format::Sample::F32(ff::format::sample::Type::Planar),
                frame_size,
                ff::ChannelLayout::MONO,
            ),
            audio: Vec::new(),
            audio_pos: 0,
            frame_size,
            frames: 0,
            fps,
        })
    }

    fn err(&self, failure: EncodeFailure) -> EncodeError {
        EncodeError { path: self.path.clone(), failure }
    }

    /// Appends sound-track samples; each frame written encodes the audio up to its end, so the
    /// writer holds only the audio received ahead of the video.
    pub fn push_audio(&mut self, samples: &[f32]) {
        self.audio.extend_from_slice(samples);
    }

    /// Sound-track samples received so far.
    fn audio_received(&self) -> usize {
        self.audio_pos + self.audio.len()
    }

    /// Encodes the next frame (and the audio received, up to the frame's end).
    pub fn write(&mut self, frame: &BgrFrame) -> Result<(), EncodeError> {
        let stride = self.bgr.stride(0);
        let row = frame.width * 3;
        {
            let data = self.bgr.data_mut(0);
            for y in 0..frame.height {
                data[y * stride..y * stride + row].copy_from_slice(&frame.data[y * row..(y + 1) * row]);
            }
        }
        self.scaler.run(&self.bgr, &mut self.yuv).map_err(|e| self.err(at("colour conversion")(e)))?;
        self.yuv.set_pts(Some(self.frames));
        self.venc.send_frame(&self.yuv).map_err(|e| self.err(at("H.264 encode")(e)))?;
        self.frames += 1;
        self.drain_video()?;
        let until = track_samples(self.frames as usize, self.fps);
        self.write_audio(until, false)
    }

    fn drain_video(&mut self) -> Result<(), EncodeError> {
        let mut packet = ff::Packet::empty();
        while self.venc.receive_packet(&mut packet).is_ok() {
            packet.set_stream(self.vindex);
            // Each frame lasts one frame period; without it the muxer's edit list cuts the last.
            packet.set_duration(1);
            packet.rescale_ts((1, self.fps), self.vtb);
            packet.write_interleaved(&mut self.octx).map_err(|e| self.err(at("mux")(e)))?;
        }
        Ok(())
    }

    fn write_audio(&mut self, until: usize, last: bool) -> Result<(), EncodeError> {
        let until = until.min(self.audio_received());
        let size = self.frame_size;
        let start = self.audio_pos;
        while self.audio_pos + size <= until || (last && self.audio_pos < until) {
            let n = size.min(until - self.audio_pos);
            // The last frame may be short (the AAC encoder takes a small final frame), so the
            // track lasts exactly as long as the input.
            self.afr.set_samples(n);
            let plane = self.afr.plane_mut::<f32>(0);
            let from = self.audio_pos - start;
            // The sound track is clipped to [-1, 1] (what any player does); the lips were
            // driven by the samples as given.
            for (d, s) in plane[..n].iter_mut().zip(&self.audio[from..from + n]) {
                *d = s.clamp(-1.0, 1.0);
            }
            self.afr.set_pts(Some(self.audio_pos as i64));
            self.aenc.send_frame(&self.afr).map_err(|e| self.err(at("AAC encode")(e)))?;
            self.audio_pos += n;
            self.drain_audio()?;
        }
        self.audio.drain(..self.audio_pos - start);
        Ok(())
    }

    fn drain_audio(&mut self) -> Result<(), EncodeError> {
        let mut packet = ff::Packet::empty();
        while self.aenc.receive_packet(&mut packet).is_ok() {
            packet.set_stream(self.aindex);
            packet.rescale_ts((1, crate::audio::SAMPLE_RATE as i32), self.atb);
            packet.write_interleaved(&mut self.octx).map_err(|e| self.err(at("mux")(e)))?;
        }
        Ok(())
    }

    /// Flushes both encoders, writes the trailer and renames the file into place.
    pub fn finish(mut self) -> Result<usize, EncodeError> {
        let total = self.audio_received();
        self.write_audio(total, true)?;
        self.venc.send_eof().map_err(|e| self.err(at("H.264 flush")(e)))?;
        self.drain_video()?;
        self.aenc.send_eof().map_err(|e| self.err(at("AAC flush")(e)))?;
        self.drain_audio()?;
        self.octx.write_trailer().map_err(|e| self.err(at("trailer")(e)))?;
        let tmp = self.tmp.take().expect("present until finished");
        tmp.commit().map_err(|e| self.err(e.into()))?;
        Ok(self.frames as usize)
    }
}

/// The H.264 track: one encoder thread at a light preset (on small machines every other cycle
/// belongs to the UNet: x264's default thread pool would take cores from ONNX Runtime).
fn video_track(
    octx: &mut ff::format::context::Output,
    width: usize,
    height: usize,
    fps: i32,
    global: bool,
) -> Result<(ff::encoder::Video, usize), EncodeFailure> {
    let codec = ff::encoder::find_by_name("libx264")
        .or_else(|| ff::encoder::find(ff::codec::Id::H264))
        .ok_or(EncodeFailure::NoEncoder("H.264"))?;
    let index = octx.add_stream(codec).map_err(at("video stream"))?.index();
    let mut enc = ff::codec::context::Context::new_with_codec(codec).encoder().video().map_err(at("H.264 encoder"))?;
    enc.set_width(width as u32);
    enc.set_height(height as u32);
    enc.set_format(ff::format::Pixel::YUV420P);
    enc.set_time_base((1, fps));
    enc.set_frame_rate(Some((fps, 1)));
    if global {
        enc.set_flags(ff::codec::Flags::GLOBAL_HEADER);
    }
    let mut opts = ff::Dictionary::new();
    opts.set("preset", "superfast");
    opts.set("crf", "18");
    opts.set("tune", "zerolatency");
    opts.set("threads", "1");
    let enc = enc.open_as_with(codec, opts).map_err(at("H.264 encoder"))?;
    octx.stream_mut(index).expect("stream added").set_parameters(&enc);
    Ok((enc, index))
}

/// The AAC track: 16 kHz mono at 64 kb/s.
fn audio_track(
    octx: &mut ff::format::context::Output,
    global: bool,
) -> Result<(ff::encoder::Audio, usize), EncodeFailure> {
    let codec = ff::encoder::find(ff::codec::Id::AAC).ok_or(EncodeFailure::NoEncoder("AAC"))?;
    let index = octx.add_stream(codec).map_err(at("audio stream"))?.index();
    let mut enc = ff::codec::context::Context::new_with_codec(codec).encoder().audio().map_err(at("AAC encoder"))?;
    enc.set_rate(crate::audio::SAMPLE_RATE as i32);
    enc.set_channel_layout(ff::ChannelLayout::MONO);
    enc.set_format(ff::format::Sample::F32(ff::format::sample::Type::Planar));
    enc.set_bit_rate(64_000);
    enc.set_time_base((1, crate::audio::SAMPLE_RATE as i32));
    if global {
        enc.set_flags(ff::codec::Flags::GLOBAL_HEADER);
    }
    let enc = enc.open_as(codec).map_err(at("AAC encoder"))?;
    octx.stream_mut(index).expect("stream added").set_parameters(&enc);
    Ok((enc, index))
}
