#!/usr/bin/env python3
"""lipsync Python reference: SyncTalk_2D ``inference_328.py`` semantics as docs/spec.md states them.

avatar + audio -> frames, with librosa (mel), OpenCV (crop, resize, paste) and onnxruntime
(audio encoder and UNet). This is the executable spec that lipsync is tested against and the
peer it races against. Where SyncTalk_2D and docs/spec.md disagree, this follows docs/spec.md:
``cv2.resize(..., interpolation=cv2.INTER_CUBIC)`` both ways (SyncTalk passes INTER_CUBIC
positionally, as ``dst``, and so really resizes bilinearly), and the start offset wraps.

Outputs: PNG frames (``000000.png`` ...) or one ``frames.npy`` [n, H, W, 3] u8 (BGR).
``--dump DIR`` writes intermediates: ``mel.npy`` [T, 80] f32, ``features.npy`` [L+2, 512] f32
(the padded list F), and for each frame in ``--dump-frames``: ``input_NNNNNN.npy`` [6,320,320],
``audio_NNNNNN.npy`` [32,16,16], ``output_NNNNNN.npy`` [3,320,320] (f32), ``crop328_NNNNNN.png``
and ``pred_NNNNNN.png`` (u8). Per-stage wall times go to stderr and ``--timings FILE.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from avatar_io import load_avatar, ping_pong, read_frames  # noqa: E402

SR = 16000
N_FFT, HOP, WIN = 800, 200, 800
N_MELS, FMIN, FMAX = 80, 55, 7600


class Timer:
    def __init__(self):
        self.t: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.t[name] = self.t.get(name, 0.0) + seconds

    def stage(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.s = time.perf_counter()

            def __exit__(self, *exc):
                timer.add(name, time.perf_counter() - self.s)

        return _Ctx()


# --- audio (docs/spec.md section 1) -----------------------------------------------------------------
def load_audio(path: Path) -> np.ndarray:
    """Mono f32 at 16 kHz: int16 / 32768, channels averaged, resampled when the rate differs."""
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if sr != SR:
        import librosa

        wav = librosa.resample(wav, orig_sr=sr, target_sr=SR).astype(np.float32)
    return np.ascontiguousarray(wav)


_MEL_BASIS = None


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip ``audio.melspectrogram`` -> [T, 80] (time-major)."""
    global _MEL_BASIS
    import librosa
    from scipy import signal

    if _MEL_BASIS is None:
        _MEL_BASIS = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)
    y = signal.lfilter([1, -0.97], [1], wav)
    d = librosa.stft(y=y, n_fft=N_FFT, hop_length=HOP, win_length=WIN)
    s = np.dot(_MEL_BASIS, np.abs(d))
    s = 20 * np.log10(np.maximum(1e-5, s)) - 20
    s = np.clip((2 * 4.0) * ((s - -100.0) / 100.0) - 4.0, -4.0, 4.0)
    return np.ascontiguousarray(s.T.astype(np.float32))


def num_windows(t: int) -> int:
    if t < 16:
        raise SystemExit(f"audio too short: {t} mel frames, need at least 16 (0.1875 s)")
    return int((t - 16) / 80.0 * 25.0) + 2


def windows(mel: np.ndarray) -> np.ndarray:
    """[L, 1, 80, 16]: window k is mel rows s_k .. s_k+16, transposed (docs/spec.md section 2)."""
    t = mel.shape[0]
    n = num_windows(t)
    out = np.empty((n, 1, 80, 16), np.float32)
    for k in range(n):
        s = int(80.0 * (k / 25.0))
        if s + 16 > t:
            s = t - 16
        out[k, 0] = mel[s:s + 16].T
    return out


def encode(sess, io, wins: np.ndarray, batch: int) -> np.ndarray:
    outs = []
    for i in range(0, len(wins), batch):
        (o,) = sess.run([io["encoder_output"]], {io["encoder_input"]: wins[i:i + batch]})
        outs.append(o)
    feats = np.concatenate(outs, axis=0).astype(np.float32)
    return np.concatenate([feats[:1], feats, feats[-1:]], axis=0)  # F, length L + 2


def frame_audio(f: np.ndarray, i: int) -> np.ndarray:
    """F rows i-8 .. i+8 with zeros outside, as [32, 16, 16] (SyncTalk get_audio_features)."""
    out = np.zeros((16, f.shape[1]), np.float32)
    lo, hi = max(0, i - 8), min(f.shape[0], i + 8)
    out[lo - (i - 8): hi - (i - 8)] = f[lo:hi]
    return out.reshape(32, 16, 16)


# --- image (docs/spec.md sections 4 and 5) -----------------------------------------------------------------
def prep(frame: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    x1, y1, x2, y2 = box
    crop = frame[y1:y2, x1:x2]
    c328 = cv2.resize(crop, (328, 328), interpolation=cv2.INTER_CUBIC)
    inner = c328[4:324, 4:324].copy()
    masked = cv2.rectangle(inner.copy(), (5, 5, 310, 305), (0, 0, 0), -1)
    real_t = inner.transpose(2, 0, 1).astype(np.float32) / 255.0
    masked_t = masked.transpose(2, 0, 1).astype(np.float32) / 255.0
    return np.concatenate([real_t, masked_t], axis=0), c328


def paste(frame: np.ndarray, box, c328: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    x1, y1, x2, y2 = box
    pred = np.array(np.clip(out.transpose(1, 2, 0) * 255, 0, 255), dtype=np.uint8)
    tmpl = c328.copy()
    tmpl[4:324, 4:324] = pred
    back = cv2.resize(tmpl, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
    result = frame.copy()
    result[y1:y2, x1:x2] = back
    return result, pred


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def parse_frames(spec: str, n: int) -> list[int]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if part == "last":
            out.append(n - 1)
        else:
            out.append(int(part))
    return sorted({i for i in out if 0 <= i < n})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--avatar", type=Path, required=True, help="avatar directory (docs/avatar.md)")
    ap.add_argument("--audio", type=Path, required=True)
    ap.add_argument("-o", "--out", type=Path, help="output directory of frames")
    ap.add_argument("--format", choices=["png", "npy"], default="png")
    ap.add_argument("--unet", type=Path, help="override the avatar's UNet model")
    ap.add_argument("--encoder", type=Path, help="override the avatar's audio encoder model")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--encoder-batch", type=int, default=64)
    ap.add_argument("--unet-batch", type=int, default=1, help="SyncTalk runs batch 1")
    ap.add_argument("--max-frames", type=int)
    ap.add_argument("--stage", choices=["mel", "features", "all"], default="all",
                    help="stop after this stage (for timing the audio path alone)")
    ap.add_argument("--dump", type=Path, help="write intermediates here")
    ap.add_argument("--dump-frames", default="0,1,last")
    ap.add_argument("--timings", type=Path, help="write per-stage wall times (JSON)")
    args = ap.parse_args()

    import cv2

    cv2.setNumThreads(1)
    tm = Timer()
    t0 = time.perf_counter()
    av = load_avatar(args.avatar)
    unet_path = args.unet or av.unet
    enc_path = args.encoder or av.encoder
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)

    with tm.stage("audio_decode"):
        wav = load_audio(args.audio)
    with tm.stage("mel"):
        mel = melspectrogram(wav)
    if args.dump:
        np.save(args.dump / "mel.npy", mel)
    result = {"samples": int(len(wav)), "mel_frames": int(mel.shape[0])}
    if args.stage != "mel":
        with tm.stage("windows"):
            wins = windows(mel)
        enc = session(enc_path, args.threads)
        with tm.stage("audio_encoder"):
            feats = encode(enc, av.io, wins, args.encoder_batch)
        if args.dump:
            np.save(args.dump / "features.npy", feats)
        result.update(windows=int(len(wins)), frames=int(len(feats)))

    if args.stage == "all":
        n_out = len(feats)
        if args.max_frames is not None:
            n_out = min(n_out, args.max_frames)
        with tm.stage("video_decode"):
            template = read_frames(av.video)
        if len(template) != len(av.boxes):
            raise SystemExit(f"{len(av.boxes)} boxes for {len(template)} template frames")
        unet = session(unet_path, args.threads)
        dump_frames = set(parse_frames(args.dump_frames, n_out)) if args.dump else set()
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
        stacked = []
        bs = max(1, args.unet_batch)
        for start in range(0, n_out, bs):
            idx = list(range(start, min(n_out, start + bs)))
            with tm.stage("image_prep"):
                tpl = [ping_pong(i, len(template), av.start_frame) for i in idx]
                preps = [prep(template[t], av.boxes[t]) for t in tpl]
                x = np.stack([p[0] for p in preps])
                a = np.stack([frame_audio(feats, i) for i in idx])
            with tm.stage("unet"):
                (y,) = unet.run([av.io["unet_output"]],
                                {av.io["unet_image_input"]: x, av.io["unet_audio_input"]: a})
            for j, i in enumerate(idx):
                t = tpl[j]
                with tm.stage("paste"):
                    frame, pred = paste(template[t], av.boxes[t], preps[j][1], y[j])
                if i in dump_frames:
                    np.save(args.dump / f"input_{i:06d}.npy", x[j])
                    np.save(args.dump / f"audio_{i:06d}.npy", a[j])
                    np.save(args.dump / f"output_{i:06d}.npy", y[j])
                    cv2.imwrite(str(args.dump / f"crop328_{i:06d}.png"), preps[j][1])
                    cv2.imwrite(str(args.dump / f"pred_{i:06d}.png"), pred)
                with tm.stage("write"):
                    if args.out and args.format == "png":
                        cv2.imwrite(str(args.out / f"{i:06d}.png"), frame)
                    elif args.out:
                        stacked.append(frame)
        if args.out and args.format == "npy":
            np.save(args.out / "frames.npy", np.stack(stacked))
        result["frames_written"] = n_out

    total = time.perf_counter() - t0
    result["seconds"] = {k: round(v, 6) for k, v in tm.t.items()}
    result["seconds"]["total"] = round(total, 6)
    if "frames_written" in result and total > 0:
        result["frames_per_second"] = round(result["frames_written"] / total, 3)
    print(json.dumps(result), file=sys.stderr)
    if args.timings:
        args.timings.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
