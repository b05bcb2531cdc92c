"""A sans-io STUN codec for Binding requests and responses, in Tailscale's flavour and RFC 5389's.

Everything here is pure: no sockets, no clocks, no tasks. Callers pass datagrams in and get bytes
(or addresses) out; the client transaction helper takes "now" values and returns deadlines.

Encoding goes through :mod:`aioice.stun` (``Message`` and its attribute packers, pinned in
``pyproject.toml`` because that module is undocumented). Decoding of untrusted datagrams does its
own strict header and attribute walk first, because ``aioice.stun.parse_message`` is lenient (it
does not check the magic cookie or attribute bounds) and raises assorted exception types; the
address and fingerprint helpers of aioice are then used on the validated pieces. Every decoding
failure is a :class:`StunParseError` (also a :class:`ValueError`); nothing else escapes.

What is on the wire (derp-protocol §7, RFC 5389):

* **Tailscale Binding Request** (:func:`tailscale_binding_request`): type ``0x0001``, cookie
  ``2112A442``, TxID, SOFTWARE (``0x8022``) = ``tailnode``, then FINGERPRINT (``0x8028``) =
  CRC-32 of the preceding bytes XOR ``0x5354554E``. 40 bytes.
* **Plain RFC 5389 Binding Request** (:func:`binding_request`): header only (20 bytes), or header
  plus FINGERPRINT (28 bytes).
* **Binding Success Response** (:func:`binding_response`), byte-exact with ``derper``: ``01 01``,
  attribute length, cookie, TxID, then exactly one XOR-MAPPED-ADDRESS (``0x0020``). 32 bytes for
  IPv4 (family 1; ``::ffff:a.b.c.d`` is unmapped first), 44 bytes for IPv6 (family 2). No SOFTWARE,
  no FINGERPRINT.

Client side, :func:`parse_binding_response` accepts XOR-MAPPED-ADDRESS, the mis-numbered
``0x8020`` that some servers send, and MAPPED-ADDRESS, in that order of preference.
:class:`BindingTransaction` schedules probes the way Tailscale's netcheck does (sends at 0, 100 and
200 ms, each with a fresh TxID, so a reply names the probe it answers and the RTT is unambiguous).

RFC 3489 messages (no magic cookie) are not STUN for this module.
"""

from __future__ import annotations

import ipaddress
import itertools
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from aioice import stun as _aioice_stun

__all__ = [
    "ATTR_FINGERPRINT",
    "ATTR_MAPPED_ADDRESS",
    "ATTR_SOFTWARE",
    "ATTR_XOR_MAPPED_ADDRESS",
    "ATTR_XOR_MAPPED_ADDRESS_OLD",
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "DEFAULT_STUN_PORT",
    "HEADER_LEN",
    "MAGIC_COOKIE",
    "NETCHECK_RETRANSMIT_SCHEDULE",
    "NETCHECK_STUN_TIMEOUT",
    "TAILSCALE_SOFTWARE",
    "TXID_LEN",
    "BindingRequest",
    "BindingResult",
    "BindingTransaction",
    "BytesLike",
    "FingerprintError",
    "IPAddress",
    "MalformedStunError",
    "NotStunError",
    "StunError",
    "StunParseError",
    "StunTimeoutError",
    "TransactionIdMismatchError",
    "UnexpectedMessageError",
    "binding_request",
    "binding_request_txid",
    "binding_response",
    "canonical_ip",
    "new_transaction_id",
    "parse_binding_request",
    "parse_binding_response",
    "retransmit_schedule",
    "tailscale_binding_request",
]

BytesLike: TypeAlias = bytes | bytearray | memoryview
"""What the parsers accept: a datagram as received, e.g. a slice of a ``recvfrom_into`` buffer."""

MAGIC_COOKIE: Final = 0x2112A442
HEADER_LEN: Final = 20
TXID_LEN: Final = 12
DEFAULT_STUN_PORT: Final = 3478

BINDING_REQUEST: Final = 0x0001
BINDING_SUCCESS: Final = 0x0101
_BINDING_ERROR: Final = 0x0111

ATTR_MAPPED_ADDRESS: Final = 0x0001
ATTR_XOR_MAPPED_ADDRESS: Final = 0x0020
ATTR_XOR_MAPPED_ADDRESS_OLD: Final = 0x8020
ATTR_SOFTWARE: Final = 0x8022
ATTR_FINGERPRINT: Final = 0x8028
_ATTR_ERROR_CODE: Final = 0x0009

TAILSCALE_SOFTWARE: Final = b"tailnode"

NETCHECK_RETRANSMIT_SCHEDULE: Final[tuple[float, ...]] = (0.0, 0.1, 0.2)
"""Send offsets, in seconds from the start, of netcheck's probes for one region and family."""
NETCHECK_STUN_TIMEOUT: Final = 3.0
"""Netcheck's STUN phase: with no answer after this many seconds, UDP is presumed blocked."""

_HEADER = struct.Struct("!HHI12s")
_ATTR_HEADER = struct.Struct("!HH")
_COOKIE_BYTES: Final = MAGIC_COOKIE.to_bytes(4, "big")

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


# -- errors ----------------------------------------------------------------------------------------


class StunError(Exception):
    """Base class of every error raised by :mod:`natlib.stun`."""


class StunParseError(StunError, ValueError):
    """A datagram could not be decoded as the STUN message the caller asked for.

    The parsers raise only subclasses of this; callers that merely classify datagrams catch it.
    """


class NotStunError(StunParseError):
    """The datagram fails RFC 5389's header checks (length, top bits, cookie, size), so is not STUN."""


class MalformedStunError(StunParseError):
    """The header looks like STUN but the attributes are truncated, overrun or invalid."""


class FingerprintError(MalformedStunError):
    """A FINGERPRINT attribute is present but wrong, or not the last attribute."""


class UnexpectedMessageError(StunParseError):
    """A well-formed STUN message of another type (e.g. a response where a request was expected)."""


class TransactionIdMismatchError(StunParseError):
    """A Binding response whose transaction ID is not the one the caller is waiting for."""


class StunTimeoutError(StunError, TimeoutError):
    """A :class:`BindingTransaction` got no usable response before its deadline."""


# -- helpers ---------------------------------------------------------------------------------------


def new_transaction_id() -> bytes:
    """A fresh random 12-byte transaction ID (from :mod:`secrets`)."""
    return secrets.token_bytes(TXID_LEN)


def _check_txid(txid: bytes | None) -> bytes:
    if txid is None:
        return new_transaction_id()
    txid = bytes(txid)
    if len(txid) != TXID_LEN:
        raise ValueError(f"a STUN transaction ID is {TXID_LEN} bytes, got {len(txid)}")
    return txid


def canonical_ip(host: str | IPAddress) -> IPAddress:
    """Parse ``host``; unmap ``::ffff:a.b.c.d`` to IPv4 and drop any IPv6 scope (``%eth0``).

    This is the address a Binding response reports. Raises :class:`ValueError` for a non-IP.
    """
    ip = ipaddress.ip_address(host) if isinstance(host, str) else host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return ipaddress.IPv6Address(ip.packed)
    return ip


# -- requests --------------------------------------------------------------------------------------


def _request_message(txid: bytes, software: bytes | None, fingerprint: bool) -> bytes:
    attributes: dict[str, object] = {}
    if software is not None:
        attributes["SOFTWARE"] = software.decode("utf-8")
    msg = _aioice_stun.Message(
        message_method=_aioice_stun.Method.BINDING,
        message_class=_aioice_stun.Class.REQUEST,
        transaction_id=txid,
        attributes=attributes,
    )
    if fingerprint:
        # message_fingerprint() exists in every pinned aioice; Message.add_fingerprint() only in 0.13.
        msg.attributes["FINGERPRINT"] = _aioice_stun.message_fingerprint(bytes(msg))
    return bytes(msg)


def tailscale_binding_request(txid: bytes | None = None) -> bytes:
    """A Binding Request as Tailscale clients send it: SOFTWARE ``tailnode`` plus FINGERPRINT.

    ``txid`` is 12 bytes; by default a random one is drawn. The result is 40 bytes.
    Raises :class:`ValueError` if ``txid`` has the wrong length.
    """
    return _request_message(_check_txid(txid), TAILSCALE_SOFTWARE, fingerprint=True)


def binding_request(txid: bytes | None = None, *, fingerprint: bool = False) -> bytes:
    """A plain RFC 5389 Binding Request: no attributes, or only FINGERPRINT (20 or 28 bytes)."""
    return _request_message(_check_txid(txid), None, fingerprint=fingerprint)


@dataclass(frozen=True, slots=True)
class BindingRequest:
    """A validated Binding Request, as returned by :func:`parse_binding_request`."""

    txid: bytes
    """The 12-byte transaction ID, to be echoed in the response."""
    software: bytes | None
    """The raw SOFTWARE value, if the request carried one."""
    has_fingerprint: bool
    """Whether the request ended with a (verified) FINGERPRINT."""

    @property
    def is_tailscale(self) -> bool:
        """True for Tailscale's flavour (SOFTWARE ``tailnode`` and FINGERPRINT): what derper answers."""
        return self.software == TAILSCALE_SOFTWARE and self.has_fingerprint


@dataclass(frozen=True, slots=True)
class _Attribute:
    type: int
    offset: int  # of the attribute header within the message
    value: bytes


def _parse_header(data: bytes) -> tuple[int, bytes]:
    """Apply RFC 5389's demultiplexing checks; return (message type, TxID)."""
    if len(data) < HEADER_LEN:
        raise NotStunError(f"{len(data)} bytes is shorter than a STUN header")
    msg_type, length, cookie, txid = _HEADER.unpack_from(data)
    if msg_type & 0xC000:
        raise NotStunError("the two top bits are set, so this is not STUN")
    if cookie != MAGIC_COOKIE:
        raise NotStunError(f"no STUN magic cookie (got {cookie:#010x})")
    if length % 4:
        raise NotStunError(f"STUN message length {length} is not a multiple of 4")
    if HEADER_LEN + length != len(data):
        raise NotStunError(f"STUN header says {length} body bytes, datagram has {len(data) - HEADER_LEN}")
    return msg_type, txid


def _walk_attributes(data: bytes) -> list[_Attribute]:
    """Split the body into attributes, checking bounds and the FINGERPRINT (must be last, must match)."""
    attrs: list[_Attribute] = []
    pos = HEADER_LEN
    end = len(data)
    while pos < end:
        if end - pos < _ATTR_HEADER.size:
            raise MalformedStunError(f"truncated attribute header at offset {pos}")
        attr_type, attr_len = _ATTR_HEADER.unpack_from(data, pos)
        value_start = pos + _ATTR_HEADER.size
        next_pos = value_start + ((attr_len + 3) & ~3)
        if next_pos > end:
            raise MalformedStunError(f"attribute {attr_type:#06x} at offset {pos} overruns the message")
        if attr_type == ATTR_FINGERPRINT:
            if attr_len != 4:
                raise FingerprintError(f"FINGERPRINT has length {attr_len}, not 4")
            if next_pos != end:
                raise FingerprintError("FINGERPRINT is not the last attribute")
            (got,) = struct.unpack_from("!I", data, value_start)
            if got != _aioice_stun.message_fingerprint(data[:pos]):
                raise FingerprintError("STUN FINGERPRINT does not match")
        attrs.append(_Attribute(attr_type, pos, data[value_start : value_start + attr_len]))
        pos = next_pos
    return attrs


def parse_binding_request(data: BytesLike) -> BindingRequest:
    """Validate ``data`` as an RFC 5389 Binding Request (either flavour) and return its fields.

    Checks: at least 20 bytes, top two bits zero, magic cookie, body length a multiple of 4 and
    equal to the datagram's, type ``0x0001``, attributes within bounds, FINGERPRINT (if any) last
    and correct. Other attributes (including MESSAGE-INTEGRITY) are ignored.

    Raises :class:`NotStunError`, :class:`UnexpectedMessageError`, :class:`MalformedStunError` or
    :class:`FingerprintError`, all :class:`StunParseError`; never anything else.
    """
    data = bytes(data)
    msg_type, txid = _parse_header(data)
    if msg_type != BINDING_REQUEST:
        raise UnexpectedMessageError(f"STUN message type {msg_type:#06x} is not a Binding Request")
    attrs = _walk_attributes(data)
    software = next((a.value for a in attrs if a.type == ATTR_SOFTWARE), None)
    has_fingerprint = bool(attrs) and attrs[-1].type == ATTR_FINGERPRINT
    return BindingRequest(txid=txid, software=software, has_fingerprint=has_fingerprint)


def binding_request_txid(data: BytesLike) -> bytes | None:
    """The TxID if ``data`` is a valid Binding Request (see :func:`parse_binding_request`), else None."""
    try:
        return parse_binding_request(data).txid
    except StunParseError:
        return None


# -- responses -------------------------------------------------------------------------------------


def binding_response(txid: bytes, addr: tuple[str | IPAddress, int]) -> bytes:
    """A Binding Success Response carrying ``addr`` in one XOR-MAPPED-ADDRESS, byte-exact with derper.

    ``addr`` is the requester's (host, port) as ``recvfrom`` reported it; a v4-mapped IPv6 host is
    sent as IPv4 (family 1) and an IPv6 scope is dropped. The result is 32 bytes for IPv4 and 44
    for IPv6. Raises :class:`ValueError` for a bad TxID, host or port.
    """
    txid = _check_txid(txid)
    host, port = addr
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    ip = canonical_ip(host)
    msg = _aioice_stun.Message(
        message_method=_aioice_stun.Method.BINDING,
        message_class=_aioice_stun.Class.RESPONSE,
        transaction_id=txid,
        attributes={"XOR-MAPPED-ADDRESS": (str(ip), port)},
    )
    return bytes(msg)


def _decode_address(attr: _Attribute, txid: bytes) -> tuple[str, int]:
    try:
        if attr.type == ATTR_MAPPED_ADDRESS:
            host, port = _aioice_stun.unpack_address(attr.value)
        else:
            host, port = _aioice_stun.unpack_xor_address(attr.value, txid)
    except (ValueError, struct.error) as e:
        raise MalformedStunError(f"bad address attribute {attr.type:#06x}: {e}") from None
    return str(canonical_ip(host)), int(port)


_ADDRESS_PREFERENCE: Final = (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_OLD, ATTR_MAPPED_ADDRESS)


def parse_binding_response(data: BytesLike, txid: bytes | None = None) -> tuple[str, int]:
    """Decode a Binding Success Response and return the mapped (ip, port) it reports.

    If ``txid`` is given the response must carry it (else :class:`TransactionIdMismatchError`).
    The address comes from XOR-MAPPED-ADDRESS, else ``0x8020``, else MAPPED-ADDRESS; a v4-mapped
    IPv6 address is returned as IPv4. An error response or any other message type raises
    :class:`UnexpectedMessageError`; every failure is a :class:`StunParseError`.
    """
    data = bytes(data)
    msg_type, got_txid = _parse_header(data)
    if msg_type not in (BINDING_SUCCESS, _BINDING_ERROR):
        raise UnexpectedMessageError(f"STUN message type {msg_type:#06x} is not a Binding response")
    if txid is not None and got_txid != txid:
        raise TransactionIdMismatchError(f"response is for transaction {got_txid.hex()}, not {txid.hex()}")
    attrs = _walk_attributes(data)
    if msg_type == _BINDING_ERROR:
        code = next((a.value for a in attrs if a.type == _ATTR_ERROR_CODE and len(a.value) >= 4), None)
        detail = f" {(code[2] & 7) * 100 + code[3]}" if code is not None else ""
        raise UnexpectedMessageError(f"STUN Binding error response{detail}")
    for wanted in _ADDRESS_PREFERENCE:
        for attr in attrs:
            if attr.type == wanted:
                return _decode_address(attr, got_txid)
    raise MalformedStunError("Binding response carries no mapped address")


# -- client transactions ---------------------------------------------------------------------------


def retransmit_schedule(
    start: float, offsets: Sequence[float] = NETCHECK_RETRANSMIT_SCHEDULE
) -> tuple[float, ...]:
    """Absolute send times for a probe set started at ``start``: ``start + offset`` for each offset.

    The default reproduces netcheck's full-report plan: three sends at 0, 100 and 200 ms.
    """
    if not offsets:
        raise ValueError("a schedule needs at least one send")
    if any(b < a for a, b in itertools.pairwise(offsets)) or offsets[0] < 0:
        raise ValueError("schedule offsets must be non-negative and non-decreasing")
    return tuple(start + o for o in offsets)


@dataclass(frozen=True, slots=True)
class BindingResult:
    """The outcome of a successful :class:`BindingTransaction`."""

    addr: tuple[str, int]
    """The mapped (ip, port) the server saw; IPv4 unmapped."""
    rtt: float
    """Seconds from sending the answered probe to receiving its response."""
    txid: bytes
    """The TxID of the probe that was answered."""


class BindingTransaction:
    """Sans-io driver for one netcheck-style STUN probe set to one server.

    Each scheduled send is a new Binding Request with its own TxID; the first valid response to
    any of them completes the transaction. The driver (a trio/anyio task owning the socket) loops::

        tx = BindingTransaction(now=clock())
        while tx.result is None:
            for datagram in tx.datagrams_to_send(clock()):   # raises StunTimeoutError when expired
                sock.sendto(datagram, server)
            with move_on_at(tx.next_deadline()):
                data = recv()
                tx.receive_datagram(data, clock())

    Times are plain floats in the caller's clock (e.g. ``trio.current_time()``).
    """

    def __init__(
        self,
        now: float,
        *,
        schedule: Sequence[float] = NETCHECK_RETRANSMIT_SCHEDULE,
        timeout: float = NETCHECK_STUN_TIMEOUT,
        tailscale: bool = True,
    ) -> None:
        self._send_times = retransmit_schedule(now, schedule)
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.deadline: float = now + timeout
        """After this time without a response, :meth:`datagrams_to_send` raises StunTimeoutError."""
        self._tailscale = tailscale
        self._next_send = 0
        self._sent: dict[bytes, float] = {}
        self._result: BindingResult | None = None

    @property
    def result(self) -> BindingResult | None:
        """The first valid response to any of our probes, once it has arrived."""
        return self._result

    @property
    def done(self) -> bool:
        """True once a result is in."""
        return self._result is not None

    @property
    def send_times(self) -> tuple[float, ...]:
        """The absolute times at which probes are (or were) due."""
        return self._send_times

    @property
    def sent(self) -> int:
        """How many probes have been handed out so far."""
        return self._next_send

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """The probes due at ``now`` that were not handed out yet (usually zero or one).

        Returns ``[]`` once a result is in. Raises :class:`StunTimeoutError` if ``now`` is at or
        past :attr:`deadline` without a result.
        """
        if self._result is not None:
            return []
        if now >= self.deadline:
            raise StunTimeoutError(f"no STUN response after {self._next_send} probe(s)")
        out: list[bytes] = []
        while self._next_send < len(self._send_times) and self._send_times[self._next_send] <= now:
            txid = new_transaction_id()
            self._sent[txid] = now
            out.append(tailscale_binding_request(txid) if self._tailscale else binding_request(txid))
            self._next_send += 1
        return out

    def next_deadline(self) -> float | None:
        """When to call :meth:`datagrams_to_send` next: the next send or the timeout; None when done."""
        if self._result is not None:
            return None
        if self._next_send < len(self._send_times):
            return min(self._send_times[self._next_send], self.deadline)
        return self.deadline

    def receive_datagram(self, data: BytesLike, now: float) -> BindingResult | None:
        """Feed a datagram received on the probing socket.

        Returns the result if ``data`` is a valid Binding Success Response to one of our probes
        (and records it in :attr:`result`); returns None for anything else (other transactions'
        responses, garbage, late duplicates after completion). Never raises.
        """
        if self._result is not None:
            return None
        try:
            _, txid = _parse_header(bytes(data))
            sent_at = self._sent.get(txid)
            if sent_at is None:
                return None
            addr = parse_binding_response(data, txid)
        except StunParseError:
            return None
        self._result = BindingResult(addr=addr, rtt=max(0.0, now - sent_at), txid=txid)
        return self._result
