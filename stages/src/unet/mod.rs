//! The lip-sync UNet behind one interface, [`UnetBackend`]: the batcher fills a backend's input
//! buffers and runs it, whichever backend it is (ONNX Runtime on the CPU with an fp32 or an int8
//! model, ONNX Runtime on CUDA with pinned, bound buffers, or an Open Inference Protocol server).

#[cfg(feature = "cuda")]
mod cuda;
mod ort_backend;
pub mod remote;

use std::num::ParseIntError;
use std::path::PathBuf;

use crate::crop::CropParams;
use crate::features::FRAME_AUDIO_LEN;
use crate::onnx::{ModelIo, OnnxError, OrtRuntime, SessionOptions};

pub use ort_backend::OrtUnet;
pub use remote::{RemoteFailure, RemoteSettings, RemoteUrlError, TensorMismatch};

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

/// A batch size or [`BatchSetting`] that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchParseError {
    /// Not a number (for a [`Batch`]).
    #[error("`{text}` is not a batch size: expected 1..={MAX_BATCH}")]
    NotSize {
        /// The text given.
        text: String,
        /// Why it is not a number.
        source: ParseIntError,
    },
    /// Neither `auto` nor a number (for a [`BatchSetting`]).
    #[error("`{text}` is not a batch setting: expected auto or 1..={MAX_BATCH}")]
    NotSetting {
        /// The text given.
        text: String,
        /// Why it is not a number.
        source: ParseIntError,
    },
    /// A number out of range.
    #[error(transparent)]
    Range(#[from] BatchError),
}

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
    type Err = BatchParseError;
    fn from_str(s: &str) -> Result<Self, BatchParseError> {
        let n: usize = s.trim().parse().map_err(|source| BatchParseError::NotSize { text: s.into(), source })?;
        Ok(Batch::new(n)?)
    }
}

/// A batch setting: a fixed size, or `auto`, the batch that fits the provider at hand
/// ([`auto_batch`]).
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
    type Error = BatchParseError;
    fn try_from(r: BatchRepr) -> Result<Self, BatchParseError> {
        match r {
            BatchRepr::Size(n) => Ok(BatchSetting::Fixed(Batch::new(n)?)),
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
    type Err = BatchParseError;
    fn from_str(s: &str) -> Result<Self, BatchParseError> {
        if s.trim() == "auto" {
            return Ok(BatchSetting::Auto);
        }
        let n: usize = s.trim().parse().map_err(|source| BatchParseError::NotSetting { text: s.into(), source })?;
        Ok(BatchSetting::Fixed(Batch::new(n)?))
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
            // Measuring 32-frame requests (80 MB) through a server at start costs more than it
            // tells: a server's own batcher merges requests anyway.
            (BatchSetting::Auto, Provider::Remote) => Batch::new(8).expect("in range"),
        }
    }
}

/// Per-frame seconds of one batch size, measured by [`measure_batches`].
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// ONNX Runtime's CPU provider.
    #[default]
    Cpu,
    /// The CUDA provider (needs the `cuda` cargo feature and onnxruntime-gpu); falls back to
    /// CPU with a warning when unavailable.
    Cuda,
    /// An inference server speaking the Open Inference Protocol over gRPC (Triton, KServe,
    /// MLServer), named by `--remote-url` and `--remote-model`.
    Remote,
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
    #[error("UNet failed on a batch of {batch}: {source}")]
    Run {
        /// Batch size.
        batch: usize,
        /// What went wrong.
        source: RunFailure,
    },
    /// The inference server failed, or does not serve the UNet this avatar needs.
    #[error("remote UNet ({server}): {source}")]
    Remote {
        /// The model and server.
        server: String,
        /// What went wrong.
        source: RemoteFailure,
    },
    /// `--provider remote` without a server.
    #[error("--provider remote needs --remote-url grpc://HOST:PORT and --remote-model NAME")]
    NoRemote,
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

/// Why a UNet run failed (the cause of a [`UnetError::Run`]).
#[derive(Debug, thiserror::Error)]
pub enum RunFailure {
    /// ONNX Runtime failed.
    #[error("{0}")]
    Ort(#[from] ort::Error),
    /// ONNX Runtime failed at a named step.
    #[error("{step}: {source}")]
    OrtAt {
        /// What was being done.
        step: &'static str,
        /// ONNX Runtime's error.
        source: ort::Error,
    },
    /// The model gave no output of the UNet's output name.
    #[error("no output `{0}`")]
    NoOutput(String),
    /// A run before its inputs were written.
    #[error("inputs were not written for this batch (call inputs first)")]
    NoInputs,
    /// Caller slices too short for the batch ([`run_slices`]).
    #[error("input or output slices shorter than the batch")]
    ShortSlices,
    /// The thread that runs the UNet could not start.
    #[error("could not start the UNet thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The run panicked (its message).
    #[error("panicked: {0}")]
    Panicked(String),
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::Remote => "remote",
        })
    }
}

/// The numeric precision of a UNet model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The model as trained.
    Fp32,
    /// A static int8 (QDQ) model made by `lipsync model quantize`.
    Int8,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
        })
    }
}

/// Which of an avatar's UNet models to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionSetting {
    /// The avatar's int8 model when it names one and the UNet runs on the CPU; fp32 otherwise.
    #[default]
    Auto,
    /// Always the fp32 model.
    Fp32,
    /// The int8 model (an error when the avatar names none).
    Int8,
}

impl std::fmt::Display for PrecisionSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PrecisionSetting::Auto => "auto",
            PrecisionSetting::Fp32 => "fp32",
            PrecisionSetting::Int8 => "int8",
        })
    }
}

impl PrecisionSetting {
    /// The precision to run: `int8` is available when the avatar names an int8 model.
    pub fn resolve(self, int8_available: bool, provider: Provider) -> Result<Precision, NoInt8Model> {
        match self {
            PrecisionSetting::Fp32 => Ok(Precision::Fp32),
            PrecisionSetting::Int8 if int8_available => Ok(Precision::Int8),
            PrecisionSetting::Int8 => Err(NoInt8Model),
            // Static int8 pays on the CPU; a GPU runs the fp32 model (its int8 kernels differ).
            PrecisionSetting::Auto if int8_available && provider == Provider::Cpu => Ok(Precision::Int8),
            PrecisionSetting::Auto => Ok(Precision::Fp32),
        }
    }
}

/// [`PrecisionSetting::Int8`] for an avatar that names no int8 model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("int8 asked for, but the avatar names no int8 UNet (make one with `lipsync model quantize`)")]
pub struct NoInt8Model;

/// A UNet model to open: its file, its precision, its tensor names and the crop it serves.
#[derive(Debug, Clone)]
pub struct UnetModel {
    /// The ONNX file.
    pub path: PathBuf,
    /// fp32, or a quantized int8 model.
    pub precision: Precision,
    /// Input and output names.
    pub io: ModelIo,
    /// The crop geometry (the model's square input size).
    pub crop: CropParams,
}

/// What a backend runs: shown by `doctor`, the daemon's stats and reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackendInfo {
    /// The inference engine (`onnxruntime`).
    pub engine: &'static str,
    /// The execution provider in use (after any fallback).
    #[serde(serialize_with = "display")]
    pub provider: Provider,
    /// The model's precision.
    pub precision: Precision,
    /// The model file.
    pub model: PathBuf,
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl std::fmt::Display for BackendInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}, {} model {}", self.engine, self.provider, self.precision, self.model.display())
    }
}

/// The input buffers of one run of `n` frames.
#[derive(Debug)]
pub struct UnetInputs<'a> {
    /// `n x [6, S, S]` (docs/spec.md, "UNet input").
    pub images: &'a mut [f32],
    /// `n x [32, 16, 16]`.
    pub audio: &'a mut [f32],
}

/// Something that runs the UNet on batches of prepared frames. The batcher asks for a run's
/// input buffers, fills them, runs, and reads the output: a backend owns its buffers (plain
/// memory on the CPU, pinned host memory bound to the device for CUDA), so nothing is copied
/// twice and nothing is allocated per run.
pub trait UnetBackend: Send {
    /// What runs.
    fn info(&self) -> &BackendInfo;
    /// The model's square input size `S`.
    fn size(&self) -> usize;
    /// Largest batch per run.
    fn max_batch(&self) -> usize;
    /// The input buffers of a run of `n` frames (`1..=max_batch`).
    fn inputs(&mut self, n: usize) -> Result<UnetInputs<'_>, UnetError>;
    /// Runs the `n` frames written into [`UnetBackend::inputs`]; `n x [3, S, S]` outputs.
    fn run(&mut self, n: usize) -> Result<&[f32], UnetError>;
}

/// Opens `model` on `provider` (CUDA falls back to the CPU with a warning when it cannot start)
/// and checks its signature against the crop geometry. `remote` names the server of
/// [`Provider::Remote`] (which runs the server's model, not `model.path`).
pub fn open(
    rt: &OrtRuntime,
    model: &UnetModel,
    max_batch: Batch,
    opts: &SessionOptions,
    provider: Provider,
    remote: Option<&RemoteSettings>,
) -> Result<Box<dyn UnetBackend>, UnetError> {
    match provider {
        Provider::Cpu => Ok(Box::new(OrtUnet::open(rt, model, max_batch, opts)?)),
        Provider::Cuda => open_cuda(rt, model, max_batch, opts),
        Provider::Remote => {
            Ok(Box::new(remote::RemoteUnet::open(model, max_batch, remote.ok_or(UnetError::NoRemote)?)?))
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(
    rt: &OrtRuntime,
    model: &UnetModel,
    max_batch: Batch,
    opts: &SessionOptions,
) -> Result<Box<dyn UnetBackend>, UnetError> {
    match cuda::CudaUnet::open(rt, model, max_batch, opts) {
        Ok(u) => Ok(Box::new(u)),
        Err(UnetError::Model(e)) => {
            tracing::warn!("CUDA execution provider unavailable ({e}); running the UNet on the CPU");
            Ok(Box::new(OrtUnet::open(rt, model, max_batch, opts)?))
        }
        Err(e) => Err(e),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(
    rt: &OrtRuntime,
    model: &UnetModel,
    max_batch: Batch,
    opts: &SessionOptions,
) -> Result<Box<dyn UnetBackend>, UnetError> {
    tracing::warn!("lipsync was built without the `cuda` feature; running the UNet on the CPU");
    Ok(Box::new(OrtUnet::open(rt, model, max_batch, opts)?))
}

/// Runs `n` frames from caller slices (`images` `n x [6,S,S]`, `audio` `n x [32,16,16]`) into
/// `output` (`n x [3,S,S]`): the copying form, for tools and tests.
pub fn run_slices(
    unet: &mut dyn UnetBackend,
    n: usize,
    images: &[f32],
    audio: &[f32],
    output: &mut [f32],
) -> Result<(), UnetError> {
    let s = unet.size();
    let (img_len, out_len) = (n * 6 * s * s, n * 3 * s * s);
    if images.len() < img_len || audio.len() < n * FRAME_AUDIO_LEN || output.len() < out_len {
        return Err(UnetError::Run { batch: n, source: RunFailure::ShortSlices });
    }
    let inputs = unet.inputs(n)?;
    inputs.images.copy_from_slice(&images[..img_len]);
    inputs.audio.copy_from_slice(&audio[..n * FRAME_AUDIO_LEN]);
    output[..out_len].copy_from_slice(unet.run(n)?);
    Ok(())
}

/// Runs one frame of zeros: ONNX Runtime's first run sizes its memory and is slow, so a service
/// does it before its first real frame.
pub fn warm_up(unet: &mut dyn UnetBackend) -> Result<(), UnetError> {
    let inputs = unet.inputs(1)?;
    inputs.images.fill(0.0);
    inputs.audio.fill(0.0);
    unet.run(1).map(|_| ())
}

/// Times each batch size on zero inputs: one warm-up run, then the faster of two.
pub fn measure_batches(unet: &mut dyn UnetBackend, sizes: &[Batch]) -> Result<Vec<BatchTiming>, UnetError> {
    let mut timings = Vec::with_capacity(sizes.len());
    for &batch in sizes {
        let n = batch.get();
        let inputs = unet.inputs(n)?;
        inputs.images.fill(0.0);
        inputs.audio.fill(0.0);
        unet.run(n)?;
        let mut best = f64::INFINITY;
        for _ in 0..2 {
            let t = std::time::Instant::now();
            unet.run(n)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        timings.push(BatchTiming { batch, run_s: best });
    }
    Ok(timings)
}

/// The batch for [`BatchSetting::Auto`] on this backend's provider. On the CPU, 1: measured on
/// the full-size UNet with 2 threads, batch 8 renders at the same frames/s as batch 1 (14.0
/// against 13.8) with 4x the end-to-end latency and 1.4 GB more memory (docs/architecture.md,
/// "Batch"). On a GPU, where batching pays, the sizes up to the opened limit are measured now
/// ([`measure_batches`], [`pick_batch`]).
pub fn auto_batch(unet: &mut dyn UnetBackend) -> Result<Batch, UnetError> {
    match unet.info().provider {
        Provider::Cpu => Ok(Batch::ONE),
        Provider::Cuda | Provider::Remote => {
            let max = unet.max_batch();
            let sizes: Vec<Batch> =
                [1, 2, 4, 8, 16, 32].into_iter().filter(|&n| n <= max).filter_map(|n| Batch::new(n).ok()).collect();
            let timings = measure_batches(unet, &sizes)?;
            for t in &timings {
                tracing::info!(batch = t.batch.get(), run_ms = t.run_s * 1e3, fps = t.fps(), "UNet batch measured");
            }
            Ok(pick_batch(&timings).unwrap_or(Batch::ONE))
        }
    }
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
        assert!("x".parse::<Batch>().unwrap_err().to_string().contains("expected 1..=32"));
        let b: Batch = serde_json::from_str("16").unwrap();
        assert_eq!(b.get(), 16);
        assert!(serde_json::from_str::<Batch>("64").is_err());
    }

    #[test]
    fn batch_setting_is_auto_or_a_size() {
        assert_eq!("auto".parse::<BatchSetting>().unwrap(), BatchSetting::Auto);
        assert_eq!("4".parse::<BatchSetting>().unwrap(), BatchSetting::Fixed(Batch::new(4).unwrap()));
        let e = "0".parse::<BatchSetting>().unwrap_err();
        assert_eq!(e, BatchParseError::Range(BatchError(0)));
        assert!(e.to_string().contains("batch size 0 is out of range: expected 1..=32"));
        let e = "big".parse::<BatchSetting>().unwrap_err();
        assert!(e.to_string().contains("expected auto or 1..=32"), "{e}");
        assert!(std::error::Error::source(&e).is_some_and(|c| c.is::<ParseIntError>()), "the cause is kept");
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
