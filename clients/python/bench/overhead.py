"""What SluiceTransport adds to a call that goes straight to the API (FRUGAL, answered 200),
in microseconds per call, against a plain httpx client in the same run, interleaved:

- in process: both clients over httpx.MockTransport, so only the transports' own work counts;
- over loopback: both clients against one keep-alive HTTP/1.1 server on 127.0.0.1.

Run: python clients/python/bench/overhead.py   (needs httpx and the package installed)
"""

import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from sluice_client import SluiceTransport

CALLS = 2000
ROUNDS = 5


class Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One write per answer, sent at once (no delayed-ACK stall between head and body).
    wbufsize = 65536
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


def per_call_us(client, url):
    start = time.perf_counter()
    for _ in range(CALLS):
        client.get(url).read()
    return (time.perf_counter() - start) / CALLS * 1e6


def compare(name, plain, wrapped, url):
    a, b = [], []
    for _ in range(ROUNDS):
        a.append(per_call_us(plain, url))
        b.append(per_call_us(wrapped, url))
    pa, pb = statistics.median(a), statistics.median(b)
    print(f"{name}: plain {pa:.1f} us/call, with SluiceTransport {pb:.1f} us/call: "
          f"+{pb - pa:.1f} us ({pb / pa:.2f}x), medians of {ROUNDS} rounds of {CALLS}")


def main():
    mock = lambda: httpx.MockTransport(lambda r: httpx.Response(200, content=b"ok"))
    with httpx.Client(transport=mock()) as plain, httpx.Client(
        transport=SluiceTransport("http://127.0.0.1:9", mode="frugal", direct=mock())
    ) as wrapped:
        compare("in process", plain, wrapped, "http://api.test/x")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/x"
    with httpx.Client() as plain, httpx.Client(
        transport=SluiceTransport("http://127.0.0.1:9", mode="frugal")
    ) as wrapped:
        compare("over loopback", plain, wrapped, url)
    server.shutdown()


if __name__ == "__main__":
    main()
