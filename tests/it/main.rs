//! The `lipsync` binary's integration tests, one binary (one link of FFmpeg, ONNX Runtime,
//! tonic and axum) with a module per behaviour: the CLI's foundation and the house's rules,
//! audio commands, rendering and its hardening, quantizing, the remote backend, the daemon
//! (`serve`: sessions, hostile clients, lifecycle, administration, the HTTP side) and the
//! fuzzers' corpus replayed.

mod common;

mod audio_cli;
mod foundation;
mod fuzz_corpus;
mod quantize_cli;
mod remote_cli;
mod render_cli;
mod render_hardening;
mod serve;
