#!/usr/bin/env bash
# Sets up the machine (idempotent) and runs every test: formatting, clippy, the Rust unit and
# integration tests (tiny models and committed fixtures), and the Python tests of the model
# generator and the reference.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$SECONDS
# Each stage's banner says when it began (seconds since the start), so a slow stage shows.
stage() { echo "== [$((SECONDS - START)) s] $*" >&2; }
stage "setup"
./scripts/setup.sh
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
stage "cargo fmt --check"
cargo fmt --all -- --check
# Clippy runs inside the builds: clippy-driver as the workspace's rustc wrapper lints each
# workspace crate as it compiles (what `cargo clippy ... -- -D warnings` does, through the same
# wrapper and arguments), so the dependencies are compiled once for the tests, not first checked
# for clippy and then built again.
linted() {
  RUSTC_WORKSPACE_WRAPPER="$(rustc --print sysroot)/bin/clippy-driver" \
    CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__" "$@"
}
stage "cargo test, linted by clippy as it builds"
linted cargo test --workspace --all-targets
# Only lipsync-stages has CUDA code: building it alone with the feature rebuilds only it and ort.
stage "lipsync-stages with --features cuda, linted (the CUDA backend builds without a GPU)"
linted cargo build -p lipsync-stages --all-targets --features cuda --quiet
stage "python tests"
.venv/bin/python -m unittest discover -s tests/python -v
stage "fuzzing (AFL++, 15 s per target; scripts/fuzz.sh 150 is the 10-minute run)"
./scripts/fuzz.sh 15
stage "done"
