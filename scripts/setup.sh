#!/usr/bin/env bash
# Idempotent setup for lipsync: system packages (apt) and a project-local Python venv (.venv).
# Safe to re-run: each step checks whether its work is already done.
#
#   scripts/setup.sh          everything the build, the tests and the sample need (CPU)
#   scripts/setup.sh --demo   only what the build and the demo need (scripts/demo.sh): no
#                             chromium, Playwright, MLServer, librosa or cargo-afl
#   scripts/setup.sh --cuda   also .venv-cuda: ONNX Runtime's CUDA build (onnxruntime-gpu, CUDA 13
#                             and cuDNN 9 from PyPI, about 3 GB) for `--provider cuda` with a
#                             binary built with `--features cuda` (scripts/gpu_check.sh uses it)
set -euo pipefail
CUDA=0
DEMO=0
[ "${1:-}" = "--cuda" ] && CUDA=1
[ "${1:-}" = "--demo" ] && DEMO=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The build (FFmpeg, libsoxr, protoc, clang for bindings) and the sample (espeak-ng, ffmpeg).
APT_DEMO=(cmake nasm pkg-config libclang-dev clang libavcodec-dev libavformat-dev libavutil-dev
  libswscale-dev libswresample-dev libavdevice-dev libavfilter-dev ffmpeg espeak-ng libsoxr-dev
  protobuf-compiler)
# The sample's generators (scripts/make_sample.py, make_models.py) and ONNX Runtime's library.
PY_DEMO=(onnxruntime==1.31.1 onnx==1.19.1 numpy==2.2.6 scipy==1.15.3 opencv-python-headless==4.14.0.94
  scikit-image==0.25.2)
# The tests besides: the browser (chromium, Playwright), the reference (librosa, soundfile),
# the remote-inference server (MLServer).
APT_PKGS=("${APT_DEMO[@]}" chromium)
PY_PKGS=("${PY_DEMO[@]}" librosa==0.10.2.post1 soundfile==0.13.1 mlserver==1.7.1 playwright==1.57.0
  greenlet==3.2.4)
if [ "$DEMO" = 1 ]; then
  APT_PKGS=("${APT_DEMO[@]}")
fi

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
# One stamp per set: the full set's stamp also satisfies the demo.
STAMP=.venv/.lipsync-requirements
WANT="$(printf '%s\n' "${PY_PKGS[@]}")"
DEMO_STAMP=.venv/.lipsync-demo-requirements
DEMO_WANT="$(printf '%s\n' "${PY_DEMO[@]}")"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  log "Python packages present"
elif [ "$DEMO" = 1 ] && [ -f "$DEMO_STAMP" ] && [ "$(cat "$DEMO_STAMP")" = "$DEMO_WANT" ]; then
  log "Python packages for the demo present"
else
  pkgs=("${PY_PKGS[@]}")
  [ "$DEMO" = 1 ] && pkgs=("${PY_DEMO[@]}")
  log "installing Python packages into .venv: ${pkgs[*]}"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check "${pkgs[@]}"
  if [ "$DEMO" = 1 ]; then
    printf '%s' "$DEMO_WANT" > "$DEMO_STAMP"
  else
    printf '%s' "$WANT" > "$STAMP"
    printf '%s' "$DEMO_WANT" > "$DEMO_STAMP"
  fi
fi

# AFL++ through cargo-afl (stable Rust) for scripts/fuzz.sh; its runtime is built on install.
if [ "$DEMO" = 1 ]; then
  :
elif ! command -v cargo-afl >/dev/null 2>&1; then
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

if [ "$CUDA" = 1 ]; then
  # A separate venv: onnxruntime and onnxruntime-gpu install the same Python package.
  CUDA_PKGS=("onnxruntime-gpu[cuda,cudnn]==1.31.1" "nvidia-cublas~=13.0")
  if [ ! -x .venv-cuda/bin/python ]; then
    log "creating .venv-cuda"
    "$PY" -m venv .venv-cuda
  fi
  CSTAMP=.venv-cuda/.lipsync-requirements
  CWANT="$(printf '%s\n' "${CUDA_PKGS[@]}")"
  if [ ! -f "$CSTAMP" ] || [ "$(cat "$CSTAMP")" != "$CWANT" ]; then
    log "installing ONNX Runtime for CUDA into .venv-cuda"
    .venv-cuda/bin/python -m pip install -q --disable-pip-version-check "${CUDA_PKGS[@]}"
    printf '%s' "$CWANT" > "$CSTAMP"
  else
    log "ONNX Runtime for CUDA present"
  fi
  log "CUDA ONNX Runtime: $(ls "$ROOT"/.venv-cuda/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1)"
fi
