//! JPEG output (libjpeg-turbo): whole frames, and frames spliced from a template frame's JPEG
//! and a freshly encoded face region (docs/architecture.md, "JPEG output").
//!
//! Every JPEG is baseline 4:2:0 with a restart marker every [`restart_interval`] MCUs, a
//! divisor of the MCUs in a row, so each row splits into equal runs of MCUs that are coded
//! independently: a run's bytes depend only on its own pixels (colour conversion is per pixel,
//! chroma averages 2x2 squares, the DCT and quantisation are per 8x8 block, and the DC
//! prediction restarts with the run). So a region aligned to the runs, encoded alone, yields
//! the very bytes its runs have in the whole frame's JPEG, and [`JpegSplicer::splice`] makes a
//! composited frame's JPEG from the template frame's by swapping those runs: the same bytes as
//! encoding the whole composited frame (tested), for the cost of encoding the region.

use std::ffi::{c_int, CStr};

use turbojpeg::raw;

use crate::crop::CropBox;
use crate::frame::BgrFrame;
use crate::image_io::{CodecError, ImageError};
pub use crate::image_io::{LayoutError, SpliceError};

/// The MCU of 4:2:0 JPEG: 16x16 pixels (four luma blocks and one block of each chroma).
pub const MCU: usize = 16;

/// Largest restart interval (MCUs) within a row: at 1280 pixels wide, 8 MCUs cost 1.3 % in size.
const MAX_INTERVAL: usize = 8;

/// Smallest such interval: shorter ones cost more (1 MCU: 7-11 % on 720p frames) than a run a
/// row long, whose regions are whole rows (0.1 %).
const MIN_INTERVAL: usize = 4;

/// MCUs per restart interval for frames `width` pixels wide, so that intervals start each row
/// and regions align to them: the largest divisor of the MCUs in a row from 4 to 8, else the
/// whole row.
pub fn restart_interval(width: usize) -> usize {
    let cols = width.div_ceil(MCU).max(1);
    (MIN_INTERVAL..=MAX_INTERVAL.min(cols)).rev().find(|k| cols % k == 0).unwrap_or(cols)
}

/// The largest JPEG [`JpegEncoder`] or [`JpegSplicer`] can produce for a `width x height` frame.
pub fn max_len(width: usize, height: usize) -> usize {
    let (w, h) = (c_int::try_from(width).unwrap_or(c_int::MAX), c_int::try_from(height).unwrap_or(c_int::MAX));
    // SAFETY: a pure function of its arguments.
    match unsafe { raw::tj3JPEGBufSize(w, h, raw::TJSAMP_TJSAMP_420 as c_int) } as usize {
        0 => width * height * 3 + 2048,
        n => n,
    }
}

fn encode_error(width: usize, height: usize, source: impl Into<CodecError>) -> ImageError {
    ImageError::Encode { format: "JPEG", width, height, source: source.into() }
}

/// A TurboJPEG compressor handle.
struct Handle(raw::tjhandle);

impl Handle {
    fn compressor() -> Result<Self, CodecError> {
        // SAFETY: tj3Init has no preconditions; a null result is handled.
        let h = unsafe { raw::tj3Init(raw::TJINIT_TJINIT_COMPRESS as c_int) };
        if h.is_null() {
            return Err(CodecError::NoCompressor);
        }
        Ok(Self(h))
    }

    fn set(&mut self, param: raw::TJPARAM, value: usize) -> Result<(), CodecError> {
        let v = c_int::try_from(value).map_err(|_| CodecError::Setting { param, value })?;
        // SAFETY: the handle is live.
        match unsafe { raw::tj3Set(self.0, param as c_int, v) } {
            0 => Ok(()),
            _ => Err(self.error("setting a compressor parameter")),
        }
    }

    /// libjpeg-turbo's text for the handle's last error, while doing `action`.
    fn error(&self, action: &'static str) -> CodecError {
        // SAFETY: the handle is live; the string is NUL-terminated and outlives this copy.
        let message = unsafe { CStr::from_ptr(raw::tj3GetErrorStr(self.0)) }.to_string_lossy().into_owned();
        CodecError::TurboJpeg { action, message }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: made by tj3Init, destroyed once.
        unsafe { raw::tj3Destroy(self.0) }
    }
}

// SAFETY: a TurboJPEG handle may move between threads; it is used by one at a time (&mut).
unsafe impl Send for Handle {}

/// A JPEG encoder (one per thread) with a reused output buffer: quality 1..=100, 4:2:0, a
/// restart marker every [`restart_interval`] MCUs.
pub struct JpegEncoder {
    handle: Handle,
    interval: usize,
    buf: Vec<u8>,
    len: usize,
}

impl std::fmt::Debug for JpegEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JpegEncoder").field("capacity", &self.buf.capacity()).finish()
    }
}

impl JpegEncoder {
    /// An encoder at `quality` (clamped to 1..=100).
    pub fn new(quality: u8) -> Result<Self, ImageError> {
        let err = |e: CodecError| encode_error(0, 0, e);
        let mut handle = Handle::compressor().map_err(err)?;
        handle.set(raw::TJPARAM_TJPARAM_QUALITY, usize::from(quality.clamp(1, 100))).map_err(err)?;
        handle.set(raw::TJPARAM_TJPARAM_SUBSAMP, raw::TJSAMP_TJSAMP_420 as usize).map_err(err)?;
        handle.set(raw::TJPARAM_TJPARAM_NOREALLOC, 1).map_err(err)?;
        Ok(Self { handle, interval: 0, buf: Vec::new(), len: 0 })
    }

    /// Reserves (without touching) the output buffer for a `width x height` frame's worst case,
    /// so that encoding it, or any part of it, never grows the buffer.
    pub fn reserve(&mut self, width: usize, height: usize) {
        let need = max_len(width, height);
        if self.buf.capacity() < need {
            self.buf.clear();
            self.buf.reserve(need);
        }
    }

    /// Encodes `frame`; the JPEG bytes stay valid until the next call.
    pub fn encode(&mut self, frame: &BgrFrame) -> Result<&[u8], ImageError> {
        self.encode_part(frame, restart_interval(frame.width))
    }

    /// Encodes `pixels` with a restart marker every `interval` MCUs (a region of a wider
    /// frame takes the frame's interval).
    fn encode_part(&mut self, pixels: &BgrFrame, interval: usize) -> Result<&[u8], ImageError> {
        let err = |e: CodecError| encode_error(pixels.width, pixels.height, e);
        let expected = pixels.width * pixels.height * 3;
        if pixels.data.len() != expected || pixels.width == 0 || pixels.height == 0 {
            return Err(err(CodecError::Pixels { got: pixels.data.len(), expected }));
        }
        if self.interval != interval {
            self.handle.set(raw::TJPARAM_TJPARAM_RESTARTBLOCKS, interval).map_err(err)?;
            self.interval = interval;
        }
        // Capacity for the worst case, untouched: only the pages the JPEG fills become resident
        // (a 720p worst case is 2.8 MB, a JPEG 0.1-0.2 MB).
        let need = max_len(pixels.width, pixels.height);
        self.buf.clear();
        self.buf.reserve(need);
        let w =
            c_int::try_from(pixels.width).map_err(|source| err(CodecError::Width { width: pixels.width, source }))?;
        let h = pixels.height as c_int;
        let mut dst = self.buf.as_mut_ptr();
        let mut len = self.buf.capacity() as raw::size_t;
        // SAFETY: `pixels` holds `h` rows of `w * 3` bytes (checked above); `dst` has `len`
        // writable bytes and NOREALLOC keeps libjpeg-turbo from replacing it.
        let rc = unsafe {
            raw::tj3Compress8(
                self.handle.0,
                pixels.data.as_ptr(),
                w,
                0,
                h,
                raw::TJPF_TJPF_BGR as c_int,
                &mut dst,
                &mut len,
            )
        };
        if rc != 0 {
            return Err(err(self.handle.error("compressing")));
        }
        let len = len as usize;
        if len > self.buf.capacity() || dst != self.buf.as_mut_ptr() {
            return Err(err(CodecError::Overrun { len, capacity: self.buf.capacity() }));
        }
        // SAFETY: libjpeg-turbo wrote the first `len` bytes (within the capacity, checked).
        unsafe { self.buf.set_len(len) };
        self.len = len;
        Ok(&self.buf[..self.len])
    }
}

/// A rectangle of a frame aligned to the restart intervals (its left edge and width whole
/// intervals, its top edge and height whole MCUs; the right and bottom edges may instead be
/// the frame's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct McuRegion {
    /// Left edge, pixels.
    pub x: usize,
    /// Top edge, pixels.
    pub y: usize,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
}

impl McuRegion {
    /// The whole of a `width x height` frame.
    pub fn whole(width: usize, height: usize) -> Self {
        Self { x: 0, y: 0, width, height }
    }

    /// The smallest aligned region of a `width x height` frame that holds the box (boxes lie
    /// inside the frame: avatars are validated when loaded).
    pub fn around(b: CropBox, width: usize, height: usize) -> Self {
        let step = restart_interval(width) * MCU;
        let clamp = |v: i64, max: usize| (v.max(0) as usize).min(max);
        let (x1, y1) = (clamp(b.x1, width) / step * step, clamp(b.y1, height) / MCU * MCU);
        let x2 = clamp(b.x2, width).div_ceil(step).saturating_mul(step).min(width);
        let y2 = clamp(b.y2, height).div_ceil(MCU).saturating_mul(MCU).min(height);
        Self { x: x1, y: y1, width: x2.saturating_sub(x1), height: y2.saturating_sub(y1) }
    }

    /// Bytes of the region as packed BGR.
    pub fn bgr_len(&self) -> usize {
        self.width * self.height * 3
    }

    /// `b` in the region's own coordinates.
    pub fn local(&self, b: CropBox) -> CropBox {
        let (x, y) = (self.x as i64, self.y as i64);
        CropBox { x1: b.x1 - x, y1: b.y1 - y, x2: b.x2 - x, y2: b.y2 - y }
    }

    /// Copies the region of `frame` into `out` (reshaped to the region's size).
    pub fn copy_out(&self, frame: &BgrFrame, out: &mut BgrFrame) {
        out.reshape(self.width, self.height);
        let (stride, row) = (frame.stride(), self.width * 3);
        for (y, dst) in out.data.chunks_exact_mut(row.max(1)).enumerate().take(self.height) {
            let at = (self.y + y) * stride + self.x * 3;
            dst.copy_from_slice(&frame.data[at..at + row]);
        }
    }
}

/// Where a JPEG's parts lie: its header (through the scan header) and each restart interval's
/// entropy-coded bytes, without the markers between them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JpegLayout {
    /// Bytes before the entropy-coded data.
    pub header: usize,
    /// Each interval's bytes, `[start, end)`, in scan order.
    pub runs: Vec<(u32, u32)>,
}

impl JpegLayout {
    /// Parses `jpeg` (one baseline scan, as [`JpegEncoder`] writes), reusing `self`'s memory.
    pub fn parse(&mut self, jpeg: &[u8]) -> Result<(), LayoutError> {
        self.runs.clear();
        if !jpeg.starts_with(&[0xFF, 0xD8]) {
            return Err(LayoutError::NotJpeg);
        }
        let mut at = 2;
        loop {
            let (Some(&0xFF), Some(&marker)) = (jpeg.get(at), jpeg.get(at + 1)) else {
                return Err(LayoutError::NoMarker(at));
            };
            let len = jpeg.get(at + 2..at + 4).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
            let Some(len) = len.filter(|&l| l >= 2) else { return Err(LayoutError::CutShort(marker)) };
            at += 2 + len;
            if marker == 0xDA {
                break;
            }
        }
        self.header = at;
        let (mut start, mut i) = (at, at);
        let pos = |v: usize| u32::try_from(v).map_err(|_| LayoutError::TooLarge);
        while i + 1 < jpeg.len() {
            if jpeg[i] != 0xFF {
                i += 1;
                continue;
            }
            match jpeg[i + 1] {
                0x00 => i += 2,
                0xD0..=0xD7 => {
                    self.runs.push((pos(start)?, pos(i)?));
                    i += 2;
                    start = i;
                }
                0xD9 => {
                    self.runs.push((pos(start)?, pos(i)?));
                    return Ok(());
                }
                marker => return Err(LayoutError::UnexpectedMarker { marker, at: i }),
            }
        }
        Err(LayoutError::NoEnd)
    }
}

/// Makes composited frames' JPEGs from template frames' (see the module docs); reuses its
/// buffers (one per encoding thread).
pub struct JpegSplicer {
    encoder: JpegEncoder,
    region: JpegLayout,
}

impl std::fmt::Debug for JpegSplicer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JpegSplicer").field("encoder", &self.encoder).finish()
    }
}

impl JpegSplicer {
    /// A splicer for template frames encoded at `quality` by [`JpegEncoder`].
    pub fn new(quality: u8) -> Result<Self, ImageError> {
        Ok(Self { encoder: JpegEncoder::new(quality)?, region: JpegLayout::default() })
    }

    /// Writes into `out` the JPEG of a `size` (width, height) template frame (`base`, laid out
    /// as `layout`) with `region` made from `pixels` (its composited BGR pixels): byte-for-byte
    /// the JPEG of the whole composited frame. `out` is cleared first; reserve it for the
    /// frame's worst case ([`max_len`]) and it never grows.
    pub fn splice(
        &mut self,
        base: &[u8],
        layout: &JpegLayout,
        size: (usize, usize),
        pixels: &BgrFrame,
        region: McuRegion,
        out: &mut Vec<u8>,
    ) -> Result<(), ImageError> {
        let err = |e: SpliceError| encode_error(region.width, region.height, e);
        let (width, height) = size;
        let k = restart_interval(width);
        let (right, bottom) = (region.x + region.width, region.y + region.height);
        let aligned = region.x % (k * MCU) == 0
            && region.y % MCU == 0
            && (right % (k * MCU) == 0 || right == width)
            && (bottom % MCU == 0 || bottom == height);
        if (pixels.width, pixels.height) != (region.width, region.height)
            || !aligned
            || right > width
            || bottom > height
        {
            return Err(err(SpliceError::Region {
                pixels_width: pixels.width,
                pixels_height: pixels.height,
                x: region.x,
                y: region.y,
                region_width: region.width,
                region_height: region.height,
                grid_width: k * MCU,
                grid_height: MCU,
                width,
                height,
            }));
        }
        let n = layout.runs.len();
        let in_base = layout.header <= base.len() && layout.runs.last().is_some_and(|r| r.1 as usize <= base.len());
        let (per_row, rows) = (width.div_ceil(MCU) / k, height.div_ceil(MCU));
        if !in_base || per_row == 0 || n != per_row * rows {
            return Err(err(SpliceError::Template { bytes: base.len(), intervals: n, rows, per_row }));
        }
        // Sized once for the frame's worst case (capacity only: untouched pages cost nothing).
        self.encoder.reserve(width, height);
        self.region.runs.reserve(n);
        let small = self.encoder.encode_part(pixels, k)?;
        self.region.parse(small).map_err(|e| err(SpliceError::RegionLayout(e)))?;
        let (c0, c1) = (region.x / MCU / k, right.div_ceil(MCU).div_ceil(k));
        let (r0, r1) = (region.y / MCU, bottom.div_ceil(MCU));
        if self.region.runs.len() != (r1 - r0) * (c1 - c0) {
            return Err(err(SpliceError::RegionIntervals {
                got: self.region.runs.len(),
                expected: (r1 - r0) * (c1 - c0),
            }));
        }
        out.clear();
        out.extend_from_slice(&base[..layout.header]);
        for (s, &(a, b)) in layout.runs.iter().enumerate() {
            let (row, col) = (s / per_row, s % per_row);
            if (r0..r1).contains(&row) && (c0..c1).contains(&col) {
                let (a, b) = self.region.runs[(row - r0) * (c1 - c0) + col - c0];
                out.extend_from_slice(&small[a as usize..b as usize]);
            } else {
                out.extend_from_slice(&base[a as usize..b as usize]);
            }
            out.extend_from_slice(&if s + 1 < n { [0xFF, 0xD0 + (s % 8) as u8] } else { [0xFF, 0xD9] });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame with texture everywhere (so every block has AC energy).
    fn textured(width: usize, height: usize, seed: u32) -> BgrFrame {
        let mut f = BgrFrame::new(width, height);
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        for (i, v) in f.data.iter_mut().enumerate() {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let (x, y) = ((i / 3) % width, (i / 3) / width);
            *v = ((x * 3 + y * 2 + (i % 3) * 40) as u32 % 200 + s % 56) as u8;
        }
        f
    }

    fn jpeg(frame: &BgrFrame, quality: u8) -> Vec<u8> {
        JpegEncoder::new(quality).unwrap().encode(frame).unwrap().to_vec()
    }

    /// Pastes other pixels into `b` of a frame, then checks the spliced JPEG is the whole
    /// frame's.
    fn check(width: usize, height: usize, b: CropBox, quality: u8) {
        let base = textured(width, height, 1);
        let base_jpeg = jpeg(&base, quality);
        let mut layout = JpegLayout::default();
        layout.parse(&base_jpeg).unwrap();
        let mut composite = base.clone();
        let paste = textured(width, height, 7);
        for y in b.y1 as usize..b.y2 as usize {
            let r = y * width * 3 + b.x1 as usize * 3..y * width * 3 + b.x2 as usize * 3;
            composite.data[r.clone()].copy_from_slice(&paste.data[r]);
        }
        let region = McuRegion::around(b, width, height);
        let mut pixels = BgrFrame::default();
        region.copy_out(&composite, &mut pixels);
        let mut s = JpegSplicer::new(quality).unwrap();
        let mut spliced = Vec::new();
        s.splice(&base_jpeg, &layout, (width, height), &pixels, region, &mut spliced).unwrap();
        assert!(spliced == jpeg(&composite, quality), "{width}x{height} box {b:?} q{quality}: bytes differ");
        // The buffers reused: the same again.
        let mut again = Vec::new();
        s.splice(&base_jpeg, &layout, (width, height), &pixels, region, &mut again).unwrap();
        assert_eq!(again, spliced);
        // And it decodes to the composite's JPEG pixels, like any JPEG.
        let mut decoded = BgrFrame::default();
        crate::image_io::decode_image(&spliced, &mut decoded).unwrap();
        assert_eq!((decoded.width, decoded.height), (width, height));
    }

    #[test]
    fn spliced_jpeg_is_the_whole_frames_jpeg() {
        check(320, 240, CropBox { x1: 37, y1: 45, x2: 170, y2: 199 }, 90);
        check(320, 240, CropBox { x1: 0, y1: 0, x2: 320, y2: 240 }, 75);
        check(320, 240, CropBox { x1: 16, y1: 32, x2: 48, y2: 64 }, 100);
        check(1280, 720, CropBox { x1: 530, y1: 293, x2: 744, y2: 507 }, 90);
    }

    #[test]
    fn exact_at_frame_edges_off_the_mcu_grid() {
        // Widths whose MCU columns have no divisor from 4 to 8 (53, a prime: whole rows) or
        // others (21), heights off the grid, regions touching the right and bottom edges.
        check(330, 250, CropBox { x1: 200, y1: 150, x2: 330, y2: 250 }, 90);
        check(331, 249, CropBox { x1: 3, y1: 5, x2: 331, y2: 249 }, 60);
        check(848, 250, CropBox { x1: 101, y1: 17, x2: 211, y2: 121 }, 90);
        check(336, 200, CropBox { x1: 300, y1: 180, x2: 336, y2: 200 }, 90);
    }

    #[test]
    fn intervals_divide_the_row() {
        assert_eq!(restart_interval(1280), 8);
        assert_eq!(restart_interval(1920), 8);
        assert_eq!(restart_interval(336), 7);
        assert_eq!(restart_interval(848), 53);
        assert_eq!(restart_interval(330), 7);
        assert_eq!(restart_interval(8), 1);
        assert_eq!(restart_interval(48), 3);
    }

    #[test]
    fn regions_cover_the_box_on_the_interval_grid() {
        let r = McuRegion::around(CropBox { x1: 530, y1: 293, x2: 744, y2: 507 }, 1280, 720);
        assert_eq!(r, McuRegion { x: 512, y: 288, width: 256, height: 224 });
        let r = McuRegion::around(CropBox { x1: 200, y1: 150, x2: 330, y2: 250 }, 330, 250);
        assert_eq!(r, McuRegion { x: 112, y: 144, width: 218, height: 106 });
        assert_eq!(
            r.local(CropBox { x1: 200, y1: 150, x2: 330, y2: 250 }),
            CropBox { x1: 88, y1: 6, x2: 218, y2: 106 }
        );
    }

    #[test]
    fn layouts_find_every_interval() {
        let j = jpeg(&textured(320, 240, 3), 90);
        let mut l = JpegLayout::default();
        l.parse(&j).unwrap();
        // 20 x 15 MCUs in intervals of 5.
        assert_eq!(restart_interval(320), 5);
        assert_eq!(l.runs.len(), 4 * 15);
        assert_eq!(l.runs.last().unwrap().1 as usize, j.len() - 2);
        assert!(l.parse(b"\xFF\xD8\xFF").is_err());
        assert!(l.parse(&j[..j.len() - 2]).unwrap_err().to_string().contains("end-of-image"));
        assert!(l.parse(b"GIF89a").unwrap_err().to_string().contains("not a JPEG"));
    }

    #[test]
    fn wrong_pixels_or_template_are_errors() {
        let base = jpeg(&textured(320, 64, 1), 90);
        let mut layout = JpegLayout::default();
        layout.parse(&base).unwrap();
        let region = McuRegion { x: 80, y: 16, width: 80, height: 32 };
        let mut s = JpegSplicer::new(90).unwrap();
        let mut out = Vec::new();
        let mut splice = |size, w, h, r| s.splice(&base, &layout, size, &BgrFrame::new(w, h), r, &mut out);
        let e = splice((320, 64), 16, 32, region).unwrap_err();
        assert!(e.to_string().contains("expected 80x32"), "{e}");
        let e = splice((320, 64), 80, 32, McuRegion { x: 16, ..region }).unwrap_err();
        assert!(e.to_string().contains("80x16-pixel grid"), "{e}");
        // Ending off the grid above the frame's bottom.
        let e = splice((320, 64), 80, 40, McuRegion { height: 40, ..region }).unwrap_err();
        assert!(e.to_string().contains("80x16-pixel grid"), "{e}");
        // Below the frame.
        let e = splice((320, 64), 80, 32, McuRegion { y: 48, ..region }).unwrap_err();
        assert!(e.to_string().contains("grid"), "{e}");
        // A template frame of another size than said.
        let e = splice((320, 96), 80, 32, region).unwrap_err();
        assert!(e.to_string().contains("another size"), "{e}");
    }
}
