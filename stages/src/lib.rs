//! Compute stages of the lipsync pipeline as plain structs, with no threads or channels.
//!
//! Each module is one stage (or a type shared between stages) and is testable on its own:
//!
//! - [`audio`]: decoding audio files and raw PCM to mono 16 kHz f32.
//! - [`mel`]: the exact mel spectrogram, whole-signal or incremental.
//! - [`features`]: audio windows, the batched encoder, per-frame audio tensors.
//! - [`onnx`]: finding and loading ONNX Runtime, opening models, checking their signatures.
//! - [`video`]: probing template videos and frame directories.
//! - [`avatar`]: the avatar directory format (template, boxes, models), loaded and validated.
//! - [`synctalk`]: converting SyncTalk_2D dataset directories (frames + landmarks).
//! - [`npy`]: reading and writing `.npy` arrays (numpy interchange).
//! - [`staged`]: outputs written whole or not at all (temporary sibling, then rename).

pub mod audio;
pub mod avatar;
pub mod encode;
pub mod face;
pub mod features;
pub mod frame;
pub mod image_io;
pub mod mel;
pub mod npy;
pub mod onnx;
pub mod resize;
pub mod staged;
pub mod synctalk;
pub mod template;
pub mod unet;
pub mod video;
