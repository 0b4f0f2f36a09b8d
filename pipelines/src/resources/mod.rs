//! What a graph needs for an avatar, opened once under given limits: its models (shared by file
//! through a [`ModelCache`]) and its template (decoded under a budget, with its JPEG frames for
//! JPEG output). `render` and the daemon's registry both open avatars here.

mod budget;
mod models;
mod template;

use std::path::PathBuf;
use std::sync::Arc;

pub use budget::{
    auto_cache, fit_cache, jpeg_template_limit, DEFAULT_MEMORY_BUDGET, MIN_TEMPLATE_CACHE, VIDEO_ENCODER_BYTES,
};
use lipsync_stages::features::FeatureError;
use lipsync_stages::io::avatar::{Avatar, AvatarError};
use lipsync_stages::onnx::OrtRuntime;
use lipsync_stages::unet::UnetError;
pub use models::{AvatarModels, ModelCache, ModelSettings};
pub use template::{open_template, AvatarTemplate, TemplateOpenError, TemplatePlan};

/// Why an avatar's resources could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// No UNet of the asked precision (an int8 model asked for that the avatar has not).
    #[error(transparent)]
    Precision(AvatarError),
    /// The avatar's UNet file is already open for another crop geometry.
    #[error("its crop geometry differs from another avatar using the same UNet ({})", model.display())]
    CropMismatch {
        /// The UNet's file.
        model: PathBuf,
    },
    /// The UNet could not be opened, checked or warmed up.
    #[error(transparent)]
    Unet(UnetError),
    /// The audio encoder could not be opened or checked.
    #[error(transparent)]
    Encoder(FeatureError),
    /// The template could not be opened.
    #[error(transparent)]
    Template(#[from] TemplateOpenError),
}

impl ResourceError {
    /// The graph stage the failed resource belongs to (a render names it in its error).
    pub fn stage(&self) -> &'static str {
        match self {
            ResourceError::Precision(_) | ResourceError::CropMismatch { .. } | ResourceError::Unet(_) => "unet",
            ResourceError::Encoder(_) => "encoder",
            ResourceError::Template(_) => "template",
        }
    }
}

/// An avatar with everything its graphs need.
#[derive(Clone)]
pub struct AvatarResources {
    /// The validated avatar.
    pub avatar: Arc<Avatar>,
    /// Its models.
    pub models: AvatarModels,
    /// Its template.
    pub template: AvatarTemplate,
}

impl AvatarResources {
    /// Opens `avatar`'s models through `cache` (those already open for its files are shared),
    /// then its template under the plan `plan` makes from them: the template comes last so that
    /// its memory is sized to what the models left.
    pub fn open(
        rt: &OrtRuntime,
        cache: &ModelCache,
        avatar: Avatar,
        settings: &ModelSettings,
        plan: impl FnOnce(&AvatarModels) -> TemplatePlan,
    ) -> Result<Self, ResourceError> {
        let models = cache.open(rt, &avatar, settings)?;
        let template = open_template(&avatar, plan(&models))?;
        Ok(Self { avatar: Arc::new(avatar), models, template })
    }
}
