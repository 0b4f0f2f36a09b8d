//! What this binary's test modules share.

use std::path::PathBuf;

use lipsync_stages::onnx::OrtRuntime;

/// A file under the repository's `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

/// ONNX Runtime (the project venv's library).
pub fn runtime() -> OrtRuntime {
    OrtRuntime::load(None).expect("ONNX Runtime (run scripts/setup.sh)")
}
