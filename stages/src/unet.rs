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
}
