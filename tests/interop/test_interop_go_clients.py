"""Tailscale's Go DERP client (tailscale.com/derp/derphttp, via derpcheck) against our relay.

Every test exchanges real traffic between a Go client and one of ours (natlib.derphttp) through
the relay on 127.0.0.1: packets both ways byte for byte, Ping/Pong, PeerGone(Disconnected) when the
Go client leaves, and a Go mesh watcher's PeerPresent/PeerGone. Transports: TLS 1.3 with the
meta-certificate (derphttp then uses fast start, checked on the relay side), plain HTTP, and
WebSocket (derphttp's debug WebSocket dialer, compiled in with ts_debug_websockets and switched on
by TS_DEBUG_DERP_WS_CLIENT=1). Not covered: mesh between our relay and derper (our -mesh-with is
not implemented yet, issue 7).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import trio
from derppeer import Peer, RelayHandle
from interop_support import (
    GO_EXCHANGE_ARGS,
    derpcheck_client,
    exchange,
    free_tcp_port,
    free_udp_port,
    go_binary,
    requires_binaries,
    spawn,
    wait_for_file_line,
)

import relay._server as relay_server_module
from natlib.derphttp import connect
from natlib.keys import NodePrivateKey, NodePublicKey
from relay._http import DerpUpgrade, WebSocketUpgrade
from relay._stun_server import StunStats, serve_stun

pytestmark = requires_binaries


def spy_on_upgrades(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record every routing decision of the in-process relay (DerpUpgrade has ``fast_start``)."""
    decisions: list[object] = []
    real_route = relay_server_module.route

    def route(*args: object, **kwargs: object) -> object:
        decision = real_route(*args, **kwargs)  # type: ignore[arg-type]
        decisions.append(decision)
        return decision

    monkeypatch.setattr(relay_server_module, "route", route)
    return decisions


async def test_go_client_tls13_fast_start(
    relay_https: RelayHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decisions = spy_on_upgrades(monkeypatch)
    ca_file = tmp_path / "ca.pem"
    relay_https.ca.cert_pem.write_to_path(str(ca_file))  # type: ignore[union-attr]
    go_key, our_key = NodePrivateKey.generate(), NodePrivateKey.generate()
    async with await connect(relay_https.url, our_key, ssl_context=relay_https.client_ssl_context) as ours:
        before = len(decisions)
        argv = derpcheck_client(
            relay_https.url, "-ca", ca_file, "-want-metacert", "true",
            "-send-to", our_key.public.text(), *GO_EXCHANGE_ARGS, key=go_key,
        )  # fmt: skip
        async with spawn("derpcheck", argv, tmp_path) as go:
            connected = await go.event("connected")
            assert connected["tls_version"] == "TLS 1.3"
            assert connected["metacert"] is True
            await exchange(go, connected, ours, go_key, relay_https.server_key)
    # derphttp found our meta-certificate, so it sent Derp-Fast-Start: 1 with its ClientInfo and
    # the relay answered with no HTTP response at all. (Checked after the exchange: with fast start
    # derphttp's Connect returns before the relay has even read the request.)
    upgrades = [d for d in decisions[before:] if isinstance(d, DerpUpgrade)]
    assert upgrades == [DerpUpgrade(fast_start=True, ideal_node=None)], decisions[before:]
    assert relay_https.relay.stats.got_ping >= 3  # type: ignore[attr-defined]


async def test_go_client_plain_http(
    relay_http: RelayHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decisions = spy_on_upgrades(monkeypatch)
    go_key, our_key = NodePrivateKey.generate(), NodePrivateKey.generate()
    async with await connect(relay_http.url, our_key) as ours:
        before = len(decisions)
        peer = our_key.public.text()
        argv = derpcheck_client(relay_http.url, "-send-to", peer, *GO_EXCHANGE_ARGS, key=go_key)
        async with spawn("derpcheck", argv, tmp_path) as go:
            connected = await go.event("connected")
            assert "tls_version" not in connected
            await exchange(go, connected, ours, go_key, relay_http.server_key)
    upgrades = [d for d in decisions[before:] if isinstance(d, DerpUpgrade)]
    assert upgrades == [DerpUpgrade(fast_start=False, ideal_node=None)], decisions[before:]


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_go_client_websocket(
    scheme: str,
    relay_http: RelayHandle,
    relay_https: RelayHandle,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay = relay_https if scheme == "https" else relay_http
    decisions = spy_on_upgrades(monkeypatch)
    env = {"TS_DEBUG_DERP_WS_CLIENT": "1"}
    if scheme == "https":
        # derphttp's WebSocket dialer uses Go's default HTTP client: trust our test CA through the
        # system roots (SSL_CERT_FILE), not -ca.
        ca_file = tmp_path / "ca.pem"
        relay.ca.cert_pem.write_to_path(str(ca_file))  # type: ignore[union-attr]
        env["SSL_CERT_FILE"] = str(ca_file)
    go_key, our_key = NodePrivateKey.generate(), NodePrivateKey.generate()
    accepts_before = relay.relay.stats.websocket_accepts  # type: ignore[attr-defined]
    async with await connect(relay.url, our_key, ssl_context=relay.client_ssl_context) as ours:
        before = len(decisions)
        peer = our_key.public.text()
        argv = derpcheck_client(relay.url, "-send-to", peer, *GO_EXCHANGE_ARGS, key=go_key)
        async with spawn("derpcheck", argv, tmp_path, env=env) as go:
            connected = await go.event("connected")
            assert "connecting websocket" in go.stderr_tail(100)
            await exchange(go, connected, ours, go_key, relay.server_key)
    assert [d for d in decisions[before:] if isinstance(d, DerpUpgrade | WebSocketUpgrade)] == [
        WebSocketUpgrade()
    ], f"derphttp did not use WebSocket: {decisions[before:]}"
    assert relay.relay.stats.websocket_accepts == accepts_before + 1  # type: ignore[attr-defined]


async def test_go_websocket_client_receives_a_burst(relay_http: RelayHandle, tmp_path: Path) -> None:
    """30 ordinary 1200-byte packets that reach the relay in one read leave it in one writer batch
    (37 KB). Go's WebSocket library refuses messages over 32 KiB ("read limited at 32769 bytes"),
    so the relay must split a batch into several messages or the Go client is disconnected."""
    go_key = NodePrivateKey.generate()
    argv = derpcheck_client(relay_http.url, "-stay", key=go_key)
    async with spawn("derpcheck", argv, tmp_path, env={"TS_DEBUG_DERP_WS_CLIENT": "1"}) as go:
        await go.event("connected")
        sender = await Peer.connect(relay_http)
        packets = [bytes([i]) * 1200 for i in range(30)]
        await sender.send_raw(b"".join(sender.conn.send_packet(go_key.public, p) for p in packets))
        for i in range(30):
            ev = await go.event("recv", src=sender.key.text())
            assert ev["len"] == 1200
            assert ev["head"] == chr(i) * 48
        await go.close_stdin()
        await go.finish()


async def test_go_mesh_watcher(relay_http: RelayHandle, mesh_key: bytes, tmp_path: Path) -> None:
    watcher_key = NodePrivateKey.generate()
    argv = derpcheck_client(relay_http.url, "-mesh-key", mesh_key.hex(), "-watch", "-stay", key=watcher_key)
    async with spawn("watcher", argv, tmp_path) as watcher:
        await watcher.event("connected")
        # Every watcher first learns about itself (a mesh peer).
        me = await watcher.event("peer_present", key=watcher_key.public.text())
        assert me["flags"] == 0x02, me
        a_key = NodePrivateKey.generate()
        a = await connect(relay_http.url, a_key)
        try:
            present = await watcher.event("peer_present", key=a_key.public.text())
            assert present["flags"] == 0x01, present  # IsRegular
            assert str(present["addr"]).startswith("127.0.0.1:"), present
        finally:
            await a.aclose()
        goneev = await watcher.event("peer_gone", key=a_key.public.text())
        assert goneev["reason"] == 0
        await watcher.close_stdin()
        await watcher.finish()


async def test_go_watcher_with_wrong_mesh_key_is_dropped(relay_http: RelayHandle, tmp_path: Path) -> None:
    """As derper does: a well-formed but wrong mesh key is no error in itself (the client is a
    regular client and gets ServerInfo), but its WatchConns is then refused by closing the
    connection ("insufficient permissions" in derpserver)."""
    argv = derpcheck_client(relay_http.url, "-mesh-key", "ab" * 32, "-watch", "-stay")
    async with spawn("derpcheck", argv, tmp_path) as go:
        while (line := await go.line()) is not None:
            go.events.append(json.loads(line))
        assert await go.wait() == 1, go.events
    assert go.events[-1] == {"event": "error", "error": "receive: derp.Recv: EOF"}, go.events
    assert not [e for e in go.events if e["event"] == "peer_present"], go.events
    errors = relay_http.relay.stats.protocol_errors  # type: ignore[attr-defined]
    assert errors == {"insufficient_permissions": 1}, errors


async def test_tailscale_stun_request_against_our_stun_server(nursery: trio.Nursery, tmp_path: Path) -> None:
    stats = StunStats()
    bound = await nursery.start(serve_stun, "127.0.0.1", 0, stats)
    host, port = bound[0]
    argv = [go_binary("derpcheck"), "stun", "-addr", f"{host}:{port}"]
    async with spawn("derpcheck-stun", argv, tmp_path) as go:
        result = await go.event("stun")
        await go.finish()
    assert result["mapped"] == result["local"]
    assert str(result["mapped"]).startswith("127.0.0.1:")
    assert result["len"] == 32  # derper's exact response: one XOR-MAPPED-ADDRESS, IPv4
    assert stats.by_disposition()["success"] == 1


async def test_meshrelay_process_pinned_ip_cert(tmp_path: Path) -> None:
    """The operator path: ``meshrelay -certmode manual -hostname <IP>`` as a process, dialed the way
    tailscaled dials a self-hosted node (a DERP region with ``CertName: sha256-raw:…``); Go to Go
    through our relay with fast start, and Tailscale's STUN request against our STUN port."""
    port, stun_port = free_tcp_port(), free_udp_port()
    argv = [
        sys.executable, "-m", "relay", "-a", f"127.0.0.1:{port}", "-certmode", "manual",
        "-certdir", tmp_path / "certs", "-hostname", "127.0.0.1", "-c", tmp_path / "derper.key",
        "-http-port", "-1", "-stun-port", str(stun_port), "-metrics-addr=off",
    ]  # fmt: skip
    async with spawn("meshrelay", argv, tmp_path, env={"PYTHONUNBUFFERED": "1"}) as relay:
        log = relay.stderr_path
        await wait_for_file_line(log, "STUN server listening on", relay)
        await wait_for_file_line(log, "serving DERP on https://", relay)
        key_line = await wait_for_file_line(log, "server key nodekey:", relay)
        server_key = NodePublicKey.from_text(key_line.split("server key ")[1].split()[0])
        node_line = await wait_for_file_line(log, '"CertName":"sha256-raw:', relay)
        node = json.loads(node_line[node_line.index("{") :])
        assert node["HostName"] == "127.0.0.1"
        url = f"https://127.0.0.1:{port}/derp"
        pin = ["-certname", str(node["CertName"]), "-want-metacert", "true"]

        a_key, b_key = NodePrivateKey.generate(), NodePrivateKey.generate()
        async with spawn("go-a", derpcheck_client(url, *pin, "-echo", "-stay", key=a_key), tmp_path) as a:
            ev = await a.event("connected")
            assert ev["server"] == server_key.text()
            # 30 packets in flight: under the relay's per-client queue depth of 32, like derpprobe.
            b_argv = derpcheck_client(
                url, *pin, "-send-to", a_key.public.text(), "-count", "30", "-size", "1200",
                "-expect-echo", "-ping", "2", key=b_key,
            )  # fmt: skip
            async with spawn("go-b", b_argv, tmp_path) as b:
                await b.event("echoed", count=30)
                await b.finish()
            # a received from b, so the relay tells a that b left.
            await a.event("peer_gone", key=b_key.public.text(), reason=0)
            await a.close_stdin()
            await a.finish()

        stun_argv = [go_binary("derpcheck"), "stun", "-addr", f"127.0.0.1:{stun_port}"]
        async with spawn("go-stun", stun_argv, tmp_path) as s:
            result = await s.event("stun")
            await s.finish()
        assert result["mapped"] == result["local"]

        relay.process.send_signal(signal.SIGTERM)
        assert await relay.wait() == 0, relay.stderr_tail()
