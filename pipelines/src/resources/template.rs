//! An avatar's template, opened once: its frames (decoded under a budget) and, for JPEG output,
//! its [`JpegTemplate`] made in the same decode.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lipsync_stages::frame::BgrFrame;
use lipsync_stages::image_io::ImageError;
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::io::video::VideoError;
use lipsync_stages::template::{JpegTemplate, JpegTemplateBuilder, SharedTemplate, VisitError};

/// Why a template could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TemplateOpenError {
    /// The video or frames directory could not be read.
    #[error(transparent)]
    Video(#[from] VideoError),
    /// The JPEG frames could not be made.
    #[error("making the template's JPEG frames: {0}")]
    Jpeg(#[source] ImageError),
    /// The thread that makes the JPEG frames could not start.
    #[error("could not start a thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The thread that makes the JPEG frames panicked.
    #[error("the JPEG frames builder panicked")]
    Panicked,
    /// Fewer frames than the avatar has boxes.
    #[error("the template has {frames} frames but the avatar has {boxes} boxes")]
    TooShort {
        /// Frames the template holds.
        frames: usize,
        /// Boxes the avatar has.
        boxes: usize,
    },
}

/// What the decode's visitor reports when the JPEG frames builder has stopped (with an error of
/// its own, which [`open_with_jpeg`] reports instead).
#[derive(Debug, thiserror::Error)]
#[error("the JPEG frames builder stopped")]
struct BuilderStopped;

/// What [`open_template`] is to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplatePlan {
    /// Bytes of decoded frames the template keeps while it opens (a frames directory holds
    /// raw frames up to it, the rest compressed).
    pub budget: usize,
    /// For JPEG output: its quality, and the bytes its [`JpegTemplate`] may take (over them,
    /// frames are decoded as they are needed instead).
    pub jpeg: Option<(u8, usize)>,
}

/// An opened template, shared read-only (by a daemon's sessions).
#[derive(Clone)]
pub struct AvatarTemplate {
    /// The template.
    pub template: Arc<SharedTemplate>,
    /// Its frames ready for compositing in the JPEG domain, when planned and they fit.
    pub jpeg: Option<Arc<JpegTemplate>>,
}

impl AvatarTemplate {
    /// Bytes the template and its JPEG frames hold.
    pub fn memory_bytes(&self) -> usize {
        self.template.memory_bytes() + self.jpeg.as_ref().map_or(0, |j| j.memory_bytes())
    }
}

/// Opens the avatar's template under `plan`. The JPEG frames are made on a second thread while
/// the next frame decodes.
pub fn open_template(avatar: &Avatar, plan: TemplatePlan) -> Result<AvatarTemplate, TemplateOpenError> {
    let (template, jpeg) = match plan.jpeg {
        None => (SharedTemplate::open(&avatar.video, plan.budget)?, None),
        Some((quality, limit)) => open_with_jpeg(avatar, plan.budget, quality, limit)?,
    };
    if template.len() < avatar.boxes.len() {
        return Err(TemplateOpenError::TooShort { frames: template.len(), boxes: avatar.boxes.len() });
    }
    Ok(AvatarTemplate { template: Arc::new(template), jpeg: jpeg.map(Arc::new) })
}

/// The decode with a [`JpegTemplateBuilder`] beside it.
fn open_with_jpeg(
    avatar: &Avatar,
    budget: usize,
    quality: u8,
    limit: usize,
) -> Result<(SharedTemplate, Option<JpegTemplate>), TemplateOpenError> {
    let mut builder = JpegTemplateBuilder::new(quality, &avatar.boxes, limit).map_err(TemplateOpenError::Jpeg)?;
    let boxes = avatar.boxes.len();
    // Set once the builder is over its limit: the decode then sends it nothing more.
    let over = &AtomicBool::new(false);
    // One frame goes to the builder and comes back: it is made into a JPEG while the decoder
    // makes the next frame in its own buffer (a second copy would cost 2.8 MB at 720p and
    // gain little: the copy is short).
    let (frames_tx, frames_rx) = crossbeam_channel::bounded::<(usize, BgrFrame)>(1);
    let (spare_tx, spare_rx) = crossbeam_channel::bounded::<BgrFrame>(1);
    spare_tx.send(BgrFrame::default()).expect("room for one");
    let (opened, built) = std::thread::scope(|s| {
        let worker = std::thread::Builder::new().name("ls-template".into()).spawn_scoped(s, move || {
            for (i, frame) in frames_rx {
                builder.push(i, &frame)?;
                over.store(builder.over_limit(), Ordering::Relaxed);
                let _ = spare_tx.send(frame);
            }
            Ok::<_, ImageError>(builder)
        });
        let worker = match worker {
            Ok(w) => w,
            Err(e) => return (Err(TemplateOpenError::Thread(e)), None),
        };
        let mut visit = |i: usize, f: &BgrFrame| -> Result<(), VisitError> {
            if i >= boxes || over.load(Ordering::Relaxed) {
                return Ok(());
            }
            // A closed channel means the builder stopped with an error, reported below.
            let mut buf = spare_rx.recv().map_err(|_| BuilderStopped)?;
            buf.copy_from(f);
            frames_tx.send((i, buf)).map_err(|_| BuilderStopped.into())
        };
        let opened = SharedTemplate::open_with(&avatar.video, budget, &mut visit).map_err(TemplateOpenError::from);
        drop(frames_tx);
        (opened, Some(worker.join()))
    });
    // The builder's own error explains a decode that stopped because it did.
    let builder = match built {
        Some(Ok(Ok(b))) => b,
        Some(Ok(Err(e))) => return Err(TemplateOpenError::Jpeg(e)),
        Some(Err(_)) => return Err(TemplateOpenError::Panicked),
        None => return opened.map(|t| (t, None)),
    };
    let template = opened?;
    if builder.over_limit() {
        tracing::info!("the template's JPEG frames would not fit in memory: decoding frames as needed");
    }
    Ok((template, builder.finish()))
}
