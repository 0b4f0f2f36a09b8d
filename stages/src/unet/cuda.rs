//! [`CudaUnet`]: the UNet on ONNX Runtime's CUDA provider with I/O binding. Inputs are written
//! straight into pinned (page-locked) host tensors that stay bound, so the host-to-device copy is
//! a DMA transfer ONNX Runtime can overlap; the output is bound to pinned host memory too.

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::Tensor;

use super::ort_backend::unet_label;
use super::{BackendInfo, Batch, Provider, RunFailure, UnetBackend, UnetError, UnetInputs, UnetModel};
use crate::features::FRAME_AUDIO_LEN;
use crate::onnx::{check_signature, ModelIo, OnnxError, OrtRuntime, SessionOptions};

/// Pinned input tensors of one batch size.
struct Inputs {
    images: Tensor<f32>,
    audio: Tensor<f32>,
}

/// A UNet session on CUDA (see the module docs).
pub(crate) struct CudaUnet {
    session: Session,
    binding: IoBinding,
    pinned: Allocator,
    output_info: MemoryInfo<'static>,
    io: ModelIo,
    info: BackendInfo,
    size: usize,
    max_batch: usize,
    /// Index `n - 1`: the tensors of a run of `n`, made the first time that size runs (a batcher
    /// runs few sizes: its batch and the partial ones at the end of a stream).
    inputs: Vec<Option<Inputs>>,
    output: Vec<f32>,
}

// SAFETY: the session, binding, allocator and tensors are used by one thread at a time (the
// struct is moved to the UNet thread, never shared); ONNX Runtime's objects are not tied to the
// thread that made them.
unsafe impl Send for CudaUnet {}

impl CudaUnet {
    /// Opens the model on CUDA; an `UnetError::Model` when the provider cannot start.
    pub(crate) fn open(
        rt: &OrtRuntime,
        model: &UnetModel,
        max_batch: Batch,
        opts: &SessionOptions,
    ) -> Result<Self, UnetError> {
        let what = unet_label(model.precision);
        let session = rt.open_model_cuda(what, &model.path, opts)?;
        let size = model.crop.model_size as usize;
        check_signature(&session, &model.io.unet_signature(size as i64), what, &model.path)?;
        let fail = |message: String| {
            UnetError::Model(OnnxError::ModelOpen { what: what.to_string(), path: model.path.clone(), message })
        };
        let pinned = Allocator::new(
            &session,
            MemoryInfo::new(AllocationDevice::CUDA_PINNED, 0, AllocatorType::Device, MemoryType::CPUInput)
                .map_err(|e| fail(e.to_string()))?,
        )
        .map_err(|e| fail(format!("no pinned host memory: {e}")))?;
        let output_info =
            MemoryInfo::new(AllocationDevice::CUDA_PINNED, 0, AllocatorType::Device, MemoryType::CPUOutput)
                .map_err(|e| fail(e.to_string()))?;
        let binding = session.create_binding().map_err(|e| fail(e.to_string()))?;
        let info = BackendInfo {
            engine: "onnxruntime",
            provider: Provider::Cuda,
            precision: model.precision,
            model: model.path.clone(),
        };
        Ok(Self {
            session,
            binding,
            pinned,
            output_info,
            io: model.io.clone(),
            info,
            size,
            max_batch: max_batch.get(),
            inputs: (0..max_batch.get()).map(|_| None).collect(),
            output: Vec::new(),
        })
    }

    fn tensors(&mut self, n: usize) -> Result<&mut Inputs, UnetError> {
        if !(1..=self.max_batch).contains(&n) {
            return Err(UnetError::BadBatch(n, self.max_batch));
        }
        let s = self.size;
        let slot = &mut self.inputs[n - 1];
        if slot.is_none() {
            let run = |source| UnetError::Run {
                batch: n,
                source: RunFailure::OrtAt { step: "pinned input tensors", source },
            };
            *slot = Some(Inputs {
                images: Tensor::new(&self.pinned, [n, 6, s, s]).map_err(run)?,
                audio: Tensor::new(&self.pinned, [n, 32, 16, 16]).map_err(run)?,
            });
        }
        Ok(slot.as_mut().expect("made above"))
    }
}

impl UnetBackend for CudaUnet {
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
        let t = self.tensors(n)?;
        let images = t.images.extract_tensor_mut().1;
        let audio = t.audio.extract_tensor_mut().1;
        debug_assert_eq!(audio.len(), n * FRAME_AUDIO_LEN);
        Ok(UnetInputs { images, audio })
    }

    fn run(&mut self, n: usize) -> Result<&[f32], UnetError> {
        let run = |e: ort::Error| UnetError::Run { batch: n, source: e.into() };
        self.tensors(n)?;
        let t = self.inputs[n - 1].as_ref().expect("made by tensors");
        self.binding.bind_input(self.io.unet_image_input.as_str(), &t.images).map_err(run)?;
        self.binding.bind_input(self.io.unet_audio_input.as_str(), &t.audio).map_err(run)?;
        self.binding.bind_output_to_device(self.io.unet_output.as_str(), &self.output_info).map_err(run)?;
        let outputs = self.session.run_binding(&self.binding).map_err(run)?;
        let value = outputs
            .get(self.io.unet_output.as_str())
            .ok_or_else(|| UnetError::Run { batch: n, source: RunFailure::NoOutput(self.io.unet_output.clone()) })?;
        let (_, data) = value.try_extract_tensor::<f32>().map_err(run)?;
        let expected = n * 3 * self.size * self.size;
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
