//! Crop geometry shared by the image path, the UNet and the JPEG splicer: a face box in frame
//! pixels ([`CropBox`]) and the model family's crop layout ([`CropParams`], docs/spec.md
//! section 4). It depends on nothing else in the crate, so that what needs it (the avatar
//! format, `unet`, `face`, `jpeg`) imports it without importing each other.

use serde::{Deserialize, Serialize};

/// Crop geometry that does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CropError {
    /// The model's inner square is empty or leaves the template.
    #[error("inner square {offset}+{size} does not fit the {template} template")]
    Inner {
        /// Its offset.
        offset: u32,
        /// Its side.
        size: u32,
        /// The template's side.
        template: u32,
    },
    /// The mask rectangle is reversed or leaves the model input.
    #[error("mask {mask:?} must lie inside the {size} model input")]
    Mask {
        /// The rectangle, inclusive.
        mask: [u32; 4],
        /// The model input's side.
        size: u32,
    },
}

/// A crop box `[x1, y1, x2, y2]` in pixels, x2/y2 exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "[i64; 4]", into = "[i64; 4]")]
pub struct CropBox {
    /// Left edge (inclusive).
    pub x1: i64,
    /// Top edge (inclusive).
    pub y1: i64,
    /// Right edge (exclusive).
    pub x2: i64,
    /// Bottom edge (exclusive).
    pub y2: i64,
}

impl From<[i64; 4]> for CropBox {
    fn from([x1, y1, x2, y2]: [i64; 4]) -> Self {
        Self { x1, y1, x2, y2 }
    }
}

impl From<CropBox> for [i64; 4] {
    fn from(b: CropBox) -> Self {
        [b.x1, b.y1, b.x2, b.y2]
    }
}

impl CropBox {
    /// Width in pixels.
    pub fn width(&self) -> i64 {
        self.x2 - self.x1
    }

    /// Height in pixels.
    pub fn height(&self) -> i64 {
        self.y2 - self.y1
    }

    /// Why this box cannot be used on a `width` x `height` frame, if it cannot.
    pub fn problem(&self, width: u32, height: u32) -> Option<&'static str> {
        if self.x2 <= self.x1 || self.y2 <= self.y1 {
            Some("is empty")
        } else if self.x1 < 0 || self.y1 < 0 {
            Some("starts outside the frame")
        } else if self.x2 > i64::from(width) || self.y2 > i64::from(height) {
            Some("extends past the frame")
        } else {
            None
        }
    }
}

/// Crop geometry of the model family (docs/spec.md section 4: 328 template, inner 320 at offset 4,
/// mask rectangle x 5..=314, y 5..=309).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CropParams {
    /// Side of the square template the crop is resized to.
    pub template_size: u32,
    /// Offset of the model's inner square inside the template.
    pub inner_offset: u32,
    /// Side of the model's square input.
    pub model_size: u32,
    /// Masked rectangle inside the model input, `[x1, y1, x2, y2]` inclusive.
    pub mask: [u32; 4],
}

impl Default for CropParams {
    fn default() -> Self {
        Self { template_size: 328, inner_offset: 4, model_size: 320, mask: [5, 5, 314, 309] }
    }
}

impl CropParams {
    /// Checks that the inner square and the mask fit.
    pub fn validate(&self) -> Result<(), CropError> {
        if self.model_size == 0 || self.inner_offset + self.model_size > self.template_size {
            return Err(CropError::Inner {
                offset: self.inner_offset,
                size: self.model_size,
                template: self.template_size,
            });
        }
        let [x1, y1, x2, y2] = self.mask;
        if x1 > x2 || y1 > y2 || x2 >= self.model_size || y2 >= self.model_size {
            return Err(CropError::Mask { mask: self.mask, size: self.model_size });
        }
        Ok(())
    }
}
