#!/usr/bin/env bash
# Writes the bundled sample into sample/ (git-ignored): espeak-ng speech (16 kHz mono and a
# 44.1 kHz stereo copy), a 1280x720 25 fps H.264 template video made from a real face
# photograph (scikit-image's astronaut) with a slow pan/zoom, per-frame crop boxes from
# OpenCV's Haar face detector, and two avatars (full-size and tiny models).
# Needs scripts/setup.sh to have run. Idempotent: skips work whose outputs exist (use --force).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${SAMPLE_DIR:-$ROOT/sample}"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || { echo "make_sample: .venv missing; run scripts/setup.sh first" >&2; exit 1; }
mkdir -p "$OUT"

if [ "$FORCE" = 1 ] || [ ! -f "$OUT/speech_16k.wav" ]; then
  TEXT="Hello, and welcome to lip sync. This sample speech was made on this machine with a \
speech synthesizer. The quick brown fox jumps over the lazy dog. We turn audio into a talking \
face in real time, one frame every forty milliseconds."
  espeak-ng -v en-us -s 150 -w "$OUT/.espeak.wav" "$TEXT"
  ffmpeg -nostdin -loglevel error -y -i "$OUT/.espeak.wav" -ac 1 -ar 16000 -c:a pcm_s16le "$OUT/.speech_16k.wav"
  ffmpeg -nostdin -loglevel error -y -i "$OUT/.espeak.wav" -ac 2 -ar 44100 -c:a pcm_s16le "$OUT/.speech_44k_stereo.wav"
  mv "$OUT/.speech_44k_stereo.wav" "$OUT/speech_44k_stereo.wav"
  mv "$OUT/.speech_16k.wav" "$OUT/speech_16k.wav"
  rm -f "$OUT/.espeak.wav"
fi

# Models are remade when the generator changed since they were made (its hash is stamped).
GEN="$(sha256sum scripts/make_models.py | cut -d' ' -f1)"
for size in full tiny; do
  if [ "$FORCE" = 1 ] || [ ! -f "$ROOT/models/$size/unet.onnx" ] || [ ! -f "$ROOT/models/$size/audio_encoder.onnx" ] \
     || [ "$(cat "$ROOT/models/$size/.generator" 2>/dev/null)" != "$GEN" ]; then
    flag=""; [ "$size" = tiny ] && flag="--tiny"
    "$PY" scripts/make_models.py $flag --out "$ROOT/models/$size"
    printf '%s' "$GEN" > "$ROOT/models/$size/.generator"
  fi
done

if [ "$FORCE" = 1 ] || [ ! -f "$OUT/avatar-full/avatar.toml" ] || [ ! -f "$OUT/avatar-tiny/avatar.toml" ]; then
  "$PY" scripts/make_sample.py --out "$OUT" --models "$ROOT/models"
fi
echo "sample ready in $OUT" >&2
