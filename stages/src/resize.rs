//! OpenCV-compatible bicubic resize (`cv2.resize(..., interpolation=cv2.INTER_CUBIC)`) of
//! packed BGR u8 images.
//!
//! fast_image_resize cannot reproduce OpenCV here (its cubic filters use other coefficients and
//! widen the kernel when downscaling), so this is OpenCV's `resizeGeneric_` algorithm written
//! out: half-pixel centres computed in f64 then f32, Keys kernel with a = -0.75 evaluated in
//! f32, coefficients quantised to i16 at 2^11 (round half to even), a horizontal pass in i32
//! with replicated borders, and a vertical pass that (like OpenCV's 128-bit SIMD path) weighs
//! the four rows in f32 and rounds half to even, with OpenCV's integer rounding for the
//! `width * 3 % 8` values at the end of each row that its scalar tail handles.

const COEF_BITS: u32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;
const SIMD_LANES: usize = 8;

fn cubic_coeffs(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    let c3 = 1.0 - c0 - c1 - c2;
    [c0, c1, c2, c3]
}

fn quantise(c: [f32; 4]) -> [i16; 4] {
    c.map(|v| (v * COEF_SCALE).round_ties_even().clamp(i16::MIN as f32, i16::MAX as f32) as i16)
}

/// Source start index and fixed-point weights for each destination coordinate.
fn axis_plan(src: usize, dst: usize, ofs: &mut Vec<i32>, coef: &mut Vec<[i16; 4]>) {
    ofs.clear();
    coef.clear();
    let inv_scale = dst as f64 / src as f64;
    let scale = 1.0 / inv_scale;
    for d in 0..dst {
        let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
        let s = f.floor();
        ofs.push(s as i32);
        coef.push(quantise(cubic_coeffs(f - s)));
    }
}

/// A reusable bicubic resizer: its plans and row buffers are kept between calls, so resizing
/// the same sizes again allocates nothing.
#[derive(Debug, Default)]
pub struct CubicResizer {
    xofs: Vec<i32>,
    alpha: Vec<[i16; 4]>,
    yofs: Vec<i32>,
    beta: Vec<[i16; 4]>,
    /// Horizontally resized source rows (i32), indexed by source row, computed lazily.
    rows: Vec<i32>,
    row_of: Vec<i64>,
}

impl CubicResizer {
    /// A resizer with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Resizes the `src_w x src_h` BGR image at `src` (row stride `src_stride` bytes) into the
    /// `dst_w x dst_h` region at `dst` (row stride `dst_stride` bytes).
    #[allow(clippy::too_many_arguments)]
    pub fn resize(
        &mut self,
        src: &[u8],
        src_w: usize,
        src_h: usize,
        src_stride: usize,
        dst: &mut [u8],
        dst_w: usize,
        dst_h: usize,
        dst_stride: usize,
    ) {
        assert!(src_w > 0 && src_h > 0 && dst_w > 0 && dst_h > 0, "empty image");
        assert!(src.len() >= (src_h - 1) * src_stride + src_w * 3, "source buffer too small");
        assert!(dst.len() >= (dst_h - 1) * dst_stride + dst_w * 3, "destination buffer too small");
        axis_plan(src_w, dst_w, &mut self.xofs, &mut self.alpha);
        axis_plan(src_h, dst_h, &mut self.yofs, &mut self.beta);
        let width = dst_w * 3;
        // A ring of 4 horizontally resized rows, keyed by source row.
        self.rows.clear();
        self.rows.resize(4 * width, 0);
        self.row_of.clear();
        self.row_of.resize(4, -1);
        let simd_end = width - width % SIMD_LANES;
        let scale = 1.0f32 / (COEF_SCALE * COEF_SCALE);
        for dy in 0..dst_h {
            let sy0 = self.yofs[dy];
            let mut slots = [0usize; 4];
            for (k, slot) in slots.iter_mut().enumerate() {
                let sy = (sy0 - 1 + k as i32).clamp(0, src_h as i32 - 1) as usize;
                *slot = sy % 4;
                if self.row_of[sy % 4] != sy as i64 {
                    let row = &src[sy * src_stride..sy * src_stride + src_w * 3];
                    hresize(
                        row,
                        src_w,
                        &self.xofs,
                        &self.alpha,
                        &mut self.rows[(sy % 4) * width..(sy % 4 + 1) * width],
                    );
                    self.row_of[sy % 4] = sy as i64;
                }
            }
            let b = self.beta[dy];
            let bf = b.map(|v| f32::from(v) * scale);
            let r = |k: usize| &self.rows[slots[k] * width..(slots[k] + 1) * width];
            let (s0, s1, s2, s3) = (r(0), r(1), r(2), r(3));
            let out = &mut dst[dy * dst_stride..dy * dst_stride + width];
            for x in 0..simd_end {
                let t = s3[x] as f32 * bf[3];
                let t = s2[x] as f32 * bf[2] + t;
                let t = s1[x] as f32 * bf[1] + t;
                let t = s0[x] as f32 * bf[0] + t;
                out[x] = round_ties_even(t).clamp(0.0, 255.0) as u8;
            }
            for x in simd_end..width {
                let v = s0[x] as i64 * i64::from(b[0])
                    + s1[x] as i64 * i64::from(b[1])
                    + s2[x] as i64 * i64::from(b[2])
                    + s3[x] as i64 * i64::from(b[3]);
                out[x] = ((v + (1 << (2 * COEF_BITS - 1))) >> (2 * COEF_BITS)).clamp(0, 255) as u8;
            }
        }
    }
}

/// Round half to even for |v| < 2^22 (adding and removing 1.5 * 2^23 leaves the nearest
/// integer under the default rounding mode), without the libm call `f32::round_ties_even`
/// becomes on baseline x86-64.
#[inline(always)]
fn round_ties_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

fn hresize(row: &[u8], src_w: usize, xofs: &[i32], alpha: &[[i16; 4]], out: &mut [i32]) {
    let last = src_w as i32 - 1;
    for (dx, (&sx, a)) in xofs.iter().zip(alpha).enumerate() {
        if sx >= 1 && sx + 2 <= last {
            let base = (sx - 1) as usize * 3;
            for c in 0..3 {
                out[dx * 3 + c] = i32::from(row[base + c]) * i32::from(a[0])
                    + i32::from(row[base + 3 + c]) * i32::from(a[1])
                    + i32::from(row[base + 6 + c]) * i32::from(a[2])
                    + i32::from(row[base + 9 + c]) * i32::from(a[3]);
            }
        } else {
            for c in 0..3 {
                let mut v = 0i32;
                for (j, &w) in a.iter().enumerate() {
                    let x = (sx - 1 + j as i32).clamp(0, last) as usize;
                    v += i32::from(row[x * 3 + c]) * i32::from(w);
                }
                out[dx * 3 + c] = v;
            }
        }
    }
}
