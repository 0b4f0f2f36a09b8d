//! File formats and I/O, apart from the compute:
//!
//! - [`avatar`]: the avatar directory format (template, boxes, models), loaded and validated.
//! - [`synctalk`]: converting SyncTalk_2D dataset directories (frames + landmarks).
//! - [`npy`]: reading and writing `.npy` arrays (numpy interchange).
//! - [`staged`]: outputs written whole or not at all (temporary sibling, then rename).
//! - [`video`]: probing and opening template videos and frame directories.

pub mod avatar;
pub mod npy;
pub mod staged;
pub mod synctalk;
pub mod video;
