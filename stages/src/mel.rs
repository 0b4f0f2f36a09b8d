//! The Wav2Lip mel spectrogram of docs/spec.md section 1, whole-signal or incremental.
//!
//! Pre-emphasis (0.97, causal), centre padding of 400 zeros, periodic Hann window of 800,
//! real FFT magnitude, Slaney mel filterbank (80 x 401, fmin 55, fmax 7600, built in code with
//! librosa's f64 -> f32 rounding), `20 log10(max(1e-5, m)) - 20`, normalised to [-4, 4].
//! Arithmetic is f64 up to the output, as librosa's path is (scipy's `lfilter` returns f64).
//!
//! [`MelSpectrogram`] takes chunks of any size and returns each row as soon as it is final
//! (row j needs samples up to `200 j + 400`); [`MelSpectrogram::finish`] adds the rows that
//! reach into the right padding. Every chunking gives the whole-signal rows bit for bit.

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

/// Samples per second.
pub const SR: usize = 16_000;
/// FFT size and window length.
pub const N_FFT: usize = 800;
/// Hop between frames.
pub const HOP: usize = 200;
/// Mel bands.
pub const N_MELS: usize = 80;
/// FFT bins kept (N_FFT / 2 + 1).
pub const N_BINS: usize = N_FFT / 2 + 1;
/// Lowest mel filter edge (Hz).
pub const FMIN: f64 = 55.0;
/// Highest mel filter edge (Hz).
pub const FMAX: f64 = 7600.0;
/// Pre-emphasis coefficient.
pub const PREEMPHASIS: f64 = 0.97;
const PAD: usize = N_FFT / 2;

/// Number of mel rows for `n` samples: `1 + floor(n / 200)`.
pub fn mel_frames(n: usize) -> usize {
    1 + n / HOP
}

fn hz_to_mel(f: f64) -> f64 {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if f >= min_log_hz {
        min_log_mel + (f / min_log_hz).ln() / logstep
    } else {
        f / f_sp
    }
}

fn mel_to_hz(m: f64) -> f64 {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if m >= min_log_mel {
        min_log_hz * (logstep * (m - min_log_mel)).exp()
    } else {
        f_sp * m
    }
}

/// The 80 x 401 Slaney filterbank as librosa builds it: weights in f64, stored as f32, then
/// scaled by `2 / (f[i+2] - f[i])` (an f64 product rounded back to f32). Row-major.
pub fn mel_filterbank() -> Vec<f32> {
    // np.linspace(min_mel, max_mel, n_mels + 2): i * step + start, last element exactly stop.
    let n = N_MELS + 2;
    let (lo, hi) = (hz_to_mel(FMIN), hz_to_mel(FMAX));
    let step = (hi - lo) / (n - 1) as f64;
    let mel_f: Vec<f64> =
        (0..n).map(|i| if i == n - 1 { mel_to_hz(hi) } else { mel_to_hz(i as f64 * step + lo) }).collect();
    // np.fft.rfftfreq(800, 1/16000)
    let val = 1.0 / (N_FFT as f64 * (1.0 / SR as f64));
    let fftfreqs: Vec<f64> = (0..N_BINS).map(|k| k as f64 * val).collect();
    let mut weights = vec![0f32; N_MELS * N_BINS];
    for i in 0..N_MELS {
        let fdiff_lo = mel_f[i + 1] - mel_f[i];
        let fdiff_hi = mel_f[i + 2] - mel_f[i + 1];
        let enorm = 2.0 / (mel_f[i + 2] - mel_f[i]);
        for (k, &f) in fftfreqs.iter().enumerate() {
            let lower = -(mel_f[i] - f) / fdiff_lo;
            let upper = (mel_f[i + 2] - f) / fdiff_hi;
            let w = 0f64.max(lower.min(upper)) as f32;
            weights[i * N_BINS + k] = (f64::from(w) * enorm) as f32;
        }
    }
    weights
}

/// The filterbank kept sparse: each filter's first non-zero bin and its weights (as f64).
#[derive(Debug, Clone)]
struct SparseFilters {
    start: Vec<usize>,
    weights: Vec<Vec<f64>>,
    /// The range of bins any filter uses.
    bins: (usize, usize),
}

impl SparseFilters {
    fn new(dense: &[f32]) -> Self {
        let mut start = Vec::with_capacity(N_MELS);
        let mut weights: Vec<Vec<f64>> = Vec::with_capacity(N_MELS);
        for row in dense.chunks_exact(N_BINS) {
            let first = row.iter().position(|&w| w != 0.0).unwrap_or(0);
            let last = row.iter().rposition(|&w| w != 0.0).map_or(first, |l| l + 1);
            start.push(first);
            weights.push(row[first..last].iter().map(|&w| f64::from(w)).collect());
        }
        let lo = start.iter().copied().min().unwrap_or(0);
        let hi = start.iter().zip(&weights).map(|(s, w)| s + w.len()).max().unwrap_or(0);
        Self { start, weights, bins: (lo, hi) }
    }
}

/// Incremental (and whole-signal) mel spectrogram with reused scratch buffers.
pub struct MelSpectrogram {
    fft: Arc<dyn RealToComplex<f64>>,
    window: Vec<f64>,
    filters: SparseFilters,
    frame: Vec<f64>,
    spectrum: Vec<Complex<f64>>,
    fft_scratch: Vec<Complex<f64>>,
    magnitude: Vec<f64>,
    /// Pre-emphasised samples from absolute index `buf_start` on.
    buf: Vec<f64>,
    buf_start: usize,
    /// Samples received so far.
    received: usize,
    /// The last raw sample (pre-emphasis state).
    prev: Option<f32>,
    /// Next row to emit.
    next_row: usize,
}

impl std::fmt::Debug for MelSpectrogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelSpectrogram").field("received", &self.received).field("next_row", &self.next_row).finish()
    }
}

impl Default for MelSpectrogram {
    fn default() -> Self {
        Self::new()
    }
}

impl MelSpectrogram {
    /// A fresh spectrogram (plans the FFT and builds the filterbank).
    pub fn new() -> Self {
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(N_FFT);
        let window =
            (0..N_FFT).map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos()).collect();
        let spectrum = fft.make_output_vec();
        let fft_scratch = fft.make_scratch_vec();
        Self {
            fft,
            window,
            filters: SparseFilters::new(&mel_filterbank()),
            frame: vec![0.0; N_FFT],
            spectrum,
            fft_scratch,
            magnitude: vec![0.0; N_BINS],
            buf: Vec::with_capacity(8 * N_FFT),
            buf_start: 0,
            received: 0,
            prev: None,
            next_row: 0,
        }
    }

    /// Forgets the stream so far (keeps the buffers).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.buf_start = 0;
        self.received = 0;
        self.prev = None;
        self.next_row = 0;
    }

    /// Samples received so far.
    pub fn samples(&self) -> usize {
        self.received
    }

    /// Rows emitted so far.
    pub fn rows(&self) -> usize {
        self.next_row
    }

    /// Feeds samples; appends every row that became final to `out` (80 values per row) and
    /// returns how many rows were appended.
    pub fn push(&mut self, samples: &[f32], out: &mut Vec<f32>) -> usize {
        if let Some((&first, rest)) = samples.split_first() {
            self.buf.push(match self.prev {
                None => f64::from(first),
                Some(p) => f64::from(first) - PREEMPHASIS * f64::from(p),
            });
            self.buf.extend(rest.iter().zip(samples).map(|(&x, &p)| f64::from(x) - PREEMPHASIS * f64::from(p)));
            self.prev = samples.last().copied();
        }
        self.received += samples.len();
        let mut n = 0;
        // Row j is final once samples up to 200 j + 400 (exclusive) have arrived.
        while HOP * self.next_row + PAD <= self.received {
            self.emit_row(out);
            n += 1;
        }
        self.compact();
        n
    }

    /// Ends the stream: appends the remaining rows (those reaching into the right padding) so
    /// that the total is `1 + floor(n / 200)`, returns how many, and resets for a new stream.
    pub fn finish(&mut self, out: &mut Vec<f32>) -> usize {
        let total = mel_frames(self.received);
        let mut n = 0;
        while self.next_row < total {
            self.emit_row(out);
            n += 1;
        }
        self.reset();
        n
    }

    /// The whole-signal spectrogram of `samples`: `T x 80`, row-major.
    pub fn compute(&mut self, samples: &[f32]) -> Vec<f32> {
        self.reset();
        let mut out = Vec::with_capacity(mel_frames(samples.len()) * N_MELS);
        self.push(samples, &mut out);
        self.finish(&mut out);
        out
    }

    /// Drops samples no future row needs, without shrinking the buffer.
    fn compact(&mut self) {
        let needed_from = (HOP * self.next_row).saturating_sub(PAD);
        let drop = needed_from.saturating_sub(self.buf_start).min(self.buf.len());
        if drop > 0 && drop >= self.buf.len() / 2 {
            self.buf.copy_within(drop.., 0);
            self.buf.truncate(self.buf.len() - drop);
            self.buf_start += drop;
        }
    }

    fn emit_row(&mut self, out: &mut Vec<f32>) {
        let j = self.next_row;
        // Frame j covers padded indices 200 j .. 200 j + 800, i.e. samples 200 j - 400 ..
        // 200 j + 400; samples before 0 or not (yet) received are the zero padding.
        let first = (HOP * j) as isize - PAD as isize;
        let have_end = (self.buf_start + self.buf.len()).min(self.received) as isize;
        let lo = (-first).clamp(0, N_FFT as isize) as usize;
        let hi = (have_end - first).clamp(lo as isize, N_FFT as isize) as usize;
        self.frame[..lo].fill(0.0);
        self.frame[hi..].fill(0.0);
        if hi > lo {
            let src_start = (first + lo as isize) as usize - self.buf_start;
            let src = &self.buf[src_start..src_start + (hi - lo)];
            for ((f, &x), &w) in self.frame[lo..hi].iter_mut().zip(src).zip(&self.window[lo..hi]) {
                *f = x * w;
            }
        }
        self.fft
            .process_with_scratch(&mut self.frame, &mut self.spectrum, &mut self.fft_scratch)
            .expect("FFT buffers are sized by the planner");
        // |X_k| only over the bins some filter uses (about 2..380 of 401).
        let (b0, b1) = self.filters.bins;
        for (m, c) in self.magnitude[b0..b1].iter_mut().zip(&self.spectrum[b0..b1]) {
            *m = (c.re * c.re + c.im * c.im).sqrt();
        }
        for (start, weights) in self.filters.start.iter().zip(&self.filters.weights) {
            let mag = &self.magnitude[*start..*start + weights.len()];
            let mel: f64 = weights.iter().zip(mag).map(|(w, m)| w * m).sum();
            // log10 in f32 (3x faster than f64; the mel value's f32 rounding moves the output
            // by ~1e-6, far inside the 1e-4 parity bound).
            let db = 20.0 * f64::from((mel.max(1e-5) as f32).log10()) - 20.0;
            let norm = (8.0 * ((db + 100.0) / 100.0) - 4.0).clamp(-4.0, 4.0);
            out.push(norm as f32);
        }
        self.next_row += 1;
    }
}
