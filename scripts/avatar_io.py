"""Reading and writing lipsync avatar directories from Python (see docs/avatar.md).

Shared by make_sample.py, reference.py and make_golden.py so the three agree on the format.
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


@dataclass
class Avatar:
    root: Path
    fps: float
    video: Path
    boxes: list[list[int]]
    unet: Path
    encoder: Path
    start_frame: int = 0
    jpeg_quality: int = 90
    io: dict = field(default_factory=dict)


DEFAULT_IO = {
    "unet_image_input": "input",
    "unet_audio_input": "audio",
    "unet_output": "output",
    "encoder_input": "mel_spectrogram",
    "encoder_output": "audio_features",
}


def write_avatar(root: Path, video: str, boxes: list[list[int]], unet: str, encoder: str,
                 fps: float = 25.0, start_frame: int = 0, jpeg_quality: int = 90) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "boxes.json").write_text(json.dumps(boxes) + "\n")
    toml = (
        "# lipsync avatar (docs/avatar.md)\n"
        f"fps = {fps:.1f}\n"
        f'video = "{video}"\n'
        'boxes = "boxes.json"\n'
        f"start_frame = {start_frame}\n"
        f"jpeg_quality = {jpeg_quality}\n\n"
        "[models]\n"
        f'unet = "{unet}"\n'
        f'encoder = "{encoder}"\n'
    )
    tmp = root / ".avatar.toml.tmp"
    tmp.write_text(toml)
    tmp.replace(root / "avatar.toml")


def load_avatar(root: Path) -> Avatar:
    root = Path(root)
    cfg = tomllib.loads((root / "avatar.toml").read_text())
    models = cfg.get("models", {})
    io = dict(DEFAULT_IO)
    io.update(models.get("io", {}))
    boxes = json.loads((root / cfg.get("boxes", "boxes.json")).read_text())
    return Avatar(
        root=root,
        fps=float(cfg.get("fps", 25.0)),
        video=root / cfg["video"],
        boxes=[[int(v) for v in b] for b in boxes],
        unet=root / models["unet"],
        encoder=root / models["encoder"],
        start_frame=int(cfg.get("start_frame", 0)),
        jpeg_quality=int(cfg.get("jpeg_quality", 90)),
        io=io,
    )


def frame_files(directory: Path) -> list[Path]:
    """Numbered frame files of a frames directory, in numeric order."""
    files = [p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: (int("".join(c for c in p.stem if c.isdigit()) or 0), p.name))


def probe_size(video: Path) -> tuple[int, int]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
         "stream=width,height", "-of", "csv=p=0", str(video)],
        check=True, capture_output=True, text=True).stdout.strip()
    w, h = out.split(",")[:2]
    return int(w), int(h)


def read_frames(video: Path) -> list[np.ndarray]:
    """All template frames as BGR u8 arrays.

    Video files are decoded by the system FFmpeg (the same libraries the Rust decoder links),
    so pixels are identical to lipsync's; OpenCV's bundled FFmpeg rounds YUV->BGR differently.
    """
    import cv2

    video = Path(video)
    if video.is_dir():
        return [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in frame_files(video)]
    w, h = probe_size(video)
    raw = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(video), "-map", "0:v:0",
         "-f", "rawvideo", "-pix_fmt", "bgr24", "-"],
        check=True, capture_output=True).stdout
    n = len(raw) // (w * h * 3)
    arr = np.frombuffer(raw, np.uint8)[: n * w * h * 3].reshape(n, h, w, 3)
    return [arr[i] for i in range(n)]


def ping_pong(i: int, n: int, start: int = 0) -> int:
    """Template frame index for output frame i (docs/spec.md section 6), start offset wrapping."""
    if n <= 1:
        return 0
    period = 2 * (n - 1)
    j = (i + 1) % period
    p = j if j <= n - 1 else period - j
    return (p + start) % n


def relpath(target: Path, start: Path) -> str:
    return os.path.relpath(target, start)
