//! Image quality of one model's output against another's: PSNR and SSIM over a rectangle of
//! planar 8-bit images (`[C, S, S]`, the UNet prediction as paste-back uses it).

/// A rectangle `[x1, y1, x2, y2]`, inclusive (like the crop's mask).
pub type Rect = [usize; 4];

/// Sum of squared differences and the count of values inside `rect` of every plane.
pub(crate) fn squared_error(a: &[u8], b: &[u8], size: usize, rect: Rect) -> (f64, usize) {
    let [x1, y1, x2, y2] = rect;
    let mut sum = 0f64;
    let mut n = 0;
    for (pa, pb) in a.chunks_exact(size * size).zip(b.chunks_exact(size * size)) {
        for y in y1..=y2 {
            let (ra, rb) = (&pa[y * size + x1..=y * size + x2], &pb[y * size + x1..=y * size + x2]);
            sum += ra.iter().zip(rb).map(|(&p, &q)| (f64::from(p) - f64::from(q)).powi(2)).sum::<f64>();
            n += ra.len();
        }
    }
    (sum, n)
}

/// PSNR in dB for 8-bit data from a mean squared error (infinite when equal).
pub fn psnr_from_mse(mse: f64) -> f64 {
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// PSNR of `b` against `a` inside `rect` of each `size x size` plane.
pub fn psnr(a: &[u8], b: &[u8], size: usize, rect: Rect) -> f64 {
    let (sum, n) = squared_error(a, b, size, rect);
    psnr_from_mse(sum / n.max(1) as f64)
}

/// Radius of the SSIM window: a Gaussian of sigma 1.5 truncated at 3.5 sigma (11 x 11).
const RADIUS: usize = 5;

fn gaussian() -> [f64; 2 * RADIUS + 1] {
    let mut w = [0f64; 2 * RADIUS + 1];
    for (i, v) in w.iter_mut().enumerate() {
        let x = i as f64 - RADIUS as f64;
        *v = (-0.5 * x * x / (1.5 * 1.5)).exp();
    }
    let sum: f64 = w.iter().sum();
    w.map(|v| v / sum)
}

/// SSIM (Wang et al. 2004: Gaussian window, sigma 1.5, K1 0.01, K2 0.03, range 255) of `b`
/// against `a`, the mean over the pixels of `rect` whose whole window lies inside it, averaged
/// over the planes. The same figure as scikit-image's `structural_similarity(a, b,
/// gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)` on the crop.
pub fn ssim(a: &[u8], b: &[u8], size: usize, rect: Rect) -> f64 {
    let [x1, y1, x2, y2] = rect;
    let (w, h) = (x2 + 1 - x1, y2 + 1 - y1);
    if w <= 2 * RADIUS || h <= 2 * RADIUS {
        return f64::NAN;
    }
    let g = gaussian();
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    // Horizontal then vertical pass of the five maps (x, y, xx, yy, xy) over valid pixels.
    let (ow, oh) = (w - 2 * RADIUS, h - 2 * RADIUS);
    let mut rows = vec![[0f64; 5]; h * ow];
    let mut planes = 0;
    let mut total = 0f64;
    for (pa, pb) in a.chunks_exact(size * size).zip(b.chunks_exact(size * size)) {
        for y in 0..h {
            let base = (y1 + y) * size + x1;
            for x in 0..ow {
                let mut m = [0f64; 5];
                for (k, wk) in g.iter().enumerate() {
                    let (p, q) = (f64::from(pa[base + x + k]), f64::from(pb[base + x + k]));
                    m[0] += wk * p;
                    m[1] += wk * q;
                    m[2] += wk * p * p;
                    m[3] += wk * q * q;
                    m[4] += wk * p * q;
                }
                rows[y * ow + x] = m;
            }
        }
        let mut sum = 0f64;
        for y in 0..oh {
            for x in 0..ow {
                let mut m = [0f64; 5];
                for (k, wk) in g.iter().enumerate() {
                    let r = rows[(y + k) * ow + x];
                    for (acc, v) in m.iter_mut().zip(r) {
                        *acc += wk * v;
                    }
                }
                let [mx, my, xx, yy, xy] = m;
                let (vx, vy, cov) = (xx - mx * mx, yy - my * my, xy - mx * my);
                sum += ((2.0 * mx * my + c1) * (2.0 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2));
            }
        }
        total += sum / (ow * oh) as f64;
        planes += 1;
    }
    total / f64::from(planes.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two deterministic 3 x 64 x 64 images: a pattern, and the pattern with noise from a
    /// 32-bit LCG (written the same way in the Python that gave the reference figures).
    fn images() -> (Vec<u8>, Vec<u8>) {
        let s = 64;
        let mut a = vec![0u8; 3 * s * s];
        let mut b = vec![0u8; 3 * s * s];
        let mut state: u32 = 12345;
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    let i = c * s * s + y * s + x;
                    let v = ((x * 7 + y * 13 + c * 50) % 256) as i32;
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    let noise = ((state >> 16) % 21) as i32 - 10;
                    a[i] = v as u8;
                    b[i] = (v + noise).clamp(0, 255) as u8;
                }
            }
        }
        (a, b)
    }

    #[test]
    fn psnr_and_ssim_match_scikit_image() {
        let (a, b) = images();
        let rect = [4, 6, 59, 55];
        // skimage 0.25.2: peak_signal_noise_ratio(A[:, 6:56, 4:60], B[:, 6:56, 4:60], data_range=255)
        // and structural_similarity(..., channel_axis=0, gaussian_weights=True, sigma=1.5,
        // use_sample_covariance=False, data_range=255), on the same images made in numpy.
        let (want_psnr, want_ssim) = (SKIMAGE_PSNR, SKIMAGE_SSIM);
        assert!((psnr(&a, &b, 64, rect) - want_psnr).abs() < 1e-9, "{}", psnr(&a, &b, 64, rect));
        assert!((ssim(&a, &b, 64, rect) - want_ssim).abs() < 1e-9, "{}", ssim(&a, &b, 64, rect));
    }

    const SKIMAGE_PSNR: f64 = 32.59724780900005;
    const SKIMAGE_SSIM: f64 = 0.9789515135377211;

    #[test]
    fn equal_images_are_perfect() {
        let (a, _) = images();
        assert_eq!(psnr(&a, &a, 64, [0, 0, 63, 63]), f64::INFINITY);
        assert!((ssim(&a, &a, 64, [0, 0, 63, 63]) - 1.0).abs() < 1e-12);
        assert!(ssim(&a, &a, 64, [0, 0, 9, 63]).is_nan(), "a rectangle narrower than the window has no SSIM");
    }
}
