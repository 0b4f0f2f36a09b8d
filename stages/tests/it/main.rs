//! lipsync-stages' integration tests, one binary with a module per behaviour: the audio path
//! (mel, windows, features, against librosa), decoding, the audio encoder, the image path.

mod common;

mod audio_path;
mod decode;
mod encoder;
mod image_path;
