#!/usr/bin/env bash
# The GPU path end to end, on a machine with an NVIDIA GPU: sets up ONNX Runtime's CUDA build
# (scripts/setup.sh --cuda), builds lipsync with the `cuda` feature, checks that the CUDA
# execution provider starts, renders the sample with --provider cuda at batch 1, 8, 16 and 32
# and prints, per batch: render frames/s, UNet-only frames/s, CPU-side ms per frame (process
# CPU time less the UNet thread's, per frame) and the PSNR of the CUDA frames against CPU
# frames of the same render. About 5 minutes after the first setup.
#
#   scripts/gpu_check.sh [--frames N]     (default 200 frames per render)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FRAMES=200
[ "${1:-}" = "--frames" ] && FRAMES="$2"
log() { printf '[gpu_check] %s\n' "$*" >&2; }

command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 \
  || { log "error: no NVIDIA GPU here (nvidia-smi finds none)"; exit 2; }
nvidia-smi -L >&2
bash scripts/setup.sh --cuda
[ -f sample/avatar-full/avatar.toml ] || ./scripts/make_sample.sh

SITE="$(ls -d "$ROOT"/.venv-cuda/lib/python3*/site-packages | head -n1)"
export LIPSYNC_ORT_LIB="$SITE/onnxruntime/capi/libonnxruntime.so.1.31.1"
# The CUDA, cuBLAS and cuDNN libraries from PyPI, for ONNX Runtime's CUDA provider library.
NV_LIBS="$(find "$SITE/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | paste -sd: -)"
export LD_LIBRARY_PATH="$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

log "building with --features cuda"
cargo build --release --features cuda --quiet
BIN=target/release/lipsync
$BIN doctor | grep -E "ONNX Runtime:|Execution providers|UNet backends" >&2
$BIN doctor | grep -q CUDAExecutionProvider || { log "error: this ONNX Runtime lists no CUDA provider"; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
AV=sample/avatar-full
AUDIO=sample/speech_16k.wav
run() { # name provider batch
  /usr/bin/time -f "%U %S" -o "$WORK/$1.time" $BIN -q render --avatar $AV --audio $AUDIO --max-frames "$FRAMES" \
    --format png --provider "$2" --batch "$3" --report "$WORK/$1.json" -o "$WORK/$1"
}
log "CPU reference render ($FRAMES frames)"
run cpu cpu 1
for b in 1 8 16 32; do
  log "CUDA render at batch $b"
  run "cuda$b" cuda "$b"
  grep -q '"provider": *"cuda"' "$WORK/cuda$b.json" \
    || { log "error: the CUDA provider did not start (the render fell back to the CPU)"; exit 1; }
done

.venv/bin/python - "$WORK" "$FRAMES" <<'PY'
import json, math, sys
from pathlib import Path
import cv2
import numpy as np

work, frames = Path(sys.argv[1]), int(sys.argv[2])
cpu = sorted((work / "cpu").glob("*.png"))

def psnr(run):
    se, n = 0.0, 0
    for a in cpu:
        x = cv2.imread(str(a)).astype(np.float64)
        y = cv2.imread(str(work / run / a.name)).astype(np.float64)
        se += float(((x - y) ** 2).sum()); n += x.size
    return math.inf if se == 0 else 10 * math.log10(255 ** 2 / (se / n))

print(f"{'batch':>5} {'render fps':>10} {'UNet-only fps':>13} {'CPU ms/frame':>12} {'PSNR vs CPU dB':>14}")
for b in [1, 8, 16, 32]:
    r = json.loads((work / f"cuda{b}.json").read_text())
    unet = next(s for s in r["stages"] if s["name"] == "unet")
    runs, mean_ms = unet["service_ms"]["count"], unet["service_ms"]["mean"]
    unet_fps = r["frames"] / (runs * mean_ms / 1e3)
    user, sys_ = map(float, (work / f"cuda{b}.time").read_text().split())
    cpu_ms = (user + sys_ - unet["cpu_seconds"]) / r["frames"] * 1e3
    print(f"{b:>5} {r['steady_frames_per_second']:>10.1f} {unet_fps:>13.1f} {cpu_ms:>12.2f} {psnr(f'cuda{b}'):>14.2f}")
PY
