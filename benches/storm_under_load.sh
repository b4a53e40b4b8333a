#!/usr/bin/env bash
# Runs the two storm tests of tests/admission.rs RUNS times while BUSY busy loops load the
# machine, and counts the runs that failed (their output goes to $OUT). A starved proxy is
# where pacing races show. With BUSY=8, the storm test's flake (issue 14, point 13) failed 4
# of 30 runs before the send guard (at b2df870), and 0 of 60 after it.
#
#   benches/storm_under_load.sh            # RUNS=60 BUSY=4
#   RUNS=20 BUSY=0 benches/storm_under_load.sh
set -euo pipefail

RUNS=${RUNS:-60}
BUSY=${BUSY:-4}
OUT=${OUT:-/tmp/storm-under-load.log}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

cargo test --no-run --test admission 2>&1 | tail -n 1 >&2
bin=$(cargo test --no-run --test admission --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "admission":
        print(m["executable"])')

busy=()
stop() { for p in "${busy[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap stop EXIT
for _ in $(seq 1 "$BUSY"); do
  sh -c 'while :; do :; done' &
  busy+=("$!")
done

: > "$OUT"
failed=0
for i in $(seq 1 "$RUNS"); do
  if ! out=$("$bin" --exact one_429_slows_the_whole_storm \
    one_429_slows_the_whole_storm_to_a_host_at_the_defaults --test-threads=1 2>&1); then
    failed=$((failed + 1))
    { echo "=== run $i"; echo "$out"; } >> "$OUT"
  fi
  echo "run $i/$RUNS: $failed failed" >&2
done
echo "$failed of $RUNS runs failed with $BUSY busy loops (failures in $OUT)"
