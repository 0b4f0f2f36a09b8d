//! The lip-sync UNet: one ONNX Runtime session run in batches of up to N frames.

use std::path::Path;

use ort::session::Session;
use ort::value::TensorRef;

use crate::features::FRAME_AUDIO_LEN;
use crate::io::avatar::CropParams;
use crate::onnx::{check_signature, ModelIo, OnnxError, OrtRuntime, SessionOptions};

/// Largest batch accepted.
pub const MAX_BATCH: usize = 32;

/// A UNet batch size: always within `1..=MAX_BATCH` (checked once, where it is made).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "usize", into = "usize")]
pub struct Batch(usize);

/// A batch size outside `1..=MAX_BATCH`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("batch size {0} is out of range: expected 1..={MAX_BATCH}")]
pub struct BatchError(pub usize);

impl Batch {
    /// One frame per run.
    pub const ONE: Batch = Batch(1);
    /// The largest batch.
    pub const MAX: Batch = Batch(MAX_BATCH);

    /// `n` frames per run, if within `1..=MAX_BATCH`.
    pub const fn new(n: usize) -> Result<Self, BatchError> {
        if n >= 1 && n <= MAX_BATCH {
            Ok(Batch(n))
        } else {
            Err(BatchError(n))
        }
    }

    /// The size.
    pub const fn get(self) -> usize {
        self.0
    }
}

impl TryFrom<usize> for Batch {
    type Error = BatchError;
    fn try_from(n: usize) -> Result<Self, BatchError> {
        Batch::new(n)
    }
}

impl From<Batch> for usize {
    fn from(b: Batch) -> usize {
        b.0
    }
}

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for Batch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let n: usize = s.trim().parse().map_err(|_| format!("`{s}` is not a batch size: expected 1..={MAX_BATCH}"))?;
        Batch::new(n).map_err(|e| e.to_string())
    }
}

/// A batch setting: a fixed size, or `auto`, the batch that fits the provider at hand
/// ([`Unet::auto_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "BatchRepr", into = "BatchRepr")]
pub enum BatchSetting {
    /// Chosen for the provider: 1 on the CPU, measured at start on a GPU.
    #[default]
    Auto,
    /// This size.
    Fixed(Batch),
}

/// How a [`BatchSetting`] is written in a config file: `"auto"` or a number.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum BatchRepr {
    Size(usize),
    Word(String),
}

impl TryFrom<BatchRepr> for BatchSetting {
    type Error = String;
    fn try_from(r: BatchRepr) -> Result<Self, String> {
        match r {
            BatchRepr::Size(n) => Batch::new(n).map(BatchSetting::Fixed).map_err(|e| e.to_string()),
            BatchRepr::Word(s) => s.parse(),
        }
    }
}

impl From<BatchSetting> for BatchRepr {
    fn from(b: BatchSetting) -> Self {
        match b {
            BatchSetting::Auto => BatchRepr::Word("auto".into()),
            BatchSetting::Fixed(b) => BatchRepr::Size(b.get()),
        }
    }
}

impl std::str::FromStr for BatchSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "auto" {
            return Ok(BatchSetting::Auto);
        }
        let n: usize =
            s.trim().parse().map_err(|_| format!("`{s}` is not a batch setting: expected auto or 1..={MAX_BATCH}"))?;
        Batch::new(n).map(BatchSetting::Fixed).map_err(|e| e.to_string())
    }
}

impl std::fmt::Display for BatchSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchSetting::Auto => f.write_str("auto"),
            BatchSetting::Fixed(b) => b.fmt(f),
        }
    }
}

impl BatchSetting {
    /// The largest batch a UNet opened for this setting on `provider` may be asked to run.
    pub fn limit(self, provider: Provider) -> Batch {
        match (self, provider) {
            (BatchSetting::Fixed(b), _) => b,
            (BatchSetting::Auto, Provider::Cpu) => Batch::ONE,
            (BatchSetting::Auto, Provider::Cuda) => Batch::MAX,
        }
    }
}

/// Per-frame seconds of one batch size, measured by [`Unet::measure_batches`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchTiming {
    /// The batch.
    pub batch: Batch,
    /// Seconds per run (the faster of two, after a warm-up run).
    pub run_s: f64,
}

impl BatchTiming {
    /// Frames per second at this batch.
    pub fn fps(&self) -> f64 {
        self.batch.get() as f64 / self.run_s
    }
}

/// The smallest batch whose throughput is within 5 % of the best measured: more frames per run
/// past that point only add latency (a frame waits for its whole batch).
pub fn pick_batch(timings: &[BatchTiming]) -> Option<Batch> {
    let best = timings.iter().map(BatchTiming::fps).fold(0.0, f64::max);
    timings.iter().filter(|t| t.fps() >= 0.95 * best).map(|t| t.batch).min()
}

/// Which execution provider runs the UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Provider {
    /// ONNX Runtime's CPU provider.
    #[default]
    Cpu,
    /// The CUDA provider (needs the `cuda` cargo feature and onnxruntime-gpu); falls back to
    /// CPU with a warning when unavailable.
    Cuda,
}

impl std::str::FromStr for Provider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda),
            _ => Err(format!("unknown execution provider `{s}` (expected cpu or cuda)")),
        }
    }
}

/// Errors of the UNet stage.
#[derive(Debug, thiserror::Error)]
pub enum UnetError {
    /// The model is missing, unreadable or has the wrong signature.
    #[error(transparent)]
    Model(#[from] OnnxError),
    /// A run of more frames than the session was opened for (or none).
    #[error("UNet run of {0} frames is outside the session's 1..={1}")]
    BadBatch(usize, usize),
    /// Running the model failed.
    #[error("UNet failed on a batch of {batch}: {message}")]
    Run {
        /// Batch size.
        batch: usize,
        /// ONNX Runtime's message.
        message: String,
    },
    /// The model returned the wrong amount of data.
    #[error("UNet returned {got} values for a batch of {batch}, expected {expected}")]
    OutputSize {
        /// Batch size.
        batch: usize,
        /// Values returned.
        got: usize,
        /// Values expected.
        expected: usize,
    },
}

/// A UNet session. It owns its session: share it between threads by moving it (one inference
/// thread), never by aliasing.
pub struct Unet {
    session: Session,
    io: ModelIo,
    size: usize,
    max_batch: usize,
    provider: Provider,
}

impl std::fmt::Debug for Unet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unet").field("max_batch", &self.max_batch).field("provider", &self.provider).finish()
    }
}

impl Unet {
    /// Opens the UNet, checks its signature for the crop geometry and selects the provider.
    pub fn open(
        rt: &OrtRuntime,
        path: &Path,
        io: &ModelIo,
        crop: &CropParams,
        max_batch: Batch,
        opts: &SessionOptions,
        provider: Provider,
    ) -> Result<Self, UnetError> {
        let max_batch = max_batch.get();
        let (session, provider) = match provider {
            Provider::Cpu => (rt.open_model("UNet", path, opts)?, Provider::Cpu),
            Provider::Cuda => open_cuda(rt, path, opts)?,
        };
        check_signature(&session, &io.unet_signature(i64::from(crop.model_size)), "UNet", path)?;
        Ok(Self { session, io: io.clone(), size: crop.model_size as usize, max_batch, provider })
    }

    /// The provider actually in use.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// Largest batch per call.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The batch for [`BatchSetting::Auto`] on this UNet's provider. On the CPU, 1: measured on
    /// the full-size UNet with 2 threads, batch 8 renders at the same frames/s as batch 1 (14.0
    /// against 13.8) with 4x the end-to-end latency and 1.4 GB more memory (docs/architecture.md,
    /// "Batch"). On a GPU, where batching pays, the sizes up to the opened limit are measured now
    /// ([`Unet::measure_batches`], [`pick_batch`]).
    pub fn auto_batch(&mut self) -> Result<Batch, UnetError> {
        match self.provider {
            Provider::Cpu => Ok(Batch::ONE),
            Provider::Cuda => {
                let sizes: Vec<Batch> = [1, 2, 4, 8, 16, 32]
                    .into_iter()
                    .filter(|&n| n <= self.max_batch)
                    .filter_map(|n| Batch::new(n).ok())
                    .collect();
                let timings = self.measure_batches(&sizes)?;
                for t in &timings {
                    tracing::info!(batch = t.batch.get(), run_ms = t.run_s * 1e3, fps = t.fps(), "UNet batch measured");
                }
                Ok(pick_batch(&timings).unwrap_or(Batch::ONE))
            }
        }
    }

    /// Runs one frame of zeros: ONNX Runtime's first run sizes its memory and is slow, so a
    /// service does it before its first real frame.
    pub fn warm_up(&mut self) -> Result<(), UnetError> {
        let s = self.size;
        let mut out = vec![0f32; 3 * s * s];
        self.run(1, &vec![0f32; 6 * s * s], &[0f32; FRAME_AUDIO_LEN], &mut out)
    }

    /// Times each batch size on zero inputs: one warm-up run, then the faster of two.
    pub fn measure_batches(&mut self, sizes: &[Batch]) -> Result<Vec<BatchTiming>, UnetError> {
        let largest = sizes.iter().map(|b| b.get()).max().unwrap_or(1);
        let s = self.size;
        let images = vec![0f32; largest * 6 * s * s];
        let audio = vec![0f32; largest * FRAME_AUDIO_LEN];
        let mut output = vec![0f32; largest * 3 * s * s];
        let mut timings = Vec::with_capacity(sizes.len());
        for &batch in sizes {
            let n = batch.get();
            self.run(n, &images, &audio, &mut output)?;
            let mut best = f64::INFINITY;
            for _ in 0..2 {
                let t = std::time::Instant::now();
                self.run(n, &images, &audio, &mut output)?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            timings.push(BatchTiming { batch, run_s: best });
        }
        Ok(timings)
    }

    /// Runs `n` frames: `images` holds `n x [6, S, S]`, `audio` `n x [32, 16, 16]`; writes
    /// `n x [3, S, S]` into `output`.
    pub fn run(&mut self, n: usize, images: &[f32], audio: &[f32], output: &mut [f32]) -> Result<(), UnetError> {
        if !(1..=self.max_batch).contains(&n) {
            return Err(UnetError::BadBatch(n, self.max_batch));
        }
        let s = self.size;
        let run = |message: String| UnetError::Run { batch: n, message };
        let img =
            TensorRef::from_array_view(([n, 6, s, s], &images[..n * 6 * s * s])).map_err(|e| run(e.to_string()))?;
        let aud = TensorRef::from_array_view(([n, 32, 16, 16], &audio[..n * FRAME_AUDIO_LEN]))
            .map_err(|e| run(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.io.unet_image_input.as_str() => img, self.io.unet_audio_input.as_str() => aud])
            .map_err(|e| run(e.to_string()))?;
        let (_, data) =
            outputs[self.io.unet_output.as_str()].try_extract_tensor::<f32>().map_err(|e| run(e.to_string()))?;
        let expected = n * 3 * s * s;
        if data.len() != expected {
            return Err(UnetError::OutputSize { batch: n, got: data.len(), expected });
        }
        output[..expected].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(rt: &OrtRuntime, path: &Path, opts: &SessionOptions) -> Result<(Session, Provider), UnetError> {
    match rt.open_model_cuda("UNet", path, opts) {
        Ok(s) => Ok((s, Provider::Cuda)),
        Err(e) => {
            tracing::warn!("CUDA execution provider unavailable ({e}); running the UNet on the CPU");
            Ok((rt.open_model("UNet", path, opts)?, Provider::Cpu))
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(rt: &OrtRuntime, path: &Path, opts: &SessionOptions) -> Result<(Session, Provider), UnetError> {
    tracing::warn!("lipsync was built without the `cuda` feature; running the UNet on the CPU");
    Ok((rt.open_model("UNet", path, opts)?, Provider::Cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_is_checked_once_with_the_allowed_range_in_the_error() {
        assert_eq!(Batch::new(8).unwrap().get(), 8);
        assert_eq!(Batch::new(0).unwrap_err().to_string(), "batch size 0 is out of range: expected 1..=32");
        assert!(Batch::new(33).is_err());
        assert_eq!("4".parse::<Batch>().unwrap(), Batch::new(4).unwrap());
        assert!("x".parse::<Batch>().unwrap_err().contains("expected 1..=32"));
        let b: Batch = serde_json::from_str("16").unwrap();
        assert_eq!(b.get(), 16);
        assert!(serde_json::from_str::<Batch>("64").is_err());
    }

    #[test]
    fn batch_setting_is_auto_or_a_size() {
        assert_eq!("auto".parse::<BatchSetting>().unwrap(), BatchSetting::Auto);
        assert_eq!("4".parse::<BatchSetting>().unwrap(), BatchSetting::Fixed(Batch::new(4).unwrap()));
        assert!("0".parse::<BatchSetting>().unwrap_err().contains("batch size 0 is out of range: expected 1..=32"));
        assert!("big".parse::<BatchSetting>().unwrap_err().contains("expected auto or 1..=32"));
        assert_eq!(serde_json::from_str::<BatchSetting>("\"auto\"").unwrap(), BatchSetting::Auto);
        assert_eq!(serde_json::from_str::<BatchSetting>("8").unwrap().to_string(), "8");
        assert!(serde_json::from_str::<BatchSetting>("40").is_err());
        assert!(serde_json::from_str::<BatchSetting>("\"big\"").is_err());
        assert_eq!(serde_json::to_string(&BatchSetting::Auto).unwrap(), "\"auto\"");
        assert_eq!(BatchSetting::Auto.limit(Provider::Cpu), Batch::ONE);
        assert_eq!(BatchSetting::Auto.limit(Provider::Cuda), Batch::MAX);
    }

    #[test]
    fn the_smallest_batch_near_the_best_throughput_is_picked() {
        let t = |n, ms| BatchTiming { batch: Batch::new(n).unwrap(), run_s: ms / 1e3 };
        // CPU-like: no gain from batching.
        assert_eq!(pick_batch(&[t(1, 70.0), t(2, 139.0), t(4, 281.0)]), Some(Batch::ONE));
        // GPU-like: gains up to 8, then flat.
        let gpu = [t(1, 5.0), t(2, 6.0), t(4, 8.0), t(8, 12.0), t(16, 23.5), t(32, 47.0)];
        assert_eq!(pick_batch(&gpu), Some(Batch::new(8).unwrap()));
        assert_eq!(pick_batch(&[]), None);
    }
}
