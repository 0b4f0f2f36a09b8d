#!/usr/bin/env python3
"""Renders the same avatar + audio with the Python reference and with ``lipsync render`` in one
run, prints both frames/s and the speed-up, and checks parity frame by frame (raw PNG output):
identical outside the crop box, PSNR inside it.

    .venv/bin/python scripts/compare_render.py [--avatar sample/avatar-full] [--frames 100]

Both use ONNX Runtime on the CPU with the same intra-op thread count; the reference runs the
UNet at batch 1 as SyncTalk_2D does, lipsync at --batch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from avatar_io import load_avatar, ping_pong  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--avatar", type=Path, default=ROOT / "sample" / "avatar-full")
    ap.add_argument("--audio", type=Path, default=ROOT / "sample" / "speech_16k.wav")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "lipsync")
    args = ap.parse_args()
    av = load_avatar(args.avatar)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "scripts" / "reference.py"), "--avatar", str(args.avatar),
                        "--audio", str(args.audio), "-o", str(tmp / "ref"), "--max-frames", str(args.frames),
                        "--threads", str(args.threads), "--timings", str(tmp / "ref.json")],
                       check=True, capture_output=True)
        py_wall = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([str(args.bin), "-q", "render", "--avatar", str(args.avatar), "--audio", str(args.audio),
                        "-o", str(tmp / "ours"), "--format", "png", "--max-frames", str(args.frames),
                        "--threads", str(args.threads), "--batch", str(args.batch),
                        "--report", str(tmp / "ours.json")], check=True)
        rs_wall = time.perf_counter() - t
        ref_t = json.loads((tmp / "ref.json").read_text())
        ours = json.loads((tmp / "ours.json").read_text())
        psnrs, outside = [], 0
        n_template = len(av.boxes)
        for i in range(args.frames):
            a = cv2.imread(str(tmp / "ours" / f"{i:06d}.png")).astype(np.int32)
            b = cv2.imread(str(tmp / "ref" / f"{i:06d}.png")).astype(np.int32)
            x1, y1, x2, y2 = av.boxes[ping_pong(i, n_template, av.start_frame)]
            mask = np.zeros(a.shape[:2], bool)
            mask[y1:y2, x1:x2] = True
            outside += int((a[~mask] != b[~mask]).sum())
            mse = float(((a[mask] - b[mask]) ** 2).mean())
            psnrs.append(float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse))
    py_fps = args.frames / py_wall
    rs_fps = args.frames / rs_wall
    print(f"{args.frames} frames of {args.avatar.name}, {args.threads} ORT threads")
    print(f"python reference: {py_wall:.2f} s wall ({py_fps:.2f} frames/s end to end, process start included)")
    print(f"lipsync render:   {rs_wall:.2f} s wall ({rs_fps:.2f} frames/s end to end, process start included; "
          f"{ours['steady_frames_per_second']:.2f} steady, batch {args.batch})")
    print(f"speed-up: {rs_fps / py_fps:.2f}x end to end")
    print(f"parity: values differing outside the boxes: {outside}; PSNR inside the boxes: "
          f"min {min(psnrs):.1f} dB, median {float(np.median(psnrs)):.1f} dB")
    return 0 if outside == 0 and min(psnrs) >= 45 else 1


if __name__ == "__main__":
    sys.exit(main())
