//! Template frames: decoded on first use from a video file (FFmpeg: any container/codec the system
//! libraries decode) or a directory of numbered JPEG/PNG frames, converted to BGR, and held
//! within a memory budget.
//!
//! Memory bound: decoded frames are kept raw (`w * h * 3` bytes each) until the budget is
//! reached; every further frame is kept zstd-compressed (lossless, typically 30-60 % of raw for
//! camera footage) and decompressed into the caller's buffer on use. A template therefore holds
//! at most `budget + compressed(rest)` bytes. Pixels are identical either way.

use std::path::{Path, PathBuf};

use ffmpeg_next as ff;

use crate::frame::BgrFrame;
use crate::io::video::{frame_files, open_video, OpenedVideo, VideoError};

/// Default raw-frame budget of one template (bytes).
pub const DEFAULT_BUDGET: usize = 768 << 20;

/// Sequential decoder of a video file's first video stream into BGR frames.
pub struct VideoReader {
    path: PathBuf,
    input: ff::format::context::Input,
    decoder: ff::decoder::Video,
    stream: usize,
    scaler: Option<ff::software::scaling::Context>,
    yuv: ff::frame::Video,
    bgr: ff::frame::Video,
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
            scaler: None,
            yuv: ff::frame::Video::empty(),
            bgr: ff::frame::Video::empty(),
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
        let corrupt = |frames: usize, e: String| VideoError::Open {
            path: PathBuf::new(),
            message: format!("decoding failed after {frames} frames: {e} (corrupt or truncated video?)"),
        };
        loop {
            match self.decoder.receive_frame(&mut self.yuv) {
                Ok(()) => break,
                Err(ff::Error::Eof) => return Ok(false),
                Err(ff::Error::Other { errno }) if errno == ff::util::error::EAGAIN => {}
                Err(e) => return Err(self.with_path(corrupt(self.frames, e.to_string()))),
            }
            if self.eof_sent {
                return Ok(false);
            }
            let mut sent = false;
            while let Some((stream, packet)) = self.input.packets().next() {
                if stream.index() != self.stream {
                    continue;
                }
                self.decoder.send_packet(&packet).map_err(|e| self.with_path(corrupt(self.frames, e.to_string())))?;
                sent = true;
                break;
            }
            if !sent {
                self.decoder.send_eof().map_err(|e| self.with_path(corrupt(self.frames, e.to_string())))?;
                self.eof_sent = true;
            }
        }
        let (w, h) = (self.yuv.width(), self.yuv.height());
        if (w, h) != (self.width, self.height) {
            return Err(VideoError::Open {
                path: self.path.clone(),
                message: format!(
                    "frame {} is {w}x{h}, the stream started at {}x{}",
                    self.frames, self.width, self.height
                ),
            });
        }
        if self.scaler.is_none() {
            let scaler = ff::software::scaling::Context::get(
                self.yuv.format(),
                w,
                h,
                ff::format::Pixel::BGR24,
                w,
                h,
                ff::software::scaling::Flags::BICUBIC,
            )
            .map_err(|e| VideoError::Open { path: self.path.clone(), message: format!("no BGR conversion: {e}") })?;
            self.scaler = Some(scaler);
        }
        let scaler = self.scaler.as_mut().expect("set above");
        scaler.run(&self.yuv, &mut self.bgr).map_err(|e| VideoError::Open {
            path: self.path.clone(),
            message: format!("BGR conversion failed: {e}"),
        })?;
        let (w, h) = (w as usize, h as usize);
        out.reshape(w, h);
        let stride = self.bgr.stride(0);
        let data = self.bgr.data(0);
        for y in 0..h {
            out.data[y * w * 3..(y + 1) * w * 3].copy_from_slice(&data[y * stride..y * stride + w * 3]);
        }
        self.frames += 1;
        Ok(true)
    }

    fn with_path(&self, e: VideoError) -> VideoError {
        match e {
            VideoError::Open { message, .. } => VideoError::Open { path: self.path.clone(), message },
            other => other,
        }
    }
}

enum Stored {
    Raw(Box<[u8]>),
    Zstd(Box<[u8]>),
}

enum Source {
    Video(Box<VideoReader>),
    Files { files: Vec<PathBuf>, next: usize },
    Done,
}

/// All frames of a template, decoded on first use (in order, which is how the ping-pong's
/// first pass needs them) and held within a memory budget (see the module docs).
pub struct TemplateFrames {
    /// The frames decoded so far (and the template's path, size and rate).
    store: SharedTemplate,
    budget: usize,
    source: Source,
    scratch: BgrFrame,
}

impl std::fmt::Debug for TemplateFrames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateFrames")
            .field("frames", &self.store.frames.len())
            .field("size", &(self.store.width, self.store.height))
            .field("bytes", &self.store.bytes)
            .finish()
    }
}

impl TemplateFrames {
    /// Opens a video file or frames directory; frames are decoded as [`TemplateFrames::get`]
    /// first asks for them. Raw frames are kept up to `budget` bytes, the rest compressed.
    pub fn open(path: &Path, budget: usize) -> Result<Self, VideoError> {
        let (source, fps) = if path.is_dir() {
            let files = frame_files(path)?;
            if files.is_empty() {
                return Err(VideoError::NoFrames(path.to_path_buf()));
            }
            (Source::Files { files, next: 0 }, None)
        } else {
            let reader = VideoReader::open(path)?;
            let fps = reader.fps();
            (Source::Video(Box::new(reader)), fps)
        };
        Ok(Self {
            store: SharedTemplate { path: path.to_path_buf(), width: 0, height: 0, fps, frames: Vec::new(), bytes: 0 },
            budget,
            source,
            scratch: BgrFrame::default(),
        })
    }

    /// Opens and decodes every frame now.
    pub fn load(path: &Path, budget: usize) -> Result<Self, VideoError> {
        let mut t = Self::open(path, budget)?;
        while t.decode_next()? {}
        if t.store.frames.is_empty() {
            return Err(VideoError::NoFrames(path.to_path_buf()));
        }
        Ok(t)
    }

    /// Decodes one more frame; `Ok(false)` when the source is exhausted.
    fn decode_next(&mut self) -> Result<bool, VideoError> {
        let mut frame = std::mem::take(&mut self.scratch);
        let got = match &mut self.source {
            Source::Done => false,
            Source::Video(reader) => reader.next(&mut frame)?,
            Source::Files { files, next } => match files.get(*next) {
                Some(file) => {
                    crate::image_io::read_image(file, &mut frame)
                        .map_err(|e| VideoError::BadFrame { path: file.clone(), message: e.to_string() })?;
                    *next += 1;
                    true
                }
                None => false,
            },
        };
        if got {
            let path = match &self.source {
                Source::Files { files, next } => files[*next - 1].clone(),
                _ => self.store.path.clone(),
            };
            self.push(&frame, &path)?;
        } else {
            self.source = Source::Done;
        }
        self.scratch = frame;
        Ok(got)
    }

    fn push(&mut self, frame: &BgrFrame, path: &Path) -> Result<(), VideoError> {
        if self.store.frames.is_empty() {
            self.store.width = frame.width;
            self.store.height = frame.height;
        } else if (frame.width, frame.height) != (self.store.width, self.store.height) {
            return Err(VideoError::SizeMismatch {
                path: path.to_path_buf(),
                got_w: frame.width as u32,
                got_h: frame.height as u32,
                want_w: self.store.width as u32,
                want_h: self.store.height as u32,
            });
        }
        let stored = if self.store.bytes + frame.data.len() <= self.budget {
            Stored::Raw(frame.data.clone().into_boxed_slice())
        } else {
            let z = zstd::bulk::compress(&frame.data, 1)
                .map_err(|e| VideoError::Open { path: path.to_path_buf(), message: format!("zstd: {e}") })?;
            Stored::Zstd(z.into_boxed_slice())
        };
        self.store.bytes += match &stored {
            Stored::Raw(b) | Stored::Zstd(b) => b.len(),
        };
        self.store.frames.push(stored);
        Ok(())
    }

    /// Frames decoded so far.
    pub fn decoded(&self) -> usize {
        self.store.frames.len()
    }

    /// Copies frame `i` into `out` (reusing its allocation), decoding up to it first if needed.
    pub fn get(&mut self, i: usize, out: &mut BgrFrame) -> Result<(), VideoError> {
        while self.store.frames.len() <= i {
            if !self.decode_next()? {
                return Err(VideoError::Open {
                    path: self.store.path.clone(),
                    message: format!("frame {i} asked for, but the template holds {} frames", self.store.frames.len()),
                });
            }
        }
        self.get_decoded(i, out)
    }

    /// Copies an already decoded frame `i` into `out`.
    pub fn get_decoded(&self, i: usize, out: &mut BgrFrame) -> Result<(), VideoError> {
        self.store.get(i, out)
    }

    /// Decodes what is left and returns the frames as a [`SharedTemplate`], which threads
    /// can read at once (the decoder is dropped).
    pub fn into_shared(mut self) -> Result<SharedTemplate, VideoError> {
        while self.decode_next()? {}
        if self.store.frames.is_empty() {
            return Err(VideoError::NoFrames(self.store.path.clone()));
        }
        Ok(self.store)
    }
}

/// The frames decoded so far: [`SharedTemplate::len`], [`SharedTemplate::size`] and the other
/// accessors.
impl std::ops::Deref for TemplateFrames {
    type Target = SharedTemplate;
    fn deref(&self) -> &SharedTemplate {
        &self.store
    }
}

/// A fully decoded template, read-only and shareable between threads (`Arc<SharedTemplate>`):
/// what `lipsync serve` keeps per loaded avatar.
pub struct SharedTemplate {
    path: PathBuf,
    width: usize,
    height: usize,
    fps: Option<f64>,
    frames: Vec<Stored>,
    bytes: usize,
}

impl std::fmt::Debug for SharedTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTemplate").field("frames", &self.frames.len()).field("bytes", &self.bytes).finish()
    }
}

impl SharedTemplate {
    /// Number of frames.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether it holds no frame (never true for one built by [`TemplateFrames::into_shared`]).
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frame size.
    pub fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    /// Frame rate of a video file (none for a frames directory).
    pub fn fps(&self) -> Option<f64> {
        self.fps
    }

    /// Bytes held (raw and compressed frames).
    pub fn memory_bytes(&self) -> usize {
        self.bytes
    }

    /// Frames held compressed.
    pub fn compressed_frames(&self) -> usize {
        self.frames.iter().filter(|f| matches!(f, Stored::Zstd(_))).count()
    }

    /// Copies frame `i` into `out` (reusing its allocation).
    pub fn get(&self, i: usize, out: &mut BgrFrame) -> Result<(), VideoError> {
        copy_frame(&self.path, &self.frames, self.width, self.height, i, out)
    }
}

fn copy_frame(
    path: &Path,
    frames: &[Stored],
    width: usize,
    height: usize,
    i: usize,
    out: &mut BgrFrame,
) -> Result<(), VideoError> {
    let stored = frames.get(i).ok_or_else(|| VideoError::Open {
        path: path.to_path_buf(),
        message: format!("frame {i} is not decoded (the template holds {})", frames.len()),
    })?;
    out.reshape(width, height);
    match stored {
        Stored::Raw(b) => out.data.copy_from_slice(b),
        Stored::Zstd(z) => {
            let n = zstd::bulk::decompress_to_buffer(z, &mut out.data[..])
                .map_err(|e| VideoError::Open { path: path.to_path_buf(), message: format!("zstd: {e}") })?;
            debug_assert_eq!(n, out.data.len());
        }
    }
    Ok(())
}
