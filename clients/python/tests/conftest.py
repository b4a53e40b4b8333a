"""Test helpers: the real sluice binary on free ports, and programmable fake upstreams on
127.0.0.1 (a thread each). Nothing here leaves loopback; every process started is stopped
by its PID."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional

import httpx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sluice_binary() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("SLUICE_BIN", ROOT / "target" / "debug" / "sluice"))
    if not path.exists():
        if os.environ.get("SLUICE_BIN"):
            raise RuntimeError(f"SLUICE_BIN={path} does not exist")
        pytest.skip(f"no sluice binary at {path} (build it with cargo build, or set SLUICE_BIN)")
    return path


class Sluice:
    """A running sluice process on free ports."""

    def __init__(self, tmp: pathlib.Path, extra: str = "", server_extra: str = "") -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = f"""
[server]
listen = "127.0.0.1:{self.port}"
admin_listen = "127.0.0.1:{self.admin_port}"
threads = 2
state_dir = "{tmp / 'state'}"
pid_file = "{tmp / 'sluice.pid'}"
upgrade_sock = "{tmp / 'upgrade.sock'}"
dns_servers = ["127.0.0.1:{free_port()}"]
{server_extra}
[security]
allow_cidrs = ["127.0.0.0/8"]
[webhooks]
backoff_base = "50ms"
backoff_max = "300ms"
[webhooks.secrets]
main = "{SECRET}"
{extra}
"""
        path = tmp / "sluice.toml"
        path.write_text(config)
        self.log = tmp / "sluice.log"
        out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [str(sluice_binary()), "--config", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
        deadline = time.time() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sluice exited: {self.log.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.admin_port}/healthz", timeout=1).status_code == 200:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        break
            except (httpx.HTTPError, OSError):
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("sluice did not become healthy in 20 s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


Handler = Callable[[BaseHTTPRequestHandler, bytes], None]


class Upstream:
    """An HTTP/1.1 server on 127.0.0.1: ``routes`` maps a path prefix to a handler that
    answers; every request is recorded (method, path, headers, body, time)."""

    def __init__(self, routes: Dict[str, Handler]) -> None:
        self.requests: List[dict] = []
        self.lock = threading.Lock()
        upstream = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                with upstream.lock:
                    upstream.requests.append(
                        {
                            "method": self.command,
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                            "at": time.monotonic(),
                        }
                    )
                for prefix, handler in routes.items():
                    if self.path.startswith(prefix):
                        handler(self, body)
                        return
                answer(self, 404, b"no route")

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, prefix: str = "") -> int:
        with self.lock:
            return sum(1 for r in self.requests if r["path"].startswith(prefix))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: Optional[dict] = None) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@pytest.fixture
def start_sluice(tmp_path: pathlib.Path):
    started: List[Sluice] = []

    def start(extra: str = "", server_extra: str = "") -> Sluice:
        d = tmp_path / f"s{len(started)}"
        d.mkdir()
        s = Sluice(d, extra, server_extra)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def upstream():
    made: List[Upstream] = []

    def make(routes: Dict[str, Handler]) -> Upstream:
        u = Upstream(routes)
        made.append(u)
        return u

    yield make
    for u in made:
        u.close()
