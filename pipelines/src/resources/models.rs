//! The models an avatar names, opened once per model file: one UNet batcher and one audio
//! encoder per file, shared by every avatar (and render) that names it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lipsync_stages::features::AudioEncoder;
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::onnx::{OrtRuntime, SessionOptions};
use lipsync_stages::unet::PrecisionSetting;

use super::ResourceError;
use crate::graph::unet::{UnetService, UnetServiceConfig};
use crate::metrics::rss_bytes;
use crate::runtime::lock;

/// How an avatar's models are opened.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// The UNet batcher.
    pub unet: UnetServiceConfig,
    /// Which of the avatar's UNets runs.
    pub precision: PrecisionSetting,
    /// Audio encoder batch.
    pub encoder_batch: usize,
}

/// An avatar's models, and the files they were opened from (canonical paths: the keys they
/// are shared by).
#[derive(Clone)]
pub struct AvatarModels {
    /// The UNet batcher.
    pub unet: Arc<UnetService>,
    /// The audio encoder.
    pub encoder: Arc<Mutex<AudioEncoder>>,
    /// The UNet's file.
    pub unet_key: PathBuf,
    /// The encoder's file.
    pub encoder_key: PathBuf,
}

/// Open models by file, with the memory each added when it was opened.
#[derive(Default)]
pub struct ModelCache {
    unets: Mutex<HashMap<PathBuf, Arc<UnetService>>>,
    encoders: Mutex<HashMap<PathBuf, Arc<Mutex<AudioEncoder>>>>,
    bytes: Mutex<HashMap<PathBuf, usize>>,
}

/// Runs `load` and returns what it made with the growth of the process's memory meanwhile.
fn measured<T, E>(load: impl FnOnce() -> Result<T, E>) -> Result<(T, usize), E> {
    let before = rss_bytes().unwrap_or(0);
    let made = load()?;
    Ok((made, rss_bytes().unwrap_or(0).saturating_sub(before)))
}

/// A model's file as the key it is shared by, whatever path an avatar names it by.
fn key(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

impl ModelCache {
    /// The avatar's models: those already open for its files, else opened now (the UNet first,
    /// then the encoder). A UNet already open for another crop geometry is refused.
    pub fn open(&self, rt: &OrtRuntime, avatar: &Avatar, s: &ModelSettings) -> Result<AvatarModels, ResourceError> {
        let model = avatar.unet_model(s.precision, s.unet.provider).map_err(ResourceError::Precision)?;
        let unet_key = key(&model.path);
        let unet = {
            let mut map = lock(&self.unets);
            match map.get(&unet_key) {
                Some(u) if *u.crop() == avatar.config.crop => u.clone(),
                Some(_) => return Err(ResourceError::CropMismatch { model: unet_key }),
                None => {
                    let (u, bytes) =
                        measured(|| UnetService::start(rt, &model, &s.unet)).map_err(ResourceError::Unet)?;
                    tracing::info!(backend = %u.backend(), batch = u.max_batch().get(), "UNet");
                    lock(&self.bytes).insert(unet_key.clone(), bytes);
                    let u = Arc::new(u);
                    map.insert(unet_key.clone(), u.clone());
                    u
                }
            }
        };
        let encoder_key = key(&avatar.encoder);
        let encoder = {
            let mut map = lock(&self.encoders);
            match map.get(&encoder_key) {
                Some(e) => e.clone(),
                None => {
                    let opts = SessionOptions { intra_threads: 1, spinning: false };
                    let io = &avatar.config.models.io;
                    let (e, bytes) = measured(|| AudioEncoder::open(rt, &avatar.encoder, io, s.encoder_batch, &opts))
                        .map_err(ResourceError::Encoder)?;
                    lock(&self.bytes).insert(encoder_key.clone(), bytes);
                    let e = Arc::new(Mutex::new(e));
                    map.insert(encoder_key.clone(), e.clone());
                    e
                }
            }
        };
        Ok(AvatarModels { unet, encoder, unet_key, encoder_key })
    }

    /// Closes the models that `keep` does not name and nobody else holds (their threads end).
    pub fn prune(&self, keep: impl Fn(&Path) -> bool) {
        lock(&self.unets).retain(|path, u| keep(path) || Arc::strong_count(u) > 1);
        lock(&self.encoders).retain(|path, e| keep(path) || Arc::strong_count(e) > 1);
        let (u, e) = (lock(&self.unets), lock(&self.encoders));
        lock(&self.bytes).retain(|path, _| u.contains_key(path) || e.contains_key(path));
    }

    /// The open UNets by file.
    pub fn unets(&self) -> Vec<(PathBuf, Arc<UnetService>)> {
        lock(&self.unets).iter().map(|(p, u)| (p.clone(), u.clone())).collect()
    }

    /// Memory the model opened from `key` added when it was opened (and, for a UNet, warmed
    /// up): the growth of the process's resident memory meanwhile, which other threads' work
    /// also moves.
    pub fn bytes_of(&self, key: &Path) -> Option<usize> {
        lock(&self.bytes).get(key).copied()
    }
}
