//! The composite stage: the UNet's output pasted back into the frame (docs/spec.md section 5).

use std::sync::Arc;

use lipsync_stages::face::{Blend, Compositor};
use lipsync_stages::io::avatar::Avatar;

use crate::graph::unet::UnetReply;
use crate::job::FrameJob;
use crate::runtime::{Out, Stage, StageError};

/// UNet reply in, composited frame out. A failed UNet run fails the graph here.
pub struct CompositeStage {
    comp: Compositor,
    avatar: Arc<Avatar>,
    blend: Blend,
}

impl CompositeStage {
    /// A stage for an avatar's boxes and crop geometry, with `blend`.
    pub fn new(avatar: Arc<Avatar>, blend: Blend) -> Self {
        Self { comp: Compositor::new(), avatar, blend }
    }
}

impl Stage for CompositeStage {
    type In = UnetReply;
    type Out = FrameJob;

    fn process(&mut self, reply: UnetReply, out: &mut Out<'_, FrameJob>) -> Result<(), StageError> {
        let mut job = reply.map_err(|e| StageError::failed(Some(e.index), e))?;
        if job.skips_unet() {
            // An idle frame is the template frame as it is; a stale one is dropped by the sink.
            return out.send(job);
        }
        let b = job.local(self.avatar.boxes[job.template]);
        let FrameJob { frame, c328, pred, .. } = &mut job;
        self.comp.paste_u8(frame, b, &self.avatar.config.crop, c328, pred, self.blend);
        out.send(job)
    }
}
