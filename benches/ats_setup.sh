# Apache Traffic Server as a forward proxy for the benchmarks (sourced by load.sh and
# memory.sh): one exec thread, no cache, no remap required, its files under DIR.
#
#   ats_setup DIR PORT [NAME=INT_VALUE ...]   # extra integer settings, e.g. throttles
ats_setup() {
  local dir=$1 port=$2; shift 2
  mkdir -p "$dir/run" "$dir/log" "$dir/cache"
  cp -r /etc/trafficserver "$dir/conf"
  python3 - "$dir" "$port" "$(id -u)" "$@" <<'PY'
import re, sys
d, port, uid, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
path = f"{d}/conf/records.config"
text = open(path).read()
# traffic_server refuses to run as root; as root it switches to its own user.
user = "trafficserver" if uid == "0" else "#-1"
settings = [
    ("proxy.config.http.server_ports", "STRING", port),
    ("proxy.config.exec_thread.autoconfig", "INT", "0"),
    ("proxy.config.exec_thread.limit", "INT", "1"),
    ("proxy.config.exec_thread.affinity", "INT", "0"),
    ("proxy.config.accept_threads", "INT", "0"),
    ("proxy.config.task_threads", "INT", "1"),
    ("proxy.config.http.cache.http", "INT", "0"),
    ("proxy.config.cache.ram_cache.size", "INT", "0"),
    ("proxy.config.url_remap.remap_required", "INT", "0"),
    ("proxy.config.admin.user_id", "STRING", user),
    ("proxy.config.local_state_dir", "STRING", f"{d}/run"),
    ("proxy.config.log.logfile_dir", "STRING", f"{d}/log"),
    ("proxy.config.log.logging_enabled", "INT", "0"),
    ("proxy.config.http.keep_alive_no_activity_timeout_in", "INT", "300"),
    ("proxy.config.http.insert_request_via_str", "INT", "0"),
    ("proxy.config.http.insert_response_via_str", "INT", "0"),
    ("proxy.config.body_factory.template_sets_dir", "STRING", "/etc/trafficserver/body_factory"),
]
settings += [(kv.split("=", 1)[0], "INT", kv.split("=", 1)[1]) for kv in extra]
for name, typ, value in settings:
    line = f"CONFIG {name} {typ} {value}"
    pat = re.compile(r"^CONFIG " + re.escape(name) + r" \S+ .*$", re.M)
    text = pat.sub(line, text) if pat.search(text) else text + "\n" + line
open(path, "w").write(text)
open(f"{d}/conf/storage.config", "w").write(f"{d}/cache 64M\n")
PY
  if [ "$(id -u)" = 0 ]; then chown -R trafficserver "$dir/run" "$dir/log" "$dir/cache"; fi
}
