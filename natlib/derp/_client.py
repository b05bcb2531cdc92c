"""Client side of a DERP connection as a sans-io state machine.

Feed the bytes that arrive after the HTTP upgrade to :meth:`ClientConnection.receive_data`, take
events out with :meth:`~ClientConnection.next_event`, and write whatever
:meth:`~ClientConnection.data_to_send` returns. Methods such as :meth:`send_packet` return the bytes
of one frame. Nothing here touches a socket or a clock; time, where it matters (the optional
client-side token bucket), is passed in.

States::

    AWAIT_SERVER_KEY ──ServerKey──► AWAIT_SERVER_INFO ──ServerInfo──► CONNECTED
          │ (fast start: server key known, ClientInfo already queued; ServerKey later skipped)
          └──────────────────────────────────────────► AWAIT_SERVER_INFO

Any protocol error moves to ``CLOSED`` and raises :class:`ProtocolError`; the connection is then
unusable. Events after ``Connected`` are frame objects: :class:`RecvPacket`, :class:`PeerGone`,
:class:`PeerPresent`, :class:`KeepAlive`, :class:`Ping` (a Pong is queued automatically),
:class:`Pong`, :class:`Health`, :class:`Restarting` and :class:`UnknownFrame`.
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass

from ..keys import NodePrivateKey, NodePublicKey
from ._errors import HandshakeError, ProtocolError
from ._frames import (
    CLIENT_MAX_FRAME_READ,
    CLIENT_MAX_FRAME_WRITE,
    FRAME_HEADER_LEN,
    KEY_LEN,
    MAX_PACKET_SIZE,
    SERVER_KEY_MAX_LEN,
    ClientInfoFrame,
    ClosePeer,
    ForwardPacket,
    Frame,
    FrameDecoder,
    FrameType,
    NotePreferred,
    Ping,
    Pong,
    ServerInfoFrame,
    ServerKey,
    WatchConns,
    decode_frame,
    write_frame_header,
)
from ._handshake import ClientInfo, ServerInfo, open_server_info, seal_client_info

__all__ = ["NEED_DATA", "ClientConnection", "ClientState", "Connected", "TokenBucket"]


class ClientState(enum.Enum):
    AWAIT_SERVER_KEY = "await-server-key"
    AWAIT_SERVER_INFO = "await-server-info"
    CONNECTED = "connected"
    CLOSED = "closed"


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class Connected:
    """The handshake finished: the server's key and what it said in ServerInfo."""

    server_key: NodePublicKey
    server_info: ServerInfo


class TokenBucket:
    """A byte token bucket; ``now`` is a monotonic time in seconds supplied by the caller."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    def try_take(self, n: float, now: float) -> bool:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False


class ClientConnection:
    """One DERP client connection's protocol state. See the module docstring for the flow."""

    def __init__(
        self,
        private_key: NodePrivateKey,
        info: ClientInfo | None = None,
        *,
        server_key: NodePublicKey | None = None,
    ) -> None:
        """``server_key`` known in advance enables fast start: ClientInfo is queued at once."""
        self.private_key = private_key
        self.info = info if info is not None else ClientInfo()
        self.server_key: NodePublicKey | None = server_key
        self.server_info: ServerInfo | None = None
        self.fast_start = server_key is not None
        self._decoder = FrameDecoder(CLIENT_MAX_FRAME_READ)
        self._out = bytearray()
        self._bucket: TokenBucket | None = None
        self.dropped_by_rate_limit = 0
        self.state = ClientState.AWAIT_SERVER_KEY
        if server_key is not None:
            self._queue_client_info(server_key)
            self.state = ClientState.AWAIT_SERVER_INFO

    # -- input ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state is ClientState.CLOSED:
            raise ProtocolError("closed", "connection is closed")
        self._decoder.feed(data)

    def next_event(self) -> Connected | Frame | _NeedData:
        """The next event, or ``NEED_DATA``. Raises :class:`ProtocolError` on bad input."""
        if self.state is ClientState.CLOSED:
            raise ProtocolError("closed", "connection is closed")
        while True:
            try:
                item = self._decoder.next_frame()
            except ProtocolError:
                self.state = ClientState.CLOSED
                raise
            if item is None:
                return NEED_DATA
            t, payload = item
            try:
                ev = self._handle(t, payload)
            except ProtocolError:
                self.state = ClientState.CLOSED
                raise
            if ev is not None:
                return ev

    def _handle(self, t: int, payload: bytes) -> Connected | Frame | None:
        st = self.state
        if t == FrameType.SERVER_KEY:
            if len(payload) > SERVER_KEY_MAX_LEN:
                raise HandshakeError("server_key_too_large", f"ServerKey of {len(payload)} bytes")
            frame = decode_frame(t, payload)
            assert isinstance(frame, ServerKey)
            if st is ClientState.AWAIT_SERVER_KEY:
                self.server_key = NodePublicKey(frame.key)
                self._queue_client_info(self.server_key)
                self.state = ClientState.AWAIT_SERVER_INFO
                return None
            if self.fast_start and self.server_key is not None:
                if not hmac.compare_digest(frame.key, self.server_key.raw):
                    raise HandshakeError("server_key_mismatch", "ServerKey differs from the expected key")
                return None  # fast start: the server still sends it; skip it
            return None  # like Go's receive loop: a late ServerKey is skipped
        if st is ClientState.AWAIT_SERVER_KEY:
            raise HandshakeError("expected_server_key", f"first frame is type {t:#04x}, not ServerKey")
        if st is ClientState.AWAIT_SERVER_INFO:
            if t != FrameType.SERVER_INFO:
                raise HandshakeError("expected_server_info", f"frame {t:#04x} before ServerInfo")
            frame = decode_frame(t, payload)
            assert isinstance(frame, ServerInfoFrame) and self.server_key is not None
            info = open_server_info(self.private_key, self.server_key.raw, frame.sealed)
            self.server_info = info
            if info.token_bucket_bytes_per_second > 0 and info.token_bucket_bytes_burst > 0:
                self._bucket = TokenBucket(info.token_bucket_bytes_per_second, info.token_bucket_bytes_burst)
            self.state = ClientState.CONNECTED
            return Connected(self.server_key, info)
        frame = decode_frame(t, payload)
        if isinstance(frame, Ping):
            self._out += Pong(frame.data).encode()
        return frame

    # -- output --------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes the state machine itself wants written (ClientInfo, automatic Pongs)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _queue_client_info(self, server_key: NodePublicKey) -> None:
        sealed = seal_client_info(self.private_key, server_key.raw, self.info)
        self._out += ClientInfoFrame(sealed[:KEY_LEN], sealed[KEY_LEN:]).encode()

    def _require_connected(self) -> None:
        if self.state is not ClientState.CONNECTED and not (
            self.state is ClientState.AWAIT_SERVER_INFO and self.fast_start
        ):
            raise ProtocolError("not_connected", f"cannot send in state {self.state.value}")

    def send_packet(self, dst: NodePublicKey | bytes, packet: bytes, now: float = 0.0) -> bytes:
        """A SendPacket frame, or ``b""`` when the server's token bucket (if any) says drop."""
        self._require_connected()
        raw = dst.raw if isinstance(dst, NodePublicKey) else dst
        if len(packet) > MAX_PACKET_SIZE:
            raise ValueError(f"packet of {len(packet)} bytes exceeds {MAX_PACKET_SIZE}")
        if self._bucket is not None and not self._bucket.try_take(
            FRAME_HEADER_LEN + KEY_LEN + len(packet), now
        ):
            self.dropped_by_rate_limit += 1
            return b""
        return write_frame_header(FrameType.SEND_PACKET, KEY_LEN + len(packet)) + raw + packet

    def forward_packet(self, src: NodePublicKey | bytes, dst: NodePublicKey | bytes, packet: bytes) -> bytes:
        """A ForwardPacket frame (mesh peers only)."""
        self._require_connected()
        s = src.raw if isinstance(src, NodePublicKey) else src
        d = dst.raw if isinstance(dst, NodePublicKey) else dst
        return ForwardPacket(s, d, packet).encode()

    def note_preferred(self, preferred: bool) -> bytes:
        self._require_connected()
        return NotePreferred(preferred).encode()

    def ping(self, data: bytes) -> bytes:
        self._require_connected()
        return Ping(data).encode()

    def pong(self, data: bytes) -> bytes:
        self._require_connected()
        return Pong(data).encode()

    def watch_conns(self) -> bytes:
        self._require_connected()
        return WatchConns().encode()

    def close_peer(self, key: NodePublicKey | bytes) -> bytes:
        self._require_connected()
        return ClosePeer(key.raw if isinstance(key, NodePublicKey) else key).encode()

    @staticmethod
    def check_frame_size(frame: bytes) -> None:
        if len(frame) - FRAME_HEADER_LEN > CLIENT_MAX_FRAME_WRITE:
            raise ValueError("frame exceeds the 10 MiB client write limit")
