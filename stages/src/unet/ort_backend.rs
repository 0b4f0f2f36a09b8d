//! [`OrtUnet`]: the UNet on ONNX Runtime's CPU provider, fp32 or int8 alike (an int8 model is a
//! QDQ graph with the same f32 inputs and outputs).

use ort::session::Session;
use ort::value::TensorRef;

use super::{BackendInfo, Batch, Precision, Provider, RunFailure, UnetBackend, UnetError, UnetInputs, UnetModel};
use crate::features::FRAME_AUDIO_LEN;
use crate::onnx::{check_signature, ModelIo, OrtRuntime, SessionOptions};

/// A UNet session on the CPU with its own input and output buffers. It owns its session: share
/// it between threads by moving it (one inference thread), never by aliasing.
pub struct OrtUnet {
    session: Session,
    io: ModelIo,
    info: BackendInfo,
    size: usize,
    max_batch: usize,
    images: Vec<f32>,
    audio: Vec<f32>,
    output: Vec<f32>,
}

impl std::fmt::Debug for OrtUnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtUnet").field("info", &self.info).field("max_batch", &self.max_batch).finish()
    }
}

impl OrtUnet {
    /// Opens the model on the CPU and checks its signature for the crop geometry.
    pub fn open(
        rt: &OrtRuntime,
        model: &UnetModel,
        max_batch: Batch,
        opts: &SessionOptions,
    ) -> Result<Self, UnetError> {
        let session = rt.open_model(unet_label(model.precision), &model.path, opts)?;
        Self::with_session(session, model, max_batch, Provider::Cpu)
    }

    /// Wraps an opened session (any provider that takes host buffers) after checking it.
    pub(crate) fn with_session(
        session: Session,
        model: &UnetModel,
        max_batch: Batch,
        provider: Provider,
    ) -> Result<Self, UnetError> {
        let size = model.crop.model_size as usize;
        check_signature(&session, &model.io.unet_signature(size as i64), unet_label(model.precision), &model.path)?;
        let info =
            BackendInfo { engine: "onnxruntime", provider, precision: model.precision, model: model.path.clone() };
        Ok(Self {
            session,
            io: model.io.clone(),
            info,
            size,
            max_batch: max_batch.get(),
            images: Vec::new(),
            audio: Vec::new(),
            output: Vec::new(),
        })
    }

    fn check(&self, n: usize) -> Result<(), UnetError> {
        if (1..=self.max_batch).contains(&n) {
            Ok(())
        } else {
            Err(UnetError::BadBatch(n, self.max_batch))
        }
    }
}

/// How a model is named in errors: `UNet` or `int8 UNet`.
pub(crate) fn unet_label(precision: Precision) -> &'static str {
    match precision {
        Precision::Fp32 => "UNet",
        Precision::Int8 => "int8 UNet",
    }
}

impl UnetBackend for OrtUnet {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn size(&self) -> usize {
        self.size
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn inputs(&mut self, n: usize) -> Result<UnetInputs<'_>, UnetError> {
        self.check(n)?;
        let s = self.size;
        // Sized once for the largest batch seen; later runs reuse the memory.
        if self.images.len() < n * 6 * s * s {
            self.images.resize(n * 6 * s * s, 0.0);
            self.audio.resize(n * FRAME_AUDIO_LEN, 0.0);
        }
        Ok(UnetInputs { images: &mut self.images[..n * 6 * s * s], audio: &mut self.audio[..n * FRAME_AUDIO_LEN] })
    }

    fn run(&mut self, n: usize) -> Result<&[f32], UnetError> {
        self.check(n)?;
        let s = self.size;
        let run = |e: RunFailure| UnetError::Run { batch: n, source: e };
        if self.images.len() < n * 6 * s * s {
            return Err(run(RunFailure::NoInputs));
        }
        let img =
            TensorRef::from_array_view(([n, 6, s, s], &self.images[..n * 6 * s * s])).map_err(|e| run(e.into()))?;
        let aud = TensorRef::from_array_view(([n, 32, 16, 16], &self.audio[..n * FRAME_AUDIO_LEN]))
            .map_err(|e| run(e.into()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.io.unet_image_input.as_str() => img, self.io.unet_audio_input.as_str() => aud])
            .map_err(|e| run(e.into()))?;
        let (_, data) = outputs[self.io.unet_output.as_str()].try_extract_tensor::<f32>().map_err(|e| run(e.into()))?;
        let expected = n * 3 * s * s;
        if data.len() != expected {
            return Err(UnetError::OutputSize { batch: n, got: data.len(), expected });
        }
        if self.output.len() < expected {
            self.output.resize(expected, 0.0);
        }
        self.output[..expected].copy_from_slice(data);
        Ok(&self.output[..expected])
    }
}
