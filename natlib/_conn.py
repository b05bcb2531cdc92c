"""The connection object: one UDP socket per address family plus DERP clients, for many peers.

:class:`Conn` is the anyio driver around the sans-io pieces: :class:`natlib.path.PeerPath` (one
per peer: where each datagram goes, which disco packets to send), :mod:`natlib.disco` (sealing and
opening), :class:`natlib.stunclient.StunClient` (STUN on the shared socket) and
:class:`natlib.candidates.Gatherer` (our endpoints). It runs under trio and asyncio.

Tasks (all in the task group of :func:`open_conn`; leaving the ``async with`` cancels them, closes
the sockets and every relay connection, and makes later calls raise :class:`ConnClosedError`):

* one reader per UDP socket. Every datagram is demultiplexed: a STUN answer to one of our
  transactions (the shared :class:`~natlib.stunclient.StunClient` says so), else a disco packet
  (the magic), else data, accepted only from an address an authenticated disco packet of a peer
  came from (and delivered as that peer's). Under trio the socket has GRO on
  (:mod:`natlib.udpbatch`): one read may carry a run of a peer's datagrams, split first;
* one task per relay region: connect, send NotePreferred on the home region, read, reconnect with
  back-off; a region other than the home one is closed after :data:`DERP_IDLE_CLOSE` seconds
  without traffic. Sends to the relay are queued (bounded) and written by the region's writer,
  so :meth:`Conn.send` never waits for a slow TCP connection;
* one timer task: the earliest :meth:`PeerPath.next_deadline` of all peers, woken when an input
  may have moved a deadline;
* the gatherer (re-gathering every 20–26 s while data flows, and on request; new endpoints are
  sent in a CallMeMaybe to every peer without a direct path) and the network monitor (a change,
  or a new STUN address without one, which is a NAT rebinding: re-gather, redial the relay,
  every peer back to the relay, CallMeMaybe on the next send).

Demultiplexing rule for data: a UDP datagram that is neither STUN nor disco is data only if its
source address is mapped to a peer. The mapping is learned from authenticated disco packets (a
ping or a pong from the peer's disco key), so a forged source at most injects datagrams that the
layer above (WireGuard) authenticates anyway.

Hard NAT: a peer still on the relay :data:`BIRTHDAY_GRACE` after it started sending gets a bounded
birthday-paradox probe (:mod:`natlib.birthday`, driven by :mod:`natlib._conn_birthday`); see
:meth:`Conn._maybe_birthday` for how each side decides which half to play.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import math
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import disco
from ._conn_birthday import BirthdayRun
from .birthday import EasySidePlan, HardSidePlan, retry_interval
from .candidates import (
    AddressFilter,
    Candidate,
    Gatherer,
    GatherReport,
    IPNetwork,
    StunResultLike,
    port_mapper_source,
)
from .derp import RecvPacket, Restarting
from .derphttp import DerpClient, DerpConnectError, DerpConnectionClosed, ReconnectSchedule, connect
from .derpmap import DERPMap, DERPNode, DERPRegion
from .disco import AddrPort, CallMeMaybe, DiscoError, Ping, Pong
from .keys import DiscoPrivateKey, DiscoPublicKey, NodePrivateKey, NodePublicKey
from .path import (
    CandidateInfo,
    PathChanged,
    PathKind,
    PeerPath,
    ResendViaRelay,
    SendCallMeMaybe,
    SendDiscoPing,
    SendDiscoPong,
)
from .stunclient import StunClient, StunResult
from .udpbatch import GRO_ANCILLARY_SIZE, BatchSender, enable_gro, split_coalesced

__all__ = [
    "DERP_IDLE_CLOSE",
    "DERP_QUEUE_LEN",
    "RECEIVE_QUEUE_LEN",
    "RELAY_PLACEHOLDER_IP",
    "Conn",
    "ConnClosedError",
    "PathInfo",
    "PingResult",
    "PingTimeoutError",
    "UnknownPeerError",
    "open_conn",
]

log = logging.getLogger(__name__)

DERP_IDLE_CLOSE: Final = 60.0
"""A relay region other than the home one is disconnected after this many idle seconds."""
DERP_QUEUE_LEN: Final = 1024
"""Packets queued per relay region while its connection writes; beyond that they are dropped."""
DERP_WRITE_BATCH: Final = 64
DERP_WRITE_BATCH_BYTES: Final = 64 << 10
"""At most this many queued packets (or bytes) go to the relay in one write."""
RECEIVE_QUEUE_LEN: Final = 4096
"""Datagrams received and not yet taken by :meth:`Conn.receive`; beyond that they are dropped."""
PATH_EVENT_QUEUE_LEN: Final = 256
"""Path events buffered per :meth:`Conn.path_events` iterator; a slow reader misses newer ones."""
CALL_ME_MAYBE_UNPROMPTED_GAP: Final = 5.0
"""With no known candidate of a peer, send it our endpoints at most this often (see _on_send)."""
PORTMAP_RETRIES: Final = 3
PORTMAP_RETRY_DELAY: Final = 1.0
"""After a round whose port mapping failed, re-gather after 1 s, 2 s, 3 s (then only periodically)."""
BIRTHDAY_GRACE: Final = 1.0
"""Sending on the relay this long without a direct path starts birthday probing (see _maybe_birthday)."""
CALL_ME_MAYBE_ANSWER_GAP: Final = 5.0
"""A received CallMeMaybe is answered with ours (see _on_disco) at most this often per peer."""
REDIAL_MIN_GAP: Final = 1.0
"""Relay connections are redialled on suspicion (a send error) at most this often."""
_LINK_ERRNOS: Final = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN})
_TIMER_SLACK: Final = 0.005
SOCKET_BUFFER_BYTES: Final = 4 << 20
"""Requested send and receive buffer of each UDP socket (forced past net.core.*mem_max as root):
a burst of WireGuard datagrams must wait in the kernel, not be dropped, while the loop is busy."""
READ_BATCH: Final = 256
"""Datagrams read from one UDP socket per wake-up (under trio) before other tasks run."""
SEND_YIELD_EVERY: Final = 64
"""A :meth:`Conn.send` is always a cancellation point but yields to the scheduler only this often
(the caller, a proxy reading its own socket in batches, yields at its own waits)."""
_SEND_TIMER_SLACK: Final = 0.02
"""A send skips re-reading its peer's deadline when the timer wakes within this anyway."""
_MAX_UDP: Final = 65535
_ADDR_CACHE_MAX: Final = 4096
RELAY_PLACEHOLDER_IP: Final = ipaddress.IPv4Address("127.3.3.40")
"""The "source" a pong over the relay carries (Tailscale's magic DERP IP; the port is the region)."""


class ConnClosedError(RuntimeError):
    """The connection was closed (its ``async with`` block is over)."""


class UnknownPeerError(KeyError):
    """The node key names no peer of this connection (see :meth:`Conn.add_peer`)."""


class PingTimeoutError(TimeoutError):
    """A disco ping of :meth:`Conn.ping` got no pong in time."""


@dataclass(frozen=True, slots=True)
class PathInfo:
    """How datagrams to one peer travel now.

    ``kind``: ``"relay"``, ``"direct"`` (UDP alone, trusted) or ``"both"`` (UDP and relay while the
    direct address is unconfirmed); ``address`` the peer's UDP address (None on the relay); ``rtt``
    the latest direct RTT in seconds; ``since`` when this kind and address began
    (``anyio.current_time()`` clock); ``region`` the relay region used (None when direct).
    """

    kind: Literal["relay", "direct", "both"]
    address: tuple[str, int] | None
    rtt: float | None
    since: float
    region: int | None

    @classmethod
    def of(cls, changed: PathChanged, region: int) -> PathInfo:
        kind: Literal["relay", "direct", "both"] = changed.kind.value
        return cls(
            kind,
            changed.addr.socket_address() if changed.addr is not None else None,
            changed.rtt,
            changed.since,
            None if changed.kind is PathKind.DIRECT else region,
        )


@dataclass(frozen=True, slots=True)
class PingResult:
    """One answered disco ping: the path it took (``"direct"`` or ``"relay"``), the address it went
    to (None over the relay) and the round-trip time in seconds."""

    kind: Literal["direct", "relay"]
    address: tuple[str, int] | None
    rtt: float


@dataclass(slots=True)
class _Peer:
    node_key: NodePublicKey
    disco_key: DiscoPublicKey
    home_region: int
    path: PeerPath
    addresses: set[AddrPort] = field(default_factory=set)
    last_unprompted_cmm: float | None = None
    last_cmm_sent: float | None = None
    relay_since: float | None = None  # sending while on the relay since (for birthday probing)
    birthday: BirthdayRun | None = None
    birthday_scope: anyio.CancelScope | None = None
    birthday_last: float | None = None
    birthday_misses: int = 0  # attempts in a row that found nothing
    call_me_maybe_pending: bool = False


@dataclass(slots=True)
class _PendingPing:
    peer: NodePublicKey
    sent_at: float
    addr: AddrPort | None
    done: anyio.Event
    rtt: float | None = None


@dataclass(slots=True)
class _ConnCounters:
    udp_datagrams_received: int = 0
    udp_bytes_received: int = 0
    udp_send_errors: int = 0
    udp_segmented_sends: int = 0
    udp_coalesced_reads: int = 0
    derp_packets_received: int = 0
    derp_packets_sent: int = 0
    derp_dropped_queue_full: int = 0
    derp_dropped_disconnected: int = 0
    derp_connects: int = 0
    derp_idle_closes: int = 0
    derp_redials: int = 0
    data_dropped_unknown_source: int = 0
    data_dropped_receive_queue_full: int = 0
    stun_datagrams: int = 0
    disco_opened: int = 0
    disco_dropped: dict[str, int] = field(default_factory=dict)
    link_changes: int = 0
    gather_rounds: int = 0
    pings_user: int = 0
    pings_user_lost: int = 0
    birthday_started: int = 0
    birthday_succeeded: int = 0
    birthday_gave_up: int = 0

    def drop(self, reason: str) -> None:
        self.disco_dropped[reason] = self.disco_dropped.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "disco_dropped"}
        out["disco_dropped"] = dict(self.disco_dropped)
        return out


def _derp_urls(node: DERPNode, tls: bool) -> list[str]:
    scheme = "https" if tls else "http"
    port = node.effective_derp_port
    hosts = [h for h in (node.ipv4, node.ipv6) if h not in ("", "none")] or [node.host_name]
    return [f"{scheme}://{f'[{h}]' if ':' in h else h}:{port}/derp" for h in hosts]


def _cert_pin(node: DERPNode) -> bytes | None:
    """The leaf certificate's SHA-256 a ``sha256-raw:<hex>`` CertName pins (ValueError if malformed)."""
    pin = node.cert_pin
    return None if pin is None else bytes.fromhex(pin)


class _Region:
    """One relay region: a reconnecting DERP client with a bounded send queue."""

    def __init__(self, conn: Conn, region: DERPRegion, home: bool) -> None:
        self.conn = conn
        self.region = region
        self.home = home
        self.client: DerpClient | None = None
        self.connected = anyio.Event()
        self.last_used = anyio.current_time()
        send, recv = anyio.create_memory_object_stream[tuple[NodePublicKey, bytes]](DERP_QUEUE_LEN)
        self._queue_in: MemoryObjectSendStream[tuple[NodePublicKey, bytes]] = send
        self._queue_out: MemoryObjectReceiveStream[tuple[NodePublicKey, bytes]] = recv
        self.scope = anyio.CancelScope()
        self._serve_scope: anyio.CancelScope | None = None

    def enqueue(self, dst: NodePublicKey, packet: bytes) -> None:
        self.last_used = anyio.current_time()
        try:
            self._queue_in.send_nowait((dst, packet))
        except anyio.WouldBlock:
            self.conn._counters.derp_dropped_queue_full += 1

    async def run(self) -> None:
        """Connect, read and write until cancelled or idle; reconnect with back-off on failure."""
        with self.scope:
            try:
                schedule = ReconnectSchedule()
                while True:
                    client = await self._connect()
                    if client is None:
                        await anyio.sleep(schedule.failed(anyio.current_time()))
                        continue
                    schedule.connected()
                    hint = await self._serve(client)
                    if hint is not None:
                        await anyio.sleep(hint.reconnect_in_ms / 1000)
                        schedule.restarting(anyio.current_time(), hint)
                    if not self.home and anyio.current_time() - self.last_used >= self.conn._derp_idle_close:
                        self.conn._counters.derp_idle_closes += 1
                        return
            finally:
                self.conn._regions.pop(self.region.region_id, None)
                self._queue_in.close()
                self._queue_out.close()

    def reconnect(self) -> None:
        """Drop the connection (it may ride on an address that is gone); the run loop redials.

        The writer stops at once, so what is queued from now on waits for the new connection
        instead of going into a TCP socket whose address may no longer exist.
        """
        if self._serve_scope is not None:
            self._serve_scope.cancel()

    async def _connect(self) -> DerpClient | None:
        for node in self.region.nodes:
            if node.stun_only:
                continue
            for url in _derp_urls(node, self.conn._derp_tls):
                try:
                    client = await connect(
                        url,
                        self.conn._node_private,
                        ssl_context=node.tls_context() if self.conn._derp_tls else None,
                        server_hostname=node.tls_server_name if self.conn._derp_tls else None,
                        connect_timeout=self.conn._derp_connect_timeout,
                        cert_sha256=_cert_pin(node) if self.conn._derp_tls else None,
                    )
                except (DerpConnectError, OSError, ValueError) as e:
                    log.debug("region %d: %s: %s", self.region.region_id, url, e)
                    continue
                self.conn._counters.derp_connects += 1
                return client
        return None

    async def _serve(self, client: DerpClient) -> Restarting | None:
        hint: Restarting | None = None
        async with client, anyio.create_task_group() as tg:
            if self.home:
                with contextlib.suppress(DerpConnectionClosed):
                    await client.note_preferred(True)
            self.client = client
            self._serve_scope = tg.cancel_scope
            self.connected.set()
            tg.start_soon(self._write, client, tg.cancel_scope)
            try:
                while True:
                    with anyio.move_on_after(None if self.home else self.conn._derp_idle_close) as idle:
                        event = await client.receive()
                    if idle.cancelled_caught:
                        if anyio.current_time() - self.last_used >= self.conn._derp_idle_close:
                            break
                        continue
                    if isinstance(event, RecvPacket):
                        self.conn._on_derp_packet(self.region.region_id, event.src, event.packet)
                    elif isinstance(event, Restarting):
                        hint = event
                        break
            except DerpConnectionClosed as e:
                log.info("relay region %d connection lost (%s)", self.region.region_id, e.reason)
            finally:
                self.client = None
                self._serve_scope = None
                self.connected = anyio.Event()
                tg.cancel_scope.cancel()
        return hint

    async def _write(self, client: DerpClient, scope: anyio.CancelScope) -> None:
        """Write what is queued; a burst waiting in the queue goes out in one write."""
        queue = self._queue_out
        try:
            async for dst, packet in queue:
                batch = [(dst, packet)]
                size = len(packet)
                while len(batch) < DERP_WRITE_BATCH and size < DERP_WRITE_BATCH_BYTES:
                    try:
                        item = queue.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    batch.append(item)
                    size += len(item[1])
                await client.send_packets(batch)
                self.conn._counters.derp_packets_sent += len(batch)
        except DerpConnectionClosed:
            scope.cancel()


class Conn:
    """A node's connection to its peers (see the module docstring); made by :func:`open_conn`."""

    def __init__(
        self,
        node_key: NodePrivateKey,
        disco_key: DiscoPrivateKey,
        derp_map: DERPMap,
        *,
        derp_tls: bool,
        derp_connect_timeout: float,
        derp_idle_close: float = DERP_IDLE_CLOSE,
    ) -> None:
        self._node_private = node_key
        self._disco_private = disco_key
        self.node_key: NodePublicKey = node_key.public
        self.disco_key: DiscoPublicKey = disco_key.public
        self.derp_map = derp_map
        self.home_region: int = 0
        self._derp_tls = derp_tls
        self._derp_connect_timeout = derp_connect_timeout
        self._derp_idle_close = derp_idle_close
        self._peers: dict[NodePublicKey, _Peer] = {}
        self._by_disco: dict[DiscoPublicKey, _Peer] = {}
        self._by_addr: dict[AddrPort, _Peer] = {}
        self._sockets: dict[int, anyio.abc.UDPSocket] = {}
        # The plain sockets behind them, for non-blocking sends without awaiting (asyncio's
        # raw_socket attribute is a wrapper without sendto).
        self._raw_sockets: dict[int, socket.socket] = {}
        # Peers reached through a birthday probe's socket: answer them through that socket.
        self._routes: dict[AddrPort, socket.socket] = {}
        self.birthday_probing = True
        self._regions: dict[int, _Region] = {}
        self._stun = StunClient()
        self._stun_waiters: dict[bytes, anyio.Event] = {}
        self._stun_results: dict[bytes, StunResult] = {}
        self._pings: dict[bytes, _PendingPing] = {}
        self._counters = _ConnCounters()
        self._timer_wakeup = anyio.Event()
        self._timer_sleeps_until = math.inf
        self._stun_wakeup = anyio.Event()
        self._event_queues: list[MemoryObjectSendStream[tuple[NodePublicKey, PathInfo]]] = []
        send, recv = anyio.create_memory_object_stream[tuple[NodePublicKey, bytes]](RECEIVE_QUEUE_LEN)
        self._recv_in: MemoryObjectSendStream[tuple[NodePublicKey, bytes]] = send
        self._recv_out: MemoryObjectReceiveStream[tuple[NodePublicKey, bytes]] = recv
        self._tg: anyio.abc.TaskGroup | None = None
        self._gatherer: Gatherer | None = None
        self._closed = False
        self.last_gather: GatherReport | None = None
        self._portmap_retries = 0
        self._last_redial: float | None = None
        self._last_link_change = -math.inf
        self.exclude = AddressFilter()
        # Parsed source addresses and formatted destinations: ipaddress parsing and str() are the
        # dearest steps of a datagram otherwise (bounded: cleared when full).
        self._addr_cache: dict[tuple[str, int], AddrPort] = {}
        # Where a datagram to an address goes (socket, sockaddr); cleared when _routes changes.
        self._udp_targets: dict[AddrPort, tuple[socket.socket, tuple[str, int]]] = {}
        # Segmented (GSO) senders of send_many, per socket (birthday sockets come and go).
        self._batch_senders: dict[socket.socket, BatchSender] = {}
        # Data fast path: recvfrom's source → (peer, address); cleared when _by_addr changes.
        self._by_source: dict[tuple[Any, Any], tuple[_Peer, AddrPort]] = {}
        self._sends_since_yield = 0
        self._activity_noted = -math.inf
        self._now = anyio.current_time  # trio's own clock under trio (see open_conn): cheaper

    # -- public API ---------------------------------------------------------------------------------

    @property
    def local_port(self) -> int:
        """The UDP port our sockets are bound to (the same for both families)."""
        sock = self._sockets.get(4) or self._sockets[6]
        return int(sock.extra(anyio.abc.SocketAttribute.local_port))

    def local_endpoints(self) -> list[Candidate]:
        """Our current candidates (from the latest gathering round)."""
        return self._gatherer.candidates if self._gatherer is not None else []

    def add_peer(
        self,
        node_key: NodePublicKey,
        disco_key: DiscoPublicKey,
        home_region: int,
        endpoints: Sequence[Any] = (),
    ) -> None:
        """Add a peer, or update it (a new disco key means it restarted: its path starts over).

        ``endpoints``: its advertised UDP endpoints, ``(ip, port)`` tuples (or :class:`AddrPort`).
        Raises :class:`ValueError` for a malformed endpoint and :class:`ConnClosedError` after close.
        """
        self._check_open()
        addrs = [a for a in (_addr_of(e) for e in endpoints) if not self.exclude.excludes_ip(a.ip)]
        now = anyio.current_time()
        peer = self._peers.get(node_key)
        if peer is None:
            peer = _Peer(node_key, disco_key, home_region, PeerPath(now, addrs, name=node_key.short()))
            self._peers[node_key] = peer
        else:
            if peer.disco_key != disco_key:
                self._by_disco.pop(peer.disco_key, None)
                peer.disco_key = disco_key
                peer.path.on_link_change(now)
            peer.home_region = home_region
            peer.path.set_endpoints(now, addrs)
        self._by_disco[disco_key] = peer
        self._after_input(peer)

    def remove_peer(self, node_key: NodePublicKey) -> None:
        """Forget a peer (unknown keys are ignored); its datagrams are dropped from now on."""
        peer = self._peers.pop(node_key, None)
        if peer is None:
            return
        self._by_disco.pop(peer.disco_key, None)
        self._stop_birthday(peer)
        self._by_source.clear()
        self._udp_targets.clear()
        for addr in peer.addresses:
            if self._by_addr.get(addr) is peer:
                del self._by_addr[addr]
                self._routes.pop(addr, None)

    async def send(self, node_key: NodePublicKey, datagram: bytes) -> None:
        """Send one datagram to a peer, by UDP, over the relay or both, as its path says.

        Never waits for the relay (its packets are queued, and dropped when the queue is full), nor
        for the UDP socket (a full send buffer drops the datagram, as a wire would). It is always a
        cancellation point, but lets other tasks run only every :data:`SEND_YIELD_EVERY` calls.
        Raises :class:`UnknownPeerError` and :class:`ConnClosedError`.
        """
        peer, now = self._start_send(node_key)
        datagram = bytes(datagram)
        udp, via_relay = peer.path.note_sent(now, datagram)
        if udp is not None:
            self._send_udp_nowait(peer, udp, datagram)
        if via_relay:
            self._send_relay(peer, datagram)
        self._finish_send(peer, now, relayed=via_relay)
        self._sends_since_yield += 1
        if self._sends_since_yield >= SEND_YIELD_EVERY:
            self._sends_since_yield = 0
            await anyio.lowlevel.checkpoint()
        else:
            await anyio.lowlevel.checkpoint_if_cancelled()

    async def send_many(self, node_key: NodePublicKey, datagrams: Sequence[bytes]) -> None:
        """Send several datagrams to one peer, in order: :meth:`send` for a batch, cheaper per datagram.

        Each datagram takes the path the peer's machine gives it (as :meth:`send`); consecutive
        datagrams by UDP to the same address leave in as few system calls as the kernel allows
        (:mod:`natlib.udpbatch`: runs of equal size in one segmented send). Never waits for the
        relay or the socket; a checkpoint like :meth:`send`, yielding once per call.
        """
        peer, now = self._start_send(node_key)
        path = peer.path
        run: list[bytes] = []
        run_addr: AddrPort | None = None
        relayed = False
        for datagram in datagrams:
            datagram = bytes(datagram)
            udp, via_relay = path.note_sent(now, datagram)
            if udp is not None:
                if udp != run_addr and run_addr is not None and run:
                    self._send_udp_batch_nowait(peer, run_addr, run)
                    run = []
                run_addr = udp
                run.append(datagram)
            if via_relay:
                if run_addr is not None and run:  # keep the order of UDP and relay sends
                    self._send_udp_batch_nowait(peer, run_addr, run)
                    run = []
                self._send_relay(peer, datagram)
                relayed = True
        if run_addr is not None and run:
            self._send_udp_batch_nowait(peer, run_addr, run)
        self._finish_send(peer, now, relayed=relayed)
        self._sends_since_yield = 0
        await anyio.lowlevel.checkpoint()

    def _start_send(self, node_key: NodePublicKey) -> tuple[_Peer, float]:
        """What :meth:`send` and :meth:`send_many` do first: the peer, the time, activity noted."""
        self._check_open()
        peer = self._peer(node_key)
        now = self._now()
        if self._gatherer is not None and now - self._activity_noted >= 1.0:
            self._activity_noted = now  # the refresh schedule counts activity in seconds
            self._gatherer.note_activity()
        return peer, now

    def _finish_send(self, peer: _Peer, now: float, *, relayed: bool) -> None:
        """What they do once the datagrams are out: discovery and birthday probing while on the
        relay, the path machine's actions, and an earlier timer if its deadline moved."""
        if relayed:
            self._on_send(peer, now)
            self._maybe_birthday(peer, now)
        else:
            peer.relay_since = None  # direct: no birthday probing to schedule
        for action in peer.path.take_actions():
            self._do_action(peer, action)
        if self._timer_sleeps_until - now > _SEND_TIMER_SLACK:
            deadline = peer.path.next_deadline()
            if deadline is not None and deadline < self._timer_sleeps_until:
                self._timer_wakeup.set()

    async def receive(self) -> tuple[NodePublicKey, bytes]:
        """The next datagram from any peer. Raises :class:`ConnClosedError` after close."""
        try:
            return await self._recv_out.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise ConnClosedError("connection closed") from None

    def receive_nowait(self) -> tuple[NodePublicKey, bytes] | None:
        """The next datagram if one is waiting, else None (never blocks: for draining a burst
        after :meth:`receive`). Raises :class:`ConnClosedError` after close."""
        try:
            return self._recv_out.receive_nowait()
        except anyio.WouldBlock:
            return None
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise ConnClosedError("connection closed") from None

    def path(self, node_key: NodePublicKey) -> PathInfo:
        """The current path to a peer. Raises :class:`UnknownPeerError`."""
        peer = self._peer(node_key)
        return PathInfo.of(peer.path.path(anyio.current_time()), peer.home_region)

    def candidates(self, node_key: NodePublicKey) -> list[CandidateInfo]:
        """The peer's candidate addresses as its path machine knows them (address, latest RTT of a
        pong from it or None, pong history, learned from a ping only). Raises :class:`UnknownPeerError`."""
        return self._peer(node_key).path.candidates()

    async def path_events(self) -> AsyncIterator[tuple[NodePublicKey, PathInfo]]:
        """Every path change from now on, as ``(node_key, PathInfo)``; ends when the conn closes.

        Each iterator has its own bounded buffer (:data:`PATH_EVENT_QUEUE_LEN`); a reader that
        falls that far behind misses events (:meth:`path` always has the current state).
        """
        self._check_open()
        send, recv = anyio.create_memory_object_stream[tuple[NodePublicKey, PathInfo]](PATH_EVENT_QUEUE_LEN)
        self._event_queues.append(send)
        try:
            async with recv:
                async for item in recv:
                    yield item
        finally:
            if send in self._event_queues:
                self._event_queues.remove(send)
            send.close()

    async def ping(self, node_key: NodePublicKey, timeout: float = 5.0) -> PingResult:  # noqa: ASYNC109
        """A disco ping like ``tailscale ping``: to the direct address if there is one, else over the
        relay. Raises :class:`PingTimeoutError` without a pong within ``timeout`` seconds."""
        self._check_open()
        peer = self._peer(node_key)
        now = anyio.current_time()
        addr = peer.path.path(now).addr
        tx_id = disco.new_tx_id()
        pending = _PendingPing(node_key, now, addr, anyio.Event())
        self._pings[tx_id] = pending
        self._counters.pings_user += 1
        packet = disco.seal(Ping(tx_id, self.node_key), self._disco_private, peer.disco_key)
        try:
            if addr is not None:
                await self._send_udp(peer, addr, packet)
            else:
                self._send_relay(peer, packet)
            with anyio.move_on_after(timeout):
                await pending.done.wait()
        finally:
            self._pings.pop(tx_id, None)
        if pending.rtt is None:
            self._counters.pings_user_lost += 1
            raise PingTimeoutError(f"no pong from {node_key.short()} within {timeout:g} s")
        if addr is None:
            return PingResult("relay", None, pending.rtt)
        return PingResult("direct", addr.socket_address(), pending.rtt)

    @property
    def counters(self) -> dict[str, Any]:
        """The same as :meth:`stats`."""
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """Counters: the connection's own, and per peer those of its path machine."""
        totals: dict[str, int] = {}
        peers: dict[str, dict[str, int]] = {}
        for key, peer in self._peers.items():
            c = peer.path.counters.as_dict()
            peers[str(key)] = c
            for name, value in c.items():
                totals[name] = totals.get(name, 0) + value
        return {**self._counters.as_dict(), "paths": totals, "peers": peers}

    # -- internals: helpers -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ConnClosedError("connection closed")

    def _peer(self, node_key: NodePublicKey) -> _Peer:
        peer = self._peers.get(node_key)
        if peer is None:
            raise UnknownPeerError(node_key)
        return peer

    def _learn_address(self, peer: _Peer, addr: AddrPort) -> None:
        old = self._by_addr.get(addr)
        if old is peer:
            return
        if old is not None:
            old.addresses.discard(addr)
        self._by_addr[addr] = peer
        self._by_source.clear()
        peer.addresses.add(addr)

    def _on_send(self, peer: _Peer, now: float) -> None:
        # PeerPath asks for a CallMeMaybe only after pinging some candidate; with none known (the
        # control plane gave no endpoints) nobody would ever start. Tell the peer ours instead.
        if not peer.path.candidates() and (
            peer.last_unprompted_cmm is None or now - peer.last_unprompted_cmm >= CALL_ME_MAYBE_UNPROMPTED_GAP
        ):
            peer.last_unprompted_cmm = now
            self._start_call_me_maybe(peer)

    def _after_input(self, peer: _Peer) -> None:
        """Carry out what the peer's machine asked for without awaiting (UDP via the socket's
        non-blocking send; everything else queued)."""
        for action in peer.path.take_actions():
            self._do_action(peer, action)
        deadline = peer.path.next_deadline()
        if deadline is not None and deadline < self._timer_sleeps_until:
            self._timer_wakeup.set()  # only when this peer now needs the timer earlier

    def _do_action(self, peer: _Peer, action: object) -> None:
        if isinstance(action, SendDiscoPing):
            packet = disco.seal(Ping(action.tx_id, self.node_key), self._disco_private, peer.disco_key)
            self._send_udp_nowait(peer, action.addr, packet)
        elif isinstance(action, SendDiscoPong):
            if action.addr is None:
                pong = Pong(action.tx_id, AddrPort(RELAY_PLACEHOLDER_IP, peer.home_region & 0xFFFF))
                self._send_relay(peer, disco.seal(pong, self._disco_private, peer.disco_key))
            else:
                pong = Pong(action.tx_id, action.addr)
                self._send_udp_nowait(
                    peer, action.addr, disco.seal(pong, self._disco_private, peer.disco_key)
                )
        elif isinstance(action, SendCallMeMaybe):
            self._start_call_me_maybe(peer)
        elif isinstance(action, ResendViaRelay):
            for datagram in action.datagrams:
                self._send_relay(peer, datagram)
        elif isinstance(action, PathChanged):
            info = PathInfo.of(action, peer.home_region)
            for queue in list(self._event_queues):
                try:
                    queue.send_nowait((peer.node_key, info))
                except anyio.WouldBlock:
                    log.debug("path event queue full; event for %s dropped", peer.node_key.short())
                except anyio.BrokenResourceError:
                    self._event_queues.remove(queue)

    def _socket_for(self, addr: AddrPort) -> anyio.abc.UDPSocket | None:
        return self._sockets.get(6 if addr.is_ipv6 else 4)

    def _udp_target(self, peer: _Peer, addr: AddrPort) -> tuple[socket.socket, tuple[str, int]] | None:
        """The socket a datagram to ``addr`` leaves from, and ``addr`` as a socket address."""
        target = self._udp_targets.get(addr)
        if target is None:
            raw = self._routes.get(addr)
            if raw is None:
                sock = self._socket_for(addr)
                if sock is None:
                    peer.path.note_send_error(anyio.current_time(), addr)
                    return None
                raw = self._raw_sockets[id(sock)]
            if len(self._udp_targets) >= _ADDR_CACHE_MAX:
                self._udp_targets.clear()
            target = self._udp_targets[addr] = (raw, addr.socket_address())
        return target

    def _send_udp_nowait(self, peer: _Peer, addr: AddrPort, packet: bytes) -> None:
        target = self._udp_target(peer, addr)
        if target is None:
            return
        raw, sockaddr = target
        try:
            raw.sendto(packet, sockaddr)
        except BlockingIOError:
            self._counters.udp_send_errors += 1  # socket buffer full: a lost datagram, like the wire
        except OSError as e:
            self._counters.udp_send_errors += 1
            self._udp_send_failed(peer, addr, e)

    def _send_udp_batch_nowait(self, peer: _Peer, addr: AddrPort, datagrams: list[bytes]) -> None:
        """Like _send_udp_nowait for several datagrams: runs of equal size go out segmented (GSO)."""
        target = self._udp_target(peer, addr)
        if target is None:
            return
        raw, sockaddr = target
        sender = self._batch_senders.get(raw)
        if sender is None:
            sender = self._batch_senders[raw] = BatchSender(raw)
        calls = sender.segmented_sends
        unsent, error = sender.send(datagrams, sockaddr)
        self._counters.udp_segmented_sends += sender.segmented_sends - calls
        self._counters.udp_send_errors += unsent
        if error is not None:
            self._udp_send_failed(peer, addr, error)

    def _udp_send_failed(self, peer: _Peer, addr: AddrPort, e: OSError) -> None:
        log.debug("UDP send to %s failed: %s", addr, e)
        now = anyio.current_time()
        if e.errno in _LINK_ERRNOS and peer.path.send_targets(now).udp == addr:
            # The working direct path just became unroutable: our address or route is going
            # away. The relay connection likely rides on it too; redial now, before the
            # network monitor confirms (what is queued meanwhile waits for the new one).
            self._redial_relays(now)
        peer.path.note_send_error(now, addr)

    async def _send_udp(self, peer: _Peer, addr: AddrPort, packet: bytes) -> None:
        self._send_udp_nowait(peer, addr, packet)
        await anyio.lowlevel.checkpoint()

    def _region(self, region_id: int) -> _Region | None:
        region = self._regions.get(region_id)
        if region is not None:
            return region
        spec = self.derp_map.regions.get(region_id)
        if spec is None or self._tg is None or self._closed:
            return None
        region = _Region(self, spec, home=region_id == self.home_region)
        self._regions[region_id] = region
        self._tg.start_soon(region.run)
        return region

    def _send_relay(self, peer: _Peer, packet: bytes) -> None:
        region = self._region(peer.home_region)
        if region is None:
            self._counters.derp_dropped_disconnected += 1
            return
        region.enqueue(peer.node_key, packet)

    def _start_call_me_maybe(self, peer: _Peer) -> None:
        if peer.call_me_maybe_pending or self._tg is None or self._closed:
            return
        peer.call_me_maybe_pending = True
        peer.last_cmm_sent = anyio.current_time()
        self._tg.start_soon(self._call_me_maybe, peer)

    async def _call_me_maybe(self, peer: _Peer) -> None:
        try:
            candidates = await self._gatherer.fresh() if self._gatherer is not None else []
        finally:
            peer.call_me_maybe_pending = False
        endpoints = []
        for c in candidates:
            try:
                endpoints.append(_addr_of(c.address))
            except ValueError:
                continue
        message = CallMeMaybe(endpoints)
        self._send_relay(peer, disco.seal(message, self._disco_private, peer.disco_key))

    # -- internals: receiving -----------------------------------------------------------------------

    async def _read_udp(self, sock: anyio.abc.UDPSocket) -> None:
        """Read one main socket until cancelled.

        Under trio: wait until readable, then read up to :data:`READ_BATCH` datagrams straight from
        the socket (one wake-up per burst, not per datagram). Under asyncio, anyio's datagram
        transport owns the socket's reader callback, so datagrams come through it one by one.
        """
        if _under_trio():
            await self._read_udp_batched(self._raw_sockets[id(sock)])
            return
        while True:
            try:
                data, source = await sock.receive()
            except OSError as e:  # a queued ICMP error; the socket stays usable
                log.debug("UDP receive error (ignored): %s", e)
                continue
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            self._on_udp(data, source)

    async def _read_udp_batched(self, raw: socket.socket) -> None:
        """Read one main socket under trio; with GRO (natlib.udpbatch) a read may carry a run of
        one peer's datagrams, cut apart before demultiplexing."""
        ancillary_size = GRO_ANCILLARY_SIZE if enable_gro(raw) else 0
        recvmsg = raw.recvmsg
        while True:
            await anyio.wait_readable(raw)
            for _ in range(READ_BATCH):
                try:
                    data, ancillary, _flags, source = recvmsg(_MAX_UDP, ancillary_size)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:  # a queued ICMP error; the socket stays usable
                    log.debug("UDP receive error (ignored): %s", e)
                    continue
                if not ancillary:
                    self._on_udp(data, source)
                    continue
                self._counters.udp_coalesced_reads += 1
                for datagram in split_coalesced(data, ancillary):
                    self._on_udp(datagram, source)

    def _source(self, source: tuple[Any, ...]) -> AddrPort | None:
        key = (source[0], source[1])
        src = self._addr_cache.get(key)
        if src is None:
            try:
                src = AddrPort.from_socket((str(source[0]), int(source[1])))
            except ValueError:
                return None
            if len(self._addr_cache) >= _ADDR_CACHE_MAX:
                self._addr_cache.clear()
            self._addr_cache[key] = src
        return src

    def _on_udp(self, data: bytes, source: tuple[Any, ...], via: socket.socket | None = None) -> None:
        """One datagram from a main socket, or from a birthday probe's socket ``via``."""
        now = self._now()
        self._counters.udp_datagrams_received += 1
        self._counters.udp_bytes_received += len(data)
        key = (source[0], source[1])
        if not (self._stun.pending and via is None) and not disco.looks_like_disco(data):
            known = self._by_source.get(key)
            if known is not None:  # data from a peer's known address: the common case, kept short
                known[0].path.note_received(now, len(data), known[1])
                self._deliver(known[0], data)
                return
        src = self._source(source)
        if src is None:
            return
        if self._stun.pending and via is None:
            result = self._stun.receive_datagram(data, (str(src.ip), src.port), now)
            if result is not None:
                self._counters.stun_datagrams += 1
                self._stun_results[result.txid] = result
                self._stun_wakeup.set()
                return
        if disco.looks_like_disco(data):
            if self.exclude.excludes_ip(src.ip):
                # Through our own overlay: a path over it would be the tunnel inside itself.
                self._counters.drop("excluded_source")
                return
            self._on_disco(data, src, None, via)
            return
        peer = self._by_addr.get(src)
        if peer is None:
            self._counters.data_dropped_unknown_source += 1
            return
        if len(self._by_source) >= _ADDR_CACHE_MAX:
            self._by_source.clear()
        self._by_source[key] = (peer, src)
        peer.path.note_received(now, len(data), src)
        self._deliver(peer, data)

    def _on_derp_packet(self, region_id: int, src_raw: bytes, packet: bytes) -> None:
        self._counters.derp_packets_received += 1
        try:
            src = NodePublicKey(src_raw)
        except ValueError:
            return
        peer = self._peers.get(src)
        if peer is None:
            if disco.looks_like_disco(packet):
                self._counters.drop("unknown_peer")
            else:
                self._counters.data_dropped_unknown_source += 1
            return
        if disco.looks_like_disco(packet):
            self._on_disco(packet, None, peer)
            return
        peer.path.note_received(anyio.current_time(), len(packet), None)
        self._deliver(peer, packet)

    def _deliver(self, peer: _Peer, data: bytes) -> None:
        try:
            self._recv_in.send_nowait((peer.node_key, data))
        except anyio.WouldBlock:
            self._counters.data_dropped_receive_queue_full += 1
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def _on_disco(
        self, data: bytes, src: AddrPort | None, relay_peer: _Peer | None, via: socket.socket | None = None
    ) -> None:
        """One disco packet, by UDP from ``src`` (on a birthday socket ``via``) or over the relay
        from ``relay_peer``."""
        now = anyio.current_time()
        try:
            sender_key = disco.peek_sender(data)
        except DiscoError as e:
            self._counters.drop(e.reason)
            return
        peer = self._by_disco.get(sender_key)
        if peer is None or (relay_peer is not None and peer is not relay_peer):
            self._counters.drop("unknown_sender")
            return
        try:
            _, message = disco.open_packet(data, self._disco_private)
        except DiscoError as e:
            self._counters.drop(e.reason)
            return
        self._counters.disco_opened += 1
        if src is not None and via is not None and self._routes.get(src) is not via:
            self._routes[src] = via
            self._udp_targets.clear()
        self._birthday_input(peer, now, message, src, via)
        if isinstance(message, Ping):
            if message.node_key is not None and message.node_key != peer.node_key:
                self._counters.drop("node_key_mismatch")
                return
            if src is not None:
                self._learn_address(peer, src)
            peer.path.on_ping(now, message, src)
        elif isinstance(message, Pong):
            pending = self._pings.get(message.tx_id)
            if pending is not None and pending.peer == peer.node_key and pending.addr == src:
                pending.rtt = now - pending.sent_at
                pending.done.set()
                if src is not None:
                    self._learn_address(peer, src)
                return
            if src is not None:
                self._learn_address(peer, src)
            peer.path.on_pong(now, message, src)
        elif isinstance(message, CallMeMaybe):
            if src is not None:
                self._counters.drop("call_me_maybe_over_udp")
                return
            peer.path.on_call_me_maybe(
                now, [e for e in message.endpoints if not self.exclude.excludes_ip(e.ip)]
            )
            # Our pings just opened our NAT/firewall toward the peer, but its own pings may have
            # been dropped before that and it will not retry for 5 s. A CallMeMaybe back makes it
            # ping again at once (at most one per CALL_ME_MAYBE_ANSWER_GAP, so two peers that
            # cannot connect do not bounce CallMeMaybes forever).
            if peer.path.path(now).kind is not PathKind.DIRECT and (
                peer.last_cmm_sent is None or now - peer.last_cmm_sent >= CALL_ME_MAYBE_ANSWER_GAP
            ):
                self._start_call_me_maybe(peer)
        self._after_input(peer)

    # -- internals: birthday probing --------------------------------------------------------------------

    def _birthday_input(
        self, peer: _Peer, now: float, message: object, src: AddrPort | None, via: socket.socket | None
    ) -> None:
        run = peer.birthday
        if run is None or src is None:
            return
        plan = run.plan
        if isinstance(plan, HardSidePlan):
            index = run.index_of(via) if via is not None else None
            if index is None:
                return
            if isinstance(message, Ping):
                plan.on_ping(now, index, src)
            elif isinstance(message, Pong):
                plan.on_pong(now, message.tx_id, index, src)
        elif via is None:
            if isinstance(message, Ping):
                plan.on_ping(now, src)
            elif isinstance(message, Pong):
                plan.on_pong(now, message.tx_id, src)
        run.poke()

    def _maybe_birthday(self, peer: _Peer, now: float) -> None:
        """Start birthday probing toward a peer still on the relay after BIRTHDAY_GRACE of sending.

        Who is hard: each side judges itself by its own gathering round (``mapping varies by
        destination IP`` from two STUN servers). A hard side probes with many sockets toward the
        peer's first public IPv4 endpoint; an easy side probes the peer's public IPv4 address at
        random ports. An easy side cannot know that the peer is hard (the wire format has no room
        for it); it infers it from discovery failing for BIRTHDAY_GRACE while the relay carries
        traffic. Probing is bounded (natlib.birthday: 11 s, 2500 probes / 256 sockets) and
        repeated per peer after :func:`natlib.birthday.retry_interval` (a minute, doubling after
        each miss up to half an hour; a network change starts over), so a pair that cannot
        connect (hard ↔ hard, blocked UDP) costs little.
        """
        if peer.birthday is not None or not self.birthday_probing or self._tg is None or self._closed:
            return
        if peer.path.path(now).kind is not PathKind.RELAY:
            peer.relay_since = None
            return
        if peer.relay_since is None:
            peer.relay_since = now
            return
        if now - peer.relay_since < BIRTHDAY_GRACE:
            return
        if peer.birthday_last is not None and now - peer.birthday_last < retry_interval(peer.birthday_misses):
            return
        report = self.last_gather
        hard = report.mapping_varies_by_dest_ip if report is not None else None
        target = next((c.addr for c in peer.path.candidates() if _public_ipv4(c.addr)), None)
        if hard is None:
            return
        if target is None:
            # The peer's public endpoint is unknown here: its CallMeMaybe may have gone out before
            # we were on the relay. Ours makes it answer with its endpoints (see _on_disco).
            if (
                peer.last_unprompted_cmm is None
                or now - peer.last_unprompted_cmm >= CALL_ME_MAYBE_UNPROMPTED_GAP
            ):
                peer.last_unprompted_cmm = now
                self._start_call_me_maybe(peer)
            return
        plan: HardSidePlan | EasySidePlan = (
            HardSidePlan(now, target) if hard else EasySidePlan(now, target.ip)
        )
        log.info(
            "%s: birthday probing as the %s side toward %s",
            peer.node_key.short(),
            "hard" if hard else "easy",
            target,
        )
        self._counters.birthday_started += 1
        peer.birthday_last = now

        def seal_ping(tx_id: bytes) -> bytes:
            return disco.seal(Ping(tx_id, self.node_key), self._disco_private, peer.disco_key)

        def on_success(addr: AddrPort) -> None:
            self._counters.birthday_succeeded += 1
            if self._peers.get(peer.node_key) is peer:
                peer.path.add_candidate(anyio.current_time(), addr)
                self._after_input(peer)

        peer.birthday = BirthdayRun(
            plan,
            seal_ping=seal_ping,
            send_main=lambda addr, packet: self._send_udp_nowait(peer, addr, packet),
            on_udp=lambda data, source, raw: self._on_udp(data, source, raw),
            on_success=on_success,
            forget_socket=self._forget_routes,
        )
        peer.birthday_scope = anyio.CancelScope()
        self._tg.start_soon(self._run_birthday, peer, peer.birthday, peer.birthday_scope)

    async def _run_birthday(self, peer: _Peer, run: BirthdayRun, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                await run.run()
            if run.winner is not None:
                peer.birthday_misses = 0
            elif not scope.cancel_called:
                self._counters.birthday_gave_up += 1
                peer.birthday_misses += 1
        finally:
            if peer.birthday is run:
                peer.birthday = None
                peer.birthday_scope = None

    def _forget_routes(self, raw: socket.socket) -> None:
        for addr in [a for a, r in self._routes.items() if r is raw]:
            del self._routes[addr]
        self._udp_targets.clear()
        self._batch_senders.pop(raw, None)

    def _stop_birthday(self, peer: _Peer) -> None:
        if peer.birthday_scope is not None:
            peer.birthday_scope.cancel()

    # -- internals: timers, STUN, gathering, network changes ------------------------------------------

    async def _run_timers(self) -> None:
        while True:
            self._timer_wakeup = anyio.Event()
            now = anyio.current_time()
            earliest = math.inf
            for peer in list(self._peers.values()):
                deadline = peer.path.next_deadline()
                if deadline is not None and deadline <= now:
                    peer.path.handle_timer(now)
                    for action in peer.path.take_actions():
                        self._do_action(peer, action)
                    deadline = peer.path.next_deadline()
                    if deadline is not None and deadline <= now:
                        deadline = now + _TIMER_SLACK  # never spin on a deadline that did not move
                if deadline is not None:
                    earliest = min(earliest, deadline)
            self._timer_sleeps_until = earliest
            with anyio.move_on_at(earliest):
                await self._timer_wakeup.wait()

    async def _stun_probe(
        self,
        servers: Sequence[tuple[str, int]],
        *,
        sock: anyio.abc.UDPSocket | None = None,
        local_port: int = 0,
        timeout: float = 3.0,  # noqa: ASYNC109 - the STUN transaction's own deadline
    ) -> Sequence[StunResultLike]:
        """:class:`~natlib.candidates.StunProbe` over our shared sockets (answers come via the readers)."""
        now = anyio.current_time()
        txids = [self._stun.start(server, now, timeout=timeout) for server in servers]
        wanted = set(txids)
        self._stun_wakeup.set()
        try:
            while not wanted <= self._stun_results.keys():
                waiter = anyio.Event()
                for t in wanted:
                    self._stun_waiters[t] = waiter
                await waiter.wait()
        except BaseException:
            for t in wanted:  # abandoned (cancelled): later answers are not ours any more
                self._stun.cancel(t)
                self._stun_results.pop(t, None)
            raise
        finally:
            for t in wanted:
                self._stun_waiters.pop(t, None)
        return [self._stun_results.pop(t) for t in txids]

    async def _run_stun(self) -> None:
        """Send due STUN requests and collect timeouts; wake the probes waiting for results."""
        while True:
            self._stun_wakeup = anyio.Event()
            now = anyio.current_time()
            for result in self._stun.expired(now):
                self._stun_results[result.txid] = result
            for data, (host, port) in self._stun.datagrams_to_send(now):
                sock = self._sockets.get(6 if ":" in host else 4)
                error = None
                if sock is None:
                    error = "no socket for this address family"
                else:
                    try:
                        self._raw_sockets[id(sock)].sendto(data, (host, port))
                    except OSError as e:
                        error = f"send failed: {e.strerror or e}"
                if error is not None:
                    failed = self._stun.fail(data[8:20], error)
                    if failed is not None:
                        self._stun_results[failed.txid] = failed
            for txid in list(self._stun_results):
                waiter = self._stun_waiters.get(txid)
                if waiter is not None:
                    waiter.set()
            deadline = self._stun.next_deadline()
            with anyio.move_on_at(math.inf if deadline is None else deadline):
                await self._stun_wakeup.wait()

    async def _on_gathered(self, report: GatherReport) -> None:
        previous = self.last_gather
        self.last_gather = report
        self._counters.gather_rounds += 1
        if "portmap" in report.errors and self._portmap_retries < PORTMAP_RETRIES and self._tg is not None:
            # A slow gateway misses the 2 s budget of a round; the next periodic round is 20 s away.
            self._portmap_retries += 1
            self._tg.start_soon(self._regather_after, PORTMAP_RETRY_DELAY * self._portmap_retries)
        if previous is None:
            return
        if {c.address for c in previous.candidates} != {c.address for c in report.candidates}:
            # New endpoints (a port mapping that came late, a new address): tell every peer we have
            # no direct path to, so it pings them now rather than at its next discovery round.
            for peer in list(self._peers.values()):
                if peer.path.path(anyio.current_time()).kind is not PathKind.DIRECT:
                    self._start_call_me_maybe(peer)
        old = {c.address for c in previous.candidates if c.type.value == "stun"}
        new = {c.address for c in report.candidates if c.type.value == "stun"}
        if old and new and not (old & new) and previous.at - previous.duration >= self._last_link_change:
            # Our reflexive address changed with no local change (both rounds began after the last
            # one we know of, which explains a new mapping by itself): the NAT rebound us.
            log.info("NAT rebinding detected (%s -> %s)", sorted(old), sorted(new))
            self._link_changed()

    async def _regather_after(self, delay: float) -> None:
        await anyio.sleep(delay)
        if self._gatherer is not None:
            self._gatherer.request_refresh(stale=False)  # only to add the mapping

    def _redial_relays(self, now: float) -> None:
        if self._last_redial is not None and now - self._last_redial < REDIAL_MIN_GAP:
            return
        self._last_redial = now
        self._counters.derp_redials += 1
        for region in list(self._regions.values()):
            region.reconnect()

    def _link_changed(self) -> None:
        now = anyio.current_time()
        self._counters.link_changes += 1
        self._last_link_change = now
        self._last_redial = None
        self._redial_relays(now)
        for peer in list(self._peers.values()):
            self._stop_birthday(peer)
            peer.birthday_last = peer.relay_since = None
            peer.birthday_misses = 0
            peer.path.on_link_change(now)
            for action in peer.path.take_actions():
                self._do_action(peer, action)
            peer.last_unprompted_cmm = None
        self._timer_wakeup.set()

    async def _watch_network(self) -> None:
        from .netmon import NetworkMonitor

        try:
            async with NetworkMonitor(exclude=self.exclude) as monitor:
                async for change in monitor:
                    log.info("network changed: +%s -%s", change.added, change.removed)
                    # At once, not after a gathering round: until the peers learn our new address,
                    # direct datagrams from it are dropped as coming from an unknown source, so
                    # they go by relay meanwhile. The CallMeMaybe that rediscovery sends waits for
                    # the new round's candidates (the old ones are stale from here on).
                    self._link_changed()
                    if self._gatherer is not None:
                        self._gatherer.request_refresh()
        except OSError as e:
            log.info("network monitor unavailable: %s", e)


_NOT_PUBLIC_V4: Final = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
    )
)


def _public_ipv4(addr: AddrPort) -> bool:
    """A public IPv4 address as NATs see it (documentation ranges count as public, for the lab)."""
    ip = addr.ip
    return ip.version == 4 and not ip.is_unspecified and not any(ip in net for net in _NOT_PUBLIC_V4)


def _under_trio() -> bool:
    """Whether the running event loop is trio's (the faster paths use trio directly)."""
    try:
        import trio

        trio.lowlevel.current_task()
    except (ImportError, RuntimeError):
        return False
    return True


def _addr_of(endpoint: Any) -> AddrPort:
    if isinstance(endpoint, AddrPort):
        return endpoint
    host, port = endpoint
    return AddrPort(ipaddress.ip_address(str(host).split("%", 1)[0]), int(port))


def _grow_buffers(raw: socket.socket) -> None:
    """Ask for SOCKET_BUFFER_BYTES each way: forced as root (CAP_NET_ADMIN), else up to the cap."""
    forced = (getattr(socket, "SO_RCVBUFFORCE", None), getattr(socket, "SO_SNDBUFFORCE", None))
    for force, plain in zip(forced, (socket.SO_RCVBUF, socket.SO_SNDBUF), strict=True):
        with contextlib.suppress(OSError):
            if force is not None:
                try:
                    raw.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
                    continue
                except PermissionError:
                    pass
            raw.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER_BYTES)


async def _bind_sockets(port: int, ipv6: bool) -> dict[int, tuple[socket.socket, anyio.abc.UDPSocket]]:
    raw4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _grow_buffers(raw4)
    try:
        raw4.bind(("0.0.0.0", port))
    except OSError:
        raw4.close()
        raise
    raw4.setblocking(False)
    sockets = {4: (raw4, await anyio.abc.UDPSocket.from_socket(raw4))}
    if ipv6 and socket.has_ipv6:
        bound_port = raw4.getsockname()[1]
        try:
            raw6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError:
            return sockets
        try:
            # V6ONLY, so the IPv4 socket can own the same port number.
            raw6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _grow_buffers(raw6)
            raw6.bind(("::", bound_port))
            raw6.setblocking(False)
        except OSError as e:
            log.info("no IPv6 socket on port %d: %s", bound_port, e)
            raw6.close()
            return sockets
        sockets[6] = (raw6, await anyio.abc.UDPSocket.from_socket(raw6))
    return sockets


def _stun_servers(derp_map: DERPMap) -> list[tuple[str, int]]:
    servers: list[tuple[str, int]] = []
    for region_id in derp_map.region_ids():
        for node in derp_map.regions[region_id].nodes:
            port = node.effective_stun_port
            if port is None:
                continue
            for family in (4, 6):
                host = node.stun_address(family)
                if host is not None:
                    servers.append((host, port))
    return servers


@contextlib.asynccontextmanager
async def open_conn(
    node_key: NodePrivateKey,
    disco_key: DiscoPrivateKey,
    derp_map: DERPMap,
    *,
    port: int = 0,
    static_endpoints: Sequence[tuple[str, int]] = (),
    home_region: int | None = None,
    stun: bool = True,
    stun_servers: Sequence[tuple[str, int]] | None = None,
    port_mapping: bool = True,
    ipv6: bool = True,
    network_monitor: bool = True,
    birthday: bool = True,
    derp_tls: bool = True,
    derp_connect_timeout: float = 10.0,
    derp_idle_close: float = DERP_IDLE_CLOSE,
    exclude_interfaces: Sequence[str] = (),
    exclude_prefixes: Sequence[str | IPNetwork] = (),
) -> AsyncIterator[Conn]:
    """Open a :class:`Conn`: bind the UDP sockets, gather candidates once, connect the home relay.

    ``port``: the UDP port for both families (0: any; the IPv6 socket takes the IPv4 one's
    number). ``home_region``: None runs netcheck first and takes its preferred region.
    ``stun_servers``: override the STUN servers (default: every STUN node of ``derp_map``);
    ``stun=False`` gathers without STUN. ``port_mapping``: ask the gateway (NAT-PMP, PCP, UPnP)
    for a mapping. ``derp_tls=False`` dials relays over plain HTTP (test relays such as
    ``meshrelay -dev``). ``network_monitor``: follow rtnetlink for roaming. ``birthday``: probe
    hard NATs with the birthday paradox (see :meth:`Conn._maybe_birthday`). ``derp_idle_close``:
    seconds without traffic after which a relay region other than the home one is disconnected.
    ``exclude_interfaces`` / ``exclude_prefixes``: addresses that must never carry a direct path,
    typically the overlay running over this connection (its interface and its prefixes): they are
    not gathered as candidates, their changes are not network changes, disco from them is dropped
    (counted as ``excluded_source``) and a peer's endpoints inside the prefixes are not tried.
    A malformed prefix raises :class:`ValueError`.

    Raises :class:`OSError` when the socket cannot be bound. Cancellation, or leaving the block,
    stops every task and closes every socket and relay connection.
    """
    exclude = AddressFilter.of(exclude_interfaces, exclude_prefixes)
    conn = Conn(
        node_key,
        disco_key,
        derp_map,
        derp_tls=derp_tls,
        derp_connect_timeout=derp_connect_timeout,
        derp_idle_close=derp_idle_close,
    )
    bound = await _bind_sockets(port, ipv6)
    sockets = {family: pair[1] for family, pair in bound.items()}
    conn._sockets = sockets
    conn._raw_sockets = {id(pair[1]): pair[0] for pair in bound.values()}
    conn.birthday_probing = birthday
    conn.exclude = exclude
    if _under_trio():
        import trio

        conn._now = trio.current_time
    async with contextlib.AsyncExitStack() as stack:
        for sock in sockets.values():
            await stack.enter_async_context(sock)
        tg = await stack.enter_async_context(anyio.create_task_group())
        conn._tg = tg
        try:
            for sock in sockets.values():
                tg.start_soon(conn._read_udp, sock)
            tg.start_soon(conn._run_stun)
            tg.start_soon(conn._run_timers)
            if home_region is None:
                from .netcheck import NetcheckState, netcheck

                state = NetcheckState()
                report = await netcheck(derp_map, state=state)
                home_region = report.preferred_derp or (derp_map.region_ids() or [0])[0]
            conn.home_region = home_region
            home = conn._region(home_region)  # connects while we gather
            mapper_source = None
            if port_mapping:
                from .portmap import PortMapError, PortMapper

                try:
                    mapper = await stack.enter_async_context(PortMapper(conn.local_port))
                except PortMapError as e:  # no gateway (a public host, IPv6 only): gather without
                    log.info("no port mapping: %s", e)
                else:
                    mapper_source = port_mapper_source(mapper)
            conn._gatherer = Gatherer(
                sockets.get(4),
                sock6=sockets.get(6),
                stun_servers=list(stun_servers if stun_servers is not None else _stun_servers(derp_map))
                if stun
                else [],
                stun=conn._stun_probe,
                port_mapping=mapper_source,
                static_endpoints=list(static_endpoints),
                local_port_fixed=port != 0,
                exclude=exclude,
            )
            await tg.start(conn._gatherer.run, conn._on_gathered)
            if network_monitor:
                tg.start_soon(conn._watch_network)
            if home is not None:
                # Packets to a peer are dropped by the relay until we are connected: wait (bounded).
                with anyio.move_on_after(derp_connect_timeout):
                    await home.connected.wait()
            yield conn
        finally:
            conn._closed = True
            conn._recv_in.close()
            conn._recv_out.close()
            for queue in conn._event_queues:
                queue.close()
            tg.cancel_scope.cancel()
