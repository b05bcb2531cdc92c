"""relay._transport over real sockets on 127.0.0.1: plain TCP and "rawtls" (SSLObject + MemoryBIO)."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing
import trustme

from relay._tls import build_server_context, make_meta_certificate
from relay._transport import (
    IdleSpin,
    SocketTransport,
    TLSTransport,
    Transport,
    TransportClosed,
    configure_accepted_socket,
)

DEADLINE = 10.0
CHUNKS = (1, 1237, 7, 65537, 3001, 16385, 999, 40000)


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    meta_pem, _ = make_meta_certificate(bytes(range(32)))
    chain = b"".join(b.bytes() for b in cert.cert_chain_pems)
    return build_server_context(chain, cert.private_key_pem.bytes(), meta_pem)


@pytest.fixture(scope="module")
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class Pair:
    """One accepted server socket and the client's trio stream connected to it."""

    def __init__(self, server_sock: trio.socket.SocketType, client: trio.SocketStream) -> None:
        self.server_sock = server_sock
        self.client = client


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server_sock, _ = await listener.accept()
    configure_accepted_socket(server_sock)
    try:
        yield Pair(server_sock, client)
    finally:
        server_sock.close()
        await trio.aclose_forcefully(client)


async def tls_pair(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[TLSTransport, trio.SSLStream[trio.SocketStream]]:
    server = TLSTransport(pair.server_sock, server_ctx)
    client = trio.SSLStream(pair.client, client_ctx, server_hostname="relay.test")
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:
            n.start_soon(server.handshake)
            n.start_soon(client.do_handshake)
    return server, client


def payload(size: int, seed: int = 1) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(struct.pack(">QQ", seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


async def send_in_chunks(send: Callable[[bytes], Awaitable[None]], data: bytes) -> None:
    view = memoryview(data)
    pos = i = 0
    while pos < len(data):
        size = CHUNKS[i % len(CHUNKS)]
        await send(bytes(view[pos : pos + size]))
        pos += size
        i += 1


async def receive_exactly(receive: Callable[[], Awaitable[bytes | bytearray]], size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = await receive()
        assert chunk, f"EOF after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


async def receive_all_from(transport: Transport, bufsize: int) -> bytes:
    """Read from a server transport until EOF."""
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    out = bytearray()
    while True:
        n = await transport.receive_into(mv)
        if n == 0:
            return bytes(out)
        assert 0 < n <= bufsize
        out += mv[:n]


async def echo(transport: Transport, bufsize: int) -> int:
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    total = 0
    while True:
        n = await transport.receive_into(mv)
        if n == 0:
            return total
        total += n
        await transport.send_all(mv[:n])


# -- echo ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bufsize", [997, 65536])
async def test_plain_echo_1mib(pair: Pair, bufsize: int) -> None:
    server = SocketTransport(pair.server_sock)
    assert not server.is_tls and server.tls_version is None
    assert server.peer_address == pair.client.socket.getsockname()[:2]
    data = payload(1 << 20)
    result: list[bytes] = []
    echoed: list[int] = []

    async def client_receive() -> None:
        result.append(await receive_exactly(pair.client.receive_some, len(data)))
        await pair.client.send_eof()

    async def server_side() -> None:
        echoed.append(await echo(server, bufsize))

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:
            n.start_soon(server_side)
            n.start_soon(client_receive)
            await send_in_chunks(pair.client.send_all, data)
    assert result[0] == data
    assert echoed == [len(data)]
    await server.aclose()


@pytest.mark.parametrize("bufsize", [997, 65536])
async def test_tls_echo_1mib(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, bufsize: int
) -> None:
    server, client = await tls_pair(pair, server_ctx, client_ctx)
    assert server.is_tls and server.tls_version == "1.3"
    assert server.peer_address == pair.client.socket.getsockname()[:2]
    data = payload(1 << 20, seed=bufsize)
    result: list[bytes] = []
    echoed: list[int] = []

    async def client_receive() -> None:
        result.append(await receive_exactly(client.receive_some, len(data)))
        await client.aclose()  # close_notify: the echo loop then sees EOF

    async def server_side() -> None:
        echoed.append(await echo(server, bufsize))

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:
            n.start_soon(server_side)
            n.start_soon(client_receive)
            await send_in_chunks(client.send_all, data)
    assert result[0] == data
    assert echoed == [len(data)]
    await server.aclose()


async def test_tls12_works(pair: Pair, server_ctx: ssl.SSLContext, ca: trustme.CA) -> None:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = await tls_pair(pair, server_ctx, ctx)
    assert server.tls_version == "1.2"
    with trio.fail_after(DEADLINE):
        await client.send_all(b"hello")
        buf = memoryview(bytearray(100))
        assert await server.receive_into(buf) == 5
        assert bytes(buf[:5]) == b"hello"
        await server.send_all(b"world")
        assert await client.receive_some() == b"world"
        await client.aclose()
        assert await server.receive_into(buf) == 0
    await server.aclose()


# -- one reader and one writer task on one transport --------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
async def test_concurrent_read_and_write(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, tls: bool
) -> None:
    """The client sends everything before it reads anything, with small socket buffers: the
    server's writer blocks on a full socket while its reader must keep draining, or both hang."""
    pair.server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
    pair.client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
    server: Transport
    client: trio.abc.Stream
    if tls:
        server, client = await tls_pair(pair, server_ctx, client_ctx)
    else:
        server, client = SocketTransport(pair.server_sock), pair.client
    up = payload(4 << 20, seed=7)
    down = payload(4 << 20, seed=8)
    order: list[str] = []
    got_up: list[bytes] = []
    got_down: list[bytes] = []

    async def server_reader() -> None:
        buf = bytearray(1237 * 7)
        mv = memoryview(buf)
        out = bytearray()
        while len(out) < len(up):
            n = await server.receive_into(mv)
            assert n > 0
            out += mv[:n]
        got_up.append(bytes(out))
        order.append("server read all")

    async def server_writer() -> None:
        for i in range(0, len(down), 50_000):
            await server.send_all(down[i : i + 50_000])
        order.append("server wrote all")

    async def client_side() -> None:
        await send_in_chunks(client.send_all, up)
        order.append("client sent all")
        got_down.append(await receive_exactly(client.receive_some, len(down)))

    with trio.fail_after(DEADLINE * 2):
        async with trio.open_nursery() as n:
            n.start_soon(server_reader)
            n.start_soon(server_writer)
            n.start_soon(client_side)
    assert got_up == [up]
    assert got_down == [down]
    # The writer could only finish after the client started reading, i.e. after the reader
    # had drained the whole upload while the writer was blocked.
    assert order.index("server read all") < order.index("server wrote all")
    await server.aclose()


# -- EOF and errors -------------------------------------------------------------------------------


async def test_tls_clean_close_notify_gives_buffered_data_then_zero(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server, client = await tls_pair(pair, server_ctx, client_ctx)
    data = payload(50_000, seed=3)
    with trio.fail_after(DEADLINE):
        await client.send_all(data)
        await client.aclose()  # data and close_notify are likely in one socket read
        got = await receive_all_from(server, 10)  # tiny buffer: most of it comes from OpenSSL's buffer
        assert got == data
        assert await server.receive_into(memoryview(bytearray(10))) == 0  # stays at EOF
    await server.aclose()


async def test_tls_abrupt_close_without_close_notify_gives_zero(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server, client = await tls_pair(pair, server_ctx, client_ctx)
    with trio.fail_after(DEADLINE):
        # One round trip first, so the client has read the session tickets: closing a socket with
        # unread data would send RST instead of FIN (that case is the next test).
        await server.send_all(b"hi")
        assert await client.receive_some() == b"hi"
        await client.send_all(b"last words")
        await client.transport_stream.aclose()  # FIN, no close_notify (a Go client that died)
        assert await receive_all_from(server, 4096) == b"last words"
    await server.aclose()


async def test_tls_reset_raises_transport_closed(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server, _client = await tls_pair(pair, server_ctx, client_ctx)
    pair.client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pair.client.socket.close()  # RST
    with trio.fail_after(DEADLINE), pytest.raises(TransportClosed):
        await receive_all_from(server, 4096)
    await server.aclose()


async def test_plain_eof_and_reset(pair: Pair) -> None:
    server = SocketTransport(pair.server_sock)
    with trio.fail_after(DEADLINE):
        await pair.client.send_all(b"abc")
        await pair.client.send_eof()
        assert await receive_all_from(server, 2) == b"abc"
        pair.client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pair.client.socket.close()

        async def send_until_error() -> None:
            while True:  # writes to a reset peer fail within a few attempts
                await server.send_all(b"x" * 1000)

        with pytest.raises(TransportClosed):
            await send_until_error()
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_into(memoryview(bytearray(10)))


async def test_server_close_sends_close_notify(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server, client = await tls_pair(pair, server_ctx, client_ctx)
    with trio.fail_after(DEADLINE):
        await server.send_all(b"bye")
        await server.aclose()
        await server.aclose()  # idempotent
        assert await receive_exactly(client.receive_some, 3) == b"bye"
        assert await client.receive_some() == b""  # a clean close_notify, not a broken stream
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"more")


async def test_aclose_does_not_hang_when_peer_is_not_reading(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    pair.server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
    pair.client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    server, _client = await tls_pair(pair, server_ctx, client_ctx)
    blocked = trio.Event()
    outcome: list[BaseException] = []

    async def writer() -> None:
        chunk = b"x" * 65536
        try:
            while True:
                with trio.move_on_after(0.2) as cs:
                    await server.send_all(chunk)
                if cs.cancelled_caught:  # the peer's window is full: a stuck writer
                    blocked.set()
                    await server.send_all(chunk)  # now block for good, until aclose
        except (trio.ClosedResourceError, trio.BrokenResourceError) as e:
            outcome.append(e)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:
            n.start_soon(writer)
            await blocked.wait()
            await server.aclose()
    assert outcome  # the blocked writer was woken by the close


async def test_reader_blocked_in_receive_is_woken_by_aclose(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server, _client = await tls_pair(pair, server_ctx, client_ctx)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:

            async def reader() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await server.receive_into(memoryview(bytearray(100)))

            n.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await server.aclose()


# -- handshake failures ----------------------------------------------------------------------------


async def test_garbage_instead_of_client_hello_fails_fast(pair: Pair, server_ctx: ssl.SSLContext) -> None:
    server = TLSTransport(pair.server_sock, server_ctx)
    with trio.fail_after(DEADLINE):
        await pair.client.send_all(b"GET /derp HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        with pytest.raises(ssl.SSLError):
            await server.handshake()
        await server.aclose()
        # The client sees the connection end (an alert, then EOF), nothing hangs.
        while await pair.client.receive_some():
            pass


async def test_random_bytes_instead_of_client_hello(pair: Pair, server_ctx: ssl.SSLContext) -> None:
    server = TLSTransport(pair.server_sock, server_ctx)
    with trio.fail_after(DEADLINE):
        await pair.client.send_all(b"\x16\x03\x01\x00\x05" + os.urandom(5))  # a bogus record
        with pytest.raises(ssl.SSLError):
            await server.handshake()
        await server.aclose()


async def test_silent_client_times_out(pair: Pair, server_ctx: ssl.SSLContext) -> None:
    server = TLSTransport(pair.server_sock, server_ctx)
    with trio.fail_after(DEADLINE):
        with pytest.raises(trio.TooSlowError), trio.fail_after(0.2):
            await server.handshake()
        await server.aclose()


async def test_client_disconnects_during_handshake(pair: Pair, server_ctx: ssl.SSLContext) -> None:
    server = TLSTransport(pair.server_sock, server_ctx)
    with trio.fail_after(DEADLINE):
        await pair.client.aclose()
        with pytest.raises(TransportClosed):
            await server.handshake()
        await server.aclose()


async def test_untrusting_client_fails_handshake(pair: Pair, server_ctx: ssl.SSLContext) -> None:
    server = TLSTransport(pair.server_sock, server_ctx)
    client = trio.SSLStream(pair.client, ssl.create_default_context(), server_hostname="relay.test")
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:

            async def client_side() -> None:
                with pytest.raises(trio.BrokenResourceError):
                    await client.do_handshake()
                await pair.client.aclose()  # trio does not flush its alert: the server sees EOF

            n.start_soon(client_side)
            # The client rejects the certificate: an alert (ssl.SSLError) or EOF on our side.
            with pytest.raises((ssl.SSLError, TransportClosed)):
                await server.handshake()
        await server.aclose()


async def test_configure_accepted_socket_sets_derper_options() -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        configure_accepted_socket(s)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 600
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 15000


# -- send_nowait: the writer-idle fast path ----------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_send_nowait_keeps_order_when_the_kernel_takes_only_part(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, tls: bool
) -> None:
    """A peer that does not read fills the socket buffer: send_nowait then keeps the tail, refuses
    more until send_all has sent that tail, and the peer gets every byte in order."""
    pair.server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server: Transport
    if tls:
        server, client = await tls_pair(pair, server_ctx, client_ctx)
        receive: Callable[[], Awaitable[bytes | bytearray]] = client.receive_some
    else:
        server = SocketTransport(pair.server_sock)
        receive = pair.client.receive_some
    first, second, third = payload(4000, 1), payload(1 << 20, 2), payload(5000, 3)
    assert server.send_nowait(first)
    assert server.send_nowait(second)  # far more than the socket buffers: a backlog remains
    assert server.has_backlog
    assert not server.send_nowait(third)  # refused, nothing written: the caller queues it
    got: list[bytes] = []
    total = len(first) + len(second) + len(third)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:

            async def read_all() -> None:
                got.append(await receive_exactly(receive, total))

            n.start_soon(read_all)
            await server.send_all(third)
    assert not server.has_backlog
    assert got[0] == first + second + third
    assert server.send_nowait(b"after")  # idle again: the fast path is open
    with trio.fail_after(DEADLINE):
        assert await receive_exactly(receive, 5) == b"after"


# -- receive_into: one schedule point per call ------------------------------------------------------


async def _wait_until_readable_by_kernel(sock: trio.socket.SocketType) -> None:
    """Return once the kernel reports the socket readable (the client's bytes have arrived)."""
    with trio.fail_after(DEADLINE):
        await trio.lowlevel.wait_readable(sock)


@pytest.mark.parametrize("drained", [False, True], ids=["streaming", "after-partial-read"])
async def test_plain_receive_is_a_checkpoint_even_when_data_is_ready(pair: Pair, drained: bool) -> None:
    """Whether the last read filled the buffer or not, a receive with bytes already waiting
    is still a schedule point (fairness between connections), and returns them all."""
    server = SocketTransport(pair.server_sock)
    buf = memoryview(bytearray(100))
    if drained:
        await pair.client.send_all(b"x")
        assert await server.receive_into(buf) == 1  # less than asked: the socket is now empty
    await pair.client.send_all(b"ready")
    await _wait_until_readable_by_kernel(pair.server_sock)
    with trio.testing.assert_checkpoints():
        assert await server.receive_into(buf) == 5
    assert bytes(buf[:5]) == b"ready"
    await server.aclose()


@pytest.mark.parametrize("drained", [False, True], ids=["streaming", "after-partial-read"])
async def test_plain_cancelled_receive_reads_nothing(pair: Pair, drained: bool) -> None:
    server = SocketTransport(pair.server_sock)
    buf = memoryview(bytearray(100))
    if drained:
        await pair.client.send_all(b"x")
        assert await server.receive_into(buf) == 1
    await pair.client.send_all(b"kept")
    await _wait_until_readable_by_kernel(pair.server_sock)
    with trio.CancelScope() as cs:
        cs.cancel()
        await server.receive_into(buf)
    assert cs.cancelled_caught
    with trio.fail_after(DEADLINE):
        assert await server.receive_into(buf) == 4  # the cancelled call consumed nothing
    assert bytes(buf[:4]) == b"kept"
    await server.aclose()


async def test_plain_receive_waits_for_data_after_a_partial_read(pair: Pair) -> None:
    """After a read that emptied the socket the next receive parks until bytes arrive (no busy
    loop), then returns them."""
    server = SocketTransport(pair.server_sock)
    buf = memoryview(bytearray(100))
    await pair.client.send_all(b"a")
    assert await server.receive_into(buf) == 1
    got: list[bytes] = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:

            async def reader() -> None:
                k = await server.receive_into(buf)
                got.append(bytes(buf[:k]))

            n.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # parked in wait_readable
            await pair.client.send_all(b"later")
    assert got == [b"later"]
    await server.aclose()


async def test_tls_many_small_records_with_a_large_buffer(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """Records of one ~100 B frame each, read with a large buffer: every byte arrives in order
    (the reader stops decrypting when OpenSSL holds nothing more, without a failed read), and a
    receive after the last record parks until the next one."""
    server, client = await tls_pair(pair, server_ctx, client_ctx)
    frames = [payload(137, seed=i) for i in range(50)]
    want = b"".join(frames)
    buf = memoryview(bytearray(65536))
    got = bytearray()
    with trio.fail_after(DEADLINE):
        for f in frames:
            await client.send_all(f)
        while len(got) < len(want):
            n = await server.receive_into(buf)
            assert n > 0
            got += buf[:n]
        assert got == want
        async with trio.open_nursery() as nursery:

            async def read_one() -> None:
                n = await server.receive_into(buf)
                got[:] = buf[:n]

            nursery.start_soon(read_one)
            await trio.testing.wait_all_tasks_blocked()
            await client.send_all(b"next")
    assert got == b"next"
    await server.aclose()


# -- IdleSpin ----------------------------------------------------------------------------------------


def test_idle_spin_ends_as_soon_as_a_watched_socket_is_readable() -> None:
    a, b = socket.socketpair()
    spin = IdleSpin(spin=30.0, active_within=1.0)
    with a, b:
        spin.watch(a.fileno())
        spin.before_io_wait(0.0)  # a pass of trio's loop just now: traffic is interactive
        b.send(b"x")
        spin.before_io_wait(30.0)  # would take 30 s if it missed the readable socket
        assert (spin.spins, spin.spins_ended_by_data) == (1, 1)
    spin.close()


def test_idle_spin_gives_up_after_its_budget_when_nothing_arrives() -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    spin = IdleSpin(spin=0.002, active_within=1.0)
    with a, b, c, d:
        spin.watch(a.fileno())
        spin.watch(c.fileno())
        spin.before_io_wait(0.0)
        spin.before_io_wait(30.0)
        assert (spin.spins, spin.spins_ended_by_data) == (1, 0)
        spin.unwatch(a.fileno())
        b.send(b"x")  # readable, but no longer watched
        spin.before_io_wait(0.0)
        spin.before_io_wait(30.0)
        assert (spin.spins, spin.spins_ended_by_data) == (2, 0)
        assert spin.watching == 1
    spin.close()


def test_idle_spin_does_not_spin_when_quiet_or_busy() -> None:
    a, b = socket.socketpair()
    with a, b:
        spin = IdleSpin(spin=30.0, active_within=30.0)
        spin.watch(a.fileno())
        spin.before_io_wait(30.0)  # the first pass: nothing says traffic is interactive
        spin.before_io_wait(0.0)  # trio will not sleep at all: nothing to save
        assert spin.spins == 0
        spin.close()
        spin.before_io_wait(30.0)  # closed: never spins
        spin.unwatch(a.fileno())  # and forgets quietly
        assert spin.spins == 0
        quiet = IdleSpin(spin=30.0, active_within=0.0)  # every pass counts as too long ago
        quiet.watch(a.fileno())
        quiet.before_io_wait(0.0)
        quiet.before_io_wait(30.0)
        assert quiet.spins == 0
        quiet.close()
    unwatched = IdleSpin(spin=30.0, active_within=30.0)  # no DERP client: nothing to wait for
    unwatched.before_io_wait(0.0)
    unwatched.before_io_wait(30.0)
    assert unwatched.spins == 0
    unwatched.close()


async def test_idle_spin_watches_transports_from_enable_until_closed(server_ctx: ssl.SSLContext) -> None:
    """Transports given an IdleSpin register their socket when enabled (once) and remove it on
    aclose; without one, enabling does nothing."""
    spin = IdleSpin()
    a, b = socket.socketpair()
    with a, b:
        plain = SocketTransport(trio.socket.from_stdlib_socket(a), idle_spin=spin)
        assert spin.watching == 0  # not before the connection is a DERP client
        plain.enable_idle_spin()
        plain.enable_idle_spin()
        assert spin.watching == 1
        await plain.aclose()
        await plain.aclose()
        assert spin.watching == 0
    a, b = socket.socketpair()
    with a, b:
        tls = TLSTransport(trio.socket.from_stdlib_socket(a), server_ctx, idle_spin=spin)
        tls.enable_idle_spin()
        assert spin.watching == 1
        await tls.aclose()
        assert spin.watching == 0
    a, b = socket.socketpair()
    with a, b:
        alone = SocketTransport(trio.socket.from_stdlib_socket(a))
        alone.enable_idle_spin()
        await alone.aclose()
    assert spin.watching == 0
    spin.close()


async def test_idle_spin_as_a_trio_instrument_ends_on_client_bytes() -> None:
    """Installed in trio, the spin runs while trio would sleep and stops when a client's bytes
    arrive (sent from a thread, so trio is really idle meanwhile)."""
    a, b = socket.socketpair()
    spin = IdleSpin(spin=0.05, active_within=30.0)
    server = SocketTransport(trio.socket.from_stdlib_socket(a), idle_spin=spin)
    server.enable_idle_spin()
    trio.lowlevel.add_instrument(spin)
    try:
        with b, trio.fail_after(DEADLINE):
            buf = memoryview(bytearray(100))
            for _ in range(20):
                async with trio.open_nursery() as n:
                    n.start_soon(trio.to_thread.run_sync, b.sendall, b"ping")
                    assert await server.receive_into(buf) == 4
        assert spin.spins_ended_by_data >= 1
    finally:
        trio.lowlevel.remove_instrument(spin)
        await server.aclose()
        spin.close()
