"""Our own endpoint candidates: what natlib tells peers to try (in a CallMeMaybe), and when to refresh it.

A **candidate** is a typed ``(ip, port)`` where a peer may reach our UDP socket. The sources, in
the order Tailscale's ``determineEndpoints`` lists them (nat-traversal §1.2, from "farthest but most
reliable" to "closest"):

1. ``portmapped``: the external address a NAT-PMP/PCP/UPnP mapping gives us;
2. ``stun``: the reflexive address STUN servers saw (the best mapping of the round, plus every
   other mapping seen more than once in it, for firewalls that hand out a fresh mapping per
   STUN session while an old one is still alive);
3. ``stun4localport``: behind an endpoint-dependent ("hard") NAT, when our local port is fixed,
   the STUN IPv4 address with our *local* port, on the guess that someone forwarded that port;
4. reflexive candidates remembered from earlier rounds (see below);
5. ``static``: endpoints from configuration (a manual port forward, a load balancer);
6. ``local``: every interface address paired with the bound port.

``peer_reflexive`` (learned from a peer's ping) is defined for the path layer; gathering never
produces it.

Priorities follow RFC 8445 §5.1.2.1: ``2**24 * type_preference + 2**8 * local_preference +
(256 - component)``, with one component (ID 1). Type preferences (:data:`TYPE_PREFERENCE`): host
``local`` 126, ``peer_reflexive`` 110 and server-reflexive ``stun`` 100 as the RFC recommends;
``portmapped`` 105, because the router forwards it from anyone (it is reflexive, but needs no
hole punching, so it beats ``stun`` yet stays below an address a peer has proven); ``static`` 104,
operator-provided and unverified, just below that; ``stun4localport`` 90, a guess, the lowest.
Local preferences (:func:`local_preference`) follow RFC 8421's dual-stack advice and Tailscale's
IPv6 bonus, interleaving families by reach: global IPv6 65535, public IPv4 57344, private IPv6
(ULA fc00::/7) 49152, private IPv4 (RFC 1918 and the 100.64/10 shared space) 40960, link-local
16384 (IPv6) / 8192 (IPv4), loopback 0. "Private" is that explicit list: documentation ranges
count as public here, unlike :attr:`ipaddress.IPv4Address.is_private`.

Everything here except :class:`Gatherer` is sans-io; time is always a parameter:

* :func:`round_endpoints` turns one round's raw results (interface addresses, STUN samples, the
  port-mapped address, static endpoints) into deduplicated, ordered endpoints and the facts
  learned on the way (``mapping_varies_by_dest_ip``). Duplicates keep the type of highest
  priority (RFC 8445 §5.1.3), so a public host's own address is ``local``, not ``stun``.
* :class:`CandidateSet` merges rounds over time: first/last seen and age per candidate; reflexive
  candidates (``portmapped``, ``stun``, ``stun4localport``) stay advertised for
  :data:`ENDPOINT_LIFETIME` (5 min 10 s) after they were last seen, at most
  :data:`MAX_CACHED_PER_IP` per IP, so a flapping NAT does not make us withdraw a mapping a peer
  may still be using. Local and static candidates are facts about now and go as soon as a round
  lacks them. The whole set is capped at :data:`MAX_CANDIDATES`.
* :class:`RefreshSchedule`: re-gather every random 20–26 s while a session is active, stop after
  45 s idle, and tell whether the list is "fresh enough" (27 s) to go into a CallMeMaybe.

:class:`Gatherer` (and :func:`gather`) is the anyio driver: one round runs the STUN probe and the
port-mapping source concurrently with reading the interfaces, and never raises for a failing
source; the :class:`GatherReport` says why a source gave nothing. It runs under trio and asyncio::

    async with await anyio.create_udp_socket(family=socket.AF_INET, local_port=41641) as sock:
        gatherer = Gatherer(
            sock,
            stun_servers=[("198.51.100.10", 3478), ("198.51.100.11", 3478)],
            port_mapping=port_mapper_source(mapper),     # a natlib.portmap.PortMapper, optional
            local_port_fixed=True,                       # 41641 was configured, not random
        )
        report = await gatherer.gather()
        for c in report.candidates:
            print(c.type, c.address, c.priority)         # CandidateType.STUN ('203.0.113.2', 41641) ...
        print(report.errors)                             # {} or {"portmap": "no answer within 2.0 s"}

For roaming, feed :mod:`natlib.netmon` events to :meth:`Gatherer.request_refresh` while
:meth:`Gatherer.run` keeps the list fresh.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeAlias

import anyio
import anyio.abc

from . import netif
from .stunclient import stun_probe

__all__ = [
    "COMPONENT_ID",
    "ENDPOINTS_FRESH_ENOUGH",
    "ENDPOINT_LIFETIME",
    "MAX_CACHED_PER_IP",
    "MAX_CANDIDATES",
    "PORTMAP_TIMEOUT",
    "RESTUN_INTERVAL_MAX",
    "RESTUN_INTERVAL_MIN",
    "SESSION_IDLE_TIMEOUT",
    "STUN_TIMEOUT",
    "TYPE_PREFERENCE",
    "AddressFilter",
    "Candidate",
    "CandidateSet",
    "CandidateType",
    "Endpoint",
    "GatherReport",
    "Gatherer",
    "IPNetwork",
    "PortMapSource",
    "RefreshSchedule",
    "RoundEndpoint",
    "RoundResult",
    "StunProbe",
    "StunSample",
    "candidate_priority",
    "gather",
    "local_preference",
    "port_mapper_source",
    "round_endpoints",
]

log = logging.getLogger(__name__)

Endpoint: TypeAlias = tuple[str, int]
"""A numeric IP address as text (IPv4 unmapped, no IPv6 scope) and a port."""

# --- constants (nat-traversal §1.1, §1.2) ------------------------------------------------------------

ENDPOINT_LIFETIME: Final = 310.0
"""Seconds a reflexive candidate stays advertised after it was last seen (Tailscale: 5 min 10 s)."""
MAX_CACHED_PER_IP: Final = 6
"""At most this many remembered reflexive candidates per IP address."""
MAX_CANDIDATES: Final = 100
"""Cap of the advertised set: a peer prunes stale entries above 100 candidates anyway."""
RESTUN_INTERVAL_MIN: Final = 20.0
RESTUN_INTERVAL_MAX: Final = 26.0
"""Periodic re-gathering happens at a uniformly random interval in this range, under the common
30 s UDP NAT timeout."""
SESSION_IDLE_TIMEOUT: Final = 45.0
"""No periodic re-gathering once nothing was sent to a peer for this long."""
ENDPOINTS_FRESH_ENOUGH: Final = 27.0
"""A candidate list older than this is re-gathered before it goes into a CallMeMaybe."""
STUN_TIMEOUT: Final = 3.0
"""Default STUN budget of one round (netcheck's)."""
PORTMAP_TIMEOUT: Final = 2.0
"""The port-mapping source gets this long per round; a slow router must not hold up gathering."""
COMPONENT_ID: Final = 1
"""natlib has one component per peer (one UDP flow), so the RFC 8445 component ID is always 1."""


class CandidateType(enum.StrEnum):
    """Where a candidate came from."""

    LOCAL = "local"
    STUN = "stun"
    STUN4LOCALPORT = "stun4localport"
    PORTMAPPED = "portmapped"
    STATIC = "static"
    PEER_REFLEXIVE = "peer_reflexive"


TYPE_PREFERENCE: Final[Mapping[CandidateType, int]] = {
    CandidateType.LOCAL: 126,
    CandidateType.PEER_REFLEXIVE: 110,
    CandidateType.PORTMAPPED: 105,
    CandidateType.STATIC: 104,
    CandidateType.STUN: 100,
    CandidateType.STUN4LOCALPORT: 90,
}
"""RFC 8445 type preferences (0–126, distinct per type); see the module docstring for the choice."""

# Order of a round's endpoints (nat-traversal §1.2): farthest-but-most-reliable first, local last.
_ROUND_ORDER: Final[Mapping[CandidateType, int]] = {
    CandidateType.PORTMAPPED: 0,
    CandidateType.STUN: 1,
    CandidateType.STUN4LOCALPORT: 2,
    CandidateType.PEER_REFLEXIVE: 3,
    CandidateType.STATIC: 4,
    CandidateType.LOCAL: 5,
}
_REMEMBERED: Final = frozenset({CandidateType.PORTMAPPED, CandidateType.STUN, CandidateType.STUN4LOCALPORT})

_PRIVATE_V4: Final = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)
_PRIVATE_V6: Final = ipaddress.IPv6Network("fc00::/7")

LOCAL_PREFERENCE_V6_GLOBAL: Final = 65535
LOCAL_PREFERENCE_V4_PUBLIC: Final = 57344
LOCAL_PREFERENCE_V6_PRIVATE: Final = 49152
LOCAL_PREFERENCE_V4_PRIVATE: Final = 40960
LOCAL_PREFERENCE_V6_LINK_LOCAL: Final = 16384
LOCAL_PREFERENCE_V4_LINK_LOCAL: Final = 8192
LOCAL_PREFERENCE_LOOPBACK: Final = 0


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def local_preference(host: str) -> int:
    """RFC 8445 local preference (0–65535) of an address; see the module docstring for the table."""
    ip = _ip(host)
    if ip.is_loopback:
        return LOCAL_PREFERENCE_LOOPBACK
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_link_local:
            return LOCAL_PREFERENCE_V6_LINK_LOCAL
        return LOCAL_PREFERENCE_V6_PRIVATE if ip in _PRIVATE_V6 else LOCAL_PREFERENCE_V6_GLOBAL
    if ip.is_link_local:
        return LOCAL_PREFERENCE_V4_LINK_LOCAL
    return LOCAL_PREFERENCE_V4_PRIVATE if any(ip in n for n in _PRIVATE_V4) else LOCAL_PREFERENCE_V4_PUBLIC


def candidate_priority(kind: CandidateType, host: str, component: int = COMPONENT_ID) -> int:
    """RFC 8445 §5.1.2.1: ``2**24 * type_pref + 2**8 * local_pref + (256 - component)``."""
    if not 1 <= component <= 256:
        raise ValueError(f"component ID {component} out of range 1..256")
    return (TYPE_PREFERENCE[kind] << 24) + (local_preference(host) << 8) + (256 - component)


def _canonical(endpoint: Endpoint) -> Endpoint:
    """Numeric, unmapped, scope-less text form; raises ValueError on a bad address or port."""
    host, port = endpoint
    if not 0 < int(port) < 65536:
        raise ValueError(f"port {port} out of range")
    return str(_ip(str(host))), int(port)


IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class AddressFilter:
    """Interfaces and prefixes natlib must not use as candidates, nor accept disco from.

    A VPN running over natlib (the mesh client's WireGuard interface) puts addresses on the host
    that reach the peers *through natlib itself*; offering them as candidates would let a peer
    validate a "direct" path that is really a tunnel inside the tunnel. ``interfaces`` are names
    (every address on them is left out); ``prefixes`` are networks (an address inside one is left
    out, whichever interface holds it; also peer addresses, see :meth:`excludes_ip`).
    """

    interfaces: frozenset[str] = frozenset()
    prefixes: tuple[IPNetwork, ...] = ()

    @classmethod
    def of(cls, interfaces: Iterable[str] = (), prefixes: Iterable[str | IPNetwork] = ()) -> AddressFilter:
        """Build one from names and prefix texts; :class:`ValueError` names a malformed prefix."""
        nets: list[IPNetwork] = []
        for p in prefixes:
            try:
                nets.append(p if not isinstance(p, str) else ipaddress.ip_network(p, strict=False))
            except ValueError as e:
                raise ValueError(f"excluded prefix {p!r}: {e}") from None
        return cls(frozenset(interfaces), tuple(nets))

    def __bool__(self) -> bool:
        return bool(self.interfaces or self.prefixes)

    def excludes_ip(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> bool:
        """Whether an address (ours or a peer's) lies in an excluded prefix. IPv4-mapped IPv6 counts
        as its IPv4 address; a malformed text is not excluded (the caller rejects it anyway)."""
        if not self.prefixes:
            return False
        if isinstance(ip, str):
            try:
                ip = ipaddress.ip_address(ip.split("%", 1)[0])
            except ValueError:
                return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.prefixes)

    def excludes(self, addr: netif.InterfaceAddress) -> bool:
        """Whether a local interface address is left out (by its interface or its prefix)."""
        return addr.interface in self.interfaces or self.excludes_ip(addr.ip)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One advertised endpoint: its type, address, priority and when it was first and last seen."""

    type: CandidateType
    address: Endpoint
    first_seen: float
    last_seen: float
    source: str = ""
    """What produced it: an interface name, a STUN server, ``"portmap"``, ``"config"``."""

    @property
    def priority(self) -> int:
        return candidate_priority(self.type, self.address[0])

    @property
    def family(self) -> netif.Family:
        return 6 if ":" in self.address[0] else 4

    def age(self, now: float) -> float:
        """Seconds since this address was first seen."""
        return now - self.first_seen

    def idle(self, now: float) -> float:
        """Seconds since this address was last seen by a gathering round."""
        return now - self.last_seen


# --- one round (pure) --------------------------------------------------------------------------------


class StunResultLike(Protocol):
    """What gathering reads from a STUN result (``natlib.stunclient.StunResult`` has it)."""

    @property
    def server(self) -> Endpoint: ...
    @property
    def mapped(self) -> Endpoint | None: ...
    @property
    def rtt(self) -> float | None: ...
    @property
    def error(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class StunSample:
    """One STUN transaction's outcome as gathering sees it."""

    server: Endpoint
    mapped: Endpoint | None
    rtt: float | None = None
    error: str | None = None

    @classmethod
    def of(cls, result: StunResultLike) -> StunSample:
        server = (str(result.server[0]), int(result.server[1]))
        return cls(server, result.mapped, result.rtt, result.error)


@dataclass(frozen=True, slots=True)
class RoundEndpoint:
    """An endpoint produced by one round, before it gets timestamps."""

    type: CandidateType
    address: Endpoint
    source: str = ""


@dataclass(frozen=True, slots=True)
class RoundResult:
    """The output of :func:`round_endpoints`."""

    endpoints: tuple[RoundEndpoint, ...]
    """Deduplicated, in §1.2 order (portmapped, stun, stun4localport, static, local), best priority
    first within a type."""
    mapping_varies_by_dest_ip: bool | None
    """True when IPv4 STUN servers saw different mappings (a "hard" NAT); None with < 2 answers."""
    global_v4: Endpoint | None
    global_v6: Endpoint | None
    rejected: tuple[str, ...] = ()
    """Inputs that were dropped, with the reason (bad addresses, a zero port...)."""


def _best_mappings(samples: Sequence[StunSample]) -> tuple[Endpoint | None, list[Endpoint], bool | None]:
    """The best mapping (most often seen, then lowest RTT), the others seen more than once, and
    whether mappings differ (None with fewer than two answers)."""
    counts: dict[Endpoint, int] = {}
    best_rtt: dict[Endpoint, float] = {}
    for s in samples:
        assert s.mapped is not None
        counts[s.mapped] = counts.get(s.mapped, 0) + 1
        rtt = s.rtt if s.rtt is not None else float("inf")
        best_rtt[s.mapped] = min(best_rtt.get(s.mapped, rtt), rtt)
    if not counts:
        return None, [], None
    ranked = sorted(counts, key=lambda m: (-counts[m], best_rtt[m], m))
    varies = None if len(samples) < 2 else len(counts) > 1
    return ranked[0], [m for m in ranked[1:] if counts[m] > 1], varies


def round_endpoints(
    *,
    local: Iterable[tuple[Endpoint, str]] = (),
    stun: Iterable[StunSample] = (),
    portmapped: Endpoint | None = None,
    static: Iterable[Endpoint] = (),
    local_port: int | None = None,
    local_port_fixed: bool = False,
) -> RoundResult:
    """Turn one round's raw results into ordered, deduplicated endpoints (pure; see the module doc).

    ``local`` pairs each interface address with the bound port and names the interface.
    ``local_port`` is our IPv4 socket's port; with ``local_port_fixed`` (the port was configured,
    not picked by the kernel) and a varying IPv4 mapping, the best STUN IPv4 address paired with it
    becomes a ``stun4localport`` candidate. Malformed inputs are dropped and listed in ``rejected``.
    """
    rejected: list[str] = []
    raw: list[RoundEndpoint] = []

    def add(kind: CandidateType, endpoint: Endpoint, source: str) -> None:
        try:
            raw.append(RoundEndpoint(kind, _canonical(endpoint), source))
        except (ValueError, TypeError) as e:
            rejected.append(f"{kind} {endpoint!r} from {source or '?'}: {e}")

    if portmapped is not None:
        add(CandidateType.PORTMAPPED, portmapped, "portmap")

    answered: dict[int, list[StunSample]] = {4: [], 6: []}
    for s in stun:
        if s.mapped is None:
            continue
        try:
            mapped = _canonical(s.mapped)
        except (ValueError, TypeError) as e:
            rejected.append(f"stun {s.mapped!r} from {s.server!r}: {e}")
            continue
        answered[6 if ":" in mapped[0] else 4].append(StunSample(s.server, mapped, s.rtt, s.error))
    best: dict[int, Endpoint | None] = {}
    varies: bool | None = None
    for fam in (4, 6):
        top, repeated, fam_varies = _best_mappings(answered[fam])
        best[fam] = top
        if fam == 4:
            varies = fam_varies
        if top is not None:
            # Name each mapping after the fastest server that saw it.
            servers: dict[Endpoint | None, Endpoint] = {}
            for sample in sorted(
                answered[fam], key=lambda x: -(x.rtt if x.rtt is not None else float("inf"))
            ):
                servers[sample.mapped] = sample.server
            for mapping in (top, *repeated):
                add(CandidateType.STUN, mapping, f"stun {servers[mapping][0]}:{servers[mapping][1]}")
    if varies and local_port_fixed and local_port and best[4] is not None:
        add(CandidateType.STUN4LOCALPORT, (best[4][0], local_port), "stun ip + local port")

    for endpoint in static:
        add(CandidateType.STATIC, endpoint, "config")
    for endpoint, interface in local:
        add(CandidateType.LOCAL, endpoint, interface)

    # One entry per address: the highest-priority type wins (RFC 8445 §5.1.3, redundant candidates).
    chosen: dict[Endpoint, RoundEndpoint] = {}
    for entry in raw:
        have = chosen.get(entry.address)
        if have is None or TYPE_PREFERENCE[entry.type] > TYPE_PREFERENCE[have.type]:
            chosen[entry.address] = entry
    # Stable sort: within one type and priority, the order of the inputs is kept.
    ordered = sorted(
        chosen.values(), key=lambda c: (_ROUND_ORDER[c.type], -candidate_priority(c.type, c.address[0]))
    )
    return RoundResult(tuple(ordered), varies, best[4], best[6], tuple(rejected))


# --- over time (pure) --------------------------------------------------------------------------------


class CandidateSet:
    """Our advertised candidates across gathering rounds (sans-io: ``now`` is always passed in).

    :meth:`update` takes one round's endpoints and returns the list to advertise: this round's
    endpoints in §1.2 order, with reflexive candidates of earlier rounds that are younger than
    ``lifetime`` (at most ``max_per_ip`` per IP, newest first) placed after this round's reflexive
    ones and before static and local ones; capped at ``max_candidates`` by dropping the stalest
    remembered entries first, then the lowest priorities.
    """

    def __init__(
        self,
        *,
        lifetime: float = ENDPOINT_LIFETIME,
        max_per_ip: int = MAX_CACHED_PER_IP,
        max_candidates: int = MAX_CANDIDATES,
    ) -> None:
        if lifetime < 0 or max_per_ip < 1 or max_candidates < 1:
            raise ValueError("lifetime must be >= 0, max_per_ip and max_candidates >= 1")
        self.lifetime = lifetime
        self.max_per_ip = max_per_ip
        self.max_candidates = max_candidates
        self._known: dict[Endpoint, Candidate] = {}
        self._current: list[Candidate] = []

    def update(self, endpoints: Iterable[RoundEndpoint], now: float) -> list[Candidate]:
        """Merge one round (already deduplicated and ordered, as :func:`round_endpoints` makes it)."""
        fresh: list[Candidate] = []
        seen: set[Endpoint] = set()
        for e in endpoints:
            if e.address in seen:
                continue
            seen.add(e.address)
            old = self._known.get(e.address)
            first = old.first_seen if old is not None else now
            c = Candidate(e.type, e.address, first, now, e.source)
            self._known[e.address] = c
            fresh.append(c)
        # Forget what has expired, and local/static entries this round did not confirm.
        for addr, c in list(self._known.items()):
            if addr in seen:
                continue
            if c.type not in _REMEMBERED or now - c.last_seen > self.lifetime:
                del self._known[addr]
        self._current = self._assemble(fresh, seen)
        return list(self._current)

    def _assemble(self, fresh: list[Candidate], seen: set[Endpoint]) -> list[Candidate]:
        remembered = sorted(
            (c for a, c in self._known.items() if a not in seen),
            key=lambda c: (-c.last_seen, -c.priority, c.address),
        )
        per_ip: dict[str, int] = {}
        for c in fresh:
            if c.type in _REMEMBERED:
                per_ip[c.address[0]] = per_ip.get(c.address[0], 0) + 1
        kept: list[Candidate] = []
        for c in remembered:
            n = per_ip.get(c.address[0], 0)
            if n >= self.max_per_ip:
                del self._known[c.address]
                continue
            per_ip[c.address[0]] = n + 1
            kept.append(c)
        split = next((i for i, c in enumerate(fresh) if c.type not in _REMEMBERED), len(fresh))
        ordered = [*fresh[:split], *kept, *fresh[split:]]
        if len(ordered) > self.max_candidates:
            drop = {c.address for c in kept[::-1][: len(ordered) - self.max_candidates]}
            ordered = [c for c in ordered if c.address not in drop]
        if len(ordered) > self.max_candidates:
            keep = {c.address for c in sorted(ordered, key=lambda c: -c.priority)[: self.max_candidates]}
            ordered = [c for c in ordered if c.address in keep]
        return ordered

    def candidates(self, now: float) -> list[Candidate]:
        """The advertised list as of the last :meth:`update`, minus remembered entries that have
        expired since (``now`` is only used for that)."""
        return [c for c in self._current if c.type not in _REMEMBERED or now - c.last_seen <= self.lifetime]

    def endpoints(self, now: float) -> list[Endpoint]:
        """Just the addresses of :meth:`candidates`, for a CallMeMaybe."""
        return [c.address for c in self.candidates(now)]

    def clear(self) -> None:
        """Forget everything (e.g. when the socket is re-bound to another port)."""
        self._known.clear()
        self._current = []


class RefreshSchedule:
    """When to re-gather (sans-io): every random 20–26 s while a session is active.

    A session is active while something was sent to a peer within :data:`SESSION_IDLE_TIMEOUT`
    (the caller reports that with :meth:`note_activity`). :meth:`next_deadline` is when the driver
    should wake up (None: nothing to do until :meth:`note_activity`); at that time :meth:`due` says
    whether to gather; after every round, :meth:`note_gathered` picks the next interval. When
    activity resumes after an idle spell and the interval has already run out, a round is due at
    once (the old list is stale). :meth:`fresh_enough` is the CallMeMaybe check (27 s).
    """

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        interval: tuple[float, float] = (RESTUN_INTERVAL_MIN, RESTUN_INTERVAL_MAX),
        idle_timeout: float = SESSION_IDLE_TIMEOUT,
        fresh_enough: float = ENDPOINTS_FRESH_ENOUGH,
    ) -> None:
        if not 0 < interval[0] <= interval[1]:
            raise ValueError(f"bad interval {interval}")
        self._rng = rng or random.Random()
        self.interval = interval
        self.idle_timeout = idle_timeout
        self.fresh_enough_after = fresh_enough
        self.last_activity: float | None = None
        self.last_gathered: float | None = None
        self.next_at: float | None = None

    def note_activity(self, now: float) -> None:
        """Something was sent to a peer at ``now``."""
        if self.last_activity is None or now > self.last_activity:
            self.last_activity = now

    def note_gathered(self, now: float) -> float:
        """A round finished at ``now``; returns (and stores) when the next periodic one is due."""
        self.last_gathered = now
        self.next_at = now + self._rng.uniform(*self.interval)
        return self.next_at

    def is_active(self, now: float) -> bool:
        return self.last_activity is not None and now - self.last_activity <= self.idle_timeout

    def next_deadline(self, now: float) -> float | None:
        """When the driver should wake up for the next round (``now`` if one is due); None when idle."""
        if not self.is_active(now):
            return None
        return now if self.next_at is None else max(now, self.next_at)

    def due(self, now: float) -> bool:
        """Whether a periodic round should start at ``now``."""
        return self.is_active(now) and (self.next_at is None or now >= self.next_at)

    def fresh_enough(self, now: float) -> bool:
        """Whether the last round is recent enough to advertise without re-gathering."""
        return self.last_gathered is not None and now - self.last_gathered <= self.fresh_enough_after


# --- the anyio driver --------------------------------------------------------------------------------


class StunProbe(Protocol):
    """The STUN source: ``natlib.stunclient.stun_probe`` or anything with its call shape."""

    def __call__(
        self,
        servers: Sequence[Endpoint],
        *,
        sock: anyio.abc.UDPSocket | None = ...,
        local_port: int = ...,
        timeout: float = ...,
    ) -> Awaitable[Sequence[StunResultLike]]: ...


PortMapSource: TypeAlias = Callable[[], Awaitable[Endpoint | None]]
"""The port-mapping source: the external address of our mapping, or None when there is none."""
InterfaceSource: TypeAlias = Callable[[], Sequence[netif.InterfaceAddress]]


class _MappingLike(Protocol):
    @property
    def external(self) -> Endpoint: ...


class _PortMapperLike(Protocol):
    @property
    def mapping(self) -> _MappingLike | None: ...
    async def map(self) -> _MappingLike: ...


def port_mapper_source(mapper: _PortMapperLike) -> PortMapSource:
    """A port-mapping source over a ``natlib.portmap.PortMapper`` (or anything shaped like it).

    It advertises the mapper's current mapping (the mapper renews it by itself) and asks for one
    when there is none yet; a failure to map is the round's ``"portmap"`` error.
    """

    async def source() -> Endpoint | None:
        current = mapper.mapping
        if current is None:
            current = await mapper.map()
        return current.external

    return source


@dataclass(frozen=True, slots=True)
class GatherReport:
    """One gathering round: the advertised candidates and what each source did."""

    candidates: tuple[Candidate, ...]
    at: float
    """``anyio.current_time()`` when the round finished."""
    duration: float
    stun: tuple[StunSample, ...] = ()
    portmapped: Endpoint | None = None
    interfaces: tuple[netif.InterfaceAddress, ...] = ()
    mapping_varies_by_dest_ip: bool | None = None
    errors: Mapping[str, str] = field(default_factory=dict)
    """Source name (``"stun"``, ``"stun6"``, ``"portmap"``, ``"interfaces"``, ``"input"``) → why it
    failed or what was dropped; a source that merely found nothing is not an error."""

    def of_type(self, kind: CandidateType) -> list[Candidate]:
        return [c for c in self.candidates if c.type == kind]


_FAMILIES: Final[tuple[netif.Family, ...]] = (4, 6)


def _is_wildcard(host: str) -> bool:
    return _ip(host).is_unspecified


def _dual_stack(sock: anyio.abc.UDPSocket) -> bool:
    raw = sock.extra(anyio.abc.SocketAttribute.raw_socket)
    try:
        return raw.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    except OSError:
        return False


class Gatherer:
    """Gathers our candidates for one UDP socket per family (anyio; trio or asyncio).

    ``sock`` is the socket peers will reach (IPv4 or IPv6), ``sock6`` an optional second one for
    IPv6; STUN goes out through them, so the mapping STUN sees is the mapping data uses. Without a
    socket, pass ``local_port``: the port of a socket natlib does not own (STUN then binds a socket
    to that port itself, which only works with ``SO_REUSEPORT`` on both). A socket bound to one
    address contributes only that address as a local candidate; a wildcard one every interface
    address of its family (both families for a dual-stack IPv6 socket).

    Sources are injectable so gathering needs none of the other modules: ``stun`` (default
    ``natlib.stunclient.stun_probe``), ``port_mapping`` (an async callable returning our external
    address or None, e.g. a ``PortMapper``'s mapping), ``interfaces`` (default
    :func:`natlib.netif.interface_addresses`). ``static_endpoints`` come from configuration.
    ``exclude`` (an :class:`AddressFilter`) leaves interfaces and prefixes out of every round (an
    overlay network's own addresses, say): they are neither candidates nor in the report.

    :meth:`gather` runs one round; :meth:`run` re-gathers on the :class:`RefreshSchedule` and when
    :meth:`request_refresh` is called (e.g. on a :mod:`natlib.netmon` event); :meth:`fresh` returns
    the current candidates, re-gathering first if they are older than 27 s.
    """

    def __init__(
        self,
        sock: anyio.abc.UDPSocket | None = None,
        *,
        sock6: anyio.abc.UDPSocket | None = None,
        local_port: int | None = None,
        stun_servers: Sequence[Endpoint] = (),
        stun: StunProbe | None = None,
        stun_timeout: float = STUN_TIMEOUT,
        port_mapping: PortMapSource | None = None,
        portmap_timeout: float = PORTMAP_TIMEOUT,
        static_endpoints: Sequence[Endpoint] = (),
        interfaces: InterfaceSource | None = None,
        include_link_local: bool = False,
        local_port_fixed: bool = False,
        exclude: AddressFilter = AddressFilter(),
        candidate_set: CandidateSet | None = None,
        schedule: RefreshSchedule | None = None,
    ) -> None:
        if sock is None and sock6 is None and local_port is None:
            raise ValueError("give a bound socket or its local port")
        self._sockets: dict[netif.Family, anyio.abc.UDPSocket] = {}
        self._ports: dict[netif.Family, int] = {}
        self._bound: dict[netif.Family, str | None] = {}
        for s in (sock, sock6):
            if s is None:
                continue
            fam: netif.Family = 6 if s.extra(anyio.abc.SocketAttribute.family) == socket.AF_INET6 else 4
            host = str(s.extra(anyio.abc.SocketAttribute.local_address)[0])
            port = int(s.extra(anyio.abc.SocketAttribute.local_port))
            self._sockets.setdefault(fam, s)
            self._ports.setdefault(fam, port)
            self._bound.setdefault(fam, None if _is_wildcard(host) else host)
            if fam == 6 and _is_wildcard(host) and _dual_stack(s):
                self._ports.setdefault(4, port)
                self._bound.setdefault(4, None)
        if local_port is not None:
            for either in _FAMILIES:
                self._ports.setdefault(either, local_port)
                self._bound.setdefault(either, None)
        self.local_port = local_port
        self.stun_servers = [_canonical(s) for s in stun_servers]
        self._stun = stun
        self.stun_timeout = stun_timeout
        self._port_mapping = port_mapping
        self.portmap_timeout = portmap_timeout
        self.static_endpoints = list(static_endpoints)
        self._interfaces = interfaces
        self.include_link_local = include_link_local
        self.local_port_fixed = local_port_fixed
        self.exclude = exclude
        self.candidate_set = candidate_set or CandidateSet()
        self.schedule = schedule or RefreshSchedule()
        self.last_report: GatherReport | None = None
        self._lock = anyio.Lock()
        self._wakeup = anyio.Event()
        self._refresh_requested = False
        # request_refresh(stale=True) calls so far, and how many had happened when the round that
        # made the current candidates began: they are stale while the two differ.
        self._changes = 0
        self._changes_gathered = 0

    @property
    def candidates(self) -> list[Candidate]:
        """The candidates of the last round (empty before the first)."""
        return list(self.last_report.candidates) if self.last_report else []

    def _stun_probe(self) -> StunProbe:
        return self._stun if self._stun is not None else stun_probe

    def _read_interfaces(self) -> list[netif.InterfaceAddress]:
        if self._interfaces is not None:
            addrs = list(self._interfaces())
        else:
            addrs = netif.interface_addresses(include_link_local=self.include_link_local)
        return [a for a in addrs if not self.exclude.excludes(a)] if self.exclude else addrs

    async def _run_stun(self, fam: netif.Family, servers: list[Endpoint], out: dict[str, Any]) -> None:
        name = "stun" if fam == 4 else "stun6"
        try:
            probe = self._stun_probe()
            sock = self._sockets.get(fam)
            if sock is not None:
                results = await probe(servers, sock=sock, timeout=self.stun_timeout)
            else:
                results = await probe(servers, local_port=self._ports.get(fam, 0), timeout=self.stun_timeout)
            samples = [StunSample.of(r) for r in results]
        except Exception as e:  # a failing source is reported, never raised (cancellation still is)
            log.debug("STUN round failed", exc_info=True)
            out["errors"][name] = f"{type(e).__name__}: {e}"
            return
        out["stun"].extend(samples)
        if samples and all(s.mapped is None for s in samples):
            out["errors"][name] = "no STUN server answered: " + "; ".join(
                f"{s.server[0]}:{s.server[1]} {s.error or 'no mapping'}" for s in samples
            )

    async def _run_portmap(self, out: dict[str, Any]) -> None:
        assert self._port_mapping is not None
        try:
            with anyio.fail_after(self.portmap_timeout):
                out["portmapped"] = await self._port_mapping()
        except TimeoutError:
            out["errors"]["portmap"] = f"no answer within {self.portmap_timeout} s"
        except Exception as e:
            log.debug("port mapping source failed", exc_info=True)
            out["errors"]["portmap"] = f"{type(e).__name__}: {e}"

    async def gather(self) -> GatherReport:
        """Run one round and return its report; never raises for a failing source.

        Rounds are serialised: a caller arriving while one runs waits for it and then runs its own.
        Cancellation abandons the round (nothing is recorded) and propagates.
        """
        async with self._lock:
            return await self._gather_locked()

    async def _gather_locked(self) -> GatherReport:
        start = anyio.current_time()
        changes_seen = self._changes
        out: dict[str, Any] = {"stun": [], "portmapped": None, "errors": {}}
        async with anyio.create_task_group() as tg:
            for fam in _FAMILIES:
                servers = [s for s in self.stun_servers if (6 if ":" in s[0] else 4) == fam]
                if not servers or fam not in self._ports:
                    continue
                if fam in self._sockets or self.local_port is not None:
                    tg.start_soon(self._run_stun, fam, servers, out)
                else:  # a dual-stack IPv6 socket: STUN goes per family, as data does in natlib
                    out["errors"]["stun"] = "IPv4 STUN needs an IPv4 socket (the IPv6 one is dual-stack)"
            if self._port_mapping is not None:
                tg.start_soon(self._run_portmap, out)
            try:
                addrs = self._read_interfaces()
            except Exception as e:
                log.debug("reading interface addresses failed", exc_info=True)
                out["errors"]["interfaces"] = f"{type(e).__name__}: {e}"
                addrs = []
        order = {server: i for i, server in enumerate(self.stun_servers)}
        out["stun"].sort(key=lambda sample: order.get(sample.server, len(order)))  # as configured
        local: list[tuple[Endpoint, str]] = []
        for a in addrs:
            port = self._ports.get(a.family)
            bound = self._bound.get(a.family)
            if port is None or (bound is not None and _ip(bound) != a.ip):
                continue
            local.append(((a.address, port), a.interface))
        for fam, bound in self._bound.items():  # a socket bound to one address: that address, found or not
            if bound is not None and not any(e[0][0] == str(_ip(bound)) for e in local):
                local.append(((bound, self._ports[fam]), "bound"))
        result = round_endpoints(
            local=local,
            stun=out["stun"],
            portmapped=out["portmapped"],
            static=self.static_endpoints,
            local_port=self._ports.get(4),
            local_port_fixed=self.local_port_fixed,
        )
        errors = dict(out["errors"])
        if result.rejected:
            errors["input"] = "; ".join(result.rejected)
        now = anyio.current_time()
        endpoints = list(result.endpoints)
        if self.exclude:  # also a STUN or static answer inside an excluded prefix
            endpoints = [e for e in endpoints if not self.exclude.excludes_ip(e.address[0])]
        candidates = self.candidate_set.update(endpoints, now)
        self.schedule.note_gathered(now)
        report = GatherReport(
            candidates=tuple(candidates),
            at=now,
            duration=now - start,
            stun=tuple(out["stun"]),
            portmapped=out["portmapped"],
            interfaces=tuple(addrs),
            mapping_varies_by_dest_ip=result.mapping_varies_by_dest_ip,
            errors=errors,
        )
        self.last_report = report
        self._changes_gathered = changes_seen  # (a round begun before a change may see the old network)
        if errors:
            log.debug("gathering round finished with errors: %s", errors)
        return report

    async def fresh(self) -> list[Candidate]:
        """Candidates fit for a CallMeMaybe: the last round's if at most 27 s old and not made
        stale by :meth:`request_refresh`, else a new round's (waiting for one already running)."""
        if self._fresh_enough():
            return self.candidates
        async with self._lock:
            if self._fresh_enough():
                return self.candidates  # another task gathered while we waited
            return list((await self._gather_locked()).candidates)

    def _fresh_enough(self) -> bool:
        return (
            self.last_report is not None
            and self._changes_gathered == self._changes
            and self.schedule.fresh_enough(anyio.current_time())
        )

    def note_activity(self) -> None:
        """Tell the schedule that data was sent to a peer (keeps periodic re-gathering going)."""
        was_idle = not self.schedule.is_active(anyio.current_time())
        self.schedule.note_activity(anyio.current_time())
        if was_idle:
            self._wakeup.set()

    def request_refresh(self, *, stale: bool = True) -> None:
        """Re-gather as soon as possible (a network change, a suspected NAT rebinding).

        With ``stale`` (the default) the current candidates are taken to be out of date: until a
        round that began after this call has finished, :meth:`fresh` waits for one instead of
        returning them. ``stale=False`` asks for a round that may only add to them (a port mapping
        that came late)."""
        if stale:
            self._changes += 1
        self._refresh_requested = True
        self._wakeup.set()

    async def run(
        self,
        on_report: Callable[[GatherReport], Awaitable[None]] | None = None,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Gather once, then keep re-gathering on the schedule and on :meth:`request_refresh`.

        Periodic rounds run only while the session is active (:meth:`note_activity` within the
        last 45 s). ``on_report`` is awaited with every report. Runs until cancelled;
        cancellation abandons a round in progress. ``task_status.started()`` follows the first round.
        """
        report = await self.gather()
        task_status.started()
        if on_report is not None:
            await on_report(report)
        while True:
            # A fresh Event before looking at the flags, so a wake-up during the checks is not lost.
            self._wakeup = anyio.Event()
            now = anyio.current_time()
            if self._refresh_requested or self.schedule.due(now):
                self._refresh_requested = False
                report = await self.gather()
                if on_report is not None:
                    await on_report(report)
                continue
            deadline = self.schedule.next_deadline(now)
            with anyio.move_on_after(None if deadline is None else max(0.0, deadline - now)):
                await self._wakeup.wait()


async def gather(
    sock: anyio.abc.UDPSocket | None = None,
    *,
    stun_servers: Sequence[Endpoint] = (),
    **kwargs: Any,
) -> GatherReport:
    """One round with a throwaway :class:`Gatherer` (same arguments); see :meth:`Gatherer.gather`."""
    return await Gatherer(sock, stun_servers=stun_servers, **kwargs).gather()
