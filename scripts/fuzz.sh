#!/usr/bin/env bash
# Coverage-guided fuzzing of lipsync with AFL++ (cargo-afl: stable Rust) for a bounded time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]  (targets: protocol audio avatar session)
#
# Targets are lipsync_serve::fuzzing's entry points (the wire protocol as the daemon parses it,
# the audio decoder entry, avatar.toml / boxes.json, and whole client byte streams through a
# daemon's connection state machine), seeded from fuzz/corpus (scripts/
# make_fuzz_corpus.py). Prints executions, edges and bitmap coverage per target; inputs that
# crash or hang are copied to fuzz/regressions/TARGET/ (replayed by tests/it/fuzz_corpus.rs) and
# the script fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECS="${1:-60}"
shift || true
TARGETS=("$@")
[ "${#TARGETS[@]}" -gt 0 ] || TARGETS=(protocol audio avatar session)
command -v cargo-afl >/dev/null || cargo install cargo-afl --locked --quiet
cd "$ROOT/fuzz"
# With an explicit --target, cargo-afl's flags (instrumentation, one codegen unit) apply to the
# targets' code only: build scripts and proc macros (bindgen for FFmpeg, libjpeg-turbo's CMake
# build, serde's derives) are built plainly. AFL_OPT_LEVEL (cargo-afl's, default 3 there): 1 here,
# as quick to build as the short CI run needs; AFL_OPT_LEVEL=3 for long runs.
HOST="$(rustc -vV | sed -n 's/^host: //p')"
OPT="${AFL_OPT_LEVEL:-1}"
unset AFL_OPT_LEVEL # afl-fuzz itself would take it for a mistyped setting
AFL_OPT_LEVEL="$OPT" cargo afl build --release --quiet --target "$HOST"
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1
mkdir -p out
status=0
for t in "${TARGETS[@]}"; do
  rm -rf "out/$t"
  cargo afl fuzz -V "$SECS" -t 5000 -i "corpus/$t" -o "out/$t" "target/$HOST/release/$t" > "out/$t.log" 2>&1 || {
    echo "fuzz $t: afl-fuzz failed (see fuzz/out/$t.log)" >&2
    tail -20 "out/$t.log" >&2
    status=1
    continue
  }
  stats="out/$t/default/fuzzer_stats"
  get() { awk -v k="$1" '$1 == k { print $3 }' "$stats"; }
  printf 'fuzz %-8s %ss: %s execs (%s/s), %s edges, bitmap coverage %s, corpus %s, crashes %s, hangs %s\n' \
    "$t" "$SECS" "$(get execs_done)" "$(get execs_per_sec)" "$(get edges_found)" "$(get bitmap_cvg)" \
    "$(get corpus_count)" "$(get saved_crashes)" "$(get saved_hangs)"
  found=0
  for kind in crashes hangs; do
    for f in "out/$t/default/$kind"/id:*; do
      [ -e "$f" ] || continue
      mkdir -p "regressions/$t"
      cp "$f" "regressions/$t/$kind-$(basename "$f" | tr ':,' '__' | cut -c1-60)"
      found=1
    done
  done
  if [ "$found" = 1 ]; then
    echo "fuzz $t: failing inputs copied to fuzz/regressions/$t" >&2
    status=1
  fi
done
rm -rf "${TMPDIR:-/tmp}/lipsync-fuzz-session"
exit "$status"
