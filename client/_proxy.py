"""Per-peer loopback UDP proxies between the WireGuard engine and natlib's connection.

wireguard-go owns its UDP socket and only talks to endpoints, so each peer gets a UDP socket on
``127.0.0.1:<ephemeral port>`` and that address is the peer's ``endpoint=`` in the engine
(the UDP proxy design of ecosystem.md §5.3)::

    engine --(to 127.0.0.1:pB)--> proxy socket of B --conn.send(B, datagram)--> natlib --> B
    engine <--(from 127.0.0.1:pB)-- proxy socket of B <--conn.receive() -> (B, datagram)-- natlib

natlib picks the path (direct or relay) per datagram; the engine never sees a real address, so a
path change needs no engine reconfiguration and loses nothing.

Only datagrams from the engine's own port on loopback are forwarded: any other local process
writing to a proxy port is dropped and counted (it could otherwise inject traffic into the mesh).
Datagrams for a peer natlib cannot reach yet, or from a peer without a proxy, are dropped and
counted, as a lossy network would; WireGuard retransmits its handshakes by itself.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Final

import anyio

from natlib.conn import UnknownPeerError
from natlib.keys import NodePublicKey
from natlib.udpbatch import BatchSender

from ._endpoint import Endpoint
from ._meshconn import BurstReceiver, BurstSender, DatagramConn

__all__ = [
    "LOOPBACK",
    "MAX_DATAGRAM",
    "LoopbackProxies",
    "ProxyCounters",
    "ProxyError",
    "open_loopback_proxies",
]

logger = logging.getLogger(__name__)

LOOPBACK: Final = "127.0.0.1"
#: The largest UDP payload; WireGuard's are at most MTU + 32 bytes, so nothing real is cut.
MAX_DATAGRAM: Final = 65535
#: Datagrams read from one proxy socket per wakeup before letting other tasks run.
READ_BATCH: Final = 64
#: Requested send/receive buffer of each proxy socket.
SOCKET_BUFFER_BYTES: Final = 4 << 20


class ProxyError(Exception):
    """A proxy socket could not be opened."""


@dataclass(slots=True)
class ProxyCounters:
    """What one peer's proxy moved and dropped (packets and bytes)."""

    to_peer_packets: int = 0
    to_peer_bytes: int = 0
    to_engine_packets: int = 0
    to_engine_bytes: int = 0
    #: conn.send refused the datagram (no path to the peer yet, connection closing).
    send_failures: int = 0
    #: Datagrams on the proxy port that did not come from the engine's port.
    foreign_dropped: int = 0
    #: The engine's socket buffer was full (or its port refused: the engine restarting).
    to_engine_dropped: int = 0
    #: System calls that carried the to-engine packets (fewer when runs went out segmented).
    to_engine_sends: int = 0


class LoopbackProxies:
    """The running proxies of :func:`open_loopback_proxies`: one loopback endpoint per peer."""

    def __init__(self, engine_port: int, sockets: Mapping[NodePublicKey, socket.socket]) -> None:
        self.engine_port = engine_port
        self._sockets = dict(sockets)
        self._counters = {peer: ProxyCounters() for peer in sockets}
        self._senders = {peer: BatchSender(sock) for peer, sock in sockets.items()}
        #: Datagrams natlib delivered from a node that has no proxy (not a peer in the mesh file).
        self.unknown_peer_dropped = 0

    @property
    def peers(self) -> tuple[NodePublicKey, ...]:
        return tuple(self._sockets)

    def endpoint(self, peer: NodePublicKey) -> Endpoint:
        """The address the engine must use as ``peer``'s endpoint; KeyError for an unknown peer."""
        port: int = self._sockets[peer].getsockname()[1]
        return Endpoint(ipaddress.IPv4Address(LOOPBACK), port)

    def endpoints(self) -> dict[NodePublicKey, Endpoint]:
        return {peer: self.endpoint(peer) for peer in self._sockets}

    def counters(self, peer: NodePublicKey) -> ProxyCounters:
        return self._counters[peer]

    async def _engine_to_peer(self, conn: DatagramConn, peer: NodePublicKey) -> None:
        sock, counters = self._sockets[peer], self._counters[peer]
        engine = (LOOPBACK, self.engine_port)
        send_many = conn.send_many if isinstance(conn, BurstSender) else None
        while True:
            await anyio.wait_readable(sock)
            # Drain what is queued before waiting again: one wake-up (and, with send_many, one
            # hand-over to natlib) per burst, not per datagram.
            batch: list[bytes] = []
            for _ in range(READ_BATCH):
                try:
                    datagram, source = sock.recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                if source != engine:
                    counters.foreign_dropped += 1
                    continue
                batch.append(datagram)
            if not batch:
                continue
            if send_many is not None:
                try:
                    await send_many(peer, batch)
                except (UnknownPeerError, OSError) as e:
                    self._send_failed(peer, counters, len(batch), e)
                    continue
                counters.to_peer_packets += len(batch)
                counters.to_peer_bytes += sum(map(len, batch))
                continue
            for datagram in batch:
                try:
                    await conn.send(peer, datagram)
                except (UnknownPeerError, OSError) as e:
                    self._send_failed(peer, counters, 1, e)
                    continue
                counters.to_peer_packets += 1
                counters.to_peer_bytes += len(datagram)

    @staticmethod
    def _send_failed(peer: NodePublicKey, counters: ProxyCounters, count: int, e: Exception) -> None:
        """natlib refused datagrams (no path yet, closing): dropped, like a lossy link would."""
        before = counters.send_failures
        counters.send_failures += count
        if before == 0 or before // 1000 != counters.send_failures // 1000:
            logger.info("cannot send to %s (%d dropped so far): %r", peer.short(), counters.send_failures, e)

    async def _peers_to_engine(self, conn: DatagramConn) -> None:
        engine = (LOOPBACK, self.engine_port)
        drain = conn.receive_nowait if isinstance(conn, BurstReceiver) else None
        while True:
            burst = [await conn.receive()]
            # What else is already waiting goes out in the same wake-up (bounded, then yield),
            # each peer's consecutive datagrams in as few system calls as the kernel allows.
            while drain is not None and len(burst) < READ_BATCH:
                item = drain()
                if item is None:
                    break
                burst.append(item)
            start = 0
            for i in range(1, len(burst) + 1):
                if i == len(burst) or burst[i][0] != burst[start][0]:
                    self._to_engine(engine, burst[start][0], [d for _, d in burst[start:i]])
                    start = i

    def _to_engine(self, engine: tuple[str, int], peer: NodePublicKey, datagrams: list[bytes]) -> None:
        sender = self._senders.get(peer)
        if sender is None:
            self.unknown_peer_dropped += len(datagrams)
            return
        counters = self._counters[peer]
        calls = sender.segmented_sends + sender.plain_sends
        unsent, error = sender.send(datagrams, engine)
        counters.to_engine_sends += sender.segmented_sends + sender.plain_sends - calls
        if error is not None:
            logger.debug("sending to the engine failed: %s", error)  # e.g. it is restarting
        # A full engine socket buffer (the engine is not keeping up) or an error: lost, like on a wire.
        counters.to_engine_dropped += unsent
        counters.to_engine_packets += len(datagrams) - unsent
        counters.to_engine_bytes += sum(map(len, datagrams[: len(datagrams) - unsent]))


def _open_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            # Room for bursts while the event loop is busy elsewhere (the kernel caps it at
            # net.core.rmem_max/wmem_max); losses here make TCP over the tunnel back off.
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        sock.bind((LOOPBACK, 0))
    except OSError as e:
        sock.close()
        raise ProxyError(f"cannot open a loopback proxy socket: {e.strerror or e}") from None
    return sock


@asynccontextmanager
async def open_loopback_proxies(
    conn: DatagramConn, peers: Iterable[NodePublicKey], engine_port: int
) -> AsyncIterator[LoopbackProxies]:
    """Open one loopback proxy socket per peer and shuttle datagrams until the context exits.

    ``engine_port`` is the engine's UDP listen port on this host. Inside the context, the proxies
    own ``conn.receive()``: nothing else may call it. Leaving the context (also by cancellation)
    stops both directions and closes the sockets; datagrams in flight are dropped. If the
    connection closes under the proxies (``ConnClosedError``), the context ends with that error.
    """
    if not 0 < engine_port <= 0xFFFF:
        raise ValueError(f"engine port {engine_port} is not in 1-65535")
    with ExitStack() as stack:
        sockets = {peer: stack.enter_context(_open_socket()) for peer in peers}
        proxies = LoopbackProxies(engine_port, sockets)
        async with anyio.create_task_group() as tg:
            for peer in sockets:
                tg.start_soon(proxies._engine_to_peer, conn, peer)
            tg.start_soon(proxies._peers_to_engine, conn)
            logger.debug("loopback proxies for %d peers, engine port %d", len(sockets), engine_port)
            try:
                yield proxies
            finally:
                tg.cancel_scope.cancel()
