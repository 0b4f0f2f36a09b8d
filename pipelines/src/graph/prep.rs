//! The prep stage: the UNet's image input from the template frame (docs/spec.md sections 3
//! and 4), written into the job's own buffer.

use std::sync::Arc;

use lipsync_stages::face::FacePrep;
use lipsync_stages::io::avatar::Avatar;

use crate::job::FrameJob;
use crate::runtime::{Out, Stage, StageError};

/// Job in, job with its UNet input out.
pub struct PrepStage {
    prep: FacePrep,
    avatar: Arc<Avatar>,
}

impl PrepStage {
    /// A stage for an avatar's boxes and crop geometry.
    pub fn new(avatar: Arc<Avatar>) -> Self {
        Self { prep: FacePrep::new(), avatar }
    }
}

impl Stage for PrepStage {
    type In = FrameJob;
    type Out = FrameJob;

    fn process(&mut self, mut job: FrameJob, out: &mut Out<'_, FrameJob>) -> Result<(), StageError> {
        if job.skips_unet() {
            return out.send(job);
        }
        let b = job.local(self.avatar.boxes[job.template]);
        self.prep.crop(&job.frame, b, &self.avatar.config.crop, &mut job.c328);
        out.send(job)
    }
}
