//! Template frames: a video file (any container/codec the system FFmpeg decodes) or a directory of
//! numbered JPEG/PNG frames, held compactly and shared, and read as BGR frames in any order.
//!
//! Memory: a video template is held as its compressed packets (the file's own H.264, VP9, ...
//! stream: a few KB a frame), plus a hash and a timestamp per frame. Each reader (one per render
//! or session, [`TemplateReader`]) decodes what it needs with its own decoder and keeps the last
//! frames it decoded in a ring bounded by a byte budget. The ping-pong's backward pass
//! (docs/spec.md section 6) restarts decoding at the latest keyframe before a ring's worth of
//! frames and keeps that stretch; on the way there it skips the frames no other frame refers to
//! (FFmpeg's `skip_frame`), so a backward pass costs a fraction of a decode from the start per
//! ring. A frames directory is decoded once at open: raw frames up to a budget, zstd-compressed
//! (lossless) beyond it.
//!
//! Exactness: the hashes come from one plain sequential decode of the whole stream at open. A
//! reader's frames from a plain decode from the start are that decode; every other frame (after a
//! restart at a keyframe, or after skipped frames) is checked against its hash before it is
//! served. A mismatch marks the keyframe unusable (or stops the reader skipping) and the frame is
//! decoded again the plain way, so a served frame is always the sequential decode's.

mod decode;
mod jpeg_store;
mod reader;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use ffmpeg_next as ff;
use xxhash_rust::xxh3::xxh3_64;

use crate::frame::BgrFrame;
use crate::io::video::{frame_files, open_video, OpenedVideo, ReadFailure, VideoError};

pub use crate::io::video::VisitError;

pub use decode::VideoReader;
pub use jpeg_store::{JpegFrame, JpegTemplate, JpegTemplateBuilder, RegionError, RegionReader};
pub use reader::TemplateReader;

/// Default byte budget of a reader's ring of decoded frames (and of the raw frames a frames
/// directory keeps decoded).
pub const DEFAULT_CACHE: usize = 24 << 20;

/// Backward-pass decodes per frame above which [`SharedTemplate::warn_if_slow_backward`] warns
/// (the sample, one keyframe in 200 frames, costs 6-7 at the default cache).
const SLOW_BACKWARD: f64 = 8.0;

/// A template, read-only and shareable between threads (`Arc<SharedTemplate>`): what a render
/// opens and what `lipsync serve` keeps per loaded avatar. Read frames through
/// [`SharedTemplate::reader`].
pub struct SharedTemplate {
    path: PathBuf,
    width: usize,
    height: usize,
    fps: Option<f64>,
    len: usize,
    store: Store,
    bytes: usize,
}

enum Store {
    Video(VideoStore),
    Images(Vec<Stored>),
}

/// A frame of a frames directory.
enum Stored {
    Raw(Box<[u8]>),
    Zstd(Box<[u8]>),
}

/// A video stream held as its packets.
struct VideoStore {
    /// The stream's codec parameters, to make a decoder from (not `Sync` in FFmpeg's binding).
    params: Mutex<ff::codec::Parameters>,
    /// The stream's packets in decode order.
    packets: Vec<ff::Packet>,
    /// xxh3 of each frame's BGR pixels, in display order, from the sequential decode at open.
    hashes: Vec<u64>,
    /// Each frame's timestamp in display order (strictly increasing), when the stream has them:
    /// what places a decoded frame after a restart, or after skipped frames.
    pts: Option<Vec<i64>>,
    /// Where decoding may start, by display index (the first is the stream's start).
    restarts: Vec<Restart>,
    /// Bytes of one decoded frame in the decoder's own format.
    frame_bytes: usize,
}

/// A keyframe decoding may restart at.
struct Restart {
    /// Display index of the keyframe.
    display: usize,
    /// Its packet's index in decode order.
    packet: usize,
    /// Set when a frame decoded after this restart did not match its hash.
    bad: AtomicBool,
}

impl std::fmt::Debug for SharedTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTemplate")
            .field("path", &self.path)
            .field("frames", &self.len)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl SharedTemplate {
    /// Opens a video file or frames directory and decodes it once (to count and check its
    /// frames and, for a video, hash them). `budget`: raw bytes a frames directory keeps
    /// decoded (the rest is held zstd-compressed); unused for a video file.
    pub fn open(path: &Path, budget: usize) -> Result<Self, VideoError> {
        Self::open_with(path, budget, &mut |_, _| Ok(()))
    }

    /// [`SharedTemplate::open`], showing `visit` each frame of that one decode, in order (to
    /// build a [`JpegTemplate`] without decoding twice); its error fails the open.
    pub fn open_with(path: &Path, budget: usize, visit: &mut Visitor<'_>) -> Result<Self, VideoError> {
        if !path.exists() {
            return Err(VideoError::Missing(path.to_path_buf()));
        }
        let t = if path.is_dir() { open_dir(path, budget, visit)? } else { open_file(path, visit)? };
        if t.len == 0 {
            return Err(VideoError::NoFrames(path.to_path_buf()));
        }
        Ok(t)
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no frame (never true for an opened template).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Frame size.
    pub fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    /// Frame rate of a video file (none for a frames directory).
    pub fn fps(&self) -> Option<f64> {
        self.fps
    }

    /// The file or directory it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes held: a video's packets and hashes, or a directory's raw and compressed frames.
    pub fn memory_bytes(&self) -> usize {
        self.bytes
    }

    /// Frames of a directory held compressed (0 for a video).
    pub fn compressed_frames(&self) -> usize {
        match &self.store {
            Store::Images(frames) => frames.iter().filter(|f| matches!(f, Stored::Zstd(_))).count(),
            Store::Video(_) => 0,
        }
    }

    /// Keyframes decoding may restart at, the start included (1 for a directory).
    pub fn restart_points(&self) -> usize {
        match &self.store {
            Store::Video(v) => v.restarts.len(),
            Store::Images(_) => 1,
        }
    }

    /// Bytes of one decoded video frame in the decoder's own format, padding included (0 for a
    /// directory).
    pub fn decoded_frame_bytes(&self) -> usize {
        match &self.store {
            Store::Video(v) => v.frame_bytes,
            Store::Images(_) => 0,
        }
    }

    /// Bytes a reader with a `cache` budget holds at most in decoded frames (0 for a directory,
    /// whose frames are read in place).
    pub fn reader_bytes(&self, cache: usize) -> usize {
        match &self.store {
            Store::Video(v) => reader::ring_frames(cache, v.frame_bytes) * v.frame_bytes,
            Store::Images(_) => 0,
        }
    }

    /// Frames a reader keeping `cache` bytes decodes per frame it serves on the ping-pong's
    /// backward pass, estimated: each ring-sized stretch costs the decode from the restart point
    /// before it (half the longest keyframe interval on average) plus the stretch. 1 when the
    /// ring holds the whole template (or for a directory, which is not decoded).
    pub fn backward_decodes_per_frame(&self, cache: usize) -> f64 {
        let Store::Video(v) = &self.store else { return 1.0 };
        let cap = reader::ring_frames(cache, v.frame_bytes).min(self.len);
        if cap >= self.len {
            return 1.0;
        }
        // Without a display-order table a restart only happens at the start.
        let gap = if v.pts.is_none() {
            self.len
        } else {
            let ends = v.restarts.iter().skip(1).map(|r| r.display).chain(std::iter::once(self.len));
            v.restarts.iter().zip(ends).map(|(r, end)| end - r.display).max().unwrap_or(self.len)
        };
        (gap as f64 / 2.0 + cap as f64) / cap as f64
    }

    /// Logs a warning when [`SharedTemplate::backward_decodes_per_frame`] is high for `cache`
    /// (keyframes far apart for the ring), saying what to do.
    pub fn warn_if_slow_backward(&self, cache: usize) {
        let per_frame = self.backward_decodes_per_frame(cache);
        if per_frame > SLOW_BACKWARD {
            let ring = reader::ring_frames(cache, self.decoded_frame_bytes());
            tracing::warn!(
                path = %self.path.display(),
                decodes_per_frame = format!("{per_frame:.0}"),
                ring_frames = ring,
                "the template's keyframes are far apart for its cache: the ping-pong's backward pass \
                 decodes about {per_frame:.0} frames per frame; raise the template cache or re-encode \
                 the template with a keyframe every {ring} frames or fewer (ffmpeg -g {ring})"
            );
        }
    }

    /// A reader of this template keeping up to `cache` bytes of decoded frames. FFmpeg's
    /// contexts are not `Send`: make it on the thread that uses it.
    pub fn reader(self: std::sync::Arc<Self>, cache: usize) -> TemplateReader {
        TemplateReader::new(self, cache)
    }
}

/// What [`SharedTemplate::open_with`] shows each frame: its index and pixels. Its error stops
/// the decode and is the cause of the open's [`VideoError::Open`].
pub type Visitor<'a> = dyn FnMut(usize, &BgrFrame) -> Result<(), VisitError> + 'a;

fn open_file(path: &Path, visit: &mut Visitor<'_>) -> Result<SharedTemplate, VideoError> {
    let OpenedVideo { mut input, index, fps, mut decoder, .. } = open_video(path)?;
    let params = input.stream(index).ok_or_else(|| VideoError::NoVideoStream(path.to_path_buf()))?.parameters();
    // A deep copy, owned by nobody else.
    let params = params.clone();
    let packets: Vec<ff::Packet> = input.packets().filter(|(s, _)| s.index() == index).map(|(_, p)| p).collect();
    drop(input);
    let (mut frame, mut to_bgr, mut bgr) = (ff::frame::Video::empty(), decode::ToBgr::default(), BgrFrame::default());
    let (mut hashes, mut pts, mut frame_bytes, mut next, mut eof) = (Vec::new(), Vec::new(), 0, 0, false);
    let mut size = None;
    while decode::decode_next(&mut decoder, &mut frame, &mut eof, |d| match packets.get(next) {
        Some(p) => {
            next += 1;
            d.send_packet(p).map(|()| true)
        }
        None => Ok(false),
    })
    .map_err(|e| decode::corrupt(path, pts.len(), e))?
    {
        let (w, h) = (frame.width(), frame.height());
        match size {
            None => {
                size = Some((w, h));
                frame_bytes = decode::frame_bytes(&frame);
            }
            Some((first_width, first_height)) if (first_width, first_height) != (w, h) => {
                let changed =
                    ReadFailure::SizeChanged { frame: pts.len(), width: w, height: h, first_width, first_height };
                return Err(VideoError::open(path, changed));
            }
            Some(_) => {}
        }
        to_bgr.convert(&frame, &mut bgr).map_err(|e| VideoError::open(path, e))?;
        visit(pts.len(), &bgr).map_err(|e| VideoError::open(path, ReadFailure::Visitor(e)))?;
        hashes.push(xxh3_64(&bgr.data));
        pts.push(frame.timestamp());
    }
    let (width, height) = size.map_or((0, 0), |(w, h)| (w as usize, h as usize));
    let len = pts.len();
    // Display order by timestamp, when every frame has one and they increase.
    let pts = pts.into_iter().collect::<Option<Vec<i64>>>().filter(|p| p.windows(2).all(|w| w[0] < w[1]));
    let restarts = restarts(&packets, pts.as_deref());
    let packet_bytes: usize = packets.iter().map(|p| p.size()).sum();
    let bytes = packet_bytes + (hashes.len() + pts.as_ref().map_or(0, Vec::len)) * 8;
    let bytes = bytes + restarts.len() * std::mem::size_of::<Restart>();
    let store = VideoStore { params: Mutex::new(params), packets, hashes, pts, restarts, frame_bytes };
    Ok(SharedTemplate { path: path.to_path_buf(), width, height, fps, len, store: Store::Video(store), bytes })
}

/// The stream's start, then every keyframe whose timestamp places it in display order. Without
/// a display-order timestamp table only the start is kept.
fn restarts(packets: &[ff::Packet], pts: Option<&[i64]>) -> Vec<Restart> {
    let start = Restart { display: 0, packet: 0, bad: AtomicBool::new(false) };
    let mut out = vec![start];
    let Some(pts) = pts else { return out };
    for (k, p) in packets.iter().enumerate().skip(1) {
        let Some(key) = p.pts().filter(|_| p.is_key()) else { continue };
        if let Ok(display) = pts.binary_search(&key) {
            if display > out.last().map_or(0, |r| r.display) {
                out.push(Restart { display, packet: k, bad: AtomicBool::new(false) });
            }
        }
    }
    out
}

fn open_dir(path: &Path, budget: usize, visit: &mut Visitor<'_>) -> Result<SharedTemplate, VideoError> {
    let files = frame_files(path)?;
    let (mut frames, mut bytes, mut size) = (Vec::with_capacity(files.len()), 0, None);
    let mut frame = BgrFrame::default();
    for file in &files {
        crate::image_io::read_image(file, &mut frame)
            .map_err(|source| VideoError::BadFrame { path: file.clone(), source })?;
        let (w, h) = *size.get_or_insert((frame.width, frame.height));
        if (frame.width, frame.height) != (w, h) {
            return Err(VideoError::SizeMismatch {
                path: file.clone(),
                got_w: frame.width as u32,
                got_h: frame.height as u32,
                want_w: w as u32,
                want_h: h as u32,
            });
        }
        visit(frames.len(), &frame).map_err(|e| VideoError::open(file, ReadFailure::Visitor(e)))?;
        let stored = if bytes + frame.data.len() <= budget {
            Stored::Raw(frame.data.clone().into_boxed_slice())
        } else {
            let z = zstd::bulk::compress(&frame.data, 1).map_err(|e| VideoError::open(file, ReadFailure::Zstd(e)))?;
            Stored::Zstd(z.into_boxed_slice())
        };
        bytes += match &stored {
            Stored::Raw(b) | Stored::Zstd(b) => b.len(),
        };
        frames.push(stored);
    }
    let (width, height) = size.unwrap_or((0, 0));
    let len = frames.len();
    Ok(SharedTemplate { path: path.to_path_buf(), width, height, fps: None, len, store: Store::Images(frames), bytes })
}

/// Copies directory frame `i` into `out`.
fn copy_stored(t: &SharedTemplate, frames: &[Stored], i: usize, out: &mut BgrFrame) -> Result<(), VideoError> {
    out.reshape(t.width, t.height);
    match &frames[i] {
        Stored::Raw(b) => out.data.copy_from_slice(b),
        Stored::Zstd(z) => {
            let n = zstd::bulk::decompress_to_buffer(z, &mut out.data[..])
                .map_err(|e| VideoError::open(&t.path, ReadFailure::Zstd(e)))?;
            debug_assert_eq!(n, out.data.len());
        }
    }
    Ok(())
}
