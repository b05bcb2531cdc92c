"""Disco: Tailscale's discovery messages (Ping, Pong, CallMeMaybe), sans-io.

A disco packet fills a whole UDP datagram or DERP packet (derp-protocol §9)::

    magic "TS💬" (6: 54 53 F0 9F 92 AC) ‖ sender's disco public key (32) ‖ nonce (24) ‖ box

The box is a NaCl box (Curve25519, XSalsa20-Poly1305) from the sender's disco private key to the
receiver's disco public key: a 16-byte tag, then ``type (1) ‖ version (1) = 0 ‖ payload``.
Receivers ignore trailing payload bytes, which leaves room for later versions.

=========  =============  ==========================================================================
Type       Name           Payload
=========  =============  ==========================================================================
``0x01``   Ping           TxID (12) ‖ sender's node key (32, optional) ‖ zero padding (MTU probes)
``0x02``   Pong           TxID (12) ‖ source the ping came from: IP (16, IPv4 v4-mapped) ‖ port (2)
``0x03``   CallMeMaybe    N × (IP (16) ‖ port (2)); a bad length or version parses as an empty list
=========  =============  ==========================================================================

An unpadded Ping with a node key is 124 bytes on the wire, the smallest possible packet 80.

Errors: :func:`open_packet` raises only subclasses of :class:`DiscoError`, each with a stable
``reason`` label for counters: :class:`NotDiscoError` (``"not_disco"``: no magic or too short),
:class:`UnauthenticatedError` (``"unauthenticated"``: the box does not open with our key, e.g. a
stale key or a forgery), :class:`UnknownMessageTypeError` (``"unknown_type"``, with the type byte;
Tailscale's peer-relay messages 0x04–0x09 land here) and :class:`MalformedMessageError`
(``"malformed"``: the box opened but the payload is too short). Callers drop the packet and count.

Nothing here touches a socket or a clock. Shared keys (Curve25519 scalar multiplications) are
cached per (our private key, their public key) pair, like Tailscale's precomputed shared keys.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import nacl.exceptions
import nacl.public
import nacl.utils

from ._counters import DiscoCounters
from .keys import KEY_LEN, DiscoPrivateKey, DiscoPublicKey, NodePublicKey

__all__ = [
    "BOX_OVERHEAD",
    "ENDPOINT_LEN",
    "HEADER_LEN",
    "MAGIC",
    "MAX_PING_PADDING",
    "MIN_PACKET_LEN",
    "NONCE_LEN",
    "PING_LEN",
    "TX_ID_LEN",
    "VERSION",
    "AddrPort",
    "BytesLike",
    "CallMeMaybe",
    "DiscoCounters",
    "DiscoError",
    "IPAddress",
    "MalformedMessageError",
    "Message",
    "MessageType",
    "NotDiscoError",
    "Ping",
    "Pong",
    "UnauthenticatedError",
    "UnknownMessageTypeError",
    "decode_endpoint",
    "decode_message",
    "encode_endpoint",
    "encode_message",
    "looks_like_disco",
    "new_tx_id",
    "open_packet",
    "peek_sender",
    "seal",
]

BytesLike: TypeAlias = bytes | bytearray | memoryview
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

MAGIC: Final = "TS💬".encode()  # 54 53 F0 9F 92 AC
NONCE_LEN: Final = 24
HEADER_LEN: Final = len(MAGIC) + KEY_LEN + NONCE_LEN  # 62: what DERP checks for
BOX_OVERHEAD: Final = 16  # Poly1305 tag
MESSAGE_HEADER_LEN: Final = 2  # type, version
MIN_PACKET_LEN: Final = HEADER_LEN + BOX_OVERHEAD + MESSAGE_HEADER_LEN  # 80
VERSION: Final = 0
TX_ID_LEN: Final = 12
ENDPOINT_LEN: Final = 18  # 16-byte IP (IPv4 v4-mapped) + 2-byte big-endian port
PONG_PAYLOAD_LEN: Final = TX_ID_LEN + ENDPOINT_LEN  # 30
PING_LEN: Final = MIN_PACKET_LEN + TX_ID_LEN + KEY_LEN  # 124, unpadded with a node key
MAX_PING_PADDING: Final = 65_507 - PING_LEN
"""Padding that still fits one IPv4 UDP datagram (65,507 bytes of payload)."""

_PORT = struct.Struct("!H")
_ZERO_KEY: Final = bytes(KEY_LEN)


class MessageType(enum.IntEnum):
    PING = 0x01
    PONG = 0x02
    CALL_ME_MAYBE = 0x03


# -- errors ------------------------------------------------------------------------------------------


class DiscoError(ValueError):
    """Base class of every disco decoding error. ``reason`` is a short, stable label for counters."""

    reason: str = "disco"


class NotDiscoError(DiscoError):
    """No disco magic, or shorter than the 62-byte header: not a disco packet at all."""

    reason = "not_disco"


class UnauthenticatedError(DiscoError):
    """The box does not open with our key: a stale or wrong key, a forgery, or corruption."""

    reason = "unauthenticated"


class MalformedMessageError(DiscoError):
    """The box opened, but the message inside is too short for its type."""

    reason = "malformed"


class UnknownMessageTypeError(DiscoError):
    """The box opened, but the message type is not one natlib speaks (``message_type``)."""

    reason = "unknown_type"

    def __init__(self, message_type: int) -> None:
        super().__init__(f"unknown disco message type {message_type:#04x}")
        self.message_type = message_type


# -- addresses -----------------------------------------------------------------------------------------


def _canonical(ip: IPAddress) -> IPAddress:
    """Unmap ``::ffff:a.b.c.d`` and drop an IPv6 scope: the form every endpoint is kept in."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return ipaddress.IPv6Address(ip.packed)
    return ip


@dataclass(frozen=True, slots=True)
class AddrPort:
    """An IP address and UDP port, always canonical (IPv4 unmapped, no IPv6 scope). Hashable.

    ``AddrPort.parse("192.0.2.1:41641")``, ``AddrPort.parse("[2001:db8::1]:41641")``, or
    ``AddrPort(ipaddress.ip_address(host), port)``; :meth:`socket_address` gives what a socket wants.
    """

    ip: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise TypeError(f"AddrPort.ip must be an ipaddress address, not {type(self.ip).__name__}")
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port {self.port} out of range")
        object.__setattr__(self, "ip", _canonical(self.ip))

    @classmethod
    def parse(cls, text: str) -> AddrPort:
        """Parse ``a.b.c.d:port`` or ``[v6]:port``. Raises :class:`ValueError`."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"not an ip:port: {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"IPv6 address needs brackets: {text!r}")
        return cls(ipaddress.ip_address(host), int(port))

    @classmethod
    def from_socket(cls, address: tuple[str, int] | tuple[str, int, int, int]) -> AddrPort:
        """From a socket address as ``recvfrom`` returns it (the IPv6 flow info and scope dropped)."""
        return cls(ipaddress.ip_address(address[0]), address[1])

    def socket_address(self) -> tuple[str, int]:
        return (str(self.ip), self.port)

    @property
    def is_ipv6(self) -> bool:
        return self.ip.version == 6

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


def encode_endpoint(addr: AddrPort) -> bytes:
    """18 bytes: the IP as 16 bytes (IPv4 v4-mapped, ``::ffff:a.b.c.d``), then the port big-endian."""
    ip = addr.ip
    packed = b"\x00" * 10 + b"\xff\xff" + ip.packed if ip.version == 4 else ip.packed
    return packed + _PORT.pack(addr.port)


def decode_endpoint(data: BytesLike) -> AddrPort:
    """The inverse of :func:`encode_endpoint`; v4-mapped addresses come back as IPv4."""
    if len(data) != ENDPOINT_LEN:
        raise ValueError(f"an endpoint is {ENDPOINT_LEN} bytes, not {len(data)}")
    raw = bytes(data)
    return AddrPort(ipaddress.IPv6Address(raw[:16]), _PORT.unpack_from(raw, 16)[0])


# -- messages ------------------------------------------------------------------------------------------


def new_tx_id() -> bytes:
    """A fresh random 12-byte transaction ID."""
    return nacl.utils.random(TX_ID_LEN)


def _check_tx_id(tx_id: bytes) -> None:
    if not isinstance(tx_id, bytes) or len(tx_id) != TX_ID_LEN:
        raise ValueError(f"tx_id must be {TX_ID_LEN} bytes")


@dataclass(frozen=True, slots=True)
class Ping:
    """A probe. ``node_key`` is the sender's node key (omitted by very old clients); ``padding`` is
    the number of zero bytes appended, used to probe the path MTU."""

    tx_id: bytes
    node_key: NodePublicKey | None = None
    padding: int = 0

    def __post_init__(self) -> None:
        _check_tx_id(self.tx_id)
        if not 0 <= self.padding <= MAX_PING_PADDING:
            raise ValueError(f"padding must be within 0..{MAX_PING_PADDING}")


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to a :class:`Ping`; ``src`` is where the ping came from, as the responder saw it
    (so every pong doubles as a STUN answer)."""

    tx_id: bytes
    src: AddrPort

    def __post_init__(self) -> None:
        _check_tx_id(self.tx_id)


@dataclass(frozen=True, slots=True)
class CallMeMaybe:
    """A request, sent only over DERP: "I have just sent UDP to you from these endpoints; ping me
    back now"."""

    endpoints: tuple[AddrPort, ...] = field(default=())

    def __init__(self, endpoints: Iterable[AddrPort] = ()) -> None:
        object.__setattr__(self, "endpoints", tuple(endpoints))


Message: TypeAlias = Ping | Pong | CallMeMaybe


def encode_message(message: Message) -> bytes:
    """The plaintext inside the box: ``type ‖ version ‖ payload``."""
    if isinstance(message, Ping):
        key = message.node_key.raw if message.node_key is not None else b""
        return bytes((MessageType.PING, VERSION)) + message.tx_id + key + bytes(message.padding)
    if isinstance(message, Pong):
        return bytes((MessageType.PONG, VERSION)) + message.tx_id + encode_endpoint(message.src)
    if isinstance(message, CallMeMaybe):
        return bytes((MessageType.CALL_ME_MAYBE, VERSION)) + b"".join(map(encode_endpoint, message.endpoints))
    raise TypeError(f"not a disco message: {type(message).__name__}")


def decode_message(plaintext: BytesLike) -> Message:
    """Parse the plaintext of an opened box. Lenient like Tailscale: trailing bytes are ignored,
    and a CallMeMaybe with a bad length or version is an empty one."""
    p = bytes(plaintext)
    if len(p) < MESSAGE_HEADER_LEN:
        raise MalformedMessageError(f"disco message of {len(p)} bytes has no type and version")
    mtype, version, payload = p[0], p[1], p[MESSAGE_HEADER_LEN:]
    if mtype == MessageType.PING:
        if len(payload) < TX_ID_LEN:
            raise MalformedMessageError(f"Ping payload of {len(payload)} bytes, need {TX_ID_LEN}")
        rest = payload[TX_ID_LEN:]
        if len(rest) < KEY_LEN:  # an old client: no node key; anything after the TxID is padding
            return Ping(payload[:TX_ID_LEN], None, len(rest))
        raw_key = rest[:KEY_LEN]
        node_key = None if raw_key == _ZERO_KEY else NodePublicKey(raw_key)  # zero means "none" in Go
        return Ping(payload[:TX_ID_LEN], node_key, min(len(rest) - KEY_LEN, MAX_PING_PADDING))
    if mtype == MessageType.PONG:
        if len(payload) < PONG_PAYLOAD_LEN:
            raise MalformedMessageError(f"Pong payload of {len(payload)} bytes, need {PONG_PAYLOAD_LEN}")
        return Pong(payload[:TX_ID_LEN], decode_endpoint(payload[TX_ID_LEN:PONG_PAYLOAD_LEN]))
    if mtype == MessageType.CALL_ME_MAYBE:
        if version != VERSION or len(payload) % ENDPOINT_LEN:
            return CallMeMaybe()
        return CallMeMaybe(
            decode_endpoint(payload[i : i + ENDPOINT_LEN]) for i in range(0, len(payload), ENDPOINT_LEN)
        )
    raise UnknownMessageTypeError(mtype)


# -- packets -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _box(private_raw: bytes, public_raw: bytes) -> nacl.public.Box:
    # Box() precomputes the shared key (one scalar multiplication); cache it per key pair.
    return nacl.public.Box(nacl.public.PrivateKey(private_raw), nacl.public.PublicKey(public_raw))


@functools.lru_cache(maxsize=64)
def _public_raw(private: DiscoPrivateKey) -> bytes:
    return private.public_raw()  # one scalar multiplication: worth caching for every seal


def looks_like_disco(data: BytesLike) -> bool:
    """True if ``data`` starts with the disco magic and holds at least the 62-byte header.

    This is the demultiplexing test for a socket shared with STUN and WireGuard; it opens nothing.
    """
    return len(data) >= HEADER_LEN and bytes(data[: len(MAGIC)]) == MAGIC


def peek_sender(data: BytesLike) -> DiscoPublicKey:
    """The sender's disco key from the header, without opening the box (to find the peer first).

    Raises :class:`NotDiscoError`. The key is unauthenticated until :func:`open_packet` succeeds.
    """
    if not looks_like_disco(data):
        raise NotDiscoError("not a disco packet (no magic or shorter than 62 bytes)")
    return DiscoPublicKey(bytes(data[len(MAGIC) : len(MAGIC) + KEY_LEN]))


def seal(
    message: Message, sender: DiscoPrivateKey, receiver: DiscoPublicKey, nonce: bytes | None = None
) -> bytes:
    """One disco packet carrying ``message`` from ``sender`` to ``receiver``.

    ``nonce`` (24 bytes) is random unless given; give it only for test vectors, never reuse one.
    """
    if nonce is None:
        nonce = nacl.utils.random(NONCE_LEN)
    elif len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes")
    plaintext = encode_message(message)
    try:
        box = _box(sender.raw, receiver.raw)
    except nacl.exceptions.CryptoError:
        raise ValueError(f"unusable receiver key {receiver.short()} (low order)") from None
    sealed = box.encrypt(plaintext, nonce)
    return MAGIC + _public_raw(sender) + bytes(sealed)  # sealed = nonce ‖ tag ‖ ciphertext


def open_packet(data: BytesLike, receiver: DiscoPrivateKey) -> tuple[DiscoPublicKey, Message]:
    """Authenticate and parse one disco packet addressed to ``receiver``.

    Returns the sender's disco key (now authenticated) and the message. Raises a
    :class:`DiscoError` subclass, and nothing else, for any input.
    """
    sender = peek_sender(data)
    raw = bytes(data)
    if len(raw) < HEADER_LEN + BOX_OVERHEAD:
        raise UnauthenticatedError("disco box shorter than its tag")
    try:  # a low-order sender key fails already in the key agreement
        plaintext = _box(receiver.raw, sender.raw).decrypt(
            raw[HEADER_LEN:], raw[HEADER_LEN - NONCE_LEN : HEADER_LEN]
        )
    except nacl.exceptions.CryptoError:
        raise UnauthenticatedError(f"disco box from {sender.short()} does not open") from None
    return sender, decode_message(plaintext)
