//! [`RemoteUnet`]: the UNet on an inference server speaking the Open Inference Protocol (KServe
//! v2) over gRPC: NVIDIA Triton, KServe, MLServer. One `ModelInfer` request per batch, tensors
//! as raw little-endian bytes. When the server's model takes its image input as UINT8 (a Cast
//! and a Div by 255 in front, `scripts/make_u8_unet.py`), images go as bytes: the prepared
//! tensor is exactly the 8-bit crop over 255, so this is lossless and a quarter of the size. At open the server must be live, the model ready and its
//! metadata must match the UNet signature. Each request has a deadline; a server that is
//! unavailable is retried a bounded number of times with backoff, then the run fails with an
//! error naming the server and the model.

use std::time::Duration;

use prost::bytes::Bytes;
use tonic::transport::{Channel, Endpoint};

use super::{BackendInfo, Batch, Precision, Provider, UnetBackend, UnetError, UnetInputs, UnetModel};
use crate::features::FRAME_AUDIO_LEN;
use crate::onnx::ModelIo;

/// The generated Open Inference Protocol messages and client (`proto/open_inference.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use proto::{ModelInferRequest, ModelMetadataRequest, ModelReadyRequest, ServerLiveRequest};

/// Where the remote UNet runs and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteSettings {
    /// `grpc://HOST:PORT` (or `http://HOST:PORT`).
    pub url: String,
    /// The model's name on the server.
    pub model: String,
    /// Deadline of each request, and of connecting.
    pub timeout: Duration,
    /// Retries of a request the server could not take (unavailable), with doubling backoff.
    pub retries: u32,
}

impl RemoteSettings {
    /// Default deadline per request.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default retries.
    pub const DEFAULT_RETRIES: u32 = 3;

    /// A server at `url` (`grpc://HOST:PORT`) serving the UNet as `model`.
    pub fn new(url: &str, model: &str, timeout: Duration, retries: u32) -> Result<Self, RemoteUrlError> {
        let settings = Self { url: url.into(), model: model.into(), timeout, retries };
        settings.endpoint()?;
        Ok(settings)
    }

    /// The address as tonic takes it: `grpc://` becomes `http://`.
    fn endpoint(&self) -> Result<String, RemoteUrlError> {
        let bad = |expected| RemoteUrlError { url: self.url.clone(), expected };
        let rest = self
            .url
            .strip_prefix("grpc://")
            .or_else(|| self.url.strip_prefix("http://"))
            .ok_or_else(|| bad("must start with grpc:// (or http://)"))?;
        if rest.is_empty() || rest.contains('/') {
            return Err(bad("expected grpc://HOST:PORT"));
        }
        Ok(format!("http://{rest}"))
    }
}

/// A remote server's URL that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("remote URL `{url}`: {expected}")]
pub struct RemoteUrlError {
    /// The URL given.
    pub url: String,
    /// What it should be.
    pub expected: &'static str,
}

/// What went wrong with the inference server (the cause of a [`UnetError::Remote`]).
#[derive(Debug, thiserror::Error)]
pub enum RemoteFailure {
    /// The server's URL cannot be used.
    #[error(transparent)]
    Url(#[from] RemoteUrlError),
    /// tonic does not take the address.
    #[error("{0}")]
    Endpoint(#[source] tonic::transport::Error),
    /// The async runtime the client runs on could not start.
    #[error("no async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Nothing answered at the address.
    #[error("cannot connect: {0} (is the server running?)")]
    Connect(#[source] tonic::transport::Error),
    /// A call failed: the server's status (or tonic's), after `retries` retries.
    #[error("{call}: {} ({:?}){}", .source.message(), .source.code(), retried(*.retries))]
    Call {
        /// The call (`model ready`, `model infer`...).
        call: &'static str,
        /// Retries made before giving up.
        retries: u32,
        /// The status it ended with.
        source: tonic::Status,
    },
    /// A call got no answer within its deadline (the server's DEADLINE_EXCEEDED, or the client's
    /// own timeout, which tonic reports as CANCELLED).
    #[error(
        "{call}: no answer within the {} ms deadline ({}){}",
        .deadline.as_millis(), .source.message(), retried(*.retries)
    )]
    Deadline {
        /// The call.
        call: &'static str,
        /// The deadline.
        deadline: Duration,
        /// Retries made before giving up.
        retries: u32,
        /// The status it ended with.
        source: tonic::Status,
    },
    /// The server says it is not live.
    #[error("the server says it is not live")]
    NotLive,
    /// The server says the model is not ready.
    #[error("the server says the model is not ready")]
    NotReady,
    /// The model's metadata does not match the UNet signature.
    #[error(transparent)]
    Signature(Box<TensorMismatch>),
    /// An answer without the UNet's output.
    #[error("the answer has no output `{0}`")]
    NoOutput(String),
    /// An answer whose output is not FP32.
    #[error("output `{name}` is {datatype}, expected FP32")]
    OutputType {
        /// The output.
        name: String,
        /// Its data type.
        datatype: String,
    },
}

impl RemoteFailure {
    /// `call` failed with `source` after `retries` retries (each request given `deadline`).
    fn call(call: &'static str, source: tonic::Status, deadline: Duration, retries: u32) -> Self {
        match source.code() {
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                RemoteFailure::Deadline { call, deadline, retries, source }
            }
            _ => RemoteFailure::Call { call, retries, source },
        }
    }
}

/// ` after N retries`, when there were any.
fn retried(retries: u32) -> String {
    if retries > 0 {
        format!(" after {retries} retries")
    } else {
        String::new()
    }
}

/// A tensor of the server's model that does not fit the UNet signature (what was expected, what
/// was found, and the whole of what the model has).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorMismatch {
    /// No tensor of that name.
    #[error("no {kind} `{name}`; the model has {model}")]
    Missing {
        /// `input` or `output`.
        kind: &'static str,
        /// The tensor's name.
        name: String,
        /// The model's inputs and outputs.
        model: String,
    },
    /// A tensor of another type or shape.
    #[error("{kind} `{name}` is {datatype} {shape:?}, expected {types} [-1, {dims:?}]; the model has {model}")]
    Wrong {
        /// `input` or `output`.
        kind: &'static str,
        /// The tensor's name.
        name: String,
        /// Its data type.
        datatype: String,
        /// Its shape.
        shape: Vec<i64>,
        /// The data types it may have.
        types: &'static str,
        /// The dimensions it should have after the batch.
        dims: Vec<i64>,
        /// The model's inputs and outputs.
        model: String,
    },
}

impl From<TensorMismatch> for RemoteFailure {
    fn from(e: TensorMismatch) -> Self {
        RemoteFailure::Signature(Box::new(e))
    }
}

/// The UNet on a remote server (see the module docs).
pub(crate) struct RemoteUnet {
    runtime: tokio::runtime::Runtime,
    client: GrpcInferenceServiceClient<Channel>,
    settings: RemoteSettings,
    io: ModelIo,
    info: BackendInfo,
    size: usize,
    max_batch: usize,
    /// Whether the server's model takes the image input as UINT8.
    image_u8: bool,
    images: Vec<f32>,
    images_u8: Vec<u8>,
    audio: Vec<f32>,
    output: Vec<f32>,
}

impl RemoteUnet {
    /// Connects, checks the server, the model and its signature.
    pub(crate) fn open(model: &UnetModel, max_batch: Batch, settings: &RemoteSettings) -> Result<Self, UnetError> {
        let where_ = format!("model `{}` on {}", settings.model, settings.url);
        let fail = |source: RemoteFailure| UnetError::Remote { server: where_.clone(), source };
        let endpoint = settings.endpoint().map_err(|e| fail(e.into()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail(RemoteFailure::Runtime(e)))?;
        let size = model.crop.model_size as usize;
        // A batch's inputs and outputs with room for the protocol's framing.
        let limit = max_batch.get() * (6 + 3) * size * size * 4 + (FRAME_AUDIO_LEN * 4 + 4096) * max_batch.get();
        let client = runtime.block_on(async {
            let channel = Endpoint::from_shared(endpoint)
                .map_err(|e| fail(RemoteFailure::Endpoint(e)))?
                .connect_timeout(settings.timeout)
                .timeout(settings.timeout)
                .connect()
                .await
                .map_err(|e| fail(RemoteFailure::Connect(e)))?;
            Ok::<_, UnetError>(
                GrpcInferenceServiceClient::new(channel)
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
        })?;
        let mut this = Self {
            runtime,
            client,
            settings: settings.clone(),
            io: model.io.clone(),
            info: BackendInfo {
                engine: "open-inference-grpc",
                provider: Provider::Remote,
                precision: Precision::Fp32,
                model: format!("{}/{}", settings.url, settings.model).into(),
            },
            size,
            max_batch: max_batch.get(),
            image_u8: false,
            images: Vec::new(),
            images_u8: Vec::new(),
            audio: Vec::new(),
            output: Vec::new(),
        };
        this.check().map_err(fail)?;
        Ok(this)
    }

    /// Server live, model ready, metadata matching the UNet signature.
    fn check(&mut self) -> Result<(), RemoteFailure> {
        let (client, name) = (&mut self.client, self.settings.model.clone());
        let timeout = self.settings.timeout;
        let status = |call, e| RemoteFailure::call(call, e, timeout, 0);
        let (live, ready, meta) = self.runtime.block_on(async {
            let live = client.server_live(ServerLiveRequest {}).await.map_err(|e| status("server live", e))?;
            let ready = client
                .model_ready(ModelReadyRequest { name: name.clone(), version: String::new() })
                .await
                .map_err(|e| status("model ready", e))?;
            let meta = client
                .model_metadata(ModelMetadataRequest { name, version: String::new() })
                .await
                .map_err(|e| status("model metadata", e))?;
            Ok::<_, RemoteFailure>((live.into_inner().live, ready.into_inner().ready, meta.into_inner()))
        })?;
        if !live {
            return Err(RemoteFailure::NotLive);
        }
        if !ready {
            return Err(RemoteFailure::NotReady);
        }
        let s = self.size as i64;
        let io = &self.io;
        let want = [
            (true, io.unet_image_input.as_str(), vec![6, s, s]),
            (true, io.unet_audio_input.as_str(), vec![32, 16, 16]),
            (false, io.unet_output.as_str(), vec![3, s, s]),
        ];
        let show =
            |t: &proto::model_metadata_response::TensorMetadata| format!("`{}` {} {:?}", t.name, t.datatype, t.shape);
        let has = format!(
            "inputs {} -> outputs {}",
            meta.inputs.iter().map(show).collect::<Vec<_>>().join(", "),
            meta.outputs.iter().map(show).collect::<Vec<_>>().join(", ")
        );
        for (input, name, dims) in want {
            let list = if input { &meta.inputs } else { &meta.outputs };
            let kind = if input { "input" } else { "output" };
            let t = list.iter().find(|t| t.name == name).ok_or_else(|| TensorMismatch::Missing {
                kind,
                name: name.into(),
                model: has.clone(),
            })?;
            // Batch first (any size, or -1), then the fixed dims (-1 allowed).
            // The image input may be UINT8 (sent as the 8-bit crop, module docs).
            let image = input && name == io.unet_image_input;
            let u8_image = image && t.datatype == "UINT8";
            let fits = (t.datatype == "FP32" || u8_image)
                && t.shape.len() == dims.len() + 1
                && t.shape[1..].iter().zip(&dims).all(|(have, want)| *have == -1 || have == want);
            if !fits {
                let types = if image { "FP32 or UINT8" } else { "FP32" };
                return Err(TensorMismatch::Wrong {
                    kind,
                    name: name.into(),
                    datatype: t.datatype.clone(),
                    shape: t.shape.clone(),
                    types,
                    dims,
                    model: has,
                }
                .into());
            }
            if image {
                self.image_u8 = u8_image;
            }
        }
        Ok(())
    }

    fn check_batch(&self, n: usize) -> Result<(), UnetError> {
        if (1..=self.max_batch).contains(&n) {
            Ok(())
        } else {
            Err(UnetError::BadBatch(n, self.max_batch))
        }
    }
}

fn tensor(name: &str, datatype: &str, shape: &[usize]) -> InferInputTensor {
    InferInputTensor {
        name: name.to_string(),
        datatype: datatype.into(),
        shape: shape.iter().map(|&d| d as i64).collect(),
        ..Default::default()
    }
}

impl UnetBackend for RemoteUnet {
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
        self.check_batch(n)?;
        let s = self.size;
        if self.images.len() < n * 6 * s * s {
            self.images.resize(n * 6 * s * s, 0.0);
            self.audio.resize(n * FRAME_AUDIO_LEN, 0.0);
        }
        Ok(UnetInputs { images: &mut self.images[..n * 6 * s * s], audio: &mut self.audio[..n * FRAME_AUDIO_LEN] })
    }

    fn run(&mut self, n: usize) -> Result<&[f32], UnetError> {
        self.check_batch(n)?;
        let s = self.size;
        let server = format!("model `{}` on {}", self.settings.model, self.settings.url);
        let fail = |source: RemoteFailure| UnetError::Remote { server: server.clone(), source };
        let images = &self.images[..n * 6 * s * s];
        let (image_type, image_bytes) = if self.image_u8 {
            // Each value is k / 255 for a byte k (prep's table), so this gives k back exactly.
            self.images_u8.clear();
            self.images_u8.extend(images.iter().map(|v| (v * 255.0).round() as u8));
            ("UINT8", Bytes::copy_from_slice(&self.images_u8))
        } else {
            ("FP32", Bytes::copy_from_slice(bytemuck::cast_slice::<f32, u8>(images)))
        };
        let request = ModelInferRequest {
            model_name: self.settings.model.clone(),
            inputs: vec![
                tensor(&self.io.unet_image_input, image_type, &[n, 6, s, s]),
                tensor(&self.io.unet_audio_input, "FP32", &[n, 32, 16, 16]),
            ],
            outputs: vec![InferRequestedOutputTensor { name: self.io.unet_output.clone(), ..Default::default() }],
            raw_input_contents: vec![
                image_bytes,
                Bytes::copy_from_slice(bytemuck::cast_slice::<f32, u8>(&self.audio[..n * FRAME_AUDIO_LEN])),
            ],
            ..Default::default()
        };
        let (client, settings) = (&mut self.client, &self.settings);
        let response = self.runtime.block_on(async {
            let mut backoff = Duration::from_millis(50);
            let mut attempt = 0;
            loop {
                let mut req = tonic::Request::new(request.clone());
                req.set_timeout(settings.timeout);
                match client.model_infer(req).await {
                    Ok(r) => break Ok(r.into_inner()),
                    Err(e) if e.code() == tonic::Code::Unavailable && attempt < settings.retries => {
                        attempt += 1;
                        tracing::warn!(%server, attempt, error = %e.message(), "remote UNet unavailable; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                    Err(e) => break Err(fail(RemoteFailure::call("model infer", e, settings.timeout, attempt))),
                }
            }
        })?;
        let expected = n * 3 * s * s;
        let at = response
            .outputs
            .iter()
            .position(|o| o.name == self.io.unet_output)
            .ok_or_else(|| fail(RemoteFailure::NoOutput(self.io.unet_output.clone())))?;
        let out = &response.outputs[at];
        if out.datatype != "FP32" {
            return Err(fail(RemoteFailure::OutputType { name: out.name.clone(), datatype: out.datatype.clone() }));
        }
        if self.output.len() < expected {
            self.output.resize(expected, 0.0);
        }
        match response.raw_output_contents.get(at) {
            Some(raw) if raw.len() == expected * 4 => {
                for (v, b) in self.output[..expected].iter_mut().zip(raw.chunks_exact(4)) {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Some(raw) => return Err(UnetError::OutputSize { batch: n, got: raw.len() / 4, expected }),
            None => {
                let data = out.contents.as_ref().map(|c| c.fp32_contents.as_slice()).unwrap_or_default();
                if data.len() != expected {
                    return Err(UnetError::OutputSize { batch: n, got: data.len(), expected });
                }
                self.output[..expected].copy_from_slice(data);
            }
        }
        Ok(&self.output[..expected])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_grpc_host_port() {
        let s = |url: &str| RemoteSettings {
            url: url.into(),
            model: "m".into(),
            timeout: Duration::from_secs(1),
            retries: 0,
        };
        assert_eq!(s("grpc://127.0.0.1:8001").endpoint().unwrap(), "http://127.0.0.1:8001");
        assert_eq!(s("http://h:1").endpoint().unwrap(), "http://h:1");
        assert!(s("https://h:1").endpoint().unwrap_err().to_string().contains("must start with grpc://"));
        assert!(s("grpc://h:1/models").endpoint().unwrap_err().to_string().contains("expected grpc://HOST:PORT"));
    }

    #[test]
    fn failed_calls_name_the_call_and_keep_the_status() {
        let slow = RemoteFailure::call(
            "model infer",
            tonic::Status::cancelled("Timeout expired"),
            Duration::from_millis(300),
            2,
        );
        assert_eq!(
            slow.to_string(),
            "model infer: no answer within the 300 ms deadline (Timeout expired) after 2 retries"
        );
        let missing =
            RemoteFailure::call("model ready", tonic::Status::not_found("no model"), Duration::from_secs(1), 0);
        assert_eq!(missing.to_string(), "model ready: no model (NotFound)");
        let status = std::error::Error::source(&missing).and_then(|c| c.downcast_ref::<tonic::Status>());
        assert_eq!(status.map(tonic::Status::code), Some(tonic::Code::NotFound));
    }

    #[test]
    fn a_server_that_is_not_there_is_a_connect_failure_with_its_cause() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("grpc://127.0.0.1:{port}");
        let settings = RemoteSettings::new(&url, "unet", Duration::from_secs(2), 0).unwrap();
        let model = UnetModel {
            path: "unet.onnx".into(),
            precision: Precision::Fp32,
            io: ModelIo::default(),
            crop: crate::crop::CropParams::default(),
        };
        let e = RemoteUnet::open(&model, Batch::ONE, &settings).err().expect("nothing listens there");
        assert!(matches!(&e, UnetError::Remote { source: RemoteFailure::Connect(_), .. }), "{e:?}");
        assert!(e.to_string().contains("cannot connect") && e.to_string().contains(&url), "{e}");
        let failure = std::error::Error::source(&e).expect("the failure");
        assert!(failure.source().is_some_and(|c| c.is::<tonic::transport::Error>()), "{failure:?}");
    }
}
