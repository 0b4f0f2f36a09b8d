//! FFmpeg decoding into BGR: the packet/frame loop and the colour conversion every template path
//! shares (so a frame decoded at open, in a reader's ring or by [`VideoReader`] is the same
//! pixels), and a sequential reader of a video file.

use std::path::{Path, PathBuf};

use ffmpeg_next as ff;

use crate::frame::BgrFrame;
use crate::io::video::{at, open_video, OpenedVideo, ReadFailure, VideoError};

/// Pulls the next decoded frame into `frame`, calling `feed` for packets as the decoder asks
/// (`feed` sends one and returns `true`, or returns `false` at the end of the packets, when the
/// decoder is drained). `Ok(false)` once every frame is out.
pub(crate) fn decode_next(
    decoder: &mut ff::decoder::Video,
    frame: &mut ff::frame::Video,
    eof_sent: &mut bool,
    mut feed: impl FnMut(&mut ff::decoder::Video) -> Result<bool, ff::Error>,
) -> Result<bool, ff::Error> {
    loop {
        match decoder.receive_frame(frame) {
            Ok(()) => return Ok(true),
            Err(ff::Error::Eof) => return Ok(false),
            Err(ff::Error::Other { errno }) if errno == ff::util::error::EAGAIN => {}
            Err(e) => return Err(e),
        }
        if *eof_sent {
            return Ok(false);
        }
        if !feed(decoder)? {
            decoder.send_eof()?;
            *eof_sent = true;
        }
    }
}

/// Converts decoded frames (any pixel format) to packed BGR with one swscale context, made for
/// the first frame's format and size and remade if they change.
#[derive(Default)]
pub(crate) struct ToBgr {
    scaler: Option<(ff::format::Pixel, u32, u32, ff::software::scaling::Context)>,
    bgr: Option<ff::frame::Video>,
}

impl ToBgr {
    /// Converts `frame` into `out` (reusing its allocation).
    pub(crate) fn convert(&mut self, frame: &ff::frame::Video, out: &mut BgrFrame) -> Result<(), ReadFailure> {
        let (format, w, h) = (frame.format(), frame.width(), frame.height());
        if !matches!(&self.scaler, Some((f, sw, sh, _)) if *f == format && *sw == w && *sh == h) {
            let ctx = ff::software::scaling::Context::get(
                format,
                w,
                h,
                ff::format::Pixel::BGR24,
                w,
                h,
                ff::software::scaling::Flags::BICUBIC,
            )
            .map_err(at("no BGR conversion"))?;
            self.scaler = Some((format, w, h, ctx));
        }
        let scaler = &mut self.scaler.as_mut().expect("set above").3;
        let bgr = self.bgr.get_or_insert_with(ff::frame::Video::empty);
        scaler.run(frame, bgr).map_err(at("BGR conversion failed"))?;
        let (w, h) = (w as usize, h as usize);
        out.reshape(w, h);
        let stride = bgr.stride(0);
        let data = bgr.data(0);
        for (y, row) in out.data.chunks_exact_mut(w * 3).enumerate() {
            row.copy_from_slice(&data[y * stride..y * stride + w * 3]);
        }
        Ok(())
    }
}

/// Bytes a decoded frame holds in its own pixel format (every plane, with its row padding).
pub(crate) fn frame_bytes(frame: &ff::frame::Video) -> usize {
    (0..frame.planes()).map(|i| frame.stride(i) * frame.plane_height(i) as usize).sum()
}

/// Sequential decoder of a video file's first video stream into BGR frames.
pub struct VideoReader {
    path: PathBuf,
    input: ff::format::context::Input,
    decoder: ff::decoder::Video,
    stream: usize,
    to_bgr: ToBgr,
    yuv: ff::frame::Video,
    eof_sent: bool,
    frames: usize,
    width: u32,
    height: u32,
    fps: Option<f64>,
}

impl std::fmt::Debug for VideoReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoReader").field("path", &self.path).field("frames", &self.frames).finish()
    }
}

impl VideoReader {
    /// Opens `path` and its best video stream.
    pub fn open(path: &Path) -> Result<Self, VideoError> {
        let OpenedVideo { input, index, fps, decoder, .. } = open_video(path)?;
        let (width, height) = (decoder.width(), decoder.height());
        Ok(Self {
            path: path.to_path_buf(),
            input,
            decoder,
            stream: index,
            to_bgr: ToBgr::default(),
            yuv: ff::frame::Video::empty(),
            eof_sent: false,
            frames: 0,
            width,
            height,
            fps,
        })
    }

    /// Frame size.
    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// Frame rate, when the stream states one.
    pub fn fps(&self) -> Option<f64> {
        self.fps
    }

    /// Decodes the next frame into `out`; `Ok(false)` at the end of the stream.
    pub fn next(&mut self, out: &mut BgrFrame) -> Result<bool, VideoError> {
        let (input, stream) = (&mut self.input, self.stream);
        let got = decode_next(&mut self.decoder, &mut self.yuv, &mut self.eof_sent, |decoder| {
            for (s, packet) in input.packets() {
                if s.index() == stream {
                    decoder.send_packet(&packet)?;
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .map_err(|e| corrupt(&self.path, self.frames, e))?;
        if !got {
            return Ok(false);
        }
        let (w, h) = (self.yuv.width(), self.yuv.height());
        if (w, h) != (self.width, self.height) {
            let changed = ReadFailure::SizeChanged {
                frame: self.frames,
                width: w,
                height: h,
                first_width: self.width,
                first_height: self.height,
            };
            return Err(VideoError::open(&self.path, changed));
        }
        self.to_bgr.convert(&self.yuv, out).map_err(|e| VideoError::open(&self.path, e))?;
        self.frames += 1;
        Ok(true)
    }
}

/// The error for a stream FFmpeg stops decoding after `frames` frames.
pub(crate) fn corrupt(path: &Path, frames: usize, source: ff::Error) -> VideoError {
    VideoError::open(path, ReadFailure::Corrupt { frames, source })
}
