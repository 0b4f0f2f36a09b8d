#!/usr/bin/env bash
# Sets up the machine (idempotent) and runs every test: formatting, clippy, the Rust unit and
# integration tests (tiny models and committed fixtures), and the Python tests of the model
# generator and the reference.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./scripts/setup.sh
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo clippy --features cuda (the CUDA backend builds without a GPU)" >&2
cargo clippy --workspace --all-targets --features cuda --quiet -- -D warnings
echo "== cargo test" >&2
cargo test --workspace --all-targets
echo "== python tests" >&2
.venv/bin/python -m unittest discover -s tests/python -v
echo "== fuzzing (AFL++, 15 s per target; scripts/fuzz.sh 150 is the 10-minute run)" >&2
./scripts/fuzz.sh 15
