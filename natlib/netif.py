"""Interface addresses and the default route, read from the Linux kernel over rtnetlink.

Two halves, as everywhere in natlib:

* **A sans-io rtnetlink codec.** :func:`dump_request` builds a ``RTM_GET*`` dump request;
  :func:`parse_messages` splits a received datagram into :class:`NetlinkMessage` values;
  :func:`decode_link`, :func:`decode_address` and :func:`decode_route` turn ``RTM_NEWLINK``,
  ``RTM_NEWADDR`` and ``RTM_NEWROUTE`` payloads into :class:`Link`, :class:`AddressEntry` and
  :class:`Route`; :func:`decode_error` reads an ``NLMSG_ERROR``; :class:`DumpReply` collects
  the reply to one dump (sequence matching, ``NLMSG_DONE``, kernel errors, interrupted dumps).
  Bytes in, values out; malformed input raises :class:`NetlinkParseError` (a
  :class:`ValueError`), or :class:`NetlinkError` from :class:`DumpReply`, and nothing else.
  :func:`select_addresses` joins links and addresses into the :class:`InterfaceAddress` list that
  natlib uses (skipping loopback, link-local unless asked, down links, and IPv6 addresses that are
  still tentative or failed duplicate address detection).
* **Blocking one-shot queries**: :func:`interface_addresses` and :func:`default_routes` open a
  ``NETLINK_ROUTE`` socket, dump links, addresses (and routes), and close it. The kernel answers a
  dump from memory, so these return in well under a millisecond and never touch the network; they
  are plain functions, safe to call from an async task. Each is bounded by :data:`DUMP_TIMEOUT`
  and retried :data:`DUMP_RETRIES` times when the kernel reports that the dump was interrupted
  by a concurrent change (``NLM_F_DUMP_INTR``). Failure is a :class:`NetlinkError` (also an
  :class:`OSError`), e.g. on a system without rtnetlink.

Example::

    from natlib import netif

    for a in netif.interface_addresses():
        print(a.interface, a.address, a.prefixlen)      # eth0 192.168.1.2 24
    print(netif.default_routes())                        # [Route(family=4, gateway='192.168.1.1', ...)]

Layouts follow ``<linux/netlink.h>``, ``<linux/rtnetlink.h>``, ``<linux/if_addr.h>`` and
``<linux/if_link.h>``; everything is host byte order except addresses.
"""

from __future__ import annotations

import errno as _errno
import ipaddress
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias, TypeVar

__all__ = [
    "DUMP_RETRIES",
    "DUMP_TIMEOUT",
    "IFF_LOOPBACK",
    "IFF_LOWER_UP",
    "IFF_RUNNING",
    "IFF_UP",
    "NLMSG_DONE",
    "NLMSG_ERROR",
    "RTM_DELADDR",
    "RTM_DELLINK",
    "RTM_DELROUTE",
    "RTM_GETADDR",
    "RTM_GETLINK",
    "RTM_GETROUTE",
    "RTM_NEWADDR",
    "RTM_NEWLINK",
    "RTM_NEWROUTE",
    "SCOPE_HOST",
    "SCOPE_LINK",
    "SCOPE_UNIVERSE",
    "AddressEntry",
    "DumpReply",
    "Family",
    "InterfaceAddress",
    "Link",
    "NetlinkError",
    "NetlinkMessage",
    "NetlinkParseError",
    "Route",
    "decode_address",
    "decode_error",
    "decode_link",
    "decode_route",
    "default_routes",
    "dump",
    "dump_addresses",
    "dump_links",
    "dump_request",
    "dump_routes",
    "interface_addresses",
    "is_link_local",
    "open_netlink_socket",
    "parse_attributes",
    "parse_messages",
    "select_addresses",
    "select_default_routes",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

Family: TypeAlias = Literal[4, 6]

# --- constants from the kernel headers -------------------------------------------------------------

NETLINK_ROUTE: Final = 0
NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4

NLM_F_REQUEST: Final = 0x01
NLM_F_MULTI: Final = 0x02
NLM_F_DUMP_INTR: Final = 0x10
NLM_F_DUMP: Final = 0x300  # NLM_F_ROOT | NLM_F_MATCH

RTM_NEWLINK: Final = 16
RTM_DELLINK: Final = 17
RTM_GETLINK: Final = 18
RTM_NEWADDR: Final = 20
RTM_DELADDR: Final = 21
RTM_GETADDR: Final = 22
RTM_NEWROUTE: Final = 24
RTM_DELROUTE: Final = 25
RTM_GETROUTE: Final = 26

IFF_UP: Final = 0x1
IFF_LOOPBACK: Final = 0x8
IFF_RUNNING: Final = 0x40
IFF_LOWER_UP: Final = 0x10000

IFLA_IFNAME: Final = 3
IFLA_MTU: Final = 4

IFA_ADDRESS: Final = 1
IFA_LOCAL: Final = 2
IFA_LABEL: Final = 3
IFA_FLAGS: Final = 8
IFA_F_DADFAILED: Final = 0x08
IFA_F_DEPRECATED: Final = 0x20
IFA_F_TENTATIVE: Final = 0x40

RTA_DST: Final = 1
RTA_OIF: Final = 4
RTA_GATEWAY: Final = 5
RTA_PRIORITY: Final = 6
RTA_PREFSRC: Final = 7
RTA_TABLE: Final = 15
RT_TABLE_MAIN: Final = 254
RTN_UNICAST: Final = 1

SCOPE_UNIVERSE: Final = 0
SCOPE_LINK: Final = 253
SCOPE_HOST: Final = 254

_NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTATTR: Final = struct.Struct("=HH")  # len, type
_IFINFOMSG: Final = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
_IFADDRMSG: Final = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG: Final = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type, flags
_RTGENMSG_LEN: Final = 16  # dump requests carry a zeroed ifinfomsg-sized header, which every family accepts
_NLA_TYPE_MASK: Final = 0x3FFF  # strips NLA_F_NESTED and NLA_F_NET_BYTEORDER

DUMP_TIMEOUT: Final = 2.0
"""Seconds a one-shot dump may take before :class:`NetlinkError` (the kernel answers in microseconds)."""
DUMP_RETRIES: Final = 3
"""Dumps interrupted by a concurrent change (``NLM_F_DUMP_INTR``) are retried this many times."""
_RECV_SIZE: Final = 1 << 16

_AF_TO_FAMILY: Final[dict[int, Family]] = {socket.AF_INET: 4, socket.AF_INET6: 6}
_FAMILY_TO_AF: Final[dict[int, int]] = {4: socket.AF_INET, 6: socket.AF_INET6}
_ADDR_LEN: Final[dict[int, int]] = {4: 4, 6: 16}


class NetlinkParseError(ValueError):
    """A netlink datagram or payload that does not follow the kernel's layout."""


class NetlinkError(OSError):
    """A netlink query failed: no rtnetlink here, the kernel returned an error, or the reply was bad."""


# --- messages --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetlinkMessage:
    """One netlink message: the ``nlmsghdr`` fields and the payload after the header."""

    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes


def _align4(n: int) -> int:
    return (n + 3) & ~3


def dump_request(msg_type: int, seq: int, family: int = socket.AF_UNSPEC) -> bytes:
    """A ``NLM_F_REQUEST | NLM_F_DUMP`` request of ``msg_type`` (``RTM_GETLINK``/``GETADDR``/``GETROUTE``).

    The payload is a zeroed 16-byte family header with ``family`` (an ``AF_*`` value) first, which
    the kernel reads as the ``rtgenmsg``/``ifaddrmsg``/``rtmsg`` it expects.
    """
    if msg_type not in (RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE):
        raise ValueError(f"not a dump request type: {msg_type}")
    payload = bytes([family]) + bytes(_RTGENMSG_LEN - 1)
    return (
        _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + payload
    )


def parse_messages(data: bytes) -> list[NetlinkMessage]:
    """Split one received datagram into its messages (the kernel packs several per datagram).

    Raises :class:`NetlinkParseError` when a header is cut short or a length field points outside
    the datagram; the trailing alignment padding of the last message may be missing.
    """
    data = bytes(data)
    out: list[NetlinkMessage] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _NLMSGHDR.size:
            raise NetlinkParseError(
                f"truncated netlink header at offset {offset} ({len(data) - offset} bytes)"
            )
        length, msg_type, flags, seq, pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise NetlinkParseError(
                f"bad netlink message length {length} at offset {offset} (datagram is {len(data)} bytes)"
            )
        out.append(NetlinkMessage(msg_type, flags, seq, pid, data[offset + _NLMSGHDR.size : offset + length]))
        offset += _align4(length)
    return out


def parse_attributes(data: bytes) -> dict[int, bytes]:
    """The ``rtattr`` list of a payload as {type: value}; nested/byte-order flag bits are stripped.

    A later duplicate replaces an earlier one. Raises :class:`NetlinkParseError` on a bad length.
    """
    attrs: dict[int, bytes] = {}
    offset = 0
    while offset + _RTATTR.size <= len(data):
        length, attr_type = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > len(data):
            raise NetlinkParseError(f"bad attribute length {length} at offset {offset}")
        attrs[attr_type & _NLA_TYPE_MASK] = data[offset + _RTATTR.size : offset + length]
        offset += _align4(length)
    return attrs


def decode_error(msg: NetlinkMessage) -> int:
    """The errno of an ``NLMSG_ERROR`` message (0 is an acknowledgement, not an error)."""
    if msg.type != NLMSG_ERROR:
        raise NetlinkParseError(f"not an NLMSG_ERROR message (type {msg.type})")
    if len(msg.payload) < 4:
        raise NetlinkParseError("truncated NLMSG_ERROR")
    (code,) = struct.unpack_from("=i", msg.payload)
    return -int(code)


def _attr_str(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


def _attr_u32(value: bytes, what: str) -> int:
    if len(value) < 4:
        raise NetlinkParseError(f"{what}: {len(value)} bytes, want 4")
    return int(struct.unpack_from("=I", value)[0])


def _attr_ip(value: bytes, family: Family, what: str) -> str:
    want = _ADDR_LEN[family]
    if len(value) != want:
        raise NetlinkParseError(f"{what}: {len(value)} bytes for an IPv{family} address")
    return str(ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value))


@dataclass(frozen=True, slots=True)
class Link:
    """A network interface (``RTM_NEWLINK``)."""

    index: int
    name: str
    flags: int
    """``IFF_*`` bits: :data:`IFF_UP` (administratively up), :data:`IFF_RUNNING`, :data:`IFF_LOOPBACK`..."""
    mtu: int | None = None

    @property
    def is_up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def is_loopback(self) -> bool:
        return bool(self.flags & IFF_LOOPBACK)


def decode_link(msg: NetlinkMessage) -> Link:
    """Decode an ``RTM_NEWLINK``/``RTM_DELLINK`` message."""
    if msg.type not in (RTM_NEWLINK, RTM_DELLINK):
        raise NetlinkParseError(f"not a link message (type {msg.type})")
    if len(msg.payload) < _IFINFOMSG.size:
        raise NetlinkParseError("truncated ifinfomsg")
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(msg.payload)
    attrs = parse_attributes(msg.payload[_IFINFOMSG.size :])
    name = _attr_str(attrs[IFLA_IFNAME]) if IFLA_IFNAME in attrs else f"if{index}"
    mtu = _attr_u32(attrs[IFLA_MTU], "IFLA_MTU") if IFLA_MTU in attrs else None
    return Link(index, name, flags, mtu)


@dataclass(frozen=True, slots=True)
class AddressEntry:
    """One address of one interface (``RTM_NEWADDR``), before it is joined with its :class:`Link`."""

    family: Family
    index: int
    address: str
    prefixlen: int
    scope: int
    flags: int
    """``IFA_F_*`` bits (the 32-bit ``IFA_FLAGS`` attribute when present)."""
    label: str | None = None


def decode_address(msg: NetlinkMessage) -> AddressEntry:
    """Decode an ``RTM_NEWADDR``/``RTM_DELADDR`` message.

    For IPv4 the interface's own address is ``IFA_LOCAL`` (``IFA_ADDRESS`` is the peer on a
    point-to-point link); IPv6 has only ``IFA_ADDRESS``. Families other than IPv4/IPv6 raise.
    """
    if msg.type not in (RTM_NEWADDR, RTM_DELADDR):
        raise NetlinkParseError(f"not an address message (type {msg.type})")
    if len(msg.payload) < _IFADDRMSG.size:
        raise NetlinkParseError("truncated ifaddrmsg")
    af, prefixlen, flags, scope, index = _IFADDRMSG.unpack_from(msg.payload)
    family = _AF_TO_FAMILY.get(af)
    if family is None:
        raise NetlinkParseError(f"address family {af} is not IPv4/IPv6")
    if prefixlen > 8 * _ADDR_LEN[family]:
        raise NetlinkParseError(f"prefix length {prefixlen} too long for IPv{family}")
    attrs = parse_attributes(msg.payload[_IFADDRMSG.size :])
    raw = attrs.get(IFA_LOCAL) if family == 4 and IFA_LOCAL in attrs else attrs.get(IFA_ADDRESS)
    if raw is None:
        raise NetlinkParseError("address message without an address")
    if IFA_FLAGS in attrs:
        flags = _attr_u32(attrs[IFA_FLAGS], "IFA_FLAGS")
    label = _attr_str(attrs[IFA_LABEL]) if IFA_LABEL in attrs else None
    return AddressEntry(family, index, _attr_ip(raw, family, "address"), prefixlen, scope, flags, label)


@dataclass(frozen=True, slots=True)
class Route:
    """A route (``RTM_NEWROUTE``); natlib only looks at unicast routes of the main table."""

    family: Family
    dst: str | None
    """Destination network address; None for a default route."""
    dst_len: int
    gateway: str | None
    oif: int | None
    """Output interface index."""
    prefsrc: str | None
    table: int
    priority: int
    type: int
    interface: str | None = None
    """The output interface's name, filled in by :func:`select_default_routes`."""

    @property
    def is_default(self) -> bool:
        return self.dst_len == 0


def decode_route(msg: NetlinkMessage) -> Route:
    """Decode an ``RTM_NEWROUTE``/``RTM_DELROUTE`` message (IPv4 or IPv6)."""
    if msg.type not in (RTM_NEWROUTE, RTM_DELROUTE):
        raise NetlinkParseError(f"not a route message (type {msg.type})")
    if len(msg.payload) < _RTMSG.size:
        raise NetlinkParseError("truncated rtmsg")
    af, dst_len, _src_len, _tos, table, _proto, _scope, rtype, _flags = _RTMSG.unpack_from(msg.payload)
    family = _AF_TO_FAMILY.get(af)
    if family is None:
        raise NetlinkParseError(f"route family {af} is not IPv4/IPv6")
    attrs = parse_attributes(msg.payload[_RTMSG.size :])
    if RTA_TABLE in attrs:
        table = _attr_u32(attrs[RTA_TABLE], "RTA_TABLE")
    return Route(
        family=family,
        dst=_attr_ip(attrs[RTA_DST], family, "RTA_DST") if RTA_DST in attrs else None,
        dst_len=dst_len,
        gateway=_attr_ip(attrs[RTA_GATEWAY], family, "RTA_GATEWAY") if RTA_GATEWAY in attrs else None,
        oif=_attr_u32(attrs[RTA_OIF], "RTA_OIF") if RTA_OIF in attrs else None,
        prefsrc=_attr_ip(attrs[RTA_PREFSRC], family, "RTA_PREFSRC") if RTA_PREFSRC in attrs else None,
        table=table,
        priority=_attr_u32(attrs[RTA_PRIORITY], "RTA_PRIORITY") if RTA_PRIORITY in attrs else 0,
        type=rtype,
    )


# --- selection -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InterfaceAddress:
    """A usable address of an interface, as natlib reports it.

    Equality and hashing use the interface name and index, the address and the prefix length only,
    so two snapshots compare equal when the same addresses sit on the same interfaces even if a
    flag bit moved (:mod:`natlib.netmon` relies on this).
    """

    interface: str
    index: int
    address: str
    prefixlen: int
    scope: int = field(compare=False)
    """``SCOPE_UNIVERSE`` (0) for global addresses, ``SCOPE_LINK`` (253), ``SCOPE_HOST`` (254)."""
    flags: int = field(compare=False)
    """The link's ``IFF_*`` bits."""
    address_flags: int = field(default=0, compare=False)
    """The address's ``IFA_F_*`` bits."""

    @property
    def family(self) -> Family:
        return 6 if ":" in self.address else 4

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.address)


def is_link_local(address: str) -> bool:
    """True for 169.254.0.0/16 and fe80::/10."""
    return ipaddress.ip_address(address).is_link_local


def select_addresses(
    links: Iterable[Link],
    addresses: Iterable[AddressEntry],
    *,
    include_loopback: bool = False,
    include_link_local: bool = False,
    include_down: bool = False,
) -> list[InterfaceAddress]:
    """Join addresses to their links and keep the usable ones, sorted by (interface index, family, address).

    Skipped: addresses of links that are not administratively up (unless ``include_down``), of
    loopback links or in a loopback range (unless ``include_loopback``), link-local addresses
    (unless ``include_link_local``), IPv6 addresses that are tentative or failed duplicate address
    detection (they cannot be bound yet, or ever), and addresses of unknown links.
    """
    by_index = {link.index: link for link in links}
    out: list[InterfaceAddress] = []
    for a in addresses:
        link = by_index.get(a.index)
        if link is None:
            continue
        ip = ipaddress.ip_address(a.address)
        if not include_down and not link.is_up:
            continue
        if not include_loopback and (link.is_loopback or ip.is_loopback or a.scope == SCOPE_HOST):
            continue
        if not include_link_local and (ip.is_link_local or a.scope == SCOPE_LINK):
            continue
        if a.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
            continue
        out.append(
            InterfaceAddress(link.name, link.index, a.address, a.prefixlen, a.scope, link.flags, a.flags)
        )
    out.sort(key=lambda x: (x.index, x.family, x.ip.packed))
    return list(dict.fromkeys(out))  # the same address twice on one link is one address


def select_default_routes(links: Iterable[Link], routes: Iterable[Route]) -> list[Route]:
    """The unicast default routes of the main table, best (lowest metric) first per family, v4 first.

    Routes through links that are down are dropped; the interface name is filled in.
    """
    by_index = {link.index: link for link in links}
    out: list[Route] = []
    for r in routes:
        if not r.is_default or r.table != RT_TABLE_MAIN or r.type != RTN_UNICAST:
            continue
        link = by_index.get(r.oif) if r.oif is not None else None
        if link is not None and not link.is_up:
            continue
        out.append(
            Route(
                r.family, r.dst, r.dst_len, r.gateway, r.oif, r.prefsrc, r.table, r.priority, r.type,
                link.name if link else None,
            )
        )  # fmt: skip
    out.sort(key=lambda r: (r.family, r.priority))
    return out


# --- blocking queries ------------------------------------------------------------------------------

_seq_counter = itertools.count(1)


def open_netlink_socket(groups: int = 0) -> socket.socket:
    """A ``NETLINK_ROUTE`` socket bound to the kernel-assigned port id, subscribed to ``groups``.

    Raises :class:`NetlinkError` where rtnetlink does not exist.
    """
    af = getattr(socket, "AF_NETLINK", None)
    if af is None:
        raise NetlinkError(_errno.EAFNOSUPPORT, "rtnetlink is not available on this system")
    try:
        sock = socket.socket(af, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    except OSError as e:
        raise NetlinkError(e.errno, f"cannot open a netlink socket: {e.strerror}") from e
    try:
        sock.bind((0, groups))
    except OSError as e:
        sock.close()
        raise NetlinkError(e.errno, f"cannot bind a netlink socket: {e.strerror}") from e
    return sock


class DumpReply:
    """Sans-io collector of one dump's reply: feed datagrams until :attr:`done`.

    Messages with another sequence number (notifications on a subscribed socket, late replies to
    an earlier request) are ignored. A kernel error raises :class:`NetlinkError` with its errno; a
    malformed datagram raises :class:`NetlinkError` (``EBADMSG``). :attr:`interrupted` tells that
    the kernel flagged the dump as inconsistent (``NLM_F_DUMP_INTR``): the caller should retry.
    """

    def __init__(self, msg_type: int, seq: int) -> None:
        self.msg_type = msg_type
        self.seq = seq
        self.messages: list[NetlinkMessage] = []
        self.done = False
        self.interrupted = False

    def feed(self, data: bytes) -> bool:
        """Take one received datagram; returns :attr:`done`."""
        try:
            messages = parse_messages(data)
        except NetlinkParseError as e:
            raise NetlinkError(_errno.EBADMSG, f"malformed netlink reply: {e}") from e
        for m in messages:
            if self.done or m.seq != self.seq:
                continue
            if m.flags & NLM_F_DUMP_INTR:
                self.interrupted = True
            if m.type == NLMSG_DONE:
                self.done = True
            elif m.type == NLMSG_ERROR:
                try:
                    code = decode_error(m)
                except NetlinkParseError as e:
                    raise NetlinkError(_errno.EBADMSG, f"malformed netlink reply: {e}") from e
                if code:
                    raise NetlinkError(code, f"netlink dump {self.msg_type} failed: {os.strerror(code)}")
            elif m.type not in (NLMSG_NOOP, NLMSG_OVERRUN):
                self.messages.append(m)
        return self.done


def dump(sock: socket.socket, msg_type: int, family: int = socket.AF_UNSPEC) -> list[NetlinkMessage]:
    """Run one dump on a blocking netlink socket and return its messages (without the ``NLMSG_DONE``).

    Raises :class:`NetlinkError` on a kernel error, a malformed reply, a timeout
    (:data:`DUMP_TIMEOUT`), a socket error, or after :data:`DUMP_RETRIES` interrupted dumps.
    """
    for _attempt in range(DUMP_RETRIES + 1):
        reply = DumpReply(msg_type, next(_seq_counter) & 0xFFFFFFFF)
        try:
            sock.settimeout(DUMP_TIMEOUT)
            sock.sendto(dump_request(msg_type, reply.seq, family), (0, 0))
            while not reply.feed(sock.recv(_RECV_SIZE)):
                pass
        except TimeoutError as e:
            raise NetlinkError(_errno.ETIMEDOUT, f"netlink dump {msg_type} timed out") from e
        except NetlinkError:
            raise
        except OSError as e:
            raise NetlinkError(e.errno, f"netlink dump {msg_type}: {e.strerror}") from e
        if not reply.interrupted:
            return reply.messages
        log.debug("netlink dump %d interrupted by a concurrent change; retrying", msg_type)
    raise NetlinkError(_errno.EINTR, f"netlink dump {msg_type} kept being interrupted")


def dump_links(sock: socket.socket) -> list[Link]:
    """All links; undecodable entries are skipped (and logged at debug level)."""
    return _decode_each(dump(sock, RTM_GETLINK), decode_link)


def dump_addresses(sock: socket.socket, family: Family | None = None) -> list[AddressEntry]:
    """All IPv4/IPv6 addresses (of one family when given); undecodable entries are skipped."""
    af = _FAMILY_TO_AF[family] if family else socket.AF_UNSPEC
    return [
        a
        for a in _decode_each(dump(sock, RTM_GETADDR, af), decode_address)
        if family is None or a.family == family
    ]


def dump_routes(sock: socket.socket, family: Family | None = None) -> list[Route]:
    """All IPv4/IPv6 routes of every table (of one family when given); undecodable entries are skipped."""
    af = _FAMILY_TO_AF[family] if family else socket.AF_UNSPEC
    return [
        r
        for r in _decode_each(dump(sock, RTM_GETROUTE, af), decode_route)
        if family is None or r.family == family
    ]


def _decode_each(messages: Sequence[NetlinkMessage], decode: Callable[[NetlinkMessage], _T]) -> list[_T]:
    out: list[_T] = []
    for m in messages:
        try:
            out.append(decode(m))
        except NetlinkParseError as e:
            log.debug("skipping a netlink message of type %d: %s", m.type, e)
    return out


def interface_addresses(
    *,
    family: Family | None = None,
    include_loopback: bool = False,
    include_link_local: bool = False,
    include_down: bool = False,
) -> list[InterfaceAddress]:
    """The usable addresses of this network namespace's interfaces (see :func:`select_addresses`).

    Blocking but local and bounded (:data:`DUMP_TIMEOUT`); raises :class:`NetlinkError`.
    """
    with open_netlink_socket() as sock:
        links = dump_links(sock)
        addrs = dump_addresses(sock, family)
    return select_addresses(
        links,
        addrs,
        include_loopback=include_loopback,
        include_link_local=include_link_local,
        include_down=include_down,
    )


def default_routes(family: Family | None = None) -> list[Route]:
    """The main table's default routes (see :func:`select_default_routes`); raises :class:`NetlinkError`."""
    with open_netlink_socket() as sock:
        links = dump_links(sock)
        routes = dump_routes(sock, family)
    return select_default_routes(links, routes)
