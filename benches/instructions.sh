#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind: sluice (a host without regions,
# and a host with one region) against `pingora_floor` (examples/pingora_floor.rs), and
# optionally an earlier sluice build. Instruction counts do not drift with the machine's
# load the way CPU time does, so a change of 1% shows; they leave out the kernel (the same
# loopback sends for every proxy) and are not time (a cache miss counts as one instruction).
#
#   benches/instructions.sh                              # DURATION=15 CONNS=8
#   BASELINE=/tmp/sluice-old benches/instructions.sh     # adds that build, the same two ways
#   PROFILE_DIR=/tmp/cg benches/instructions.sh          # keeps the callgrind files, for
#                                                        # callgrind_annotate --inclusive=yes
#
# Each proxy runs under valgrind with one worker thread; an nginx origin answers 100 bytes.
# After a warm-up, the counters are zeroed, `wrk -t1 -cCONNS` drives DURATION seconds, and the
# counters are dumped: instructions / requests served is the figure (the few requests in
# flight at either edge move it by under 0.1%).
set -euo pipefail

DURATION=${DURATION:-15}
CONNS=${CONNS:-8}
BASELINE=${BASELINE:-}
root=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}

need=()
for c in nginx wrk valgrind callgrind_control callgrind_annotate python3; do
  command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || need+=("$c")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: nginx wrk valgrind" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx wrk valgrind >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"

echo "building sluice and pingora_floor (release)..." >&2
(cd "$root" && cargo build --release --quiet --bin sluice --example pingora_floor)
SLUICE="$target_dir/release/sluice"
FLOOR="$target_dir/release/examples/pingora_floor"

work=$(mktemp -d /tmp/sluice-instr.XXXXXX)
chmod 0777 "$work"
pids=()
cleanup() {
  # nginx's master stops its worker on TERM (killed outright, it would leave it behind).
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do { kill -9 "$p" && wait "$p"; } 2>/dev/null || true; done
  [ -n "${PROFILE_DIR:-}" ] && { mkdir -p "$PROFILE_DIR"; cp "$work"/cg.* "$PROFILE_DIR"/ 2>/dev/null || true; }
  rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=benches/ports.sh
. "$root/benches/ports.sh"

ORIGIN=$(free_port)
SMALL=$(python3 -c 'print("x"*100, end="")')
mkdir -p "$work/nginx"
cat > "$work/origin.conf" <<NGINX
worker_processes 1; daemon off; error_log $work/nginx/error.log; pid $work/nginx/nginx.pid;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
  client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx;
  uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
  server { listen 127.0.0.1:$ORIGIN; location = /small { default_type text/plain; return 200 "$SMALL"; } } }
NGINX
nginx -c "$work/origin.conf" -p "$work/nginx" & pids+=($!)
wait_port "$ORIGIN"

# wrk scripts: the absolute-form request a forward proxy gets.
absolute() {
  printf 'request = function() return wrk.format("GET", "%s/small", {Host="%s"}) end\n' "$1" "$2" > "$3"
}
absolute "http://127.0.0.1:$ORIGIN" "127.0.0.1:$ORIGIN" "$work/plain.lua"
absolute "http://origin.region" "origin.region" "$work/region.lua"

# One measured run: NAME PORT LUA CMD...  (LUA empty: origin-form, as to a reverse proxy)
measure() {
  local name=$1 port=$2 lua=$3; shift 3
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.$name" --dump-instr=no \
    "$@" > "$work/$name.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  wait_port "$port" 300   # valgrind starts slowly
  wrk -t1 -c"$CONNS" -d3s ${lua:+-s "$lua"} "http://127.0.0.1:$port/small" > /dev/null
  callgrind_control -z "$pid" > /dev/null 2>&1
  wrk -t1 -c"$CONNS" -d"${DURATION}s" ${lua:+-s "$lua"} "http://127.0.0.1:$port/small" \
    > "$work/$name.wrk"
  callgrind_control -d "$pid" > /dev/null 2>&1
  sleep 1
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local dump requests total
  dump=$(ls -t "$work/cg.$name".* | head -n 1)
  requests=$(awk '/requests in/ {print $1}' "$work/$name.wrk")
  total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  echo "$name $requests $total" >> "$work/results"
}

sluice_config() { # PORT ADMIN_PORT FILE
  cat > "$3" <<SLUICE
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
threads = 1
access_log = false
log_level = "warn"
pid_file = "$work/sluice-$1.pid"
upgrade_sock = "$work/sluice-$1.sock"
[defaults]
rps = 1000000.0
burst = 100000
[hosts."origin.region"]
regions = [{ name = "o", address = "127.0.0.1:$ORIGIN" }]
[security]
allow_cidrs = ["127.0.0.0/8"]
max_connections = 100000
max_connections_per_client = 100000
SLUICE
}

: > "$work/results"
PF=$(free_port)
measure pingora_floor "$PF" "" "$FLOOR" "127.0.0.1:$PF" "127.0.0.1:$ORIGIN"
builds=("sluice=$SLUICE")
[ -n "$BASELINE" ] && builds+=("baseline=$BASELINE")
for b in "${builds[@]}"; do
  name=${b%%=*}; bin=${b#*=}
  port=$(free_port); admin=$(free_port)
  sluice_config "$port" "$admin" "$work/$name.toml"
  measure "$name" "$port" "$work/plain.lua" "$bin" --config "$work/$name.toml"
  port=$(free_port); admin=$(free_port)
  sluice_config "$port" "$admin" "$work/${name}_region.toml"
  measure "${name}_region" "$port" "$work/region.lua" "$bin" --config "$work/${name}_region.toml"
done

python3 - "$work/results" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
per = {name: int(total) / int(requests) for name, requests, total in rows}
floor = per["pingora_floor"]
print(f"{'variant':<18} {'requests':>9} {'instructions/request':>21} {'x floor':>8}")
for name, requests, _ in rows:
    print(f"{name:<18} {requests:>9} {per[name]:>21,.0f} {per[name] / floor:>8.3f}")
for way in ("", "_region"):
    if "baseline" + way in per:
        print(f"sluice{way} / baseline{way}: {per['sluice' + way] / per['baseline' + way]:.3f}")
PY
