#!/usr/bin/env python3
"""A fleet at its limit: N sluice nodes sharing one redis-server, one host limited to RPS
requests/s (burst 1), every node driven flat out by CLIENTS keep-alive clients sending
`Sluice-Timeout: 1s`. For each N, over DURATION seconds after WARM seconds of the same load:

- admitted: requests that reached the upstream per second, and their ratio to the limit;
- spread: the busiest node's share of those over the least busy node's;
- Redis commands per admitted request, from `INFO commandstats` (every command Redis ran,
  those inside Lua scripts included), and the round trips the nodes made (their
  `sluice_shared_redis_calls_total`), by operation;
- queue wait of admitted requests (p50, p99: answer time at the client, the upstream answers
  at once).

Everything listens on 127.0.0.1 on ports the kernel picked. Run by benches/fleet_scale.sh.
"""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

SLUICE = os.environ["SLUICE_BIN"]
NODES = [int(n) for n in os.environ.get("NODES", "1 2 4 8").split()]
RPS = float(os.environ.get("RPS", "100"))
CLIENTS = int(os.environ.get("CLIENTS", "6"))
WARM = float(os.environ.get("WARM", "5"))
DURATION = float(os.environ.get("DURATION", "15"))
REDIS = os.environ.get("REDIS_SERVER", "redis-server")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream:
    """Answers every request at once with 200; counts arrivals per `x-node`."""

    def __init__(self):
        self.counts = {}
        self.counting = False

    async def handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?im)^x-node:\s*(\d+)", head)
                if self.counting and m:
                    n = int(m.group(1))
                    self.counts[n] = self.counts.get(n, 0) + 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def redis_command(port, *args):
    """One command over RESP; returns the reply's text."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        out = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
        s.sendall(out.encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"$"):
                first, _, rest = data.partition(b"\r\n")
                if len(rest) >= int(first[1:]) + 2:
                    return rest[: int(first[1:])].decode()
            elif data.endswith(b"\r\n"):
                return data.decode()


def commandstats(port):
    stats = {}
    for line in redis_command(port, "INFO", "commandstats").splitlines():
        m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
        if m:
            stats[m.group(1)] = int(m.group(2))
    return stats


def node_calls(admin):
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    calls = {}
    for m in re.finditer(r'sluice_shared_redis_calls_total\{op="([a-z_]+)"\} (\d+)', text):
        calls[m.group(1)] = calls.get(m.group(1), 0) + int(m.group(2))
    return calls


async def client(proxy_port, up_port, node, stop_at, window, waits, statuses):
    request = (
        f"GET http://127.0.0.1:{up_port}/work HTTP/1.1\r\nHost: 127.0.0.1:{up_port}\r\n"
        f"x-node: {node}\r\nSluice-Timeout: 1s\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    try:
        while time.monotonic() < stop_at:
            sent = time.monotonic()
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if m:
                await reader.readexactly(int(m.group(1)))
            took = time.monotonic() - sent
            if window[0] <= sent < window[1]:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    waits.append(took)
            if status != 200 and b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    finally:
        writer.close()


def start_node(tmp, i, redis_port, up_port):
    proxy, admin = free_port(), free_port()
    d = os.path.join(tmp, f"node{i}")
    os.makedirs(d, exist_ok=True)
    config = f"""[server]
listen = "127.0.0.1:{proxy}"
admin_listen = "127.0.0.1:{admin}"
threads = 1
pid_file = "{d}/sluice.pid"
upgrade_sock = "{d}/upgrade.sock"
state_dir = "{d}/state"

[security]
allow_cidrs = ["127.0.0.0/8"]

[shared]
backend = "redis"
redis_url = "redis://127.0.0.1:{redis_port}"

[hosts."127.0.0.1:{up_port}"]
rps = {RPS}
burst = 1
"""
    path = os.path.join(d, "sluice.toml")
    with open(path, "w") as f:
        f.write(config)
    log = open(os.path.join(d, "sluice.log"), "w")
    p = subprocess.Popen([SLUICE, "--config", path], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=1):
                return p, proxy, f"127.0.0.1:{admin}"
        except OSError:
            time.sleep(0.1)
    p.kill()
    raise SystemExit(f"node {i} did not start: see {d}/sluice.log")


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(n, tmp, up, up_port):
    redis_port = free_port()
    redis = subprocess.Popen(
        [REDIS, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    nodes = []
    try:
        for _ in range(50):
            try:
                redis_command(redis_port, "PING")
                break
            except OSError:
                time.sleep(0.1)
        nodes = [start_node(tmp, f"{n}-{i}", redis_port, up_port) for i in range(n)]
        start = time.monotonic()
        window = (start + WARM, start + WARM + DURATION)
        waits, statuses = [], {}
        tasks = [
            asyncio.create_task(client(p, up_port, i, window[1], window, waits, statuses))
            for i, (_, p, _) in enumerate(nodes)
            for _ in range(CLIENTS)
        ]
        await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
        before = commandstats(redis_port)
        calls_before = [node_calls(a) for (_, _, a) in nodes]
        up.counts, up.counting = {}, True
        await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
        up.counting = False
        after = commandstats(redis_port)
        calls_after = [node_calls(a) for (_, _, a) in nodes]
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for p, _, _ in nodes:
            p.send_signal(signal.SIGTERM)
        for p, _, _ in nodes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        redis.kill()
        redis.wait()
    admitted = sum(up.counts.values())
    shares = [up.counts.get(i, 0) for i in range(n)]
    commands = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    commands = {k: v for k, v in commands.items() if v > 0 and k != "info"}
    trips = {}
    for b, a in zip(calls_before, calls_after):
        for op, v in a.items():
            trips[op] = trips.get(op, 0) + v - b.get(op, 0)
    trips = {k: v for k, v in trips.items() if v > 0}
    return {
        "nodes": n,
        "admitted_per_s": admitted / DURATION,
        "of_limit": admitted / DURATION / RPS,
        "shares": shares,
        "spread": (max(shares) / min(shares)) if min(shares) > 0 else float("inf"),
        "redis_commands": sum(commands.values()),
        "commands_per_admitted": sum(commands.values()) / max(admitted, 1),
        "commands": commands,
        "round_trips_per_admitted": sum(trips.values()) / max(admitted, 1),
        "round_trips": trips,
        "wait_p50_ms": pct(waits, 0.5) * 1000,
        "wait_p99_ms": pct(waits, 0.99) * 1000,
        "statuses": statuses,
    }


async def main():
    up = Upstream()
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in NODES:
            r = await run(n, tmp, up, up_port)
            print(json.dumps(r), file=sys.stderr)
            results.append(r)
    server.close()
    print(f"\nlimit {RPS:g}/s (burst 1), {CLIENTS} clients per node, Sluice-Timeout 1s, "
          f"{WARM:g} s warm-up, {DURATION:g} s measured\n")
    print("| nodes | admitted/s | of limit | per node (min-max) | spread | Redis cmds / admitted "
          "| round trips / admitted | wait p50 | wait p99 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['nodes']} | {r['admitted_per_s']:.1f} | {r['of_limit']:.3f} | "
            f"{min(r['shares'])}-{max(r['shares'])} | {r['spread']:.2f} | "
            f"{r['commands_per_admitted']:.3f} | {r['round_trips_per_admitted']:.3f} | "
            f"{r['wait_p50_ms']:.0f} ms | {r['wait_p99_ms']:.0f} ms |"
        )
    print()
    for r in results:
        print(f"N={r['nodes']}: Redis commands {r['commands']}; round trips {r['round_trips']}; "
              f"answers {r['statuses']}")


asyncio.run(main())
