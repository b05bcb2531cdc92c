"""Birthday-paradox probing between a hard NAT and an easy one (sans-io).

When one peer is behind an endpoint-dependent ("hard", EDM) NAT and the other behind an
endpoint-independent ("easy", EIM) NAT with address-and-port-dependent filtering, ordinary disco
cannot punch through: the hard side's public port for the easy peer is unpredictable, and the easy
side's firewall admits only sources it has sent to. Tailscale stays on the relay there
(nat-traversal.md §4.2). The birthday attack (§5) gets through most of the time:

* the **hard side** opens N local sockets (256 by default) and sends a disco ping from each to the
  easy side's known endpoint. Its NAT allocates N public ports, each open to that endpoint;
* the **easy side** sends disco pings from its one socket to the hard side's public IP at random
  ports (distinct, 1024–65535), at a bounded rate (250/s), at most 2500 of them or 10 s;
* the first probe that lands on one of the N open ports reaches a hard-side socket; its pong (and
  that socket's next ping, now admitted by the easy side's firewall) completes the path.

With N open ports out of M = 64,512 and k distinct probes, the chance of at least one hit is
``1 − C(M−N, k) / C(M, k)`` (:func:`success_probability`): 64% for 256 × 256, 98% for 256 × 1024
(the article's 10 s at 100 probes/s), 99.97% for 256 × 2048. natlib sends 2500 in 10 s (250/s),
99.996%: at 100/s one attempt in 30 missed the 10 s mark in our lab (the probing starts a second
or two into that window, and a busy host sends late), and a miss costs a minute on the relay.
Two hard sides square the search space (:func:`hard_hard_success_probability`): 256 probes a
side give about 0%, which is why hard ↔ hard stays on the relay.

:class:`HardSidePlan` and :class:`EasySidePlan` are the two halves, each a small state machine in
the style of :class:`natlib.path.PeerPath`: inputs carry ``now``; outputs are
:class:`SendProbe` actions (:meth:`take_actions`) and one timer (:meth:`next_deadline` /
:meth:`handle_timer`). The driver seals each probe as a disco Ping with the given TxID, routes
authenticated disco pings and pongs that belong to a plan back to it, and on
:class:`ProbeSucceeded` keeps the winning socket (hard side) for the peer, closes the others, and
hands the address to :meth:`natlib.path.PeerPath.add_candidate`. Both plans end by themselves:
:class:`ProbeGaveUp` after the time limit, and nothing is sent after success or giving up.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

from .disco import AddrPort, IPAddress, new_tx_id

__all__ = [
    "EASY_MAX_PROBES",
    "EASY_PROBE_RATE",
    "HARD_REFRESH_INTERVAL",
    "HARD_SEND_RATE",
    "HARD_SOCKETS",
    "PORT_SPACE",
    "PROBE_TIME_LIMIT",
    "RETRY_INTERVAL",
    "RETRY_INTERVAL_MAX",
    "BirthdayConfig",
    "EasySidePlan",
    "HardSidePlan",
    "PlanAction",
    "PlanState",
    "ProbeGaveUp",
    "ProbeSucceeded",
    "SendProbe",
    "hard_hard_success_probability",
    "probes_needed",
    "retry_interval",
    "success_probability",
]

MIN_PORT: Final = 1024
MAX_PORT: Final = 65535
PORT_SPACE: Final = MAX_PORT - MIN_PORT + 1  # 64,512: NATs rarely hand out ports below 1024
HARD_SOCKETS: Final = 256
"""Local sockets (hence NAT mappings) the hard side opens towards the easy side's endpoint."""
HARD_SEND_RATE: Final = 2560.0
"""Pings per second from the hard side: a round over 256 sockets takes 0.1 s. All go to one
destination, so this is not scan-like."""
HARD_REFRESH_INTERVAL: Final = 3.0
"""Each hard-side socket pings again this often, keeping its mapping and retrying the easy side's
filter (which opens as soon as the easy side has probed that port)."""
EASY_PROBE_RATE: Final = 250.0
"""Probes per second from the easy side: small disco pings, 25 kB/s for ten seconds at most."""
EASY_MAX_PROBES: Final = 2500
"""Distinct ports the easy side tries at most: 99.996% success against 256 open ports."""
PROBE_TIME_LIMIT: Final = 11.0
"""Both sides give up this long after starting (2500 probes at 250/s, plus a second for pongs)."""


RETRY_INTERVAL: Final = 60.0
"""After an attempt, the next one toward the same peer waits at least this long ..."""
RETRY_INTERVAL_MAX: Final = 1920.0
"""... doubled after each attempt in a row that found nothing, up to 32 minutes."""


def retry_interval(misses: int) -> float:
    """How long after an attempt the next one may start, given the attempts in a row that found
    nothing (0 after a success). A pair that cannot connect (hard ↔ hard, a firewall that drops
    UDP) then costs 2500 probes a minute at first and one round every half hour after five misses.

    >>> [retry_interval(n) for n in range(8)]
    [60.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 1920.0]
    """
    if misses < 0:
        raise ValueError("misses must not be negative")
    return min(RETRY_INTERVAL * float(2 ** max(0, misses - 1)), RETRY_INTERVAL_MAX)


# -- the numbers -----------------------------------------------------------------------------------


def success_probability(
    open_ports: int = HARD_SOCKETS, probes: int = EASY_MAX_PROBES, port_space: int = PORT_SPACE
) -> float:
    """Chance that ``probes`` distinct random ports hit at least one of ``open_ports`` random ports
    out of ``port_space``: ``1 − C(M−N, k) / C(M, k)`` (exact; probes do not repeat a port)."""
    if not 0 <= open_ports <= port_space or not 0 <= probes <= port_space:
        raise ValueError("open_ports and probes must be within 0..port_space")
    if probes + open_ports > port_space:
        return 1.0
    log_miss = (
        math.lgamma(port_space - open_ports + 1)
        - math.lgamma(port_space - open_ports - probes + 1)
        - math.lgamma(port_space + 1)
        + math.lgamma(port_space - probes + 1)
    )
    return -math.expm1(log_miss)


def hard_hard_success_probability(probes_per_side: int, port_space: int = PORT_SPACE) -> float:
    """Both sides behind EDM NATs: every probe opens a fresh random port on its own side *and*
    aims at a random one on the other, so a hit needs a matching (source, destination) pair out
    of ``port_space²``: about ``1 − exp(−k² / M²)``."""
    if probes_per_side < 0:
        raise ValueError("probes_per_side must not be negative")
    return -math.expm1(-(probes_per_side * probes_per_side) / (port_space * port_space))


def probes_needed(target: float, open_ports: int = HARD_SOCKETS, port_space: int = PORT_SPACE) -> int:
    """The fewest distinct probes for :func:`success_probability` to reach ``target`` (0 < target < 1)."""
    if not 0 < target < 1:
        raise ValueError("target must be strictly between 0 and 1")
    lo, hi = 0, port_space - open_ports
    while lo < hi:
        mid = (lo + hi) // 2
        if success_probability(open_ports, mid, port_space) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


# -- actions and configuration ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendProbe:
    """Send a disco ``Ping(tx_id)`` from local socket ``socket`` (0 on the easy side) to ``addr``."""

    socket: int
    addr: AddrPort
    tx_id: bytes


@dataclass(frozen=True, slots=True)
class ProbeSucceeded:
    """A path exists: from local ``socket`` to the peer at ``addr``, found ``elapsed`` s in."""

    socket: int
    addr: AddrPort
    elapsed: float
    probes_sent: int


@dataclass(frozen=True, slots=True)
class ProbeGaveUp:
    """The time limit passed without a hit; stay on the relay."""

    elapsed: float
    probes_sent: int


PlanAction: TypeAlias = SendProbe | ProbeSucceeded | ProbeGaveUp


class PlanState(enum.Enum):
    WAITING = "waiting"  # before the start time
    PROBING = "probing"
    SUCCEEDED = "succeeded"
    GAVE_UP = "gave-up"


@dataclass(frozen=True, slots=True)
class BirthdayConfig:
    """Sizes, rates and limits; the defaults are the module constants."""

    hard_sockets: int = HARD_SOCKETS
    hard_send_rate: float = HARD_SEND_RATE
    hard_refresh_interval: float = HARD_REFRESH_INTERVAL
    easy_probe_rate: float = EASY_PROBE_RATE
    easy_max_probes: int = EASY_MAX_PROBES
    time_limit: float = PROBE_TIME_LIMIT
    min_port: int = MIN_PORT
    max_port: int = MAX_PORT

    def __post_init__(self) -> None:
        if self.hard_sockets < 1 or self.easy_max_probes < 1:
            raise ValueError("hard_sockets and easy_max_probes must be positive")
        if self.hard_send_rate <= 0 or self.easy_probe_rate <= 0 or self.hard_refresh_interval <= 0:
            raise ValueError("rates and intervals must be positive")
        if not 1 <= self.min_port <= self.max_port <= MAX_PORT:
            raise ValueError("bad port range")
        if self.easy_max_probes > self.max_port - self.min_port + 1:
            raise ValueError("more probes than ports")

    def expected_success(self) -> float:
        """:func:`success_probability` for these sizes."""
        return success_probability(self.hard_sockets, self.easy_max_probes, self.max_port - self.min_port + 1)


# -- the two halves --------------------------------------------------------------------------------


class _Plan:
    """Shared bookkeeping: start time, state, the actions queue, the tx ids we sent."""

    def __init__(
        self, now: float, start_delay: float, config: BirthdayConfig, tx_id_factory: Callable[[], bytes]
    ) -> None:
        self.config = config
        self.started_at = now + start_delay
        self.state = PlanState.WAITING if start_delay > 0 else PlanState.PROBING
        self.probes_sent = 0
        self._new_tx_id = tx_id_factory
        self._tx_ids: dict[bytes, int] = {}  # tx id → socket it was sent from
        self._next_send: float | None = self.started_at
        self._actions: list[PlanAction] = []

    @property
    def finished(self) -> bool:
        return self.state in (PlanState.SUCCEEDED, PlanState.GAVE_UP)

    def take_actions(self) -> list[PlanAction]:
        actions, self._actions = self._actions, []
        return actions

    def next_deadline(self) -> float | None:
        if self.finished:
            return None
        deadline = self.started_at + self.config.time_limit
        return deadline if self._next_send is None else min(deadline, self._next_send)

    def handle_timer(self, now: float) -> None:
        if self.finished or now < self.started_at:
            return
        self.state = PlanState.PROBING
        if now >= self.started_at + self.config.time_limit:
            self.state = PlanState.GAVE_UP
            self._next_send = None
            self._actions.append(ProbeGaveUp(now - self.started_at, self.probes_sent))
            return
        while self._next_send is not None and self._next_send <= now:
            self._next_send = self._send_due(self._next_send)

    def _send_due(self, due: float) -> float | None:
        """Send what is due at ``due``; return when the next send is due (None: nothing more)."""
        raise NotImplementedError

    def _probe(self, socket: int, addr: AddrPort) -> None:
        tx_id = self._new_tx_id()
        self._tx_ids[tx_id] = socket
        self.probes_sent += 1
        self._actions.append(SendProbe(socket, addr, tx_id))

    def _succeed(self, now: float, socket: int, addr: AddrPort) -> None:
        if self.finished:
            return
        self.state = PlanState.SUCCEEDED
        self._next_send = None
        self._actions.append(ProbeSucceeded(socket, addr, max(0.0, now - self.started_at), self.probes_sent))


class HardSidePlan(_Plan):
    """The EDM side: ``config.hard_sockets`` sockets, each pinging the easy side's endpoint.

    The driver opens that many UDP sockets (index 0 .. N−1) before starting, and reports disco
    packets from the easy peer that arrive on them: :meth:`on_ping` (an easy-side probe got in)
    and :meth:`on_pong` (the easy side answered one of our pings).
    """

    def __init__(
        self,
        now: float,
        easy_endpoint: AddrPort,
        *,
        start_delay: float = 0.0,
        config: BirthdayConfig | None = None,
        tx_id_factory: Callable[[], bytes] = new_tx_id,
    ) -> None:
        super().__init__(now, start_delay, config or BirthdayConfig(), tx_id_factory)
        self.easy_endpoint = easy_endpoint
        self._round_socket = 0
        self._round_started = self.started_at

    @property
    def sockets(self) -> int:
        return self.config.hard_sockets

    def _send_due(self, due: float) -> float | None:
        cfg = self.config
        self._probe(self._round_socket, self.easy_endpoint)
        self._round_socket += 1
        if self._round_socket >= cfg.hard_sockets:
            self._round_socket = 0  # a round is done: the next one refreshes every mapping
            self._round_started = max(
                self._round_started + cfg.hard_refresh_interval, due + 1 / cfg.hard_send_rate
            )
        # From the round's start, not by adding intervals: no drift above the rate.
        return self._round_started + self._round_socket / cfg.hard_send_rate

    def on_ping(self, now: float, socket: int, src: AddrPort) -> None:
        """An authenticated disco ping from the easy peer arrived on ``socket`` from ``src``."""
        if 0 <= socket < self.config.hard_sockets:
            self._succeed(now, socket, src)

    def on_pong(self, now: float, tx_id: bytes, socket: int, src: AddrPort) -> None:
        """An authenticated pong arrived on ``socket``; ours if the TxID is one we sent from there."""
        if self._tx_ids.get(tx_id) == socket and src == self.easy_endpoint:
            self._succeed(now, socket, src)


class EasySidePlan(_Plan):
    """The EIM side: probes the hard side's public IP at distinct random ports from one socket.

    The driver reports authenticated disco packets from the hard peer: :meth:`on_pong` (a probe
    reached a hard-side socket) and :meth:`on_ping` (a hard-side socket got through our filter,
    which one of our probes opened).
    """

    def __init__(
        self,
        now: float,
        hard_ip: IPAddress,
        *,
        start_delay: float = 0.0,
        config: BirthdayConfig | None = None,
        rng: random.Random | None = None,
        tx_id_factory: Callable[[], bytes] = new_tx_id,
    ) -> None:
        super().__init__(now, start_delay, config or BirthdayConfig(), tx_id_factory)
        self.hard_ip = hard_ip
        cfg = self.config
        rng = rng if rng is not None else random.SystemRandom()
        self._ports = rng.sample(range(cfg.min_port, cfg.max_port + 1), cfg.easy_max_probes)
        self._probed: set[int] = set()

    def _send_due(self, due: float) -> float | None:
        port = self._ports[self.probes_sent]
        self._probed.add(port)
        self._probe(0, AddrPort(self.hard_ip, port))
        if self.probes_sent >= self.config.easy_max_probes:
            return None
        return self.started_at + self.probes_sent / self.config.easy_probe_rate  # no drift

    def on_pong(self, now: float, tx_id: bytes, src: AddrPort) -> None:
        if tx_id in self._tx_ids and src.ip == self.hard_ip:
            self._succeed(now, 0, src)

    def on_ping(self, now: float, src: AddrPort) -> None:
        """A ping from the hard peer over UDP: it only passes our filter from a port we probed."""
        if src.ip == self.hard_ip and src.port in self._probed:
            self._succeed(now, 0, src)
