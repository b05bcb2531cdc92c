"""A sans-io NAT-PMP codec (RFC 6886): requests out as bytes, responses in as bytes.

Wire format (all big-endian, UDP to the gateway's port 5351):

* external address request, 2 bytes: version 0, opcode 0;
  response, 12 bytes: version 0, opcode 128, result (16 bits), epoch (32), external IPv4 (32);
* map request, 12 bytes: version 0, opcode 1 (UDP) or 2 (TCP), 2 reserved bytes, internal port,
  suggested external port, requested lifetime in seconds (lifetime 0 deletes the mapping);
  response, 16 bytes: version 0, opcode 128 + op, result, epoch, internal port, mapped external
  port, granted lifetime.

An error response may be shorter than a success (a NAT-PMP server answering PCP's version 2 sends
8 bytes: header plus epoch), so the result code is read before the length of the body is checked.
:func:`parse_response` raises :class:`~natlib.portmap.PortMapParseError` and nothing else.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from ._errors import PortMapParseError

__all__ = [
    "NATPMP_PORT",
    "NATPMP_VERSION",
    "OP_EXTERNAL_ADDRESS",
    "OP_MAP_TCP",
    "OP_MAP_UDP",
    "ExternalAddressResponse",
    "MapResponse",
    "NatPmpResponse",
    "NatPmpResult",
    "encode_external_address_request",
    "encode_map_request",
    "parse_response",
]

NATPMP_PORT: Final = 5351
NATPMP_VERSION: Final = 0
OP_EXTERNAL_ADDRESS: Final = 0
OP_MAP_UDP: Final = 1
OP_MAP_TCP: Final = 2
_RESPONSE_BIT: Final = 0x80
MAX_LIFETIME: Final = 0xFFFFFFFF

_EXTERNAL_RESPONSE = struct.Struct("!BBHI4s")
_MAP_REQUEST = struct.Struct("!BBHHHI")
_MAP_RESPONSE = struct.Struct("!BBHIHHI")
_ERROR_HEAD = struct.Struct("!BBHI")


class NatPmpResult(enum.IntEnum):
    """Result codes of RFC 6886 §3.5."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


@dataclass(frozen=True, slots=True)
class ExternalAddressResponse:
    """The answer to :func:`encode_external_address_request`. ``external_ip`` is None on error."""

    result: int
    epoch: int
    external_ip: ipaddress.IPv4Address | None


@dataclass(frozen=True, slots=True)
class MapResponse:
    """The answer to :func:`encode_map_request`. Ports and lifetime are 0 on an error response."""

    protocol: Literal["udp", "tcp"]
    result: int
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


NatPmpResponse: TypeAlias = ExternalAddressResponse | MapResponse


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"{name} {port} is not a port number")


def encode_external_address_request() -> bytes:
    """The 2-byte "what is my external address" request: ``00 00``."""
    return bytes((NATPMP_VERSION, OP_EXTERNAL_ADDRESS))


def encode_map_request(
    internal_port: int,
    *,
    suggested_external_port: int = 0,
    lifetime: int = 7200,
    protocol: Literal["udp", "tcp"] = "udp",
) -> bytes:
    """A 12-byte map request; ``lifetime=0`` (with ``suggested_external_port=0``) deletes the mapping.

    Raises :class:`ValueError` for an out-of-range port or lifetime, or an internal port of 0
    (which would mean "all mappings" in a delete).
    """
    if internal_port == 0:
        raise ValueError("internal port 0 is not mappable")
    _check_port("internal port", internal_port)
    _check_port("suggested external port", suggested_external_port)
    if not 0 <= lifetime <= MAX_LIFETIME:
        raise ValueError(f"lifetime {lifetime} out of range")
    opcode = OP_MAP_UDP if protocol == "udp" else OP_MAP_TCP
    return _MAP_REQUEST.pack(NATPMP_VERSION, opcode, 0, internal_port, suggested_external_port, lifetime)


def parse_response(data: bytes | bytearray | memoryview) -> NatPmpResponse:
    """Decode a NAT-PMP response datagram.

    Raises :class:`PortMapParseError` if it is truncated, not version 0, a request rather than a
    response, or for an unknown opcode. An error result is *not* an exception here: it is returned
    in ``result`` for the caller to act on.
    """
    data = bytes(data)
    if len(data) < _ERROR_HEAD.size:
        raise PortMapParseError(f"NAT-PMP response of {len(data)} bytes is truncated")
    version, opcode, result, epoch = _ERROR_HEAD.unpack_from(data)
    if version != NATPMP_VERSION:
        raise PortMapParseError(f"NAT-PMP response has version {version}, not 0")
    if not opcode & _RESPONSE_BIT:
        raise PortMapParseError(f"NAT-PMP opcode {opcode} is a request, not a response")
    op = opcode & ~_RESPONSE_BIT
    if op == OP_EXTERNAL_ADDRESS:
        if result != NatPmpResult.SUCCESS:
            return ExternalAddressResponse(result=result, epoch=epoch, external_ip=None)
        if len(data) < _EXTERNAL_RESPONSE.size:
            raise PortMapParseError(f"NAT-PMP external address response of {len(data)} bytes is truncated")
        *_, packed = _EXTERNAL_RESPONSE.unpack_from(data)
        return ExternalAddressResponse(result=result, epoch=epoch, external_ip=ipaddress.IPv4Address(packed))
    if op in (OP_MAP_UDP, OP_MAP_TCP):
        protocol: Literal["udp", "tcp"] = "udp" if op == OP_MAP_UDP else "tcp"
        if len(data) < _MAP_RESPONSE.size:
            if result != NatPmpResult.SUCCESS:
                return MapResponse(protocol, result, epoch, 0, 0, 0)
            raise PortMapParseError(f"NAT-PMP map response of {len(data)} bytes is truncated")
        *_, internal, external, lifetime = _MAP_RESPONSE.unpack_from(data)
        return MapResponse(protocol, result, epoch, internal, external, lifetime)
    raise PortMapParseError(f"NAT-PMP response to unknown opcode {op}")
