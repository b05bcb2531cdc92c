"""Regional mesh: this relay dials every other relay of its region and learns who is there.

For each ``-mesh-with`` entry the relay runs one :class:`MeshPeer`: a DERP client (natlib's
driver) that connects with **this relay's own node key** and the mesh key, sends WatchConns, and
turns the watched relay's PeerPresent/PeerGone stream into forwarder entries in the routing table
(``_state``). A packet for a key that is not connected here but is present on a peer is written to
that peer as ForwardPacket, on this relay's own outgoing connection to it. The receiving relay
delivers it locally and never forwards it again (one hop; the region must be a full mesh).

Flow, per peer::

    connect (mesh key, own key) ─► remote key == own key? ─► "that is me": stop for good
        └─► WatchConns ─► PeerPresent(K): add forwarder K → this peer
                          PeerGone(K):    remove forwarder K → this peer
        connection lost ─► remove every forwarder learned from this peer ─► retry in 5 s

Forwarded packets are queued per peer (bounded, oldest dropped first) and written in batches by
one writer task with a 5 s write timeout; a timeout drops the connection, which then reconnects.
Nothing on a client's hot path ever waits for a mesh peer.
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from natlib.derp import DerpError, PeerGone, PeerPresent, is_disco_packet
from natlib.derphttp import DerpClient, connect

if TYPE_CHECKING:
    from ._server import RelayServer

__all__ = ["MESH_RETRY_INTERVAL", "MeshPeer", "MeshTarget", "parse_mesh_with"]

log = logging.getLogger(__name__)

MESH_RETRY_INTERVAL: Final = 5.0
MESH_WRITE_TIMEOUT: Final = 5.0
MESH_QUEUE_DEPTH: Final = 4096  # packets waiting for one mesh peer's writer


@dataclass(frozen=True, slots=True)
class MeshTarget:
    """One ``-mesh-with`` entry: ``host[:port]`` for the URL and TLS, optionally ``/dialhost[:port]``."""

    host: str
    port: int
    dial_host: str
    dial_port: int

    def __str__(self) -> str:
        return f"{_fmt(self.host, self.port)}" + (
            f" (dialling {_fmt(self.dial_host, self.dial_port)})"
            if (self.dial_host, self.dial_port) != (self.host, self.port)
            else ""
        )


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, default_port


def parse_mesh_with(value: str, default_port: int) -> list[MeshTarget]:
    """Parse ``-mesh-with``: comma-separated ``host[:port][/dialhost[:port]]``; port defaults to ours."""
    targets = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, _, dial = entry.partition("/")
        try:
            host, port = _split_host_port(name, default_port)
            dial_host, dial_port = _split_host_port(dial, port) if dial else (host, port)
        except ValueError:
            raise ValueError(f"bad -mesh-with entry {entry!r}: want host[:port][/dialhost[:port]]") from None
        if not host or not dial_host or not (0 < port < 65536 and 0 < dial_port < 65536):
            raise ValueError(f"bad -mesh-with entry {entry!r}: want host[:port][/dialhost[:port]]")
        targets.append(MeshTarget(host, port, dial_host, dial_port))
    return targets


class MeshPeer:
    """The connection from this relay to one other relay of the region. See the module docstring."""

    def __init__(
        self,
        server: RelayServer,
        target: MeshTarget,
        *,
        tls: bool,
        ssl_context: ssl.SSLContext | None = None,
        retry_interval: float = MESH_RETRY_INTERVAL,
    ) -> None:
        self.server = server
        self.target = target
        self.tls = tls
        self.ssl_context = ssl_context
        self.retry_interval = retry_interval
        self.learned: set[bytes] = set()
        self.connected = False
        self._had_session = False
        self.is_self = False
        self._queue: deque[tuple[bytes, bytes, bytes]] = deque()
        self._wake = trio.Event()

    def __repr__(self) -> str:
        return f"<MeshPeer {self.target}>"

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{_fmt(self.target.dial_host, self.target.dial_port)}/derp"

    # -- called from client connections (never blocks) ------------------------------------------

    def forward(self, src: bytes, dst: bytes, packet: bytes) -> None:
        stats = self.server.stats
        if not self.connected:
            stats.drop("unknown_dest", is_disco_packet(packet), 1, len(packet))
            return
        if len(self._queue) >= MESH_QUEUE_DEPTH:
            _s, _d, old = self._queue.popleft()
            stats.drop("queue_head", is_disco_packet(old), 1, len(old))
        self._queue.append((src, dst, packet))
        self._wake.set()

    # -- lifetime --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the mesh connection up until cancelled (or until the peer turns out to be us)."""
        while True:
            was_connected = False
            try:
                await self._session()
            except* (DerpError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as group:
                was_connected = self._had_session
                e = group.exceptions[0]
                if was_connected:
                    log.warning("mesh: connection to %s lost: %s", self.target, e)
                else:
                    log.info("mesh: cannot connect to %s: %s", self.target, e)
            except* Exception:
                # A bug here must not take the relay down: log it and reconnect like any failure.
                log.exception("mesh: unexpected error with %s", self.target)
            finally:
                self._forget_all()
            if self.is_self:
                return
            await trio.sleep(self.retry_interval)

    async def _session(self) -> None:
        self._had_session = False
        server = self.server
        client = await connect(
            self.url,
            server.private_key,
            ssl_context=self.ssl_context if self.tls else None,
            server_hostname=self.target.host if self.tls else None,
            mesh_key=server.mesh_key,
        )
        async with client:
            if client.server_key == server.public_key:
                self.is_self = True
                log.info("mesh: %s is this relay itself; not meshing with it", self.target)
                return
            await client.watch_conns()
            self.connected = self._had_session = True
            server.stats.mesh_peers_up += 1
            log.info("mesh: connected to %s (%s)", self.target, client.server_key.short())
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, client, nursery.cancel_scope)
                    await self._watch(client)
                    nursery.cancel_scope.cancel()
            finally:
                self.connected = False
                server.stats.mesh_peers_up -= 1

    async def _watch(self, client: DerpClient) -> None:
        table = self.server.table
        own = self.server.public_key.raw
        while True:
            event = await client.receive()
            if isinstance(event, PeerPresent) and event.key != own:
                table.add_forwarder(event.key, self)
                self.learned.add(event.key)
            elif isinstance(event, PeerGone) and event.key in self.learned:
                self.learned.discard(event.key)
                table.remove_forwarder(event.key, self)

    async def _writer(self, client: DerpClient, scope: trio.CancelScope) -> None:
        stats = self.server.stats
        try:
            while True:
                if not self._queue:
                    await self._wake.wait()
                self._wake = trio.Event()
                batch = list(self._queue)
                self._queue.clear()
                with trio.move_on_after(MESH_WRITE_TIMEOUT) as cs:
                    await client.forward_packets(batch)
                if cs.cancelled_caught:
                    log.warning("mesh: write to %s timed out; reconnecting", self.target)
                    for _s, _d, p in batch:
                        stats.drop("write_error", is_disco_packet(p), 1, len(p))
                    return
                stats.packets_forwarded_out += len(batch)
        finally:
            scope.cancel()

    def _forget_all(self) -> None:
        """The connection is gone: every key learned through it is no longer reachable via it."""
        table = self.server.table
        for key in self.learned:
            table.remove_forwarder(key, self)
        self.learned.clear()
        for _s, _d, p in self._queue:
            self.server.stats.drop("gone_disconnected", is_disco_packet(p), 1, len(p))
        self._queue.clear()
