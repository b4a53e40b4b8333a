#!/usr/bin/env bash
# A fleet at its limit (issue: fleet at scale): N sluice nodes (one thread each) sharing one
# redis-server on this machine, one host limited to RPS/s, every node driven flat out by
# CLIENTS keep-alive clients with `Sluice-Timeout: 1s`. Prints, for each N: admitted rate vs
# the limit, the spread of shares between nodes, Redis commands per admitted request (INFO
# commandstats) and the nodes' round trips, and the queue wait of admitted requests.
#
#   benches/fleet_scale.sh                       # NODES="1 2 4 8" RPS=100 CLIENTS=6 WARM=5 DURATION=15
#   NODES="2" DURATION=30 benches/fleet_scale.sh
#   SLUICE_BIN=/path/to/sluice benches/fleet_scale.sh   # another build (A/B)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing: redis-server" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if [ -z "${SLUICE_BIN:-}" ]; then
  echo "building sluice (release)..." >&2
  (cd "$root" && cargo build --release --quiet --bin sluice)
  SLUICE_BIN=$target_dir/release/sluice
fi
export SLUICE_BIN
exec python3 "$root/benches/fleet_scale.py"
