#!/usr/bin/env python3
"""Local inference against a remote Open Inference Protocol server, in one run: frames/s of one
front end and of two front ends sharing one server, and the latency a batch gains by going
remote (the UNet stage's run time per batch, p50 and p99, remote minus local).

    .venv/bin/python scripts/bench_remote.py [--avatar sample/avatar-full] [--frames 150]
        [--batch 1] [--threads 2]

The server is MLServer running the same ONNX model with onnxruntime (scripts/v2_server.py), on
this machine, with --threads intra-op threads. A front end is a `lipsync render` (the engine's
one graph, as a daemon session runs it), with --threads intra-op threads for local inference.
On one machine the server and the front ends share the cores: this measures the protocol's
cost and the sharing, not a GPU server's gain.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(args, out: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [str(args.bin), "-q", "render", "--avatar", str(args.avatar), "--audio", str(args.audio),
           "--max-frames", str(args.frames), "--batch", str(args.batch), "--threads", str(args.threads),
           "--report", str(out / "report.json"), "-o", str(out / "frames")] + extra
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def figures(out: Path) -> dict:
    r = json.loads((out / "report.json").read_text())
    unet = next(s for s in r["stages"] if s["name"] == "unet")
    return {"fps": r["steady_frames_per_second"], "unet_p50_ms": unet["service_ms"]["p50"],
            "unet_p99_ms": unet["service_ms"]["p99"], "e2e_p50_ms": r["end_to_end_ms"]["p50"]}


def finish(procs) -> None:
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"bench_remote: a render failed:\n{err}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--avatar", type=Path, default=ROOT / "sample" / "avatar-full")
    ap.add_argument("--audio", type=Path, default=ROOT / "sample" / "speech_16k.wav")
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "lipsync")
    args = ap.parse_args()
    toml = (args.avatar / "avatar.toml").read_text()
    unet = next(line.split("=", 1)[1].strip().strip('"') for line in toml.splitlines()
                if line.strip().startswith("unet ") or line.strip().startswith("unet="))
    model = (args.avatar / unet).resolve()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "v2_server.py"), "--model", f"unet={model}",
             "--grpc-port", str(port), "--http-port", str(free_port()), "--threads", str(args.threads),
             "--dir", str(tmp / "server")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 90
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline or server.poll() is not None:
                        sys.exit("bench_remote: the V2 server did not start")
                    time.sleep(0.3)
            remote = ["--provider", "remote", "--remote-url", f"grpc://127.0.0.1:{port}", "--remote-model", "unet"]
            rows = {}
            for name, extra in [("local", []), ("remote", remote)]:
                out = tmp / name
                out.mkdir()
                finish([render(args, out, extra)])
                rows[name] = figures(out)
            outs = [tmp / "two-a", tmp / "two-b"]
            for o in outs:
                o.mkdir()
            finish([render(args, o, remote) for o in outs])
            two = [figures(o) for o in outs]
        finally:
            server.terminate()
            server.wait()
    loc, rem = rows["local"], rows["remote"]
    print(f"full render of {args.frames} frames, batch {args.batch}, {args.threads} threads (server: {args.threads})")
    print(f"{'':28} {'frames/s':>9} {'UNet p50 ms':>12} {'UNet p99 ms':>12} {'e2e p50 ms':>11}")
    for label, r in [("local", loc), ("remote, one front end", rem)] + \
            [(f"remote, two front ends #{i + 1}", r) for i, r in enumerate(two)]:
        print(f"{label:28} {r['fps']:9.2f} {r['unet_p50_ms']:12.1f} {r['unet_p99_ms']:12.1f} {r['e2e_p50_ms']:11.1f}")
    print(f"remote / local frames/s: {rem['fps'] / loc['fps']:.2f}; two front ends together / local: "
          f"{sum(r['fps'] for r in two) / loc['fps']:.2f}")
    print(f"added latency per batch (remote - local UNet run): p50 {rem['unet_p50_ms'] - loc['unet_p50_ms']:+.1f} ms, "
          f"p99 {rem['unet_p99_ms'] - loc['unet_p99_ms']:+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
