#!/usr/bin/env python3
"""Local inference against a remote Open Inference Protocol server, in one run: frames/s of one
`lipsync serve` daemon and of two daemons sharing one server, each with one session streaming
the speech as fast as it goes, images sent as f32 or as uint8, and the latency a batch gains by
going remote (the daemon's UNet run per batch, p50 and p99, remote minus local).

    .venv/bin/python scripts/bench_remote.py [--avatar sample/avatar-full]
        [--audio sample/speech_16k.wav] [--threads 2]

The server is MLServer running the same ONNX model with onnxruntime (scripts/v2_server.py) on
this machine with --threads intra-op threads, serving it twice: as `unet` (f32 images) and as
`unet_u8` (uint8 images, scripts/make_u8_unet.py). Daemons run the UNet at batch 1. On one
machine the server and the daemons share the cores: this measures the protocol's cost and the
sharing, not a GPU server's gain.
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


def wait(check, what: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + 90
    while not check():
        if time.time() > deadline or proc.poll() is not None:
            sys.exit(f"bench_remote: {what} did not start")
        time.sleep(0.3)


class Daemon:
    def __init__(self, args, sock: Path, extra: list[str]):
        self.args, self.sock = args, sock
        self.proc = subprocess.Popen(
            [str(args.bin), "-q", "serve", "--socket", str(sock), "--avatars", str(args.avatar.parent),
             "--preload", args.avatar.name, "--max-batch", "1", "--intra-threads", str(args.threads)] + extra,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait(lambda: self.stats() is not None, "a daemon", self.proc)

    def stats(self):
        r = subprocess.run([str(self.args.bin), "stats", "--socket", str(self.sock), "--json"],
                           capture_output=True, text=True)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def client(self, out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [str(self.args.bin), "client", "--socket", str(self.sock), "--avatar", self.args.avatar.name,
             "--audio", str(self.args.audio), "-o", str(out), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def figures(daemon: Daemon, client: subprocess.Popen) -> dict:
    out, err = client.communicate()
    if client.returncode != 0:
        sys.exit(f"bench_remote: a session failed:\n{err}")
    c = json.loads(out)
    unet = daemon.stats()["unet"][0]["service_ms"]
    return {"fps": c["frames"] / c["seconds"], "unet_p50_ms": unet["p50"], "unet_p99_ms": unet["p99"],
            "e2e_p50_ms": c["latency_ms"]["p50"], "frames": c["frames"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--avatar", type=Path, default=ROOT / "sample" / "avatar-full")
    ap.add_argument("--audio", type=Path, default=ROOT / "sample" / "speech_16k.wav")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "lipsync")
    args = ap.parse_args()
    args.avatar = args.avatar.resolve()
    toml = (args.avatar / "avatar.toml").read_text()
    unet = next(line.split("=", 1)[1].strip().strip('"') for line in toml.splitlines()
                if line.strip().split("=")[0].strip() == "unet")
    model = (args.avatar / unet).resolve()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        u8 = tmp / "unet_u8.onnx"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_u8_unet.py"), str(model), str(u8)], check=True)
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "v2_server.py"), "--model", f"unet={model}",
             "--model", f"unet_u8={u8}", "--grpc-port", str(port), "--http-port", str(free_port()),
             "--threads", str(args.threads), "--dir", str(tmp / "server")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        rows = []
        try:
            wait(up, "the V2 server", server)
            remote = ["--provider", "remote", "--remote-url", f"grpc://127.0.0.1:{port}", "--remote-model"]
            for label, extra in [("local", []), ("remote, f32 images", remote + ["unet"]),
                                 ("remote, uint8 images", remote + ["unet_u8"])]:
                d = Daemon(args, tmp / f"{len(rows)}.sock", extra)
                try:
                    rows.append((label, figures(d, d.client(tmp / f"out{len(rows)}"))))
                finally:
                    d.stop()
            two = [Daemon(args, tmp / f"two{i}.sock", remote + ["unet"]) for i in range(2)]
            try:
                clients = [d.client(tmp / f"two-out{i}") for i, d in enumerate(two)]
                for i, (d, c) in enumerate(zip(two, clients)):
                    rows.append((f"remote, two daemons #{i + 1}", figures(d, c)))
            finally:
                for d in two:
                    d.stop()
        finally:
            server.terminate()
            server.wait()
    loc = rows[0][1]
    print(f"{loc['frames']} frames per session, UNet batch 1, {args.threads} threads (server: {args.threads})")
    print(f"{'':28} {'frames/s':>9} {'UNet p50 ms':>12} {'UNet p99 ms':>12} {'frame p50 ms':>13}")
    for label, r in rows:
        print(f"{label:28} {r['fps']:9.2f} {r['unet_p50_ms']:12.1f} {r['unet_p99_ms']:12.1f} {r['e2e_p50_ms']:13.1f}")
    rem, u8r = rows[1][1], rows[2][1]
    both = sum(r["fps"] for _, r in rows[3:])
    print(f"remote / local frames/s: {rem['fps'] / loc['fps']:.2f} (uint8 images: {u8r['fps'] / loc['fps']:.2f}); "
          f"two daemons together / local: {both / loc['fps']:.2f}")
    print(f"added latency per batch (remote - local UNet run): p50 {rem['unet_p50_ms'] - loc['unet_p50_ms']:+.1f} ms, "
          f"p99 {rem['unet_p99_ms'] - loc['unet_p99_ms']:+.1f} ms; with uint8 images "
          f"p50 {u8r['unet_p50_ms'] - loc['unet_p50_ms']:+.1f} ms, p99 {u8r['unet_p99_ms'] - loc['unet_p99_ms']:+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
