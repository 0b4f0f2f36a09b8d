#!/usr/bin/env python3
"""Races lipsync's per-frame image work against the Python reference's OpenCV path, in one run,
on the same avatar: video decode, prep (crop, 328 bicubic, inner 320, mask, 6-channel f32
tensor), paste-back (u8 truncation, bicubic back to the box, paste) and JPEG encode (q90).
OpenCV runs single-threaded (cv2.setNumThreads(1)); medians per frame; ratios printed.

    .venv/bin/python scripts/compare_image.py [--avatar sample/avatar-full] [--frames 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import reference as ref  # noqa: E402
from avatar_io import load_avatar, ping_pong  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--avatar", type=Path, default=ROOT / "sample" / "avatar-full")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "lipsync")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    av = load_avatar(args.avatar)

    cap = cv2.VideoCapture(str(av.video))
    decode, frames = [], []
    for _ in range(args.frames):
        t = time.perf_counter()
        ok, f = cap.read()
        if not ok:
            break
        decode.append(time.perf_counter() - t)
        frames.append(f)
    n = len(frames)
    out = np.full((3, 320, 320), 0.5, np.float32)
    prep_t, paste_t, jpeg_t = [], [], []
    for i in range(args.frames):
        ti = ping_pong(i, n, av.start_frame)
        frame, box = frames[ti], av.boxes[ti]
        t = time.perf_counter()
        tensor, c328 = ref.prep(frame, box)
        prep_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        result, _ = ref.paste(frame, box, c328, out)
        paste_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        ok, _ = cv2.imencode(".jpg", result, [cv2.IMWRITE_JPEG_QUALITY, 90])
        jpeg_t.append(time.perf_counter() - t)
    py = {"decode_s": statistics.median(decode), "prep_s": statistics.median(prep_t),
          "paste_s": statistics.median(paste_t), "jpeg_s": statistics.median(jpeg_t)}
    rs = json.loads(subprocess.run([str(args.bin), "-q", "bench", "image", "--avatar", str(args.avatar),
                                    "--frames", str(args.frames)], check=True, capture_output=True,
                                   text=True).stdout)
    print(f"avatar {args.avatar}: {rs['frame']} frames, box {rs['box']}; medians per frame over "
          f"{args.frames} frames; one thread each")
    print(f"{'stage':<16} {'python ms':>10} {'lipsync ms':>11} {'speed-up':>9}")
    for key in ("decode_s", "prep_s", "paste_s", "jpeg_s"):
        print(f"{key[:-2]:<16} {py[key] * 1e3:>10.3f} {rs[key] * 1e3:>11.3f} {py[key] / rs[key]:>8.2f}x")
    steady_py = py["prep_s"] + py["paste_s"] + py["jpeg_s"] + py["decode_s"]
    steady_rs = rs["template_fetch_s"] + rs["prep_s"] + rs["paste_s"] + rs["jpeg_s"]
    print(f"{'per frame total':<16} {steady_py * 1e3:>10.3f} {steady_rs * 1e3:>11.3f} {steady_py / steady_rs:>8.2f}x"
          "   (python decodes each frame; lipsync fetches it from the decoded template cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
