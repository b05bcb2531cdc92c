"""natlib.candidates: priorities, one round's merge, the set over time, the refresh schedule, the driver."""

from __future__ import annotations

import itertools
import random
import socket
from collections.abc import Sequence

import anyio
import anyio.abc
import pytest
import trio
import trio.testing

from natlib import netif
from natlib.candidates import (
    ENDPOINT_LIFETIME,
    AddressFilter,
    Candidate,
    CandidateSet,
    CandidateType,
    Endpoint,
    Gatherer,
    RefreshSchedule,
    RoundEndpoint,
    StunSample,
    candidate_priority,
    gather,
    local_preference,
    round_endpoints,
)

LOCAL, STUN, S4LP, PMP, STATIC, PRFLX = (
    CandidateType.LOCAL,
    CandidateType.STUN,
    CandidateType.STUN4LOCALPORT,
    CandidateType.PORTMAPPED,
    CandidateType.STATIC,
    CandidateType.PEER_REFLEXIVE,
)


# --- priorities ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "ip", "priority"),
    [
        # 2**24 * type + 2**8 * local + 255
        (LOCAL, "2001:db8:1::2", 126 * 2**24 + 65535 * 256 + 255),  # 2130706431
        (LOCAL, "198.51.100.7", 126 * 2**24 + 57344 * 256 + 255),
        (LOCAL, "fd00::2", 126 * 2**24 + 49152 * 256 + 255),
        (LOCAL, "192.168.1.2", 2124415231),
        (LOCAL, "100.100.1.1", 2124415231),  # CGNAT shared space counts as private
        (LOCAL, "fe80::1", 126 * 2**24 + 16384 * 256 + 255),
        (LOCAL, "169.254.1.1", 126 * 2**24 + 8192 * 256 + 255),
        (LOCAL, "127.0.0.1", 126 * 2**24 + 255),
        (PRFLX, "203.0.113.2", 110 * 2**24 + 57344 * 256 + 255),
        (PMP, "203.0.113.2", 105 * 2**24 + 57344 * 256 + 255),
        (STATIC, "203.0.113.2", 104 * 2**24 + 57344 * 256 + 255),
        (STUN, "203.0.113.2", 1692401919),
        (STUN, "2001:db8::1", 100 * 2**24 + 65535 * 256 + 255),
        (S4LP, "203.0.113.2", 90 * 2**24 + 57344 * 256 + 255),
    ],
)
def test_priority_numbers(kind: CandidateType, ip: str, priority: int) -> None:
    assert candidate_priority(kind, ip) == priority


def test_priority_orders_types_then_addresses() -> None:
    ranked = sorted(
        [(LOCAL, "10.0.0.1"), (STUN, "203.0.113.2"), (PMP, "203.0.113.2"), (S4LP, "203.0.113.2"),
         (STATIC, "192.0.2.9"), (PRFLX, "10.0.0.1"), (LOCAL, "2001:db8::5")],
        key=lambda t: -candidate_priority(*t),
    )  # fmt: skip
    assert ranked == [
        (LOCAL, "2001:db8::5"), (LOCAL, "10.0.0.1"), (PRFLX, "10.0.0.1"), (PMP, "203.0.113.2"),
        (STATIC, "192.0.2.9"), (STUN, "203.0.113.2"), (S4LP, "203.0.113.2"),
    ]  # fmt: skip


def test_local_preference_edge_cases() -> None:
    assert local_preference("::ffff:192.168.1.2") == local_preference("192.168.1.2") == 40960
    assert local_preference("fe80::1%eth0") == 16384
    assert local_preference("172.31.255.255") == 40960 and local_preference("172.32.0.1") == 57344
    assert candidate_priority(LOCAL, "10.0.0.1", component=2) == candidate_priority(LOCAL, "10.0.0.1") - 1
    with pytest.raises(ValueError, match="component"):
        candidate_priority(LOCAL, "10.0.0.1", component=0)
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        local_preference("not-an-ip")


# --- one round -----------------------------------------------------------------------------------------

SRV_A, SRV_A2, SRV_B = ("198.51.100.10", 3478), ("198.51.100.10", 3479), ("198.51.100.11", 3478)


def test_round_order_and_types() -> None:
    r = round_endpoints(
        local=[(("192.168.1.2", 41641), "eth0"), (("2001:db8:1::2", 41641), "eth0")],
        stun=[
            StunSample(SRV_A, ("203.0.113.2", 41641), 0.010),
            StunSample(SRV_B, ("203.0.113.2", 41641), 0.020),
        ],
        portmapped=("203.0.113.2", 5000),
        static=[("192.0.2.50", 7000)],
        local_port=41641,
        local_port_fixed=True,
    )
    assert [(e.type, e.address) for e in r.endpoints] == [
        (PMP, ("203.0.113.2", 5000)),
        (STUN, ("203.0.113.2", 41641)),
        (STATIC, ("192.0.2.50", 7000)),
        (LOCAL, ("2001:db8:1::2", 41641)),  # v6 first: higher local preference
        (LOCAL, ("192.168.1.2", 41641)),
    ]
    assert r.mapping_varies_by_dest_ip is False  # no stun4localport on an easy NAT, fixed port or not
    assert r.global_v4 == ("203.0.113.2", 41641) and r.global_v6 is None
    assert r.endpoints[1].source == "stun 198.51.100.10:3478" and r.endpoints[3].source == "eth0"


def test_round_hard_nat_best_mapping_repeats_and_stun4localport() -> None:
    samples = [
        StunSample(SRV_A, ("203.0.113.2", 50001), 0.030),
        StunSample(SRV_A2, ("203.0.113.2", 50002), 0.010),  # fastest single answer
        StunSample(SRV_B, ("203.0.113.2", 50003), 0.020),
        StunSample(("198.51.100.12", 3478), None, None, "timeout"),
    ]
    r = round_endpoints(stun=samples, local_port=41641, local_port_fixed=True)
    assert r.mapping_varies_by_dest_ip is True
    assert [(e.type, e.address) for e in r.endpoints] == [
        (STUN, ("203.0.113.2", 50002)),
        (S4LP, ("203.0.113.2", 41641)),
    ]
    # Not fixed: no guess. Mapping seen twice (a firewall handing out a second mapping): advertised too.
    twice = [*samples, StunSample(("198.51.100.13", 3478), ("203.0.113.2", 50003), 0.050)]
    r = round_endpoints(stun=twice, local_port=41641, local_port_fixed=False)
    assert [e.address for e in r.endpoints] == [("203.0.113.2", 50003)]  # seen twice beats the fastest once
    thrice = [*twice, StunSample(("198.51.100.14", 3478), ("203.0.113.2", 50002), 0.040)]
    r = round_endpoints(stun=thrice)
    assert [e.address for e in r.endpoints] == [("203.0.113.2", 50002), ("203.0.113.2", 50003)]


def test_round_one_answer_knows_nothing_about_mapping_variation() -> None:
    r = round_endpoints(
        stun=[StunSample(SRV_A, ("203.0.113.2", 1), 0.01)], local_port=1, local_port_fixed=True
    )
    assert r.mapping_varies_by_dest_ip is None and [e.type for e in r.endpoints] == [STUN]
    assert round_endpoints().mapping_varies_by_dest_ip is None


def test_round_dedupes_keeping_highest_priority_type() -> None:
    # A public host: STUN sees its own address; that is a host candidate (RFC 8445 §5.1.3).
    r = round_endpoints(
        local=[(("192.0.2.10", 4000), "eth0"), (("::ffff:192.0.2.10", 4000), "eth0")],
        stun=[StunSample(SRV_A, ("192.0.2.10", 4000), 0.01), StunSample(SRV_B, ("192.0.2.10", 4000), 0.01)],
        static=[("192.0.2.10", 4000), ("198.51.100.99", 9), ("198.51.100.99", 9)],
    )
    assert [(e.type, e.address) for e in r.endpoints] == [
        (STATIC, ("198.51.100.99", 9)),
        (LOCAL, ("192.0.2.10", 4000)),
    ]
    r = round_endpoints(
        stun=[StunSample(SRV_A, ("203.0.113.2", 5000), 0.01)], portmapped=("203.0.113.2", 5000)
    )
    assert [(e.type, e.address) for e in r.endpoints] == [(PMP, ("203.0.113.2", 5000))]


def test_round_rejects_bad_inputs_without_raising() -> None:
    r = round_endpoints(
        local=[(("192.168.1.2", 0), "eth0"), (("garbage", 5), "eth1")],
        stun=[StunSample(SRV_A, ("203.0.113.2", 70000), 0.01)],
        portmapped=("203.0.113.2", 5000),
    )
    assert [e.address for e in r.endpoints] == [("203.0.113.2", 5000)]
    assert len(r.rejected) == 3
    assert any("port 0 out of range" in x for x in r.rejected)
    assert any("garbage" in x for x in r.rejected)


def test_round_ipv6_stun() -> None:
    r = round_endpoints(
        stun=[StunSample(("2001:db8:100::a", 3478), ("2001:db8:1:2::2", 41641), 0.01),
              StunSample(SRV_A, ("203.0.113.2", 41641), 0.01)],
    )  # fmt: skip
    assert r.global_v6 == ("2001:db8:1:2::2", 41641) and r.global_v4 == ("203.0.113.2", 41641)
    assert [e.address for e in r.endpoints] == [("2001:db8:1:2::2", 41641), ("203.0.113.2", 41641)]


# --- the set over time ---------------------------------------------------------------------------------


def eps(*items: tuple[CandidateType, str, int]) -> list[RoundEndpoint]:
    return [RoundEndpoint(kind, (ip, port)) for kind, ip, port in items]


def addrs(cands: Sequence[Candidate]) -> list[tuple[CandidateType, Endpoint]]:
    return [(c.type, c.address) for c in cands]


def test_set_keeps_first_seen_and_ages() -> None:
    s = CandidateSet()
    s.update(eps((STUN, "203.0.113.2", 1000), (LOCAL, "192.168.1.2", 1000)), now=100.0)
    out = s.update(eps((STUN, "203.0.113.2", 1000), (LOCAL, "192.168.1.2", 1000)), now=125.0)
    assert [(c.first_seen, c.last_seen) for c in out] == [(100.0, 125.0), (100.0, 125.0)]
    assert out[0].age(130.0) == 30.0 and out[0].idle(130.0) == 5.0
    assert out[0].priority == candidate_priority(STUN, "203.0.113.2") and out[1].family == 4


def test_set_remembers_reflexive_for_5min10s_and_drops_locals_at_once() -> None:
    s = CandidateSet()
    s.update(
        eps((STUN, "203.0.113.2", 1000), (STATIC, "192.0.2.50", 1), (LOCAL, "192.168.1.2", 1000)), now=0.0
    )
    # The NAT moves us to another port, the static one is removed from config, we roam to another LAN address.
    out = s.update(eps((STUN, "203.0.113.2", 2000), (LOCAL, "192.168.1.3", 1000)), now=10.0)
    assert addrs(out) == [
        (STUN, ("203.0.113.2", 2000)),
        (STUN, ("203.0.113.2", 1000)),  # remembered, after this round's reflexive ones
        (LOCAL, ("192.168.1.3", 1000)),
    ]
    assert s.candidates(ENDPOINT_LIFETIME) == out  # last seen at 0: still advertised at exactly 310 s
    assert addrs(s.candidates(ENDPOINT_LIFETIME + 0.001)) == [
        (STUN, ("203.0.113.2", 2000)),
        (LOCAL, ("192.168.1.3", 1000)),
    ]
    out = s.update(eps((STUN, "203.0.113.2", 2000)), now=ENDPOINT_LIFETIME)
    assert ("203.0.113.2", 1000) in [c.address for c in out]
    out = s.update(eps((STUN, "203.0.113.2", 2000)), now=ENDPOINT_LIFETIME + 0.5)
    assert addrs(out) == [(STUN, ("203.0.113.2", 2000))]
    # Seen again after expiry: a new first_seen.
    out = s.update(eps((STUN, "203.0.113.2", 1000)), now=400.0)
    assert out[0].first_seen == 400.0


def test_set_caps_remembered_per_ip_at_6() -> None:
    s = CandidateSet()
    for i in range(10):  # a hard NAT: a new port every round
        out = s.update(eps((STUN, "203.0.113.2", 5000 + i), (STUN, "198.51.100.77", 9)), now=float(i))
    ports = [c.address[1] for c in out if c.address[0] == "203.0.113.2"]
    assert ports == [5009, 5008, 5007, 5006, 5005, 5004]  # this round's plus the 5 newest remembered
    assert ("198.51.100.77", 9) in [c.address for c in out]


def test_set_caps_total() -> None:
    s = CandidateSet(max_candidates=4)
    s.update(eps((STUN, "203.0.113.2", 1), (STUN, "203.0.113.3", 1)), now=0.0)
    s.update(eps((STUN, "203.0.113.4", 1)), now=1.0)
    out = s.update(
        eps((STUN, "203.0.113.5", 1), (LOCAL, "2001:db8::2", 1), (LOCAL, "192.168.1.2", 1)), now=2.0
    )
    # Remembered ones go first, stalest first (both from t=0), then the newer one (t=1).
    assert addrs(out) == [
        (STUN, ("203.0.113.5", 1)),
        (STUN, ("203.0.113.4", 1)),
        (LOCAL, ("2001:db8::2", 1)),
        (LOCAL, ("192.168.1.2", 1)),
    ]
    s2 = CandidateSet(max_candidates=2)
    out = s2.update(eps((STUN, "203.0.113.5", 1), (LOCAL, "2001:db8::2", 1), (LOCAL, "192.168.1.2", 1)), 0.0)
    assert addrs(out) == [(LOCAL, ("2001:db8::2", 1)), (LOCAL, ("192.168.1.2", 1))]  # by priority
    with pytest.raises(ValueError, match="max_per_ip"):
        CandidateSet(max_per_ip=0)


# --- the refresh schedule ------------------------------------------------------------------------------


def test_schedule_intervals_are_random_in_20_to_26() -> None:
    sched = RefreshSchedule(rng=random.Random(7))
    gaps = [sched.note_gathered(1000.0) - 1000.0 for _ in range(2000)]
    assert min(gaps) >= 20.0 and max(gaps) <= 26.0
    assert min(gaps) < 20.1 and max(gaps) > 25.9  # the whole range is used
    assert len(set(gaps)) == 2000


def test_schedule_runs_only_while_active() -> None:
    sched = RefreshSchedule(rng=random.Random(1))
    assert sched.next_deadline(0.0) is None and not sched.due(0.0)  # no session yet
    sched.note_activity(0.0)
    assert sched.due(0.0) and sched.next_deadline(0.0) == 0.0  # never gathered: now
    nxt = sched.note_gathered(0.0)
    assert 20.0 <= nxt <= 26.0
    assert sched.next_deadline(1.0) == nxt and not sched.due(nxt - 0.001) and sched.due(nxt)
    sched.note_activity(10.0)
    assert sched.is_active(55.0) and not sched.is_active(55.001)  # 45 s idle
    later = sched.note_gathered(50.0)
    assert later > 55.0 and sched.next_deadline(later) is None and not sched.due(later)  # idle: stopped
    sched.note_activity(200.0)  # activity again, long after the interval ran out: a round at once
    assert sched.due(200.0) and sched.next_deadline(200.0) == 200.0
    sched.note_activity(100.0)  # out-of-order reports do not move the clock back
    assert sched.last_activity == 200.0


def test_schedule_fresh_enough_is_27_s() -> None:
    sched = RefreshSchedule()
    assert not sched.fresh_enough(0.0)
    sched.note_gathered(100.0)
    assert sched.fresh_enough(127.0) and not sched.fresh_enough(127.001)


# --- the anyio driver with injected sources -------------------------------------------------------------


class FakeStun:
    """Stands in for natlib.stunclient.stun_probe (the lab test runs the real one)."""

    def __init__(self, answers: dict[Endpoint, Endpoint | None], fail: Exception | None = None) -> None:
        self.answers = answers
        self.fail = fail
        self.calls: list[tuple[list[Endpoint], anyio.abc.UDPSocket | None, int]] = []

    async def __call__(
        self,
        servers: Sequence[Endpoint],
        *,
        sock: anyio.abc.UDPSocket | None = None,
        local_port: int = 0,
        timeout: float = 3.0,
    ) -> list[StunSample]:
        self.calls.append((list(servers), sock, local_port))
        await anyio.sleep(0.01)
        if self.fail is not None:
            raise self.fail
        return [
            StunSample(s, self.answers.get(s), 0.01, None if self.answers.get(s) else "timeout")
            for s in servers
        ]


def lan_interfaces() -> list[netif.InterfaceAddress]:
    return [
        netif.InterfaceAddress("eth0", 2, "192.168.1.2", 24, 0, netif.IFF_UP),
        netif.InterfaceAddress("eth0", 2, "2001:db8:1:2::2", 64, 0, netif.IFF_UP),
    ]


async def test_gather_with_a_socket_pairs_ports_and_merges_sources() -> None:
    stun = FakeStun({SRV_A: ("203.0.113.2", 4242), SRV_B: ("203.0.113.2", 4242)})

    async def portmap() -> Endpoint | None:
        return ("203.0.113.2", 6000)

    async with await anyio.create_udp_socket(family=socket.AF_INET, local_host="0.0.0.0") as sock:
        port = sock.extra(anyio.abc.SocketAttribute.local_port)
        report = await gather(
            sock,
            stun_servers=[SRV_A, SRV_B, ("2001:db8:100::a", 3478)],
            stun=stun,
            port_mapping=portmap,
            static_endpoints=[("192.0.2.50", 7000)],
            interfaces=lan_interfaces,
        )
    assert stun.calls == [([SRV_A, SRV_B], sock, 0)]  # no IPv6 socket: no IPv6 STUN
    assert [(c.type, c.address) for c in report.candidates] == [
        (PMP, ("203.0.113.2", 6000)),
        (STUN, ("203.0.113.2", 4242)),
        (STATIC, ("192.0.2.50", 7000)),
        (LOCAL, ("192.168.1.2", port)),  # only IPv4 interface addresses for an IPv4 socket
    ]
    assert report.errors == {} and report.mapping_varies_by_dest_ip is False
    assert report.portmapped == ("203.0.113.2", 6000) and len(report.stun) == 2


async def test_gather_with_a_dual_stack_socket() -> None:
    async with await anyio.create_udp_socket(family=socket.AF_INET6, local_host="::") as sock:
        port = sock.extra(anyio.abc.SocketAttribute.local_port)
        stun = FakeStun({("2001:db8:100::a", 3478): ("2001:db8:1:2::2", port)})
        report = await gather(
            sock, stun_servers=[SRV_A, ("2001:db8:100::a", 3478)], stun=stun, interfaces=lan_interfaces
        )
    assert stun.calls == [([("2001:db8:100::a", 3478)], sock, 0)]
    assert report.errors == {"stun": "IPv4 STUN needs an IPv4 socket (the IPv6 one is dual-stack)"}
    assert [(c.type, c.address) for c in report.candidates] == [
        (LOCAL, ("2001:db8:1:2::2", port)),  # STUN saw our own address: it stays a host candidate
        (LOCAL, ("192.168.1.2", port)),
    ]


async def test_gather_with_a_socket_bound_to_one_address() -> None:
    async with await anyio.create_udp_socket(family=socket.AF_INET, local_host="127.0.0.1") as sock:
        port = sock.extra(anyio.abc.SocketAttribute.local_port)
        report = await gather(sock, interfaces=lan_interfaces)
    assert [(c.type, c.address, c.source) for c in report.candidates] == [
        (LOCAL, ("127.0.0.1", port), "bound")
    ]


def overlay_interfaces() -> list[netif.InterfaceAddress]:
    return [
        *lan_interfaces(),
        netif.InterfaceAddress("mn-demo", 7, "100.64.0.1", 32, 0, netif.IFF_UP),
        netif.InterfaceAddress("mn-demo", 7, "fd7a:115c:a1e0::1", 128, 0, netif.IFF_UP),
        netif.InterfaceAddress("eth1", 3, "100.64.9.9", 24, 0, netif.IFF_UP),  # a subnet route's address
    ]


def test_address_filter_by_interface_and_prefix() -> None:
    f = AddressFilter.of(["mn-demo"], ["100.64.0.0/10", "fd7a:115c:a1e0::/48"])
    assert [a.address for a in overlay_interfaces() if f.excludes(a)] == [
        "100.64.0.1",
        "fd7a:115c:a1e0::1",
        "100.64.9.9",
    ]
    assert f.excludes_ip("100.127.255.255") and not f.excludes_ip("100.128.0.0")
    assert f.excludes_ip("::ffff:100.64.0.2")  # an IPv4-mapped source is its IPv4 address
    assert f.excludes_ip("fd7a:115c:a1e0::2%eth0") and not f.excludes_ip("fd7a:115c:a1e1::2")
    assert not f.excludes_ip("not an address")
    by_name = AddressFilter.of(["mn-demo"])
    assert [a.address for a in overlay_interfaces() if by_name.excludes(a)] == [
        "100.64.0.1",
        "fd7a:115c:a1e0::1",
    ]
    assert not by_name.excludes_ip("100.64.0.1")  # names alone say nothing about peer addresses
    assert not AddressFilter() and by_name
    with pytest.raises(ValueError, match=r"excluded prefix '100\.64\.0\.0/33'"):
        AddressFilter.of(prefixes=["100.64.0.0/33"])


async def test_gather_leaves_excluded_interfaces_and_prefixes_out() -> None:
    async with await anyio.create_udp_socket(family=socket.AF_INET6, local_host="::") as sock:
        port = sock.extra(anyio.abc.SocketAttribute.local_port)
        plain = Gatherer(sock, interfaces=overlay_interfaces)
        excluded = Gatherer(
            sock, interfaces=overlay_interfaces, exclude=AddressFilter.of(["mn-demo"], ["100.64.0.0/10"])
        )
        assert {c.address[0] for c in (await plain.gather()).candidates} == {
            "2001:db8:1:2::2",
            "fd7a:115c:a1e0::1",
            "192.168.1.2",
            "100.64.0.1",
            "100.64.9.9",
        }
        report = await excluded.gather()
    assert [(c.type, c.address) for c in report.candidates] == [
        (LOCAL, ("2001:db8:1:2::2", port)),
        (LOCAL, ("192.168.1.2", port)),
    ]
    assert [a.address for a in report.interfaces] == ["192.168.1.2", "2001:db8:1:2::2"]


async def test_gather_without_socket_uses_the_port_for_both_families() -> None:
    stun = FakeStun({SRV_A: ("203.0.113.2", 4000)})
    report = await gather(local_port=4000, stun_servers=[SRV_A], stun=stun, interfaces=lan_interfaces)
    assert stun.calls == [([SRV_A], None, 4000)]
    assert [(c.type, c.address) for c in report.of_type(LOCAL)] == [
        (LOCAL, ("2001:db8:1:2::2", 4000)),
        (LOCAL, ("192.168.1.2", 4000)),
    ]
    with pytest.raises(ValueError, match="socket or its local port"):
        Gatherer()


async def test_failing_sources_are_reported_not_raised(autojump_clock: trio.testing.MockClock) -> None:
    async def broken_portmap() -> Endpoint | None:
        raise ConnectionRefusedError("no gateway")

    async def slow_portmap() -> Endpoint | None:
        await anyio.sleep(60)
        return ("203.0.113.2", 1)

    def broken_interfaces() -> list[netif.InterfaceAddress]:
        raise netif.NetlinkError(97, "no rtnetlink")

    report = await gather(
        local_port=4000,
        stun_servers=[SRV_A],
        stun=FakeStun({}, fail=OSError("network unreachable")),
        port_mapping=broken_portmap,
        interfaces=broken_interfaces,
        static_endpoints=[("192.0.2.50", 7000), ("192.0.2.51", 0)],
    )
    assert [c.address for c in report.candidates] == [("192.0.2.50", 7000)]
    assert report.errors["stun"] == "OSError: network unreachable"
    assert report.errors["portmap"] == "ConnectionRefusedError: no gateway"
    assert report.errors["interfaces"] == "NetlinkError: [Errno 97] no rtnetlink"
    assert "port 0 out of range" in report.errors["input"]

    start = trio.current_time()
    report = await gather(
        local_port=4000,
        stun_servers=[SRV_A, SRV_B],
        stun=FakeStun({}),
        port_mapping=slow_portmap,
        interfaces=lambda: [],
    )
    assert trio.current_time() - start == pytest.approx(2.0)  # PORTMAP_TIMEOUT bounds the round
    assert report.errors["portmap"] == "no answer within 2.0 s"
    assert report.errors["stun"].startswith("no STUN server answered: 198.51.100.10:3478 timeout")
    assert report.candidates == ()


async def test_run_regathers_on_schedule_and_stops_when_idle(autojump_clock: trio.testing.MockClock) -> None:
    stun = FakeStun({SRV_A: ("203.0.113.2", 4000)})
    g = Gatherer(local_port=4000, stun_servers=[SRV_A], stun=stun, interfaces=lambda: [])
    times: list[float] = []

    async def on_report(report: object) -> None:
        times.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        g.note_activity()
        await nursery.start(g.run, on_report)
        await trio.sleep(100.0)  # active for 45 s after the activity at t=0, then idle
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(times) >= 2 and all(20.0 <= gap <= 26.0 + 0.02 for gap in gaps)
        # The last round was within the 45 s of activity; the one after it was due later and never ran.
        assert times[-1] <= 45.0 + 0.02
        assert g.schedule.next_at is not None and 45.0 < g.schedule.next_at < 100.0
        g.note_activity()  # the session resumes: a round at once (the interval ran out long ago)
        await trio.sleep(0.5)
        assert times[-1] == pytest.approx(100.0, abs=0.05)
        rounds = len(times)
        g.request_refresh()  # e.g. a netmon event
        await trio.sleep(0.5)
        assert len(times) == rounds + 1
        nursery.cancel_scope.cancel()


async def test_fresh_reuses_a_recent_round(autojump_clock: trio.testing.MockClock) -> None:
    stun = FakeStun({SRV_A: ("203.0.113.2", 4000)})
    g = Gatherer(local_port=4000, stun_servers=[SRV_A], stun=stun, interfaces=lambda: [])
    first = await g.fresh()
    assert len(stun.calls) == 1 and first == g.candidates
    await trio.sleep(27.0)
    assert await g.fresh() == first and len(stun.calls) == 1  # exactly 27 s: fresh enough
    await trio.sleep(0.1)
    await g.fresh()
    assert len(stun.calls) == 2


async def test_a_network_change_makes_fresh_wait_for_a_round_begun_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After ``request_refresh()`` (a netmon event) a CallMeMaybe must not advertise the old
    addresses: :meth:`fresh` waits for a round that began after the change, not one already
    running, which may have read the old network."""
    stun = FakeStun({SRV_A: ("203.0.113.2", 4000)})
    interfaces = [lan_interfaces()[1]]
    g = Gatherer(local_port=4000, stun_servers=[SRV_A], stun=stun, interfaces=lambda: list(interfaces))
    assert [c.address for c in await g.fresh()] == [("203.0.113.2", 4000), ("2001:db8:1:2::2", 4000)]

    # A round starts (the STUN answer takes 10 ms); the address changes while it runs.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(g.gather)
        await trio.sleep(0.005)
        interfaces[:] = [netif.InterfaceAddress("eth0", 2, "2001:db8:1:3::7", 64, 0, netif.IFF_UP)]
        stun.answers[SRV_A] = ("203.0.113.9", 4001)
        g.request_refresh()
    # That round read the interfaces before the change: its candidates are still stale.
    assert ("2001:db8:1:2::2", 4000) in [c.address for c in g.candidates] and len(stun.calls) == 2
    advertised = [c.address for c in await g.fresh()]
    assert len(stun.calls) == 3
    # The new round's; the old reflexive address is remembered for a while (as Tailscale does).
    assert advertised == [("203.0.113.9", 4001), ("203.0.113.2", 4000), ("2001:db8:1:3::7", 4000)]
    assert await g.fresh() == g.candidates and len(stun.calls) == 3  # fresh again: no more rounds

    # A refresh that may only add (a late port mapping) leaves the candidates usable meanwhile.
    g.request_refresh(stale=False)
    assert await g.fresh() == g.candidates and len(stun.calls) == 3


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_gather_runs_under_both_backends(backend: str) -> None:
    async def main() -> list[tuple[CandidateType, Endpoint]]:
        stun = FakeStun({SRV_A: ("203.0.113.2", 4000)})
        report = await gather(local_port=4000, stun_servers=[SRV_A], stun=stun, interfaces=lan_interfaces)
        return [(c.type, c.address) for c in report.candidates]

    assert anyio.run(main, backend=backend) == [
        (STUN, ("203.0.113.2", 4000)),
        (LOCAL, ("2001:db8:1:2::2", 4000)),
        (LOCAL, ("192.168.1.2", 4000)),
    ]
