"""DERP v2 frames: the one file with the wire layout.

Every frame is a 5-byte header, ``type(1) ‖ length(4, big-endian)``, then ``length`` payload bytes.
The length never includes the header. Payload layouts (spec: derp-protocol.md §2):

====  ==============  ======  ==========================================================
code  frame           dir     payload
====  ==============  ======  ==========================================================
0x01  ServerKey       S→C     magic "DERP🔑" (8) ‖ server public key (32) ‖ ignored extra
0x02  ClientInfo      C→S     client public key (32) ‖ nonce (24) ‖ NaCl box of JSON
0x03  ServerInfo      S→C     nonce (24) ‖ NaCl box of JSON
0x04  SendPacket      C→S     destination key (32) ‖ packet (0..65536)
0x05  RecvPacket      S→C     source key (32) ‖ packet
0x06  KeepAlive       S→C     empty
0x07  NotePreferred   C→S     1 byte: 0x01 home, 0x00 not
0x08  PeerGone        S→C     key (32) ‖ reason (1; absent on old servers = 0x00)
0x09  PeerPresent     S→C     key (32) ‖ IPv6 or v4-mapped (16) ‖ port (2) ‖ flags (1)
0x0a  ForwardPacket   mesh    source key (32) ‖ destination key (32) ‖ packet
0x10  WatchConns      mesh    empty
0x11  ClosePeer       mesh    key (32)
0x12  Ping            both    8 bytes (the server accepts 8..1000 and reads the first 8)
0x13  Pong            both    the 8 bytes of the Ping
0x14  Health          S→C     UTF-8 text; empty means healthy again
0x15  Restarting      S→C     reconnect-in ms (4) ‖ try-for ms (4)
====  ==============  ======  ==========================================================

This module is sans-io: it turns frame objects into bytes and bytes into frame objects, and
raises :class:`FrameError` (with a short machine-readable ``reason``) on malformed input.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import ClassVar, Final

from ._errors import FrameError

__all__ = [
    "CLIENT_INFO_MAX_LEN",
    "CLIENT_INFO_MIN_LEN",
    "CLIENT_MAX_FRAME_READ",
    "CLIENT_MAX_FRAME_WRITE",
    "FRAME_HEADER_LEN",
    "KEEP_ALIVE_INTERVAL",
    "KEY_LEN",
    "MAGIC",
    "MAX_INFO_LEN",
    "MAX_PACKET_SIZE",
    "NONCE_LEN",
    "PING_MAX_LEN",
    "PROTOCOL_VERSION",
    "SERVER_KEY_MAX_LEN",
    "ClientInfoFrame",
    "ClosePeer",
    "ForwardPacket",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Health",
    "KeepAlive",
    "NotePreferred",
    "PeerGone",
    "PeerGoneReason",
    "PeerPresent",
    "PeerPresentFlags",
    "Ping",
    "Pong",
    "RecvPacket",
    "Restarting",
    "SendPacket",
    "ServerInfoFrame",
    "ServerKey",
    "UnknownFrame",
    "WatchConns",
    "decode_frame",
    "is_disco_packet",
    "read_frame_header",
    "write_frame_header",
]

MAGIC: Final = "DERP🔑".encode()  # 44 45 52 50 F0 9F 94 91
assert len(MAGIC) == 8
PROTOCOL_VERSION: Final = 2
FRAME_HEADER_LEN: Final = 5
KEY_LEN: Final = 32
NONCE_LEN: Final = 24
MAX_PACKET_SIZE: Final = 64 << 10
MAX_INFO_LEN: Final = 1 << 20
KEEP_ALIVE_INTERVAL: Final = 60.0

# Size limits, exactly as the Go implementation enforces them (spec §1).
CLIENT_MAX_FRAME_WRITE: Final = 10 << 20
CLIENT_MAX_FRAME_READ: Final = 1 << 20
SERVER_KEY_MAX_LEN: Final = 1 << 10
CLIENT_INFO_MIN_LEN: Final = KEY_LEN + NONCE_LEN
CLIENT_INFO_MAX_LEN: Final = 256 << 10
PING_MAX_LEN: Final = 1000
PING_LEN: Final = 8

_HEADER = struct.Struct(">BI")
_DISCO_MAGIC: Final = "TS💬".encode()
_DISCO_MIN_LEN: Final = len(_DISCO_MAGIC) + KEY_LEN + NONCE_LEN  # 62


class FrameType(enum.IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(enum.IntEnum):
    DISCONNECTED = 0x00
    NOT_HERE = 0x01
    # Made up locally by a mesh client when its connection breaks; never on the wire.
    MESH_CONN_BROKE = 0xF0


class PeerPresentFlags(enum.IntFlag):
    IS_REGULAR = 0x01
    IS_MESH_PEER = 0x02
    IS_PROBER = 0x04
    NOT_IDEAL = 0x08


def write_frame_header(frame_type: int, length: int) -> bytes:
    """The 5-byte header. ``length`` is the payload length (0..2**32-1)."""
    return _HEADER.pack(frame_type, length)


def read_frame_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """Return ``(type, payload length)`` of the header at ``offset``; needs 5 bytes."""
    if len(buf) - offset < FRAME_HEADER_LEN:
        raise FrameError("short_header", f"frame header needs {FRAME_HEADER_LEN} bytes")
    t, n = _HEADER.unpack_from(buf, offset)
    return t, n


def is_disco_packet(packet: bytes | bytearray | memoryview) -> bool:
    """True if a packet looks like disco: magic ``TS💬`` and at least 62 bytes (spec §5, §9)."""
    return len(packet) >= _DISCO_MIN_LEN and bytes(packet[: len(_DISCO_MAGIC)]) == _DISCO_MAGIC


def _key(b: bytes | memoryview, what: str) -> bytes:
    if len(b) != KEY_LEN:
        raise ValueError(f"{what} must be {KEY_LEN} bytes")
    return bytes(b)


class Frame:
    """Base class of the frame objects. ``encode()`` gives the header plus payload."""

    __slots__ = ()
    TYPE: ClassVar[FrameType]

    def payload(self) -> bytes:
        raise NotImplementedError

    def encode(self) -> bytes:
        p = self.payload()
        return _HEADER.pack(self.TYPE, len(p)) + p


@dataclass(frozen=True, slots=True)
class ServerKey(Frame):
    key: bytes
    TYPE: ClassVar[FrameType] = FrameType.SERVER_KEY

    def payload(self) -> bytes:
        return MAGIC + _key(self.key, "server key")


@dataclass(frozen=True, slots=True)
class ClientInfoFrame(Frame):
    """The client's public key followed by ``nonce ‖ box`` (see ``_handshake``)."""

    client_key: bytes
    sealed: bytes
    TYPE: ClassVar[FrameType] = FrameType.CLIENT_INFO

    def payload(self) -> bytes:
        return _key(self.client_key, "client key") + self.sealed


@dataclass(frozen=True, slots=True)
class ServerInfoFrame(Frame):
    sealed: bytes
    TYPE: ClassVar[FrameType] = FrameType.SERVER_INFO

    def payload(self) -> bytes:
        return self.sealed


@dataclass(frozen=True, slots=True)
class SendPacket(Frame):
    dst: bytes
    packet: bytes
    TYPE: ClassVar[FrameType] = FrameType.SEND_PACKET

    def payload(self) -> bytes:
        if len(self.packet) > MAX_PACKET_SIZE:
            raise ValueError(f"packet larger than {MAX_PACKET_SIZE} bytes")
        return _key(self.dst, "destination key") + self.packet


@dataclass(frozen=True, slots=True)
class RecvPacket(Frame):
    src: bytes
    packet: bytes
    TYPE: ClassVar[FrameType] = FrameType.RECV_PACKET

    def payload(self) -> bytes:
        return _key(self.src, "source key") + self.packet


@dataclass(frozen=True, slots=True)
class KeepAlive(Frame):
    TYPE: ClassVar[FrameType] = FrameType.KEEP_ALIVE

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class NotePreferred(Frame):
    preferred: bool
    TYPE: ClassVar[FrameType] = FrameType.NOTE_PREFERRED

    def payload(self) -> bytes:
        return b"\x01" if self.preferred else b"\x00"


@dataclass(frozen=True, slots=True)
class PeerGone(Frame):
    key: bytes
    reason: int = PeerGoneReason.DISCONNECTED
    TYPE: ClassVar[FrameType] = FrameType.PEER_GONE

    def payload(self) -> bytes:
        return _key(self.key, "peer key") + bytes((self.reason,))


@dataclass(frozen=True, slots=True)
class PeerPresent(Frame):
    """``ip`` is None when an old server sent only the key."""

    key: bytes
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    port: int = 0
    flags: int = 0
    TYPE: ClassVar[FrameType] = FrameType.PEER_PRESENT

    def payload(self) -> bytes:
        if self.ip is None:
            packed = bytes(16)
        elif isinstance(self.ip, ipaddress.IPv4Address):
            packed = b"\x00" * 10 + b"\xff\xff" + self.ip.packed
        else:
            packed = self.ip.packed
        return _key(self.key, "peer key") + packed + struct.pack(">HB", self.port, self.flags)


@dataclass(frozen=True, slots=True)
class ForwardPacket(Frame):
    src: bytes
    dst: bytes
    packet: bytes
    TYPE: ClassVar[FrameType] = FrameType.FORWARD_PACKET

    def payload(self) -> bytes:
        return _key(self.src, "source key") + _key(self.dst, "destination key") + self.packet


@dataclass(frozen=True, slots=True)
class WatchConns(Frame):
    TYPE: ClassVar[FrameType] = FrameType.WATCH_CONNS

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class ClosePeer(Frame):
    key: bytes
    TYPE: ClassVar[FrameType] = FrameType.CLOSE_PEER

    def payload(self) -> bytes:
        return _key(self.key, "peer key")


@dataclass(frozen=True, slots=True)
class Ping(Frame):
    data: bytes
    TYPE: ClassVar[FrameType] = FrameType.PING

    def payload(self) -> bytes:
        if len(self.data) != PING_LEN:
            raise ValueError("ping data must be 8 bytes")
        return self.data


@dataclass(frozen=True, slots=True)
class Pong(Frame):
    data: bytes
    TYPE: ClassVar[FrameType] = FrameType.PONG

    def payload(self) -> bytes:
        if len(self.data) != PING_LEN:
            raise ValueError("pong data must be 8 bytes")
        return self.data


@dataclass(frozen=True, slots=True)
class Health(Frame):
    problem: str
    TYPE: ClassVar[FrameType] = FrameType.HEALTH

    def payload(self) -> bytes:
        return self.problem.encode()


@dataclass(frozen=True, slots=True)
class Restarting(Frame):
    reconnect_in_ms: int
    try_for_ms: int
    TYPE: ClassVar[FrameType] = FrameType.RESTARTING

    def payload(self) -> bytes:
        return struct.pack(">II", self.reconnect_in_ms, self.try_for_ms)


@dataclass(frozen=True, slots=True)
class UnknownFrame(Frame):
    """A frame type this version does not know; receivers skip it."""

    frame_type: int
    data: bytes

    def payload(self) -> bytes:
        return self.data

    def encode(self) -> bytes:
        return _HEADER.pack(self.frame_type, len(self.data)) + self.data


def _unmap(packed: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip6 = ipaddress.IPv6Address(packed)
    return ip6.ipv4_mapped or ip6


def decode_frame(frame_type: int, payload: bytes | bytearray | memoryview) -> Frame:
    """Parse one frame's payload into its frame object.

    Validation is the union of what both roles accept; role-specific size limits (a server's
    ClientInfo bounds, a client's 1 MiB read cap) are applied by the caller or by
    :class:`FrameDecoder`. Raises :class:`FrameError` with a reason such as ``bad_ping_len``.
    """
    p = bytes(payload)
    n = len(p)
    try:
        t = FrameType(frame_type)
    except ValueError:
        return UnknownFrame(frame_type, p)
    if t is FrameType.SERVER_KEY:
        if n < len(MAGIC) + KEY_LEN or p[: len(MAGIC)] != MAGIC:
            raise FrameError("bad_server_key", "ServerKey frame lacks the magic or the key")
        return ServerKey(p[8:40])
    if t is FrameType.CLIENT_INFO:
        if n < CLIENT_INFO_MIN_LEN:
            raise FrameError("short_client_info", f"ClientInfo of {n} bytes")
        return ClientInfoFrame(p[:KEY_LEN], p[KEY_LEN:])
    if t is FrameType.SERVER_INFO:
        if n < NONCE_LEN:
            raise FrameError("short_server_info", f"ServerInfo of {n} bytes")
        return ServerInfoFrame(p)
    if t is FrameType.SEND_PACKET:
        if n < KEY_LEN:
            raise FrameError("short_send_packet", f"SendPacket of {n} bytes")
        if n - KEY_LEN > MAX_PACKET_SIZE:
            raise FrameError("packet_too_large", f"SendPacket payload of {n - KEY_LEN} bytes")
        return SendPacket(p[:KEY_LEN], p[KEY_LEN:])
    if t is FrameType.RECV_PACKET:
        if n < KEY_LEN:
            raise FrameError("short_recv_packet", f"RecvPacket of {n} bytes")
        return RecvPacket(p[:KEY_LEN], p[KEY_LEN:])
    if t is FrameType.KEEP_ALIVE:
        return KeepAlive()
    if t is FrameType.NOTE_PREFERRED:
        if n != 1:
            raise FrameError("bad_note_preferred_len", f"NotePreferred of {n} bytes")
        return NotePreferred(p[0] != 0)
    if t is FrameType.PEER_GONE:
        if n < KEY_LEN:
            raise FrameError("short_peer_gone", f"PeerGone of {n} bytes")
        return PeerGone(p[:KEY_LEN], p[KEY_LEN] if n > KEY_LEN else PeerGoneReason.DISCONNECTED)
    if t is FrameType.PEER_PRESENT:
        if n < KEY_LEN:
            raise FrameError("short_peer_present", f"PeerPresent of {n} bytes")
        if n < KEY_LEN + 18:  # an old server: key only
            return PeerPresent(p[:KEY_LEN])
        port = int.from_bytes(p[48:50], "big")
        flags = p[50] if n > 50 else 0
        return PeerPresent(p[:KEY_LEN], _unmap(p[32:48]), port, flags)
    if t is FrameType.FORWARD_PACKET:
        if n < 2 * KEY_LEN:
            raise FrameError("short_forward_packet", f"ForwardPacket of {n} bytes")
        if n - 2 * KEY_LEN > MAX_PACKET_SIZE:
            raise FrameError("packet_too_large", f"ForwardPacket payload of {n - 2 * KEY_LEN} bytes")
        return ForwardPacket(p[:KEY_LEN], p[KEY_LEN : 2 * KEY_LEN], p[2 * KEY_LEN :])
    if t is FrameType.WATCH_CONNS:
        if n != 0:
            raise FrameError("bad_watch_conns_len", f"WatchConns of {n} bytes")
        return WatchConns()
    if t is FrameType.CLOSE_PEER:
        if n != KEY_LEN:
            raise FrameError("bad_close_peer_len", f"ClosePeer of {n} bytes")
        return ClosePeer(p)
    if t is FrameType.PING:
        if n < PING_LEN or n > PING_MAX_LEN:
            raise FrameError("bad_ping_len", f"Ping of {n} bytes")
        return Ping(p[:PING_LEN])
    if t is FrameType.PONG:
        if n < PING_LEN:
            raise FrameError("bad_pong_len", f"Pong of {n} bytes")
        return Pong(p[:PING_LEN])
    if t is FrameType.HEALTH:
        return Health(p.decode("utf-8", errors="replace"))
    if t is FrameType.RESTARTING:
        if n < 8:
            raise FrameError("short_restarting", f"Restarting of {n} bytes")
        a, b = struct.unpack_from(">II", p)
        return Restarting(a, b)
    raise AssertionError(t)  # pragma: no cover


class FrameDecoder:
    """Incremental frame splitter: feed bytes, take ``(type, payload)`` pairs out.

    ``max_frame_len`` caps the payload length of any one frame; a larger header raises
    :class:`FrameError` (reason ``frame_too_large``) before the payload is buffered.
    Frames may arrive split across any number of ``feed`` calls.
    """

    __slots__ = ("_buf", "_pos", "max_frame_len")

    def __init__(self, max_frame_len: int = CLIENT_MAX_FRAME_READ) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_frame_len = max_frame_len

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def take_buffered(self) -> bytes:
        """Remove and return the bytes buffered after the last complete frame."""
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

    def next_frame(self) -> tuple[int, bytes] | None:
        """The next complete frame, or None if more bytes are needed."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < FRAME_HEADER_LEN:
            return None
        t, n = _HEADER.unpack_from(buf, pos)
        if n > self.max_frame_len:
            raise FrameError("frame_too_large", f"frame type {t:#04x} of {n} bytes > {self.max_frame_len}")
        end = pos + FRAME_HEADER_LEN + n
        if len(buf) < end:
            return None
        payload = bytes(buf[pos + FRAME_HEADER_LEN : end])
        self._pos = end
        return t, payload
