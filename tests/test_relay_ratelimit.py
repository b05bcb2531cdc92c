"""Limits (issue 7 item 3): ``-rate-config`` per-client receive limits and the TLS accept limiter.

Pacing is proven on a real relay with real clients: K bytes through a relay limited to R bytes/s
with burst B take at least (K - B) / R seconds of relay time, and every byte arrives (reads pause,
nothing is dropped). Mesh peers are exempt; a reload applies to live connections.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trustme
from derppeer import Peer, RelayHandle
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from natlib.derp import ClientInfo, RecvPacket
from natlib.keys import NodePrivateKey
from relay import RelayServer
from relay._config import ConfigError, build_flagset, config_from_args
from relay._metrics import build_registry
from relay._ratelimit import (
    MIN_BURST,
    ByteBucket,
    ConnectionLimiter,
    RateConfigError,
    RateLimits,
    load_rate_config,
    parse_rate_config,
)
from relay.cli import main

WIRE_OVERHEAD = 5 + 32  # SendPacket header + destination key


# -- config and buckets (sans-io) ------------------------------------------------------------------


def test_parse_rate_config() -> None:
    assert parse_rate_config(
        '{"PerClientRateLimitBytesPerSec":1000000,"PerClientRateBurstBytes":2000000}', "f"
    ) == (RateLimits(1e6, 2e6))
    # The burst is raised to one maximal frame; names match case-insensitively; unknown keys ignored.
    assert parse_rate_config('{"perclientratelimitbytespersec":5,"Other":1}', "f") == RateLimits(5, MIN_BURST)
    assert MIN_BURST == 65568
    assert parse_rate_config('{"PerClientRateLimitBytesPerSec":0,"PerClientRateBurstBytes":9}', "f") is None
    assert parse_rate_config("{}", "f") is None
    with pytest.raises(
        RateConfigError,
        match=r'^f: field "PerClientRateLimitBytesPerSec": want a non-negative number, got -1$',
    ):
        parse_rate_config('{"PerClientRateLimitBytesPerSec":-1}', "f")
    with pytest.raises(
        RateConfigError, match=r'^f: field "PerClientRateBurstBytes": want a non-negative number, got "1"$'
    ):
        parse_rate_config('{"PerClientRateLimitBytesPerSec":1,"PerClientRateBurstBytes":"1"}', "f")
    with pytest.raises(RateConfigError, match=r"^f:2: not valid JSON"):
        parse_rate_config('{\n"PerClientRateLimitBytesPerSec": }', "f")
    with pytest.raises(RateConfigError, match=r"^f: want a JSON object"):
        parse_rate_config("[1]", "f")


def test_load_rate_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(RateConfigError, match=rf"^{tmp_path / 'nope.json'}: No such file"):
        load_rate_config(str(tmp_path / "nope.json"))


def test_byte_bucket_lends_and_returns_the_wait() -> None:
    b = ByteBucket(RateLimits(1000.0, 100_000.0), now=0.0)
    assert b.take(100_000, 0.0) == 0.0
    assert b.take(500, 0.0) == pytest.approx(0.5)  # in debt by 500 bytes at 1000 B/s
    assert b.take(500, 0.5) == pytest.approx(0.5)  # the debt was paid; 500 more
    assert b.take(0, 10.0) == 0.0
    b.update(RateLimits(10.0, 20.0))  # tokens capped at the new burst
    assert b.take(30, 10.0) == pytest.approx(1.0)


def test_connection_limiter() -> None:
    lim = ConnectionLimiter(2.0, 3, now=0.0)
    assert [lim.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert lim.allow(0.5) and not lim.allow(0.5)


# -- pacing on a real relay --------------------------------------------------------------------------


@asynccontextmanager
async def limited_relay(nursery: trio.Nursery, mesh_key: bytes, **kw: object) -> AsyncIterator[RelayHandle]:
    key = NodePrivateKey.generate()
    server = RelayServer(key, mesh_key=mesh_key, hostname="relay.test", **kw)  # type: ignore[arg-type]
    bound = await nursery.start(lambda task_status: server.serve_tcp("127.0.0.1", 0, task_status=task_status))
    try:
        yield RelayHandle(server, str(bound[0][0]), int(bound[0][1]), key.public)
    finally:
        server.close_all_connections()


def server_of(h: RelayHandle) -> RelayServer:
    assert isinstance(h.relay, RelayServer)
    return h.relay


def packets(n: int, size: int, tag: int) -> list[bytes]:
    return [tag.to_bytes(1, "big") + i.to_bytes(4, "big") + bytes(size - 5) for i in range(n)]


async def transfer(src: Peer, dst: Peer, pkts: list[bytes], timeout: float = 20) -> float:
    """Send ``pkts`` from src to dst in one go; return the relay-clock seconds until all arrived."""
    data = b"".join(src.conn.send_packet(dst.key, p) for p in pkts)
    start = trio.current_time()
    got: list[bytes] = []
    async with trio.open_nursery() as n:
        n.start_soon(src.send_raw, data)
        with trio.fail_after(timeout):
            while len(got) < len(pkts):
                ev = await dst.recv(timeout)
                assert isinstance(ev, RecvPacket), ev
                assert ev.src == src.key.raw
                got.append(ev.packet)
    elapsed = trio.current_time() - start
    assert got == pkts  # every byte arrives, in order: nothing is dropped
    return elapsed


def assert_nothing_dropped(server: RelayServer) -> None:
    assert sum(server.stats.packets_dropped.values()) == 0


async def test_rate_limit_paces_a_client_and_drops_nothing(nursery: trio.Nursery, mesh_key: bytes) -> None:
    rate = 400_000.0
    async with limited_relay(nursery, mesh_key, rate_limits=RateLimits(rate, MIN_BURST)) as relay:
        server = server_of(relay)
        a, b = await Peer.connect(relay), await Peer.connect(relay)
        pkts = packets(500, 1200, 1)
        wire = len(pkts) * (1200 + WIRE_OVERHEAD)
        elapsed = await transfer(a, b, pkts)
        floor = (wire - MIN_BURST) / rate  # 1.38 s
        assert elapsed >= floor * 0.98, (elapsed, floor)
        assert elapsed <= floor * 2 + 1.0, (elapsed, floor)
        assert server.stats.rate_limit_waits >= 1
        assert server.stats.rate_limit_wait_seconds == pytest.approx(floor, rel=0.1)
        assert server.stats.packets_received == 500 and server.stats.packets_sent == 500
        assert_nothing_dropped(server)
        # B's own sends are limited by B's own bucket, not A's: a small reply passes at once.
        waits = server.stats.rate_limit_waits
        await b.send(a.key, b"reply")
        ev = await a.recv()
        assert isinstance(ev, RecvPacket) and ev.packet == b"reply"
        assert server.stats.rate_limit_waits == waits


async def test_mesh_peers_are_exempt(nursery: trio.Nursery, mesh_key: bytes) -> None:
    rate = 100_000.0
    async with limited_relay(nursery, mesh_key, rate_limits=RateLimits(rate, MIN_BURST)) as relay:
        server = server_of(relay)
        mesh = await Peer.connect(relay, info=ClientInfo(mesh_key=mesh_key))
        b = await Peer.connect(relay)
        pkts = packets(500, 1200, 2)
        floor = (len(pkts) * (1200 + WIRE_OVERHEAD) - MIN_BURST) / rate  # 5.5 s if limited
        elapsed = await transfer(mesh, b, pkts)
        assert elapsed < floor / 4
        assert server.stats.rate_limit_waits == 0 and server.stats.rate_limit_wait_seconds == 0
        assert_nothing_dropped(server)


def write_rate(path: Path, rate: float, burst: float = 0) -> None:
    path.write_text(json.dumps({"PerClientRateLimitBytesPerSec": rate, "PerClientRateBurstBytes": burst}))


def scrape(server: RelayServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(build_registry(server)).decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def test_reload_applies_to_live_connections(
    nursery: trio.Nursery, mesh_key: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    f = tmp_path / "rate.json"
    write_rate(f, 200_000)
    limits = load_rate_config(str(f))
    async with limited_relay(nursery, mesh_key, rate_limits=limits, rate_config_path=str(f)) as relay:
        server = server_of(relay)
        m = scrape(server)
        assert m[("meshrelay_rate_limit_bytes_per_second", frozenset())] == 200_000
        assert m[("meshrelay_rate_limit_burst_bytes", frozenset())] == MIN_BURST
        a, b = await Peer.connect(relay), await Peer.connect(relay)
        await transfer(a, b, packets(80, 1200, 3))  # 99 KB > burst: waits
        waits = server.stats.rate_limit_waits
        assert waits >= 1
        # Off: the same connection now runs unthrottled (1.2 MB would take 6 s at 200 kB/s).
        write_rate(f, 0)
        assert server.reload() is True and server.rate_limits is None
        assert f"reloaded rate config {f}: rate limiting off" in caplog.text
        elapsed = await transfer(a, b, packets(1000, 1200, 4))
        assert elapsed < 3.0 and server.stats.rate_limit_waits == waits
        # A bad file keeps what is in force, and says why.
        f.write_text('{"PerClientRateLimitBytesPerSec": "fast"}')
        assert server.reload() is False and server.rate_limits is None
        assert "rate config not reloaded, keeping the old limits" in caplog.text
        assert 'field "PerClientRateLimitBytesPerSec"' in caplog.text
        # On again, lower: the live connection picks it up at its next read.
        write_rate(f, 100_000)
        assert server.reload() is True and server.rate_limits == RateLimits(100_000, MIN_BURST)
        assert scrape(server)[("meshrelay_rate_limit_bytes_per_second", frozenset())] == 100_000
        pkts = packets(120, 1200, 5)
        elapsed = await transfer(a, b, pkts)
        assert elapsed >= (len(pkts) * (1200 + WIRE_OVERHEAD) - MIN_BURST) / 100_000 * 0.98
        assert server.stats.rate_limit_waits > waits
        assert_nothing_dropped(server)


# -- the TLS accept limiter ------------------------------------------------------------------------


async def wait_until(cond: object, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not cond():  # type: ignore[operator]
            await trio.sleep(0.01)


async def test_accept_limiter_on_the_tls_listener(nursery: trio.Nursery, mesh_key: bytes) -> None:
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    key = NodePrivateKey.generate()
    server = RelayServer(key, mesh_key=mesh_key, accept_connection_limit=0.001, accept_connection_burst=2)
    bound = await nursery.start(
        lambda task_status: server.serve_tcp("127.0.0.1", 0, ssl_context=ctx, task_status=task_status)
    )
    plain = await nursery.start(lambda task_status: server.serve_tcp("127.0.0.1", 0, task_status=task_status))
    try:
        port = int(bound[0][1])
        streams = []
        for i in range(3):
            streams.append(await trio.open_tcp_stream("127.0.0.1", port))
            await wait_until(
                lambda i=i: server.stats.tls_listener_accepted + server.stats.tls_listener_rejected == i + 1
            )
        assert (server.stats.tls_listener_accepted, server.stats.tls_listener_rejected) == (2, 1)
        assert server.stats.accepts == 2  # the rejected one never reached the relay
        with trio.fail_after(5):
            assert await streams[2].receive_some(100) == b""  # accepted, then closed at once
        # The plain-HTTP listener is not limited (derper limits the TLS listener only).
        for _ in range(3):
            streams.append(await trio.open_tcp_stream("127.0.0.1", int(plain[0][1])))
        await wait_until(lambda: server.stats.accepts == 5)
        assert server.stats.tls_listener_rejected == 1
        m = scrape(server)
        assert m[("meshrelay_tls_listener_connections_total", frozenset({("result", "accepted")}))] == 2
        assert m[("meshrelay_tls_listener_connections_total", frozenset({("result", "rejected")}))] == 1
        for s in streams:
            await s.aclose()
    finally:
        server.close_all_connections()


# -- flags -----------------------------------------------------------------------------------------


def test_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    values, given = build_flagset().parse(
        [
            "-dev",
            "-rate-config",
            "/r.json",
            "-accept-connection-limit",
            "50",
            "-accept-connection-burst",
            "10",
        ]
    )
    cfg = config_from_args(values, given)
    assert (cfg.rate_config, cfg.accept_connection_limit, cfg.accept_connection_burst) == (
        "/r.json",
        50.0,
        10,
    )
    values, given = build_flagset().parse(["-dev"])
    assert config_from_args(values, given).accept_connection_limit == math.inf
    values, given = build_flagset().parse(["-dev", "-accept-connection-limit", "-1"])
    with pytest.raises(ConfigError, match=r"-accept-connection-limit -1\.0: must be a non-negative rate"):
        config_from_args(values, given)
    bad = tmp_path / "rate.json"
    bad.write_text('{"PerClientRateBurstBytes": -5}')
    argv = ["-a", "127.0.0.1:0", "-c", str(tmp_path / "k"), "-stun=false", "-metrics-addr=off"]
    assert main([*argv, "-rate-config", str(bad)]) == 2
    why = 'field "PerClientRateBurstBytes": want a non-negative number, got -5'
    assert capsys.readouterr().err == f"meshrelay: -rate-config {bad}: {why}\n"
