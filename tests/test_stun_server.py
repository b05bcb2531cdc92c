"""relay._stun_server over real UDP sockets on 127.0.0.1 and ::1."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable

import pytest
import trio
import trio.testing

from natlib import stun
from relay._stun_server import RECV_BUFFER_SIZE, StunStats, _serve_socket, serve_stun

COOKIE = bytes.fromhex("2112a442")
REPLY_TIMEOUT = 5.0


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")
LOOPBACKS = [
    pytest.param("127.0.0.1", socket.AF_INET, id="ipv4"),
    pytest.param("::1", socket.AF_INET6, id="ipv6", marks=needs_ipv6),
]


def plain_request(txid: bytes) -> bytes:
    """An RFC 5389 Binding Request with no attributes, built by hand."""
    return struct.pack("!HHI", 0x0001, 0, 0x2112A442) + txid


def expected_response(txid: bytes, host: str, port: int) -> bytes:
    """derper's reply, built by hand: one XOR-MAPPED-ADDRESS, family 1 for IPv4, 2 for IPv6."""
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        family, pad = 1, COOKIE
    else:
        family, pad = 2, COOKIE + txid
    xaddr = bytes(a ^ b for a, b in zip(ip.packed, pad, strict=False))
    attr = struct.pack("!HHBBH", 0x0020, 4 + len(xaddr), 0, family, port ^ 0x2112) + xaddr
    return struct.pack("!HHI", 0x0101, len(attr), 0x2112A442) + txid + attr


async def start(nursery: trio.Nursery, host: str | None) -> tuple[StunStats, list[tuple[str, int]]]:
    stats = StunStats()
    bound: list[tuple[str, int]] = await nursery.start(serve_stun, host, 0, stats)
    return stats, bound


async def client(family: int, host: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    await sock.bind((host, 0))
    return sock


async def exchange(sock: trio.socket.SocketType, data: bytes, dest: tuple[str, int]) -> bytes:
    await sock.sendto(data, dest)
    with trio.fail_after(REPLY_TIMEOUT):
        reply, src = await sock.recvfrom(2048)
    assert tuple(src[:2]) == dest
    return bytes(reply)


@pytest.mark.parametrize(("host", "family"), LOOPBACKS)
@pytest.mark.parametrize(
    "make_request",
    [
        pytest.param(plain_request, id="rfc5389"),
        pytest.param(lambda t: stun.binding_request(t, fingerprint=True), id="rfc5389-fingerprint"),
        pytest.param(stun.tailscale_binding_request, id="tailscale"),
    ],
)
async def test_binding_request_gets_xor_mapped_address(
    nursery: trio.Nursery, host: str, family: int, make_request: Callable[[bytes], bytes]
) -> None:
    stats, bound = await start(nursery, host)
    assert bound == [(host, bound[0][1])]
    assert bound[0][1] != 0
    txid = os.urandom(12)
    with await client(family, host) as sock:
        me = sock.getsockname()
        reply = await exchange(sock, make_request(txid), bound[0])
    assert reply == expected_response(txid, me[0], me[1])
    assert len(reply) == (32 if family == socket.AF_INET else 44)
    assert stun.parse_binding_response(reply, txid) == (me[0], me[1])
    await trio.testing.wait_all_tasks_blocked()
    v4 = family == socket.AF_INET
    assert stats == StunStats(success=1, ipv4=int(v4), ipv6=int(not v4))


GARBAGE = [
    b"",
    b"\x00",
    b"GET / HTTP/1.1\r\n\r\n",
    plain_request(bytes(12))[:-1],  # truncated
    struct.pack("!HHI", 0x0001, 0, 0) + bytes(12),  # RFC 3489: no magic cookie
    expected_response(bytes(12), "192.0.2.1", 1),  # a response, not a request
    struct.pack("!HHI", 0x0011, 0, 0x2112A442) + bytes(12),  # Binding Indication
    stun.tailscale_binding_request(bytes(12))[:-1] + b"\xff",  # bad FINGERPRINT
    bytes(RECV_BUFFER_SIZE - 1000),  # big, not STUN
]


@pytest.mark.parametrize(("host", "family"), LOOPBACKS)
async def test_garbage_is_counted_and_ignored(nursery: trio.Nursery, host: str, family: int) -> None:
    stats, bound = await start(nursery, host)
    with await client(family, host) as sock:
        me = sock.getsockname()
        for junk in GARBAGE:
            await sock.sendto(junk, bound[0])
        # Loopback keeps order and the server handles one datagram at a time: had it answered any
        # garbage, that answer would arrive before this one.
        txid = os.urandom(12)
        assert await exchange(sock, plain_request(txid), bound[0]) == expected_response(txid, me[0], me[1])
        await trio.testing.wait_all_tasks_blocked()
        assert stats.not_stun == len(GARBAGE)
        assert stats.success == 1
        assert stats.read_error == stats.write_error == 0

        # Still answering, both flavours.
        for make in (stun.tailscale_binding_request, plain_request):
            txid = os.urandom(12)
            assert await exchange(sock, make(txid), bound[0]) == expected_response(txid, me[0], me[1])
    await trio.testing.wait_all_tasks_blocked()
    assert stats.success == 3
    assert stats.not_stun == len(GARBAGE)


async def test_several_clients_each_get_their_own_address(nursery: trio.Nursery) -> None:
    stats, bound = await start(nursery, "127.0.0.1")
    socks = [await client(socket.AF_INET, "127.0.0.1") for _ in range(5)]
    try:
        txids = [os.urandom(12) for _ in socks]
        for sock, txid in zip(socks, txids, strict=True):
            await sock.sendto(plain_request(txid), bound[0])
        for sock, txid in zip(socks, txids, strict=True):
            with trio.fail_after(REPLY_TIMEOUT):
                reply, _ = await sock.recvfrom(2048)
            me = sock.getsockname()
            assert reply == expected_response(txid, me[0], me[1])
    finally:
        for sock in socks:
            sock.close()
    await trio.testing.wait_all_tasks_blocked()
    assert stats.success == stats.ipv4 == 5


@needs_ipv6
async def test_host_none_binds_both_families_on_one_port(nursery: trio.Nursery) -> None:
    stats, bound = await start(nursery, None)
    assert sorted(h for h, _ in bound) == ["0.0.0.0", "::"]
    port = bound[0][1]
    assert all(p == port for _, p in bound)
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with await client(family, host) as sock:
            me = sock.getsockname()
            txid = os.urandom(12)
            assert await exchange(sock, stun.tailscale_binding_request(txid), (host, port)) == (
                expected_response(txid, me[0], me[1])
            )
    await trio.testing.wait_all_tasks_blocked()
    assert stats == StunStats(success=2, ipv4=1, ipv6=1)


async def test_bind_error_propagates_before_started(nursery: trio.Nursery) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as exc_info:  # noqa: PT011 - any bind failure; errno checked below
            await nursery.start(serve_stun, "127.0.0.1", port, StunStats())
    assert exc_info.value.errno == errno.EADDRINUSE


async def test_cancel_closes_sockets() -> None:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            _, bound = await start(nursery, "127.0.0.1")
            scope.cancel()
    # The port is free again.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(bound[0])


class FakeSocket:
    """Just enough of a trio socket to script receive and send failures."""

    def __init__(self, incoming: list[bytes | OSError], send_error: OSError | None) -> None:
        self.incoming = incoming
        self.send_error = send_error
        self.sent: list[tuple[bytes, object]] = []
        self.drained = trio.Event()

    family = socket.AF_INET6

    def getsockname(self) -> tuple[str, int, int, int]:
        return ("2001:db8::5", 3478, 0, 0)  # bound to one address: plain recvfrom/sendto

    async def recvfrom_into(self, buf: bytearray) -> tuple[int, tuple[str, int]]:
        await trio.lowlevel.checkpoint()
        if not self.incoming:
            self.drained.set()
            await trio.sleep_forever()
        item = self.incoming.pop(0)
        if isinstance(item, OSError):
            raise item
        buf[: len(item)] = item
        return len(item), ("::ffff:192.0.2.1", 3478)

    async def sendto(self, data: bytes, addr: object) -> int:
        await trio.lowlevel.checkpoint()
        if self.send_error is not None:
            raise self.send_error
        self.sent.append((bytes(data), addr))
        return len(data)


async def test_socket_errors_are_counted_not_fatal(autojump_clock: trio.testing.MockClock) -> None:
    txid = bytes(range(1, 13))
    fake = FakeSocket(
        [OSError(errno.EIO, "boom"), plain_request(txid), b"junk", OSError(errno.ENOBUFS, "again")],
        send_error=OSError(errno.ENETUNREACH, "unreachable"),
    )
    stats = StunStats()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_socket, fake, stats)  # type: ignore[arg-type]
        with trio.fail_after(10):
            await fake.drained.wait()
        nursery.cancel_scope.cancel()
    assert stats == StunStats(read_error=2, write_error=1, not_stun=1, ipv4=1)


async def test_reply_goes_to_sender_address_and_unmaps(autojump_clock: trio.testing.MockClock) -> None:
    txid = bytes(range(1, 13))
    fake = FakeSocket([stun.tailscale_binding_request(txid)], send_error=None)
    stats = StunStats()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_socket, fake, stats)  # type: ignore[arg-type]
        with trio.fail_after(10):
            await fake.drained.wait()
        nursery.cancel_scope.cancel()
    assert fake.sent == [(expected_response(txid, "192.0.2.1", 3478), ("::ffff:192.0.2.1", 3478))]
    assert stats == StunStats(success=1, ipv4=1)


async def test_wildcard_socket_answers_from_the_address_that_was_asked() -> None:
    """On a host with several addresses, the reply leaves from the one the client sent to (here
    127.0.0.2: the kernel's own choice would be 127.0.0.1, and STUN clients drop such replies)."""
    stats = StunStats()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve_stun, "0.0.0.0", 0, stats)
        port = bound[0][1]
        client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with client:
            await client.bind(("127.0.0.1", 0))
            for server_ip in ("127.0.0.2", "127.0.0.1", "127.0.0.3"):
                txid = os.urandom(12)
                await client.sendto(stun.tailscale_binding_request(txid), (server_ip, port))
                with trio.fail_after(5):
                    data, source = await client.recvfrom(2048)
                assert source == (server_ip, port)
                assert data == expected_response(txid, "127.0.0.1", client.getsockname()[1])
        nursery.cancel_scope.cancel()
    assert stats == StunStats(success=3, ipv4=3)
