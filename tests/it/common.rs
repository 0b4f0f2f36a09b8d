//! Helpers shared by the CLI integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/fixtures/...`.
pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// Runs the `lipsync` binary with `args`.
pub fn lipsync(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lipsync")).args(args).output().expect("run lipsync")
}

/// stdout + stderr as one string.
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Asserts success and returns the output text.
pub fn ok(args: &[&str]) -> String {
    let out = lipsync(args);
    let t = text(&out);
    assert!(out.status.success(), "lipsync {args:?} failed:\n{t}");
    t
}

/// Asserts failure (non-zero exit, no panic) and returns the output text.
pub fn fails(args: &[&str]) -> String {
    let out = lipsync(args);
    let t = text(&out);
    assert!(!out.status.success(), "lipsync {args:?} should have failed:\n{t}");
    assert!(!t.contains("panicked"), "lipsync {args:?} panicked:\n{t}");
    t
}

/// Path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
