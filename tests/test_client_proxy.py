"""client._proxy: per-peer loopback sockets between an engine's UDP port and a natlib connection.

A plain UDP socket on loopback plays the engine (the real wireguard-go runs through these proxies in
tests/test_client_daemon.py); tests/fakeconn.py's in-memory network plays natlib.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from fakeconn import MemoryConn, MemoryNetwork

from client._endpoint import Endpoint
from client._proxy import LOOPBACK, READ_BATCH, LoopbackProxies, open_loopback_proxies
from natlib.derpmap import DERPMap
from natlib.keys import DiscoPrivateKey, NodePrivateKey
from natlib.udpbatch import BatchSender

KEYS = {name: NodePrivateKey.generate() for name in ("a", "b", "c")}
DISCO = {name: DiscoPrivateKey.generate() for name in ("a", "b", "c")}
PUB = {name: key.public for name, key in KEYS.items()}


@asynccontextmanager
async def node(
    network: MemoryNetwork, name: str, peers: tuple[str, ...], engine_port: int
) -> AsyncIterator[tuple[MemoryConn, LoopbackProxies]]:
    async with network.open_conn(KEYS[name], DISCO[name], DERPMap()) as conn:
        for peer in peers:
            conn.add_peer(PUB[peer], DISCO[peer].public, 900)
        async with open_loopback_proxies(conn, [PUB[p] for p in peers], engine_port) as proxies:
            yield conn, proxies


async def engine_socket() -> anyio.abc.UDPSocket:
    return await anyio.create_udp_socket(family=socket.AF_INET, local_host=LOOPBACK)


def port_of(sock: anyio.abc.UDPSocket) -> int:
    port: int = sock.extra(anyio.abc.SocketAttribute.local_port)
    return port


async def test_each_peer_gets_its_own_loopback_endpoint() -> None:
    network = MemoryNetwork()
    async with (
        await engine_socket() as engine,
        node(network, "a", ("b", "c"), port_of(engine)) as (_, proxies),
    ):
        endpoints = proxies.endpoints()
        assert set(endpoints) == {PUB["b"], PUB["c"]}
        assert {str(e.ip) for e in endpoints.values()} == {"127.0.0.1"}
        assert len({e.port for e in endpoints.values()}) == 2
        assert port_of(engine) not in {e.port for e in endpoints.values()}
        assert proxies.endpoint(PUB["b"]) == endpoints[PUB["b"]]
        with pytest.raises(KeyError):
            proxies.endpoint(PUB["a"])


async def test_datagrams_flow_engine_to_peer_engine_through_the_right_proxies() -> None:
    network = MemoryNetwork()
    async with (
        await engine_socket() as engine_a,
        await engine_socket() as engine_b,
        node(network, "a", ("b", "c"), port_of(engine_a)) as (_, proxies_a),
        node(network, "b", ("a",), port_of(engine_b)) as (_, proxies_b),
    ):
        to_b = proxies_a.endpoint(PUB["b"])
        await engine_a.sendto(b"\x01handshake-init", str(to_b.ip), to_b.port)
        with anyio.fail_after(5):
            data, source = await engine_b.receive()
        # b's engine sees the datagram coming from b's proxy for a: that is a's endpoint for it.
        assert data == b"\x01handshake-init"
        assert source == (LOOPBACK, proxies_b.endpoint(PUB["a"]).port)

        to_a = proxies_b.endpoint(PUB["a"])
        await engine_b.sendto(b"\x02handshake-resp", str(to_a.ip), to_a.port)
        with anyio.fail_after(5):
            data, source = await engine_a.receive()
        assert data == b"\x02handshake-resp"
        assert source == (LOOPBACK, to_b.port)

        a_to_b, b_to_a = proxies_a.counters(PUB["b"]), proxies_b.counters(PUB["a"])
        assert (a_to_b.to_peer_packets, a_to_b.to_peer_bytes) == (1, 15)
        assert (a_to_b.to_engine_packets, a_to_b.to_engine_bytes) == (1, 15)
        assert (b_to_a.to_peer_packets, b_to_a.to_engine_packets) == (1, 1)
        assert proxies_a.counters(PUB["c"]).to_peer_packets == 0


async def test_only_the_engine_port_may_use_a_proxy() -> None:
    network = MemoryNetwork()
    async with (
        await engine_socket() as engine,
        await engine_socket() as intruder,
        node(network, "a", ("b",), port_of(engine)) as (conn_a, proxies),
    ):
        to_b = proxies.endpoint(PUB["b"])
        await intruder.sendto(b"injected", str(to_b.ip), to_b.port)
        await engine.sendto(b"genuine", str(to_b.ip), to_b.port)
        with anyio.fail_after(5):
            while proxies.counters(PUB["b"]).to_peer_packets + proxies.counters(PUB["b"]).send_failures < 1:
                await anyio.wait_all_tasks_blocked()
        assert conn_a.sent == [(PUB["b"], b"genuine")]
        assert proxies.counters(PUB["b"]).foreign_dropped == 1


async def test_send_failures_and_unknown_senders_are_counted_not_fatal() -> None:
    network = MemoryNetwork()
    async with (
        await engine_socket() as engine,
        node(network, "a", ("b",), port_of(engine)) as (conn_a, proxies),
    ):
        conn_a.remove_peer(PUB["b"])  # natlib no longer knows b: its send raises
        to_b = proxies.endpoint(PUB["b"])
        await engine.sendto(b"lost", str(to_b.ip), to_b.port)
        with anyio.fail_after(5):
            while proxies.counters(PUB["b"]).send_failures < 1:
                await anyio.wait_all_tasks_blocked()
        conn_a.inject(PUB["c"], b"from a stranger")  # c has no proxy here
        conn_a.inject(PUB["b"], b"still delivered")
        with anyio.fail_after(5):
            data, source = await engine.receive()
        assert (data, source) == (b"still delivered", (LOOPBACK, to_b.port))
        assert proxies.unknown_peer_dropped == 1
        assert proxies.counters(PUB["b"]).to_peer_packets == 0


async def test_a_burst_from_the_peers_reaches_the_engine_whole_and_in_order() -> None:
    """More datagrams waiting than one wake-up drains (conn.receive_nowait): none lost or reordered."""
    network = MemoryNetwork()
    burst = [b"%04d" % i for i in range(3 * READ_BATCH + 5)]
    async with (
        await engine_socket() as engine,
        node(network, "a", ("b", "c"), port_of(engine)) as (conn_a, proxies),
    ):
        for i, datagram in enumerate(burst):
            conn_a.inject(PUB["b" if i % 2 else "c"], datagram)
        ports = {proxies.endpoint(PUB[p]).port: p for p in ("b", "c")}
        received = []
        with anyio.fail_after(5):
            for _ in burst:
                data, (_, port) = await engine.receive()
                received.append((data, port))
    assert [(d, ports[p]) for d, p in received] == [(d, "b" if i % 2 else "c") for i, d in enumerate(burst)]
    assert proxies.counters(PUB["b"]).to_engine_packets + proxies.counters(PUB["c"]).to_engine_packets == len(
        burst
    )


async def test_leaving_the_context_closes_the_proxy_sockets() -> None:
    network = MemoryNetwork()
    async with await engine_socket() as engine:
        async with node(network, "a", ("b",), port_of(engine)) as (_, proxies):
            endpoint: Endpoint = proxies.endpoint(PUB["b"])
        # The port is free again: nothing holds it after the context.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOOPBACK, endpoint.port))


async def test_bad_engine_port_is_refused() -> None:
    network = MemoryNetwork()
    async with network.open_conn(KEYS["a"], DISCO["a"], DERPMap()) as conn:
        with pytest.raises(ValueError, match="engine port 0 is not in 1-65535"):
            async with open_loopback_proxies(conn, [PUB["b"]], 0):
                pass


def plain_engine() -> socket.socket:
    """An engine socket the test writes to without awaiting: a burst is queued before the proxy wakes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.setblocking(False)
    return sock


async def test_an_engine_burst_goes_to_natlib_in_one_batch() -> None:
    network = MemoryNetwork()
    burst = [b"\x04data %02d" % i for i in range(10)]
    with plain_engine() as engine:
        async with node(network, "a", ("b",), engine.getsockname()[1]) as (conn_a, proxies):
            to_b = proxies.endpoint(PUB["b"])
            for datagram in burst:
                engine.sendto(datagram, (str(to_b.ip), to_b.port))
            with anyio.fail_after(5):
                while len(conn_a.sent) < len(burst):
                    await anyio.wait_all_tasks_blocked()
    assert conn_a.sent == [(PUB["b"], d) for d in burst]
    assert conn_a.batches == [10]  # one wake-up, one send_many
    assert proxies.counters(PUB["b"]).to_peer_packets == 10


class SendOnlyConn:
    """A connection with only send and receive (no send_many, no receive_nowait)."""

    def __init__(self, inner: MemoryConn) -> None:
        self.inner = inner

    async def send(self, node_key: object, datagram: bytes) -> None:
        await self.inner.send(node_key, datagram)  # type: ignore[arg-type]

    async def receive(self) -> tuple[object, bytes]:
        return await self.inner.receive()


async def test_a_connection_without_batches_gets_one_datagram_at_a_time() -> None:
    network = MemoryNetwork()
    burst = [b"\x04data %02d" % i for i in range(5)]
    with plain_engine() as engine:
        async with network.open_conn(KEYS["a"], DISCO["a"], DERPMap()) as conn:
            conn.add_peer(PUB["b"], DISCO["b"].public, 900)
            async with open_loopback_proxies(
                SendOnlyConn(conn),  # type: ignore[arg-type]
                [PUB["b"]],
                engine.getsockname()[1],
            ) as proxies:
                to_b = proxies.endpoint(PUB["b"])
                for datagram in burst:
                    engine.sendto(datagram, (str(to_b.ip), to_b.port))
                conn.inject(PUB["b"], b"\x04back")
                with anyio.fail_after(5):
                    while len(conn.sent) < len(burst):
                        await anyio.wait_all_tasks_blocked()
                    while True:
                        try:
                            data, source = engine.recvfrom(100)
                            break
                        except BlockingIOError:
                            await anyio.sleep(0.01)
    assert conn.sent == [(PUB["b"], d) for d in burst] and conn.batches == []
    assert (data, source) == (b"\x04back", (LOOPBACK, to_b.port))


async def test_a_run_from_one_peer_reaches_the_engine_in_one_segmented_send() -> None:
    """Equal-sized datagrams from one peer in one wake-up: one GSO send, split by the kernel into
    the same datagrams at the engine's (ordinary) socket."""
    network = MemoryNetwork()
    run = [bytes([4, i]) * 656 for i in range(40)]  # 1312 bytes each, like WireGuard's at MTU 1280
    async with (
        await engine_socket() as engine,
        node(network, "a", ("b",), port_of(engine)) as (conn_a, proxies),
    ):
        for datagram in run:
            conn_a.inject(PUB["b"], datagram)
        with anyio.fail_after(5):
            received = [(await engine.receive())[0] for _ in run]
    assert received == run
    counters = proxies.counters(PUB["b"])
    assert (counters.to_engine_packets, counters.to_engine_bytes) == (40, 40 * 1312)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        gso = BatchSender(probe).gso
    assert counters.to_engine_sends == (1 if gso else 40)
