//! The avatar registry: avatars by name, loaded on first use (or at start) into an LRU cache
//! bounded in memory; models by file, shared by every avatar that names them (one UNet batcher
//! and one audio encoder per model file).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lipsync_pipelines::job::FrameJob;
use lipsync_pipelines::runtime::lock;
use lipsync_pipelines::stages::frames::open_template;
use lipsync_pipelines::stages::unet::{UnetService, UnetServiceConfig};
use lipsync_stages::features::AudioEncoder;
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::onnx::{OrtRuntime, SessionOptions};
use lipsync_stages::template::{JpegTemplate, SharedTemplate};
use serde::{Deserialize, Serialize};

use crate::protocol::ErrorCode;
use crate::settings::Settings;

/// Why a request for an avatar failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No such avatar directory.
    #[error("no avatar named `{0}` (expected a directory with avatar.toml under the avatars directory)")]
    Unknown(String),
    /// A name that is not a plain directory name.
    #[error("avatar name `{0}` is not valid (expected a plain directory name)")]
    BadName(String),
    /// Unload refused.
    #[error("avatar `{0}` is in use by {1} session(s)")]
    InUse(String, usize),
    /// Loading failed.
    #[error("avatar `{name}` cannot be loaded: {message}")]
    Load {
        /// The avatar.
        name: String,
        /// Why.
        message: String,
    },
}

impl RegistryError {
    /// The code of the error reply it gets.
    pub fn code(&self) -> ErrorCode {
        match self {
            RegistryError::Unknown(_) | RegistryError::BadName(_) => ErrorCode::UnknownAvatar,
            RegistryError::InUse(..) => ErrorCode::InUse,
            RegistryError::Load { .. } => ErrorCode::AvatarLoad,
        }
    }
}

/// A loaded avatar and what serves it.
pub(crate) struct Loaded {
    pub(crate) name: String,
    pub(crate) avatar: Arc<Avatar>,
    pub(crate) template: Arc<SharedTemplate>,
    /// Its frames for JPEG output at the avatar's quality, when they fit `jpeg_template_mb`.
    pub(crate) jpeg: Option<Arc<JpegTemplate>>,
    pub(crate) encoder: Arc<Mutex<AudioEncoder>>,
    pub(crate) unet: Arc<UnetService>,
    unet_key: PathBuf,
    encoder_key: PathBuf,
    pub(crate) memory: usize,
    pub(crate) sessions: AtomicUsize,
    pub(crate) frames: AtomicU64,
    last_used: Mutex<Instant>,
}

/// Avatars by name (LRU, memory-bounded) and models by path (shared by avatars).
pub(crate) struct Registry {
    pub(crate) settings: Settings,
    rt: OrtRuntime,
    loaded: Mutex<HashMap<String, Arc<Loaded>>>,
    loading: Mutex<()>,
    pub(crate) unets: Mutex<HashMap<PathBuf, Arc<UnetService>>>,
    encoders: Mutex<HashMap<PathBuf, Arc<Mutex<AudioEncoder>>>>,
    /// Process memory each model file added when it was loaded (and, for a UNet, warmed up).
    model_bytes: Mutex<HashMap<PathBuf, usize>>,
}

pub use lipsync_pipelines::metrics::rss_bytes;

/// Runs `load` and returns what it made with the growth of the process's memory meanwhile.
fn measured<T, E>(load: impl FnOnce() -> Result<T, E>) -> Result<(T, usize), E> {
    let before = rss_bytes().unwrap_or(0);
    let made = load()?;
    Ok((made, rss_bytes().unwrap_or(0).saturating_sub(before)))
}

/// One row of `ListAvatars`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AvatarInfo {
    /// Name.
    pub name: String,
    /// Whether it is in the cache.
    pub loaded: bool,
    /// Its memory in all: template, sessions and models.
    pub memory_bytes: usize,
    /// Bytes its template holds (shared by its sessions).
    #[serde(default)]
    pub template_bytes: usize,
    /// Most bytes its sessions hold (each: decoded template frames and frame buffers).
    #[serde(default)]
    pub session_bytes: usize,
    /// Memory its models added when they were loaded and warmed up, approximate: the growth of
    /// the process's resident memory meanwhile, which other threads' work also moves (shared
    /// with other avatars naming the same model files, and counted for each).
    #[serde(default)]
    pub model_bytes: usize,
    /// Sessions using it.
    pub sessions: usize,
    /// Frames served since loaded.
    pub frames_served: u64,
}

impl Registry {
    /// An empty registry over `settings.avatars`.
    pub(crate) fn new(settings: Settings, rt: OrtRuntime) -> Self {
        Self {
            settings,
            rt,
            loaded: Mutex::new(HashMap::new()),
            loading: Mutex::new(()),
            unets: Mutex::new(HashMap::new()),
            encoders: Mutex::new(HashMap::new()),
            model_bytes: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn dir_of(&self, name: &str) -> Result<PathBuf, RegistryError> {
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !plain {
            return Err(RegistryError::BadName(name.to_string()));
        }
        let dir = self.settings.avatars.join(name);
        if !dir.join("avatar.toml").is_file() {
            return Err(RegistryError::Unknown(name.to_string()));
        }
        Ok(dir)
    }

    /// The avatar, loading it if needed; counts a session on it when `session`.
    pub(crate) fn acquire(&self, name: &str, session: bool) -> Result<Arc<Loaded>, RegistryError> {
        let dir = self.dir_of(name)?;
        if let Some(l) = self.get(name, session) {
            return Ok(l);
        }
        let _loading = lock(&self.loading);
        if let Some(l) = self.get(name, session) {
            return Ok(l);
        }
        let failed = |message: String| RegistryError::Load { name: name.to_string(), message };
        let started = Instant::now();
        let avatar = Avatar::open(&dir).map_err(|e| failed(e.to_string()))?;
        let budget = self.settings.cache_bytes.min(lipsync_stages::template::DEFAULT_CACHE);
        let limit = self.settings.jpeg_template;
        let jpeg = (limit > 0).then_some((avatar.config.jpeg_quality, limit));
        let (template, jpeg) = open_template(&avatar, budget, jpeg).map_err(failed)?;
        if jpeg.is_none() {
            template.warn_if_slow_backward(self.settings.template_cache);
        }
        if template.len() < avatar.boxes.len() {
            return Err(failed(format!(
                "the template has {} frames but the avatar has {} boxes",
                template.len(),
                avatar.boxes.len()
            )));
        }
        let io = avatar.config.models.io.clone();
        // Models are shared by file, whatever path an avatar names them by.
        let encoder_key = std::fs::canonicalize(&avatar.encoder).unwrap_or_else(|_| avatar.encoder.clone());
        let model =
            avatar.unet_model(self.settings.precision, self.settings.provider).map_err(|e| failed(e.to_string()))?;
        let unet_key = std::fs::canonicalize(&model.path).unwrap_or_else(|_| model.path.clone());
        let encoder = {
            let mut map = lock(&self.encoders);
            match map.get(&encoder_key) {
                Some(e) => e.clone(),
                None => {
                    let opts = SessionOptions { intra_threads: 1, spinning: false };
                    let batch = lipsync_stages::features::DEFAULT_ENCODER_BATCH;
                    let (e, bytes) = measured(|| AudioEncoder::open(&self.rt, &avatar.encoder, &io, batch, &opts))
                        .map_err(|e| failed(e.to_string()))?;
                    lock(&self.model_bytes).insert(encoder_key.clone(), bytes);
                    let e = Arc::new(Mutex::new(e));
                    map.insert(encoder_key.clone(), e.clone());
                    e
                }
            }
        };
        let unet = {
            let mut map = lock(&self.unets);
            match map.get(&unet_key) {
                Some(u) if *u.crop() == avatar.config.crop => u.clone(),
                Some(_) => {
                    return Err(failed("its crop geometry differs from another avatar using the same UNet".into()))
                }
                None => {
                    let cfg = UnetServiceConfig {
                        max_batch: self.settings.max_batch,
                        max_wait: self.settings.max_wait,
                        intra_threads: self.settings.intra_threads,
                        spinning: false,
                        provider: self.settings.provider,
                        remote: self.settings.remote.clone(),
                    };
                    let (u, bytes) =
                        measured(|| UnetService::start(&self.rt, &model, &cfg)).map_err(|e| failed(e.to_string()))?;
                    lock(&self.model_bytes).insert(unet_key.clone(), bytes);
                    let u = Arc::new(u);
                    map.insert(unet_key.clone(), u.clone());
                    u
                }
            }
        };
        let memory = template.memory_bytes() + jpeg.as_ref().map_or(0, |j| j.memory_bytes());
        self.evict_for(memory);
        self.prune_models();
        let loaded = Arc::new(Loaded {
            name: name.to_string(),
            avatar: Arc::new(avatar),
            template: Arc::new(template),
            jpeg: jpeg.map(Arc::new),
            encoder,
            unet,
            unet_key,
            encoder_key,
            memory,
            sessions: AtomicUsize::new(usize::from(session)),
            frames: AtomicU64::new(0),
            last_used: Mutex::new(Instant::now()),
        });
        tracing::info!(
            avatar = name,
            frames = loaded.template.len(),
            memory_mb = memory >> 20,
            "loaded avatar in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        lock(&self.loaded).insert(name.to_string(), loaded.clone());
        Ok(loaded)
    }

    pub(crate) fn get(&self, name: &str, session: bool) -> Option<Arc<Loaded>> {
        let map = lock(&self.loaded);
        let l = map.get(name)?.clone();
        if session {
            l.sessions.fetch_add(1, Ordering::SeqCst);
        }
        *lock(&l.last_used) = Instant::now();
        Some(l)
    }

    /// Evicts unused avatars, least recently used first, until `extra` more bytes fit.
    pub(crate) fn evict_for(&self, extra: usize) {
        let mut map = lock(&self.loaded);
        loop {
            let total: usize = map.values().map(|l| l.memory).sum();
            if total + extra <= self.settings.cache_bytes {
                return;
            }
            let victim = map
                .values()
                .filter(|l| l.sessions.load(Ordering::SeqCst) == 0)
                .min_by_key(|l| *lock(&l.last_used))
                .map(|l| l.name.clone());
            match victim {
                Some(name) => {
                    map.remove(&name);
                    tracing::info!(avatar = name, "evicted from the avatar cache");
                }
                None => {
                    tracing::warn!(
                        "avatar cache over its bound ({} MiB in use by sessions + {} MiB new)",
                        total >> 20,
                        extra >> 20
                    );
                    return;
                }
            }
        }
    }

    /// Closes the models no loaded avatar uses any more (their sessions and threads end).
    pub(crate) fn prune_models(&self) {
        let loaded = lock(&self.loaded);
        let unets: Vec<PathBuf> = loaded.values().map(|l| l.unet_key.clone()).collect();
        let encoders: Vec<PathBuf> = loaded.values().map(|l| l.encoder_key.clone()).collect();
        drop(loaded);
        lock(&self.unets).retain(|path, u| unets.contains(path) || Arc::strong_count(u) > 1);
        lock(&self.encoders).retain(|path, e| encoders.contains(path) || Arc::strong_count(e) > 1);
        let (u, e) = (lock(&self.unets), lock(&self.encoders));
        lock(&self.model_bytes).retain(|path, _| u.contains_key(path) || e.contains_key(path));
    }

    pub(crate) fn unload(&self, name: &str) -> Result<bool, RegistryError> {
        self.dir_of(name)?;
        let mut map = lock(&self.loaded);
        match map.get(name) {
            None => Ok(false),
            Some(l) => {
                let n = l.sessions.load(Ordering::SeqCst);
                if n > 0 {
                    return Err(RegistryError::InUse(name.to_string(), n));
                }
                map.remove(name);
                drop(map);
                tracing::info!(avatar = name, "unloaded");
                self.prune_models();
                Ok(true)
            }
        }
    }

    pub(crate) fn list(&self) -> Vec<AvatarInfo> {
        let map = lock(&self.loaded);
        let mut names: Vec<String> = std::fs::read_dir(&self.settings.avatars)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().join("avatar.toml").is_file())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        for n in map.keys() {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names.sort();
        let models = lock(&self.model_bytes);
        names
            .into_iter()
            .map(|name| match map.get(&name) {
                Some(l) => {
                    let sessions = l.sessions.load(Ordering::SeqCst);
                    let (w, h) = l.template.size();
                    // A session's queue is at least its batch (connection.rs); at most the UNet's.
                    let queue = self.settings.session_queue.max(l.unet.max_batch().get());
                    // With JPEG frames (sessions at the avatar's quality) a session holds no
                    // decoded frames, and its jobs hold a face region each.
                    let per_session = match &l.jpeg {
                        Some(j) => queue * (FrameJob::bytes(&l.avatar.config.crop, 0, 0) + j.max_region_bytes()),
                        None => {
                            l.template.reader_bytes(self.settings.template_cache)
                                + queue * FrameJob::bytes(&l.avatar.config.crop, w, h)
                        }
                    };
                    let model_bytes = [&l.unet_key, &l.encoder_key].iter().filter_map(|k| models.get(*k)).sum();
                    let session_bytes = sessions * per_session;
                    AvatarInfo {
                        name,
                        loaded: true,
                        memory_bytes: l.memory + session_bytes + model_bytes,
                        template_bytes: l.memory,
                        session_bytes,
                        model_bytes,
                        sessions,
                        frames_served: l.frames.load(Ordering::SeqCst),
                    }
                }
                None => AvatarInfo {
                    name,
                    loaded: false,
                    memory_bytes: 0,
                    template_bytes: 0,
                    session_bytes: 0,
                    model_bytes: 0,
                    sessions: 0,
                    frames_served: 0,
                },
            })
            .collect()
    }
}
