//! The avatar registry: avatars by name, loaded on first use (or at start) into an LRU cache
//! bounded in memory; models by file, shared by every avatar that names them (one UNet batcher
//! and one audio encoder per model file).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lipsync_pipelines::graph::unet::UnetServiceConfig;
use lipsync_pipelines::job::FrameJob;
use lipsync_pipelines::resources::{
    AvatarModels, AvatarResources, ModelCache, ModelSettings, ResourceError, TemplatePlan,
};
use lipsync_pipelines::runtime::lock;
use lipsync_stages::features::AudioEncoder;
use lipsync_stages::io::avatar::{Avatar, AvatarError};
use lipsync_stages::onnx::OrtRuntime;
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
    #[error("avatar `{name}` cannot be loaded: {source}")]
    Load {
        /// The avatar.
        name: String,
        /// Why (boxed: the daemon's errors stay small).
        source: Box<LoadError>,
    },
}

/// Why an avatar could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Its directory, configuration, boxes or template video are not valid.
    #[error(transparent)]
    Avatar(#[from] AvatarError),
    /// Its models or template could not be opened.
    #[error(transparent)]
    Resources(#[from] ResourceError),
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
    pub(crate) unet: Arc<lipsync_pipelines::graph::unet::UnetService>,
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
    /// Models by file, shared by the avatars that name them.
    pub(crate) models: ModelCache,
}

pub use lipsync_pipelines::metrics::rss_bytes;

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
            models: ModelCache::default(),
        }
    }

    /// How avatars' models are opened.
    fn model_settings(&self) -> ModelSettings {
        let s = &self.settings;
        ModelSettings {
            unet: UnetServiceConfig {
                max_batch: s.max_batch,
                max_wait: s.max_wait,
                intra_threads: s.intra_threads,
                spinning: s.spinning,
                provider: s.provider,
                remote: s.remote.clone(),
            },
            precision: s.precision,
            encoder_batch: lipsync_stages::features::DEFAULT_ENCODER_BATCH,
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
        let failed = |e: LoadError| RegistryError::Load { name: name.to_string(), source: Box::new(e) };
        let started = Instant::now();
        let avatar = Avatar::open(&dir).map_err(|e| failed(e.into()))?;
        // Sessions decode what the JPEG frames do not hold; the template keeps its own frames
        // (a frames directory) within the cache's bound.
        let plan = TemplatePlan {
            budget: self.settings.cache_bytes.min(lipsync_stages::template::DEFAULT_CACHE),
            jpeg: (self.settings.jpeg_template > 0)
                .then_some((avatar.config.jpeg_quality, self.settings.jpeg_template)),
        };
        let res = AvatarResources::open(&self.rt, &self.models, avatar, &self.model_settings(), |_| plan)
            .map_err(|e| failed(e.into()))?;
        if res.template.jpeg.is_none() {
            res.template.template.warn_if_slow_backward(self.settings.template_cache);
        }
        let memory = res.template.memory_bytes();
        self.evict_for(memory);
        self.prune_models();
        let AvatarResources { avatar, models, template } = res;
        let AvatarModels { unet, encoder, unet_key, encoder_key } = models;
        let loaded = Arc::new(Loaded {
            name: name.to_string(),
            avatar,
            template: template.template,
            jpeg: template.jpeg,
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
        let keys: Vec<PathBuf> = loaded.values().flat_map(|l| [l.unet_key.clone(), l.encoder_key.clone()]).collect();
        drop(loaded);
        self.models.prune(|path| keys.iter().any(|k| k == path));
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
                    let model_bytes =
                        [&l.unet_key, &l.encoder_key].iter().filter_map(|k| self.models.bytes_of(k)).sum();
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
