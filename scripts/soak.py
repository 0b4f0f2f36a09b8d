#!/usr/bin/env python3
"""Soak test of `lipsync serve` (bounded in time, standard library only).

    python3 scripts/soak.py [--binary target/release/lipsync] [--avatar DIR] [--audio WAV]
                            [--seconds 60] [--sessions 4] [--paced] [--max-growth-mb 32]

Starts a daemon on a temporary socket, runs one warm-up round (so that caches, model sessions
and thread arenas exist), then keeps `--sessions` clients streaming in a loop until the time is
up; every fifth session disconnects half-way through (the daemon must free it). Reports the
daemon's resident memory (VmRSS) after the warm-up and at the end, and fails when it grew by more
than `--max-growth-mb`, when its threads or open file descriptors did not come back to their
count after the warm-up, when any session that finished lost or mangled frames, or when the
daemon did not stop cleanly on SIGTERM (exit 0, socket removed). `--paced` sends each
client's audio at its own pace (as a live source would): `--sessions 16 --paced` is the churn soak of
docs/architecture.md.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import client  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def default_binary():
    for p in ("target/release/lipsync", "target/debug/lipsync"):
        if os.path.exists(os.path.join(ROOT, p)):
            return os.path.join(ROOT, p)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=default_binary(), help="the lipsync binary")
    ap.add_argument("--avatar", default=os.path.join(ROOT, "tests/fixtures/golden/avatar"))
    ap.add_argument("--audio", default=os.path.join(ROOT, "tests/fixtures/golden/speech_2s.wav"))
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to run (after the warm-up)")
    ap.add_argument("--sessions", type=int, default=4, help="concurrent clients")
    # --realtime is the flag's old name.
    ap.add_argument("--paced", "--realtime", dest="paced", action="store_true",
                    help="send each client's audio at its own pace")
    ap.add_argument("--max-growth-mb", type=float, default=32.0)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    if not args.binary or not os.path.exists(args.binary):
        print("error: no lipsync binary (build it, or give --binary)", file=sys.stderr)
        return 2

    tmp = tempfile.mkdtemp(prefix="lipsync-soak-")
    os.makedirs(os.path.join(tmp, "avatars"))
    os.symlink(os.path.abspath(args.avatar), os.path.join(tmp, "avatars", "soak"))
    sock = os.path.join(tmp, "serve.sock")
    log = open(os.path.join(tmp, "serve.log"), "w")
    daemon = subprocess.Popen(
        [args.binary, "serve", "--socket", sock, "--avatars", os.path.join(tmp, "avatars"),
         "--preload", "soak", "--max-sessions", str(2 * args.sessions), "--threads", "1"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    failures = []
    try:
        deadline = time.monotonic() + 120
        while True:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited during start-up ({daemon.returncode})")
            try:
                client.connect(sock).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start listening")
                time.sleep(0.1)

        pcm, rate, channels = client.read_wav(args.audio)
        expected = client.expected_frames(len(pcm) // (2 * channels), rate)
        counts = {"sessions": 0, "frames": 0, "aborted": 0, "busy_retries": 0}
        lock = threading.Lock()

        def one(k, abort):
            # An aborted session is freed a moment after its client vanished: retry a busy daemon.
            deadline = time.monotonic() + 10
            while True:
                try:
                    return one_session(k, abort)
                except client.DaemonError as e:
                    if e.code != "busy" or time.monotonic() > deadline:
                        raise
                    with lock:
                        counts["busy_retries"] += 1
                    time.sleep(0.05)

        def one_session(k, abort):
            if abort:
                # Half the audio, then vanish: the daemon must free the session.
                s = client.connect(sock)
                try:
                    client.send_json(s, client.OPEN, {"avatar": "soak", "sample_rate": rate, "format": "s16le",
                                                      "channels": channels})
                    client.recv(s)
                except Exception:
                    s.close()
                    raise
                half = len(pcm) // 2 // (2 * channels) * (2 * channels)
                client.send(s, client.AUDIO, pcm[:half])
                s.close()
                with lock:
                    counts["aborted"] += 1
                return
            r = client.stream(sock, "soak", pcm, rate, channels, paced=args.paced)
            with lock:
                counts["sessions"] += 1
                counts["frames"] += r["frames"]
                if r["frames"] != expected:
                    failures.append(f"session {r['session']}: {r['frames']} frames, expected {expected}")

        def worker(w, until):
            k = 0
            while time.monotonic() < until:
                try:
                    one(k, k % 5 == 4)
                except Exception as e:  # noqa: BLE001 - reported below
                    failures.append(f"worker {w}: {e}")
                    return
                k += 1

        def wait_idle():
            """Waits until no session is open and the daemon is back to its idle threads (the
            listener, plus the UNet service); records a failure if that takes over 10 s."""
            deadline = time.monotonic() + 10
            while client.request(sock, client.STATS_REQUEST, {}, client.STATS)["sessions_open"] != 0:
                if time.monotonic() > deadline:
                    failures.append("sessions still open 10 s after the clients left")
                    return
                time.sleep(0.1)
            # No new connection from here on (each has its thread while it lasts).
            while baseline["threads"] is not None and threads(daemon.pid) > baseline["threads"]:
                if time.monotonic() > deadline:
                    names = sorted(open(f"/proc/{daemon.pid}/task/{t}/comm").read().strip()
                                   for t in os.listdir(f"/proc/{daemon.pid}/task"))
                    failures.append(f"threads still running after the clients left: {names}")
                    return
                time.sleep(0.1)

        baseline = {"threads": None}

        def run_round(until):
            ts = [threading.Thread(target=worker, args=(w, until)) for w in range(args.sessions)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        # Warm-up at the same concurrency: every worker runs two whole sessions and an aborted
        # one, so that caches, model sessions and allocator arenas are at their working size.
        def warm(w):
            try:
                one(0, False)
                one(4, True)
                one(1, False)
            except Exception as e:  # noqa: BLE001 - reported below
                failures.append(f"warm-up {w}: {e}")

        ws = [threading.Thread(target=warm, args=(w,)) for w in range(args.sessions)]
        for t in ws:
            t.start()
        for t in ws:
            t.join()
        wait_idle()
        time.sleep(0.5)
        start_rss = rss_kib(daemon.pid)
        start_threads = threads(daemon.pid)
        start_fds = fds(daemon.pid)
        baseline["threads"] = start_threads
        t0 = time.monotonic()
        samples = []
        stop = threading.Event()

        def sampler():
            while not stop.wait(1.0):
                samples.append(rss_kib(daemon.pid))

        st = threading.Thread(target=sampler, daemon=True)
        st.start()
        run_round(t0 + args.seconds)
        stop.set()
        st.join()
        # Let aborted sessions wind down, then measure.
        wait_idle()
        end_rss = rss_kib(daemon.pid)
        end_threads = threads(daemon.pid)
        end_fds = fds(daemon.pid)
        elapsed = time.monotonic() - t0
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = "killed"
        log.close()
    if code != 0:
        failures.append(f"daemon exit status {code} after SIGTERM")
    if os.path.exists(sock):
        failures.append("the socket file was left behind")
    growth_mb = (end_rss - start_rss) / 1024.0
    if growth_mb > args.max_growth_mb:
        failures.append(f"RSS grew by {growth_mb:.1f} MiB (limit {args.max_growth_mb})")
    if end_threads > start_threads:
        failures.append(f"threads grew from {start_threads} to {end_threads}")
    if end_fds > start_fds:
        failures.append(f"open file descriptors grew from {start_fds} to {end_fds}")
    result = {
        "seconds": elapsed,
        "concurrent": args.sessions,
        "sessions": counts["sessions"],
        "aborted_sessions": counts["aborted"],
        "busy_retries": counts["busy_retries"],
        "frames": counts["frames"],
        "rss_start_mib": start_rss / 1024.0,
        "rss_end_mib": end_rss / 1024.0,
        "rss_max_mib": max(samples + [end_rss]) / 1024.0,
        "rss_growth_mib": growth_mb,
        "threads_start": start_threads,
        "threads_end": end_threads,
        "fds_start": start_fds,
        "fds_end": end_fds,
        "paced": args.paced,
        "failures": failures,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"soak: {counts['sessions']} sessions ({counts['aborted']} aborted) and {counts['frames']} frames "
            f"in {elapsed:.0f} s with {args.sessions} concurrent clients\n"
            f"daemon RSS: {start_rss / 1024:.1f} MiB after warm-up, {end_rss / 1024:.1f} MiB at the end "
            f"(max {result['rss_max_mib']:.1f}); threads {start_threads} -> {end_threads}; "
            f"file descriptors {start_fds} -> {end_fds}"
        )
        for f in failures:
            print(f"FAIL: {f}", file=sys.stderr)
    if failures:
        with open(os.path.join(tmp, "serve.log")) as f:
            sys.stderr.write(f.read()[-4000:])
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
