//! Face tensor prep and paste-back (docs/spec.md sections 4 to 6).
//!
//! Prep: crop the box, resize it to the 328 template (bicubic, OpenCV-exact), take the inner
//! 320, mask the rectangle, and write the 6-channel NCHW f32 tensor (reference BGR / 255, then
//! masked BGR / 255) straight into a batch slot. Paste-back: the model output becomes u8 by
//! truncation, goes into the 328 template, is resized back to the box and pasted (hard, or with
//! a feathered edge).

use crate::crop::{CropBox, CropParams};
use crate::frame::BgrFrame;
use crate::resize::CubicResizer;

/// How the regenerated box is written over the frame.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Blend {
    /// Overwrite the box (the reference's behaviour).
    #[default]
    Hard,
    /// Alpha ramp from 0 at the box edge to 1 at `px` pixels inside it, hiding the square seam.
    Feather {
        /// Width of the ramp in pixels.
        px: u32,
    },
}

/// A [`Blend`] that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlendParseError {
    /// `feather=PX` with a width that is not a positive integer.
    #[error("feather width `{text}` must be a positive integer")]
    Width {
        /// The width given.
        text: String,
        /// Why it is not a number (none for 0).
        source: Option<std::num::ParseIntError>,
    },
    /// Neither `hard` nor `feather=PX`.
    #[error("unknown blend `{0}` (expected `hard` or `feather=PX`)")]
    Unknown(String),
}

impl std::str::FromStr for Blend {
    type Err = BlendParseError;

    /// `hard` or `feather=PX`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            None if s == "hard" => Ok(Blend::Hard),
            Some(("feather", px)) => match px.parse::<u32>() {
                Ok(0) => Err(BlendParseError::Width { text: px.into(), source: None }),
                Ok(px) => Ok(Blend::Feather { px }),
                Err(e) => Err(BlendParseError::Width { text: px.into(), source: Some(e) }),
            },
            _ => Err(BlendParseError::Unknown(s.into())),
        }
    }
}

/// Values per image tensor slot ([6, S, S]).
pub fn input_len(crop: &CropParams) -> usize {
    6 * (crop.model_size as usize).pow(2)
}

/// Values per output slot ([3, S, S]).
pub fn output_len(crop: &CropParams) -> usize {
    3 * (crop.model_size as usize).pow(2)
}

/// Bytes of the 328 template kept between prep and paste-back.
pub fn template_len(crop: &CropParams) -> usize {
    3 * (crop.template_size as usize).pow(2)
}

/// Crops, resizes and writes model inputs; reuses its buffers.
#[derive(Debug)]
pub struct FacePrep {
    resizer: CubicResizer,
    /// `f32(v) / 255` for every byte (the same division, looked up).
    lut: [f32; 256],
}

impl Default for FacePrep {
    fn default() -> Self {
        Self::new()
    }
}

impl FacePrep {
    /// A prep stage with empty buffers.
    pub fn new() -> Self {
        Self { resizer: CubicResizer::new(), lut: std::array::from_fn(|v| v as f32 / 255.0) }
    }

    /// Prepares one frame: writes the resized crop into `template` (`template_len` bytes, kept
    /// for paste-back) and the model input into `tensor` (`input_len` values).
    /// The box must lie inside the frame (avatars are validated when loaded).
    pub fn prep(&mut self, frame: &BgrFrame, b: CropBox, crop: &CropParams, template: &mut [u8], tensor: &mut [f32]) {
        self.crop(frame, b, crop, template);
        self.tensor(template, crop, tensor);
    }

    /// The first half of [`FacePrep::prep`]: the box resized into `template`.
    pub fn crop(&mut self, frame: &BgrFrame, b: CropBox, crop: &CropParams, template: &mut [u8]) {
        let t = crop.template_size as usize;
        let (x1, y1, w, h) = (b.x1 as usize, b.y1 as usize, b.width() as usize, b.height() as usize);
        let stride = frame.stride();
        let src = &frame.data[y1 * stride + x1 * 3..];
        self.resizer.resize(src, w, h, stride, template, t, t, t * 3);
    }

    /// The second half of [`FacePrep::prep`]: the model input from the resized crop alone (so a
    /// frame can travel as its 328 crop, and the UNet batcher makes the tensor in its batch).
    pub fn tensor(&self, template: &[u8], crop: &CropParams, tensor: &mut [f32]) {
        let t = crop.template_size as usize;
        let s = crop.model_size as usize;
        let off = crop.inner_offset as usize;
        let [mx1, my1, mx2, my2] = crop.mask.map(|v| v as usize);
        let plane = s * s;
        let (real, masked) = tensor.split_at_mut(3 * plane);
        let lut = &self.lut;
        for y in 0..s {
            let row = &template[((y + off) * t + off) * 3..((y + off) * t + off + s) * 3];
            for c in 0..3 {
                let dst = &mut real[c * plane + y * s..c * plane + (y + 1) * s];
                for (d, px) in dst.iter_mut().zip(row.chunks_exact(3)) {
                    *d = lut[usize::from(px[c])];
                }
                let (src, dst) = (
                    &real[c * plane + y * s..c * plane + (y + 1) * s],
                    &mut masked[c * plane + y * s..c * plane + (y + 1) * s],
                );
                dst.copy_from_slice(src);
                if (my1..=my2).contains(&y) {
                    dst[mx1..=mx2].fill(0.0);
                }
            }
        }
    }
}

/// The UNet's output `[3, S, S]` as the bytes paste-back uses: `(v * 255)` clamped to 0..=255
/// and truncated (docs/spec.md section 5), same layout.
pub fn quantize_output(output: &[f32], pred: &mut [u8]) {
    for (p, v) in pred.iter_mut().zip(output) {
        *p = (v * 255.0).clamp(0.0, 255.0) as u8;
    }
}

/// Pastes model outputs back into frames; reuses its buffers.
#[derive(Debug, Default)]
pub struct Compositor {
    resizer: CubicResizer,
    tmpl: Vec<u8>,
    patch: Vec<u8>,
    pred: Vec<u8>,
}

impl Compositor {
    /// A compositor with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The model output (`output_len` values, [3, S, S], B G R in [0, 1]) goes into a copy of
    /// `template` as u8 (truncated), is resized to the box and written over `frame`.
    pub fn paste(
        &mut self,
        frame: &mut BgrFrame,
        b: CropBox,
        crop: &CropParams,
        template: &[u8],
        output: &[f32],
        blend: Blend,
    ) {
        let mut pred = std::mem::take(&mut self.pred);
        pred.resize(output.len(), 0);
        quantize_output(output, &mut pred);
        self.paste_u8(frame, b, crop, template, &pred, blend);
        self.pred = pred;
    }

    /// [`Compositor::paste`] of a prediction already made bytes by [`quantize_output`].
    pub fn paste_u8(
        &mut self,
        frame: &mut BgrFrame,
        b: CropBox,
        crop: &CropParams,
        template: &[u8],
        pred: &[u8],
        blend: Blend,
    ) {
        let t = crop.template_size as usize;
        let s = crop.model_size as usize;
        let off = crop.inner_offset as usize;
        self.tmpl.clear();
        self.tmpl.extend_from_slice(template);
        let plane = s * s;
        for y in 0..s {
            let row = &mut self.tmpl[((y + off) * t + off) * 3..((y + off) * t + off + s) * 3];
            for (x, px) in row.chunks_exact_mut(3).enumerate() {
                for (c, v) in px.iter_mut().enumerate() {
                    *v = pred[c * plane + y * s + x];
                }
            }
        }
        let (x1, y1, w, h) = (b.x1 as usize, b.y1 as usize, b.width() as usize, b.height() as usize);
        let stride = frame.stride();
        match blend {
            Blend::Hard => {
                let dst = &mut frame.data[y1 * stride + x1 * 3..];
                self.resizer.resize(&self.tmpl, t, t, t * 3, dst, w, h, stride);
            }
            Blend::Feather { px } => {
                self.patch.resize(w * h * 3, 0);
                self.resizer.resize(&self.tmpl, t, t, t * 3, &mut self.patch, w, h, w * 3);
                let ramp = px as f32;
                for y in 0..h {
                    let dy = (y as f32 + 0.5).min(h as f32 - y as f32 - 0.5);
                    let row = &mut frame.data[(y1 + y) * stride + x1 * 3..(y1 + y) * stride + (x1 + w) * 3];
                    let src = &self.patch[y * w * 3..(y + 1) * w * 3];
                    for x in 0..w {
                        let dx = (x as f32 + 0.5).min(w as f32 - x as f32 - 0.5);
                        let a = (dx.min(dy) / ramp).min(1.0);
                        for c in 0..3 {
                            let i = x * 3 + c;
                            let v = f32::from(src[i]) * a + f32::from(row[i]) * (1.0 - a);
                            row[i] = v.round().clamp(0.0, 255.0) as u8;
                        }
                    }
                }
            }
        }
    }
}

/// Template frame for output frame `i` of an `n`-frame template: the SyncTalk ping-pong
/// `1, 2, ..., n-1, n-2, ..., 1, 0, 1, ...`, shifted by `start` (wrapping).
pub fn template_index(i: usize, n: usize, start: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let j = (i + 1) % period;
    let p = if j < n { j } else { period - j };
    (p + start % n) % n
}
