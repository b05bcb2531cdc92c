"""DERP over HTTP: natlib's DERP client driver.

This is the I/O half of natlib's DERP client (the protocol half is the sans-io
:class:`natlib.derp.ClientConnection`). It is written against anyio, so the same code runs under
trio and under asyncio. The name follows Tailscale's ``derphttp`` package, which plays the same
role in Go.

A connection is set up in four steps, all bounded together by ``connect_timeout``:

1. **Dial** TCP, then, for ``https://`` (or ``wss://``) URLs, do the TLS handshake. No ALPN is
   offered, exactly like Tailscale's client, so DERP always runs over HTTP/1.1.
2. **Upgrade** the HTTP connection. ``GET /derp`` with ``Upgrade: DERP`` and
   ``Connection: Upgrade`` (h11 writes and parses the HTTP); the relay answers
   ``101 Switching Protocols`` and carries on with DERP frames on the same connection. Any other
   status is a :class:`DerpConnectError` that carries the status and the body. With
   ``websocket=True`` the upgrade is a WebSocket one (subprotocol ``derp``, via wsproto) and DERP
   runs inside binary messages; that is how DERP crosses HTTP proxies and CDNs.
3. **Fast start** (optional) skips one round trip: when the relay's key is known in advance, the
   request, ``Derp-Fast-Start: 1`` and the ClientInfo frame leave in a single write and the relay
   sends no HTTP response at all. The key is known when the caller passes ``server_key``, or, over
   TLS 1.3 on Python 3.13 and later, when the relay's *meta-certificate* (a throwaway certificate
   whose CN is ``derpkey<hex key>``, appended to the served chain) is found in the unverified
   chain. Python 3.11 and 3.12 cannot see that chain, so there fast start needs ``server_key``.
4. **Handshake**: ServerKey → ClientInfo (our key, sealed JSON with mesh key, version, prober
   flag, app name) → ServerInfo. The ``Derp-Public-Key`` header of the 101 response, a given
   ``server_key`` and the meta-certificate are all cross-checked against the ServerKey frame.

After that, :class:`DerpClient` sends and receives. There is no background task: whichever task
needs bytes from the relay (a :meth:`DerpClient.receive` or a :meth:`DerpClient.ping`) becomes the
reader for one read, decodes every frame that read completed, hands Pongs to the pings waiting for
them and queues the rest for :meth:`~DerpClient.receive`. So ``receive()`` in one task and
``ping()`` in another cooperate, and a client that nobody reads from costs nothing. Server Pings
are answered automatically. If no byte arrives for :data:`READ_TIMEOUT` seconds while a task is
reading (the relay sends a KeepAlive every 60 s), the connection is considered dead.

Writes are serialised by a lock, and each frame is written whole: once a write has started it is
shielded from cancellation (bounded by :data:`WRITE_TIMEOUT`), because a frame cut in half would
corrupt the stream for every later frame.

Every failure after the handshake, whatever its cause (EOF, reset, read timeout, a protocol error,
a local :meth:`~DerpClient.aclose`), ends the connection, and every later call raises
:class:`DerpConnectionClosed` with a ``reason`` label. There is no reconnection here; that policy
belongs to the caller.

Example::

    async with await derphttp.connect("https://relay.example:443/derp", key) as client:
        await client.send(peer_key, b"hello")
        event = await client.receive()
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import importlib
import logging
import os
import ssl
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeAlias

import anyio
import anyio.abc
import anyio.lowlevel
import h11
from anyio.streams.tls import TLSAttribute, TLSStream
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws
from wsproto.utilities import LocalProtocolError as WSLocalProtocolError
from wsproto.utilities import RemoteProtocolError as WSRemoteProtocolError

from .derp import (
    KEEP_ALIVE_INTERVAL,
    MAX_PACKET_SIZE,
    MESH_KEY_LEN,
    NEED_DATA,
    ClientConnection,
    ClientInfo,
    Connected,
    DerpError,
    Frame,
    Health,
    KeepAlive,
    PeerGone,
    PeerPresent,
    Ping,
    Pong,
    ProtocolError,
    RecvPacket,
    Restarting,
    ServerInfo,
    UnknownFrame,
)
from .keys import KeyFormatError, NodePrivateKey, NodePublicKey

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "READ_TIMEOUT",
    "WRITE_TIMEOUT",
    "DerpClient",
    "DerpConnectError",
    "DerpConnectTimeout",
    "DerpConnectionClosed",
    "DerpEvent",
    "PersistentClient",
    "ReconnectSchedule",
    "connect",
]

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT: Final = 10.0
"""Dial, TLS, HTTP upgrade and DERP handshake together, like Tailscale's client."""

READ_TIMEOUT: Final = 2 * KEEP_ALIVE_INTERVAL
"""Seconds of silence from the relay, while reading, after which the connection is dead."""

WRITE_TIMEOUT: Final = 15.0
"""Seconds one frame may take to write before the connection is declared dead."""

_WS_MAX_MESSAGE: Final = 16 << 10
"""Largest WebSocket message written; Go's WebSocket library reads at most 32 KiB per message."""

_CLOSE_TIMEOUT: Final = 1.0  # for the courtesy WebSocket close frame
_READ_SIZE: Final = 64 << 10
_MAX_RESPONSE_HEAD: Final = 16 << 10
_MAX_ERROR_BODY: Final = 64 << 10  # read at most this much of a refusal's body
_ERROR_BODY_IN_MESSAGE: Final = 200  # characters of the body quoted in the exception message
_PING_DATA_LEN: Final = 8
_MAX_ABANDONED_PINGS: Final = 64
_USER_AGENT: Final = "natlib-derphttp/0.1"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}

DerpEvent: TypeAlias = (
    RecvPacket | PeerGone | PeerPresent | Health | Restarting | KeepAlive | Pong | UnknownFrame
)
"""What :meth:`DerpClient.receive` returns: the frame objects of :mod:`natlib.derp`."""
_DELIVERED: Final = (RecvPacket, PeerGone, PeerPresent, Health, Restarting, KeepAlive, UnknownFrame)

# Exceptions that mean "the transport is gone" from anyio streams, sockets and ssl.
_TRANSPORT_ERRORS: Final = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,  # includes ssl.SSLError
)


# -- errors ----------------------------------------------------------------------------------------


class DerpConnectError(DerpError):
    """Connecting failed: dial, TLS, HTTP upgrade or DERP handshake.

    ``status`` and ``body`` are set when the relay answered the upgrade with an HTTP status other
    than 101 (for example 426 when the request had no valid ``Upgrade`` header, 404 when DERP is
    disabled). ``url`` is the URL that was dialled.
    """

    def __init__(self, message: str, *, url: str, status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.body = body


class DerpConnectTimeout(DerpConnectError, TimeoutError):
    """Connecting did not finish within ``connect_timeout``; also a :class:`TimeoutError`."""


class DerpConnectionClosed(DerpError):
    """The DERP connection is over; the client cannot be used any more.

    ``reason`` is a short stable label: ``"eof"`` (the relay closed it), ``"transport_error"``,
    ``"read_timeout"``, ``"write_timeout"``, ``"protocol_error"`` (the relay broke the protocol) or
    ``"closed"`` (:meth:`DerpClient.aclose` was called). The underlying exception, if any, is the
    ``__cause__``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- URL -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Target:
    url: str
    host: str
    port: int
    tls: bool
    websocket: bool
    request_target: str  # path and query
    host_header: str


def _parse_url(url: str, websocket: bool) -> _Target:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r}: use http, https, ws or wss")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in URL {url!r}")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as e:
        raise ValueError(f"bad port in URL {url!r}: {e}") from None
    target = parts.path or "/derp"
    if parts.query:
        target += "?" + parts.query
    bracketed = f"[{host}]" if ":" in host else host
    host_header = bracketed if port == _DEFAULT_PORTS[scheme] else f"{bracketed}:{port}"
    return _Target(
        url=url,
        host=host,
        port=port,
        tls=scheme in ("https", "wss"),
        websocket=websocket or scheme in ("ws", "wss"),
        request_target=target,
        host_header=host_header,
    )


# -- meta-certificate -------------------------------------------------------------------------------


def _server_key_from_tls(stream: TLSStream) -> NodePublicKey | None:
    """The relay key from the meta-certificate, when TLS 1.3 and Python can show the chain."""
    ssl_object: ssl.SSLObject = stream.extra(TLSAttribute.ssl_object)
    if ssl_object.version() != "TLSv1.3":
        return None  # before 1.3 the chain is sent in clear text: Tailscale ignores it there too
    get_chain: Callable[[], list[bytes]] | None = getattr(ssl_object, "get_unverified_chain", None)
    if get_chain is None:  # Python < 3.13
        return None
    try:
        metacert = importlib.import_module("natlib.derp._metacert")
    except ImportError:
        return None
    found: tuple[NodePublicKey | bytes, int] | None = metacert.server_key_from_chain(get_chain())
    if found is None:
        return None
    key = found[0]
    return key if isinstance(key, NodePublicKey) else NodePublicKey(key)


async def _close_transport(stream: anyio.abc.ByteStream) -> None:
    """Close a transport. Over TLS, first send close_notify, as Go's ``tls.Conn.Close`` does.

    The relay's close_notify is awaited for at most ``_CLOSE_TIMEOUT``; if another task is reading
    at that moment, ours is still sent and we do not wait. Never raises transport errors.
    """
    if isinstance(stream, TLSStream):
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            try:
                await stream.unwrap()
            except (anyio.BusyResourceError, *_TRANSPORT_ERRORS):
                pass
    try:
        await stream.aclose()
    except _TRANSPORT_ERRORS:
        pass


# -- WebSocket transport ------------------------------------------------------------------------------


class _WebSocketStream(anyio.abc.ByteStream):
    """The DERP byte stream carried in binary WebSocket messages (client side).

    Each :meth:`send` is one message, or several of at most 16 KiB;
    :meth:`receive` returns message payloads as one byte stream, ignoring message boundaries.
    WebSocket pings are answered; a text message is a protocol error; a close frame is answered
    and then reads end.
    """

    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        self._inner = inner
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._pending = bytearray()
        self._send_lock = anyio.Lock()
        self._eof = False
        self._closed = False
        self.accepted = False
        self.reject_status: int | None = None
        self.reject_body = bytearray()
        self.reject_done = False

    async def handshake(self, target: _Target, extra_headers: list[tuple[bytes, bytes]]) -> None:
        """Send the upgrade request and read until the relay accepts or refuses it."""
        request = ws.Request(
            host=target.host_header,
            target=target.request_target,
            subprotocols=["derp"],
            extra_headers=[(b"User-Agent", _USER_AGENT.encode()), *extra_headers],
        )
        await self._inner.send(self._ws.send(request))
        while not self.accepted and not self.reject_done:
            if self._eof:
                raise anyio.EndOfStream
            await self._feed()

    async def _feed(self) -> None:
        try:
            data: bytes | None = await self._inner.receive(_READ_SIZE)
        except anyio.EndOfStream:
            data = None
        try:
            self._ws.receive_data(data)
            events = list(self._ws.events())
        except WSRemoteProtocolError as e:
            raise ProtocolError("websocket_protocol", f"WebSocket protocol error: {e}") from None
        if data is None:
            self._eof = True
        replies: list[bytes] = []
        for event in events:  # no awaits here: a cancellation cannot lose decoded data
            if isinstance(event, ws.BytesMessage):
                self._pending += event.data
            elif isinstance(event, ws.AcceptConnection):
                if event.subprotocol != "derp":
                    raise ProtocolError("websocket_subprotocol", "the relay did not accept subprotocol derp")
                self.accepted = True
            elif isinstance(event, ws.RejectConnection):
                self.reject_status = event.status_code
                self.reject_done = not event.has_body
            elif isinstance(event, ws.RejectData):
                if len(self.reject_body) < _MAX_ERROR_BODY:
                    self.reject_body += event.data
                self.reject_done = event.body_finished
            elif isinstance(event, ws.TextMessage):
                raise ProtocolError("websocket_text_message", "text message on a DERP WebSocket")
            elif isinstance(event, ws.Ping):
                replies.append(self._ws.send(event.response()))
            elif isinstance(event, ws.CloseConnection):
                self._eof = True
                try:
                    replies.append(self._ws.send(event.response()))
                except WSLocalProtocolError:
                    pass
        if replies:
            with anyio.CancelScope(shield=True), anyio.move_on_after(WRITE_TIMEOUT):
                await self._send_raw(b"".join(replies))

    async def _send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            await self._inner.send(data)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._pending:
            if self._eof:
                raise anyio.EndOfStream
            await self._feed()
        out = bytes(self._pending[:max_bytes])
        del self._pending[:max_bytes]
        return out

    async def send(self, item: bytes) -> None:
        # At most _WS_MAX_MESSAGE bytes per message: Go's WebSocket peers (derper's server side and
        # derphttp's client, github.com/coder/websocket) refuse messages over 32 KiB and drop the
        # connection. DERP ignores message boundaries, so splitting is always safe.
        data = memoryview(bytes(item))
        try:
            frames = b"".join(
                self._ws.send(ws.BytesMessage(data=bytes(data[i : i + _WS_MAX_MESSAGE])))
                for i in range(0, max(len(data), 1), _WS_MAX_MESSAGE)
            )
        except WSLocalProtocolError as e:
            raise anyio.ClosedResourceError(f"WebSocket closed: {e}") from None
        await self._send_raw(frames)

    async def send_eof(self) -> None:
        """Send a WebSocket close frame: the relay reads EOF after our last message."""
        try:
            frame = self._ws.send(ws.CloseConnection(code=1000))
        except WSLocalProtocolError:
            return
        await self._send_raw(frame)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                try:
                    await self.send_eof()
                except _TRANSPORT_ERRORS:
                    pass
        await _close_transport(self._inner)

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes


# -- the client ---------------------------------------------------------------------------------------


class _PingWaiter:
    __slots__ = ("arrived",)

    def __init__(self) -> None:
        self.arrived: float | None = None


class DerpClient:
    """One live DERP connection to a relay. Made by :func:`connect`; an async context manager.

    Leaving ``async with`` (or calling :meth:`aclose`) closes the connection. All methods are safe
    to call from several tasks at once: writes are serialised, and reads are shared as described in
    the module docstring. Cancelling any method leaves the connection usable, except that a frame
    whose write has begun is always finished first (see :meth:`send`).
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        conn: ClientConnection,
        *,
        url: str,
        server_key: NodePublicKey,
        server_info: ServerInfo,
        fast_start: bool,
        websocket: bool,
    ) -> None:
        """Internal: use :func:`connect`."""
        self._stream = stream
        self._conn = conn
        self.url = url
        """The URL this client dialled."""
        self.server_key = server_key
        """The relay's node public key, from its ServerKey frame."""
        self.server_info = server_info
        """What the relay said in ServerInfo (protocol version, optional rate limits)."""
        self.local_key: NodePublicKey = conn.private_key.public
        """Our own node public key: the address other clients send to."""
        self.fast_start = fast_start
        """True if the connection was set up with fast start (no HTTP response)."""
        self.websocket = websocket
        """True if DERP runs inside WebSocket messages."""
        self._write_lock = anyio.Lock()
        self._events: collections.deque[DerpEvent] = collections.deque()
        self._reading = False
        self._wakeup = anyio.Event()
        self._pings: dict[bytes, list[_PingWaiter]] = {}
        self._abandoned_pings: dict[bytes, None] = {}  # an ordered set
        self._error: tuple[str, str, BaseException | None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._error is not None else "open"
        return (
            f"<DerpClient {self.url} {state} local={self.local_key.short()} relay={self.server_key.short()}>"
        )

    async def __aenter__(self) -> DerpClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def is_closed(self) -> bool:
        """True once the connection has failed or been closed."""
        return self._error is not None

    @property
    def packets_dropped_by_rate_limit(self) -> int:
        """Sends dropped by the relay-announced token bucket (Tailscale's relays announce none)."""
        return self._conn.dropped_by_rate_limit

    # -- sending -----------------------------------------------------------------------------------

    async def send(self, dst: NodePublicKey, packet: bytes) -> None:
        """Send ``packet`` (at most 65536 bytes) to the client whose key is ``dst``.

        DERP has no delivery report: a packet to a key that is not connected is dropped by the
        relay (for disco packets the relay may answer with PeerGone(NotHere)). If the relay
        announced a rate limit in ServerInfo, packets over it are dropped here, silently, as
        Tailscale's client does.

        Cancellation: while waiting for another task's write, ``send`` is cancelled at once and
        nothing is sent. Once this frame's write has begun it is finished (at most
        :data:`WRITE_TIMEOUT` seconds) before the cancellation takes effect.
        """
        if len(packet) > MAX_PACKET_SIZE:
            raise ValueError(f"packet of {len(packet)} bytes exceeds DERP's {MAX_PACKET_SIZE}")
        self._raise_if_closed()
        await self._write(self._conn.send_packet(dst, packet, anyio.current_time()))

    async def send_packets(self, packets: Iterable[tuple[NodePublicKey, bytes]]) -> None:
        """:meth:`send` for many ``(dst, packet)`` at once: their frames go out in one write.

        One TLS write and one system call for a burst instead of one each (natlib.conn batches
        what its queue holds this way). All packets are checked before anything is sent.
        Cancellation as for :meth:`send`: all of them or none.
        """
        now = anyio.current_time()
        frames = []
        for dst, packet in packets:
            if len(packet) > MAX_PACKET_SIZE:
                raise ValueError(f"packet of {len(packet)} bytes exceeds DERP's {MAX_PACKET_SIZE}")
            frames.append(self._conn.send_packet(dst, packet, now))
        await self._write_frames(frames)

    async def forward_packet(self, src: NodePublicKey, dst: NodePublicKey, packet: bytes) -> None:
        """Mesh only: hand the relay a packet from ``src`` (a client of another relay) to ``dst``.

        A relay closes the connection of a client without the mesh key that sends this.
        Cancellation as for :meth:`send`.
        """
        if len(packet) > MAX_PACKET_SIZE:
            raise ValueError(f"packet of {len(packet)} bytes exceeds DERP's {MAX_PACKET_SIZE}")
        self._raise_if_closed()
        await self._write(self._conn.forward_packet(src, dst, packet))

    async def forward_packets(self, packets: Iterable[tuple[bytes, bytes, bytes]]) -> None:
        """Mesh only: :meth:`forward_packet` for many ``(src, dst, packet)`` at once, in one write.

        Relays forwarding traffic to each other use this to batch. Cancellation as for :meth:`send`.
        """
        frames = [self._conn.forward_packet(src, dst, packet) for src, dst, packet in packets]
        await self._write_frames(frames)

    async def _write_frames(self, frames: list[bytes]) -> None:
        """The frames of a batch in one write (none for an empty batch)."""
        self._raise_if_closed()
        if frames:
            await self._write(b"".join(frames))

    async def note_preferred(self, preferred: bool) -> None:
        """Tell the relay whether it is this node's home relay (it only counts it in its stats)."""
        self._raise_if_closed()
        await self._write(self._conn.note_preferred(preferred))

    async def watch_conns(self) -> None:
        """Mesh only: subscribe to the relay's client list.

        :meth:`receive` then yields a PeerPresent for every connected client (this one included),
        followed by PeerPresent and PeerGone as clients come and go. A relay closes the connection
        of a client without the mesh key that sends this; :meth:`receive` then raises
        :class:`DerpConnectionClosed`.
        """
        self._raise_if_closed()
        await self._write(self._conn.watch_conns())

    async def close_peer(self, key: NodePublicKey) -> None:
        """Mesh only: ask the relay to close every connection of ``key``."""
        self._raise_if_closed()
        await self._write(self._conn.close_peer(key))

    async def send_encoded_frames(self, frames: bytes) -> None:
        """Write frames that are already encoded (whole DERP frames, back to back), in one write.

        For relays that batch their own frames on a link (natlib checks nothing here: a partial or
        malformed frame makes the relay close the connection). Cancellation as for :meth:`send`.
        """
        self._raise_if_closed()
        await self._write(frames)

    async def _write(self, frame: bytes) -> None:
        async with self._write_lock:  # a cancellation point while the lock is busy
            self._raise_if_closed()
            if not frame:  # e.g. dropped by the rate limit
                return
            # From here on the frame is written whole or the connection dies: half a frame would
            # desynchronise the stream for everything after it.
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(WRITE_TIMEOUT) as scope:
                    try:
                        await self._stream.send(frame)
                    except _TRANSPORT_ERRORS as e:
                        await self._fail("transport_error", f"writing to the relay failed: {e!r}", e)
                if scope.cancelled_caught:
                    await self._fail(
                        "write_timeout", f"a write to the relay took more than {WRITE_TIMEOUT:g} s"
                    )
        self._raise_if_closed()

    # -- receiving ---------------------------------------------------------------------------------

    async def receive(self) -> DerpEvent:
        """The next frame from the relay.

        That is a :class:`~natlib.derp.RecvPacket` (``src`` is the sender's raw key, ``packet`` the
        payload), :class:`~natlib.derp.PeerGone`, :class:`~natlib.derp.PeerPresent` (watchers
        only), :class:`~natlib.derp.KeepAlive`, :class:`~natlib.derp.Health`,
        :class:`~natlib.derp.Restarting`, an :class:`~natlib.derp.UnknownFrame` from a newer relay,
        or a :class:`~natlib.derp.Pong` that answers no pending :meth:`ping`. Pings from the relay
        are answered here and not returned; Pongs for :meth:`ping` go to it.

        Frames that arrived before the connection ended are still returned; after them this raises
        :class:`DerpConnectionClosed`. Cancellation is safe: no frame is lost, the next call
        returns it.
        """
        while True:
            if self._closed:
                self._raise_if_closed()
            if self._events:
                await anyio.lowlevel.checkpoint_if_cancelled()
                if not self._events:  # pragma: no cover - only if another task took it meanwhile
                    continue
                event = self._events.popleft()
                await anyio.lowlevel.cancel_shielded_checkpoint()
                return event
            self._raise_if_closed()
            if self._reading:
                await self._wakeup.wait()
            else:
                await self._read_step()

    async def ping(self, data: bytes | None = None) -> float:
        """Send a Ping, wait for its Pong, and return the round-trip time in seconds.

        ``data`` is the 8 bytes the relay echoes; random by default. This works while other tasks
        are blocked in :meth:`receive`: the Pong is routed here and never returned by ``receive``.
        Bound the wait with a timeout of your own (``anyio.fail_after``); if the relay goes silent
        the connection dies after :data:`READ_TIMEOUT` and this raises
        :class:`DerpConnectionClosed`.

        Cancellation: the ping is abandoned and its late Pong, if any, is dropped quietly.
        """
        if data is None:
            data = os.urandom(_PING_DATA_LEN)
        elif len(data) != _PING_DATA_LEN:
            raise ValueError(f"ping data must be {_PING_DATA_LEN} bytes, not {len(data)}")
        self._raise_if_closed()
        waiter = _PingWaiter()
        self._pings.setdefault(data, []).append(waiter)
        try:
            start = anyio.current_time()
            await self._write(self._conn.ping(data))
            while waiter.arrived is None:
                self._raise_if_closed()
                if self._reading:
                    await self._wakeup.wait()
                else:
                    await self._read_step()
            return waiter.arrived - start
        finally:
            if waiter.arrived is None:
                waiters = self._pings.get(data, [])
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters:
                    self._pings.pop(data, None)
                self._abandoned_pings[data] = None
                while len(self._abandoned_pings) > _MAX_ABANDONED_PINGS:
                    del self._abandoned_pings[next(iter(self._abandoned_pings))]

    async def _read_step(self) -> None:
        """Be the reader for one read: decode what arrives and dispatch it."""
        self._reading = True
        try:
            if self._dispatch():  # frames already buffered (e.g. right after the handshake)
                return
            with anyio.move_on_after(READ_TIMEOUT) as scope:
                data = await self._stream.receive(_READ_SIZE)
            if scope.cancelled_caught:
                await self._fail(
                    "read_timeout", f"nothing from the relay for {READ_TIMEOUT:g} s; the connection is dead"
                )
                return
            self._conn.receive_data(data)
            self._dispatch()
            replies = self._conn.data_to_send()  # Pongs for the relay's Pings
            if replies:
                await self._write(replies)
        except anyio.EndOfStream:
            await self._fail("eof", "the relay closed the connection")
        except ProtocolError as e:
            await self._fail("protocol_error", f"the relay broke the DERP protocol: {e}", e)
        except _TRANSPORT_ERRORS as e:
            if self._error is None:
                await self._fail("transport_error", f"reading from the relay failed: {e!r}", e)
        finally:
            self._reading = False
            self._notify()

    def _dispatch(self) -> bool:
        """Decode every complete frame buffered; True if any was decoded. Never awaits."""
        progressed = False
        while True:
            event = self._conn.next_event()
            if event is NEED_DATA:
                return progressed
            assert isinstance(event, Frame | Connected)
            progressed = True
            if isinstance(event, Pong):
                waiters = self._pings.get(event.data)
                if waiters:
                    waiters.pop(0).arrived = anyio.current_time()
                    if not waiters:
                        del self._pings[event.data]
                elif event.data in self._abandoned_pings:
                    del self._abandoned_pings[event.data]
                else:
                    self._events.append(event)
            elif isinstance(event, Ping | Connected):
                pass  # Ping: the state machine has queued the Pong, _read_step writes it
            elif isinstance(event, _DELIVERED):
                self._events.append(event)
            else:  # a frame only a server receives: report it as unknown rather than crash
                self._events.append(UnknownFrame(event.TYPE, event.payload()))

    def _notify(self) -> None:
        self._wakeup.set()
        self._wakeup = anyio.Event()

    # -- closing -----------------------------------------------------------------------------------

    def _raise_if_closed(self) -> None:
        if self._error is not None:
            reason, message, cause = self._error
            raise DerpConnectionClosed(message, reason=reason) from cause

    async def _fail(self, reason: str, message: str, cause: BaseException | None = None) -> None:
        if self._error is None:
            self._error = (reason, message, cause)
            log.info("DERP connection to %s ended (%s): %s", self.url, reason, message)
            self._notify()
            await anyio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        """Close the connection. Idempotent.

        Other tasks blocked in :meth:`receive` or :meth:`ping` get :class:`DerpConnectionClosed`
        (reason ``"closed"``). DERP has no goodbye frame: this closes the TCP (or TLS) connection,
        after a WebSocket close frame when DERP runs over WebSocket. Cancellation cannot leave the
        connection half open: it is closed in any case.
        """
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        self._closed = True
        if self._error is None:
            self._error = ("closed", "the DERP client was closed", None)
        self._notify()
        await _close_transport(self._stream)


# -- connecting ---------------------------------------------------------------------------------------


def _build_headers(
    target: _Target, fast_start: bool, extra_headers: Sequence[tuple[str, str]]
) -> list[tuple[bytes, bytes]]:
    defaults: list[tuple[str, str]] = [
        ("Host", target.host_header),
        ("User-Agent", _USER_AGENT),
        ("Upgrade", "DERP"),
        ("Connection", "Upgrade"),
    ]
    if fast_start:
        defaults.append(("Derp-Fast-Start", "1"))
    overridden = {name.lower() for name, _ in extra_headers}
    merged = [(k, v) for k, v in defaults if k.lower() not in overridden]
    merged.extend(extra_headers)
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in merged]


def _refused(url: str, status: int, reason: bytes, body: bytes) -> DerpConnectError:
    text = body.decode("utf-8", "replace").strip()
    if len(text) > _ERROR_BODY_IN_MESSAGE:
        text = text[:_ERROR_BODY_IN_MESSAGE] + "…"
    phrase = reason.decode("latin-1").strip()
    head = f"HTTP {status}" + (f" {phrase}" if phrase else "")
    return DerpConnectError(
        f"{url}: the relay refused the DERP upgrade with {head}" + (f": {text}" if text else ""),
        url=url,
        status=status,
        body=body,
    )


async def _read_upgrade_response(
    stream: anyio.abc.ByteStream, http: h11.Connection, initial: bytes, url: str
) -> tuple[dict[bytes, bytes], bytes]:
    """Read the answer to the upgrade request. Returns the 101's headers and the bytes after it."""
    if initial:
        http.receive_data(initial)
    status: int | None = None
    reason = b""
    body = bytearray()
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as e:
            if status is not None:  # e.g. EOF in the middle of a refusal's body
                raise _refused(url, status, reason, bytes(body)) from None
            raise DerpConnectError(f"{url}: bad HTTP response to the DERP upgrade: {e}", url=url) from None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                if status is None:
                    raise DerpConnectError(
                        f"{url}: the relay closed the connection without answering the upgrade", url=url
                    ) from None
                data = b""  # h11's way of saying EOF: ends a body delimited by the close
            http.receive_data(data)
        elif isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                headers = {k.lower(): v for k, v in event.headers}
                trailing, _closed = http.trailing_data
                return headers, bytes(trailing)
            # 100 Continue and friends: keep reading
        elif isinstance(event, h11.Response):
            status, reason = event.status_code, event.reason
        elif isinstance(event, h11.Data):
            if len(body) < _MAX_ERROR_BODY:
                body += event.data
            else:
                raise _refused(url, status or 0, reason, bytes(body))
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            if status is None:
                raise DerpConnectError(f"{url}: the relay closed the connection during the upgrade", url=url)
            raise _refused(url, status, reason, bytes(body))
        else:  # PAUSED without a 101 cannot happen for a client
            raise DerpConnectError(f"{url}: unexpected HTTP event {event!r}", url=url)


async def connect(
    url: str,
    private_key: NodePrivateKey,
    *,
    server_key: NodePublicKey | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    mesh_key: bytes | None = None,
    is_prober: bool = False,
    app_name: str = "",
    websocket: bool = False,
    extra_headers: Sequence[tuple[str, str]] = (),
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    cert_sha256: bytes | None = None,
) -> DerpClient:
    """Connect to a DERP relay and finish the handshake; returns a ready :class:`DerpClient`.

    ``url`` is the relay's DERP endpoint: ``http://host:port/derp`` (plain),
    ``https://host/derp`` (TLS), or ``ws://``/``wss://`` which imply ``websocket=True``.
    ``private_key`` is this node's key; the relay addresses us by its public half.

    ``server_key``: the relay's key, if known. Over raw DERP this turns on fast start (the request
    and our ClientInfo in one write, no HTTP response); over WebSocket, which has no fast start, it
    pins the key. Either way a relay that presents another key is refused.

    ``ssl_context``/``server_hostname``: for TLS URLs; the defaults are
    :func:`ssl.create_default_context` and the URL's host. Passing ``ssl_context`` with a plain URL
    is an error.

    ``cert_sha256``: pin the relay's leaf certificate by the SHA-256 of its DER bytes (a DERPMap
    ``CertName`` of ``sha256-raw:<hex>``, for self-signed relays); a relay presenting another
    certificate is refused with :class:`DerpConnectError`. The pin replaces CA and host name checks,
    so without ``ssl_context`` the default context verifies nothing else. TLS URLs only.

    ``mesh_key`` (32 bytes), ``is_prober`` and ``app_name`` go into ClientInfo. A relay drops a
    client with a wrong mesh key during the handshake, which shows up here as
    :class:`DerpConnectError`.

    ``extra_headers`` are added to the upgrade request (for example ``Ideal-Node``); a name given
    here replaces the default header of that name.

    ``connect_timeout`` bounds everything: DNS, TCP, TLS, the upgrade and the DERP handshake.

    Raises :class:`DerpConnectError` (:class:`DerpConnectTimeout` on timeout) and ``ValueError``
    for bad arguments. Cancellation closes whatever was opened and propagates.
    """
    target = _parse_url(url, websocket)
    if ssl_context is not None and not target.tls:
        raise ValueError(f"ssl_context given for a plain URL {url!r}; use https:// or wss://")
    if cert_sha256 is not None:
        if not target.tls:
            raise ValueError(f"cert_sha256 given for a plain URL {url!r}; use https:// or wss://")
        if len(cert_sha256) != hashlib.sha256().digest_size:
            raise ValueError(f"cert_sha256 must be 32 bytes, not {len(cert_sha256)}")
        if ssl_context is None:
            ssl_context = ssl.create_default_context()
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE  # the pin below is the whole check
    if mesh_key is not None and len(mesh_key) != MESH_KEY_LEN:
        raise ValueError(f"mesh_key must be {MESH_KEY_LEN} bytes, not {len(mesh_key)}")
    info = ClientInfo(mesh_key=mesh_key, is_prober=is_prober, app_name=app_name)
    with anyio.move_on_after(connect_timeout) as scope:
        return await _connect(
            target, private_key, info, server_key, ssl_context, server_hostname, extra_headers, cert_sha256
        )
    assert scope.cancelled_caught
    raise DerpConnectTimeout(
        f"{url}: no DERP connection within {connect_timeout:g} s (dial, TLS, upgrade and handshake)",
        url=url,
    )


async def _connect(
    target: _Target,
    private_key: NodePrivateKey,
    info: ClientInfo,
    server_key: NodePublicKey | None,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    extra_headers: Sequence[tuple[str, str]],
    cert_sha256: bytes | None = None,
) -> DerpClient:
    url = target.url
    log.debug("dialling DERP relay %s", url)
    try:
        stream: anyio.abc.ByteStream = await anyio.connect_tcp(target.host, target.port)
    except OSError as e:
        raise DerpConnectError(
            f"{url}: cannot connect to {target.host} port {target.port}: {e}", url=url
        ) from e
    try:
        return await _upgrade_and_handshake(
            stream,
            target,
            private_key,
            info,
            server_key,
            ssl_context,
            server_hostname,
            extra_headers,
            cert_sha256,
        )
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise


async def _upgrade_and_handshake(
    stream: anyio.abc.ByteStream,
    target: _Target,
    private_key: NodePrivateKey,
    info: ClientInfo,
    server_key: NodePublicKey | None,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    extra_headers: Sequence[tuple[str, str]],
    cert_sha256: bytes | None = None,
) -> DerpClient:
    url = target.url
    try:
        expected_key = server_key
        if target.tls:
            try:
                tls = await TLSStream.wrap(
                    stream,
                    hostname=server_hostname or target.host,
                    ssl_context=ssl_context or ssl.create_default_context(),
                    standard_compatible=False,
                )
            except (ssl.SSLError, *_TRANSPORT_ERRORS) as e:
                raise DerpConnectError(f"{url}: TLS handshake failed: {e}", url=url) from e
            stream = tls
            if cert_sha256 is not None:
                der = tls.extra(TLSAttribute.peer_certificate_binary)
                seen = hashlib.sha256(der or b"").digest()
                if not hmac.compare_digest(seen, cert_sha256):
                    raise DerpConnectError(
                        f"{url}: the relay's certificate (sha256-raw:{seen.hex()}) is not the pinned "
                        f"sha256-raw:{cert_sha256.hex()}",
                        url=url,
                    )
            meta_key = _server_key_from_tls(tls)
            if meta_key is not None:
                if expected_key is not None and meta_key != expected_key:
                    raise DerpConnectError(
                        f"{url}: the relay's meta-certificate names key {meta_key}, not {expected_key}",
                        url=url,
                    )
                expected_key = meta_key

        # Fast start is a raw-DERP feature; over WebSocket a known key only pins the ServerKey.
        fast_start = expected_key is not None and not target.websocket
        conn = ClientConnection(private_key, info, server_key=expected_key if fast_start else None)
        header_key: bytes | None = None
        trailing = b""
        if target.websocket:
            wss = _WebSocketStream(stream)
            stream = wss
            await wss.handshake(
                target, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra_headers]
            )
            if not wss.accepted:
                raise _refused(url, wss.reject_status or 0, b"", bytes(wss.reject_body))
        else:
            http = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE_HEAD)
            request = http.send(
                h11.Request(
                    method="GET",
                    target=target.request_target,
                    headers=_build_headers(target, fast_start, extra_headers),
                )
            )
            request += http.send(h11.EndOfMessage())
            # With fast start the request and ClientInfo leave in one write.
            await stream.send(request + conn.data_to_send())
            first = b""
            if fast_start:
                first = await stream.receive(_READ_SIZE)
            # A DERP stream starts with frame type 0x01; "H" means the relay answered in HTTP
            # after all (it ignored Derp-Fast-Start, or refused the request).
            if not fast_start or first.startswith(b"H"):
                response_headers, trailing = await _read_upgrade_response(stream, http, first, url)
                header_key = response_headers.get(b"derp-public-key")
            else:
                trailing = first

        if trailing:
            conn.receive_data(trailing)
        connected: Connected | None = None
        while connected is None:
            event = conn.next_event()
            if event is NEED_DATA:
                out = conn.data_to_send()
                if out:
                    await stream.send(out)
                conn.receive_data(await stream.receive(_READ_SIZE))
            elif isinstance(event, Connected):
                connected = event
            else:  # the state machine raises before anything else can come first
                raise DerpConnectError(f"{url}: unexpected {event!r} during the handshake", url=url)
        out = conn.data_to_send()
        if out:
            await stream.send(out)
    except DerpConnectError:
        raise
    except anyio.EndOfStream:
        raise DerpConnectError(
            f"{url}: the relay closed the connection during the handshake "
            "(it drops clients it rejects, for example for a wrong mesh key)",
            url=url,
        ) from None
    except ProtocolError as e:
        raise DerpConnectError(f"{url}: DERP handshake failed: {e}", url=url) from e
    except _TRANSPORT_ERRORS as e:
        raise DerpConnectError(f"{url}: connection failed during the handshake: {e!r}", url=url) from e

    relay_key = connected.server_key
    if header_key is not None:
        try:
            announced = NodePublicKey.from_hex(header_key.decode("ascii", "replace").strip())
        except KeyFormatError:
            raise DerpConnectError(
                f"{url}: malformed Derp-Public-Key header {header_key!r}", url=url
            ) from None
        if announced != relay_key:
            raise DerpConnectError(
                f"{url}: Derp-Public-Key header says {announced} but the ServerKey frame says {relay_key}",
                url=url,
            )
    if expected_key is not None and relay_key != expected_key:
        raise DerpConnectError(f"{url}: the relay's key is {relay_key}, expected {expected_key}", url=url)
    log.debug(
        "connected to DERP relay %s as %s (relay %s, fast start %s)",
        url,
        private_key.public.short(),
        relay_key.short(),
        fast_start,
    )
    return DerpClient(
        stream,
        conn,
        url=url,
        server_key=relay_key,
        server_info=connected.server_info,
        fast_start=fast_start,
        websocket=target.websocket,
    )


# -- staying connected ---------------------------------------------------------------------------

RECONNECT_BACKOFF_MAX: Final = 5.0
"""Longest wait between two reconnection attempts after an unannounced disconnect."""
RECONNECT_RESTARTING_INTERVAL: Final = 0.1
"""Wait between attempts while a relay's Restarting window (its try-for) is open."""


class ReconnectSchedule:
    """When to redial a relay (sans-io; time passed in): 0.1 s doubling up to
    :data:`RECONNECT_BACKOFF_MAX` after failed attempts, but every
    :data:`RECONNECT_RESTARTING_INTERVAL` while the window a Restarting frame announced is open,
    so clients are back soon after a graceful relay restart."""

    def __init__(self) -> None:
        self._backoff = 0.1
        self._retry_until = 0.0

    def failed(self, now: float) -> float:
        """An attempt failed at ``now``: seconds to wait before the next one."""
        delay = RECONNECT_RESTARTING_INTERVAL if now < self._retry_until else self._backoff
        self._backoff = min(self._backoff * 2, RECONNECT_BACKOFF_MAX)
        return delay

    def connected(self) -> None:
        self._backoff, self._retry_until = 0.1, 0.0

    def restarting(self, now: float, hint: Restarting) -> None:
        """The relay announced a restart; ``now`` is when its reconnect-in delay has passed."""
        self._retry_until = now + hint.try_for_ms / 1000


class PersistentClient:
    """A DERP client that stays connected: it reconnects after a relay restart or a lost link.

    A relay about to restart sends Restarting(reconnect in, try for). This client then closes its
    connection, waits the hinted time, and reconnects, retrying until the hinted window is over
    (then it falls back to its usual backoff). After an unannounced disconnect it reconnects with
    exponential backoff (0.1 s doubling up to :data:`RECONNECT_BACKOFF_MAX`). Use it as an async
    context manager; it runs one background task.

    Packets are datagrams: :meth:`send` while disconnected drops the packet and counts it in
    :attr:`dropped_while_disconnected` rather than waiting. :meth:`receive` returns frames across
    reconnects. Cancellation: cancelling ``receive`` loses nothing; leaving the ``async with``
    closes the connection and stops reconnecting.
    """

    def __init__(self, url: str, private_key: NodePrivateKey, **connect_options: Any) -> None:
        self.url = url
        self.private_key = private_key
        self.connect_options = connect_options
        self.connects = 0
        self.restarts_honoured = 0
        self.dropped_while_disconnected = 0
        self._client: DerpClient | None = None
        self._connected = anyio.Event()
        send, recv = anyio.create_memory_object_stream[DerpEvent](1024)
        self._events_in, self._events_out = send, recv
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def local_key(self) -> NodePublicKey:
        return self.private_key.public

    @property
    def connected(self) -> bool:
        return self._client is not None and not self._client.is_closed

    async def __aenter__(self) -> PersistentClient:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._run)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(et, ev, tb)
        if self._client is not None:
            with anyio.CancelScope(shield=True):
                await self._client.aclose()
        self._events_in.close()
        self._events_out.close()

    async def wait_connected(self) -> None:
        """Wait until a connection is up (the first one, or the next after a restart)."""
        while not self.connected:
            await self._connected.wait()

    async def send(self, dst: NodePublicKey, packet: bytes) -> None:
        client = self._client
        if client is None or client.is_closed:
            self.dropped_while_disconnected += 1
            return
        try:
            await client.send(dst, packet)
        except DerpConnectionClosed:
            self.dropped_while_disconnected += 1

    async def receive(self) -> DerpEvent:
        return await self._events_out.receive()

    async def _run(self) -> None:
        schedule = ReconnectSchedule()
        while True:
            try:
                client = await connect(self.url, self.private_key, **self.connect_options)
            except DerpConnectError as e:
                delay = schedule.failed(anyio.current_time())
                log.debug("reconnecting to %s in %.1fs: %s", self.url, delay, e)
                await anyio.sleep(delay)
                continue
            schedule.connected()
            self._client = client
            self.connects += 1
            self._connected.set()
            self._connected = anyio.Event()
            hint: Restarting | None = None
            try:
                while True:
                    event = await client.receive()
                    if isinstance(event, Restarting):
                        hint = event
                        break
                    try:
                        self._events_in.send_nowait(event)
                    except anyio.WouldBlock:
                        log.debug("receive queue full; dropping %r", type(event).__name__)
            except DerpConnectionClosed as e:
                log.info("DERP connection to %s lost (%s); reconnecting", self.url, e.reason)
            finally:
                self._client = None
                with anyio.CancelScope(shield=True):
                    await client.aclose()
            if hint is not None:
                self.restarts_honoured += 1
                log.info(
                    "relay %s is restarting: reconnecting in %d ms, trying for %d ms",
                    self.url,
                    hint.reconnect_in_ms,
                    hint.try_for_ms,
                )
                await anyio.sleep(hint.reconnect_in_ms / 1000)
                schedule.restarting(anyio.current_time(), hint)
