//! Still-image codecs for frames: JPEG decoding (turbojpeg) and PNG (png), to and from packed
//! BGR; JPEG encoding is in [`crate::jpeg`]. The errors of both are here: [`crate::jpeg`] uses
//! this module, so the causes its encoder, layout parser and splicer report ([`CodecError`],
//! [`LayoutError`], [`SpliceError`]) live beside the [`ImageError`] that carries them.

use std::ffi::c_uint;
use std::path::{Path, PathBuf};

use crate::frame::BgrFrame;

/// Errors reading or writing images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading the file failed.
    #[error("could not read image {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Decoding failed.
    #[error("could not decode {path}: {source} (expected a JPEG or PNG image)")]
    Decode {
        /// The file.
        path: PathBuf,
        /// What the decoder reported.
        source: CodecError,
    },
    /// Encoding failed.
    #[error("could not encode a {width}x{height} frame as {format}: {source}")]
    Encode {
        /// Target format.
        format: &'static str,
        /// Frame width.
        width: usize,
        /// Frame height.
        height: usize,
        /// What the encoder reported.
        source: CodecError,
    },
}

/// What an image codec reported: the cause of an [`ImageError`].
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes start like neither a JPEG nor a PNG.
    #[error("not a JPEG or PNG file")]
    NotAnImage,
    /// The file's header could not be read.
    #[error("{0}")]
    Header(#[source] imagesize::ImageError),
    /// libjpeg-turbo, through the turbojpeg crate, failed.
    #[error("{0}")]
    Jpeg(#[from] turbojpeg::Error),
    /// A libjpeg-turbo call failed: what was being done, and the library's text
    /// (`tj3GetErrorStr`, all it gives).
    #[error("{action}: {message}")]
    TurboJpeg {
        /// What was being done.
        action: &'static str,
        /// libjpeg-turbo's message.
        message: String,
    },
    /// libjpeg-turbo could not make a compressor.
    #[error("libjpeg-turbo could not make a compressor")]
    NoCompressor,
    /// A compressor parameter outside what libjpeg-turbo takes.
    #[error("setting {param} to {value}: out of range")]
    Setting {
        /// The parameter (`TJPARAM`).
        param: c_uint,
        /// The value asked for.
        value: usize,
    },
    /// A frame whose pixels do not fill its size (or an empty one).
    #[error("{got} bytes of pixels, expected {expected}")]
    Pixels {
        /// Bytes given.
        got: usize,
        /// Bytes its size needs.
        expected: usize,
    },
    /// A frame wider than libjpeg-turbo takes.
    #[error("width {width}: {source}")]
    Width {
        /// The frame's width.
        width: usize,
        /// The failed conversion.
        source: std::num::TryFromIntError,
    },
    /// libjpeg-turbo reported more bytes than the buffer it was given (or another buffer).
    #[error("libjpeg-turbo wrote {len} bytes outside the {capacity} given")]
    Overrun {
        /// Bytes it reported.
        len: usize,
        /// The buffer's capacity.
        capacity: usize,
    },
    /// A JPEG that is not laid out as the encoder writes.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A splice whose region or template frame does not fit.
    #[error(transparent)]
    Splice(Box<SpliceError>),
    /// Template frames given out of order.
    #[error("template frame {index} came out of order (expected {expected})")]
    OutOfOrder {
        /// The frame given.
        index: usize,
        /// The frame expected.
        expected: usize,
    },
    /// PNG decoding failed.
    #[error("{0}")]
    PngDecode(#[from] png::DecodingError),
    /// PNG encoding failed.
    #[error("{0}")]
    PngEncode(#[from] png::EncodingError),
    /// A PNG whose pixels would not fit in memory.
    #[error("PNG too large")]
    PngTooLarge,
    /// A palette PNG the decoder did not expand (it always should).
    #[error("indexed PNG after expansion")]
    IndexedPng,
    /// zstd failed.
    #[error("{0}")]
    Zstd(#[source] std::io::Error),
}

impl From<SpliceError> for CodecError {
    fn from(e: SpliceError) -> Self {
        CodecError::Splice(Box::new(e))
    }
}

/// Why a JPEG's layout could not be read ([`crate::jpeg::JpegLayout::parse`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// It does not start with a start-of-image marker.
    #[error("not a JPEG (no start-of-image marker)")]
    NotJpeg,
    /// Something other than a marker where one belongs.
    #[error("expected a marker at byte {0}")]
    NoMarker(usize),
    /// A marker segment whose length is missing or too short.
    #[error("marker {0:#04x} cut short")]
    CutShort(u8),
    /// Offsets past what a layout holds (`u32`).
    #[error("JPEG over 4 GiB")]
    TooLarge,
    /// A marker other than a restart or the end inside the scan.
    #[error("unexpected marker {marker:#04x} in the scan at byte {at}")]
    UnexpectedMarker {
        /// The marker.
        marker: u8,
        /// Its offset.
        at: usize,
    },
    /// The scan runs to the end of the bytes.
    #[error("no end-of-image marker")]
    NoEnd,
}

/// Why [`crate::jpeg::JpegSplicer::splice`] could not splice a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpliceError {
    /// The region is off the restart-interval grid, outside the frame, or its pixels are
    /// another size.
    #[error(
        "the region's pixels are {pixels_width}x{pixels_height}, expected {region_width}x{region_height} at \
         ({x}, {y}) on the {grid_width}x{grid_height}-pixel grid of a {width}x{height} frame"
    )]
    Region {
        /// The pixels' width.
        pixels_width: usize,
        /// The pixels' height.
        pixels_height: usize,
        /// The region's left edge.
        x: usize,
        /// The region's top edge.
        y: usize,
        /// The region's width.
        region_width: usize,
        /// The region's height.
        region_height: usize,
        /// Pixels per restart interval (the grid's columns).
        grid_width: usize,
        /// Pixels per MCU row (the grid's rows).
        grid_height: usize,
        /// The frame's width.
        width: usize,
        /// The frame's height.
        height: usize,
    },
    /// The template frame's JPEG has another number of restart intervals than its size makes.
    #[error(
        "the template frame's JPEG ({bytes} bytes) has {intervals} restart intervals, expected {rows} rows \
         of {per_row} (was it encoded at another size, or is its layout another JPEG's?)"
    )]
    Template {
        /// Its length.
        bytes: usize,
        /// Restart intervals its layout lists.
        intervals: usize,
        /// MCU rows of the frame.
        rows: usize,
        /// Intervals per row.
        per_row: usize,
    },
    /// The region's own JPEG could not be laid out.
    #[error("the region's JPEG: {0}")]
    RegionLayout(#[source] LayoutError),
    /// The region's own JPEG has another number of restart intervals than the region.
    #[error("the region's JPEG has {got} restart intervals, expected {expected}")]
    RegionIntervals {
        /// Intervals it has.
        got: usize,
        /// Intervals the region spans.
        expected: usize,
    },
}

/// Decodes a JPEG or PNG file (by content) into `out` as BGR.
pub fn read_image(path: &Path, out: &mut BgrFrame) -> Result<(), ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Read { path: path.to_path_buf(), source })?;
    decode_image(&bytes, out).map_err(|source| ImageError::Decode { path: path.to_path_buf(), source })
}

/// The size (width, height) of the image file at `path`, read from its header alone.
pub fn image_size(path: &Path) -> Result<(usize, usize), ImageError> {
    match imagesize::size(path) {
        Ok(size) => Ok((size.width, size.height)),
        // A file shorter than its header is a bad image, not a failed read.
        Err(imagesize::ImageError::IoError(source)) if source.kind() != std::io::ErrorKind::UnexpectedEof => {
            Err(ImageError::Read { path: path.to_path_buf(), source })
        }
        Err(e) => Err(ImageError::Decode { path: path.to_path_buf(), source: CodecError::Header(e) }),
    }
}

/// Decodes JPEG or PNG bytes into `out` as BGR.
pub fn decode_image(bytes: &[u8], out: &mut BgrFrame) -> Result<(), CodecError> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        decode_jpeg(bytes, out)
    } else if bytes.starts_with(b"\x89PNG") {
        decode_png(bytes, out)
    } else {
        Err(CodecError::NotAnImage)
    }
}

fn decode_jpeg(bytes: &[u8], out: &mut BgrFrame) -> Result<(), CodecError> {
    thread_local! {
        static DEC: std::cell::RefCell<Option<turbojpeg::Decompressor>> = const { std::cell::RefCell::new(None) };
    }
    DEC.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(turbojpeg::Decompressor::new()?);
        }
        let dec = d.as_mut().expect("set above");
        let header = dec.read_header(bytes)?;
        out.reshape(header.width, header.height);
        let pitch = out.stride();
        let image = turbojpeg::Image {
            pixels: &mut out.data[..],
            width: header.width,
            pitch,
            height: header.height,
            format: turbojpeg::PixelFormat::BGR,
        };
        Ok(dec.decompress(bytes, image)?)
    })
}

fn decode_png(bytes: &[u8], out: &mut BgrFrame) -> Result<(), CodecError> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0u8; reader.output_buffer_size().ok_or(CodecError::PngTooLarge)?];
    let info = reader.next_frame(&mut buf)?;
    let (w, h) = (info.width as usize, info.height as usize);
    out.reshape(w, h);
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(CodecError::IndexedPng),
    };
    for y in 0..h {
        let src = &buf[y * info.line_size..y * info.line_size + w * channels];
        let dst = &mut out.data[y * w * 3..(y + 1) * w * 3];
        for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(channels)) {
            match channels {
                1 | 2 => d.fill(s[0]),
                _ => {
                    d[0] = s[2];
                    d[1] = s[1];
                    d[2] = s[0];
                }
            }
        }
    }
    Ok(())
}

/// Encodes a BGR frame as PNG (RGB, as OpenCV writes it) into `out`.
pub fn encode_png(frame: &BgrFrame, out: &mut Vec<u8>, rgb_scratch: &mut Vec<u8>) -> Result<(), ImageError> {
    let err = |e: png::EncodingError| ImageError::Encode {
        format: "PNG",
        width: frame.width,
        height: frame.height,
        source: e.into(),
    };
    rgb_scratch.clear();
    rgb_scratch.extend(frame.data.chunks_exact(3).flat_map(|p| [p[2], p[1], p[0]]));
    out.clear();
    let mut enc = png::Encoder::new(&mut *out, frame.width as u32, frame.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    let mut writer = enc.write_header().map_err(err)?;
    writer.write_image_data(rgb_scratch).map_err(err)?;
    writer.finish().map_err(err)
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn causes_are_kept_with_the_old_wording() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.png");
        let e = read_image(&missing, &mut BgrFrame::default()).unwrap_err();
        assert!(e.to_string().starts_with("could not read image "), "{e}");
        let io = e.source().and_then(|c| c.downcast_ref::<std::io::Error>()).expect("the io::Error");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        assert!(matches!(image_size(&missing), Err(ImageError::Read { .. })));

        let garbage = dir.path().join("garbage.png");
        std::fs::write(&garbage, b"garbage").unwrap();
        let e = read_image(&garbage, &mut BgrFrame::default()).unwrap_err();
        assert!(matches!(e, ImageError::Decode { source: CodecError::NotAnImage, .. }), "{e:?}");
        assert!(e.to_string().contains("not a JPEG or PNG file (expected a JPEG or PNG image)"), "{e}");

        // A PNG cut short: png's own error is the cause's cause.
        let (mut png, mut scratch) = (Vec::new(), Vec::new());
        encode_png(&BgrFrame::new(8, 8), &mut png, &mut scratch).unwrap();
        let e = decode_image(&png[..png.len() / 2], &mut BgrFrame::default()).unwrap_err();
        assert!(e.source().is_some_and(|c| c.is::<png::DecodingError>()), "{e:?}");
    }
}
