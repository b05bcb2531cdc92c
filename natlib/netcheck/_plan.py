"""Netcheck's probe planning and stop rule (nat-traversal §2.2), sans-io.

A *plan* says which STUN requests to send for one report: per region and address family a
*probe set* of requests at given delays, rotating through the region's nodes. A **full** plan
probes every region three times (0, 100, 200 ms); an **incremental** plan probes only the
fastest regions of the last report plus the current home, with retry delays scaled by the
last latency. The driver turns each (region, family, node) group into one
:class:`~natlib.stunclient.StunClient` transaction whose schedule is the group's delays, and
cancels the rest of a probe set as soon as one of its requests is answered.

:class:`StopRule` says when the STUN phase is over: at the STUN budget (3 s), or once enough
regions (3) answered, after waiting as long again as the slowest latency seen (twice as long
on a full report), or when nothing is left in flight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ..derpmap import DERPMap, DERPNode, DERPRegion
from ._report import Family, Report

__all__ = [
    "DEFAULT_RETRY_INTERVAL",
    "ENOUGH_REGIONS",
    "FULL_REPORT_INTERVAL",
    "FULL_REPORT_TRIES",
    "INCREMENTAL_REGIONS",
    "PORTMAP_PROBE_TIMEOUT",
    "REPORT_TIMEOUT",
    "STUN_PROBE_TIMEOUT",
    "Probe",
    "ProbePlan",
    "StopRule",
    "plan_probes",
    "wants_full_report",
]

STUN_PROBE_TIMEOUT: Final = 3.0
"""The STUN phase's budget: with no answer by then, UDP is presumed blocked."""
REPORT_TIMEOUT: Final = 5.0
"""The whole report's budget, HTTPS fallback and captive-portal check included."""
PORTMAP_PROBE_TIMEOUT: Final = 0.25
FULL_REPORT_INTERVAL: Final = 5 * 60.0
"""A full report at least this often."""
ENOUGH_REGIONS: Final = 3
FULL_REPORT_TRIES: Final = 3
FULL_REPORT_SPACING: Final = 0.1
"""Full report: requests at 0, 100 and 200 ms per region and family."""
INCREMENTAL_REGIONS: Final = 3
"""Incremental report: the fastest this many regions of the last report (plus the home)."""
DEFAULT_RETRY_INTERVAL: Final = 0.2
"""Incremental report: the least spacing between tries, whatever the last latency."""
LATENCY_RETRY_FACTOR: Final = 1.2
EXTRA_RETRY_SPACING: Final = 0.05
"""Incremental report: each try from the third on starts this much later again, per try."""
HOME_TRIES: Final = 4
FASTEST_TWO_TRIES: Final = 2


@dataclass(frozen=True, slots=True)
class Probe:
    """Requests to one node over one family, at ``delays`` seconds from the start of the report."""

    region_id: int
    family: Family
    node: str
    host: str
    port: int
    delays: tuple[float, ...]

    @property
    def probe_set(self) -> tuple[int, Family]:
        return (self.region_id, self.family)


@dataclass(frozen=True, slots=True)
class ProbePlan:
    full: bool
    probes: tuple[Probe, ...]

    def probe_sets(self) -> dict[tuple[int, Family], list[Probe]]:
        sets: dict[tuple[int, Family], list[Probe]] = {}
        for probe in self.probes:
            sets.setdefault(probe.probe_set, []).append(probe)
        return sets

    def regions(self) -> list[int]:
        return sorted({p.region_id for p in self.probes})


def wants_full_report(now: float, *, last_full_at: float | None, last_report: Report | None) -> bool:
    """Whether the next report must probe every region: the first one, every 5 min, or after a
    report that saw a captive portal and no UDP (the portal may be gone now)."""
    if last_report is None or last_full_at is None:
        return True
    if now - last_full_at >= FULL_REPORT_INTERVAL:
        return True
    return bool(last_report.captive_portal) and not last_report.udp


def _stun_nodes(region: DERPRegion) -> list[DERPNode]:
    return [n for n in region.nodes if n.effective_stun_port is not None]


def _node_address(node: DERPNode, family: Family, resolved: Mapping[str, Sequence[str]] | None) -> str | None:
    literal = node.stun_address(family)
    if literal is not None:
        return literal
    if node.stun_test_ip or (node.ipv4 if family == 4 else node.ipv6) == "none":
        return None
    for addr in (resolved or {}).get(node.name, ()):
        if (":" in addr) == (family == 6):
            return addr
    return None


def _group(
    region: DERPRegion, family: Family, delays: Sequence[float], resolved: Mapping[str, Sequence[str]] | None
) -> list[Probe]:
    """Requests at ``delays`` rotating through the region's STUN nodes, grouped per node."""
    nodes = [n for n in _stun_nodes(region) if _node_address(n, family, resolved) is not None]
    if not nodes:
        return []
    per_node: dict[str, list[float]] = {}
    for i, delay in enumerate(delays):
        per_node.setdefault(nodes[i % len(nodes)].name, []).append(delay)
    out = []
    for node in nodes:
        if node.name in per_node:
            host = _node_address(node, family, resolved)
            port = node.effective_stun_port
            assert host is not None and port is not None
            out.append(Probe(region.region_id, family, node.name, host, port, tuple(per_node[node.name])))
    return out


def plan_probes(
    derp_map: DERPMap,
    *,
    full: bool,
    last: Report | None = None,
    have_v4: bool = True,
    have_v6: bool = False,
    resolved: Mapping[str, Sequence[str]] | None = None,
) -> ProbePlan:
    """Plan the STUN requests of one report.

    ``last`` is the previous report (needed for an incremental plan; without one the plan is
    full). ``have_v4``/``have_v6`` say which families can be probed. Nodes are reached at their
    literal ``IPv4``/``IPv6`` (or ``STUNTestIP``), else at an address from ``resolved`` (node
    name → addresses), else not at all. ``NoMeasureNoHome`` regions are never probed.
    """
    families: list[Family] = [f for f, ok in ((4, have_v4), (6, have_v6)) if ok]  # type: ignore[misc]
    measurable = {rid: r for rid, r in derp_map.regions.items() if not r.no_measure_no_home}
    probes: list[Probe] = []
    if full or last is None or not last.region_latency:
        delays = tuple(i * FULL_REPORT_SPACING for i in range(FULL_REPORT_TRIES))
        for region_id in sorted(measurable):
            for family in families:
                probes += _group(measurable[region_id], family, delays, resolved)
        return ProbePlan(full=True, probes=tuple(probes))

    ranked = sorted(
        (rid for rid in last.region_latency if rid in measurable), key=lambda r: (last.region_latency[r], r)
    )
    chosen = ranked[:INCREMENTAL_REGIONS]
    if last.preferred_derp in measurable and last.preferred_derp not in chosen:
        chosen.append(last.preferred_derp)
    had_v6 = bool(last.region_v6_latency)
    for rank, region_id in enumerate(chosen):
        fastest_two = rank < 2
        tries = HOME_TRIES if region_id == last.preferred_derp else FASTEST_TWO_TRIES if fastest_two else 1
        use = set(families)
        if not fastest_two:
            if have_v4 and have_v6 and had_v6:
                use = {4} if rank % 2 == 0 else {6}  # slower regions alternate between families
            elif not had_v6:
                use.discard(6)
        spacing = max(LATENCY_RETRY_FACTOR * last.region_latency.get(region_id, 0.0), DEFAULT_RETRY_INTERVAL)
        delays = tuple(n * spacing + (n * EXTRA_RETRY_SPACING if n >= 2 else 0.0) for n in range(tries))
        for family in families:
            if family in use:
                probes += _group(measurable[region_id], family, delays, resolved)
    return ProbePlan(full=False, probes=tuple(probes))


class StopRule:
    """When the STUN phase ends (times in the caller's clock).

    Call :meth:`update` after every successful probe with the current number of regions that
    answered and the slowest latency so far; :attr:`deadline` is then the time to stop.
    """

    def __init__(self, start: float, *, full: bool, budget: float = STUN_PROBE_TIMEOUT) -> None:
        self.full = full
        self.budget_end = start + budget
        self.enough_at: float | None = None

    def update(self, now: float, regions_answered: int, max_latency: float) -> None:
        if self.enough_at is None and regions_answered >= ENOUGH_REGIONS:
            wait = max_latency * (2 if self.full else 1)
            self.enough_at = now + wait

    @property
    def deadline(self) -> float:
        return self.budget_end if self.enough_at is None else min(self.enough_at, self.budget_end)
