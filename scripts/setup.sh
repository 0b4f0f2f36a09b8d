#!/usr/bin/env bash
# Idempotent setup for lipsync: system packages (apt) and a project-local Python venv (.venv).
# Safe to re-run: each step checks whether its work is already done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

APT_PKGS=(cmake nasm pkg-config libclang-dev clang libavcodec-dev libavformat-dev libavutil-dev
  libswscale-dev libswresample-dev libavdevice-dev libavfilter-dev ffmpeg espeak-ng libsoxr-dev)
PY_PKGS=(onnxruntime==1.31.1 onnx==1.19.1 numpy==2.2.6 librosa==0.10.2.post1 scipy==1.15.3
  soundfile==0.13.1 opencv-python-headless==4.14.0.94 scikit-image==0.25.2)

log() { printf '[setup] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "apt packages present"
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
STAMP=.venv/.lipsync-requirements
WANT="$(printf '%s\n' "${PY_PKGS[@]}")"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  log "installing Python packages into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check "${PY_PKGS[@]}"
  printf '%s' "$WANT" > "$STAMP"
else
  log "Python packages present"
fi

# AFL++ through cargo-afl (stable Rust) for scripts/fuzz.sh; its runtime is built on install.
if ! command -v cargo-afl >/dev/null 2>&1; then
  log "installing cargo-afl (AFL++ fuzzing)"
  cargo install cargo-afl --locked --quiet
else
  log "cargo-afl present"
fi

ORT_LIB="$(ls "$ROOT"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 2>/dev/null | head -n1 || true)"
if [ -z "$ORT_LIB" ]; then
  log "error: libonnxruntime.so.1.31.1 not found in .venv after install"
  exit 1
fi
log "ONNX Runtime library: $ORT_LIB"
