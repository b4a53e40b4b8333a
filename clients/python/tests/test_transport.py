"""The transports and the requests adapter against the real sluice and fake upstreams."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import requests

from conftest import answer, free_port
from sluice_client import AsyncSluiceTransport, SluiceAdapter, SluiceTransport


def ok(h, body):
    answer(h, 200, b"ok", {"X-Seen-Via": h.headers.get("via", "")})


def test_performance_goes_through_sluice(start_sluice, upstream):
    up = upstream({"/": ok})
    sluice = start_sluice()
    transport = SluiceTransport(sluice.url, sluice_mode="single", sluice_timeout="5s")
    with httpx.Client(transport=transport) as client:
        r = client.get(f"{up.url}/v1/items?page=2")
    assert r.status_code == 200
    assert "sluice" in r.headers["x-seen-via"], "the call passed through sluice"
    assert r.headers["sluice-attempts"] == "1"
    assert up.requests[0]["path"] == "/v1/items?page=2"
    assert up.requests[0]["headers"]["host"] == f"127.0.0.1:{up.port}"
    assert not any(k.startswith("sluice-") for k in up.requests[0]["headers"])
    assert (transport.stats.via_sluice, transport.stats.direct) == (1, 0)


def test_sluice_stopped_calls_still_succeed_directly(start_sluice, upstream):
    up = upstream({"/": ok})
    sluice = start_sluice()
    transport = SluiceTransport(sluice.url)
    with httpx.Client(transport=transport) as client:
        assert client.get(f"{up.url}/a").status_code == 200
        sluice.stop()
        r = client.post(f"{up.url}/b", content=b"payload")
    assert r.status_code == 200
    assert r.headers["x-seen-via"] == "", "straight to the API"
    assert up.requests[-1]["body"] == b"payload"
    assert transport.stats.sluice_unavailable == 1
    assert (transport.stats.via_sluice, transport.stats.direct) == (1, 1)


def test_frugal_waits_out_a_429_through_sluice(start_sluice, upstream):
    # A real limiter: after a refusal, everything in the next second is refused too.
    window = {"until": 0.0}
    lock = threading.Lock()

    def limited(h, body):
        with lock:
            now = time.monotonic()
            first = window["until"] == 0.0
            if first or now < window["until"]:
                if first:
                    window["until"] = now + 1.0
                answer(h, 429, b"slow down", {"Retry-After": "1"})
                return
        answer(h, 200, b"done")

    up = upstream({"/": limited})
    sluice = start_sluice()
    transport = SluiceTransport(sluice.url, mode="frugal")
    started = time.monotonic()
    with httpx.Client(transport=transport, timeout=20) as client:
        r = client.post(f"{up.url}/charge", content=b"{}")
    assert r.status_code == 200 and r.text == "done"
    times = [q["at"] - started for q in up.requests]
    assert len(times) == 3, "direct 429, sluice's 429, sluice's resend after the pause"
    assert times[2] - times[0] >= 1.0, times
    assert transport.stats.fell_back_to_sluice == 1
    print(f"FRUGAL: 429 direct, answered through sluice {times[2] - times[0]:.2f} s later")


def test_frugal_does_not_resend_a_post_that_got_a_503(start_sluice, upstream):
    up = upstream({"/": lambda h, b: answer(h, 503, b"busy")})
    sluice = start_sluice()
    transport = SluiceTransport(sluice.url, mode="frugal")
    with httpx.Client(transport=transport) as client:
        r = client.post(f"{up.url}/pay", content=b"{}")
        assert r.status_code == 503
        assert up.count("/pay") == 1, "a POST without Idempotency-Key is sent once"
        assert transport.stats.fell_back_to_sluice == 0
        r = client.post(f"{up.url}/pay", content=b"{}", headers={"Idempotency-Key": "k1"})
    assert transport.stats.fell_back_to_sluice == 1
    assert up.count("/pay") >= 3, "with a key it may go again, through sluice"
    assert r.status_code == 503


def test_frugal_after_a_connect_error_goes_through_sluice(start_sluice, upstream):
    sluice = start_sluice()
    dead = free_port()
    transport = SluiceTransport(sluice.url, mode="frugal")
    with httpx.Client(transport=transport) as client:
        r = client.get(f"http://127.0.0.1:{dead}/x")
    # sluice could not reach it either, and says so itself.
    assert r.status_code == 502
    assert r.headers["sluice-error"] == "connect_refused"
    assert transport.stats.fell_back_to_sluice == 1


def test_performance_keeps_a_streamed_response_streaming(start_sluice, upstream):
    got_first = threading.Event()
    waited = {}

    def stream(h, body):
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def chunk(data: bytes) -> None:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        chunk(b"first ")
        # The rest only once the client has the first chunk: a buffered answer never would.
        waited["in_time"] = got_first.wait(10)
        chunk(b"second")
        h.wfile.write(b"0\r\n\r\n")

    up = upstream({"/": stream})
    sluice = start_sluice()
    with httpx.Client(transport=SluiceTransport(sluice.url), timeout=20) as client:
        started = time.monotonic()
        with client.stream("GET", f"{up.url}/events") as r:
            chunks = r.iter_raw()
            first = next(chunks)
            ttfb = time.monotonic() - started
            got_first.set()
            rest = b"".join(chunks)
    assert first + rest == b"first second"
    assert waited["in_time"], "the first chunk reached the client before the upstream went on"
    print(f"PERFORMANCE streaming: time to first byte {ttfb * 1000:.1f} ms")


def test_sluices_own_503_sends_the_call_direct(start_sluice, upstream):
    up = upstream({"/": ok})
    # on_error = "throttle" with an unreachable Redis: sluice answers its own 503.
    sluice = start_sluice(
        f'[shared]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:{free_port()}"\n'
        'on_error = "throttle"\n'
    )
    transport = SluiceTransport(sluice.url)
    with httpx.Client(transport=transport, timeout=20) as client:
        r = client.get(f"{up.url}/x")
    assert r.status_code == 200 and r.headers["x-seen-via"] == ""
    assert transport.stats.sluice_unavailable == 1


def test_async_transport_falls_back_the_same_way(start_sluice, upstream):
    up = upstream({"/": ok})
    sluice = start_sluice()

    async def main():
        transport = AsyncSluiceTransport(sluice.url)
        async with httpx.AsyncClient(transport=transport) as client:
            a = await client.get(f"{up.url}/a")
            sluice.stop()
            b = await client.get(f"{up.url}/b")
        return transport, a, b

    transport, a, b = asyncio.run(main())
    assert "sluice" in a.headers["x-seen-via"] and b.headers["x-seen-via"] == ""
    assert (transport.stats.via_sluice, transport.stats.direct) == (1, 1)


def test_requests_adapter_routes_and_falls_back(start_sluice, upstream):
    up = upstream({"/": ok})
    sluice = start_sluice()
    adapter = SluiceAdapter(sluice.url, sluice_timeout="5s")
    session = requests.Session()
    session.mount("http://", adapter)
    r = session.post(f"{up.url}/a?x=1", data=b"body", timeout=10)
    assert r.status_code == 200 and "sluice" in r.headers["x-seen-via"]
    assert r.request.url == f"{up.url}/a?x=1"
    assert up.requests[0]["body"] == b"body" and up.requests[0]["path"] == "/a?x=1"
    sluice.stop()
    r = session.get(f"{up.url}/b", timeout=10)
    assert r.status_code == 200 and r.headers["x-seen-via"] == ""
    assert adapter.stats.sluice_unavailable == 1


def test_requests_adapter_frugal_does_not_resend_a_post(start_sluice, upstream):
    up = upstream({"/": lambda h, b: answer(h, 502, b"bad gateway")})
    sluice = start_sluice()
    session = requests.Session()
    session.mount("http://", SluiceAdapter(sluice.url, mode="frugal"))
    assert session.post(f"{up.url}/pay", data=b"{}", timeout=10).status_code == 502
    assert up.count("/pay") == 1


def test_bad_options_are_refused():
    with pytest.raises(ValueError):
        SluiceTransport("http://127.0.0.1:8080", mode="fast")
    with pytest.raises(ValueError):
        SluiceTransport("127.0.0.1:8080")
