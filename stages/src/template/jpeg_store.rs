//! [`JpegTemplate`]: what JPEG output needs of a template, kept so that no frame is decoded
//! while frames are made: each template frame's JPEG (at the output's quality) and, exact and
//! zstd-compressed (lossless), the pixels of the aligned region around its face box (all that
//! prep and paste-back read). A speech frame is that region composited and spliced into the
//! frame's JPEG ([`crate::jpeg`]); an idle frame is the frame's JPEG as it is.

use crate::crop::CropBox;
use crate::frame::BgrFrame;
use crate::image_io::{CodecError, ImageError};
use crate::jpeg::{JpegEncoder, JpegLayout, McuRegion};

/// One template frame, ready for JPEG output.
pub struct JpegFrame {
    /// The whole frame encoded at the template's quality by [`JpegEncoder`].
    pub jpeg: Box<[u8]>,
    /// Where its restart intervals lie.
    pub layout: JpegLayout,
    /// The aligned region around the frame's face box.
    pub region: McuRegion,
    /// The region's pixels, packed BGR, exactly the decoded frame's, zstd-compressed.
    pixels: Box<[u8]>,
}

/// Why a template frame's region could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The zstd context could not be made.
    #[error("zstd: {0}")]
    Zstd(#[source] std::io::Error),
    /// The region's bytes did not decompress.
    #[error("a template region did not unpack: {0}")]
    Unpack(#[source] std::io::Error),
    /// They decompressed to another size than the region's.
    #[error("a template region unpacked to {got} bytes, expected {expected}")]
    Size {
        /// Bytes unpacked.
        got: usize,
        /// Bytes of the region.
        expected: usize,
    },
}

/// Reads regions' pixels back (a reused zstd context: one per reading thread).
pub struct RegionReader(zstd::bulk::Decompressor<'static>);

impl std::fmt::Debug for RegionReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegionReader")
    }
}

impl RegionReader {
    /// A reader.
    pub fn new() -> Result<Self, RegionError> {
        zstd::bulk::Decompressor::new().map(Self).map_err(RegionError::Zstd)
    }
}

impl JpegFrame {
    /// Writes the region's pixels into `out` (reshaped to the region).
    pub fn read_region(&self, reader: &mut RegionReader, out: &mut BgrFrame) -> Result<(), RegionError> {
        out.reshape(self.region.width, self.region.height);
        match reader.0.decompress_to_buffer(&self.pixels[..], &mut out.data[..]) {
            Ok(n) if n == out.data.len() => Ok(()),
            Ok(got) => Err(RegionError::Size { got, expected: out.data.len() }),
            Err(e) => Err(RegionError::Unpack(e)),
        }
    }
}

/// Template frames for JPEG output at one quality, shared read-only (by a daemon's sessions).
pub struct JpegTemplate {
    quality: u8,
    size: (usize, usize),
    frames: Vec<JpegFrame>,
    bytes: usize,
    max_region: usize,
}

impl std::fmt::Debug for JpegTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JpegTemplate")
            .field("quality", &self.quality)
            .field("frames", &self.frames.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl JpegTemplate {
    /// JPEG quality of the frames.
    pub fn quality(&self) -> u8 {
        self.quality
    }

    /// Frame size.
    pub fn size(&self) -> (usize, usize) {
        self.size
    }

    /// Frames held (one per face box).
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether it holds no frame (never true for a built one).
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Template frame `i`.
    pub fn frame(&self, i: usize) -> Option<&JpegFrame> {
        self.frames.get(i)
    }

    /// Bytes held (JPEGs, their layouts and region pixels).
    pub fn memory_bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes of the largest region (what a frame job's buffer needs).
    pub fn max_region_bytes(&self) -> usize {
        self.max_region
    }
}

/// Builds a [`JpegTemplate`] from the template's frames in order (fed by
/// [`super::SharedTemplate::open_with`]), giving up once it would hold more than a limit.
pub struct JpegTemplateBuilder {
    quality: u8,
    boxes: Vec<CropBox>,
    limit: usize,
    encoder: JpegEncoder,
    zstd: zstd::bulk::Compressor<'static>,
    pixels: BgrFrame,
    size: (usize, usize),
    frames: Vec<JpegFrame>,
    bytes: usize,
    over: bool,
}

impl std::fmt::Debug for JpegTemplateBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JpegTemplateBuilder").field("frames", &self.frames.len()).field("bytes", &self.bytes).finish()
    }
}

impl JpegTemplateBuilder {
    /// A builder for frames at `quality` with the avatar's face boxes (frame `i` has box `i`;
    /// frames past the boxes are never shown and not kept), holding at most `limit` bytes.
    pub fn new(quality: u8, boxes: &[CropBox], limit: usize) -> Result<Self, ImageError> {
        Ok(Self {
            quality,
            boxes: boxes.to_vec(),
            limit,
            encoder: JpegEncoder::new(quality)?,
            zstd: zstd::bulk::Compressor::new(1).map_err(|e| ImageError::Encode {
                format: "zstd",
                width: 0,
                height: 0,
                source: CodecError::Zstd(e),
            })?,
            pixels: BgrFrame::default(),
            size: (0, 0),
            frames: Vec::with_capacity(boxes.len()),
            bytes: 0,
            over: false,
        })
    }

    /// Takes template frame `index` (frames come in order from 0).
    pub fn push(&mut self, index: usize, frame: &BgrFrame) -> Result<(), ImageError> {
        if self.over || index >= self.boxes.len() {
            return Ok(());
        }
        let err = |format, source| ImageError::Encode { format, width: frame.width, height: frame.height, source };
        if index != self.frames.len() {
            return Err(err("JPEG", CodecError::OutOfOrder { index, expected: self.frames.len() }));
        }
        if index == 0 {
            self.size = (frame.width, frame.height);
        }
        let region = McuRegion::around(self.boxes[index], frame.width, frame.height);
        let jpeg = self.encoder.encode(frame)?;
        let mut layout = JpegLayout::default();
        layout.parse(jpeg).map_err(|e| err("JPEG", e.into()))?;
        layout.runs.shrink_to_fit();
        region.copy_out(frame, &mut self.pixels);
        let pixels = self.zstd.compress(&self.pixels.data).map_err(|e| err("zstd", CodecError::Zstd(e)))?;
        let bytes = jpeg.len() + pixels.len() + layout.runs.len() * 8;
        if self.bytes + bytes > self.limit {
            // Over the limit: the caller decodes frames as they are needed instead.
            self.over = true;
            self.frames = Vec::new();
            return Ok(());
        }
        self.frames.push(JpegFrame { jpeg: jpeg.into(), layout, region, pixels: pixels.into_boxed_slice() });
        self.bytes += bytes;
        Ok(())
    }

    /// The store, when every boxed frame came and it stayed within the limit.
    pub fn finish(self) -> Option<JpegTemplate> {
        if self.over || self.frames.len() != self.boxes.len() {
            return None;
        }
        let max_region = self.frames.iter().map(|f| f.region.bgr_len()).max().unwrap_or(0);
        Some(JpegTemplate {
            quality: self.quality,
            size: self.size,
            frames: self.frames,
            bytes: self.bytes,
            max_region,
        })
    }

    /// Whether it gave up (over its limit).
    pub fn over_limit(&self) -> bool {
        self.over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(width: usize, height: usize, v: u8) -> BgrFrame {
        let mut f = BgrFrame::new(width, height);
        for (i, p) in f.data.iter_mut().enumerate() {
            *p = (i % 251) as u8 ^ v;
        }
        f
    }

    #[test]
    fn keeps_each_boxed_frame_and_its_exact_region() {
        let boxes = [CropBox { x1: 10, y1: 20, x2: 50, y2: 60 }, CropBox { x1: 0, y1: 0, x2: 64, y2: 48 }];
        let mut b = JpegTemplateBuilder::new(85, &boxes, usize::MAX).unwrap();
        let frames: Vec<BgrFrame> = (0..3).map(|i| frame(64, 48, i as u8 * 40)).collect();
        for (i, f) in frames.iter().enumerate() {
            b.push(i, f).unwrap();
        }
        let t = b.finish().expect("within the limit");
        assert_eq!((t.len(), t.quality(), t.size()), (2, 85, (64, 48)));
        let f0 = t.frame(0).unwrap();
        assert_eq!(f0.region, McuRegion { x: 0, y: 16, width: 64, height: 48 - 16 });
        let mut region = BgrFrame::default();
        f0.read_region(&mut RegionReader::new().unwrap(), &mut region).unwrap();
        let mut want = BgrFrame::default();
        f0.region.copy_out(&frames[0], &mut want);
        assert_eq!(region, want);
        assert_eq!(&*t.frame(1).unwrap().jpeg, JpegEncoder::new(85).unwrap().encode(&frames[1]).unwrap());
        assert_eq!(t.max_region_bytes(), 64 * 48 * 3);
        let held: usize =
            (0..2).map(|i| t.frame(i).unwrap()).map(|f| f.jpeg.len() + f.pixels.len() + f.layout.runs.len() * 8).sum();
        assert_eq!(t.memory_bytes(), held);
    }

    #[test]
    fn gives_up_over_its_limit_or_with_frames_missing() {
        let boxes = [CropBox { x1: 0, y1: 0, x2: 64, y2: 48 }; 3];
        let build = |limit: usize| {
            let mut b = JpegTemplateBuilder::new(90, &boxes, limit).unwrap();
            for i in 0..3 {
                b.push(i, &frame(64, 48, i as u8)).unwrap();
            }
            b
        };
        let whole = build(usize::MAX).finish().expect("no limit").memory_bytes();
        let b = build(whole - 1);
        assert!(b.over_limit());
        assert!(b.finish().is_none());
        assert!(build(whole).finish().is_some());
        let mut b = JpegTemplateBuilder::new(90, &boxes, usize::MAX).unwrap();
        b.push(0, &frame(64, 48, 0)).unwrap();
        assert!(b.push(2, &frame(64, 48, 0)).is_err(), "out of order");
        assert!(b.finish().is_none(), "two frames missing");
    }
}
