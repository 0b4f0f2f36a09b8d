//! Still-image codecs for frames: JPEG decoding (turbojpeg) and PNG (png), to and from packed
//! BGR; JPEG encoding is in [`crate::jpeg`].

use std::path::{Path, PathBuf};

use crate::frame::BgrFrame;

/// Errors reading or writing images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading the file failed.
    #[error("could not read image {path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Decoding failed.
    #[error("could not decode {path}: {message} (expected a JPEG or PNG image)")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// Encoding failed.
    #[error("could not encode a {width}x{height} frame as {format}: {message}")]
    Encode {
        /// Target format.
        format: &'static str,
        /// Frame width.
        width: usize,
        /// Frame height.
        height: usize,
        /// The encoder's message.
        message: String,
    },
}

/// Decodes a JPEG or PNG file (by content) into `out` as BGR.
pub fn read_image(path: &Path, out: &mut BgrFrame) -> Result<(), ImageError> {
    let bytes =
        std::fs::read(path).map_err(|e| ImageError::Read { path: path.to_path_buf(), message: e.to_string() })?;
    decode_image(&bytes, out).map_err(|message| ImageError::Decode { path: path.to_path_buf(), message })
}

/// Decodes JPEG or PNG bytes into `out` as BGR.
pub fn decode_image(bytes: &[u8], out: &mut BgrFrame) -> Result<(), String> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        decode_jpeg(bytes, out)
    } else if bytes.starts_with(b"\x89PNG") {
        decode_png(bytes, out)
    } else {
        Err("not a JPEG or PNG file".into())
    }
}

fn decode_jpeg(bytes: &[u8], out: &mut BgrFrame) -> Result<(), String> {
    thread_local! {
        static DEC: std::cell::RefCell<Option<turbojpeg::Decompressor>> = const { std::cell::RefCell::new(None) };
    }
    DEC.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(turbojpeg::Decompressor::new().map_err(|e| e.to_string())?);
        }
        let dec = d.as_mut().expect("set above");
        let header = dec.read_header(bytes).map_err(|e| e.to_string())?;
        out.reshape(header.width, header.height);
        let pitch = out.stride();
        let image = turbojpeg::Image {
            pixels: &mut out.data[..],
            width: header.width,
            pitch,
            height: header.height,
            format: turbojpeg::PixelFormat::BGR,
        };
        dec.decompress(bytes, image).map_err(|e| e.to_string())
    })
}

fn decode_png(bytes: &[u8], out: &mut BgrFrame) -> Result<(), String> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; reader.output_buffer_size().ok_or("PNG too large")?];
    let info = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    let (w, h) = (info.width as usize, info.height as usize);
    out.reshape(w, h);
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err("indexed PNG after expansion".into()),
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
    let err = |message: String| ImageError::Encode { format: "PNG", width: frame.width, height: frame.height, message };
    rgb_scratch.clear();
    rgb_scratch.extend(frame.data.chunks_exact(3).flat_map(|p| [p[2], p[1], p[0]]));
    out.clear();
    let mut enc = png::Encoder::new(&mut *out, frame.width as u32, frame.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    let mut writer = enc.write_header().map_err(|e| err(e.to_string()))?;
    writer.write_image_data(rgb_scratch).map_err(|e| err(e.to_string()))?;
    writer.finish().map_err(|e| err(e.to_string()))
}
