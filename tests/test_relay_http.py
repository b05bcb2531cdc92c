"""The relay's HTTP surface over real sockets: probes, generate_204, 426, home page, bad requests."""

from __future__ import annotations

import trio
from derppeer import RelayHandle


async def http_exchange(relay: RelayHandle, request: bytes) -> bytes:
    """Send raw request bytes; return everything the relay sends until it closes."""
    stream = await trio.open_tcp_stream(relay.host, relay.port)
    async with stream:
        await stream.send_all(request)
        out = b""
        with trio.fail_after(5):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return out
                out += chunk


def get(path: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: relay.test", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


async def test_generate_204_echoes_valid_challenge(relay_http: RelayHandle) -> None:
    resp = await http_exchange(relay_http, get("/generate_204", "X-Tailscale-Challenge: ts_abc-1.2:3"))
    assert resp.startswith(b"HTTP/1.1 204 ")
    assert b"\r\nX-Tailscale-Response: response ts_abc-1.2:3\r\n" in resp
    assert b"Cache-Control: no-cache, no-store, must-revalidate, no-transform, max-age=0" in resp


async def test_generate_204_ignores_invalid_challenges(relay_http: RelayHandle) -> None:
    for bad in ("has space", "x" * 65, "semi;colon"):
        resp = await http_exchange(relay_http, get("/generate_204", f"X-Tailscale-Challenge: {bad}"))
        assert resp.startswith(b"HTTP/1.1 204 ")
        assert b"X-Tailscale-Response" not in resp


async def test_probe_and_latency_check(relay_http: RelayHandle) -> None:
    for path in ("/derp/probe", "/derp/latency-check"):
        for method in ("GET", "HEAD"):
            resp = await http_exchange(relay_http, get(path, method=method))
            assert resp.startswith(b"HTTP/1.1 200 "), resp
            assert b"Access-Control-Allow-Origin: *" in resp
        resp = await http_exchange(relay_http, get(path, "Content-Length: 0", method="POST"))
        assert resp.startswith(b"HTTP/1.1 405 ")
        assert resp.endswith(b"bogus probe method\n")


async def test_derp_without_upgrade_is_426(relay_http: RelayHandle) -> None:
    resp = await http_exchange(relay_http, get("/derp"))
    assert resp.startswith(b"HTTP/1.1 426 ")
    assert resp.endswith(b"DERP requires connection upgrade\n")
    resp = await http_exchange(relay_http, get("/derp", "Upgrade: h2c", "Connection: Upgrade"))
    assert resp.startswith(b"HTTP/1.1 426 ")


async def test_robots_and_home(relay_http: RelayHandle) -> None:
    resp = await http_exchange(relay_http, get("/robots.txt"))
    assert resp.endswith(b"\r\n\r\nUser-agent: *\nDisallow: /\n")
    resp = await http_exchange(relay_http, get("/anything/else"))
    assert resp.startswith(b"HTTP/1.1 200 ")
    assert b"X-Frame-Options: DENY" in resp and b"X-Content-Type-Options: nosniff" in resp
    assert b"DERP relay server" in resp


async def test_keep_alive_serves_several_requests(relay_http: RelayHandle) -> None:
    stream = await trio.open_tcp_stream(relay_http.host, relay_http.port)
    async with stream:
        two = b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n" * 2
        await stream.send_all(two)
        got = b""
        with trio.fail_after(5):
            while got.count(b"HTTP/1.1 200 ") < 2:
                got += await stream.receive_some(65536)


async def test_garbage_request_gets_400_and_is_counted(relay_http: RelayHandle) -> None:
    resp = await http_exchange(relay_http, b"\x16\x03\x01 this is not http\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 400 ")
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    assert stats.protocol_errors["bad_http_request"] == 1


async def test_oversized_headers_are_refused(relay_http: RelayHandle) -> None:
    resp = await http_exchange(relay_http, get("/", "X-Big: " + "a" * 40000))
    assert resp.startswith(b"HTTP/1.1 431 ")


async def test_port_80_side_listener_of_a_tls_relay(nursery: trio.Nursery) -> None:
    """In TLS mode the plain listener serves only /generate_204; DERP is never served there."""
    from natlib.keys import NodePrivateKey
    from relay import RelayServer

    key = NodePrivateKey.generate()
    server = RelayServer(key)
    bound = await nursery.start(
        lambda task_status: server.serve_tcp("127.0.0.1", 0, http_side_listener=True, task_status=task_status)
    )
    side = RelayHandle(server, "127.0.0.1", int(bound[0][1]), key.public)
    resp = await http_exchange(side, get("/generate_204", "X-Tailscale-Challenge: abc"))
    assert resp.startswith(b"HTTP/1.1 204 ")
    assert b"X-Tailscale-Response: response abc" in resp
    resp = await http_exchange(side, get("/derp?x=1", "Upgrade: DERP", "Connection: Upgrade"))
    assert resp.startswith(b"HTTP/1.1 302 ")
    assert b"\r\nLocation: https://relay.test/derp?x=1\r\n" in resp
    resp = await http_exchange(side, get("/", "Content-Length: 0", method="POST"))
    assert resp.startswith(b"HTTP/1.1 400 ")
    assert resp.endswith(b"Use HTTPS\n")


async def test_derp_disabled_and_home_variants(nursery: trio.Nursery) -> None:
    from natlib.keys import NodePrivateKey
    from relay import RelayServer

    for home, expect in (("blank", b"HTTP/1.1 200 "), ("https://example.com/", b"HTTP/1.1 302 ")):
        key = NodePrivateKey.generate()
        server = RelayServer(key, derp_enabled=False, home=home)
        bound = await nursery.start(
            lambda task_status, s=server: s.serve_tcp("127.0.0.1", 0, task_status=task_status)
        )
        h = RelayHandle(server, "127.0.0.1", int(bound[0][1]), key.public)
        resp = await http_exchange(h, get("/derp", "Upgrade: DERP", "Connection: Upgrade"))
        assert resp.startswith(b"HTTP/1.1 404 ")
        assert resp.endswith(b"derp server disabled\n")
        resp = await http_exchange(h, get("/"))
        assert resp.startswith(expect)
        if home == "blank":
            assert resp.endswith(b"\r\n\r\n")
        else:
            assert b"\r\nLocation: https://example.com/\r\n" in resp
