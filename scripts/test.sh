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
stage "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
# Only lipsync-stages has CUDA code: checking it alone does not rebuild the crates above it.
stage "cargo clippy -p lipsync-stages --features cuda (the CUDA backend builds without a GPU)"
cargo clippy -p lipsync-stages --all-targets --features cuda --quiet -- -D warnings
stage "cargo test"
cargo test --workspace --all-targets
stage "python tests"
.venv/bin/python -m unittest discover -s tests/python -v
stage "fuzzing (AFL++, 15 s per target; scripts/fuzz.sh 150 is the 10-minute run)"
./scripts/fuzz.sh 15
stage "done"
