"""Noticing that the network changed: rtnetlink notifications, debounced, with a polling fallback.

Roaming starts here: when an address comes or goes, a link goes down or up, or the default route
moves, natlib re-gathers its candidates and tells its peers. :class:`NetworkMonitor` is an async
iterator of :class:`NetworkChange` events, each carrying the new :class:`NetworkState` (the usable
interface addresses, see :func:`natlib.netif.select_addresses`, and the default routes)::

    async with NetworkMonitor() as monitor:
        async for change in monitor:
            print(change.added, change.removed)
            gatherer.request_refresh()

How it works. On Linux the monitor subscribes a ``NETLINK_ROUTE`` socket to the link, IPv4/IPv6
address and IPv4/IPv6 route groups *before* it reads the initial state, so nothing that happens in
between is missed. A relevant notification (see :func:`is_relevant`) does not produce an event by
itself: it marks the state dirty, and once notifications have been quiet for ``debounce`` seconds
(at most ``max_delay`` after the first), the state is read again with :mod:`natlib.netif` and
compared with the previous one. An event is produced only when the state really differs, so a
burst of a dozen messages (DHCP renumbering, DAD completing) is one event, and a message that
changes nothing is none. Kernel notifications can be lost (``ENOBUFS`` when the socket buffer
overflows); that, and any malformed datagram, also marks the state dirty. In addition the state
is re-read every ``poll_interval`` seconds, which is also the whole mechanism where rtnetlink is
not available (other systems, restricted sandboxes): the **periodic-check fallback**.

The decision logic is the sans-io :class:`ChangeDetector` (datagrams and ``now`` in, "read the
state now" and events out); :class:`NetworkMonitor` is its anyio driver and runs under trio and
asyncio. Cancelling an iteration loses nothing (the next one carries on); leaving the ``async
with`` block (or :meth:`NetworkMonitor.aclose`) closes the netlink socket.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal

import anyio

from . import netif
from .candidates import AddressFilter

__all__ = [
    "DEBOUNCE",
    "MAX_DEBOUNCE_DELAY",
    "POLL_INTERVAL",
    "RESYNC_INTERVAL",
    "RTMGRP_IPV4_IFADDR",
    "RTMGRP_IPV4_ROUTE",
    "RTMGRP_IPV6_IFADDR",
    "RTMGRP_IPV6_ROUTE",
    "RTMGRP_LINK",
    "SUBSCRIBED_GROUPS",
    "ChangeDetector",
    "NetworkChange",
    "NetworkMonitor",
    "NetworkState",
    "is_relevant",
    "read_state",
]

log = logging.getLogger(__name__)

RTMGRP_LINK: Final = 0x1
RTMGRP_IPV4_IFADDR: Final = 0x10
RTMGRP_IPV4_ROUTE: Final = 0x40
RTMGRP_IPV6_IFADDR: Final = 0x100
RTMGRP_IPV6_ROUTE: Final = 0x400
SUBSCRIBED_GROUPS: Final = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
)

DEBOUNCE: Final = 0.25
"""Seconds of quiet after the last notification before the state is re-read."""
MAX_DEBOUNCE_DELAY: Final = 1.0
"""A steady stream of notifications still re-reads the state this long after the first one."""
POLL_INTERVAL: Final = 10.0
"""Periodic check interval when rtnetlink is not available."""
RESYNC_INTERVAL: Final = 60.0
"""Periodic check interval on top of rtnetlink (a safety net; lost notifications are detected)."""

_RECV_SIZE: Final = 1 << 16
_MAX_DRAIN: Final = 256  # datagrams read per wake-up before yielding to other tasks
_SOCKET_RCVBUF: Final = 1 << 20  # a renumbering burst fits; an overflow is handled anyway


@dataclass(frozen=True, slots=True)
class NetworkState:
    """What natlib cares about in the network configuration."""

    addresses: frozenset[netif.InterfaceAddress]
    default_routes: frozenset[tuple[int, str | None, str | None]] = frozenset()
    """(family, gateway, interface name) of each default route of the main table."""

    def sorted_addresses(self) -> list[netif.InterfaceAddress]:
        return sorted(self.addresses, key=lambda a: (a.index, a.family, a.ip.packed))


def read_state(*, include_link_local: bool = False, exclude: AddressFilter | None = None) -> NetworkState:
    """The current :class:`NetworkState` from the kernel (blocking, local; :class:`netif.NetlinkError`).

    ``exclude`` leaves out addresses (and default routes through interfaces) natlib must ignore,
    so a change on them (an overlay interface coming or going) is no change at all.
    """
    with netif.open_netlink_socket() as sock:
        links = netif.dump_links(sock)
        addrs = netif.dump_addresses(sock)
        routes = netif.dump_routes(sock)
    usable = netif.select_addresses(links, addrs, include_link_local=include_link_local)
    defaults = netif.select_default_routes(links, routes)
    if exclude:
        usable = [a for a in usable if not exclude.excludes(a)]
        defaults = [r for r in defaults if r.interface not in exclude.interfaces]
    return NetworkState(frozenset(usable), frozenset((r.family, r.gateway, r.interface) for r in defaults))


@dataclass(frozen=True, slots=True)
class NetworkChange:
    """The network state changed between ``previous`` and ``state``."""

    state: NetworkState
    previous: NetworkState
    at: float
    """When the change was confirmed (the monitor's clock, ``anyio.current_time()``)."""
    reason: Literal["netlink", "poll"]
    """``"netlink"``: after notifications; ``"poll"``: found by the periodic check."""

    @property
    def addresses(self) -> list[netif.InterfaceAddress]:
        """The new usable addresses."""
        return self.state.sorted_addresses()

    @property
    def added(self) -> list[netif.InterfaceAddress]:
        return sorted(self.state.addresses - self.previous.addresses, key=lambda a: (a.index, a.address))

    @property
    def removed(self) -> list[netif.InterfaceAddress]:
        return sorted(self.previous.addresses - self.state.addresses, key=lambda a: (a.index, a.address))

    @property
    def default_route_changed(self) -> bool:
        return self.state.default_routes != self.previous.default_routes


def is_relevant(msg: netif.NetlinkMessage) -> bool:
    """Whether a notification can change a :class:`NetworkState`.

    Link and address messages always can. Route messages only for the main table (the kernel's
    ``local`` table and policy tables churn with every address and are not about reachability).
    A route message that cannot be decoded counts as relevant: re-reading is the safe side.
    """
    if msg.type in (netif.RTM_NEWLINK, netif.RTM_DELLINK, netif.RTM_NEWADDR, netif.RTM_DELADDR):
        return True
    if msg.type in (netif.RTM_NEWROUTE, netif.RTM_DELROUTE):
        try:
            route = netif.decode_route(msg)
        except netif.NetlinkParseError:
            return True
        return route.table == netif.RT_TABLE_MAIN
    return False


class ChangeDetector:
    """Sans-io core of the monitor: when to re-read the state, and whether it changed.

    Feed every received datagram to :meth:`feed` (or call :meth:`mark_dirty`); sleep until
    :meth:`next_deadline`; when :meth:`read_due` says so, read the state and hand it to
    :meth:`update`, which returns a :class:`NetworkChange` or None.
    """

    def __init__(
        self,
        state: NetworkState,
        now: float,
        *,
        debounce: float = DEBOUNCE,
        max_delay: float = MAX_DEBOUNCE_DELAY,
        poll_interval: float = RESYNC_INTERVAL,
    ) -> None:
        if debounce < 0 or max_delay < debounce or poll_interval <= 0:
            raise ValueError("need 0 <= debounce <= max_delay and poll_interval > 0")
        self.state = state
        self.debounce = debounce
        self.max_delay = max_delay
        self.poll_interval = poll_interval
        self._first_dirty: float | None = None
        self._last_dirty: float | None = None
        self._next_poll = now + poll_interval
        self.notifications = 0
        """Relevant notifications seen (a counter for tests and metrics)."""
        self.malformed = 0
        """Datagrams that could not be parsed."""

    @property
    def dirty(self) -> bool:
        return self._first_dirty is not None

    def mark_dirty(self, now: float) -> None:
        """Something may have changed at ``now`` (a notification, lost notifications)."""
        if self._first_dirty is None:
            self._first_dirty = now
        self._last_dirty = now

    def feed(self, data: bytes, now: float) -> int:
        """Take one datagram from the subscribed socket; returns how many relevant messages it held.

        A malformed datagram is counted and marks the state dirty; it never raises.
        """
        try:
            messages = netif.parse_messages(data)
        except netif.NetlinkParseError as e:
            log.debug("malformed netlink notification (%s); re-reading the state", e)
            self.malformed += 1
            self.mark_dirty(now)
            return 0
        relevant = sum(1 for m in messages if is_relevant(m))
        if relevant:
            self.notifications += relevant
            self.mark_dirty(now)
        return relevant

    def next_deadline(self) -> float:
        """When the state should next be read: the end of the debounce window, or the next poll."""
        if self._first_dirty is not None and self._last_dirty is not None:
            return min(self._last_dirty + self.debounce, self._first_dirty + self.max_delay)
        return self._next_poll

    def read_due(self, now: float) -> Literal["netlink", "poll"] | None:
        """Why the state should be read at ``now``, or None if not yet."""
        if self._first_dirty is not None:
            return "netlink" if now >= self.next_deadline() else None
        return "poll" if now >= self._next_poll else None

    def update(
        self, state: NetworkState, now: float, reason: Literal["netlink", "poll"]
    ) -> NetworkChange | None:
        """The state as read at ``now``; returns the change, or None when nothing differs."""
        self._first_dirty = self._last_dirty = None
        self._next_poll = now + self.poll_interval
        if state == self.state:
            return None
        change = NetworkChange(state, self.state, now, reason)
        self.state = state
        return change


class NetworkMonitor:
    """Async iterator of :class:`NetworkChange` events (anyio: trio or asyncio). See the module doc.

    ``use_netlink=False`` (or a system without rtnetlink) polls every ``poll_interval`` seconds
    (default :data:`POLL_INTERVAL`); with rtnetlink the periodic check runs every
    :data:`RESYNC_INTERVAL` unless ``poll_interval`` says otherwise. ``exclude`` (an
    :class:`~natlib.candidates.AddressFilter`) hides interfaces and prefixes from the state, so
    their changes are not reported. ``read`` replaces the state reader (default
    :func:`read_state`). Use it as an async context manager; iterating after
    :meth:`aclose` ends the iteration.
    """

    def __init__(
        self,
        *,
        debounce: float = DEBOUNCE,
        max_delay: float = MAX_DEBOUNCE_DELAY,
        poll_interval: float | None = None,
        use_netlink: bool = True,
        include_link_local: bool = False,
        exclude: AddressFilter | None = None,
        read: Callable[[], NetworkState] | None = None,
    ) -> None:
        self._debounce = debounce
        self._max_delay = max(max_delay, debounce)
        self._poll_interval = poll_interval
        self._use_netlink = use_netlink
        self._read = read or (lambda: read_state(include_link_local=include_link_local, exclude=exclude))
        self._sock: socket.socket | None = None
        self._detector: ChangeDetector | None = None
        self._closed = False

    @property
    def mode(self) -> Literal["netlink", "poll"]:
        """``"netlink"`` when subscribed to kernel notifications, else ``"poll"``."""
        return "netlink" if self._sock is not None else "poll"

    @property
    def state(self) -> NetworkState:
        """The last state read (the initial one until the first change)."""
        if self._detector is None:
            raise RuntimeError("the monitor is not open; use 'async with NetworkMonitor() as m'")
        return self._detector.state

    @property
    def detector(self) -> ChangeDetector:
        if self._detector is None:
            raise RuntimeError("the monitor is not open")
        return self._detector

    async def open(self) -> None:
        """Subscribe (if possible) and read the initial state; the context manager calls this."""
        if self._detector is not None:
            return
        if self._use_netlink:
            try:
                sock = netif.open_netlink_socket(SUBSCRIBED_GROUPS)
            except netif.NetlinkError as e:
                log.info("no rtnetlink (%s); checking the network every few seconds instead", e)
            else:
                sock.setblocking(False)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_RCVBUF)
                except OSError:
                    pass
                self._sock = sock
        interval = self._poll_interval
        if interval is None:
            interval = RESYNC_INTERVAL if self._sock is not None else POLL_INTERVAL
        try:
            state = self._read()
        except BaseException:
            await self.aclose()
            raise
        self._detector = ChangeDetector(
            state,
            anyio.current_time(),
            debounce=self._debounce,
            max_delay=self._max_delay,
            poll_interval=interval,
        )

    async def aclose(self) -> None:
        """Close the netlink socket; a task waiting in the iterator sees the end of the iteration."""
        self._closed = True
        if self._sock is not None:
            sock, self._sock = self._sock, None
            anyio.notify_closing(sock)
            sock.close()

    async def __aenter__(self) -> NetworkMonitor:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> NetworkMonitor:
        return self

    def _drain(self, now: float) -> None:
        assert self._sock is not None
        detector = self.detector
        for _ in range(_MAX_DRAIN):
            try:
                data = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel dropped notifications: re-read to be sure
                    log.debug("netlink notifications were lost; re-reading the state")
                    detector.mark_dirty(now)
                    continue
                raise
            detector.feed(data, now)

    async def __anext__(self) -> NetworkChange:
        if self._closed:
            raise StopAsyncIteration
        detector = self.detector
        while True:
            now = anyio.current_time()
            reason = detector.read_due(now)
            if reason is not None:
                try:
                    state = self._read()
                except (netif.NetlinkError, OSError) as e:
                    log.warning("cannot read the network state: %s", e)
                    detector.update(detector.state, now, reason)  # keep the old state; retry later
                    continue
                change = detector.update(state, anyio.current_time(), reason)
                if change is not None:
                    return change
                continue
            timeout = max(0.0, detector.next_deadline() - now)
            if self._sock is None:
                await anyio.sleep(timeout)
                if self._closed:
                    raise StopAsyncIteration
                continue
            try:
                with anyio.move_on_after(timeout):
                    await anyio.wait_readable(self._sock)
            except anyio.ClosedResourceError:
                raise StopAsyncIteration from None
            if self._sock is None:
                raise StopAsyncIteration
            self._drain(anyio.current_time())
