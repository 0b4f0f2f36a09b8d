//! Template video sources: a video file (anything the system FFmpeg demuxes) or a directory of
//! numbered JPEG/PNG frames. This module probes them (frame count, size, fps) without decoding.

use std::path::{Path, PathBuf};
use std::sync::Once;

use ffmpeg_next as ff;

use crate::image_io::ImageError;

/// Errors from probing a template source.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    /// The path does not exist.
    #[error("template video not found: {0}")]
    Missing(PathBuf),
    /// FFmpeg could not open or read the file.
    #[error("could not read video {path}: {source} (expected a video file FFmpeg can demux, e.g. H.264 MP4)")]
    Open {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: ReadFailure,
    },
    /// The file has no video stream.
    #[error("{0} has no video stream")]
    NoVideoStream(PathBuf),
    /// The source holds zero frames.
    #[error("{0} has no frames")]
    NoFrames(PathBuf),
    /// A frame file could not be read as an image.
    #[error("could not read frame image {path}: {source} (expected a JPEG or PNG file)")]
    BadFrame {
        /// The frame file.
        path: PathBuf,
        /// Why it could not be read.
        source: ImageError,
    },
    /// Frames of a directory differ in size.
    #[error("frame {path} is {got_w}x{got_h}, but the first frame is {want_w}x{want_h}: all frames must be one size")]
    SizeMismatch {
        /// The odd frame.
        path: PathBuf,
        /// Its width.
        got_w: u32,
        /// Its height.
        got_h: u32,
        /// The first frame's width.
        want_w: u32,
        /// The first frame's height.
        want_h: u32,
    },
    /// An I/O error on a directory.
    #[error("could not list {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl VideoError {
    /// A [`VideoError::Open`] of `path` caused by `source`.
    pub fn open(path: &Path, source: impl Into<ReadFailure>) -> Self {
        VideoError::Open { path: path.to_path_buf(), source: source.into() }
    }
}

/// The error a frame visitor returns (see [`crate::template::Visitor`]).
pub type VisitError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong reading a template video (the cause of a [`VideoError::Open`]).
#[derive(Debug, thiserror::Error)]
pub enum ReadFailure {
    /// An FFmpeg call failed.
    #[error("{0}")]
    Ffmpeg(#[from] ff::Error),
    /// An FFmpeg call failed at a named step.
    #[error("{step}: {source}")]
    FfmpegAt {
        /// What was being done.
        step: &'static str,
        /// FFmpeg's error.
        source: ff::Error,
    },
    /// FFmpeg stopped decoding part way.
    #[error("decoding failed after {frames} frames: {source} (corrupt or truncated video?)")]
    Corrupt {
        /// Frames decoded before it stopped.
        frames: usize,
        /// FFmpeg's error.
        source: ff::Error,
    },
    /// The video stream states no frame size.
    #[error("video stream has no frame size")]
    NoFrameSize,
    /// A frame of another size than the stream's first.
    #[error("frame {frame} is {width}x{height}, the stream started at {first_width}x{first_height}")]
    SizeChanged {
        /// The frame's index.
        frame: usize,
        /// Its width.
        width: u32,
        /// Its height.
        height: u32,
        /// The first frame's width.
        first_width: u32,
        /// The first frame's height.
        first_height: u32,
    },
    /// A frame past the template's end.
    #[error("frame {frame} asked for, but the template holds {frames} frames")]
    OutOfRange {
        /// The frame asked for.
        frame: usize,
        /// Frames the template holds.
        frames: usize,
    },
    /// Decoding again ended before a frame the first decode gave.
    #[error("the stream ended before frame {frame} decoding again, but held {frames} frames at open")]
    EndedEarly {
        /// The frame not reached.
        frame: usize,
        /// Frames decoded at open.
        frames: usize,
    },
    /// Decoding again gave other pixels than at open.
    #[error("decoding again gave other frames than at open (a decoder that is not deterministic?)")]
    NotDeterministic,
    /// zstd failed on a stored frame.
    #[error("zstd: {0}")]
    Zstd(#[source] std::io::Error),
    /// The visitor of [`crate::template::SharedTemplate::open_with`] stopped the decode.
    #[error("{0}")]
    Visitor(#[source] VisitError),
}

/// A [`ReadFailure::FfmpegAt`] at `step`.
pub(crate) fn at(step: &'static str) -> impl Fn(ff::Error) -> ReadFailure {
    move |source| ReadFailure::FfmpegAt { step, source }
}

/// What a template source holds.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    /// Number of frames.
    pub frames: usize,
    /// Frame width in pixels.
    pub width: u32,
    /// Frame height in pixels.
    pub height: u32,
    /// Frame rate, when the source states one (a frames directory does not).
    pub fps: Option<f64>,
    /// Codec name (`h264`, ...) or `images` for a frames directory.
    pub codec: String,
}

/// Initialises FFmpeg once and quiets its logging to errors.
pub fn init_ffmpeg() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = ffmpeg_next::init();
        // Decoder complaints surface as our own errors; FFmpeg's log would only add noise.
        ffmpeg_next::util::log::set_level(ffmpeg_next::util::log::Level::Fatal);
    });
}

/// FFmpeg's version string (`5.1.x-...`).
pub fn ffmpeg_version() -> String {
    init_ffmpeg();
    // SAFETY: av_version_info returns a static NUL-terminated string.
    unsafe {
        let p = ffmpeg_next::ffi::av_version_info();
        if p.is_null() {
            "unknown".into()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// Extensions accepted in a frames directory.
pub const FRAME_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The numbered frame files of a directory in numeric order (`0.jpg, 1.jpg, 2.jpg, ..., 10.jpg`).
pub fn frame_files(dir: &Path) -> Result<Vec<PathBuf>, VideoError> {
    let entries = std::fs::read_dir(dir).map_err(|source| VideoError::Io { path: dir.to_path_buf(), source })?;
    let mut files: Vec<(u64, String, PathBuf)> = Vec::new();
    for entry in entries {
        let path = entry.map_err(|source| VideoError::Io { path: dir.to_path_buf(), source })?.path();
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        if !ext.is_some_and(|e| FRAME_EXTENSIONS.contains(&e.as_str())) {
            continue;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let stem = path.file_stem().and_then(|n| n.to_str()).unwrap_or_default();
        let digits: String = stem.chars().filter(char::is_ascii_digit).collect();
        files.push((digits.parse().unwrap_or(0), name, path));
    }
    files.sort();
    Ok(files.into_iter().map(|(_, _, p)| p).collect())
}

/// Probes a video file or a frames directory.
pub fn probe(path: &Path) -> Result<VideoInfo, VideoError> {
    if !path.exists() {
        return Err(VideoError::Missing(path.to_path_buf()));
    }
    if path.is_dir() {
        probe_dir(path)
    } else {
        probe_file(path)
    }
}

fn probe_dir(dir: &Path) -> Result<VideoInfo, VideoError> {
    let files = frame_files(dir)?;
    let first = files.first().ok_or_else(|| VideoError::NoFrames(dir.to_path_buf()))?;
    let size = |p: &Path| {
        crate::image_io::image_size(p)
            .map(|(w, h)| (w as u32, h as u32))
            .map_err(|source| VideoError::BadFrame { path: p.to_path_buf(), source })
    };
    let (width, height) = size(first)?;
    for file in &files[1..] {
        let (w, h) = size(file)?;
        if (w, h) != (width, height) {
            return Err(VideoError::SizeMismatch {
                path: file.clone(),
                got_w: w,
                got_h: h,
                want_w: width,
                want_h: height,
            });
        }
    }
    Ok(VideoInfo { frames: files.len(), width, height, fps: None, codec: "images".into() })
}

/// A video file opened on its best video stream, with a decoder for it.
pub(crate) struct OpenedVideo {
    pub(crate) input: ffmpeg_next::format::context::Input,
    pub(crate) index: usize,
    pub(crate) fps: Option<f64>,
    pub(crate) codec: String,
    pub(crate) decoder: ffmpeg_next::decoder::Video,
}

/// Opens `path`, finds its best video stream and makes its decoder.
pub(crate) fn open_video(path: &Path) -> Result<OpenedVideo, VideoError> {
    init_ffmpeg();
    if !path.exists() {
        return Err(VideoError::Missing(path.to_path_buf()));
    }
    let input = ffmpeg_next::format::input(path).map_err(|e| VideoError::open(path, e))?;
    let stream = input
        .streams()
        .best(ffmpeg_next::media::Type::Video)
        .ok_or_else(|| VideoError::NoVideoStream(path.to_path_buf()))?;
    let index = stream.index();
    let rate = stream.avg_frame_rate();
    let fps = (rate.denominator() != 0 && rate.numerator() > 0).then(|| f64::from(rate));
    let ctx = ffmpeg_next::codec::context::Context::from_parameters(stream.parameters())
        .map_err(|e| VideoError::open(path, e))?;
    let codec = ctx.id().name().to_string();
    let decoder =
        ctx.decoder().video().map_err(|e| VideoError::open(path, at("no decoder for the video stream")(e)))?;
    Ok(OpenedVideo { input, index, fps, codec, decoder })
}

fn probe_file(path: &Path) -> Result<VideoInfo, VideoError> {
    let OpenedVideo { mut input, index, fps, codec, decoder } = open_video(path)?;
    let (width, height) = (decoder.width(), decoder.height());
    if width == 0 || height == 0 {
        return Err(VideoError::open(path, ReadFailure::NoFrameSize));
    }
    let mut frames = 0usize;
    for result in input.packets() {
        match result {
            (s, _) if s.index() == index => frames += 1,
            _ => {}
        }
    }
    if frames == 0 {
        return Err(VideoError::NoFrames(path.to_path_buf()));
    }
    Ok(VideoInfo { frames, width, height, fps, codec })
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;
    use crate::frame::BgrFrame;
    use crate::image_io::CodecError;

    #[test]
    fn a_bad_frame_file_keeps_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("0.png"), b"not a png").unwrap();
        let e = probe(dir.path()).unwrap_err();
        assert!(
            matches!(&e, VideoError::BadFrame { source: ImageError::Decode { source: CodecError::Header(_), .. }, .. }),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("could not read frame image"), "{e}");
    }

    #[test]
    fn a_visitors_error_is_the_opens_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("enough")]
        struct Enough;
        let dir = tempfile::tempdir().unwrap();
        let (mut png, mut scratch) = (Vec::new(), Vec::new());
        crate::image_io::encode_png(&BgrFrame::new(16, 16), &mut png, &mut scratch).unwrap();
        std::fs::write(dir.path().join("0.png"), &png).unwrap();
        let e = crate::template::SharedTemplate::open_with(dir.path(), usize::MAX, &mut |_, _| Err(Enough.into()))
            .unwrap_err();
        assert!(e.to_string().contains("could not read video") && e.to_string().contains("enough"), "{e}");
        let failure = e.source().expect("the failure");
        assert!(failure.source().is_some_and(|c| c.is::<Enough>()), "{failure:?}");
    }
}
