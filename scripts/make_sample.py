#!/usr/bin/env python3
"""Makes the sample template video, its crop boxes and the sample avatars (see make_sample.sh).

The template is 1280x720, 25 fps, H.264, made from a real face photograph (scikit-image's
``astronaut``) with a slow pan and zoom so consecutive frames differ. Crop boxes come from
OpenCV's Haar frontal-face detector run on every decoded frame, smoothed over time and turned
into the SyncTalk-style square mouth box (top near the nose, side length = face width).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from avatar_io import read_frames, relpath, write_avatar  # noqa: E402

W, H, FPS = 1280, 720, 25


def render_template(path: Path, seconds: float) -> None:
    src = np.ascontiguousarray(data.astronaut()[:, :, ::-1])  # RGB -> BGR
    face_cx, face_cy = 224.0, 125.0  # centre of the face in the 512x512 photograph
    n = int(round(seconds * FPS))
    tmp = path.with_name("." + path.name)
    enc = subprocess.Popen(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24",
         "-s", f"{W}x{H}", "-r", str(FPS), "-i", "-", "-c:v", "libx264", "-preset", "medium",
         "-crf", "18", "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-f", "mp4", str(tmp)],
        stdin=subprocess.PIPE)
    for k in range(n):
        t = k / FPS
        scale = 2.6 + 0.25 * math.sin(2 * math.pi * t / seconds)  # slow zoom
        cx = face_cx + 18 * math.sin(2 * math.pi * t / (seconds * 0.75))  # slow pan
        cy = face_cy + 6 * math.cos(2 * math.pi * t / seconds)
        m = np.array([[scale, 0, W / 2 - scale * cx], [0, scale, H / 2 - scale * cy]], np.float64)
        frame = cv2.warpAffine(src, m, (W, H), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        enc.stdin.write(frame.tobytes())
    enc.stdin.close()
    if enc.wait() != 0:
        raise SystemExit("ffmpeg failed to encode the template")
    tmp.replace(path)


def detect_boxes(frames: list[np.ndarray]) -> list[list[int]]:
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise SystemExit("OpenCV Haar cascade not found (opencv-python-headless 4.x ships it)")
    rects = []
    last = None
    for f in frames:
        gray = cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)
        found, _, weights = cascade.detectMultiScale3(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(120, 120), outputRejectLevels=True)
        if len(found):
            # the most confident detection: the photograph also has face-like false positives
            last = found[int(np.argmax(np.ravel(weights)))].astype(np.float64)
        rects.append(last)
    if all(r is None for r in rects):
        raise SystemExit("no face detected in the template")
    first = next(r for r in rects if r is not None)
    rects = [first if r is None else r for r in rects]
    arr = np.array(rects)
    # centred moving average over 5 frames to remove detector jitter
    k = 2
    smooth = np.array([arr[max(0, i - k): i + k + 1].mean(axis=0) for i in range(len(arr))])
    h, w = frames[0].shape[:2]
    boxes = []
    for x, y, fw, fh in smooth:
        x1 = int(x + 0.08 * fw)
        x2 = int(x + 0.92 * fw)
        y1 = int(y + 0.42 * fh)
        side = x2 - x1
        y2 = y1 + side
        x1, x2 = max(0, x1), min(w, x2)
        y1, y2 = max(0, y1), min(h, y2)
        boxes.append([x1, y1, x2, y2])
    return boxes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", type=Path, required=True, help="directory with full/ and tiny/")
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    template = args.out / "template.mp4"
    if not template.exists():
        render_template(template, args.seconds)
    frames = read_frames(template)
    boxes = detect_boxes(frames)
    for size in ("full", "tiny"):
        root = args.out / f"avatar-{size}"
        root.mkdir(parents=True, exist_ok=True)
        write_avatar(root, relpath(template, root), boxes,
                     relpath(args.models / size / "unet.onnx", root),
                     relpath(args.models / size / "audio_encoder.onnx", root))
    print(f"template {template}: {len(frames)} frames {frames[0].shape[1]}x{frames[0].shape[0]}; "
          f"box[0] {boxes[0]}; avatars in {args.out}/avatar-{{full,tiny}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
