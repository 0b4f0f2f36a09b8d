#!/usr/bin/env python3
"""Regenerates the committed test fixtures under tests/fixtures/ (run after make_sample.sh).

* ``models/``: the tiny UNet and audio encoder (make_models.py --tiny, fixed seed).
* ``golden/``: a small avatar (5 template frames of the sample, downscaled to 640x360, as PNG,
  so decoding is lossless), 2 s of the sample speech, and what scripts/reference.py makes of
  them: ``ref/mel.npy``, ``ref/features.npy`` and, for frames 0, 7 and the last,
  ``crop328_*.png``, ``pred_*.png`` and the finished ``frame_*.png``; ``ref/meta.json`` lists
  the counts. ``cargo test`` checks parity against these without Python.
* ``synctalk/``: a 3-frame SyncTalk_2D dataset (JPEG frames + 110-point .lms landmarks).
* ``seed-mel/``: the mel reference data of the original Python implementation (copied from
  ../shared/fixtures/seed-mel when present; kept otherwise).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from avatar_io import load_avatar, read_frames, write_avatar  # noqa: E402

FIX = ROOT / "tests" / "fixtures"
PY = sys.executable
DUMP_FRAMES = "0,7,last"


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


def make_audio_fixtures(speech: Path, golden_wav: Path) -> None:
    """Small clips in each supported container/codec, plus broken inputs."""
    out = FIX / "audio"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    clip = ["-ss", "0.5", "-t", "0.6", "-i", str(speech)]
    ffmpeg(*clip, "-ac", "1", "-ar", "16000", "-c:a", "pcm_s16le", str(out / "clip.wav"))
    ffmpeg("-i", str(out / "clip.wav"), "-c:a", "flac", str(out / "clip.flac"))
    ffmpeg("-i", str(out / "clip.wav"), "-ac", "2", "-ar", "44100", "-c:a", "libmp3lame", "-b:a", "64k",
           str(out / "clip.mp3"))
    ffmpeg("-i", str(out / "clip.wav"), "-ar", "22050", "-c:a", "aac", "-b:a", "48k", str(out / "clip.m4a"))
    ffmpeg("-i", str(out / "clip.wav"), "-ac", "2", "-ar", "48000", "-c:a", "libvorbis", str(out / "clip.ogg"))
    ffmpeg("-i", str(out / "clip.wav"), "-ac", "2", "-ar", "44100", "-c:a", "pcm_s16le",
           str(out / "clip_44k_stereo.wav"))
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=64x48:r=25:d=0.6", "-i", str(out / "clip.wav"),
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(out / "clip_av.mp4"))
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=64x48:r=25:d=0.4", "-c:v", "libx264", "-pix_fmt",
           "yuv420p", str(out / "video_only.mp4"))
    sf.write(str(out / "empty.wav"), np.zeros(0, np.int16), 16000, subtype="PCM_16")
    wav, _ = sf.read(str(golden_wav), dtype="int16")
    sf.write(str(out / "short_0.1s.wav"), wav[:1600], 16000, subtype="PCM_16")
    (out / "not_audio.wav").write_bytes(b"this is not audio at all" * 40)
    # garbage in the middle of the AAC data: the demuxer is fine, the decoder is not
    m4a = bytearray((out / "clip.m4a").read_bytes())
    mid = len(m4a) // 2
    m4a[mid:mid + 600] = bytes((i * 37) % 256 for i in range(600))
    (out / "corrupt.m4a").write_bytes(bytes(m4a))


def make_librosa_resample_fixtures() -> None:
    """What ``librosa.load(path, sr=16000)`` (libsoxr HQ) and the reference mel make of 44.1 kHz
    stereo and 48 kHz stereo speech: ``audio/librosa_mel_*.npy`` (T x 80 f32)."""
    import librosa
    from reference import melspectrogram

    out = FIX / "audio"
    ffmpeg("-i", str(out / "clip.wav"), "-ac", "2", "-ar", "48000", "-c:a", "pcm_s16le",
           str(out / "clip_48k_stereo.wav"))
    for name in ("clip_44k_stereo", "clip_48k_stereo"):
        y, _ = librosa.load(str(out / f"{name}.wav"), sr=16000)
        np.save(out / f"librosa_mel_{name}.npy", melspectrogram(y).astype(np.float32))


def make_video_fixtures(frames_dir: Path) -> None:
    """The golden template frames in several containers/codecs, the system FFmpeg's BGR
    decode of the H.264 one (what reference.py reads), and broken files."""
    out = FIX / "video"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    src = ["-framerate", "25", "-i", str(frames_dir / "%06d.png")]
    ffmpeg(*src, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "20", str(out / "h264.mp4"))
    ffmpeg(*src, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "20", str(out / "h264.mov"))
    ffmpeg(*src, "-c:v", "libvpx-vp9", "-b:v", "300k", "-pix_fmt", "yuv420p", str(out / "vp9.webm"))
    ffmpeg(*src, "-c:v", "mjpeg", "-q:v", "3", "-pix_fmt", "yuvj420p", str(out / "mjpeg.avi"))
    ffmpeg(*src, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "20", str(out / "h264.mkv"))
    ffmpeg("-framerate", "30", "-i", str(frames_dir / "%06d.png"), "-c:v", "libx264", "-pix_fmt", "yuv420p",
           str(out / "h264_30fps.mp4"))
    frames = read_frames(out / "h264.mp4")
    for i in (0, len(frames) - 1):
        cv2.imwrite(str(out / f"h264_decoded_{i}.png"), frames[i])
    data = (out / "h264.mkv").read_bytes()
    (out / "truncated.mkv").write_bytes(data[: len(data) * 2 // 3])
    raw = bytearray((out / "h264.mp4").read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 2000] = bytes((i * 91) % 256 for i in range(2000))
    (out / "corrupt.mp4").write_bytes(bytes(raw))


def make_resize_fixtures(frame: np.ndarray) -> None:
    """cv2.resize INTER_CUBIC on real and random content, up and down, odd sizes: the default
    (IPP-accelerated) path the reference uses, and OpenCV's generic algorithm."""
    out = FIX / "resize"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(11)
    cases = []
    real = frame[300:514, 530:744]  # a 214x214 face crop
    noise = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    for name, src in (("face", real), ("noise", noise)):
        cv2.imwrite(str(out / f"{name}.png"), src)
        for w, h in ((328, 328), (41, 29), (101, 77), (7, 5), (214, 214)):
            dst = cv2.resize(src, (w, h), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(out / f"{name}_{w}x{h}.png"), dst)
            # OpenCV's own algorithm, without the IPP acceleration the default path uses
            cv2.setUseOptimized(False)
            dst = cv2.resize(src, (w, h), interpolation=cv2.INTER_CUBIC)
            cv2.setUseOptimized(True)
            cv2.imwrite(str(out / f"{name}_{w}x{h}_generic.png"), dst)
            cases.append([name, w, h])
    (out / "cases.json").write_text(json.dumps(cases) + "\n")


def main() -> int:
    sample = ROOT / "sample"
    if not (sample / "avatar-tiny" / "avatar.toml").exists():
        raise SystemExit("run scripts/make_sample.sh first")
    FIX.mkdir(parents=True, exist_ok=True)

    subprocess.run([PY, str(HERE / "make_models.py"), "--tiny", "--out", str(FIX / "models")], check=True)

    golden = FIX / "golden"
    if golden.exists():
        shutil.rmtree(golden)
    (golden / "avatar" / "frames").mkdir(parents=True)
    src = load_avatar(sample / "avatar-tiny")
    frames = read_frames(src.video)[:5]
    boxes = []
    for i, f in enumerate(frames):
        small = cv2.resize(f, (640, 360), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(golden / "avatar" / "frames" / f"{i:06d}.png"), small)
        boxes.append([v // 2 for v in src.boxes[i]])
    write_avatar(golden / "avatar", "frames", boxes, "../../models/unet.onnx",
                 "../../models/audio_encoder.onnx")

    wav, sr = sf.read(str(sample / "speech_16k.wav"), dtype="int16")
    assert sr == 16000
    sf.write(str(golden / "speech_2s.wav"), wav[8000:8000 + 32000], 16000, subtype="PCM_16")

    ref = golden / "ref"
    tmp_out = golden / ".frames"
    subprocess.run([PY, str(HERE / "reference.py"), "--avatar", str(golden / "avatar"),
                    "--audio", str(golden / "speech_2s.wav"), "-o", str(tmp_out),
                    "--dump", str(ref), "--dump-frames", DUMP_FRAMES,
                    "--timings", str(ref / "meta.json")], check=True)
    meta = json.loads((ref / "meta.json").read_text())
    meta.pop("seconds", None)
    meta.pop("frames_per_second", None)
    kept = []
    for p in sorted(ref.glob("input_*.npy")):
        i = int(p.stem.split("_")[1])
        kept.append(i)
        shutil.copy(tmp_out / f"{i:06d}.png", ref / f"frame_{i:06d}.png")
    for pattern in ("input_*.npy", "audio_*.npy", "output_*.npy"):
        for p in ref.glob(pattern):
            p.unlink()
    shutil.rmtree(tmp_out)
    meta["dumped_frames"] = kept
    (ref / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    st = FIX / "synctalk"
    if st.exists():
        shutil.rmtree(st)
    (st / "full_body_img").mkdir(parents=True)
    (st / "landmarks").mkdir()
    rng = np.random.default_rng(7)
    for i in range(3):
        img = cv2.resize(frames[i], (160, 90), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(st / "full_body_img" / f"{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        pts = rng.uniform(10, 60, size=(110, 2))
        pts[1] = (60.7 + i, 40.2)
        pts[31] = (100.9 + i, 41.0)
        pts[52] = (80.0, 30.6 + i)
        (st / "landmarks" / f"{i}.lms").write_text(
            "\n".join(f"{x:.6f} {y:.6f}" for x, y in pts) + "\n")

    make_audio_fixtures(sample / "speech_16k.wav", golden / "speech_2s.wav")
    make_librosa_resample_fixtures()
    make_resize_fixtures(frames[0])
    make_video_fixtures(golden / "avatar" / "frames")

    seed = ROOT.parent / "shared" / "fixtures" / "seed-mel"
    if seed.is_dir():
        (FIX / "seed-mel").mkdir(exist_ok=True)
        for name in ("mel_filters.json", "ref_correct.json", "ref_video.json"):
            shutil.copy(seed / name, FIX / "seed-mel" / name)
    print(f"fixtures written to {FIX}: golden frames {kept}, {meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
