"""gRPC through sluice, with grpcio's own server and client: a unary and a server-streaming
call through a route (h2c from the client, h2c to the server) and through an intercepted
tunnel (h2 by ALPN inside the client's TLS, h2 over TLS to the server), each with its status
and trailing metadata; and a RESOURCE_EXHAUSTED from the server pauses the host for every
caller."""

from __future__ import annotations

import pathlib
import subprocess
from concurrent import futures

import grpc
import pytest

from conftest import sluice_binary

SERVICE = "echo.Echo"
HOST = "api.example.test"


def say(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.set_trailing_metadata((("x-echo-trailer", "kept"),))
    return b"pong:" + request


def count(request: bytes, context: grpc.ServicerContext):
    for i in range(3):
        yield f"part {i}".encode()


def busy(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota spent")


def grpc_server(credentials=None):
    """A grpcio server of `echo.Echo` on 127.0.0.1 (bytes in, bytes out): the server and
    its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Busy": grpc.unary_unary_rpc_method_handler(busy),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


def calls_pass(channel: grpc.Channel) -> None:
    """The unary and the server-streaming call, with their status and trailing metadata."""
    answer, call = channel.unary_unary(f"/{SERVICE}/Say").with_call(b"ping", timeout=10)
    assert answer == b"pong:ping"
    assert call.code() == grpc.StatusCode.OK
    assert ("x-echo-trailer", "kept") in call.trailing_metadata()
    stream = channel.unary_stream(f"/{SERVICE}/Count")(b"go", timeout=10)
    assert list(stream) == [b"part 0", b"part 1", b"part 2"]
    assert stream.code() == grpc.StatusCode.OK


def test_grpc_through_a_route_keeps_its_status_and_resource_exhausted_pauses_the_host(start_sluice):
    server, port = grpc_server()
    try:
        s = start_sluice(
            f"""
[[routes]]
prefix = "/{SERVICE}"
target = "http://127.0.0.1:{port}/{SERVICE}"
[hosts."127.0.0.1"]
rps = 0
"""
        )
        with grpc.insecure_channel(f"127.0.0.1:{s.port}") as channel:
            calls_pass(channel)
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary(f"/{SERVICE}/Busy")(b"more", timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert e.value.details() == "quota spent"
            # The host is paused: a call that may wait 100 ms is refused by sluice at once
            # (its 429 reaches a gRPC client as UNAVAILABLE), and never reaches the server.
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary(f"/{SERVICE}/Say")(
                    b"ping", timeout=10, metadata=(("sluice-timeout", "100ms"),)
                )
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "429" in (e.value.details() or ""), e.value.details()
        log = s.log.read_text()
        assert 'protocol="h2" upstream_protocol="h2"' in log, log
    finally:
        server.stop(None)


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def test_grpc_through_an_intercepted_tunnel_over_tls(start_sluice, tmp_path: pathlib.Path):
    # The server's certificate, for HOST, signed by a CA that sluice trusts.
    d = tmp_path
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"),
            "-out", str(d / "ca.pem"), "-days", "2", "-subj", "/CN=grpc-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "leaf.key"),
            "-out", str(d / "leaf.csr"), "-subj", f"/CN={HOST}")
    (d / "leaf.ext").write_text(f"subjectAltName=DNS:{HOST}\n")
    openssl("x509", "-req", "-in", str(d / "leaf.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "leaf.pem"),
            "-days", "2", "-extfile", str(d / "leaf.ext"))
    credentials = grpc.ssl_server_credentials(
        [((d / "leaf.key").read_bytes(), (d / "leaf.pem").read_bytes())]
    )
    server, port = grpc_server(credentials)
    try:
        # sluice's own CA, which the client trusts for the intercepted host.
        subprocess.run([str(sluice_binary()), "ca", "init", str(d / "sluice-ca")], check=True,
                       capture_output=True)
        s = start_sluice(
            f"""
[resolve]
"{HOST}:443" = ["127.0.0.1:{port}"]
[intercept]
hosts = ["{HOST}"]
ca_cert = "{d / 'sluice-ca' / 'ca.pem'}"
ca_key = "{d / 'sluice-ca' / 'ca.key'}"
[hosts."{HOST}"]
rps = 0
""",
            server_extra=f'upstream_ca_file = "{d / "ca.pem"}"',
        )
        trust = grpc.ssl_channel_credentials(
            root_certificates=(d / "sluice-ca" / "ca.pem").read_bytes()
        )
        options = [("grpc.http_proxy", f"http://127.0.0.1:{s.port}")]
        with grpc.secure_channel(f"{HOST}:443", trust, options=options) as channel:
            calls_pass(channel)
        log = s.log.read_text()
        assert 'way="intercept"' in log and 'protocol="h2" upstream_protocol="h2"' in log, log
    finally:
        server.stop(None)
