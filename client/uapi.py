"""A sans-io codec for WireGuard's cross-platform userspace API (UAPI), as wireguard-go speaks it.

Nothing here does I/O. :func:`encode_set` and :func:`encode_get` turn typed requests into the exact
bytes to write to the UAPI socket; a :class:`ReplyReader` takes the bytes that come back, in chunks
of any size, and returns the typed result once the reply is complete. The driver that moves these
bytes over ``/var/run/wireguard/<ifname>.sock`` lives in :mod:`client.engine`.

The protocol (wireguard.com/xplatform, checked against wireguard-go 0.0.20220316):

* A request is ``get=1\\n\\n``, or ``set=1\\n`` followed by ``key=value`` lines and a blank line.
  Device keys (``private_key``, ``listen_port``, ``fwmark``, ``replace_peers``) come first, then one
  block per peer starting with ``public_key``.
* The reply to ``set`` is ``errno=N\\n\\n``; the reply to ``get`` is the device's ``key=value`` lines
  followed by ``errno=N\\n\\n``. Any non-zero ``N`` is a failure; wireguard-go sends negative values
  (``-22`` for EINVAL), so they are compared by absolute value and raised as :class:`UapiErrnoError`.
* Keys are 64 lowercase hex digits (not base64 as in ``wg``'s config files). This module converts
  them to and from natlib's :class:`~natlib.keys.NodePublicKey` / :class:`~natlib.keys.NodePrivateKey`.
* ``allowed_ip=-prefix`` (remove one prefix) only exists since wireguard-go 0.0.20250522, so it is
  not offered: replace the whole list with ``replace_allowed_ips`` instead.

Use one operation per connection: after an error in the middle of a ``set`` wireguard-go leaves the
rest of the request unread, so the connection is in an unknown state.

Unknown keys in a ``get`` reply are ignored (newer wireguard-go versions may add some); malformed
values, a missing ``errno`` and oversized replies raise :class:`UapiProtocolError`.
"""

from __future__ import annotations

import errno as _errno
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

from natlib.keys import KeyFormatError, NodePrivateKey, NodePublicKey

from ._endpoint import Endpoint, EndpointFormatError

__all__ = [
    "GET_REQUEST",
    "MAX_KEEPALIVE_INTERVAL",
    "MAX_REPLY_BYTES",
    "NEED_DATA",
    "DeviceStats",
    "Endpoint",
    "EndpointFormatError",
    "NeedData",
    "PeerConfig",
    "PeerStats",
    "ReplyReader",
    "SetAccepted",
    "SetRequest",
    "UapiErrnoError",
    "UapiError",
    "UapiProtocolError",
    "encode_get",
    "encode_set",
    "parse_get_reply",
]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

GET_REQUEST: Final = b"get=1\n\n"
#: A get reply is about 300 bytes per peer plus 30 per allowed IP: 4 MiB is thousands of peers.
MAX_REPLY_BYTES: Final = 4 << 20
MAX_KEEPALIVE_INTERVAL: Final = 0xFFFF
_U64_MAX: Final = (1 << 64) - 1


class UapiError(Exception):
    """A UAPI operation failed."""


class UapiErrnoError(UapiError):
    """The engine answered ``errno=N`` with N ≠ 0. ``errno`` is the positive value."""

    def __init__(self, operation: str, value: int) -> None:
        self.errno = abs(value)
        self.raw_value = value
        self.name = _errno.errorcode.get(self.errno, "E?")
        super().__init__(f"UAPI {operation} failed: errno={value} ({self.name}: {os.strerror(self.errno)})")


class UapiProtocolError(UapiError):
    """The reply is not valid UAPI (truncated, oversized, or a malformed value)."""


# --- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One peer block of a ``set`` request. ``None`` leaves a setting unchanged.

    ``remove`` deletes the peer (nothing else is sent for it). ``update_only`` changes a peer only if
    it exists already. ``replace_allowed_ips`` clears the peer's allowed IPs before adding
    ``allowed_ips``; without it they are added to the existing ones.
    """

    public_key: NodePublicKey
    endpoint: Endpoint | None = None
    persistent_keepalive_interval: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: tuple[IPNetwork, ...] = ()
    remove: bool = False
    update_only: bool = False

    def __post_init__(self) -> None:
        if self.persistent_keepalive_interval is not None and not (
            0 <= self.persistent_keepalive_interval <= MAX_KEEPALIVE_INTERVAL
        ):
            raise ValueError(
                f"persistent_keepalive_interval {self.persistent_keepalive_interval} "
                f"is not in 0-{MAX_KEEPALIVE_INTERVAL}"
            )


@dataclass(frozen=True, slots=True)
class SetRequest:
    """A ``set=1`` request: device settings, then peer blocks in order."""

    private_key: NodePrivateKey | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False
    peers: tuple[PeerConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.listen_port is not None and not 0 <= self.listen_port <= 0xFFFF:
            raise ValueError(f"listen_port {self.listen_port} is not in 0-65535")
        if self.fwmark is not None and not 0 <= self.fwmark <= 0xFFFFFFFF:
            raise ValueError(f"fwmark {self.fwmark} is not a 32-bit value")


def _set_lines(request: SetRequest) -> Iterator[str]:
    yield "set=1"
    if request.private_key is not None:
        yield f"private_key={request.private_key.hex()}"
    if request.listen_port is not None:
        yield f"listen_port={request.listen_port}"
    if request.fwmark is not None:
        yield f"fwmark={request.fwmark}"
    if request.replace_peers:
        yield "replace_peers=true"
    for peer in request.peers:
        yield f"public_key={peer.public_key.hex()}"
        if peer.remove:
            yield "remove=true"
            continue
        if peer.update_only:
            yield "update_only=true"
        if peer.endpoint is not None:
            yield f"endpoint={peer.endpoint.text()}"
        if peer.persistent_keepalive_interval is not None:
            yield f"persistent_keepalive_interval={peer.persistent_keepalive_interval}"
        if peer.replace_allowed_ips:
            yield "replace_allowed_ips=true"
        for prefix in peer.allowed_ips:
            yield f"allowed_ip={prefix}"


def encode_set(request: SetRequest) -> bytes:
    """The exact bytes of a ``set=1`` request, blank line included."""
    return "".join(f"{line}\n" for line in _set_lines(request)).encode("ascii") + b"\n"


def encode_get() -> bytes:
    """The exact bytes of a ``get=1`` request."""
    return GET_REQUEST


# --- replies --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerStats:
    """One peer as the engine reports it. ``last_handshake_time_sec == 0`` means never."""

    public_key: NodePublicKey
    endpoint: Endpoint | None = None
    last_handshake_time_sec: int = 0
    last_handshake_time_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive_interval: int = 0
    allowed_ips: tuple[IPNetwork, ...] = ()
    protocol_version: int = 1

    @property
    def last_handshake(self) -> float | None:
        """The last handshake as a Unix timestamp, or None if there was none."""
        if self.last_handshake_time_sec == 0 and self.last_handshake_time_nsec == 0:
            return None
        return self.last_handshake_time_sec + self.last_handshake_time_nsec / 1e9


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """The reply to ``get=1``. ``private_key`` is None when the device has none yet."""

    private_key: NodePrivateKey | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: tuple[PeerStats, ...] = field(default=())

    @property
    def public_key(self) -> NodePublicKey | None:
        return None if self.private_key is None else self.private_key.public

    def peer(self, key: NodePublicKey) -> PeerStats:
        """The peer with ``key``; KeyError if the device has no such peer."""
        for p in self.peers:
            if p.public_key == key:
                return p
        raise KeyError(key)


@dataclass(frozen=True, slots=True)
class SetAccepted:
    """The engine applied a ``set`` request (``errno=0``)."""


class NeedData:
    """:meth:`ReplyReader.next_event` needs more bytes (the singleton :data:`NEED_DATA`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class ReplyReader:
    """Reads the reply to one UAPI request.

    Feed it with :meth:`receive_data` (``b""`` at end of stream) and call :meth:`next_event`: it
    returns :data:`NEED_DATA` until the reply's terminating blank line has arrived, then the result
    (:class:`DeviceStats` for ``get``, :class:`SetAccepted` for ``set``), or raises
    :class:`UapiErrnoError` / :class:`UapiProtocolError`. Bytes after the reply are ignored.
    """

    def __init__(self, operation: Literal["get", "set"], *, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self.operation = operation
        self._max = max_reply_bytes
        self._buf = bytearray()
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise RuntimeError("receive_data after end of stream")
        if not data:
            self._eof = True
            return
        if len(self._buf) <= self._max:  # past the limit next_event fails; stop growing the buffer
            self._buf += data

    def next_event(self) -> NeedData | DeviceStats | SetAccepted:
        end = self._reply_end()
        if end < 0:
            if len(self._buf) > self._max:
                raise UapiProtocolError(f"UAPI {self.operation} reply longer than {self._max} bytes")
            if self._eof:
                raise UapiProtocolError(
                    f"UAPI {self.operation}: connection closed after {len(self._buf)} bytes, mid-reply"
                )
            return NEED_DATA
        body = bytes(self._buf[:end])
        if self.operation == "get":
            return parse_get_reply(body)
        _check_errno(self.operation, _lines(body))
        return SetAccepted()

    def _reply_end(self) -> int:
        """Offset just past the reply's last line (before the blank line), or -1 if incomplete."""
        if self._buf.startswith(b"\n"):
            return 0  # an empty reply: rejected below as missing errno
        i = self._buf.find(b"\n\n")
        return -1 if i < 0 else i + 1


def _lines(body: bytes) -> list[tuple[str, str]]:
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise UapiProtocolError("UAPI reply is not ASCII") from None
    pairs = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiProtocolError(f"UAPI reply line without '=': {line[:80]!r}")
        pairs.append((key, value))
    return pairs


def _check_errno(operation: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Raise for a missing or non-zero trailing ``errno``; return the lines before it."""
    if not pairs or pairs[-1][0] != "errno":
        raise UapiProtocolError(f"UAPI {operation} reply does not end with errno=N")
    value = _int(pairs[-1][1], "errno", signed=True)
    if value != 0:
        raise UapiErrnoError(operation, value)
    return pairs[:-1]


def _int(text: str, key: str, *, signed: bool = False, limit: int = _U64_MAX) -> int:
    digits = text[1:] if signed and text.startswith("-") else text
    if not digits.isdigit() or not digits.isascii() or len(digits) > 20:
        raise UapiProtocolError(f"UAPI reply: {key}={text[:40]!r} is not a number")
    value = int(text)
    if abs(value) > limit:
        raise UapiProtocolError(f"UAPI reply: {key}={text} is out of range")
    return value


_PEER_COUNTERS: Final[dict[str, int]] = {
    "last_handshake_time_sec": _U64_MAX,
    "last_handshake_time_nsec": 999_999_999,
    "rx_bytes": _U64_MAX,
    "tx_bytes": _U64_MAX,
    "persistent_keepalive_interval": MAX_KEEPALIVE_INTERVAL,
    "protocol_version": 0xFFFF,
}


class _PeerBuilder:
    def __init__(self, public_key: NodePublicKey) -> None:
        self.public_key = public_key
        self.endpoint: Endpoint | None = None
        self.numbers: dict[str, int] = {"protocol_version": 1}
        self.allowed_ips: list[IPNetwork] = []

    def build(self) -> PeerStats:
        n = self.numbers
        return PeerStats(
            public_key=self.public_key,
            endpoint=self.endpoint,
            last_handshake_time_sec=n.get("last_handshake_time_sec", 0),
            last_handshake_time_nsec=n.get("last_handshake_time_nsec", 0),
            rx_bytes=n.get("rx_bytes", 0),
            tx_bytes=n.get("tx_bytes", 0),
            persistent_keepalive_interval=n.get("persistent_keepalive_interval", 0),
            allowed_ips=tuple(self.allowed_ips),
            protocol_version=n["protocol_version"],
        )


def parse_get_reply(body: bytes) -> DeviceStats:
    """Parse a complete ``get`` reply (its lines up to and including ``errno=N``)."""
    pairs = _check_errno("get", _lines(body))
    private_key: NodePrivateKey | None = None
    listen_port = fwmark = 0
    peers: list[_PeerBuilder] = []
    for key, value in pairs:
        if key == "public_key":
            peers.append(_PeerBuilder(_public_key(value)))
        elif not peers:  # device section
            if key == "private_key":
                private_key = _private_key(value)
            elif key == "listen_port":
                listen_port = _int(value, key, limit=0xFFFF)
            elif key == "fwmark":
                fwmark = _int(value, key, limit=0xFFFFFFFF)
        elif key == "endpoint":
            try:
                peers[-1].endpoint = Endpoint.parse(value)
            except EndpointFormatError as e:
                raise UapiProtocolError(f"UAPI reply: endpoint: {e}") from None
        elif key == "allowed_ip":
            try:
                peers[-1].allowed_ips.append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                raise UapiProtocolError(f"UAPI reply: allowed_ip={value[:60]!r} is not a prefix") from None
        elif key in _PEER_COUNTERS:
            peers[-1].numbers[key] = _int(value, key, limit=_PEER_COUNTERS[key])
        # preshared_key and unknown keys are skipped: not needed, and newer engines may add keys.
    return DeviceStats(private_key, listen_port, fwmark, tuple(p.build() for p in peers))


def _public_key(text: str) -> NodePublicKey:
    try:
        return NodePublicKey.from_hex(text)
    except KeyFormatError:
        raise UapiProtocolError(f"UAPI reply: public_key={text[:70]!r} is not 64 hex digits") from None


def _private_key(text: str) -> NodePrivateKey:
    try:
        return NodePrivateKey.from_hex(text)
    except KeyFormatError:
        raise UapiProtocolError("UAPI reply: private_key is not 64 hex digits") from None
