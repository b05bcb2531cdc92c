"""Path selection for one peer: relay first, then the best direct UDP path, and back (sans-io).

:class:`PeerPath` decides, for every datagram to one peer, whether it goes directly over UDP, over
the relay (DERP), or over both; and it decides when to send disco pings, pongs and CallMeMaybe.
It never touches a socket or a clock: every input carries ``now`` (seconds, any monotonic origin),
and outputs are action objects queued for the driver (:meth:`PeerPath.take_actions`) plus one
timer (:meth:`PeerPath.next_deadline`, to be answered with :meth:`PeerPath.handle_timer`).

Driver contract (what ``natlib.Conn`` does for each peer)::

    targets = path.note_sent(now, datagram)        # per datagram: where to send it
    path.on_ping(now, ping, src) / on_pong(...) / on_call_me_maybe(...)   # opened disco packets
    path.handle_timer(now)                         # when now >= path.next_deadline()
    for action in path.take_actions(): ...         # after every call above

Actions: :class:`SendDiscoPing` (seal ``Ping(tx_id, our node key)``, send by UDP),
:class:`SendDiscoPong`, :class:`SendCallMeMaybe` (our fresh endpoints, over the relay),
:class:`ResendViaRelay` and :class:`PathChanged` (the structured event for the application).
``src=None`` in the inputs means "arrived over the relay". The driver passes a CallMeMaybe only if
it came over the relay from the peer's known disco key. Cancellation is the driver's business:
the machine holds no tasks, so dropping it (say, when the peer is removed) is enough.

States and transitions (the reported :class:`PathKind` is in brackets)::

    RELAY [RELAY] ── pong from a candidate over UDP ──────────────────────► DIRECT
      no best UDP address; data → relay only; on send: ping every candidate (≥ 5 s apart each)
      and, if any ping went out, send CallMeMaybe over the relay; heartbeat repeats this.

    DIRECT [DIRECT] ── pong on the best address ──► DIRECT (trust extended to now + 6.5 s)
      best address trusted; data → UDP only, each datagram also kept (bounded) until a later
      ping on that address is answered; a "confirm" ping follows unconfirmed data within 250 ms
      (at once under heavy traffic, when an eighth of the buffer is waiting for one).
      ── pong from a better candidate (betterAddr, §1.7) ──► DIRECT on the new address
      ── a ping to the best address overdue (failover timeout, ≤ 1 s) ──► BOTH, and every
         unconfirmed datagram is re-sent over the relay (ResendViaRelay): nothing is lost
      ── trust expires (idle: no heartbeats) ──► BOTH
      ── unconfirmed-datagram buffer full ──► that datagram (and the next) go on both, untrusted

    BOTH [BOTH] ── any pong from a candidate over UDP ──► DIRECT (that candidate becomes best)
      best address known but untrusted; data → UDP *and* relay; discovery as in RELAY.
      while data flows, one re-probe ping to the best address is kept in flight.
      ── a ping to the best address times out (5 s) with no later ping answered ──► RELAY

    any ── link change (on_link_change) or send error to the best address ──► RELAY

Received pings always get a pong (over UDP to the source, or over the relay if they came that
way); one from an unknown address adds a "peer-reflexive" candidate, kept 45 s after its last
ping. A received CallMeMaybe replaces the candidates of the previous one, resets every
candidate's ping gap and pings them all at once (without sending a CallMeMaybe back).

Differences from Tailscale's magicsock (nat-traversal.md §1), and why:

* **Failover in ≤ 2 s with no datagram lost** (Tailscale: up to 6.5 s of black hole). While the
  path is trusted, Tailscale sends UDP only and notices a dead path when trust lapses, 6.5 s after
  the last pong; what it sent in between is lost. Here every datagram sent by UDP alone stays in a
  bounded buffer until a ping sent *after* it is answered (pongs travel the same path, so the pong
  proves the datagram got there). A "confirm" ping follows unconfirmed data within
  :data:`CONFIRM_DELAY` (at most 4 pings/s while data flows, 124 bytes each); when a ping to the
  best address gets no pong within the :data:`FAILOVER_TIMEOUT_MIN`..:data:`FAILOVER_TIMEOUT_MAX`
  window (3 × RTT + 100 ms, clamped to 0.25..1 s), trust is revoked at once, the buffered datagrams
  are re-sent over the relay and later ones go over both. Worst case for a datagram: 0.25 s +
  1 s = 1.25 s late, never lost. The price is duplicates around a failover, which WireGuard's
  replay window drops. If the buffer fills (:data:`UNCONFIRMED_MAX_DATAGRAMS` or
  :data:`UNCONFIRMED_MAX_BYTES`), data goes over both instead, so memory stays bounded.
  The trust window itself stays 6.5 s: loss is detected per datagram, so it no longer sets the
  failover time, and a shorter one would only duplicate traffic onto the relay while idle.
  A randomly lost ping costs a *spurious* failover (duplicates for about one RTT): right after
  it, a re-probe ping goes to the same address and its pong restores trust. Evidence is judged
  by age: an overdue or timed-out ping is ignored once a ping sent after it has been answered, so
  a recovered path does not flap. The failover timeout uses the largest of the last 8 RTTs, so
  latency spikes under load are not taken for failures.
* **Ping back on a received ping**: a ping from a candidate while we have no trusted path to it
  is answered with a pong *and* our own ping to it (once per candidate per 5 s). The peer has just
  opened its NAT towards us, so our ping passes; both sides are direct after about one relay
  one-way trip plus 1.5 direct round trips, instead of waiting for the next ping round.
* **Pongs must come from the pinged address** (stricter than needed, costs nothing).
* **Heavy traffic**: a confirm ping goes out at once when an eighth of the buffer is waiting for
  one, so about two RTTs of traffic are held, not CONFIRM_DELAY's worth.

Everything else (heartbeat 3 s while active, idle after 45 s, upgrade search every 60 s unless
RTT ≤ 5 ms, ping timeout 5 s, per-candidate ping gap 5 s, 100 candidates, 64 pongs of history,
betterAddr) has Tailscale's values, in :class:`PathConfig`.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, NamedTuple, TypeAlias

from ._counters import PathCounters
from .disco import AddrPort, IPAddress, Ping, Pong, new_tx_id

__all__ = [
    "CANDIDATE_LIMIT",
    "CONFIRM_DELAY",
    "DISCO_PING_INTERVAL",
    "FAILOVER_TIMEOUT_MAX",
    "FAILOVER_TIMEOUT_MIN",
    "GOOD_ENOUGH_LATENCY",
    "HEARTBEAT_INTERVAL",
    "PEER_REFLEXIVE_LIFETIME",
    "PING_TIMEOUT",
    "PONG_HISTORY_LEN",
    "SESSION_ACTIVE_TIMEOUT",
    "TRUST_UDP_DURATION",
    "UNCONFIRMED_MAX_BYTES",
    "UNCONFIRMED_MAX_DATAGRAMS",
    "UPGRADE_INTERVAL",
    "Action",
    "CandidateInfo",
    "PathChanged",
    "PathConfig",
    "PathCounters",
    "PathKind",
    "PeerPath",
    "PingPurpose",
    "PongRecord",
    "ResendViaRelay",
    "ScoredAddr",
    "SendCallMeMaybe",
    "SendDiscoPing",
    "SendDiscoPong",
    "SendTargets",
    "better_addr",
    "usable_endpoint",
]

logger = logging.getLogger(__name__)

# -- constants (seconds) ------------------------------------------------------------------------------
# Tailscale's values (nat-traversal.md §1.1), unchanged:
HEARTBEAT_INTERVAL: Final = 3.0
"""While the session is active, ping the best address this often (Tailscale ``heartbeatInterval``)."""
TRUST_UDP_DURATION: Final = 6.5
"""After each pong on the best address, send by UDP alone until this much later."""
SESSION_ACTIVE_TIMEOUT: Final = 45.0
"""No data sent for this long: the session is idle and heartbeats stop."""
PEER_REFLEXIVE_LIFETIME: Final = 45.0
"""A candidate learned from a received ping lives this long after the last ping from it."""
UPGRADE_INTERVAL: Final = 60.0
"""Re-ping every candidate this often, looking for a better path..."""
GOOD_ENOUGH_LATENCY: Final = 0.005
"""...unless the best path's RTT is at most this."""
PING_TIMEOUT: Final = 5.0
"""A ping without a pong for this long is lost; lost on an untrusted best address clears it."""
DISCO_PING_INTERVAL: Final = 5.0
"""Minimum gap between discovery pings to one candidate (reset by a received CallMeMaybe)."""
CANDIDATE_LIMIT: Final = 100
PONG_HISTORY_LEN: Final = 64

# Ours, for failover within 2 s without loss (see the module docstring):
CONFIRM_DELAY: Final = 0.25
"""A ping follows any datagram sent by UDP alone within this time, to confirm it arrived."""
FAILOVER_TIMEOUT_MIN: Final = 0.25
FAILOVER_TIMEOUT_MAX: Final = 1.0
"""A ping to the best address is overdue after 3 × RTT + 100 ms, clamped to these bounds."""
UNCONFIRMED_MAX_DATAGRAMS: Final = 4096
UNCONFIRMED_MAX_BYTES: Final = 4 << 20
"""Bounds of the buffer of datagrams sent by UDP alone and not yet confirmed. A confirm ping goes
out at once when an eighth of either is sent without a ping after it."""
_EARLY_CONFIRM_FRACTION: Final = 8


@dataclass(frozen=True, slots=True)
class PathConfig:
    """The timing constants of one :class:`PeerPath`; the defaults are the module constants."""

    heartbeat_interval: float = HEARTBEAT_INTERVAL
    trust_udp_duration: float = TRUST_UDP_DURATION
    session_active_timeout: float = SESSION_ACTIVE_TIMEOUT
    peer_reflexive_lifetime: float = PEER_REFLEXIVE_LIFETIME
    upgrade_interval: float = UPGRADE_INTERVAL
    good_enough_latency: float = GOOD_ENOUGH_LATENCY
    ping_timeout: float = PING_TIMEOUT
    disco_ping_interval: float = DISCO_PING_INTERVAL
    candidate_limit: int = CANDIDATE_LIMIT
    pong_history_len: int = PONG_HISTORY_LEN
    confirm_delay: float = CONFIRM_DELAY
    failover_timeout_min: float = FAILOVER_TIMEOUT_MIN
    failover_timeout_max: float = FAILOVER_TIMEOUT_MAX
    unconfirmed_max_datagrams: int = UNCONFIRMED_MAX_DATAGRAMS
    unconfirmed_max_bytes: int = UNCONFIRMED_MAX_BYTES

    def failover_timeout(self, rtt: float | None) -> float:
        if rtt is None:
            return self.failover_timeout_max
        return min(self.failover_timeout_max, max(self.failover_timeout_min, 3 * rtt + 0.1))


# -- scoring (nat-traversal.md §1.7) ---------------------------------------------------------------------

_PRIVATE_NETS: Final = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_LINK_LOCAL_NETS: Final = tuple(ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10"))


def _bonus(ip: IPAddress) -> int:
    # Go's netip semantics, not Python's broader is_private: RFC 1918 and fc00::/7 only.
    points = 0
    if ip.is_loopback:
        points += 50
    elif any(ip in net for net in _LINK_LOCAL_NETS):
        points += 30
    elif any(ip in net for net in _PRIVATE_NETS):
        points += 20
    if ip.version == 6:
        points += 10
    return points


@dataclass(frozen=True, slots=True)
class ScoredAddr:
    """An address with what :func:`better_addr` compares: measured RTT (seconds), whether it runs
    through a UDP relay (never natlib's DERP fallback, which is not a candidate), and wire MTU."""

    addr: AddrPort
    rtt: float
    relayed: bool = False
    wire_mtu: int = 0


def better_addr(a: ScoredAddr | None, b: ScoredAddr | None) -> bool:
    """Whether ``a`` is a better path than ``b``: Tailscale's ``betterAddr``, exactly (§1.7).

    Direct beats relayed; the faster address gets ``100 − fast×100 / slow`` points (integer
    arithmetic on nanoseconds); loopback +50, else link-local +30, else private +20; IPv6 +10;
    and less than about 1% (``a`` ≤ 1 point against 0) never wins.
    """
    if a is None:
        return False
    if b is None:
        return True
    if a.addr == b.addr:
        return a.wire_mtu > b.wire_mtu
    if a.relayed != b.relayed:
        return not a.relayed
    a_ns, b_ns = round(a.rtt * 1e9), round(b.rtt * 1e9)
    a_points = b_points = 0
    if a_ns > b_ns and a_ns > 0:
        b_points = 100 - (b_ns * 100) // a_ns
    elif b_ns > 0:
        a_points = 100 - (a_ns * 100) // b_ns
    a_points += _bonus(a.addr.ip)
    b_points += _bonus(b.addr.ip)
    if a_points <= 1 and b_points == 0:
        return False
    return a_points > b_points


def usable_endpoint(addr: AddrPort) -> bool:
    """Whether a peer-advertised endpoint is worth pinging (no port 0, unspecified, multicast)."""
    ip = addr.ip
    return addr.port != 0 and not ip.is_unspecified and not ip.is_multicast and ip != _BROADCAST


_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")


# -- actions -----------------------------------------------------------------------------------------------


class PingPurpose(enum.Enum):
    DISCOVERY = "discovery"  # looking for a path (rate-limited per candidate)
    HEARTBEAT = "heartbeat"  # keeping the best path alive and trusted
    CONFIRM = "confirm"  # proving that datagrams sent by UDP alone arrived
    PING_BACK = "ping-back"  # answering a received ping from a path we do not trust yet


@dataclass(frozen=True, slots=True)
class SendDiscoPing:
    """Send ``Ping(tx_id, our node key)`` to ``addr`` over UDP."""

    addr: AddrPort
    tx_id: bytes
    purpose: PingPurpose


@dataclass(frozen=True, slots=True)
class SendDiscoPong:
    """Answer a ping: ``Pong(tx_id, src=addr)`` to ``addr`` over UDP; ``addr`` None: over the
    relay, with the relay's placeholder address as ``src``."""

    addr: AddrPort | None
    tx_id: bytes


@dataclass(frozen=True, slots=True)
class SendCallMeMaybe:
    """Send our current endpoints in a CallMeMaybe over the relay (re-gathering them first if they
    are stale, 27 s in Tailscale)."""


@dataclass(frozen=True, slots=True)
class ResendViaRelay:
    """Re-send these datagrams over the relay: they went by UDP alone over a path that just failed."""

    datagrams: tuple[bytes, ...]


class PathKind(enum.Enum):
    RELAY = "relay"  # relay only
    DIRECT = "direct"  # UDP only (trusted)
    BOTH = "both"  # UDP and relay (best address untrusted)


@dataclass(frozen=True, slots=True)
class PathChanged:
    """The path to the peer changed; also the answer of :meth:`PeerPath.path`.

    ``addr`` is the best UDP address (None on RELAY), ``rtt`` its latest RTT in seconds, ``since``
    the time the current kind and address were entered.
    """

    kind: PathKind
    addr: AddrPort | None
    rtt: float | None
    since: float


Action: TypeAlias = SendDiscoPing | SendDiscoPong | SendCallMeMaybe | ResendViaRelay | PathChanged


class SendTargets(NamedTuple):
    """Where one datagram goes: ``udp`` (None: not by UDP) and/or the relay. A tuple, so
    ``udp, via_relay = path.note_sent(now, datagram)`` works."""

    udp: AddrPort | None
    via_relay: bool


# -- per-candidate state ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PongRecord:
    at: float
    rtt: float
    pong_src: AddrPort
    """Our address as the peer saw it (every pong is a free STUN answer)."""


_RTT_SAMPLES_FOR_TIMEOUT: Final = 8


@dataclass(slots=True)
class _Candidate:
    addr: AddrPort
    from_control: bool = False  # set_endpoints (the coordination server / add_peer)
    from_call_me_maybe: bool = False
    last_got_ping: float | None = None  # peer-reflexive: learned from a received ping
    last_ping: float | None = None  # last discovery ping, for the per-candidate gap
    last_ping_back: float | None = None
    last_got_ping_tx: bytes = b""
    pongs: deque[PongRecord] = field(default_factory=deque)

    @property
    def rtt(self) -> float | None:
        return self.pongs[-1].rtt if self.pongs else None

    def recent_max_rtt(self) -> float | None:
        """The largest of the last few RTTs: a latency spike under load is not a failure."""
        recent = list(itertools.islice(reversed(self.pongs), _RTT_SAMPLES_FOR_TIMEOUT))
        return max((p.rtt for p in recent), default=None)

    @property
    def peer_reflexive_only(self) -> bool:
        """Known only because the peer pinged us from it (no advertisement lists it)."""
        return not (self.from_control or self.from_call_me_maybe)

    def expired(self, now: float, lifetime: float) -> bool:
        if not self.peer_reflexive_only:
            return False
        return self.last_got_ping is None or now - self.last_got_ping >= lifetime


@dataclass(frozen=True, slots=True)
class CandidateInfo:
    """A read-only view of one candidate (for status output and tests)."""

    addr: AddrPort
    rtt: float | None
    pongs: tuple[PongRecord, ...]
    peer_reflexive: bool


@dataclass(slots=True)
class _SentPing:
    addr: AddrPort
    sent_at: float
    purpose: PingPurpose
    covers_seq: int  # datagrams with a lower sequence number were sent before this ping
    overdue_at: float | None  # set for pings on a path that carries data alone
    timeout_at: float


@dataclass(slots=True)
class _Unconfirmed:
    seq: int
    addr: AddrPort
    datagram: bytes


# -- the machine ------------------------------------------------------------------------------------------


class PeerPath:
    """The path state machine of one peer. See the module docstring for states and transitions."""

    def __init__(
        self,
        now: float,
        endpoints: Iterable[AddrPort] = (),
        *,
        config: PathConfig | None = None,
        tx_id_factory: Callable[[], bytes] = new_tx_id,
        name: str = "peer",
    ) -> None:
        """``endpoints``: the peer's advertised endpoints (from the coordination server)."""
        self.config = config if config is not None else PathConfig()
        self.counters = PathCounters()
        self.name = name
        self._new_tx_id = tx_id_factory
        self._actions: list[Action] = []
        self._candidates: dict[AddrPort, _Candidate] = {}
        self._sent_pings: dict[bytes, _SentPing] = {}
        self._best: AddrPort | None = None
        self._trust_until = 0.0
        self._last_send: float | None = None
        self._next_heartbeat: float | None = None
        self._last_full_ping: float | None = None
        self._data_seq = 0
        self._unconfirmed: deque[_Unconfirmed] = deque()
        self._unconfirmed_bytes = 0
        self._first_uncovered_at: float | None = None
        self._uncovered_datagrams = self._uncovered_bytes = 0  # sent since the last ping to best
        self._discovery_not_before: float | None = None  # no candidate may be pinged before this
        self._reported = PathChanged(PathKind.RELAY, None, None, now)
        self.set_endpoints(now, endpoints)

    # -- queries ------------------------------------------------------------------------------

    def send_targets(self, now: float) -> SendTargets:
        """Where a datagram sent now goes (no side effects; :meth:`note_sent` is the real send)."""
        if self._best is None:
            return SendTargets(None, True)
        return SendTargets(self._best, not self._trusted(now))

    def path(self, now: float) -> PathChanged:
        """The current path (kind, address, RTT, since)."""
        self._report(now)
        return self._reported

    @property
    def unconfirmed_datagrams(self) -> int:
        """Datagrams sent by UDP alone and not yet confirmed (kept for a loss-free failover)."""
        return len(self._unconfirmed)

    def candidates(self) -> list[CandidateInfo]:
        return [
            CandidateInfo(c.addr, c.rtt, tuple(c.pongs), c.peer_reflexive_only)
            for c in self._candidates.values()
        ]

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must next be called (None: no timer needed)."""
        deadlines: list[float] = []
        for sp in self._sent_pings.values():
            deadlines.append(sp.timeout_at)
            if sp.overdue_at is not None:
                deadlines.append(sp.overdue_at)
        if self._next_heartbeat is not None:
            deadlines.append(self._next_heartbeat)
        if self._first_uncovered_at is not None:
            deadlines.append(self._first_uncovered_at + self.config.confirm_delay)
        if self._best is not None and self._reported.kind is PathKind.DIRECT:
            deadlines.append(self._trust_until)
        return min(deadlines, default=None)

    def take_actions(self) -> list[Action]:
        """The actions queued by the calls so far, in order; the queue is then empty."""
        actions, self._actions = self._actions, []
        return actions

    # -- inputs: data --------------------------------------------------------------------------

    def note_sent(self, now: float, datagram: bytes) -> SendTargets:
        """One datagram is about to be sent: returns where to, and does the bookkeeping (activity,
        discovery when there is no trusted path, buffering for loss-free failover, counters).

        A datagram sent by UDP alone is kept by reference until confirmed (it may come back in a
        :class:`ResendViaRelay`), so it must be an immutable ``bytes``, not a reused buffer.
        """
        self._last_send = now
        if self._next_heartbeat is None:
            self._next_heartbeat = now + self.config.heartbeat_interval
        if not self._trusted(now) and (
            self._discovery_not_before is None or now >= self._discovery_not_before
        ):
            self._discover(now)
        targets = self.send_targets(now)
        if targets.udp is not None and not targets.via_relay and not self._buffer(now, targets.udp, datagram):
            # The unconfirmed buffer is full: stop trusting until a pong catches up.
            self._trust_until = now
            targets = SendTargets(targets.udp, True)
        n = len(datagram)
        if targets.udp is not None:
            self.counters.datagrams_direct += 1
            self.counters.bytes_direct += n
        if targets.via_relay:
            self.counters.datagrams_relay += 1
            self.counters.bytes_relay += n
        self._report(now)
        return targets

    def note_received(self, now: float, nbytes: int, src: AddrPort | None) -> None:
        """A datagram arrived from the peer (by UDP from ``src``, or over the relay if None)."""
        if src is None:
            self.counters.bytes_received_relay += nbytes
        else:
            self.counters.bytes_received_direct += nbytes

    def note_send_error(self, now: float, addr: AddrPort) -> None:
        """Sending to ``addr`` failed with "unreachable": forget it as best and its history."""
        cand = self._candidates.get(addr)
        if cand is not None:
            cand.pongs.clear()
        if addr == self._best:
            self._replay_to(addr)
            self._best = None
            self._trust_until = 0.0
        self._report(now)

    # -- inputs: disco -------------------------------------------------------------------------

    def set_endpoints(self, now: float, endpoints: Iterable[AddrPort]) -> None:
        """The peer's advertised endpoints (from the coordination server) changed."""
        wanted = dict.fromkeys(a for a in endpoints if usable_endpoint(a))  # a set, in the given order
        for addr, cand in list(self._candidates.items()):
            if cand.from_control and addr not in wanted:
                cand.from_control = False
                self._drop_if_unsourced(now, cand)
        for addr in wanted:
            added = self._add_candidate(now, addr)
            if added is not None:
                added.from_control = True

    def add_candidate(self, now: float, addr: AddrPort) -> None:
        """A path to ``addr`` was found outside disco (e.g. :mod:`natlib.birthday`): ping it now.

        It lives like a candidate learned from a received ping (45 s after the last ping from it).
        """
        cand = self._add_candidate(now, addr)
        if cand is None:
            return
        if cand.peer_reflexive_only:
            cand.last_got_ping = now
        cand.last_ping = now
        self._send_ping(now, addr, PingPurpose.DISCOVERY)
        self._report(now)

    def on_ping(self, now: float, ping: Ping, src: AddrPort | None) -> None:
        """A ping from the peer arrived by UDP from ``src``, or over the relay if ``src`` is None."""
        self.counters.pings_received += 1
        if src is None:
            self._pong(None, ping.tx_id)
            return
        cand = self._candidates.get(src)
        if cand is not None and cand.last_got_ping_tx == ping.tx_id:
            self.counters.pings_duplicate += 1  # the same ping twice (e.g. two sockets): answer once
            return
        if cand is None:
            cand = self._add_candidate(now, src)
        if cand is not None:
            cand.last_got_ping = now
            cand.last_got_ping_tx = ping.tx_id
        self._pong(src, ping.tx_id)
        if cand is not None and not (src == self._best and self._trusted(now)):
            last = cand.last_ping_back
            if last is None or now - last >= self.config.disco_ping_interval:
                cand.last_ping_back = now
                self._send_ping(now, src, PingPurpose.PING_BACK)
        self._report(now)

    def on_pong(self, now: float, pong: Pong, src: AddrPort | None) -> None:
        """A pong arrived by UDP from ``src``, or over the relay if ``src`` is None."""
        sp = self._sent_pings.get(pong.tx_id)
        if sp is None or src is None or src != sp.addr:
            # Unknown or expired TxID, a pong over the relay (never makes a direct path), or a pong
            # from somewhere else than where the ping went.
            self.counters.pongs_ignored += 1
            return
        del self._sent_pings[pong.tx_id]
        self.counters.pongs_received += 1
        self._confirm(sp)
        rtt = max(0.0, now - sp.sent_at)
        cand = self._candidates.get(sp.addr)
        if cand is None:  # pruned meanwhile
            return
        cand.pongs.append(PongRecord(now, rtt, pong.src))
        while len(cand.pongs) > self.config.pong_history_len:
            cand.pongs.popleft()
        best = self._scored(self._best)
        new = ScoredAddr(sp.addr, rtt)
        if self._best != sp.addr and (better_addr(new, best) or not self._trusted(now)):
            old = self._best
            self._best = sp.addr
            if old is not None and any(u.addr == old for u in self._unconfirmed):
                # Datagrams went to the old address: confirm them there before forgetting it.
                self._send_ping(now, old, PingPurpose.CONFIRM)
        if self._best == sp.addr:
            self._trust_until = now + self.config.trust_udp_duration
        self._report(now)

    def on_call_me_maybe(self, now: float, endpoints: Iterable[AddrPort]) -> None:
        """The peer's CallMeMaybe (over the relay, from its known disco key): ping everything now."""
        self.counters.call_me_maybe_received += 1
        # Link-local IPv6 needs a scope that the wire form cannot carry: drop it, like Tailscale.
        usable = [a for a in endpoints if usable_endpoint(a) and not (a.is_ipv6 and a.ip.is_link_local)]
        wanted = usable[: self.config.candidate_limit]
        wanted_set = set(wanted)
        for cand in list(self._candidates.values()):
            if cand.from_call_me_maybe and cand.addr not in wanted_set:
                cand.from_call_me_maybe = False
                self._drop_if_unsourced(now, cand)
        for addr in wanted:
            added = self._add_candidate(now, addr)
            if added is not None:
                added.from_call_me_maybe = True
        for cand in self._candidates.values():
            cand.last_ping = None
        self._ping_candidates(now)  # no CallMeMaybe back: the peer is already pinging us
        self._report(now)

    def on_link_change(self, now: float) -> None:
        """Our network changed (address, interface, NAT rebinding), or the peer's disco key did (it
        restarted): forget every path measurement and start over on the relay."""
        self._replay_to(None)
        self._best = None
        self._trust_until = 0.0
        self._sent_pings.clear()
        self._first_uncovered_at = None
        self._uncovered_datagrams = self._uncovered_bytes = 0
        for cand in self._candidates.values():
            cand.pongs.clear()
            cand.last_ping = None
            cand.last_ping_back = None
        self._discovery_not_before = None
        self._report(now)

    # -- inputs: time ---------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``: ping timeouts, failover, confirmation, heartbeat."""
        cfg = self.config
        for tx_id, sp in list(self._sent_pings.items()):
            if sp.overdue_at is not None and now >= sp.overdue_at:
                sp.overdue_at = None
                self._overdue(now, sp)
            if now >= sp.timeout_at:
                del self._sent_pings[tx_id]
                self.counters.pings_lost += 1
                if (
                    sp.addr == self._best
                    and not self._trusted(now)
                    and not self._answered_since(sp.addr, sp.sent_at)
                ):
                    logger.debug("%s: ping to best %s timed out; back to the relay", self.name, sp.addr)
                    self._replay_to(sp.addr)
                    self._best = None
        if self._first_uncovered_at is not None and now >= self._first_uncovered_at + cfg.confirm_delay:
            if self._best is not None:
                self._send_ping(now, self._best, PingPurpose.CONFIRM)
            self._first_uncovered_at = None
        if self._next_heartbeat is not None and now >= self._next_heartbeat:
            self._heartbeat(now)
        self._prune(now)
        self._report(now)

    # -- internals ----------------------------------------------------------------------------

    def _trusted(self, now: float) -> bool:
        return self._best is not None and now < self._trust_until

    def _active(self, now: float) -> bool:
        return self._last_send is not None and now - self._last_send < self.config.session_active_timeout

    def _scored(self, addr: AddrPort | None) -> ScoredAddr | None:
        if addr is None:
            return None
        cand = self._candidates.get(addr)
        rtt = cand.rtt if cand is not None else None
        return ScoredAddr(addr, rtt) if rtt is not None else None

    def _answered_since(self, addr: AddrPort, sent_at: float) -> bool:
        """Whether a ping to ``addr`` sent after ``sent_at`` has been answered."""
        cand = self._candidates.get(addr)
        if cand is None or not cand.pongs:
            return False
        last = cand.pongs[-1]
        return last.at - last.rtt > sent_at

    def _heartbeat(self, now: float) -> None:
        cfg = self.config
        if not self._active(now):
            self._next_heartbeat = None  # idle: no more heartbeats until the next send
            return
        self._next_heartbeat = now + cfg.heartbeat_interval
        if self._best is not None:
            self._send_ping(now, self._best, PingPurpose.HEARTBEAT)
        if self._want_full_ping(now):
            self._discover(now)

    def _want_full_ping(self, now: float) -> bool:
        if self._best is None or self._last_full_ping is None or not self._trusted(now):
            return True
        cand = self._candidates.get(self._best)
        rtt = cand.rtt if cand is not None else None
        return (rtt is None or rtt > self.config.good_enough_latency) and (
            now - self._last_full_ping >= self.config.upgrade_interval
        )

    def _discover(self, now: float) -> None:
        """Ping every candidate whose gap allows; if any ping went out, ask for a CallMeMaybe back."""
        if self._ping_candidates(now):
            self._actions.append(SendCallMeMaybe())
            self.counters.call_me_maybe_sent += 1

    def _ping_candidates(self, now: float) -> int:
        gap = self.config.disco_ping_interval
        sent = 0
        self._prune(now)
        for cand in self._candidates.values():
            if cand.last_ping is not None and now - cand.last_ping < gap:
                continue
            cand.last_ping = now
            self._send_ping(now, cand.addr, PingPurpose.DISCOVERY)
            sent += 1
        if sent:
            self._last_full_ping = now
        self._discovery_not_before = min(
            (c.last_ping + gap for c in self._candidates.values() if c.last_ping is not None), default=None
        )
        return sent

    def _send_ping(self, now: float, addr: AddrPort, purpose: PingPurpose) -> None:
        tx_id = self._new_tx_id()
        overdue_at = None
        if addr == self._best or any(u.addr == addr for u in self._unconfirmed):
            cand = self._candidates.get(addr)
            overdue_at = now + self.config.failover_timeout(
                cand.recent_max_rtt() if cand is not None else None
            )
        self._sent_pings[tx_id] = _SentPing(
            addr, now, purpose, self._data_seq, overdue_at, now + self.config.ping_timeout
        )
        if addr == self._best:
            self._first_uncovered_at = None  # this ping covers everything sent so far
            self._uncovered_datagrams = self._uncovered_bytes = 0
        self.counters.pings_sent += 1
        self._actions.append(SendDiscoPing(addr, tx_id, purpose))

    def _pong(self, addr: AddrPort | None, tx_id: bytes) -> None:
        self.counters.pongs_sent += 1
        self._actions.append(SendDiscoPong(addr, tx_id))

    def _buffer(self, now: float, addr: AddrPort, datagram: bytes) -> bool:
        cfg = self.config
        if (
            len(self._unconfirmed) >= cfg.unconfirmed_max_datagrams
            or self._unconfirmed_bytes + len(datagram) > cfg.unconfirmed_max_bytes
        ):
            return False
        self._unconfirmed.append(_Unconfirmed(self._data_seq, addr, datagram))
        self._unconfirmed_bytes += len(datagram)
        self._data_seq += 1
        if self._first_uncovered_at is None:
            self._first_uncovered_at = now
        self._uncovered_datagrams += 1
        self._uncovered_bytes += len(datagram)
        if self._uncovered_datagrams >= max(
            1, cfg.unconfirmed_max_datagrams // _EARLY_CONFIRM_FRACTION
        ) or self._uncovered_bytes >= max(1, cfg.unconfirmed_max_bytes // _EARLY_CONFIRM_FRACTION):
            # Heavy traffic: confirm now rather than after CONFIRM_DELAY, so the buffer stays small.
            self._send_ping(now, addr, PingPurpose.CONFIRM)
        return True

    def _confirm(self, sp: _SentPing) -> None:
        """A pong for ``sp`` proves that what went to its address before it arrived."""
        kept: deque[_Unconfirmed] = deque()
        for u in self._unconfirmed:
            if u.addr == sp.addr and u.seq < sp.covers_seq:
                self._unconfirmed_bytes -= len(u.datagram)
            else:
                kept.append(u)
        self._unconfirmed = kept

    def _replay_to(self, addr: AddrPort | None) -> None:
        """Re-send over the relay what went to ``addr`` (None: to any address) unconfirmed."""
        replay = [u for u in self._unconfirmed if addr is None or u.addr == addr]
        if not replay:
            return
        self._unconfirmed = deque(u for u in self._unconfirmed if not (addr is None or u.addr == addr))
        self._unconfirmed_bytes = sum(len(u.datagram) for u in self._unconfirmed)
        if not self._unconfirmed:
            self._first_uncovered_at = None
        self.counters.datagrams_replayed += len(replay)
        self.counters.bytes_replayed += sum(len(u.datagram) for u in replay)
        self._actions.append(ResendViaRelay(tuple(u.datagram for u in replay)))

    def _overdue(self, now: float, sp: _SentPing) -> None:
        """A ping on a path that carried data alone is overdue: assume that path is gone."""
        self.counters.pings_overdue += 1
        if self._answered_since(sp.addr, sp.sent_at):
            return  # a later ping to the same address was answered: stale evidence
        self._replay_to(sp.addr)
        if sp.addr != self._best:
            return
        if self._trusted(now):
            logger.debug("%s: ping to %s overdue; failing over to the relay", self.name, sp.addr)
            self.counters.failovers += 1
            self._trust_until = now
            self._discover(now)
        # While data flows, keep one re-probe in flight: if the loss was random, its pong restores
        # trust one RTT later. The chain ends with a pong, or when the 5 s ping timeout clears best.
        probing = any(p.addr == sp.addr and p.overdue_at is not None for p in self._sent_pings.values())
        if self._active(now) and not probing:
            self._send_ping(now, sp.addr, PingPurpose.HEARTBEAT)

    def _add_candidate(self, now: float, addr: AddrPort) -> _Candidate | None:
        cand = self._candidates.get(addr)
        if cand is not None:
            return cand
        if not usable_endpoint(addr):
            self.counters.candidates_rejected += 1
            return None
        if len(self._candidates) >= self.config.candidate_limit:
            self._prune(now)
        if len(self._candidates) >= self.config.candidate_limit:
            # Evict the peer-reflexive candidate heard from least recently (never the best).
            learned = [c for c in self._candidates.values() if c.peer_reflexive_only and c.addr != self._best]
            if not learned:
                self.counters.candidates_rejected += 1
                return None
            oldest = min(learned, key=lambda c: c.last_got_ping or 0.0)
            del self._candidates[oldest.addr]
        cand = self._candidates[addr] = _Candidate(addr)
        self._discovery_not_before = None  # a new candidate may be pinged at once
        return cand

    def _drop_if_unsourced(self, now: float, cand: _Candidate) -> None:
        if cand.expired(now, self.config.peer_reflexive_lifetime) and cand.addr != self._best:
            del self._candidates[cand.addr]

    def _prune(self, now: float) -> None:
        lifetime = self.config.peer_reflexive_lifetime
        for addr, cand in list(self._candidates.items()):
            if addr != self._best and cand.expired(now, lifetime):
                del self._candidates[addr]

    def _report(self, now: float) -> None:
        if self._best is None:
            kind, addr, rtt = PathKind.RELAY, None, None
        else:
            kind = PathKind.DIRECT if self._trusted(now) else PathKind.BOTH
            cand = self._candidates.get(self._best)
            addr, rtt = self._best, cand.rtt if cand is not None else None
        old = self._reported
        if kind is old.kind and addr == old.addr:
            if rtt != old.rtt:
                self._reported = PathChanged(kind, addr, rtt, old.since)  # RTT updates are not events
            return
        self._reported = PathChanged(kind, addr, rtt, now)
        self.counters.path_switches += 1
        logger.debug("%s: path %s %s rtt=%s", self.name, kind.value, addr, rtt)
        self._actions.append(self._reported)
