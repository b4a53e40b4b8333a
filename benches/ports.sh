# Loopback ports for the benchmark scripts (sourced by load.sh, memory.sh, instructions.sh).
#
#   free_port                 # a port nothing listens on now
#   wait_port PORT [TENTHS]   # until something listens on PORT (at most TENTHS x 0.1 s, 100 by
#                             # default); else the tail of "$work"'s logs, and failure

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() {
  for _ in $(seq 1 "${2:-100}"); do
    python3 -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$1)))" && return 0
    sleep 0.1
  done
  echo "nothing listens on $1; logs:" >&2
  tail -n 5 "${work:-/nonexistent}"/*.out "${work:-/nonexistent}"/*.err "${work:-/nonexistent}"/*.log 2>/dev/null >&2 || true
  return 1
}
