"""The relay's UDP STUN server (derper's ``-stun``, port 3478 by default).

It answers every valid **Binding Request**, whether Tailscale's flavour (SOFTWARE ``tailnode`` plus
FINGERPRINT) or a plain RFC 5389 one. This is deliberately more lenient than ``derper``, which
answers only Tailscale's flavour: standard STUN clients (``stunclient``, browsers, aioice) can
then use the relay too, and Tailscale clients see no difference. The reply is byte-exact with
derper's: one XOR-MAPPED-ADDRESS, family 1 for IPv4 peers (v4-mapped addresses unmapped), 2 for
IPv6. Everything else (other STUN messages, RFC 3489, garbage, bad fingerprints) is counted as
``not_stun`` and gets no reply.

Nothing a peer sends can stop the server: decoding errors are counted, socket errors on receive
and send are counted and logged, and each socket has its own receive loop.

A socket bound to the wildcard address answers from the address the request was sent to (Linux
``IP_PKTINFO``/``IPV6_PKTINFO``): on a host with several addresses the kernel would otherwise pick
the source by route, and STUN clients drop replies that do not come from the server they asked.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
import sys
from dataclasses import asdict, dataclass
from typing import Final, cast

import trio

from natlib.stun import StunParseError, binding_response, canonical_ip, parse_binding_request

__all__ = ["RECV_BUFFER_SIZE", "StunStats", "serve_stun"]

log = logging.getLogger(__name__)

RECV_BUFFER_SIZE: Final = 64 << 10
_READ_ERROR_BACKOFF: Final = 0.1  # seconds; keeps a persistent socket error from spinning the CPU
_PORT_ZERO_ATTEMPTS: Final = 10
# Linux's IP_PKTINFO (Python only names it from 3.13 on) and the two pktinfo layouts.
_IP_PKTINFO: Final = int(getattr(socket, "IP_PKTINFO", 8))
_IN_PKTINFO: Final = struct.Struct("=I4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO: Final = struct.Struct("=16sI")  # addr, ifindex
_ANCILLARY_SIZE: Final = socket.CMSG_SPACE(_IN6_PKTINFO.size)


@dataclass(slots=True)
class StunStats:
    """STUN counters (derper's ``stun_requests{disposition}`` and ``stun_addrfamily{family}``).

    Plain integers, updated on the hot path and read by the metrics collector.
    ``ipv4``/``ipv6`` count valid Binding Requests by the requester's (unmapped) address family.
    """

    success: int = 0
    not_stun: int = 0
    read_error: int = 0
    write_error: int = 0
    ipv4: int = 0
    ipv6: int = 0

    def by_disposition(self) -> dict[str, int]:
        """``{"success": ..., "not_stun": ..., "read_error": ..., "write_error": ...}``."""
        d = asdict(self)
        return {k: d[k] for k in ("success", "not_stun", "read_error", "write_error")}

    def by_family(self) -> dict[str, int]:
        """``{"ipv4": ..., "ipv6": ...}``."""
        return {"ipv4": self.ipv4, "ipv6": self.ipv6}


async def _open_sockets(host: str | None, port: int) -> list[trio.socket.SocketType]:
    """Bind one UDP socket per address ``host`` resolves to (``None``: ``0.0.0.0`` and ``::``).

    IPv6 sockets get ``IPV6_V6ONLY`` so the two families never overlap. With ``port == 0`` every
    socket is bound to the port the first one got, so a dual-stack server has one port.
    """
    infos = await trio.socket.getaddrinfo(
        host or None, port, type=trio.socket.SOCK_DGRAM, flags=trio.socket.AI_PASSIVE
    )
    targets: list[tuple[int, int, int, tuple[object, ...]]] = []
    for info_family, info_type, info_proto, _, info_addr in infos:
        target = (int(info_family), int(info_type), info_proto, tuple(info_addr))
        if target not in targets:
            targets.append(target)

    for _attempt in range(_PORT_ZERO_ATTEMPTS if port == 0 else 1):
        socks: list[trio.socket.SocketType] = []
        bound_port = port
        try:
            for family, type_, proto, sockaddr in targets:
                try:
                    sock = trio.socket.socket(family, type_, proto)
                except OSError as e:
                    if e.errno == errno.EAFNOSUPPORT and len(targets) > 1:
                        log.info("STUN: address family %s unsupported here; skipping %s", family, sockaddr)
                        continue
                    raise
                socks.append(sock)
                if family == trio.socket.AF_INET6:
                    sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
                await sock.bind((sockaddr[0], bound_port, *sockaddr[2:]))
                bound_port = sock.getsockname()[1]
        except BaseException as e:
            for s in socks:
                s.close()
            if isinstance(e, OSError) and e.errno == errno.EADDRINUSE and port == 0 and bound_port != 0:
                continue  # the first family's random port is taken in another family: try again
            raise
        if not socks:
            raise OSError(errno.EAFNOSUPPORT, f"no usable address family for STUN on {host!r}")
        return socks
    raise OSError(errno.EADDRINUSE, "could not find a free UDP port for every address family")


async def serve_stun(
    host: str | None,
    port: int,
    stats: StunStats,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve STUN on UDP ``host:port`` until cancelled.

    ``host`` ``None`` (or ``""``) listens on ``0.0.0.0`` and ``::`` (IPv6-only socket); an explicit
    IP listens on just that address. ``task_status.started`` reports the bound ``(host, port)``
    pairs, so ``port=0`` works in tests (all families share the one port chosen). Counters go to
    ``stats``. Bind errors propagate before ``started``; after that the server does not fail.
    """
    socks = await _open_sockets(host, port)
    try:
        bound = [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in socks]
        for h, p in bound:
            log.info("STUN server listening on UDP %s", f"[{h}]:{p}" if ":" in h else f"{h}:{p}")
        async with trio.open_nursery() as nursery:
            for s in socks:
                nursery.start_soon(_serve_socket, s, stats)
            task_status.started(bound)
    finally:
        for s in socks:
            s.close()


def _enable_pktinfo(sock: trio.socket.SocketType) -> bool:
    """Ask for each datagram's destination address, if ``sock`` is bound to a wildcard (Linux)."""
    if sys.platform != "linux" or not ipaddress.ip_address(str(sock.getsockname()[0])).is_unspecified:
        return False
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
    except OSError as e:
        log.info("STUN: no per-datagram destination address (%r); replies use the routed source", e)
        return False
    return True


def _reply_source(ancdata: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """The control message that makes the reply leave from the request's destination address."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            _ifindex, _spec_dst, dst = _IN_PKTINFO.unpack_from(data)
            return [(socket.IPPROTO_IP, _IP_PKTINFO, _IN_PKTINFO.pack(0, dst, bytes(4)))]
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= _IN6_PKTINFO.size:
            dst6, ifindex = _IN6_PKTINFO.unpack_from(data)
            # Link-local destinations need their interface; global ones route normally.
            keep = ifindex if dst6[:2] == b"\xfe\x80" else 0
            return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(dst6, keep))]
    return []


async def _serve_socket(sock: trio.socket.SocketType, stats: StunStats) -> None:
    buf = bytearray(RECV_BUFFER_SIZE)
    view = memoryview(buf)
    pktinfo = _enable_pktinfo(sock)
    while True:
        ancdata: list[tuple[int, int, bytes]] = []
        addr: tuple[object, ...]
        try:
            if pktinfo:
                nbytes, ancdata, _flags, source = await sock.recvmsg_into([buf], _ANCILLARY_SIZE)
                addr = cast(tuple[object, ...], source)  # recvfrom's address form
            else:
                nbytes, addr = await sock.recvfrom_into(buf)
        except OSError as e:
            stats.read_error += 1
            log.warning("STUN recvfrom failed: %r", e)
            await trio.sleep(_READ_ERROR_BACKOFF)
            continue
        try:
            reply = _handle_datagram(view[:nbytes], addr, stats)
        except Exception:
            # A bug in the codec must not stop the server; count it as unanswerable input.
            stats.not_stun += 1
            log.exception("STUN: unexpected error handling a %d-byte datagram from %r", nbytes, addr)
            continue
        if reply is None:
            continue
        try:
            source = _reply_source(ancdata) if pktinfo else []
            if source:
                await sock.sendmsg([reply], source, 0, addr)
            else:
                await sock.sendto(reply, addr)
        except OSError as e:
            stats.write_error += 1
            log.debug("STUN sendto %r failed: %r", addr, e)
        else:
            stats.success += 1


def _handle_datagram(data: memoryview, addr: tuple[object, ...], stats: StunStats) -> bytes | None:
    """Return the reply to send to ``addr``, or None; counts not_stun and the family."""
    try:
        req = parse_binding_request(data)
    except StunParseError as e:
        stats.not_stun += 1
        log.debug("STUN: ignoring %d bytes from %r: %s", len(data), addr, e)
        return None
    ip = canonical_ip(str(addr[0]))
    reply = binding_response(req.txid, (ip, int(addr[1])))  # type: ignore[call-overload]
    if ip.version == 4:
        stats.ipv4 += 1
    else:
        stats.ipv6 += 1
    return reply
