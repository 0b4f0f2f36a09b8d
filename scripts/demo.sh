#!/usr/bin/env bash
# One command on a fresh machine: set up, build, make the bundled sample (speech, template
# video, boxes, full-size and tiny models) and run the main job on it: render the sample avatar
# speaking the sample speech to out/demo.mp4, with a latency report.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./scripts/setup.sh --demo
echo "== building lipsync (release)" >&2
cargo build --release --quiet
./scripts/make_sample.sh
BIN="$ROOT/target/release/lipsync"
echo "== lipsync doctor" >&2
"$BIN" doctor --avatar sample/avatar-full
mkdir -p out
echo "== lipsync render (full-size model)" >&2
"$BIN" render --avatar sample/avatar-full --audio sample/speech_44k_stereo.wav -o out/demo.mp4 \
  --report out/demo-report.json --report-svg out/demo-report.svg
echo "wrote out/demo.mp4 (and out/demo-report.json, out/demo-report.svg)" >&2
