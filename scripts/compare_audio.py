#!/usr/bin/env python3
"""Races lipsync's audio front end against the Python reference (librosa path) in one run.

Makes 60 s of real speech by repeating the sample's espeak-ng speech, times the reference's
``melspectrogram`` (Wav2Lip: scipy lfilter + librosa stft + mel basis, single-threaded BLAS)
and ``lipsync bench audio`` on the same file, medians of N runs after a warm-up, and prints the
ratios. Optionally (``--encoder``) also times the audio encoder in both.

    .venv/bin/python scripts/compare_audio.py [--seconds 60] [--encoder models/full/audio_encoder.onnx]
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import reference as ref  # noqa: E402


def median_time(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speech", type=Path, default=ROOT / "sample" / "speech_16k.wav")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--encoder", type=Path)
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "lipsync")
    args = ap.parse_args()
    if not args.speech.exists():
        raise SystemExit(f"{args.speech} missing: run scripts/make_sample.sh")
    if not args.bin.exists():
        raise SystemExit(f"{args.bin} missing: run cargo build --release")

    wav, sr = sf.read(str(args.speech), dtype="int16")
    n = int(args.seconds * 16000)
    long = np.tile(wav, n // len(wav) + 1)[:n]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        sf.write(str(path), long, 16000, subtype="PCM_16")
        samples = ref.load_audio(path)
        py_mel, mel = median_time(lambda: ref.melspectrogram(samples), args.repeat)
        py_win, wins = median_time(lambda: ref.windows(mel), args.repeat)
        py = {"mel_s": py_mel, "windows_s": py_win}
        cmd = [str(args.bin), "-q", "bench", "audio", str(path), "--repeat", str(args.repeat)]
        if args.encoder:
            enc = ref.session(args.encoder, 1)
            io = {"encoder_input": "mel_spectrogram", "encoder_output": "audio_features"}
            py["encoder_s"], _ = median_time(lambda: ref.encode(enc, io, wins, 64), max(3, args.repeat // 3))
            cmd += ["--encoder", str(args.encoder)]
        rs = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    print(f"audio: {args.seconds:.0f} s of speech ({n} samples, {mel.shape[0]} mel frames, {len(wins)} windows); "
          f"medians of {args.repeat}; single-threaded")
    print(f"{'stage':<10} {'python ms':>10} {'lipsync ms':>11} {'speed-up':>9}")
    for key, name in (("mel_s", "mel"), ("windows_s", "windows"), ("encoder_s", "encoder")):
        if key in py:
            print(f"{name:<10} {py[key] * 1e3:>10.2f} {rs[key] * 1e3:>11.2f} {py[key] / rs[key]:>8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
