"""The anyio driver of one birthday-paradox probe (:mod:`natlib.birthday`) for :class:`natlib.conn.Conn`.

One :class:`BirthdayRun` per peer and attempt. On the hard side it opens the plan's extra UDP
sockets (one task reads each; what they receive goes through the connection's normal
demultiplexing, tagged with the socket, so pongs and data answer through the same socket); on
the easy side it probes from the connection's main socket. It carries out the plan's
:class:`~natlib.birthday.SendProbe` actions, sleeps until the plan's next deadline, and ends:

* on :class:`~natlib.birthday.ProbeSucceeded`: the hard side closes every socket but the winning
  one, which stays open (and read) until the run is cancelled; the address goes to the peer's
  path machine as a candidate (``on_success``);
* on :class:`~natlib.birthday.ProbeGaveUp`: every extra socket is closed and :meth:`run` returns.

Cancelling :meth:`run` (the peer is removed, the connection closes) closes every socket it opened.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from .birthday import EasySidePlan, HardSidePlan, ProbeGaveUp, ProbeSucceeded, SendProbe
from .disco import AddrPort

__all__ = ["BirthdayRun"]

log = logging.getLogger(__name__)


class BirthdayRun:
    """Drives ``plan``; see the module docstring. The callbacks belong to the connection:

    ``seal_ping(tx_id)`` makes the disco Ping packet; ``send_main(addr, packet)`` sends from the
    main socket; ``on_udp(data, source, raw_socket)`` demultiplexes what an extra socket receives;
    ``on_success(addr)`` hands the found address to the path machine; ``forget_socket(raw)``
    drops the connection's routes through a socket about to close.
    """

    def __init__(
        self,
        plan: HardSidePlan | EasySidePlan,
        *,
        seal_ping: Callable[[bytes], bytes],
        send_main: Callable[[AddrPort, bytes], None],
        on_udp: Callable[[bytes, tuple[Any, ...], socket.socket], None],
        on_success: Callable[[AddrPort], None],
        forget_socket: Callable[[socket.socket], None],
    ) -> None:
        self.plan = plan
        self._seal_ping = seal_ping
        self._send_main = send_main
        self._on_udp = on_udp
        self._on_success = on_success
        self._forget_socket = forget_socket
        self.wake = anyio.Event()
        self.sockets: dict[int, socket.socket] = {}
        self.winner: AddrPort | None = None
        self._scopes: dict[int, anyio.CancelScope] = {}

    @property
    def is_hard_side(self) -> bool:
        return isinstance(self.plan, HardSidePlan)

    def index_of(self, raw: socket.socket) -> int | None:
        for i, s in self.sockets.items():
            if s is raw:
                return i
        return None

    def poke(self) -> None:
        """An input reached the plan: re-read its actions and deadline."""
        self.wake.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            try:
                if isinstance(self.plan, HardSidePlan):
                    for i in range(self.plan.sockets):
                        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        raw.bind(("0.0.0.0", 0))
                        raw.setblocking(False)
                        self.sockets[i] = raw
                        sock = await anyio.abc.UDPSocket.from_socket(raw)
                        scope = anyio.CancelScope()
                        self._scopes[i] = scope
                        tg.start_soon(self._read, sock, raw, scope)
                await self._drive()
                if self.winner is not None:
                    await anyio.sleep_forever()  # the winning socket stays in use for the peer
            finally:
                tg.cancel_scope.cancel()
                for raw in self.sockets.values():
                    self._forget_socket(raw)

    async def _read(self, sock: anyio.abc.UDPSocket, raw: socket.socket, scope: anyio.CancelScope) -> None:
        with scope:
            async with sock:
                while True:
                    try:
                        data, source = await sock.receive()
                    except OSError:
                        continue
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                        return
                    self._on_udp(data, source, raw)

    async def _drive(self) -> None:
        plan = self.plan
        while True:
            self.wake = anyio.Event()
            plan.handle_timer(anyio.current_time())
            for action in plan.take_actions():
                if isinstance(action, SendProbe):
                    packet = self._seal_ping(action.tx_id)
                    raw = self.sockets.get(action.socket)
                    if self.is_hard_side and raw is not None:
                        try:
                            raw.sendto(packet, action.addr.socket_address())
                        except OSError:
                            pass  # a full buffer or no route: a lost probe, like on the wire
                    else:
                        self._send_main(action.addr, packet)
                elif isinstance(action, ProbeSucceeded):
                    log.info("birthday probe succeeded: %s after %.2f s", action.addr, action.elapsed)
                    self.winner = action.addr
                    self._close_all_but(action.socket if self.is_hard_side else None)
                    self._on_success(action.addr)
                    return
                elif isinstance(action, ProbeGaveUp):
                    log.info("birthday probe gave up after %d probes", action.probes_sent)
                    self._close_all_but(None)
                    return
            deadline = plan.next_deadline()
            if deadline is None:
                return
            with anyio.move_on_at(deadline):
                await self.wake.wait()

    def _close_all_but(self, keep: int | None) -> None:
        for i in list(self.sockets):
            if i == keep:
                continue
            self._forget_socket(self.sockets[i])
            self._scopes[i].cancel()  # the reader closes the socket
            del self.sockets[i]
