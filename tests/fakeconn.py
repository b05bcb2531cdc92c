"""Stand-ins for natlib's connection object (``natlib.open_conn``), for the client's tests only.

They implement exactly the contract the client codes against (send/receive by node key, add/remove
peers, path, path_events, ping, stats), with two transports:

* :class:`MemoryNetwork`: connections in one process joined in memory; the test decides each
  pair's path and can cut a node off (``set_down``).
* :class:`UdpConn`: one plain UDP socket with static peer addresses (a "direct" path and nothing
  else); runs as ``python tests/fakeconn.py`` wrappers in lab hosts, where the real wireguard-go
  carries real traffic through the client's proxies.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from natlib.conn import PingTimeoutError, UnknownPeerError
from natlib.derpmap import DERPMap
from natlib.keys import DiscoPrivateKey, DiscoPublicKey, NodePrivateKey, NodePublicKey

PING_MAGIC = b"\xfffake-ping"
PONG_MAGIC = b"\xfffake-pong"


@dataclass(frozen=True)
class FakePath:
    kind: str
    address: str | None
    rtt: float | None
    since: float
    region: int | None


@dataclass(frozen=True)
class FakePong:
    kind: str
    address: str | None
    rtt: float


class MemoryNetwork:
    """Connections by node key, joined in memory. Paths default to relay region 900."""

    def __init__(self) -> None:
        self.conns: dict[NodePublicKey, MemoryConn] = {}
        self.down: set[NodePublicKey] = set()
        self.paths: dict[frozenset[NodePublicKey], FakePath] = {}
        self.open_calls: list[dict[str, Any]] = []

    def set_path(self, a: NodePublicKey, b: NodePublicKey, path: FakePath) -> None:
        self.paths[frozenset((a, b))] = path
        for me, other in ((a, b), (b, a)):
            conn = self.conns.get(me)
            if conn is not None and other in conn.peers:
                conn._events.send_nowait((other, path))

    def path_between(self, a: NodePublicKey, b: NodePublicKey) -> FakePath:
        return self.paths.get(frozenset((a, b)), FakePath("relay", None, None, 0.0, 900))

    def set_down(self, node: NodePublicKey, down: bool = True) -> None:
        (self.down.add if down else self.down.discard)(node)

    @asynccontextmanager
    async def open_conn(
        self,
        node_key: NodePrivateKey,
        disco_key: DiscoPrivateKey,
        derp_map: DERPMap,
        *,
        port: int = 0,
        static_endpoints: Sequence[Any] = (),
        **natlib_options: Any,
    ) -> AsyncIterator[MemoryConn]:
        self.open_calls.append(
            {"node_key": node_key.public, "derp_map": derp_map, "port": port, **natlib_options}
        )
        conn = MemoryConn(self, node_key.public)
        self.conns[node_key.public] = conn
        try:
            yield conn
        finally:
            del self.conns[node_key.public]
            for stream in (conn._inbox_send, conn._inbox, conn._events, conn._events_receive):
                stream.close()


class MemoryConn:
    def __init__(self, network: MemoryNetwork, me: NodePublicKey) -> None:
        self.network = network
        self.me = me
        self.peers: dict[NodePublicKey, tuple[DiscoPublicKey, int, tuple[Any, ...]]] = {}
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[tuple[NodePublicKey, bytes]](1000)
        self._events, self._events_receive = anyio.create_memory_object_stream[
            tuple[NodePublicKey, FakePath]
        ](1000)
        self.sent: list[tuple[NodePublicKey, bytes]] = []
        self.batches: list[int] = []

    def add_peer(
        self,
        node_key: NodePublicKey,
        disco_key: DiscoPublicKey,
        home_region: int,
        endpoints: Sequence[Any] = (),
    ) -> None:
        self.peers[node_key] = (disco_key, home_region, tuple(endpoints))

    def remove_peer(self, node_key: NodePublicKey) -> None:
        del self.peers[node_key]

    def _reachable(self, peer: NodePublicKey) -> MemoryConn | None:
        if peer not in self.peers:
            raise UnknownPeerError(peer)
        if self.me in self.network.down or peer in self.network.down:
            return None
        other = self.network.conns.get(peer)
        return other if other is not None and self.me in other.peers else None

    async def send(self, node_key: NodePublicKey, datagram: bytes) -> None:
        self.sent.append((node_key, datagram))
        other = self._reachable(node_key)
        if other is not None:
            try:
                other._inbox_send.send_nowait((self.me, datagram))
            except anyio.WouldBlock:
                pass  # a full receive queue drops, as natlib's does

    async def send_many(self, node_key: NodePublicKey, datagrams: Sequence[bytes]) -> None:
        """natlib's batch send; each call is recorded in :attr:`batches` (its size)."""
        self.batches.append(len(datagrams))
        for datagram in datagrams:
            await self.send(node_key, datagram)

    async def receive(self) -> tuple[NodePublicKey, bytes]:
        return await self._inbox.receive()

    def receive_nowait(self) -> tuple[NodePublicKey, bytes] | None:
        try:
            return self._inbox.receive_nowait()
        except anyio.WouldBlock:
            return None

    def inject(self, peer: NodePublicKey, datagram: bytes) -> None:
        """As if ``peer`` had sent ``datagram`` (tests of the receive direction)."""
        self._inbox_send.send_nowait((peer, datagram))

    def path(self, node_key: NodePublicKey) -> FakePath:
        if node_key not in self.peers:
            raise UnknownPeerError(node_key)
        return self.network.path_between(self.me, node_key)

    async def path_events(self) -> AsyncIterator[tuple[NodePublicKey, FakePath]]:
        async for event in self._events_receive:
            yield event

    async def ping(self, node_key: NodePublicKey, timeout: float = 5.0) -> FakePong:
        if self._reachable(node_key) is None:
            await anyio.sleep(timeout)
            raise PingTimeoutError(f"no pong from {node_key.short()} within {timeout} s")
        path = self.path(node_key)
        return FakePong("relay" if path.kind == "relay" else "direct", path.address, path.rtt or 0.001)

    def stats(self) -> dict[str, Any]:
        return {"sent": len(self.sent), "peers": len(self.peers)}


class UdpConn:
    """A direct-only connection over one UDP socket; peers' addresses come from ``addresses``."""

    def __init__(self, sock: anyio.abc.UDPSocket, addresses: Mapping[NodePublicKey, tuple[str, int]]) -> None:
        self.sock = sock
        self.addresses = dict(addresses)
        self.by_address = {a: k for k, a in self.addresses.items()}
        self.peers: set[NodePublicKey] = set()
        self._pongs: dict[NodePublicKey, anyio.Event] = {}
        self.last_rtt: dict[NodePublicKey, float] = {}
        self._send_lock = (
            anyio.Lock()
        )  # anyio sockets take one writer at a time; natlib's raw sends don't care

    def add_peer(
        self,
        node_key: NodePublicKey,
        disco_key: DiscoPublicKey,
        home_region: int,
        endpoints: Sequence[Any] = (),
    ) -> None:
        self.peers.add(node_key)

    def remove_peer(self, node_key: NodePublicKey) -> None:
        self.peers.discard(node_key)

    async def send(self, node_key: NodePublicKey, datagram: bytes) -> None:
        host, port = self.addresses[node_key]
        async with self._send_lock:
            await self.sock.sendto(datagram, host, port)

    async def receive(self) -> tuple[NodePublicKey, bytes]:
        while True:
            data, (host, port) = await self.sock.receive()
            peer = self.by_address.get((host, port))
            if peer is None or peer not in self.peers:
                continue
            if data == PING_MAGIC:
                await self.send(peer, PONG_MAGIC)
                continue
            if data == PONG_MAGIC:
                event = self._pongs.get(peer)
                if event is not None:
                    event.set()
                continue
            return peer, data

    def path(self, node_key: NodePublicKey) -> FakePath:
        host, port = self.addresses[node_key]
        return FakePath("direct", f"{host}:{port}", self.last_rtt.get(node_key), 0.0, None)

    async def path_events(self) -> AsyncIterator[tuple[NodePublicKey, FakePath]]:
        await anyio.sleep(math.inf)
        yield  # type: ignore[misc]  # never reached: this fake's paths never change

    async def ping(self, node_key: NodePublicKey, timeout: float = 5.0) -> FakePong:
        # Pongs are read by receive(), which the client's proxies keep running.
        event = self._pongs[node_key] = anyio.Event()
        started = time.monotonic()
        await self.send(node_key, PING_MAGIC)
        with anyio.move_on_after(timeout):
            await event.wait()
            rtt = time.monotonic() - started
            self.last_rtt[node_key] = rtt
            host, port = self.addresses[node_key]
            return FakePong("direct", f"{host}:{port}", rtt)
        raise PingTimeoutError(f"no pong from {node_key.short()} within {timeout} s")

    def stats(self) -> dict[str, Any]:
        return {"peers": len(self.peers)}


def udp_conn_factory(
    addresses: Mapping[NodePublicKey, tuple[str, int]],
) -> Callable[..., Any]:
    """An ``open_conn`` with natlib's signature whose connections are :class:`UdpConn`."""

    @asynccontextmanager
    async def open_conn(
        node_key: NodePrivateKey,
        disco_key: DiscoPrivateKey,
        derp_map: DERPMap,
        *,
        port: int = 0,
        static_endpoints: Sequence[Any] = (),
        **natlib_options: Any,  # home_region and the like: nothing to do for a static direct path
    ) -> AsyncIterator[UdpConn]:
        async with await anyio.create_udp_socket(local_host="0.0.0.0", local_port=port) as sock:
            yield UdpConn(sock, addresses)

    return open_conn
