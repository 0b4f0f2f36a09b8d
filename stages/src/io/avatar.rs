//! The avatar directory format (docs/avatar.md): `avatar.toml`, a template video or frames
//! directory, `boxes.json` with one `[x1, y1, x2, y2]` per template frame, and two models.
//!
//! [`Avatar::open`] validates everything that needs no ONNX Runtime (files, video, boxes);
//! [`Avatar::check_models`] opens both models and checks their inputs and outputs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::crop::{CropBox, CropError, CropParams};
use crate::io::video::{probe, VideoError, VideoInfo};
use crate::onnx::{check_signature, ModelIo, OnnxError, OrtRuntime, SessionOptions};
use crate::unet::{NoInt8Model, Precision, PrecisionSetting, Provider, UnetModel};

/// File name of an avatar's configuration.
pub const AVATAR_TOML: &str = "avatar.toml";

/// Errors from loading, validating or writing an avatar.
#[derive(Debug, thiserror::Error)]
pub enum AvatarError {
    /// An output could not be written whole.
    #[error("could not write {path}: {source}")]
    Write {
        /// The output.
        path: PathBuf,
        /// Which step failed.
        source: crate::io::staged::StagedError,
    },
    /// The avatar directory or its `avatar.toml` is missing.
    #[error("not an avatar directory: {0} (expected a directory holding avatar.toml, see docs/avatar.md)")]
    NotAvatar(PathBuf),
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `avatar.toml` does not parse.
    #[error("invalid {path}: {message}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// `boxes.json` does not parse.
    #[error("invalid boxes file {path}: {message} (expected a JSON list of [x1, y1, x2, y2] integer lists)")]
    BoxesJson {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A setting is out of range.
    #[error("invalid avatar setting {field}: {message}")]
    Setting {
        /// The setting.
        field: &'static str,
        /// What is wrong and what is expected.
        message: String,
    },
    /// The int8 UNet asked for, and the avatar names none.
    #[error("invalid avatar setting models.unet_int8: {0}")]
    NoInt8(#[from] NoInt8Model),
    /// The crop geometry does not fit.
    #[error("invalid avatar setting crop: {0}")]
    Crop(#[from] CropError),
    /// The template source is unusable.
    #[error(transparent)]
    Video(#[from] VideoError),
    /// The box count differs from the frame count.
    #[error("{boxes} crop boxes for {frames} template frames in {video}: expected one box per frame")]
    BoxCount {
        /// Number of boxes.
        boxes: usize,
        /// Number of frames.
        frames: usize,
        /// The template.
        video: PathBuf,
    },
    /// A box is empty or not inside the frame.
    #[error("crop box {index} {bbox:?} {problem} (frame is {width}x{height}; boxes are [x1, y1, x2, y2] with x2/y2 exclusive)")]
    BadBox {
        /// Box (= template frame) index.
        index: usize,
        /// The box.
        bbox: [i64; 4],
        /// What is wrong.
        problem: &'static str,
        /// Frame width.
        width: u32,
        /// Frame height.
        height: u32,
    },
    /// A model is missing or has the wrong inputs/outputs.
    #[error(transparent)]
    Model(#[from] OnnxError),
    /// The output directory exists already.
    #[error("{0} exists already: choose a new directory or remove it first")]
    OutputExists(PathBuf),
}

/// Paths of the avatar's two models and their I/O names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPaths {
    /// The lip-sync UNet (relative to the avatar directory, or absolute).
    pub unet: PathBuf,
    /// The audio encoder (relative to the avatar directory, or absolute).
    pub encoder: PathBuf,
    /// A static int8 UNet made from `unet` by `lipsync model quantize` and measured against it
    /// on this avatar (docs/avatar.md, "Quantized UNet").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unet_int8: Option<PathBuf>,
    /// Input/output names, when they differ from the defaults.
    #[serde(default, skip_serializing_if = "is_default_io")]
    pub io: ModelIo,
}

fn is_default_io(io: &ModelIo) -> bool {
    *io == ModelIo::default()
}

/// The contents of `avatar.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvatarConfig {
    /// Frame rate of the template (25 for the model family).
    #[serde(default = "default_fps")]
    pub fps: f64,
    /// Template video file or frames directory.
    pub video: PathBuf,
    /// The crop boxes file.
    #[serde(default = "default_boxes")]
    pub boxes: PathBuf,
    /// Start offset into the ping-pong template sequence.
    #[serde(default)]
    pub start_frame: usize,
    /// JPEG quality of encoded frames (1..=100).
    #[serde(default = "default_quality")]
    pub jpeg_quality: u8,
    /// The models.
    pub models: ModelPaths,
    /// Crop geometry.
    #[serde(default)]
    pub crop: CropParams,
}

fn default_fps() -> f64 {
    25.0
}
fn default_boxes() -> PathBuf {
    PathBuf::from("boxes.json")
}
fn default_quality() -> u8 {
    90
}

/// A loaded, validated avatar with resolved paths.
#[derive(Debug, Clone)]
pub struct Avatar {
    /// The avatar directory.
    pub root: PathBuf,
    /// The configuration as written.
    pub config: AvatarConfig,
    /// Resolved template path.
    pub video: PathBuf,
    /// What the template holds.
    pub video_info: VideoInfo,
    /// One crop box per template frame.
    pub boxes: Vec<CropBox>,
    /// Resolved UNet path.
    pub unet: PathBuf,
    /// Resolved path of the int8 UNet, when the avatar names one.
    pub unet_int8: Option<PathBuf>,
    /// Resolved audio encoder path.
    pub encoder: PathBuf,
}

/// Reads and parses a boxes file.
pub fn read_boxes(path: &Path) -> Result<Vec<CropBox>, AvatarError> {
    let text = std::fs::read_to_string(path).map_err(|source| AvatarError::Io {
        action: "could not read boxes file",
        path: path.to_path_buf(),
        source,
    })?;
    parse_boxes(&text, path)
}

/// Parses the text of a boxes file (`path` names it in errors).
pub fn parse_boxes(text: &str, path: &Path) -> Result<Vec<CropBox>, AvatarError> {
    serde_json::from_str(text).map_err(|e| AvatarError::BoxesJson { path: path.to_path_buf(), message: e.to_string() })
}

/// Checks that `boxes` has one usable box per frame of `info`.
pub fn validate_boxes(boxes: &[CropBox], info: &VideoInfo, video: &Path) -> Result<(), AvatarError> {
    if boxes.len() != info.frames {
        return Err(AvatarError::BoxCount { boxes: boxes.len(), frames: info.frames, video: video.to_path_buf() });
    }
    for (index, b) in boxes.iter().enumerate() {
        if let Some(problem) = b.problem(info.width, info.height) {
            return Err(AvatarError::BadBox {
                index,
                bbox: (*b).into(),
                problem,
                width: info.width,
                height: info.height,
            });
        }
    }
    Ok(())
}

impl AvatarConfig {
    /// Parses and checks the text of an `avatar.toml` (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, AvatarError> {
        let config: AvatarConfig =
            toml::from_str(text).map_err(|e| AvatarError::Toml { path: path.to_path_buf(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the scalar settings.
    pub fn validate(&self) -> Result<(), AvatarError> {
        if !(self.fps.is_finite() && self.fps > 0.0) {
            return Err(AvatarError::Setting {
                field: "fps",
                message: format!("{} is not a positive number", self.fps),
            });
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return Err(AvatarError::Setting {
                field: "jpeg_quality",
                message: format!("{} is outside 1..=100", self.jpeg_quality),
            });
        }
        Ok(self.crop.validate()?)
    }
}

impl Avatar {
    /// Loads `dir/avatar.toml` and validates the template, the boxes and the settings.
    /// Models are checked for presence only; see [`Avatar::check_models`].
    pub fn open(dir: &Path) -> Result<Self, AvatarError> {
        let toml_path = dir.join(AVATAR_TOML);
        if !toml_path.is_file() {
            return Err(AvatarError::NotAvatar(dir.to_path_buf()));
        }
        let text = std::fs::read_to_string(&toml_path).map_err(|source| AvatarError::Io {
            action: "could not read",
            path: toml_path.clone(),
            source,
        })?;
        let config = AvatarConfig::parse(&text, &toml_path)?;
        let video = dir.join(&config.video);
        let video_info = probe(&video)?;
        if let Some(fps) = video_info.fps {
            if (fps - config.fps).abs() > 0.01 {
                tracing::warn!(
                    "template {} runs at {fps:.3} fps but the avatar says {}; frames are used in order",
                    video.display(),
                    config.fps
                );
            }
        }
        if (config.fps - 25.0).abs() > 0.01 {
            tracing::warn!("avatar fps is {}, the model family is trained at 25; frames are used in order", config.fps);
        }
        let boxes = read_boxes(&dir.join(&config.boxes))?;
        validate_boxes(&boxes, &video_info, &video)?;
        let unet = dir.join(&config.models.unet);
        let encoder = dir.join(&config.models.encoder);
        let unet_int8 = config.models.unet_int8.as_ref().map(|p| dir.join(p));
        for (what, path) in
            [("UNet", Some(&unet)), ("audio encoder", Some(&encoder)), ("int8 UNet", unet_int8.as_ref())]
        {
            if let Some(path) = path.filter(|p| !p.is_file()) {
                return Err(OnnxError::ModelMissing { what: what.into(), path: path.clone() }.into());
            }
        }
        Ok(Self { root: dir.to_path_buf(), config, video, video_info, boxes, unet, unet_int8, encoder })
    }

    /// An avatar from parts (no directory): validates the template, the boxes and the models'
    /// presence like [`Avatar::open`].
    pub fn from_parts(
        video: &Path,
        boxes: Vec<CropBox>,
        unet: &Path,
        encoder: &Path,
        fps: f64,
        start_frame: usize,
        jpeg_quality: u8,
    ) -> Result<Self, AvatarError> {
        let config = AvatarConfig {
            fps,
            video: video.to_path_buf(),
            boxes: default_boxes(),
            start_frame,
            jpeg_quality,
            models: ModelPaths {
                unet: unet.to_path_buf(),
                encoder: encoder.to_path_buf(),
                unet_int8: None,
                io: ModelIo::default(),
            },
            crop: CropParams::default(),
        };
        config.validate()?;
        let video_info = probe(video)?;
        validate_boxes(&boxes, &video_info, video)?;
        for (what, path) in [("UNet", unet), ("audio encoder", encoder)] {
            if !path.is_file() {
                return Err(OnnxError::ModelMissing { what: what.into(), path: path.to_path_buf() }.into());
            }
        }
        Ok(Self {
            root: PathBuf::from("."),
            config,
            video: video.to_path_buf(),
            video_info,
            boxes,
            unet: unet.to_path_buf(),
            unet_int8: None,
            encoder: encoder.to_path_buf(),
        })
    }

    /// Opens both models and checks their inputs and outputs against the avatar's I/O names and
    /// crop geometry.
    pub fn check_models(&self, rt: &OrtRuntime) -> Result<(), AvatarError> {
        check_model_pair(rt, &self.unet, &self.encoder, &self.config.models.io, &self.config.crop)?;
        if let Some(int8) = &self.unet_int8 {
            let session = rt.open_model("int8 UNet", int8, &SessionOptions::default())?;
            let expected = self.config.models.io.unet_signature(i64::from(self.config.crop.model_size));
            check_signature(&session, &expected, "int8 UNet", int8)?;
        }
        Ok(())
    }

    /// The UNet to run for `setting` on `provider`: the int8 model when asked for (or, with
    /// `auto`, on the CPU when the avatar names one), the fp32 model otherwise.
    pub fn unet_model(&self, setting: PrecisionSetting, provider: Provider) -> Result<UnetModel, AvatarError> {
        let precision = setting.resolve(self.unet_int8.is_some(), provider)?;
        let path = match precision {
            Precision::Fp32 => self.unet.clone(),
            Precision::Int8 => self.unet_int8.clone().expect("resolve gives int8 only when there is one"),
        };
        Ok(UnetModel { path, precision, io: self.config.models.io.clone(), crop: self.config.crop })
    }

    /// Number of template frames.
    pub fn frames(&self) -> usize {
        self.video_info.frames
    }
}

/// Opens a UNet and an audio encoder and checks both signatures.
pub fn check_model_pair(
    rt: &OrtRuntime,
    unet: &Path,
    encoder: &Path,
    io: &ModelIo,
    crop: &CropParams,
) -> Result<(), AvatarError> {
    let opts = SessionOptions::default();
    let session = rt.open_model("UNet", unet, &opts)?;
    check_signature(&session, &io.unet_signature(i64::from(crop.model_size)), "UNet", unet)?;
    let session = rt.open_model("audio encoder", encoder, &opts)?;
    check_signature(&session, &io.encoder_signature(), "audio encoder", encoder)?;
    Ok(())
}

/// Writes `bytes` to `path` whole or not at all (temporary file in the same directory, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AvatarError> {
    crate::io::staged::write_atomic(path, bytes)
        .map_err(|source| AvatarError::Write { path: path.to_path_buf(), source })
}

/// How [`create`] handles the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelStorage {
    /// Refer to the models by absolute path (shared between avatars, nothing copied).
    Reference,
    /// Copy the models into the avatar directory (self-contained, movable).
    Copy,
}

/// What [`create`] needs to build an avatar directory.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// Template video file or frames directory (copied into the avatar).
    pub video: PathBuf,
    /// Crop boxes, one per template frame.
    pub boxes: Vec<CropBox>,
    /// The UNet.
    pub unet: PathBuf,
    /// The audio encoder.
    pub encoder: PathBuf,
    /// Whether to copy or reference the models.
    pub models: ModelStorage,
    /// Frame rate.
    pub fps: f64,
    /// Ping-pong start offset.
    pub start_frame: usize,
    /// JPEG quality.
    pub jpeg_quality: u8,
    /// Model I/O names.
    pub io: ModelIo,
}

/// Validates `spec` fully (template, boxes, models with `rt`) and writes the avatar to `out`,
/// which must not exist: it is built in a temporary sibling directory and renamed into place.
pub fn create(out: &Path, spec: &CreateSpec, rt: &OrtRuntime) -> Result<Avatar, AvatarError> {
    if out.exists() {
        return Err(AvatarError::OutputExists(out.to_path_buf()));
    }
    let info = probe(&spec.video)?;
    validate_boxes(&spec.boxes, &info, &spec.video)?;
    let crop = CropParams::default();
    check_model_pair(rt, &spec.unet, &spec.encoder, &spec.io, &crop)?;

    let parent = crate::io::staged::parent_dir(out);
    std::fs::create_dir_all(parent).map_err(|source| AvatarError::Io {
        action: "could not create",
        path: parent.to_path_buf(),
        source,
    })?;
    let write = |source| AvatarError::Write { path: out.to_path_buf(), source };
    let mut staged = crate::io::staged::StagedDir::create(out).map_err(write)?;
    write_avatar_dir(staged.dir(), spec, &crop)?;
    staged.commit().map_err(write)?;
    Avatar::open(out)
}

fn copy(from: &Path, to: &Path) -> Result<(), AvatarError> {
    std::fs::copy(from, to).map(|_| ()).map_err(|source| AvatarError::Io {
        action: "could not copy",
        path: from.to_path_buf(),
        source,
    })
}

fn write_avatar_dir(dir: &Path, spec: &CreateSpec, crop: &CropParams) -> Result<(), AvatarError> {
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| AvatarError::Io {
            action: "could not create",
            path: p.to_path_buf(),
            source,
        })
    };
    mkdir(dir)?;
    let video = if spec.video.is_dir() {
        mkdir(&dir.join("frames"))?;
        for file in crate::io::video::frame_files(&spec.video)? {
            let name = file.file_name().expect("frame files have names");
            copy(&file, &dir.join("frames").join(name))?;
        }
        PathBuf::from("frames")
    } else {
        let ext = spec.video.extension().and_then(|e| e.to_str()).unwrap_or("mp4");
        let name = PathBuf::from(format!("template.{ext}"));
        copy(&spec.video, &dir.join(&name))?;
        name
    };
    let model_path = |src: &Path, name: &str| -> Result<PathBuf, AvatarError> {
        match spec.models {
            ModelStorage::Copy => {
                mkdir(&dir.join("models"))?;
                let rel = PathBuf::from("models").join(name);
                copy(src, &dir.join(&rel))?;
                Ok(rel)
            }
            ModelStorage::Reference => std::fs::canonicalize(src).map_err(|source| AvatarError::Io {
                action: "could not resolve",
                path: src.to_path_buf(),
                source,
            }),
        }
    };
    let config = AvatarConfig {
        fps: spec.fps,
        video,
        boxes: default_boxes(),
        start_frame: spec.start_frame,
        jpeg_quality: spec.jpeg_quality,
        models: ModelPaths {
            unet: model_path(&spec.unet, "unet.onnx")?,
            encoder: model_path(&spec.encoder, "audio_encoder.onnx")?,
            unet_int8: None,
            io: spec.io.clone(),
        },
        crop: *crop,
    };
    config.validate()?;
    let boxes = serde_json::to_string(&spec.boxes).expect("boxes serialise");
    write_atomic(&dir.join("boxes.json"), format!("{boxes}\n").as_bytes())?;
    let text = toml::to_string(&config)
        .map_err(|e| AvatarError::Toml { path: dir.join(AVATAR_TOML), message: e.to_string() })?;
    write_atomic(&dir.join(AVATAR_TOML), format!("# lipsync avatar (docs/avatar.md)\n{text}").as_bytes())
}

/// Makes the avatar in `dir` name `model` as its int8 UNet (`models.unet_int8`), keeping the
/// rest of `avatar.toml` as written (comments too). The path is stored relative to the avatar
/// when the model lies inside it.
pub fn set_int8_model(dir: &Path, model: &Path) -> Result<(), AvatarError> {
    let path = dir.join(AVATAR_TOML);
    let text = std::fs::read_to_string(&path).map_err(|source| AvatarError::Io {
        action: "could not read",
        path: path.clone(),
        source,
    })?;
    let toml_err = |message: String| AvatarError::Toml { path: path.clone(), message };
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| toml_err(e.to_string()))?;
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (root, model_abs) = (abs(dir), abs(model));
    let stored = model_abs.strip_prefix(&root).map(Path::to_path_buf).unwrap_or(model_abs);
    let value = stored.to_str().ok_or_else(|| toml_err(format!("{} is not UTF-8", stored.display())))?;
    let models = doc["models"].as_table_mut().ok_or_else(|| toml_err("no [models] table".into()))?;
    models["unet_int8"] = toml_edit::value(value);
    let updated = doc.to_string();
    AvatarConfig::parse(&updated, &path)?;
    write_atomic(&path, updated.as_bytes())
}
