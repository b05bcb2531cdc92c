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

**Sibling workers** (``-workers N``, see ``_workers``) are linked by the same machinery with three
differences: the link dials the sibling's private loopback endpoint with a per-worker identity
key and the worker group's secret instead of the server key and the mesh key; the remote presents
our own server key there by design, so the "that is me" check is skipped; and it retries after
:data:`SIBLING_RETRY_INTERVAL`. Its counters live in :class:`WorkerLinkStats`, not in the mesh's.
"""

from __future__ import annotations

import logging
import ssl
import struct
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from natlib.derp import DerpError, PeerGone, PeerPresent, is_disco_packet
from natlib.derphttp import DerpClient, connect
from natlib.keys import NodePrivateKey, NodePublicKey

from ._queue import QueueEntry

if TYPE_CHECKING:
    from ._server import RelayServer

__all__ = [
    "MESH_RETRY_INTERVAL",
    "SIBLING_RETRY_INTERVAL",
    "SIBLING_RUN",
    "SIBLING_RUN_HEADER_LEN",
    "SIBLING_RUN_MAX_LEN",
    "MeshPeer",
    "MeshTarget",
    "SiblingLink",
    "WorkerLinkStats",
    "parse_mesh_with",
]

log = logging.getLogger(__name__)

MESH_RETRY_INTERVAL: Final = 5.0
MESH_WRITE_TIMEOUT: Final = 5.0
MESH_QUEUE_DEPTH: Final = 4096  # packets waiting for one mesh peer's writer
SIBLING_RETRY_INTERVAL: Final = 0.25  # a restarted worker is back within a second or so
# Private frame on sibling links only: [dst 32][src 32][packets u32][payload bytes u32] then the
# RecvPacket frames (src already in place) to write to dst as they are. Not DERP: a relay that is
# not our sibling never sees it (and would skip it as an unknown frame type).
SIBLING_RUN: Final = 0xE0
SIBLING_RUN_HEADER_LEN: Final = 72
SIBLING_RUN_MAX_LEN: Final = 60 << 10  # fits a reader's buffer next to any DERP frame
# Bytes of SiblingRuns waiting for one sibling: above the high mark, the readers of the clients
# whose packets go there pause until the link drains (the sibling is CPU-bound: reading on would
# only drop packets); above the maximum the oldest runs are dropped (a link that does not drain).
SIBLING_QUEUE_HIGH: Final = 1 << 20
SIBLING_QUEUE_MAX: Final = 8 << 20
_RUN_HEADER = struct.Struct(">BI32s32sII")


@dataclass(slots=True)
class WorkerLinkStats:
    """Counters of the links between sibling workers (kept apart from the regional mesh's)."""

    links_up: int = 0
    forwarded_in: int = 0  # ForwardPackets received from siblings
    forwarded_out: int = 0  # ForwardPackets written to siblings


@dataclass(frozen=True, slots=True)
class SiblingLink:
    """How this worker reaches sibling ``index``: its private endpoint and the credentials."""

    index: int
    port: int  # on 127.0.0.1
    identity: NodePrivateKey  # this worker's link identity (never the server key)
    secret: bytes  # the worker group's link secret, sent as the mesh key


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
        sibling: SiblingLink | None = None,
    ) -> None:
        self.server = server
        self.target = target
        self.tls = tls
        self.ssl_context = ssl_context
        self.retry_interval = retry_interval
        self.sibling = sibling
        self.is_sibling = sibling is not None
        # From a sibling: the PeerPresent frame of each key, passed on to external watchers.
        self.present_frames: dict[bytes, bytes] = {}
        self.learned: set[bytes] = set()
        self.connected = False
        self.first_connected = trio.Event()  # set at the first session (workers wait for it)
        self._had_session = False
        self.is_self = False
        self._queue: deque[tuple[bytes, bytes, bytes]] = deque()
        # Sibling links: encoded SiblingRun frames waiting, with (packets, payload bytes) each.
        self._runs: deque[tuple[bytes, int, int]] = deque()
        self._run_bytes = 0
        self._close_requests: list[bytes] = []  # sibling links: ClosePeer to pass on
        self.drained = trio.Event()  # set while the runs waiting are under SIBLING_QUEUE_HIGH
        self.drained.set()
        self._wake = trio.Event()

    @classmethod
    def to_sibling(cls, server: RelayServer, link: SiblingLink) -> MeshPeer:
        target = MeshTarget("127.0.0.1", link.port, "127.0.0.1", link.port)
        return cls(server, target, tls=False, retry_interval=SIBLING_RETRY_INTERVAL, sibling=link)

    def __repr__(self) -> str:
        return f"<MeshPeer {self.target}{' (sibling)' if self.is_sibling else ''}>"

    @property
    def name(self) -> str:
        return f"worker {self.sibling.index}" if self.sibling is not None else str(self.target)

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

    def forward_run(self, dst: bytes, entry: QueueEntry) -> None:
        """Sibling links: queue a run of RecvPacket frames (all of one length) for ``dst``."""
        stats = self.server.stats
        if not self.connected:
            stats.drop("unknown_dest", False, entry.packets, entry.payload_bytes)
            return
        frames = entry.frames
        flen = len(frames) // entry.packets
        per_chunk = max(1, (SIBLING_RUN_MAX_LEN - SIBLING_RUN_HEADER_LEN) // flen)
        plen = entry.payload_bytes // entry.packets
        for i in range(0, entry.packets, per_chunk):
            n = min(per_chunk, entry.packets - i)
            chunk = frames[i * flen : (i + n) * flen] if n != entry.packets else frames
            header = _RUN_HEADER.pack(
                SIBLING_RUN, SIBLING_RUN_HEADER_LEN + len(chunk), dst, entry.src, n, n * plen
            )
            while self._run_bytes > SIBLING_QUEUE_MAX:
                old, old_packets, old_bytes = self._runs.popleft()
                self._run_bytes -= len(old)
                stats.drop("queue_head", False, old_packets, old_bytes)
            frame = header + chunk
            self._runs.append((frame, n, n * plen))
            self._run_bytes += len(frame)
        if self._run_bytes > SIBLING_QUEUE_HIGH and self.drained.is_set():
            self.drained = trio.Event()
        self._wake.set()

    def forward_close_peer(self, key: bytes) -> None:
        """Sibling links: pass on a ClosePeer that another relay sent for a client of that worker."""
        if self.connected:
            self._close_requests.append(key)
            self._wake.set()

    def _set_drained(self) -> None:
        self.drained.set()

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
                    log.warning("%s: connection to %s lost: %s", self._kind, self.name, e)
                elif self.is_sibling:  # expected while a sibling (re)starts
                    log.debug("workers: cannot connect to %s yet: %s", self.name, e)
                else:
                    log.info("mesh: cannot connect to %s: %s", self.target, e)
            except* Exception:
                # A bug here must not take the relay down: log it and reconnect like any failure.
                log.exception("%s: unexpected error with %s", self._kind, self.name)
            finally:
                self._forget_all()
            if self.is_self:
                return
            await trio.sleep(self.retry_interval)

    @property
    def _kind(self) -> str:
        return "workers" if self.is_sibling else "mesh"

    async def _session(self) -> None:
        self._had_session = False
        server = self.server
        link = self.sibling
        client = await connect(
            self.url,
            link.identity if link is not None else server.private_key,
            ssl_context=self.ssl_context if self.tls else None,
            server_hostname=self.target.host if self.tls else None,
            mesh_key=link.secret if link is not None else server.mesh_key,
        )
        async with client:
            if link is not None:
                # A sibling serves our own key by design; any other key is not a sibling.
                if client.server_key != server.public_key:
                    raise DerpError(f"{self.name} presented key {client.server_key.short()}, not ours")
            elif client.server_key == server.public_key:
                self.is_self = True
                log.info("mesh: %s is this relay itself; not meshing with it", self.target)
                return
            await client.watch_conns()
            self.connected = self._had_session = True
            self.first_connected.set()
            self._count_up(+1)
            if link is not None:
                log.debug("workers: linked to %s", self.name)
            else:
                log.info("mesh: connected to %s (%s)", self.target, client.server_key.short())
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, client, nursery.cancel_scope)
                    await self._watch(client)
                    nursery.cancel_scope.cancel()
            finally:
                self.connected = False
                self._count_up(-1)

    def _count_up(self, delta: int) -> None:
        if self.is_sibling:
            self.server.worker_links.links_up += delta
        else:
            self.server.stats.mesh_peers_up += delta

    async def _watch(self, client: DerpClient) -> None:
        table = self.server.table
        own = self.server.public_key.raw
        while True:
            event = await client.receive()
            if isinstance(event, PeerPresent) and event.key != own:
                frame = None
                if self.is_sibling:
                    frame = self.present_frames[event.key] = event.encode()
                table.add_forwarder(event.key, self, frame)
                self.learned.add(event.key)
            elif isinstance(event, PeerGone) and event.key in self.learned:
                self.learned.discard(event.key)
                self.present_frames.pop(event.key, None)
                table.remove_forwarder(event.key, self)

    async def _writer(self, client: DerpClient, scope: trio.CancelScope) -> None:
        stats = self.server.stats
        try:
            while True:
                if not self._queue and not self._runs and not self._close_requests:
                    await self._wake.wait()
                self._wake = trio.Event()
                while self._close_requests:
                    await client.close_peer(NodePublicKey(self._close_requests.pop(0)))
                if self._runs:
                    await self._write_runs(client)
                    if not self._queue:
                        continue
                batch = list(self._queue)
                self._queue.clear()
                with trio.move_on_after(MESH_WRITE_TIMEOUT) as cs:
                    await client.forward_packets(batch)
                if cs.cancelled_caught:
                    log.warning("%s: write to %s timed out; reconnecting", self._kind, self.name)
                    for _s, _d, p in batch:
                        stats.drop("write_error", is_disco_packet(p), 1, len(p))
                    return
                if self.is_sibling:
                    self.server.worker_links.forwarded_out += len(batch)
                else:
                    stats.packets_forwarded_out += len(batch)
        finally:
            scope.cancel()

    async def _write_runs(self, client: DerpClient) -> None:
        runs = list(self._runs)
        self._runs.clear()
        self._run_bytes = 0
        # Readers resume while this batch is written, so the next one is ready when it is done.
        self._set_drained()
        data = b"".join(frame for frame, _p, _b in runs)
        with trio.move_on_after(MESH_WRITE_TIMEOUT) as cs:
            # Our own frames on our own link, encoded already (see _sclient's run hand-off).
            await client.send_encoded_frames(data)
        if cs.cancelled_caught:
            for _f, packets, nbytes in runs:
                self.server.stats.drop("write_error", False, packets, nbytes)
            raise trio.BrokenResourceError(f"write to {self.name} timed out")
        self.server.worker_links.forwarded_out += sum(p for _f, p, _b in runs)

    def _forget_all(self) -> None:
        """The connection is gone: every key learned through it is no longer reachable via it."""
        table = self.server.table
        for key in self.learned:
            table.remove_forwarder(key, self)
        self.learned.clear()
        self.present_frames.clear()
        for _s, _d, p in self._queue:
            self.server.stats.drop("gone_disconnected", is_disco_packet(p), 1, len(p))
        self._queue.clear()
        for _f, packets, nbytes in self._runs:
            self.server.stats.drop("gone_disconnected", False, packets, nbytes)
        self._runs.clear()
        self._run_bytes = 0
        self._close_requests.clear()
        self._set_drained()
