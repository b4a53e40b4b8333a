#!/usr/bin/env bash
# Memory of a running sluice (release, one worker thread): resident set at idle, with 10,000
# kept-alive client connections, and with 1,000,000 destination hosts tracked by admission.
# Needs nginx and wrk (benches/load.sh installs them); traffic stays on 127.0.0.0/8.
#
#   benches/memory.sh            # CONNS=10000 HOSTS=1000000
#   SLUICE=/tmp/sluice-other benches/memory.sh   # measure that binary instead of building
set -euo pipefail
CONNS=${CONNS:-10000}
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
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
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
echo "idle: $(rss) MiB"

python3 - "$SL" "$ORIGIN" "$CONNS" "$SPID" <<'PY'
import socket, sys, time
sl, origin, n, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
req = f"GET http://127.0.0.1:{origin}/ HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n\r\n".encode()
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", sl))
    s.sendall(req)
    data = b""
    while b"ok" not in data:
        data += s.recv(4096)
    socks.append(s)
time.sleep(1)
rss = [l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")][0].split()[1]
print(f"with {n} kept-alive client connections: {int(rss)/1024:.1f} MiB")
for s in socks:
    s.close()
PY

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
