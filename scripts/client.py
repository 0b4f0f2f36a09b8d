#!/usr/bin/env python3
"""A small client of `lipsync serve` (Python standard library only): the example for
integrators. Protocol: docs/protocol.md.

    python3 scripts/client.py --socket /tmp/lipsync.sock --avatar NAME --audio speech.wav \
        [-o frames/] [--paced] [--json]
    python3 scripts/client.py ... --live [--idle-s 1] [--utterances 1] [--interrupt-after-ms MS]

Streams a 16-bit PCM WAV file (any rate, any channel count: the daemon mixes to mono and
resamples) as s16le, writes the JPEG frames it gets back into a new directory, and prints the
first-frame latency and per-frame latency percentiles. Importable: `stream(...)` returns the
same figures as a dict. With --live, a live session (`live(...)`): idle frames before,
between and after utterances, speech sent at real time, optional interrupts; it prints the
idle and speech frame counts, interrupt latency and the drift against the session's clock.
"""

import argparse
import json
import os
import shutil
import socket
import struct
import sys
import threading
import time
import wave

PROTOCOL_VERSION = 2
MAX_MESSAGE = 16 << 20

# Message types (docs/protocol.md).
HELLO, WELCOME = 0x01, 0x02
OPEN, OPENED, AUDIO, END_AUDIO, CLOSE, INTERRUPT, FINISH = 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16
FRAME, DONE, SPEECH, INTERRUPTED = 0x20, 0x21, 0x22, 0x23
FRAME_HEAD = 9  # u32 index, u32 pts_ms, u8 flags (bit 0: idle)
STATS_REQUEST, STATS = 0x30, 0x31
LIST_AVATARS, LOAD_AVATAR, UNLOAD_AVATAR, AVATARS, OK = 0x40, 0x41, 0x42, 0x43, 0x44
ERROR = 0x7F


class DaemonError(Exception):
    """The daemon replied with an Error message."""

    def __init__(self, code, message):
        super().__init__(f"the daemon replied `{code}`: {message}")
        self.code = code
        self.message = message


def send(sock, kind, payload=b""):
    """Sends one message: u32 big-endian length (type + payload), u8 type, payload."""
    sock.sendall(struct.pack(">IB", len(payload) + 1, kind) + payload)


def send_json(sock, kind, value):
    send(sock, kind, json.dumps(value).encode())


def _read_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv(sock):
    """Reads one message; returns (type, payload). Error messages raise DaemonError."""
    length, kind = struct.unpack(">IB", _read_exact(sock, 5))
    if not 1 <= length <= MAX_MESSAGE:
        raise ConnectionError(f"bad message length {length}")
    payload = _read_exact(sock, length - 1)
    if kind == ERROR:
        e = json.loads(payload)
        raise DaemonError(e.get("code", "?"), e.get("message", ""))
    return kind, payload


def connect(path):
    """Connects and does the handshake; returns the socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    send_json(sock, HELLO, {"protocol": PROTOCOL_VERSION, "client": "client.py"})
    kind, _ = recv(sock)
    if kind != WELCOME:
        raise ConnectionError(f"expected Welcome, got type 0x{kind:02x}")
    return sock


def request(path, kind, value, want):
    """One management request (stats, list/load/unload avatars) on a fresh connection."""
    sock = connect(path)
    try:
        send_json(sock, kind, value)
        got, payload = recv(sock)
        if got != want:
            raise ConnectionError(f"expected type 0x{want:02x}, got 0x{got:02x}")
        return json.loads(payload)
    finally:
        sock.close()


def window_start(k):
    """docs/spec.md section 2: s_k = int(80.0 * (k / 25.0))."""
    return int(80.0 * (k / 25.0))


def samples_needed_16k(i):
    """16 kHz samples frame i needs before it is final: mel row s_{i+6} + 15 needs samples up to
    200 * row + 400."""
    return 200 * (window_start(i + 6) + 15) + 400


def expected_frames(n, rate):
    """Frames for n samples at rate (docs/spec.md section 2: T = 1 + n16 // 200, L = int((T-16)/80*25) + 2,
    frames = L + 2)."""
    n16 = -(-n * 16000 // rate)
    t = 1 + n16 // 200
    if t < 16:
        return 0
    return int((t - 16) / 80.0 * 25.0) + 2 + 2


def read_wav(path):
    """(s16le bytes, rate, channels) of a 16-bit PCM WAV file."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2 or w.getcomptype() != "NONE":
            raise ValueError(f"{path}: expected 16-bit PCM WAV (convert with: ffmpeg -i IN -c:a pcm_s16le OUT.wav)")
        return w.readframes(w.getnframes()), w.getframerate(), w.getnchannels()


def percentile(sorted_values, q):
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[k]


def open_session(sock, open_req):
    """Sends Open; returns the Opened reply."""
    send_json(sock, OPEN, open_req)
    kind, payload = recv(sock)
    if kind != OPENED:
        raise ConnectionError(f"expected Opened, got type 0x{kind:02x}")
    return json.loads(payload)


def start_reader(sock, result, handle):
    """Reads a session's messages on a thread until Done (kept in result["done"]); every other
    message goes to handle(kind, payload, arrival time). A failure is kept in result["error"]
    and shuts the socket down, which unblocks the sender."""

    def run():
        try:
            while True:
                kind, payload = recv(sock)
                now = time.monotonic()
                if kind == DONE:
                    result["done"] = json.loads(payload)
                    return
                handle(kind, payload, now)
        except Exception as e:  # reported by the caller
            result["error"] = e
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def stream(path, avatar, pcm, rate, channels, paced=False, chunk_ms=20.0, on_frame=None, options=None):
    """Streams s16le `pcm` through a session; calls on_frame(index, jpeg) for each frame.
    Returns a dict of figures (frames, first_frame_ms, latency percentiles, ...)."""
    frame_bytes = 2 * channels
    n = len(pcm) // frame_bytes
    sock = connect(path)
    try:
        open_req = {"avatar": avatar, "sample_rate": rate, "format": "s16le", "channels": channels}
        open_req.update(options or {})
        opened = open_session(sock, open_req)
        # Keep little audio in the kernel so that backpressure reaches us (about 100 ms).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(4096, rate * frame_bytes // 10))
        chunk = max(1, int(round(rate * chunk_ms / 1000.0)))
        sent = []  # (samples sent so far, time)
        frames = []  # (index, time)
        result = {}

        def handle(kind, payload, now):
            if kind == FRAME:
                index, _ts, _flags = struct.unpack(">IIB", payload[:FRAME_HEAD])
                if index != len(frames):
                    raise ConnectionError(f"frame {index} arrived where {len(frames)} was expected")
                if on_frame:
                    on_frame(index, payload[FRAME_HEAD:])
                frames.append((index, now))
            elif kind != SPEECH:  # the one utterance starts at frame 0
                raise ConnectionError(f"unexpected message type 0x{kind:02x}")

        t = start_reader(sock, result, handle)
        t0 = time.monotonic()
        send_error = None
        try:
            for k, start in enumerate(range(0, n, chunk)):
                if paced:
                    due = t0 + start / rate
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                end = min(n, start + chunk)
                send(sock, AUDIO, pcm[start * frame_bytes:end * frame_bytes])
                sent.append((end, time.monotonic()))
            send(sock, END_AUDIO)
        except OSError as e:
            send_error = e
        end_time = time.monotonic()
        t.join()
        if "error" in result:
            raise result["error"]
        if send_error is not None:
            raise send_error
        done = result["done"]
        if done["frames"] != len(frames):
            raise ConnectionError(f"Done says {done['frames']} frames but {len(frames)} arrived")
        latencies = []
        for index, at in frames:
            need = -(-samples_needed_16k(index) * rate // 16000)
            final = next((ts for count, ts in sent if count >= need), end_time)
            latencies.append(max(0.0, at - min(final, end_time)) * 1000.0)
        lat = sorted(latencies)
        return {
            "session": opened["session"],
            "width": opened["width"],
            "height": opened["height"],
            "fps": opened["fps"],
            "frames": len(frames),
            "expected_frames": expected_frames(n, rate),
            "audio_seconds": n / rate,
            "seconds": time.monotonic() - t0,
            "first_frame_ms": (frames[0][1] - t0) * 1000.0 if frames else None,
            "latency_ms": {
                "p50": percentile(lat, 0.50),
                "p90": percentile(lat, 0.90),
                "p99": percentile(lat, 0.99),
                "max": lat[-1] if lat else 0.0,
            },
        }
    finally:
        sock.close()


def live(path, avatar, pcm, rate, channels, idle_s=1.0, utterances=1, interrupt_after_ms=None,
         chunk_ms=20.0, on_frame=None, options=None):
    """A live session: `idle_s` of idle before each utterance (and after the last), each
    utterance sent at real time (interrupted `interrupt_after_ms` after its start, if given),
    then Finish. Calls on_frame(index, idle, jpeg). Returns a dict of figures."""
    frame_bytes = 2 * channels
    n = len(pcm) // frame_bytes
    sock = connect(path)
    try:
        open_req = {"avatar": avatar, "sample_rate": rate, "format": "s16le", "channels": channels,
                    "realtime": True}
        open_req.update(options or {})
        opened = open_session(sock, open_req)
        t0 = time.monotonic()
        frames = []  # (index, pts_ms, idle, time)
        starts, interrupted, sent_interrupts = [], [], []
        result = {}

        def handle(kind, payload, now):
            if kind == FRAME:
                index, pts, flags = struct.unpack(">IIB", payload[:FRAME_HEAD])
                if index != len(frames):
                    raise ConnectionError(f"frame {index} arrived where {len(frames)} was expected")
                if on_frame:
                    on_frame(index, bool(flags & 1), payload[FRAME_HEAD:])
                frames.append((index, pts, bool(flags & 1), now))
            elif kind == SPEECH:
                starts.append(json.loads(payload)["frame"])
            elif kind == INTERRUPTED:
                interrupted.append(json.loads(payload)["next_frame"])
            else:
                raise ConnectionError(f"unexpected message type 0x{kind:02x}")

        t = start_reader(sock, result, handle)
        chunk = max(1, int(round(rate * chunk_ms / 1000.0)))
        try:
            for _ in range(utterances):
                time.sleep(idle_s)
                start = time.monotonic()
                cut = False
                for begin in range(0, n, chunk):
                    due = start + begin / rate
                    if interrupt_after_ms is not None and due >= start + interrupt_after_ms / 1000.0:
                        time.sleep(max(0.0, start + interrupt_after_ms / 1000.0 - time.monotonic()))
                        send(sock, INTERRUPT)
                        sent_interrupts.append(time.monotonic())
                        cut = True
                        break
                    time.sleep(max(0.0, due - time.monotonic()))
                    send(sock, AUDIO, pcm[begin * frame_bytes:min(n, begin + chunk) * frame_bytes])
                if not cut:
                    send(sock, END_AUDIO)
            time.sleep(idle_s)
            send(sock, FINISH)
        except OSError as e:
            result.setdefault("error", e)
        t.join()
        if "error" in result:
            raise result["error"]
        if result["done"]["frames"] != len(frames):
            raise ConnectionError(f"Done says {result['done']['frames']} frames but {len(frames)} arrived")
        waits = []
        for sent_at, next_frame in zip(sent_interrupts, interrupted):
            got = next((f[3] for f in frames if f[0] >= next_frame), None)
            if got is not None:
                waits.append((got - sent_at) * 1000.0)
        offsets = [(f[3] - t0) * 1000.0 - f[1] for f in frames]
        window = max(1, min(len(offsets) // 4, 10 * int(round(opened["fps"]))))
        first = min(offsets[:window]) if offsets else 0.0
        last = min(offsets[-window:]) if offsets else 0.0
        waits.sort()
        return {
            "session": opened["session"],
            "fps": opened["fps"],
            "frames": len(frames),
            "idle_frames": sum(1 for f in frames if f[2]),
            "utterance_frames": starts,
            "first_frame_ms": (frames[0][3] - t0) * 1000.0 if frames else None,
            "interrupts": len(sent_interrupts),
            "interrupt_ms": {"p50": percentile(waits, 0.5), "p99": percentile(waits, 0.99),
                             "max": waits[-1] if waits else 0.0},
            "offset_start_ms": first,
            "offset_end_ms": last,
            "drift_frames": round((last - first) * opened["fps"] / 1000.0),
        }
    finally:
        sock.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, help="the daemon's Unix socket")
    ap.add_argument("--avatar", required=True, help="avatar name")
    ap.add_argument("--audio", required=True, help="16-bit PCM WAV file")
    ap.add_argument("-o", "--output", help="new directory for the JPEG frames")
    # --realtime is the flag's old name.
    ap.add_argument("--paced", "--realtime", dest="paced", action="store_true",
                    help="send the audio at its own pace")
    ap.add_argument("--chunk-ms", type=float, default=20.0, help="audio per message (ms)")
    ap.add_argument("--jpeg-quality", type=int, help="JPEG quality (default: the avatar's)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--live", action="store_true", help="a live session (idle frames, pacing)")
    ap.add_argument("--idle-s", type=float, default=1.0, help="live: idle seconds around utterances")
    ap.add_argument("--utterances", type=int, default=1, help="live: times the audio is spoken")
    ap.add_argument("--interrupt-after-ms", type=float, help="live: interrupt each utterance after this")
    args = ap.parse_args()

    try:
        pcm, rate, channels = read_wav(args.audio)
    except (OSError, ValueError, wave.Error) as e:
        print(f"error: cannot read {args.audio}: {e}", file=sys.stderr)
        return 2
    tmp = None
    on_frame = None
    if args.output:
        out = os.path.abspath(args.output)
        if os.path.exists(out) and os.listdir(out):
            print(f"error: output directory {out} exists and is not empty", file=sys.stderr)
            return 2
        tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

        def on_frame(index, jpeg):
            with open(os.path.join(tmp, f"{index:06d}.jpg"), "wb") as f:
                f.write(jpeg)

    options = {}
    if args.jpeg_quality is not None:
        options["jpeg_quality"] = args.jpeg_quality
    try:
        if args.live:
            r = live(args.socket, args.avatar, pcm, rate, channels, args.idle_s, args.utterances,
                     args.interrupt_after_ms, args.chunk_ms,
                     (lambda i, _idle, jpeg: on_frame(i, jpeg)) if on_frame else None, options)
            r["expected_frames"] = r["frames"]
        else:
            r = stream(args.socket, args.avatar, pcm, rate, channels, args.paced, args.chunk_ms, on_frame,
                       options)
        if r["frames"] != r["expected_frames"]:
            raise ConnectionError(f"received {r['frames']} frames, expected {r['expected_frames']}")
    except (OSError, DaemonError, ConnectionError, ValueError) as e:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 1
    if tmp:
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    if args.json:
        print(json.dumps(r))
    elif args.live:
        print(f"session {r['session']}: {r['frames']} frames ({r['idle_frames']} idle), utterances at frames "
              f"{r['utterance_frames']}", file=sys.stderr)
        if r["interrupts"]:
            i = r["interrupt_ms"]
            print(f"interrupt -> first idle frame, ms: p50 {i['p50']:.1f}  max {i['max']:.1f}", file=sys.stderr)
        print(f"drift: {r['drift_frames']} frames", file=sys.stderr)
    else:
        lat = r["latency_ms"]
        print(
            f"session {r['session']}: {r['frames']} frames ({r['width']}x{r['height']} at {r['fps']:g} fps) "
            f"for {r['audio_seconds']:.2f} s of audio in {r['seconds']:.2f} s",
            file=sys.stderr,
        )
        print(f"first frame: {r['first_frame_ms']:.1f} ms after the first audio was sent", file=sys.stderr)
        print(
            f"frame latency (audio final -> frame received), ms: p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  "
            f"p99 {lat['p99']:.1f}  max {lat['max']:.1f}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
