#!/usr/bin/env bash
# One command on a fresh machine: set up, build, make the bundled sample (speech, template
# video, boxes, full-size and tiny models) and run the main job on it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./scripts/setup.sh
echo "== building lipsync (release)" >&2
cargo build --release --quiet
./scripts/make_sample.sh
BIN="$ROOT/target/release/lipsync"
echo "== lipsync doctor" >&2
"$BIN" doctor --model models/full/unet.onnx --model models/full/audio_encoder.onnx
echo "== lipsync avatar check sample/avatar-full" >&2
"$BIN" avatar check sample/avatar-full
mkdir -p out
if "$BIN" --help | grep -q '^  render'; then
  echo "== lipsync render" >&2
  "$BIN" render --avatar sample/avatar-full --audio sample/speech_16k.wav -o out/demo.mp4
  echo "wrote out/demo.mp4" >&2
elif "$BIN" --help | grep -q '^  features'; then
  echo "== the render pipeline does not exist yet: running the furthest stage that works (audio features)" >&2
  "$BIN" mel sample/speech_44k_stereo.wav -o out/mel.npy
  "$BIN" features sample/speech_44k_stereo.wav --encoder models/full/audio_encoder.onnx -o out/features.npy
  echo "wrote out/mel.npy and out/features.npy" >&2
else
  echo "== the render pipeline does not exist yet: the furthest stage that works is avatar validation (above);" >&2
  echo "   the Python reference renders the sample for comparison:" >&2
  .venv/bin/python scripts/reference.py --avatar sample/avatar-full --audio sample/speech_16k.wav \
    -o out/reference --max-frames 50
  echo "wrote out/reference/*.png" >&2
fi
