//! The graph's stages, one file each (compute comes from `lipsync-stages`; these add the
//! per-item glue the runtime drives).

pub mod audio;
pub mod composite;
pub mod encode;
pub mod frames;
pub mod prep;
pub mod sink;
pub mod unet;
