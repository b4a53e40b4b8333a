#!/usr/bin/env bash
# Load benchmark on loopback: sluice (forward proxy, explicit target, and a host with one
# configured region) against the same origin reached directly, through nginx and haproxy
# (reverse proxies), through Apache Traffic Server, squid and tinyproxy (forward proxies), and
# through `pingora_floor` (examples/pingora_floor.rs: Pingora alone, the framework's own cost);
# then CONNECT tunnel setup against squid and tinyproxy.
# The proxy under test runs on core 0; the load generator and the origin on core 1.
# Prints one table: requests/s, p50, p99, throughput ratio to direct, and proxy CPU time per
# request (utime+stime of the proxy's processes over the run / requests served).
#
#   sudo benches/load.sh                 # ROUNDS=3 DURATION=5 CONNS=64 by default
#   ROUNDS=6 DURATION=10 benches/load.sh
#   VARIANTS="sluice_forward nginx_reverse" benches/load.sh   # only these HTTP variants, no CONNECT
#   SLUICE_BUILDS="a=/path/to/sluice b=/other/sluice" benches/load.sh   # adds sluice_a, sluice_b
#                                                       # (forward proxy): A/B of builds, interleaved
#   VARIANTS="sluice_tls_h1 sluice_tls_h2" benches/load.sh   # the same TLS origin (nginx, h2 and
#                                                       # HTTP/1.1 by ALPN) through sluice over
#                                                       # HTTP/1.1 (http2 = "never") and over h2
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNS=${CONNS:-64}
TUNNEL_WORKERS=${TUNNEL_WORKERS:-16}
VARIANTS=${VARIANTS:-}
SLUICE_BUILDS=${SLUICE_BUILDS:-}
root=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}

need=()
for c in nginx squid tinyproxy haproxy wrk traffic_server taskset python3; do
  command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || need+=("$c")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: nginx squid tinyproxy haproxy wrk trafficserver" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx squid tinyproxy haproxy wrk trafficserver util-linux >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"

echo "building sluice (release)..." >&2
(cd "$root" && cargo build --release --quiet --bin sluice --example connect_load --example pingora_floor)
SLUICE="$target_dir/release/sluice"
CONNECT_LOAD="$target_dir/release/examples/connect_load"
PINGORA_FLOOR="$target_dir/release/examples/pingora_floor"

work=$(mktemp -d /tmp/sluice-load.XXXXXX)
chmod 0777 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "${KEEP:-}" ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=benches/ports.sh
. "$root/benches/ports.sh"

ORIGIN=$(free_port); RP=$(free_port); HA=$(free_port); SQ=$(free_port); TP=$(free_port)
SL=$(free_port); SL_ADMIN=$(free_port); PF=$(free_port); ATS=$(free_port); ORIGIN_TLS=$(free_port)
SMALL=$(python3 -c 'print("x"*100, end="")')
head -c 10240 /dev/zero | tr '\0' 'y' > "$work/big"
chmod 0644 "$work/big"

# The origin's TLS listener (h2 and HTTP/1.1 by ALPN): a CA sluice trusts, and its leaf.
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/ca.key" -out "$work/ca.pem" -days 2 \
  -subj /CN=sluice-bench-ca -addext basicConstraints=critical,CA:TRUE 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$work/leaf.key" -out "$work/leaf.csr" \
  -subj /CN=origin.test 2>/dev/null
printf 'subjectAltName=DNS:origin.test\n' > "$work/leaf.ext"
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
  -out "$work/leaf.pem" -days 2 -extfile "$work/leaf.ext" 2>/dev/null
chmod 0644 "$work"/*.pem "$work"/*.key

nginx_common="worker_processes 1; daemon off; error_log $work/%s.err; pid $work/%s.pid;
events { worker_connections 16384; }"
# shellcheck disable=SC2059
{ printf "$nginx_common\n" origin origin; cat <<NGINX
http {
  access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  client_body_temp_path $work/o_body; proxy_temp_path $work/o_proxy; fastcgi_temp_path $work/o_fcgi;
  uwsgi_temp_path $work/o_uwsgi; scgi_temp_path $work/o_scgi;
  server {
    listen 127.0.0.1:$ORIGIN;
    location = /small { default_type text/plain; return 200 "$SMALL"; }
    location = /big { default_type text/plain; alias $work/big; }
  }
  server {
    listen 127.0.0.1:$ORIGIN_TLS ssl http2;
    ssl_certificate $work/leaf.pem; ssl_certificate_key $work/leaf.key;
    http2_max_concurrent_streams 1000;
    location = /small { default_type text/plain; return 200 "$SMALL"; }
    location = /big { default_type text/plain; alias $work/big; }
  }
}
NGINX
} > "$work/origin.conf"
# shellcheck disable=SC2059
{ printf "$nginx_common\n" rp rp; cat <<NGINX
http {
  access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  client_body_temp_path $work/r_body; proxy_temp_path $work/r_proxy; fastcgi_temp_path $work/r_fcgi;
  uwsgi_temp_path $work/r_uwsgi; scgi_temp_path $work/r_scgi;
  upstream origin { server 127.0.0.1:$ORIGIN; keepalive 128; }
  server {
    listen 127.0.0.1:$RP;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
} > "$work/rp.conf"
cat > "$work/haproxy.cfg" <<HA
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend f
  bind 127.0.0.1:$HA
  default_backend b
backend b
  server o 127.0.0.1:$ORIGIN maxconn 10000
HA
cat > "$work/squid.conf" <<SQUID
http_port 127.0.0.1:$SQ
http_access allow all
cache deny all
cache_mem 8 MB
workers 1
pid_filename $work/squid.pid
cache_log $work/squid.log
access_log none
coredump_dir $work
shutdown_lifetime 1 second
max_filedescriptors 16384
SQUID
cat > "$work/tinyproxy.conf" <<TINY
Port $TP
Listen 127.0.0.1
Timeout 600
MaxClients 4096
Allow 127.0.0.1
PidFile "$work/tinyproxy.pid"
LogFile "$work/tinyproxy.log"
LogLevel Critical
User nobody
Group nogroup
TINY
cat > "$work/sluice.toml" <<SLUICE
[server]
listen = "127.0.0.1:$SL"
admin_listen = "127.0.0.1:$SL_ADMIN"
threads = 1
access_log = false
log_level = "warn"
pid_file = "$work/sluice.pid"
upgrade_sock = "$work/sluice.sock"
upstream_ca_file = "$work/ca.pem"
[defaults]
rps = 1000000.0
burst = 100000
[hosts."origin.region"]
regions = [{ name = "o", address = "127.0.0.1:$ORIGIN" }]
[hosts."origin.h1"]
http2 = "never"
regions = [{ name = "o", address = "127.0.0.1:$ORIGIN_TLS", tls = true, sni = "origin.test" }]
[hosts."origin.h2"]
http2 = "always"
regions = [{ name = "o", address = "127.0.0.1:$ORIGIN_TLS", tls = true, sni = "origin.test" }]
[security]
allow_cidrs = ["127.0.0.0/8"]
connect_any_port = true
max_connections = 100000
max_connections_per_client = 100000
SLUICE
# Apache Traffic Server as a forward proxy: one exec thread, no cache, no remap required.
# shellcheck source=benches/ats_setup.sh
. "$root/benches/ats_setup.sh"
ats_setup "$work/ats" "$ATS"

start() { # name core cmd...
  local name=$1 core=$2; shift 2
  taskset -c "$core" "$@" >"$work/$name.out" 2>&1 &
  pids+=($!)
  eval "PID_$name=$!"
}
start origin 1 nginx -c "$work/origin.conf" -p "$work"
start nginx_rp 0 nginx -c "$work/rp.conf" -p "$work"
start haproxy 0 haproxy -f "$work/haproxy.cfg" -db
start squid 0 squid -N -f "$work/squid.conf"
start tinyproxy 0 tinyproxy -d -c "$work/tinyproxy.conf"
start sluice 0 "$SLUICE" --config "$work/sluice.toml"
start pingora_floor 0 "$PINGORA_FLOOR" "127.0.0.1:$PF" "127.0.0.1:$ORIGIN"
start ats 0 env PROXY_CONFIG_CONFIG_DIR="$work/ats/conf" traffic_server
ports="$ORIGIN $ORIGIN_TLS $RP $HA $SQ $TP $SL $PF $ATS"
builds=()
for b in $SLUICE_BUILDS; do # name=binary: the same configuration on its own ports
  name=${b%%=*}; port=$(free_port); admin=$(free_port)
  sed -e "s/127.0.0.1:$SL\"/127.0.0.1:$port\"/" -e "s/127.0.0.1:$SL_ADMIN\"/127.0.0.1:$admin\"/" \
    -e "s/sluice\.pid/sluice_$name.pid/" -e "s/sluice\.sock/sluice_$name.sock/" \
    "$work/sluice.toml" > "$work/sluice_$name.toml"
  start "sluice_$name" 0 "${b#*=}" --config "$work/sluice_$name.toml"
  builds+=("$name:$port")
  ports="$ports $port"
done
for p in $ports; do wait_port "$p"; done
sleep 1

# CPU ticks (utime+stime) of a process and all its descendants.
cpu_ticks() {
  local total=0 p
  for p in $1 $(pgrep -P "$1" 2>/dev/null || true); do
    if [ -r "/proc/$p/stat" ]; then
      total=$((total + $(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$p/stat")))
    fi
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)

lua() { # path host [extra header line]
  local f="$work/$1.lua"
  {
    echo "wrk.path = \"$2\""
    echo "wrk.headers[\"Host\"] = \"$3\""
    if [ -n "${4:-}" ]; then echo "wrk.headers[\"Sluice-Target\"] = \"$4\""; fi
  } > "$f"
  echo "$f"
}

results="$work/results.tsv"
: > "$results"
run_http() { # variant size port pid path host [target]
  local variant=$1 size=$2 port=$3 pid=$4 path=$5 host=$6 target=${7:-}
  local script out before after
  if [ -n "$VARIANTS" ] && [[ " $VARIANTS " != *" $variant "* ]]; then return 0; fi
  script=$(lua "${variant}_$size" "$path" "$host" "$target")
  before=$(cpu_ticks "$pid")
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$script" "http://127.0.0.1:$port" 2>&1)
  after=$(cpu_ticks "$pid")
  python3 - "$variant" "$size" "$((after - before))" "$HZ" <<PY >> "$results"
import re, sys
variant, size, ticks, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = """$out"""
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)] if m else float("nan")
req = int(re.search(r"(\d+) requests in", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
p50 = ms(re.search(r"50%\s+(\S+)", out).group(1))
p99 = ms(re.search(r"99%\s+(\S+)", out).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
errs = re.search(r"Socket errors: (.*)", out)
cpu_us = ticks / hz * 1e6 / max(req, 1)
print(f"http\t{variant}\t{size}\t{rps:.0f}\t{p50:.3f}\t{p99:.3f}\t{cpu_us:.1f}\t{bad.group(1) if bad else 0}\t{errs.group(1) if errs else ''}")
PY
}
run_connect() { # variant port pid
  local variant=$1 port=$2 pid=$3 before after out
  before=$(cpu_ticks "$pid")
  out=$(taskset -c 1 "$CONNECT_LOAD" "127.0.0.1:$port" "127.0.0.1:$ORIGIN" "$TUNNEL_WORKERS" "$DURATION")
  after=$(cpu_ticks "$pid")
  python3 - "$variant" "$((after - before))" "$HZ" "$out" <<'PY' >> "$results"
import sys
variant, ticks, hz, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
kv = dict(p.split("=") for p in out.split())
n = int(kv["tunnels"])
print(f"connect\t{variant}\ttunnel\t{kv['rate']}\t{int(kv['p50_us'])/1000:.3f}\t{int(kv['p99_us'])/1000:.3f}\t{ticks / hz * 1e6 / max(n, 1):.1f}\t{kv['failures']}\t")
PY
}

O="127.0.0.1:$ORIGIN"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  for size in small big; do
    run_http direct "$size" "$ORIGIN" "$PID_origin" "/$size" "$O"
    run_http sluice_forward "$size" "$SL" "$PID_sluice" "http://$O/$size" "$O"
    run_http sluice_target "$size" "$SL" "$PID_sluice" "/$size" "sluice" "http://$O"
    run_http sluice_region "$size" "$SL" "$PID_sluice" "/$size" "sluice" "http://origin.region"
    run_http sluice_tls_h1 "$size" "$SL" "$PID_sluice" "/$size" "sluice" "https://origin.h1"
    run_http sluice_tls_h2 "$size" "$SL" "$PID_sluice" "/$size" "sluice" "https://origin.h2"
    for b in "${builds[@]}"; do
      pid_var="PID_sluice_${b%%:*}"
      run_http "sluice_${b%%:*}" "$size" "${b#*:}" "${!pid_var}" "http://$O/$size" "$O"
      run_http "sluice_${b%%:*}_region" "$size" "${b#*:}" "${!pid_var}" "/$size" "sluice" "http://origin.region"
    done
    run_http pingora_floor "$size" "$PF" "$PID_pingora_floor" "/$size" "$O"
    run_http nginx_reverse "$size" "$RP" "$PID_nginx_rp" "/$size" "$O"
    run_http haproxy_reverse "$size" "$HA" "$PID_haproxy" "/$size" "$O"
    run_http squid_forward "$size" "$SQ" "$PID_squid" "http://$O/$size" "$O"
    run_http tinyproxy_forward "$size" "$TP" "$PID_tinyproxy" "http://$O/$size" "$O"
    run_http ats_forward "$size" "$ATS" "$PID_ats" "http://$O/$size" "$O"
  done
  if [ -z "$VARIANTS" ]; then
    run_connect sluice "$SL" "$PID_sluice"
    run_connect squid "$SQ" "$PID_squid"
    run_connect tinyproxy "$TP" "$PID_tinyproxy"
  fi
done

idle_rss=$(awk '/VmRSS/ {print $2}' "/proc/$PID_sluice/status")
python3 - "$results" "$ROUNDS" "$DURATION" "$CONNS" "$TUNNEL_WORKERS" "$idle_rss" <<'PY'
import statistics, sys
from collections import defaultdict
path, rounds, dur, conns, tw, rss = sys.argv[1:]
rows = defaultdict(list)
for line in open(path):
    kind, variant, size, rps, p50, p99, cpu, bad, errs = line.rstrip("\n").split("\t")
    rows[(kind, size, variant)].append((float(rps), float(p50), float(p99), float(cpu), int(bad), errs))
med = lambda xs: statistics.median(xs)
print(f"# {rounds} rounds x {dur}s, wrk -t1 -c{conns}; CONNECT with {tw} concurrent tunnels; proxy on core 0, load and origin on core 1")
print(f"# medians; cpu = proxy utime+stime per request (us). sluice RSS after the runs: {int(rss)//1024} MiB")
for size in ["small", "big", "tunnel"]:
    label = {"small": "100 B response", "big": "10 KiB response", "tunnel": "CONNECT tunnel setup"}[size]
    print(f"\n## {label}")
    print(f"| {'variant':18} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'vs direct':>9} | {'cpu us/req':>10} | {'non-2xx':>7} |")
    print("|" + "|".join(["---"] * 7) + "|")
    kind = "connect" if size == "tunnel" else "http"
    base = rows.get(("http", size, "direct"))
    base_rps = med([r[0] for r in base]) if base else None
    for (k, s, v), rs in sorted(rows.items(), key=lambda kv: -med([r[0] for r in kv[1]])):
        if k != kind or s != size:
            continue
        rps = med([r[0] for r in rs]); ratio = f"{rps / base_rps:.2f}" if base_rps else "-"
        print(f"| {v:18} | {rps:8.0f} | {med([r[1] for r in rs]):7.3f} | {med([r[2] for r in rs]):7.3f} | {ratio:>9} | {med([r[3] for r in rs]):10.1f} | {sum(r[4] for r in rs):7d} |")
PY
