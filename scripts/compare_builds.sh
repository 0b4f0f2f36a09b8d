#!/usr/bin/env bash
# Compares two lipsync binaries (say, before and after a refactor) on this machine, side by side:
#
#   scripts/compare_builds.sh OLD_BIN NEW_BIN [ROUNDS]   (ROUNDS: interleaved bench runs, default 5)
#
# 1. Output, byte for byte: a render of the sample's full avatar to a frames directory and to
#    MP4, a daemon session (`lipsync client`) and the speech frames of a live session
#    (`lipsync client --live`, checked against each binary's render --first-index of that
#    utterance), by each binary.
# 2. Speed: `lipsync bench render` (the full avatar, 200 frames to a frames directory, batch 1)
#    and `lipsync bench serve` (the full avatar, 1 and 2 sessions of 6 s of speech sent as fast
#    as the daemon takes it), ROUNDS runs of each binary interleaved (old, new, old, new, ...),
#    printed as medians and the ratio new/old.
#
# Needs the sample (scripts/make_sample.sh) and python3. Writes under a temporary directory.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OLD="$(realpath "$1")"
NEW="$(realpath "$2")"
ROUNDS="${3:-5}"
cd "$ROOT"
[ -d sample/avatar-full ] || { echo "no sample: run scripts/make_sample.sh" >&2; exit 2; }
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
SPEECH=sample/speech_44k_stereo.wav
same() { # name, dir-or-file a, dir-or-file b
  if diff -rq "$2" "$3" >/dev/null; then echo "identical: $1"; else echo "DIFFERENT: $1" >&2; exit 1; fi
}

for who in old new; do
  BIN=$OLD; [ "$who" = new ] && BIN=$NEW
  "$BIN" -q render --avatar sample/avatar-full --audio "$SPEECH" -o "$WORK/$who-frames"
  "$BIN" -q render --avatar sample/avatar-full --audio "$SPEECH" -o "$WORK/$who.mp4"
  mkdir -p "$WORK/$who-avatars"
  ln -s "$ROOT/sample/avatar-full" "$WORK/$who-avatars/full"
  "$BIN" -q serve --socket "$WORK/$who.sock" --avatars "$WORK/$who-avatars" &
  DAEMON=$!
  for _ in $(seq 100); do [ -S "$WORK/$who.sock" ] && break; sleep 0.1; done
  "$BIN" client --socket "$WORK/$who.sock" --avatar full --audio "$SPEECH" -o "$WORK/$who-session" 2>/dev/null
  "$BIN" client --socket "$WORK/$who.sock" --avatar full --audio sample/speech_16k.wav --live --idle-s 0.5 \
    --idle-after-s 0.5 --json -o "$WORK/$who-live" > "$WORK/$who-live.json"
  kill -TERM "$DAEMON"; wait "$DAEMON" || true
  # The live session's speech frames against this binary's render of that utterance.
  python3 - "$WORK/$who-live.json" > "$WORK/$who-first" <<'EOF'
import json, sys
v = json.load(open(sys.argv[1]))
print(v["utterances"][0][1])
EOF
  FIRST="$(cat "$WORK/$who-first")"
  "$BIN" -q render --avatar sample/avatar-full --audio sample/speech_16k.wav --first-index "$FIRST" \
    -o "$WORK/$who-utterance"
  python3 - "$WORK/$who-live" "$WORK/$who-utterance" "$FIRST" <<'EOF'
import os, sys
live, render, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = sorted(os.listdir(render))
for k, name in enumerate(names):
    want = open(os.path.join(render, name), "rb").read()
    got = open(os.path.join(live, f"{first + k:06d}.jpg"), "rb").read()
    if got != want:
        sys.exit(f"live frame {first + k} differs from the render's frame {k}")
print(f"live session: {len(names)} speech frames equal the render's (from frame {first})")
EOF
done
same "render to a frames directory" "$WORK/old-frames" "$WORK/new-frames"
same "render to MP4" "$WORK/old.mp4" "$WORK/new.mp4"
same "daemon session" "$WORK/old-session" "$WORK/new-session"
same "live session's utterance (render --first-index)" "$WORK/old-utterance" "$WORK/new-utterance"

echo "== speed: $ROUNDS interleaved rounds of each binary"
for r in $(seq "$ROUNDS"); do
  for who in old new; do
    BIN=$OLD; [ "$who" = new ] && BIN=$NEW
    "$BIN" -q bench render --avatar sample/avatar-full --audio "$SPEECH" --batch 1 --frames 200 \
      > "$WORK/render-$who-$r.json"
    "$BIN" -q bench serve --avatar sample/avatar-full --audio "$SPEECH" --sessions 1,2 --max-batch 1 \
      --fast --seconds 6 --render-frames 0 > "$WORK/serve-$who-$r.json" 2>/dev/null
  done
done
python3 - "$WORK" "$ROUNDS" <<'EOF'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
def figures(who):
    out = {}
    for r in range(1, rounds + 1):
        v = json.load(open(f"{work}/render-{who}-{r}.json"))
        out.setdefault("render frames/s (steady)", []).append(v["render_fps"])
        out.setdefault("UNet-only frames/s", []).append(v["inference_only_fps"])
        out.setdefault("render e2e p50 ms", []).append(v["end_to_end_p50_ms"])
        for s in json.load(open(f"{work}/serve-{who}-{r}.json"))["rounds"]:
            n = s["sessions"]
            out.setdefault(f"serve {n} session(s) frames/s", []).append(s["frames_per_second"])
            out.setdefault(f"serve {n} session(s) p50 ms", []).append(s["latency_ms"]["p50"])
    return out
old, new = figures("old"), figures("new")
print(f"{'figure':30} {'old median':>11} {'new median':>11} {'new/old':>8}   runs (old | new)")
for name in old:
    o, n = statistics.median(old[name]), statistics.median(new[name])
    runs = " ".join(f"{x:.1f}" for x in old[name]) + " | " + " ".join(f"{x:.1f}" for x in new[name])
    print(f"{name:30} {o:11.2f} {n:11.2f} {n / o:8.3f}   {runs}")
EOF
