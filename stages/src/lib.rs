//! Compute stages of the lipsync pipeline as plain structs, with no threads or channels.
//!
//! Each module is one stage's compute (or a type shared between stages) and is testable on its
//! own; file formats and I/O live in [`io`]:
//!
//! - [`audio`]: decoding audio files and raw PCM to mono 16 kHz f32, resampling.
//! - [`mel`]: the exact mel spectrogram, whole-signal or incremental.
//! - [`features`]: audio windows, the batched encoder, per-frame audio tensors.
//! - [`template`]: template frames decoded within a memory budget.
//! - [`face`], [`resize`]: the UNet's input and paste-back.
//! - [`unet`]: the UNet session and the [`unet::Batch`] size.
//! - [`jpeg`], [`image_io`], [`encode`]: JPEG (whole frames, or spliced from a template frame's),
//!   PNG and H.264 encoding.
//! - [`onnx`]: finding and loading ONNX Runtime, opening models, checking their signatures.
//! - [`io`]: the avatar format, SyncTalk_2D import, `.npy`, staged outputs, video probing.

pub mod audio;
pub mod crop;
pub mod face;
pub mod features;
pub mod frame;
pub mod image_io;
pub mod io;
pub mod jpeg;
pub mod mel;
pub mod onnx;
pub mod quantize;
pub mod resize;
pub mod template;
pub mod unet;
pub mod video_writer;

/// The text of a caught panic (its `&str` or `String` payload).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
