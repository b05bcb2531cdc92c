"""The relay's byte transports: plain TCP and TLS over a trio socket.

Every connection is served through one small interface, :class:`Transport`: the HTTP front end,
the per-client reader loop (``receive_into`` into one reused buffer) and the per-client writer
loop (``send_all`` of a coalesced batch). WebSocket wraps another transport (``relay._ws``).

**Why not trio.SSLStream** (perf-baseline §2, §3, §6): ``SSLStream.receive_some`` returns at most
one 16 KiB record per call and runs every call through its retry/conflict-detection machinery,
which dominates the cost at bulk rates. :class:`TLSTransport` ("rawtls") drives an
:class:`ssl.SSLObject` over two :class:`ssl.MemoryBIO` itself: each wakeup reads up to 64 KiB of
ciphertext with ``recv_into`` into a reused buffer, feeds it to the incoming BIO, and decrypts
*every* complete record straight into the caller's buffer with no await per record. Each
``send_all`` is one ``SSLObject.write`` plus one socket send loop.

**Reads** go through :class:`_SocketReader`, not ``trio.socket``'s ``recv_into``: one schedule
point per call (``wait_readable`` right away when the last read emptied the socket, else a
checkpoint and the read), instead of a failing ``recv``, an exception and two scheduler passes
for every small packet. Writes stay on ``trio.socket`` (``send_all``) or go straight to the
kernel (``send_nowait``, the writer-idle fast path of ``_sclient``).

**Idle spin.** :class:`IdleSpin` is a trio instrument the server installs once: before trio
sleeps it polls the client sockets for up to :data:`IDLE_SPIN_SECONDS`, while traffic is
interactive, because waking a sleeping process costs more than a relay hop (see its docstring).

**Concurrency contract.** At most one task receives and at most one task sends at a time; one
receiver and one sender may run concurrently (the reader/writer loops of a client). The
SSLObject is shared, which is safe because trio runs everything on one thread and no SSL call
awaits. Ciphertext leaves the outgoing BIO only in the order it was produced: whoever holds the
"sending" flag drains the BIO, and a receiver that produced bytes of its own (TLS 1.3
post-handshake messages, e.g. a KeyUpdate reply) leaves them to a sender already in progress
instead of waiting for it. A receiver waiting for the socket never blocks the sender.

**Errors.** ``receive_into`` returns 0 at EOF — including EOF without ``close_notify`` (Go
clients that die, or plain TCP resets of the TLS layer's truncation check) and after the
peer's ``close_notify``. A reset connection or a TLS protocol error raises
:class:`TransportClosed` (a :class:`trio.BrokenResourceError`). Using a transport after
:meth:`aclose` raises :class:`trio.ClosedResourceError`. A ``send_all`` that was cancelled or
failed part-way leaves the stream unusable: later sends raise :class:`TransportClosed`.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import socket as _stdlib_socket
import ssl
import time
from collections.abc import Callable
from typing import Final, Protocol, cast

import trio

__all__ = [
    "IDLE_SPIN_SECONDS",
    "TLS_READ_SIZE",
    "IdleSpin",
    "SocketTransport",
    "TLSTransport",
    "Transport",
    "TransportClosed",
    "configure_accepted_socket",
]

log = logging.getLogger(__name__)

TLS_READ_SIZE: Final = 64 << 10
"""Bytes of ciphertext read from the socket per wakeup."""

IDLE_SPIN_SECONDS: Final = 50e-6
"""How long :class:`IdleSpin` polls the client sockets before trio sleeps, while traffic is interactive."""
IDLE_SPIN_ACTIVE_WITHIN: Final = 200e-6
"""Spin only if trio's previous run-loop pass (its sleep and the work after it) was shorter than
this: the spin is likely to pay off, and a relay whose traffic is sparse never spins."""

_KEEPALIVE_IDLE: Final = 600  # seconds (derper: 10 min keepalive)
_USER_TIMEOUT_MS: Final = 15_000  # derper: TCP_USER_TIMEOUT 15 s

_TLS_VERSIONS: Final = {"TLSv1.3": "1.3", "TLSv1.2": "1.2", "TLSv1.1": "1.1", "TLSv1": "1.0"}

Buffer = bytes | bytearray | memoryview


class TransportClosed(trio.BrokenResourceError):
    """The peer reset the connection, or the TLS stream is broken or unusable."""


class Transport(Protocol):
    """A bidirectional byte stream (see the module docstring for the concurrency contract)."""

    @property
    def peer_address(self) -> tuple[str, int]:
        """The remote (host, port)."""
        ...

    @property
    def is_tls(self) -> bool: ...

    @property
    def tls_version(self) -> str | None:
        """``"1.2"``/``"1.3"`` once the TLS handshake is done; ``None`` for plain TCP."""
        ...

    async def receive_into(self, buf: memoryview) -> int:
        """Write up to ``len(buf)`` received bytes into ``buf``; return how many (0 = EOF)."""
        ...

    async def send_all(self, data: Buffer) -> None:
        """Send all of ``data`` (returns once it is handed to the kernel)."""
        ...

    def send_nowait(self, data: bytes) -> bool:
        """Hand ``data`` to the kernel now, without waiting, if no send is in progress.

        Returns False (nothing written) when a send is in progress or the transport cannot do
        this; the caller then queues ``data`` for its writer task. On True, what the kernel did
        not take at once is kept and goes out, in order, first on the next :meth:`send_all`,
        which the caller must then make (see :attr:`has_backlog`).
        """
        ...

    @property
    def has_backlog(self) -> bool:
        """Bytes accepted by :meth:`send_nowait` still wait for :meth:`send_all`."""
        ...

    def enable_idle_spin(self) -> None:
        """Let the :class:`IdleSpin` given at construction watch this connection from now on
        (the server calls it once the connection is a DERP client). Idempotent; a no-op
        without one."""
        ...

    async def aclose(self) -> None:
        """Close the connection. Never hangs; idempotent."""
        ...


def configure_accepted_socket(sock: trio.socket.SocketType) -> None:
    """Apply derper's TCP options to an accepted socket (derp §4.5).

    TCP_NODELAY; SO_KEEPALIVE with TCP_KEEPIDLE 600 s; TCP_USER_TIMEOUT 15 s. Options the
    platform lacks are skipped; a failing option (e.g. on an already-reset socket) is logged at
    debug level and ignored.
    """
    options: list[tuple[int, int, int]] = [
        (_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1),
        (_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_KEEPALIVE, 1),
    ]
    if hasattr(_stdlib_socket, "TCP_KEEPIDLE"):
        options.append((_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_KEEPIDLE, _KEEPALIVE_IDLE))
    if hasattr(_stdlib_socket, "TCP_USER_TIMEOUT"):
        options.append((_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_USER_TIMEOUT, _USER_TIMEOUT_MS))
    for level, name, value in options:
        try:
            sock.setsockopt(level, name, value)
        except OSError as e:
            log.debug("setsockopt(%d, %d, %d) failed: %s", level, name, value, e)


class IdleSpin(trio.abc.Instrument):
    """Poll the client sockets for a few microseconds before trio puts the process to sleep.

    A relay hop for one small packet takes tens of microseconds, about as long as the peers
    take to answer. When trio runs out of work it sleeps in ``epoll_wait``, and waking a
    sleeping process (on a VM, a halted vCPU) costs more than the hop itself. Go's scheduler
    avoids this by spinning briefly before it parks; this does the same for trio: a
    :class:`trio.abc.Instrument` whose ``before_io_wait`` polls a level-triggered epoll set
    of the connections' sockets for at most ``spin`` seconds and returns as soon as one is
    readable, so trio's own ``epoll_wait`` then finds it without sleeping.

    It only spins while traffic is interactive: when trio's previous pass through its run loop
    (the previous sleep and the work after it) took less than ``active_within``. A quiet relay
    sleeps at once, and a busy one never gets here (trio polls with a zero timeout while tasks
    are runnable). A readable socket whose reader is paused on purpose (rate limit, a full
    sibling link) only ends the spin early. The cost is CPU: at most ``spin`` per pass, and
    only while passes are shorter than ``active_within``.

    Sockets are added with :meth:`watch` and removed with :meth:`unwatch` (closing a socket
    removes it too). Nothing here awaits or raises into trio; :meth:`close` releases the epoll.
    """

    def __init__(
        self, spin: float = IDLE_SPIN_SECONDS, active_within: float = IDLE_SPIN_ACTIVE_WITHIN
    ) -> None:
        self.spin = spin
        self.active_within = active_within
        self._epoll = select.epoll()
        self._fds: set[int] = set()
        self._last_pass = -math.inf  # when trio last called before_io_wait
        self.spins = 0  # before_io_wait calls that spun
        self.spins_ended_by_data = 0  # ... and saw a socket become readable

    @property
    def watching(self) -> int:
        """How many sockets are watched."""
        return len(self._fds)

    def watch(self, fd: int) -> None:
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except (OSError, ValueError) as e:  # closed already, or registered twice: no spin for it
            log.debug("idle spin: cannot watch fd %d: %s", fd, e)
        else:
            self._fds.add(fd)

    def unwatch(self, fd: int) -> None:
        if fd not in self._fds:
            return
        self._fds.discard(fd)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # closed already, which removed it

    def close(self) -> None:
        self._epoll.close()

    def before_io_wait(self, timeout: float) -> None:
        # Trio calls this once per run-loop pass (timeout 0 when tasks are runnable), so the
        # time since the previous call is one pass: the last sleep plus the work after it.
        clock = time.perf_counter
        now = clock()
        if (
            timeout > 0
            and now - self._last_pass < self.active_within
            and self._fds
            and not self._epoll.closed
        ):
            self.spins += 1
            poll = self._epoll.poll
            stop = now + min(self.spin, timeout)
            while True:
                if poll(0, 1):
                    self.spins_ended_by_data += 1
                    break
                if clock() >= stop:
                    break
            now = clock()
        self._last_pass = now


def _peer_of(sock: trio.socket.SocketType) -> tuple[str, int]:
    try:
        addr = sock.getpeername()
    except OSError:
        return ("", 0)
    if isinstance(addr, tuple) and len(addr) >= 2:
        return (str(addr[0]), int(addr[1]))
    return (str(addr), 0)


def _write_now(fd: int, data: bytes) -> int | None:
    """Write what the kernel takes at once from ``data`` to the non-blocking socket ``fd`` (trio's
    sockets are); return how much (0 when full), or None when the socket failed."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError:
        return None


def _checked_buffer(buf: memoryview) -> int:
    n = len(buf)
    if n == 0:
        raise ValueError("receive_into needs a non-empty buffer (0 means EOF)")
    return n


class _SocketReader:
    """Reads from a non-blocking socket with one trio checkpoint per read, not two or three.

    ``trio.socket``'s ``recv_into`` tries the read first and, when it would block, raises and
    catches :class:`BlockingIOError` and then waits; after a successful read it adds a
    checkpoint. For a relay hop carrying one small frame that is one useless ``recv`` system
    call, an exception and two scheduler passes per wakeup. This reader remembers whether the
    last read emptied the socket (it returned less than asked): if so it goes straight to
    :func:`trio.lowlevel.wait_readable`; otherwise (a streaming peer) it passes one
    :func:`trio.lowlevel.checkpoint` and reads at once. Either way every call passes exactly one
    schedule point, so a busy connection cannot starve the others, and cancellation works as for
    any trio receive: a cancelled call has read nothing.

    ``is_closed`` is asked before each read: the raw descriptor must not be touched once the
    owner closed the socket (the number may already belong to a new connection).
    """

    __slots__ = ("_drained", "_fd", "_is_closed", "_sock")

    def __init__(self, sock: trio.socket.SocketType, is_closed: Callable[[], bool]) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._is_closed = is_closed
        self._drained = False  # the last read returned less than asked: the socket is likely empty

    async def receive_into(self, buf: memoryview) -> int:
        """Read up to ``len(buf)`` bytes into ``buf``; 0 at EOF. Raises :class:`OSError` as the
        socket does, or :class:`trio.ClosedResourceError` once closed."""
        sock = self._sock
        if self._drained and not self._is_closed():
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.checkpoint()
        while True:
            if self._is_closed():
                raise trio.ClosedResourceError("transport is closed")
            try:
                n = os.readv(self._fd, (buf,))  # no allocation: straight into the caller's buffer
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            self._drained = n < len(buf)
            return n


class SocketTransport:
    """Plain TCP over a trio socket."""

    is_tls: Final = False
    tls_version: Final = None

    def __init__(
        self,
        sock: trio.socket.SocketType,
        peer_address: tuple[str, int] | None = None,
        idle_spin: IdleSpin | None = None,
    ) -> None:
        self._sock = sock
        self.peer_address = peer_address if peer_address is not None else _peer_of(sock)
        self._closed = False
        self._fd = sock.fileno()
        self._idle_spin = idle_spin
        self._spin_watched = False
        self._reader = _SocketReader(sock, self._is_closed)
        self._sending = False  # a send_all is in progress (it may be waiting for the socket)
        self._backlog: bytes | memoryview = b""  # what send_nowait could not write at once

    def _is_closed(self) -> bool:
        return self._closed

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._sock

    @property
    def has_backlog(self) -> bool:
        return bool(self._backlog)

    def send_nowait(self, data: bytes) -> bool:
        if self._sending or self._backlog or self._closed:
            return False
        n = _write_now(self._fd, data)
        if n is None:
            return False  # the writer's send_all meets the error again and reports it
        if n < len(data):
            self._backlog = memoryview(data)[n:]
        return True

    async def receive_into(self, buf: memoryview) -> int:
        _checked_buffer(buf)
        try:
            return await self._reader.receive_into(buf)
        except OSError as e:
            if self._closed or e.errno == errno.EBADF:
                raise trio.ClosedResourceError("transport is closed") from None
            raise TransportClosed(f"receive failed: {e}") from e

    async def send_all(self, data: Buffer) -> None:
        sock = self._sock
        if self._backlog:
            data = b"".join((self._backlog, data))
            self._backlog = b""
        total = len(data)
        if total == 0:
            await trio.lowlevel.checkpoint()
            return
        self._sending = True
        try:
            sent = await sock.send(data)
            if sent < total:
                view = memoryview(data).cast("B")
                while sent < total:
                    sent += await sock.send(view[sent:])
        except OSError as e:
            if self._closed or e.errno == errno.EBADF:
                raise trio.ClosedResourceError("transport is closed") from None
            raise TransportClosed(f"send failed: {e}") from e
        finally:
            self._sending = False

    def enable_idle_spin(self) -> None:
        if self._idle_spin is not None and not self._spin_watched and not self._closed:
            self._spin_watched = True
            self._idle_spin.watch(self._fd)

    async def aclose(self) -> None:
        if self._spin_watched and not self._closed:
            assert self._idle_spin is not None
            self._idle_spin.unwatch(self._fd)
        self._closed = True
        self._sock.close()
        await trio.lowlevel.checkpoint()


class TLSTransport:
    """Server-side TLS over a trio socket, driving :class:`ssl.SSLObject` directly ("rawtls").

    Call (and bound with :func:`trio.fail_after`) :meth:`handshake` first; ``receive_into`` and
    ``send_all`` run it implicitly if it has not been done.
    """

    is_tls: Final = True

    def __init__(
        self,
        sock: trio.socket.SocketType,
        ctx: ssl.SSLContext,
        peer_address: tuple[str, int] | None = None,
        idle_spin: IdleSpin | None = None,
    ) -> None:
        self._sock = sock
        self._idle_spin = idle_spin
        self._spin_watched = False
        self.peer_address = peer_address if peer_address is not None else _peer_of(sock)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._incoming, self._outgoing, server_side=True)
        # SSLObject.read(n, buffer) returns an int when given a buffer (typeshed says bytes).
        self._read = cast(Callable[[int, memoryview], int], self._obj.read)
        self._raw = bytearray(TLS_READ_SIZE)
        self._raw_view = memoryview(self._raw)
        self._handshake_done = False
        self._need_input = False  # the last read wanted more ciphertext and none came since
        self._eof = False  # EOF or close_notify seen: receive_into returns 0 from now on
        self._sending = False  # a task is draining the outgoing BIO to the socket
        self._send_waiters = trio.lowlevel.ParkingLot()
        self._send_broken = False  # a drain failed or was cancelled part-way
        self._closed = False
        self._reader = _SocketReader(sock, self._is_closed)
        self._backlog: bytes | memoryview = b""  # ciphertext send_nowait could not write at once
        self.tls_version: str | None = None

    def _is_closed(self) -> bool:
        return self._closed

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._sock

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._obj

    @property
    def has_backlog(self) -> bool:
        return bool(self._backlog)

    def enable_idle_spin(self) -> None:
        if self._idle_spin is not None and not self._spin_watched and not self._closed:
            self._spin_watched = True
            self._idle_spin.watch(self._sock.fileno())

    def send_nowait(self, data: bytes) -> bool:
        if self._sending or self._backlog or self._send_broken or self._closed or not self._handshake_done:
            return False
        outgoing = self._outgoing
        try:
            self._obj.write(data)
        except ssl.SSLError:
            return False  # the writer's send_all meets the error again and reports it
        records = outgoing.read()
        # On a socket error keep the records too (they are encrypted already, so the stream must
        # stay in order); the writer's send meets the error again and reports it.
        n = _write_now(self._sock.fileno(), records) or 0
        if n < len(records):
            self._backlog = memoryview(records)[n:]
        return True

    # -- socket helpers ------------------------------------------------------------------------

    def _os_error(self, e: OSError, what: str) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if self._closed or e.errno == errno.EBADF:
            return trio.ClosedResourceError("transport is closed")
        return TransportClosed(f"{what} failed: {e}")

    async def _recv_ciphertext(self) -> None:
        """Read once from the socket into the incoming BIO (or mark it at EOF)."""
        try:
            n = await self._reader.receive_into(self._raw_view)
        except OSError as e:
            raise self._os_error(e, "receive") from e
        if n:
            self._incoming.write(self._raw_view[:n])
        else:
            self._incoming.write_eof()
        self._need_input = False

    async def _drain_outgoing(self) -> None:
        """Send everything in the outgoing BIO, in order, while holding the sending flag.

        Loops until the BIO is empty, so bytes another task adds meanwhile (a receiver's
        post-handshake reply) go out too.
        """
        while self._sending:
            await self._send_waiters.park()
        if self._send_broken:
            raise TransportClosed("an earlier send was interrupted; the TLS stream is unusable")
        outgoing = self._outgoing
        if not outgoing.pending and not self._backlog:
            await trio.lowlevel.checkpoint()
            return
        sock = self._sock
        self._sending = True
        ok = False
        try:
            while outgoing.pending or self._backlog:
                if self._backlog:
                    data = b"".join((self._backlog, outgoing.read()))
                    self._backlog = b""
                else:
                    data = outgoing.read()
                total = len(data)
                sent = await sock.send(data)
                if sent < total:
                    view = memoryview(data)
                    while sent < total:
                        sent += await sock.send(view[sent:])
            ok = True
        except OSError as e:
            raise self._os_error(e, "send") from e
        finally:
            if not ok:
                self._send_broken = True
            self._sending = False
            self._send_waiters.unpark_all()

    async def _flush_from_receiver(self) -> None:
        """Send what a read left in the outgoing BIO, unless a sender is already at it."""
        if not self._sending and not self._send_broken:
            await self._drain_outgoing()

    # -- handshake -----------------------------------------------------------------------------

    async def handshake(self) -> None:
        """Run the server handshake. Raises :class:`ssl.SSLError` if the client does not speak
        TLS (or fails it; the alert is sent best-effort), :class:`TransportClosed` if the
        connection drops. Wrap it in :func:`trio.fail_after`."""
        if self._handshake_done:
            await trio.lowlevel.checkpoint()
            return
        if self._closed:
            raise trio.ClosedResourceError("transport is closed")
        obj = self._obj
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self._outgoing.pending:
                    await self._drain_outgoing()
                await self._recv_ciphertext()
            except ssl.SSLEOFError as e:
                raise TransportClosed(f"connection closed during the TLS handshake: {e}") from e
            except ssl.SSLError:
                self._send_alert_nowait()
                raise
        self._handshake_done = True
        version = obj.version()
        self.tls_version = _TLS_VERSIONS.get(version or "", version)
        if self._outgoing.pending:  # the last flight, and TLS 1.3 session tickets
            await self._drain_outgoing()

    def _send_alert_nowait(self) -> None:
        """Best-effort, non-blocking write of whatever is in the outgoing BIO (a fatal alert)."""
        if self._sending or self._send_broken or not self._outgoing.pending:
            return
        data = self._outgoing.read()
        try:
            os.write(self._sock.fileno(), data)
        except OSError:
            pass

    # -- data ----------------------------------------------------------------------------------

    async def receive_into(self, buf: memoryview) -> int:
        """Decrypt into ``buf``: already-buffered plaintext first, then every complete record of
        one ≤ 64 KiB socket read. Returns 0 at EOF (with or without close_notify).

        Plaintext already buffered (from the previous socket read) is returned without a trio
        checkpoint, deliberately: it is bounded by one 64 KiB read, and every socket read is a
        checkpoint."""
        want = _checked_buffer(buf)
        if not self._handshake_done:
            await self.handshake()
        read = self._read
        obj, incoming = self._obj, self._incoming
        n = 0
        while True:
            if self._eof:
                await trio.lowlevel.checkpoint()
                return 0
            if not self._need_input:
                try:
                    k = n = read(want, buf)
                    while k and n < want:
                        if not incoming.pending and not obj.pending():
                            # Nothing left to decrypt: the next read would only raise
                            # SSLWantReadError (costly), so note that now.
                            self._need_input = True
                            break
                        k = read(want - n, buf[n:])
                        n += k
                    if not k:  # CPython's read returns 0 once the peer's close_notify is read
                        self._eof = True
                except ssl.SSLWantReadError:
                    self._need_input = True
                except ssl.SSLZeroReturnError:  # close_notify (older behaviour: raised)
                    self._eof = True
                except ssl.SSLEOFError:  # EOF without close_notify: a plain disconnect for us
                    self._eof = True
                except ssl.SSLError as e:
                    self._send_alert_nowait()
                    raise TransportClosed(f"TLS error: {e}") from e
                if self._outgoing.pending:  # post-handshake messages (KeyUpdate reply, tickets)
                    await self._flush_from_receiver()
                if n:
                    return n
                if self._eof:
                    return 0
            await self._recv_ciphertext()

    async def send_all(self, data: Buffer) -> None:
        """Encrypt ``data`` with one ``SSLObject.write`` and send the records in one send loop."""
        if self._closed:
            raise trio.ClosedResourceError("transport is closed")
        if not self._handshake_done:
            await self.handshake()
        if len(data):
            try:
                self._obj.write(data)
            except ssl.SSLError as e:
                raise TransportClosed(f"TLS error: {e}") from e
        await self._drain_outgoing()

    async def aclose(self) -> None:
        """Send close_notify if that cannot block (one non-blocking write), then close."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if self._spin_watched:
            assert self._idle_spin is not None
            self._idle_spin.unwatch(self._sock.fileno())
        self._closed = True
        try:
            if self._handshake_done and not self._sending and not self._send_broken:
                try:
                    self._obj.unwrap()
                except (ssl.SSLError, ValueError):
                    pass  # SSLWantReadError: our close_notify is written, the peer's not read
                self._send_alert_nowait()
        finally:
            self._sock.close()
        await trio.lowlevel.checkpoint()
