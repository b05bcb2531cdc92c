"""natlib.netcheck planning (sans-io): full and incremental probe plans, full-report triggers,
the enough-regions stop rule."""

from __future__ import annotations

import pytest

from natlib.derpmap import DERPMap, DERPNode, DERPRegion
from natlib.netcheck import ENOUGH_REGIONS, Probe, Report, StopRule, plan_probes, wants_full_report


def _region(region_id: int, nodes: int = 1, **kw: object) -> DERPRegion:
    return DERPRegion(
        region_id=region_id,
        nodes=tuple(
            DERPNode(
                name=f"{region_id}{chr(97 + i)}",
                region_id=region_id,
                host_name=f"r{region_id}.example",
                ipv4=f"198.51.100.{region_id * 10 + i}",
                ipv6=f"2001:db8::{region_id:x}:{i}",
            )
            for i in range(nodes)
        ),
        **kw,  # type: ignore[arg-type]
    )


MAP = DERPMap(
    regions={r.region_id: r for r in [_region(1, nodes=2), _region(2), _region(3), _region(4), _region(5)]}
)


def test_full_plan_three_tries_per_region_and_family_rotating_nodes() -> None:
    plan = plan_probes(MAP, full=True, have_v4=True, have_v6=True)
    assert plan.full
    sets = plan.probe_sets()
    assert sorted(sets) == [(r, f) for r in (1, 2, 3, 4, 5) for f in (4, 6)]
    # Region 1 has two nodes: tries at 0 and 200 ms go to 1a, the one at 100 ms to 1b.
    assert sets[(1, 4)] == [
        Probe(1, 4, "1a", "198.51.100.10", 3478, (0.0, 0.2)),
        Probe(1, 4, "1b", "198.51.100.11", 3478, (0.1,)),
    ]
    assert sets[(2, 6)] == [Probe(2, 6, "2a", "2001:db8::2:0", 3478, (0.0, 0.1, 0.2))]


def test_no_v6_socket_no_v6_probes_and_skipped_regions_and_nodes() -> None:
    m = DERPMap(
        regions={
            1: _region(1),
            2: _region(2, no_measure_no_home=True),
            3: DERPRegion(3, nodes=(DERPNode("3a", 3, "h", ipv4="192.0.2.3", stun_port=-1),)),
            4: DERPRegion(4, nodes=(DERPNode("4a", 4, "h4.example", stun_port=3479),)),
        }
    )
    plan = plan_probes(m, full=True, have_v4=True, have_v6=False)
    assert [(p.region_id, p.family) for p in plan.probes] == [(1, 4)]
    # A node without a literal address is probed at a resolved one.
    plan = plan_probes(m, full=True, have_v4=True, resolved={"4a": ["2001:db8::4", "192.0.2.44"]})
    assert [(p.region_id, p.host, p.port) for p in plan.probes] == [
        (1, "198.51.100.10", 3478),
        (4, "192.0.2.44", 3479),
    ]


def _last(latencies: dict[int, float], home: int, v6: bool = False) -> Report:
    return Report(
        udp=True,
        region_latency=latencies,
        region_v4_latency=latencies,
        region_v6_latency=latencies if v6 else {},
        preferred_derp=home,
    )


def test_incremental_plan_fastest_three_plus_home_with_scaled_retries() -> None:
    last = _last({1: 0.050, 2: 0.010, 3: 0.300, 4: 0.020, 5: 0.400}, home=5)
    plan = plan_probes(MAP, full=False, last=last, have_v4=True, have_v6=False)
    assert not plan.full
    sets = plan.probe_sets()
    assert sorted(sets) == [(1, 4), (2, 4), (4, 4), (5, 4)]
    # Fastest two (2, then 4): 2 tries, spaced max(1.2 x latency, 200 ms).
    assert sets[(2, 4)][0].delays == (0.0, 0.2)
    assert sets[(4, 4)][0].delays == (0.0, 0.2)
    # Third fastest: 1 try.
    assert [p.delays for p in sets[(1, 4)]] == [(0.0,)]
    # The home: 4 tries at n x 1.2 x 400 ms, plus n x 50 ms from the third on.
    assert sets[(5, 4)][0].delays == pytest.approx((0.0, 0.48, 0.96 + 0.1, 1.44 + 0.15))


def test_incremental_plan_alternates_families_for_slower_regions_on_dual_stack() -> None:
    last = _last({1: 0.01, 2: 0.02, 3: 0.03}, home=1, v6=True)
    sets = plan_probes(MAP, full=False, last=last, have_v4=True, have_v6=True).probe_sets()
    assert sorted(sets) == [(1, 4), (1, 6), (2, 4), (2, 6), (3, 4)]  # third (rank 2): v4 only
    # The home (two nodes) gets 4 tries at 0, 200, 400+100, 600+150 ms, alternating nodes.
    assert [(p.node, p.delays) for p in sets[(1, 4)]] == [
        ("1a", (0.0, 0.5)),
        ("1b", (0.2, pytest.approx(0.75))),
    ]


def test_incremental_without_previous_latency_falls_back_to_full() -> None:
    assert plan_probes(MAP, full=False, last=None).full
    assert plan_probes(MAP, full=False, last=_last({}, home=0)).full


def test_when_a_full_report_is_due() -> None:
    last = _last({1: 0.01}, home=1)
    assert wants_full_report(0.0, last_full_at=None, last_report=None)
    assert not wants_full_report(299.0, last_full_at=0.0, last_report=last)
    assert wants_full_report(300.0, last_full_at=0.0, last_report=last)
    portal = Report(udp=False, captive_portal=True)
    assert wants_full_report(10.0, last_full_at=0.0, last_report=portal)


def test_stop_rule_budget_and_enough_regions() -> None:
    rule = StopRule(100.0, full=False, budget=3.0)
    assert rule.deadline == 103.0
    rule.update(100.05, ENOUGH_REGIONS - 1, 0.05)
    assert rule.deadline == 103.0
    rule.update(100.08, ENOUGH_REGIONS, 0.08)
    assert rule.deadline == pytest.approx(100.16)  # waits the slowest latency once more
    rule.update(100.2, ENOUGH_REGIONS + 1, 0.5)  # armed once only
    assert rule.deadline == pytest.approx(100.16)
    full = StopRule(0.0, full=True)
    full.update(1.0, 3, 0.9)
    assert full.deadline == pytest.approx(2.8)  # doubled on a full report
    slow = StopRule(0.0, full=True)
    slow.update(2.0, 3, 1.0)
    assert slow.deadline == 3.0  # never past the STUN budget
