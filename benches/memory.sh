#!/usr/bin/env bash
# Memory of a running sluice (release, one worker thread): resident set at idle, with 5,000
# kept-alive client connections (beside an nginx reverse proxy and Apache Traffic Server as a
# forward proxy, measured the same way in the same run), and with 1,000,000 destination hosts
# tracked by admission (HOSTS=0 skips that phase).
# Needs nginx, wrk and trafficserver (benches/load.sh installs them); traffic stays on
# 127.0.0.0/8.
#
#   benches/memory.sh            # CONNS=5000 HOSTS=1000000
#   SLUICE=/tmp/sluice-other benches/memory.sh   # measure that binary instead of building
#   BASELINE=/tmp/sluice-old benches/memory.sh   # and that one too, as sluice_baseline
set -euo pipefail
CONNS=${CONNS:-5000}
HOSTS=${HOSTS:-1000000}
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"
if [ -z "${SLUICE:-}" ]; then
  (cd "$root" && cargo build --release --quiet --bin sluice)
  SLUICE="${CARGO_TARGET_DIR:-$root/target}/release/sluice"
fi
work=$(mktemp -d /tmp/sluice-mem.XXXXXX); chmod 0777 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
# shellcheck source=benches/ports.sh
. "$root/benches/ports.sh"
ORIGIN=$(free_port); SL=$(free_port); ADMIN=$(free_port); CLOSED=$(free_port)
cat > "$work/origin.conf" <<NGINX
worker_processes 1; daemon off; error_log $work/origin.err; pid $work/origin.pid;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $work/b; proxy_temp_path $work/p;
  fastcgi_temp_path $work/f; uwsgi_temp_path $work/u; scgi_temp_path $work/s;
  server { listen 127.0.0.1:$ORIGIN; location / { return 200 "ok"; } } }
NGINX
cat > "$work/sluice.toml" <<SLUICE
[server]
listen = "127.0.0.1:$SL"
admin_listen = "127.0.0.1:$ADMIN"
threads = 1
access_log = false
log_level = "error"
pid_file = "$work/sluice.pid"
upgrade_sock = "$work/sluice.sock"
connect_timeout = "1s"
[defaults]
rps = 1000000.0
burst = 100000
[security]
allow_cidrs = ["127.0.0.0/8"]
max_connections = $((CONNS + 1000))
max_connections_per_client = $((CONNS + 1000))
SLUICE
nginx -c "$work/origin.conf" -p "$work" >/dev/null 2>&1 & pids+=($!)
# Each phase runs on a fresh sluice, so that memory freed by one phase (and kept by the
# allocator) does not hide what the next one uses.
start_sluice() {
  "$SLUICE" --config "$work/sluice.toml" >"$work/sluice.out" 2>&1 &
  SPID=$!; pids+=($SPID)
  sleep 1.5
}
start_sluice
rss() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$SPID/status"; }
tracked() { curl -s "127.0.0.1:$ADMIN/metrics" | awk '/^sluice_hosts_tracked/ {print $2}'; }
# Open CONNS kept-alive client connections to a proxy, one request on each, and report the
# proxy's resident set before and after, and per connection.
kept_alive() { # name port pid
  python3 - "$1" "$2" "$ORIGIN" "$CONNS" "$3" <<'PY'
import socket, sys, time
name, port, origin, n, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def rss():
    return int([l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")][0].split()[1])
req = f"GET http://127.0.0.1:{origin}/ HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n\r\n".encode()
before = rss()
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(req)
    data = b""
    while b"ok" not in data:
        data += s.recv(4096)
    socks.append(s)
time.sleep(1)
after = rss()
print(f"{name}: idle {before/1024:.1f} MiB, with {n} kept-alive client connections "
      f"{after/1024:.1f} MiB: {(after - before) / n:.2f} KiB per connection")
for s in socks:
    s.close()
PY
}
echo "idle: $(rss) MiB"
kept_alive sluice "$SL" "$SPID"
if [ -n "${BASELINE:-}" ]; then
  kill "$SPID"; wait "$SPID" 2>/dev/null || true
  "$BASELINE" --config "$work/sluice.toml" >"$work/baseline.out" 2>&1 &
  BPID=$!; pids+=($BPID)
  sleep 1.5
  kept_alive sluice_baseline "$SL" "$BPID"
  kill "$BPID"; wait "$BPID" 2>/dev/null || true
  start_sluice
fi
# nginx as a reverse proxy (one worker), measured the same way (its worker's resident set).
RP=$(free_port)
cat > "$work/rp.conf" <<NGINX
worker_processes 1; daemon off; error_log $work/rp.err; pid $work/rp.pid;
events { worker_connections $((CONNS + 1000)); }
http { access_log off; keepalive_timeout 300s; keepalive_requests 1000000;
  client_body_temp_path $work/rb; proxy_temp_path $work/rp; fastcgi_temp_path $work/rf;
  uwsgi_temp_path $work/ru; scgi_temp_path $work/rs;
  upstream origin { server 127.0.0.1:$ORIGIN; keepalive 16; }
  server { listen 127.0.0.1:$RP; location / { proxy_pass http://origin;
    proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NGINX
nginx -c "$work/rp.conf" -p "$work" >/dev/null 2>&1 & RPID=$!; pids+=($RPID)
sleep 1
kept_alive nginx_reverse "$RP" "$(pgrep -P "$RPID" | head -n 1)"
# Apache Traffic Server as a forward proxy (one exec thread, no cache), measured the same way.
if command -v traffic_server >/dev/null 2>&1; then
  ATS=$(free_port)
  # shellcheck source=benches/ats_setup.sh
  . "$root/benches/ats_setup.sh"
  ats_setup "$work/ats" "$ATS" \
    "proxy.config.net.connections_throttle=$((CONNS + 1000))" \
    "proxy.config.net.max_connections_in=$((CONNS + 1000))"
  PROXY_CONFIG_CONFIG_DIR="$work/ats/conf" traffic_server >"$work/ats.out" 2>&1 & APID=$!; pids+=($APID)
  for _ in $(seq 50); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $ATS))" 2>/dev/null && break
    sleep 0.2
  done
  sleep 2
  kept_alive ats_forward "$ATS" "$APID" || echo "ats_forward: failed (resets past about 5,000 connections here)"
else
  echo "ats_forward: skipped (traffic_server not installed; benches/load.sh installs it)"
fi

cat > "$work/hosts.lua" <<LUA
counter = tonumber(os.getenv("START") or "0")
request = function()
  counter = counter + 1
  local a = math.floor(counter / 65536) % 256
  local b = math.floor(counter / 256) % 256
  local c = counter % 256
  local host = "127." .. a .. "." .. b .. "." .. c .. ":$CLOSED"
  return wrk.format("GET", "http://" .. host .. "/", { Host = host })
end
LUA
kill "$SPID"; wait "$SPID" 2>/dev/null || true
start_sluice
echo "idle (fresh process): $(rss) MiB"
before=$(tracked)
# Each request names a new host (127.a.b.c on a closed port): admission tracks it, the
# connection is refused at once (502), and the next request names the next host.
secs=1
while [ "$(tracked)" -lt $((before + HOSTS)) ]; do
  START=$(tracked) wrk -t1 -c32 -d${secs}s -s "$work/hosts.lua" "http://127.0.0.1:$SL" >/dev/null 2>&1 || true
  secs=10
  echo "  tracking $(tracked) hosts, $(rss) MiB" >&2
done
echo "with $(tracked) tracked hosts: $(rss) MiB"
