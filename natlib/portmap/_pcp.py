"""A sans-io PCP codec (RFC 6887): ANNOUNCE and MAP requests out, responses in.

Wire format (big-endian, UDP to the gateway's port 5351, the same port as NAT-PMP):

* common request header, 24 bytes: version 2, R=0 + opcode, 2 reserved bytes, requested lifetime
  (32 bits), the client's IP address as 16 bytes (IPv4 as ``::ffff:a.b.c.d``);
* common response header, 24 bytes: version 2, R=1 + opcode, reserved byte, result code, granted
  lifetime, epoch (seconds since the server's state began), 12 reserved bytes;
* MAP opcode data, 36 bytes in both directions: 96-bit nonce, protocol (17 = UDP), 3 reserved
  bytes, internal port, (suggested / assigned) external port, (suggested / assigned) external IP
  as 16 bytes.

ANNOUNCE (opcode 0) has no opcode data and lifetime 0: the probe uses it to learn whether a PCP
server is there. Results that matter to a client: 0 success, 2 NOT_AUTHORIZED (present but
disabled), 8 NO_RESOURCES, 12 ADDRESS_MISMATCH (the source address the server saw differs from
the one in the header: another NAT sits between us and it, "double NAT").

:func:`parse_response` raises :class:`~natlib.portmap.PortMapParseError` and nothing else. A MAP
response whose nonce is not ours is refused by :func:`parse_map_response` (RFC 6887 §11.4 says
to ignore it), which is stricter than Tailscale.
"""

from __future__ import annotations

import enum
import ipaddress
import secrets
import struct
from dataclasses import dataclass
from typing import Final

from ._errors import PortMapParseError

__all__ = [
    "MAX_PCP_MESSAGE",
    "NONCE_LEN",
    "OP_ANNOUNCE",
    "OP_MAP",
    "PCP_PORT",
    "PCP_VERSION",
    "PcpMapData",
    "PcpNonceMismatchError",
    "PcpResponse",
    "PcpResult",
    "encode_announce_request",
    "encode_map_request",
    "new_nonce",
    "parse_map_response",
    "parse_response",
]

PCP_PORT: Final = 5351
PCP_VERSION: Final = 2
OP_ANNOUNCE: Final = 0
OP_MAP: Final = 1
NONCE_LEN: Final = 12
IPPROTO_UDP: Final = 17
MAX_PCP_MESSAGE: Final = 1100
"""RFC 6887 §7: a PCP message is at most 1100 bytes; longer datagrams are not PCP."""
_RESPONSE_BIT: Final = 0x80
_HEADER_LEN: Final = 24
_MAP_LEN: Final = 36

_REQUEST_HEADER = struct.Struct("!BBHI16s")
_RESPONSE_HEADER = struct.Struct("!BBBBII12x")
_MAP_DATA = struct.Struct("!12sB3xHH16s")


class PcpResult(enum.IntEnum):
    """Result codes of RFC 6887 §7.4."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


class PcpNonceMismatchError(PortMapParseError):
    """A MAP response carries another request's nonce (stale, spoofed or for another client)."""


@dataclass(frozen=True, slots=True)
class PcpMapData:
    """The MAP-specific part of a response."""

    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    """IPv4 when the server sent a v4-mapped address (the usual case for a NAT44)."""


@dataclass(frozen=True, slots=True)
class PcpResponse:
    """A decoded PCP response. ``map`` is set for a MAP response long enough to carry its data."""

    opcode: int
    result: int
    lifetime: int
    epoch: int
    map: PcpMapData | None


def new_nonce() -> bytes:
    """A fresh random 96-bit MAP nonce (from :mod:`secrets`)."""
    return secrets.token_bytes(NONCE_LEN)


def _address16(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv4Address):
        return b"\0" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def _unmap(packed: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    v6 = ipaddress.IPv6Address(packed)
    return v6.ipv4_mapped or v6


def encode_announce_request(client_ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The 24-byte ANNOUNCE request (lifetime 0) from ``client_ip``."""
    return _REQUEST_HEADER.pack(PCP_VERSION, OP_ANNOUNCE, 0, 0, _address16(client_ip))


def encode_map_request(
    client_ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
    nonce: bytes,
    internal_port: int,
    *,
    suggested_external_port: int = 0,
    suggested_external_ip: str | ipaddress.IPv4Address | None = None,
    lifetime: int = 7200,
    protocol: int = IPPROTO_UDP,
) -> bytes:
    """A 60-byte MAP request. ``lifetime=0`` deletes the mapping named by nonce, protocol and port.

    ``suggested_external_ip`` None means "any" (``::ffff:0.0.0.0``). Raises :class:`ValueError`
    for a bad nonce length, port, lifetime or address.
    """
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"a PCP nonce is {NONCE_LEN} bytes, got {len(nonce)}")
    if not 1 <= internal_port <= 0xFFFF:
        raise ValueError(f"internal port {internal_port} is not mappable")
    if not 0 <= suggested_external_port <= 0xFFFF:
        raise ValueError(f"suggested external port {suggested_external_port} is not a port number")
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError(f"lifetime {lifetime} out of range")
    header = _REQUEST_HEADER.pack(PCP_VERSION, OP_MAP, 0, lifetime, _address16(client_ip))
    ext = _address16(suggested_external_ip if suggested_external_ip is not None else "0.0.0.0")
    body = _MAP_DATA.pack(bytes(nonce), protocol, internal_port, suggested_external_port, ext)
    return header + body


def parse_response(data: bytes | bytearray | memoryview) -> PcpResponse:
    """Decode a PCP response (any opcode; MAP data decoded when present and well-formed).

    Raises :class:`PortMapParseError` if the datagram is shorter than the header, longer than 1100
    bytes, not a multiple of 4, not version 2, a request (R bit clear), or a successful MAP
    response without its 36 bytes of data.
    """
    data = bytes(data)
    if len(data) < _HEADER_LEN:
        raise PortMapParseError(f"PCP response of {len(data)} bytes is truncated")
    if len(data) > MAX_PCP_MESSAGE or len(data) % 4:
        raise PortMapParseError(f"a PCP message of {len(data)} bytes is invalid (max 1100, multiple of 4)")
    version, r_opcode, _reserved, result, lifetime, epoch = _RESPONSE_HEADER.unpack_from(data)
    if version != PCP_VERSION:
        raise PortMapParseError(f"PCP response has version {version}, not 2")
    if not r_opcode & _RESPONSE_BIT:
        raise PortMapParseError("PCP message is a request (R bit clear), not a response")
    opcode = r_opcode & ~_RESPONSE_BIT
    map_data = None
    if opcode == OP_MAP:
        if len(data) >= _HEADER_LEN + _MAP_LEN:
            nonce, proto, internal, external, ext_ip = _MAP_DATA.unpack_from(data, _HEADER_LEN)
            map_data = PcpMapData(nonce, proto, internal, external, _unmap(ext_ip))
        elif result == PcpResult.SUCCESS:
            raise PortMapParseError("successful PCP MAP response without its opcode data")
    return PcpResponse(opcode=opcode, result=result, lifetime=lifetime, epoch=epoch, map=map_data)


def parse_map_response(data: bytes | bytearray | memoryview, nonce: bytes) -> PcpResponse:
    """Decode a response to the MAP request that used ``nonce``.

    Besides :func:`parse_response`'s checks: the opcode must be MAP, and when the response carries
    MAP data its nonce must be ``nonce`` (else :class:`PcpNonceMismatchError`).
    """
    response = parse_response(data)
    if response.opcode != OP_MAP:
        raise PortMapParseError(f"PCP response to opcode {response.opcode}, not MAP")
    if response.map is not None and response.map.nonce != nonce:
        raise PcpNonceMismatchError("PCP MAP response carries another request's nonce")
    return response
