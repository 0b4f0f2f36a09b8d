//! Audio windows, the batched audio encoder and per-frame audio tensors (docs/spec.md sections 2 and 7).
//!
//! Window k is mel rows `s_k .. s_k + 16` with `s_k = int(80 * (k / 25))` (f64), clamped to
//! `T - 16` at the end, transposed to [1, 80, 16]. There are `L = int((T - 16) / 80 * 25) + 2`
//! windows. Encoder outputs `o_k` form the padded list `F = [o_0, o_0, o_1, ..., o_{L-1},
//! o_{L-1}]`, and output frame i (of `L + 2`) takes rows `F[i-8 .. i+8)` (zeros outside) as a
//! [32, 16, 16] tensor.

use std::path::Path;

use ort::session::Session;
use ort::value::TensorRef;

use crate::mel::N_MELS;
use crate::onnx::{check_signature, ModelIo, OnnxError, OrtRuntime, SessionOptions};

/// Mel rows per window.
pub const WINDOW: usize = 16;
/// Values per window ([1, 80, 16]).
pub const WINDOW_LEN: usize = N_MELS * WINDOW;
/// Encoder feature width.
pub const FEATURE_DIM: usize = 512;
/// F rows per frame tensor.
pub const FRAME_ROWS: usize = 16;
/// Values per frame tensor ([32, 16, 16]).
pub const FRAME_AUDIO_LEN: usize = FRAME_ROWS * FEATURE_DIM;
/// Default encoder batch. The reference runs 64; any batch gives the same features (tested), and
/// 16 runs as fast on the CPU with a quarter of the activation memory (36 MB less for the full
/// encoder).
pub const DEFAULT_ENCODER_BATCH: usize = 16;

/// Errors of the window / encoder / feature stages.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// Fewer than 16 mel rows: no window fits.
    #[error("audio too short: {mel_rows} mel frames ({seconds:.4} s), need at least 16 (0.1875 s of audio)")]
    TooShort {
        /// Mel rows available.
        mel_rows: usize,
        /// Audio length in seconds.
        seconds: f64,
    },
    /// The encoder model is missing, unreadable or has the wrong signature.
    #[error(transparent)]
    Model(#[from] OnnxError),
    /// Running the encoder failed.
    #[error("audio encoder failed on a batch of {batch}: {message}")]
    Run {
        /// Batch size.
        batch: usize,
        /// ONNX Runtime's message.
        message: String,
    },
    /// The encoder returned an unexpected shape.
    #[error("audio encoder returned {got} values for a batch of {batch}, expected {expected}")]
    OutputSize {
        /// Batch size.
        batch: usize,
        /// Values returned.
        got: usize,
        /// Values expected.
        expected: usize,
    },
    /// A batch size of zero.
    #[error("encoder batch size must be at least 1")]
    ZeroBatch,
}

/// Number of windows for `t` mel rows: `int((t - 16) / 80.0 * 25.0) + 2`.
pub fn window_count(t: usize) -> Result<usize, FeatureError> {
    if t < WINDOW {
        return Err(FeatureError::TooShort { mel_rows: t, seconds: ((t.max(1) - 1) * 200) as f64 / 16_000.0 });
    }
    Ok(((t - WINDOW) as f64 / 80.0 * 25.0) as usize + 2)
}

/// Start row of window k before the end clamp: `int(80.0 * (k / 25.0))`.
pub fn window_start_unclamped(k: usize) -> usize {
    (80.0 * (k as f64 / 25.0)) as usize
}

/// Start row of window k for `t` mel rows (clamped so the window ends by `t`).
pub fn window_start(k: usize, t: usize) -> usize {
    let s = window_start_unclamped(k);
    if s + WINDOW > t {
        t - WINDOW
    } else {
        s
    }
}

/// Writes window k of `mel` (`t x 80`, row-major) into `out` (80 x 16: mel bin major).
pub fn extract_window(mel: &[f32], t: usize, k: usize, out: &mut [f32]) {
    let s = window_start(k, t);
    for (c, row) in mel[s * N_MELS..(s + WINDOW) * N_MELS].chunks_exact(N_MELS).enumerate() {
        for (m, &v) in row.iter().enumerate() {
            out[m * WINDOW + c] = v;
        }
    }
}

/// All `L` windows of a whole-signal mel (`t x 80`), as `L x 1280` values.
pub fn extract_windows(mel: &[f32]) -> Result<Vec<f32>, FeatureError> {
    let t = mel.len() / N_MELS;
    let l = window_count(t)?;
    let mut out = vec![0f32; l * WINDOW_LEN];
    for (k, w) in out.chunks_exact_mut(WINDOW_LEN).enumerate() {
        extract_window(mel, t, k, w);
    }
    Ok(out)
}

/// The audio encoder model, run in batches.
pub struct AudioEncoder {
    session: Session,
    input: String,
    output: String,
    batch: usize,
}

impl std::fmt::Debug for AudioEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioEncoder").field("batch", &self.batch).finish()
    }
}

impl AudioEncoder {
    /// Opens the encoder and checks its signature (input `[N,1,80,16]`, output `[N,512]`).
    pub fn open(
        rt: &OrtRuntime,
        path: &Path,
        io: &ModelIo,
        batch: usize,
        opts: &SessionOptions,
    ) -> Result<Self, FeatureError> {
        if batch == 0 {
            return Err(FeatureError::ZeroBatch);
        }
        let session = rt.open_model("audio encoder", path, opts)?;
        check_signature(&session, &io.encoder_signature(), "audio encoder", path)?;
        Ok(Self { session, input: io.encoder_input.clone(), output: io.encoder_output.clone(), batch })
    }

    /// Maximum windows per model call.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Encodes `windows` (`n x 1280`) in batches of at most [`AudioEncoder::batch`], appending
    /// `n x 512` features to `out`.
    pub fn encode(&mut self, windows: &[f32], out: &mut Vec<f32>) -> Result<(), FeatureError> {
        for chunk in windows.chunks(self.batch * WINDOW_LEN) {
            let n = chunk.len() / WINDOW_LEN;
            let run = |message: String| FeatureError::Run { batch: n, message };
            let tensor = TensorRef::from_array_view(([n, 1, N_MELS, WINDOW], chunk)).map_err(|e| run(e.to_string()))?;
            let outputs =
                self.session.run(ort::inputs![self.input.as_str() => tensor]).map_err(|e| run(e.to_string()))?;
            let (_, data) =
                outputs[self.output.as_str()].try_extract_tensor::<f32>().map_err(|e| run(e.to_string()))?;
            if data.len() != n * FEATURE_DIM {
                return Err(FeatureError::OutputSize { batch: n, got: data.len(), expected: n * FEATURE_DIM });
            }
            out.extend_from_slice(data);
        }
        Ok(())
    }
}

/// The padded feature list F (`(L + 2) x 512`) from encoder outputs (`L x 512`).
pub fn pad_features(o: &[f32]) -> Vec<f32> {
    let l = o.len() / FEATURE_DIM;
    let mut f = Vec::with_capacity((l + 2) * FEATURE_DIM);
    if l == 0 {
        return f;
    }
    f.extend_from_slice(&o[..FEATURE_DIM]);
    f.extend_from_slice(o);
    f.extend_from_slice(&o[(l - 1) * FEATURE_DIM..]);
    f
}

/// Writes frame i's audio tensor (`F[i-8 .. i+8)`, zeros outside `[0, rows)`) into `out`.
pub fn frame_audio(f: &[f32], i: usize, out: &mut [f32]) {
    frame_audio_from(f, 0, i, out);
}

/// [`frame_audio`] over a suffix of F: `f` holds rows `base ..` (rows below `base` must not
/// be needed, that is `i >= base + 8`, or `base == 0`).
fn frame_audio_from(f: &[f32], base: usize, i: usize, out: &mut [f32]) {
    let rows = f.len() / FEATURE_DIM;
    for (r, dst) in out.chunks_exact_mut(FEATURE_DIM).enumerate() {
        let j = (i + r).checked_sub(FRAME_ROWS / 2);
        debug_assert!(j.is_none_or(|j| j >= base), "F row {j:?} was dropped (base {base})");
        match j.and_then(|j| j.checked_sub(base)).filter(|&k| k < rows) {
            Some(k) => dst.copy_from_slice(&f[k * FEATURE_DIM..(k + 1) * FEATURE_DIM]),
            None => dst.fill(0.0),
        }
    }
}

/// Rows a streaming buffer may hold beyond what it needs before it drops the old ones (drops
/// are a memmove; batching them keeps that cost negligible).
const SLACK_ROWS: usize = 64;

/// Streaming assembly of per-frame audio tensors from encoder outputs as they arrive.
///
/// Frame i needs `F` rows up to `i + 7`, that is encoder outputs up to `o_{i+6}`: it is emitted
/// once `i + 7` outputs are known. [`FeatureAssembler::finish`] emits the rest (they need the
/// trailing duplicate `o_{L-1}` and the zeros past `L + 2`). The tensors equal the offline
/// [`frame_audio`] over [`pad_features`] bit for bit. Rows no later frame needs are dropped, so
/// memory stays bounded however long the stream runs.
#[derive(Debug, Default)]
pub struct FeatureAssembler {
    /// F rows `base ..` (F[0] = o_0, F[j] = o_{j-1}).
    f: Vec<f32>,
    base: usize,
    outputs: usize,
    next_frame: usize,
}

impl FeatureAssembler {
    /// An empty assembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Encoder outputs received so far.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Frames emitted so far.
    pub fn frames(&self) -> usize {
        self.next_frame
    }

    /// F rows held now (bounded: the 16 rows the next frame needs, plus outputs not yet
    /// consumed, plus a small slack).
    pub fn held_rows(&self) -> usize {
        self.f.len() / FEATURE_DIM
    }

    /// Adds encoder outputs (`n x 512`, in window order); calls `emit(i, tensor)` for each frame
    /// that became final.
    pub fn push(&mut self, o: &[f32], mut emit: impl FnMut(usize, &[f32])) {
        for row in o.chunks_exact(FEATURE_DIM) {
            if self.outputs == 0 {
                self.f.extend_from_slice(row);
            }
            self.f.extend_from_slice(row);
            self.outputs += 1;
        }
        let mut buf = [0f32; FRAME_AUDIO_LEN];
        // Frame i is final when o_{i+6} is known: outputs >= i + 7.
        while self.outputs >= self.next_frame + 7 {
            frame_audio_from(&self.f, self.base, self.next_frame, &mut buf);
            emit(self.next_frame, &buf);
            self.next_frame += 1;
        }
        // The next frame needs rows from next_frame - 8 on.
        let keep_from = self.next_frame.saturating_sub(FRAME_ROWS / 2);
        if keep_from >= self.base + SLACK_ROWS {
            let drop = keep_from - self.base;
            self.f.drain(..drop * FEATURE_DIM);
            self.base = keep_from;
        }
    }

    /// Ends the stream: appends the trailing duplicate and emits the remaining frames up to
    /// `L + 2`; returns the total frame count. Resets for a new stream.
    pub fn finish(&mut self, mut emit: impl FnMut(usize, &[f32])) -> usize {
        let l = self.outputs;
        if l > 0 {
            let last = self.f.len() - FEATURE_DIM;
            self.f.extend_from_within(last..);
        }
        let total = if l > 0 { l + 2 } else { 0 };
        let mut buf = [0f32; FRAME_AUDIO_LEN];
        while self.next_frame < total {
            frame_audio_from(&self.f, self.base, self.next_frame, &mut buf);
            emit(self.next_frame, &buf);
            self.next_frame += 1;
        }
        self.f.clear();
        self.base = 0;
        self.outputs = 0;
        self.next_frame = 0;
        total
    }
}

/// Streaming windows: fed mel rows as they become final, emits each window once it is.
///
/// Window k is final once rows `s_k .. s_k + 16` (unclamped) are known; the clamped tail
/// windows wait for [`WindowTracker::finish`], when the row count `T` is known. The tracker
/// keeps only the rows a later window can still use, so memory stays bounded.
#[derive(Debug, Default)]
pub struct WindowTracker {
    next: usize,
    /// Mel rows `base .. base + mel.len() / 80`.
    mel: Vec<f32>,
    base: usize,
}

impl WindowTracker {
    /// A tracker at window 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Windows emitted so far.
    pub fn emitted(&self) -> usize {
        self.next
    }

    /// Mel rows received so far.
    pub fn rows(&self) -> usize {
        self.base + self.mel.len() / N_MELS
    }

    /// Mel rows held now (bounded: one window, plus rows not yet consumed, plus a small slack).
    pub fn held_rows(&self) -> usize {
        self.mel.len() / N_MELS
    }

    fn write(&self, k: usize, t: usize, out: &mut Vec<f32>) {
        let s = window_start(k, t) - self.base;
        let at = out.len();
        out.resize(at + WINDOW_LEN, 0.0);
        extract_window(&self.mel[s * N_MELS..], WINDOW, 0, &mut out[at..]);
    }

    /// Adds the next mel rows (`n x 80`, following those already pushed) and writes every
    /// window that became final into `out` (appending 1280 values each); returns how many.
    pub fn push(&mut self, rows: &[f32], out: &mut Vec<f32>) -> usize {
        self.mel.extend_from_slice(rows);
        let total = self.rows();
        let mut n = 0;
        while window_start_unclamped(self.next) + WINDOW <= total {
            self.write(self.next, total, out);
            self.next += 1;
            n += 1;
        }
        // Later windows start at s_next or, clamped at the end, at T - 16 >= total - 16.
        let keep_from = window_start_unclamped(self.next).min(total.saturating_sub(WINDOW));
        if keep_from >= self.base + SLACK_ROWS {
            self.mel.drain(..(keep_from - self.base) * N_MELS);
            self.base = keep_from;
        }
        n
    }

    /// Ends the stream (every row pushed, `T` in all): writes the remaining windows up to `L`
    /// and resets for a new stream.
    pub fn finish(&mut self, out: &mut Vec<f32>) -> Result<usize, FeatureError> {
        let t = self.rows();
        let l = window_count(t);
        let mut n = 0;
        if let Ok(l) = l {
            while self.next < l {
                self.write(self.next, t, out);
                self.next += 1;
                n += 1;
            }
        }
        self.next = 0;
        self.mel.clear();
        self.base = 0;
        l.map(|_| n)
    }
}
