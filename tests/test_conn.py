"""natlib.conn on loopback: two Conns and our relay (``python -m relay``) on 127.0.0.1, no root.

The peers start on the relay (neither is told the other's endpoints), exchange CallMeMaybe over
it, find the direct UDP path and carry on there: exact bytes both ways, the path events, a disco
ping, and the counters that show which path carried what. Once under trio, once under asyncio.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import trio
from relayproc import RelayProcess, free_ports

from natlib import disco
from natlib.conn import Conn, ConnClosedError, PathInfo, UnknownPeerError, open_conn
from natlib.derpmap import DERPMap, parse_derp_map
from natlib.keys import DiscoPrivateKey, NodePrivateKey, NodePublicKey

REGION = 900


@dataclass
class LoopbackRelay:
    derp_port: int
    stun_port: int

    def derp_map(self) -> DERPMap:
        node = {
            "Name": "900a",
            "RegionID": REGION,
            "HostName": "127.0.0.1",
            "IPv4": "127.0.0.1",
            "IPv6": "none",
            "DERPPort": self.derp_port,
            "STUNPort": self.stun_port,
        }
        doc = {"Regions": {str(REGION): {"RegionID": REGION, "RegionCode": "lo", "Nodes": [node]}}}
        return parse_derp_map(json.dumps(doc))


def _wait_for_line(relay: RelayProcess, text: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if any(text in line for line in list(relay.lines)):
            return
        assert relay.proc is not None and relay.proc.poll() is None, "relay exited:\n" + "".join(relay.lines)
        time.sleep(0.02)
    raise AssertionError(f"no {text!r} in the relay's log:\n" + "".join(relay.lines))


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackRelay]:
    yield from _relay(tmp_path_factory)


@pytest.fixture(scope="module")
def second_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackRelay]:
    yield from _relay(tmp_path_factory)


def _relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackRelay]:
    tmp: Path = tmp_path_factory.mktemp("relay")
    derp_port, stun_port = free_ports(2)
    proc = RelayProcess(
        [
            "-a", f"127.0.0.1:{derp_port}", "-http-port", "-1", "-stun-port", str(stun_port),
            "-metrics-addr=off", "-c", str(tmp / "derper.key"),
        ]
    )  # fmt: skip
    proc.start()
    try:
        _wait_for_line(proc, "STUN server listening")
        _wait_for_line(proc, "serving DERP")
        yield LoopbackRelay(derp_port, stun_port)
    finally:
        proc.stop()


async def _wait_direct(conn: Conn, peer: NodePublicKey, timeout: float = 10.0) -> PathInfo:
    """Poll the path while sending (discovery runs on send), with a deadline."""
    with anyio.fail_after(timeout):
        while True:
            info = conn.path(peer)
            if info.kind == "direct":
                return info
            await anyio.sleep(0.05)


async def _exchange(relay: LoopbackRelay) -> dict[str, object]:
    """Two Conns on loopback: relay first, then direct. Returns facts for the asserts."""
    derp_map = relay.derp_map()
    keys = [(NodePrivateKey.generate(), DiscoPrivateKey.generate()) for _ in range(2)]
    opts = {"home_region": REGION, "port_mapping": False, "network_monitor": False, "derp_tls": False}
    facts: dict[str, object] = {}
    async with (
        open_conn(*keys[0], derp_map, **opts) as a,  # type: ignore[arg-type]
        open_conn(*keys[1], derp_map, **opts) as b,  # type: ignore[arg-type]
    ):
        assert a.node_key == keys[0][0].public and a.disco_key == keys[0][1].public
        assert a.home_region == REGION
        endpoints = {tuple(c.address) for c in a.local_endpoints()}
        assert ("127.0.0.1", a.local_port) in endpoints  # the relay's STUN saw us on loopback
        with pytest.raises(UnknownPeerError):
            a.path(b.node_key)
        # No endpoints from a control plane: discovery must go through CallMeMaybe over the relay.
        a.add_peer(b.node_key, b.disco_key, REGION)
        b.add_peer(a.node_key, a.disco_key, REGION)
        assert a.path(b.node_key).kind == "relay"
        events: list[PathInfo] = []

        async def watch() -> None:
            async for key, info in a.path_events():
                assert key == b.node_key
                events.append(info)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await anyio.lowlevel.checkpoint()
            # The first datagrams go over the relay (no path yet), a burst in one call: queued,
            # written to the relay in batches, delivered whole and in order.
            relay_burst = [b"relay burst %02d" % i for i in range(40)]
            await a.send_many(b.node_key, relay_burst)
            with anyio.fail_after(10):
                assert [await b.receive() for _ in relay_burst] == [(a.node_key, d) for d in relay_burst]
            await a.send(b.node_key, b"then one more")
            with anyio.fail_after(10):
                assert await b.receive() == (a.node_key, b"then one more")
            # Keep a stream going both ways until both sides are direct.
            received_b: list[bytes] = []
            received_a: list[bytes] = []

            async def drain(conn: Conn, out: list[bytes]) -> None:
                while True:
                    _, data = await conn.receive()
                    out.append(data)

            tg.start_soon(drain, b, received_b)
            tg.start_soon(drain, a, received_a)
            seq = 0
            with anyio.fail_after(10):
                while a.path(b.node_key).kind != "direct" or b.path(a.node_key).kind != "direct":
                    await a.send(b.node_key, b"a%d" % seq)
                    await b.send(a.node_key, b"b%d" % seq)
                    seq += 1
                    await anyio.sleep(0.02)
            info = a.path(b.node_key)
            facts["path"] = info
            before = a.stats()["paths"]["datagrams_direct"]
            before_relay = a.stats()["paths"]["datagrams_relay"]
            for i in range(20):
                await a.send(b.node_key, b"direct %d" % i)
            with anyio.fail_after(5):
                while b"direct 19" not in received_b:
                    await anyio.sleep(0.01)
            stats = a.stats()
            facts["direct_sent"] = stats["paths"]["datagrams_direct"] - before
            facts["relay_sent"] = stats["paths"]["datagrams_relay"] - before_relay
            # A bulk batch (what a proxy reads from WireGuard in one wake-up): equal sizes, so it
            # leaves in segmented sends (GSO) and, under trio, is read back coalesced (GRO).
            bulk = [b"bulk %04d " % i + b"x" * 1190 for i in range(120)]
            await a.send_many(b.node_key, bulk)
            with anyio.fail_after(5):
                while bulk[-1] not in received_b:
                    await anyio.sleep(0.01)
            facts["bulk"] = (bulk, [d for d in received_b if d.startswith(b"bulk")])
            facts["direct_sent_many"] = a.stats()["paths"]["datagrams_direct"] - before
            facts["received_b"] = list(received_b)
            # The best direct address may change under the bulk (IPv6 vs IPv4 loopback scored by
            # RTT): the ping goes where the path is when it is sent.
            before_ping = a.path(b.node_key).address
            facts["ping"] = await a.ping(b.node_key, timeout=2.0)
            facts["path_at_ping"] = {before_ping, a.path(b.node_key).address}
            facts["events"] = list(events)
            facts["final_address"] = a.path(b.node_key).address
            facts["stats"] = a.stats()
            facts["candidates"] = a.candidates(b.node_key)
            facts["stats_b"] = b.stats()
            tg.cancel_scope.cancel()
        a.remove_peer(b.node_key)
        with pytest.raises(UnknownPeerError):
            await a.send(b.node_key, b"gone")
    return facts


def _check(facts: dict[str, object], *, coalesced_reads: bool) -> None:
    path = facts["path"]
    assert isinstance(path, PathInfo)
    assert path.kind == "direct" and path.address is not None and path.region is None
    assert path.rtt is not None and 0 <= path.rtt < 1
    assert facts["direct_sent"] == 20
    assert facts["relay_sent"] == 0
    assert facts["direct_sent_many"] == 20 + 120
    sent, received_bulk = facts["bulk"]  # type: ignore[misc]
    assert received_bulk == sent  # all of them, in order
    received = facts["received_b"]
    assert isinstance(received, list)
    assert [d for d in received if d.startswith(b"direct")] == [b"direct %d" % i for i in range(20)]
    ping = facts["ping"]
    at_ping = facts["path_at_ping"]
    assert isinstance(at_ping, set)
    assert getattr(ping, "kind", None) == "direct" and getattr(ping, "address", None) in at_ping
    candidates = facts["candidates"]
    assert isinstance(candidates, list)
    assert any(c.addr.socket_address() == path.address and c.rtt is not None for c in candidates)
    events = facts["events"]
    assert isinstance(events, list) and events, "no path events"
    assert events[-1].kind == "direct" and events[-1].address == facts["final_address"]
    stats = facts["stats"]
    assert isinstance(stats, dict)
    assert stats["disco_opened"] > 0 and stats["paths"]["pongs_received"] > 0
    stats_b = facts["stats_b"]
    assert isinstance(stats_b, dict)
    # Neither side knew the other's endpoints: the first CallMeMaybe over the relay started it.
    assert stats["paths"]["call_me_maybe_received"] + stats_b["paths"]["call_me_maybe_received"] >= 1
    assert stats["derp_packets_received"] >= 1
    assert stats["disco_dropped"] == {}
    # 120 × 1200 bytes: three runs of at most 53 (MAX_RUN_BYTES); more only if the kernel refused.
    assert stats["udp_segmented_sends"] == 3, stats
    assert (stats_b["udp_coalesced_reads"] > 0) is coalesced_reads, stats_b


async def test_two_conns_go_direct_under_trio(relay: LoopbackRelay) -> None:
    facts = await _exchange(relay)
    _check(facts, coalesced_reads=True)
    await trio.lowlevel.checkpoint()


def test_two_conns_go_direct_under_asyncio(relay: LoopbackRelay) -> None:
    """A plain sync test (so pytest-trio leaves it alone) running the same exchange under asyncio."""
    facts = anyio.run(_exchange, relay, backend="asyncio")
    _check(facts, coalesced_reads=False)  # anyio's asyncio transport reads one datagram at a time


async def test_bad_input_is_dropped_and_counted(relay: LoopbackRelay) -> None:
    """Garbage, forged disco and data from unknown addresses are dropped and counted, never raised."""
    derp_map = relay.derp_map()
    opts = {"home_region": REGION, "port_mapping": False, "network_monitor": False, "derp_tls": False}
    stranger = DiscoPrivateKey.generate()
    async with open_conn(NodePrivateKey.generate(), DiscoPrivateKey.generate(), derp_map, **opts) as a:  # type: ignore[arg-type]
        peer_disco = DiscoPrivateKey.generate()
        a.add_peer(NodePrivateKey.generate().public, peer_disco.public, REGION)
        target = ("127.0.0.1", a.local_port)
        async with await anyio.create_udp_socket(local_host="127.0.0.1") as sock:
            await sock.sendto(b"not disco, not from a peer", *target)
            # Sealed by a key no peer has: unknown sender.
            await sock.sendto(disco.seal(disco.Ping(disco.new_tx_id()), stranger, a.disco_key), *target)
            # Claims a peer's disco key but is sealed with another: does not open.
            forged = bytearray(disco.seal(disco.Ping(disco.new_tx_id()), stranger, a.disco_key))
            forged[6:38] = peer_disco.public.raw
            await sock.sendto(bytes(forged), *target)
            with anyio.fail_after(5):
                while True:
                    stats = a.stats()
                    if stats["data_dropped_unknown_source"] + sum(stats["disco_dropped"].values()) >= 3:
                        break
                    await anyio.sleep(0.01)
        assert stats["data_dropped_unknown_source"] == 1
        assert stats["disco_dropped"] == {"unknown_sender": 1, "unauthenticated": 1}
        assert stats["disco_opened"] == 0
    with pytest.raises(ConnClosedError):
        await a.receive()
    with pytest.raises(ConnClosedError):
        a.add_peer(NodePrivateKey.generate().public, peer_disco.public, REGION)


async def test_excluded_prefixes_are_neither_candidates_nor_paths(relay: LoopbackRelay) -> None:
    """b excludes every address (as the mesh client excludes its overlay): it advertises none, drops
    disco from them, and ignores a's endpoints there, so the pair stays on the relay."""
    derp_map = relay.derp_map()
    keys = [(NodePrivateKey.generate(), DiscoPrivateKey.generate()) for _ in range(2)]
    opts = {"home_region": REGION, "port_mapping": False, "network_monitor": False, "derp_tls": False}
    everything = {"exclude_interfaces": ("lo",), "exclude_prefixes": ("0.0.0.0/0", "::/0")}
    async with (
        open_conn(*keys[0], derp_map, **opts) as a,  # type: ignore[arg-type]
        open_conn(*keys[1], derp_map, **opts, **everything) as b,  # type: ignore[arg-type]
    ):
        assert a.local_endpoints() != [] and b.local_endpoints() == []
        a.add_peer(b.node_key, b.disco_key, REGION, endpoints=[("127.0.0.1", b.local_port)])
        b.add_peer(a.node_key, a.disco_key, REGION, endpoints=[("127.0.0.1", a.local_port)])
        assert b.candidates(a.node_key) == []
        received: list[bytes] = []
        with anyio.fail_after(10):
            while b.stats()["disco_dropped"].get("excluded_source", 0) < 1 or len(received) < 5:
                await a.send(b.node_key, b"x%d" % len(received))
                with anyio.move_on_after(0.1):
                    received.append((await b.receive())[1])
        assert received == [b"x%d" % i for i in range(len(received))]
        assert b.candidates(a.node_key) == []  # a's CallMeMaybe endpoints were all excluded
        assert (a.path(b.node_key).kind, b.path(a.node_key).kind) == ("relay", "relay")
        assert b.stats()["disco_opened"] >= 1  # what came over the relay still opens
    with pytest.raises(ValueError, match="excluded prefix"):
        async with open_conn(*keys[0], derp_map, exclude_prefixes=("nonsense",), **opts):  # type: ignore[arg-type]
            pass


async def test_peer_home_region_dialled_on_demand_and_closed_when_idle(
    relay: LoopbackRelay, second_relay: LoopbackRelay
) -> None:
    """Each node is at home on its own relay: sending to the other dials the peer's region on
    demand; once nothing travels over it for ``derp_idle_close`` seconds it is disconnected."""
    regions = {}
    for region_id, r in ((REGION, relay), (REGION + 1, second_relay)):
        node = {
            "Name": f"{region_id}a", "RegionID": region_id, "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
            "IPv6": "none", "DERPPort": r.derp_port, "STUNPort": r.stun_port,
        }  # fmt: skip
        regions[str(region_id)] = {"RegionID": region_id, "RegionCode": f"r{region_id}", "Nodes": [node]}
    derp_map = parse_derp_map(json.dumps({"Regions": regions}))
    opts = {"port_mapping": False, "network_monitor": False, "derp_tls": False, "derp_idle_close": 0.5}
    keys = [(NodePrivateKey.generate(), DiscoPrivateKey.generate()) for _ in range(2)]
    async with (
        open_conn(*keys[0], derp_map, home_region=REGION, **opts) as a,  # type: ignore[arg-type]
        open_conn(*keys[1], derp_map, home_region=REGION + 1, **opts) as b,  # type: ignore[arg-type]
    ):
        a.add_peer(b.node_key, b.disco_key, REGION + 1)
        b.add_peer(a.node_key, a.disco_key, REGION)
        assert a.stats()["derp_connects"] == 1  # only the home region so far
        await a.send(b.node_key, b"to your home relay")
        with anyio.fail_after(10):
            assert await b.receive() == (a.node_key, b"to your home relay")
        assert a.stats()["derp_connects"] == 2
        assert a.path(b.node_key).region in (REGION + 1, None)
        # Nothing more is sent: a's connection to region 901 goes idle and is closed; the home stays.
        with anyio.fail_after(10):
            while a.stats()["derp_idle_closes"] < 1:
                await anyio.sleep(0.05)
        assert a.stats()["derp_connects"] == 2
        await b.send(a.node_key, b"and back")
        with anyio.fail_after(10):
            assert await a.receive() == (b.node_key, b"and back")
