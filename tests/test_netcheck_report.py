"""natlib.netcheck report (sans-io): what the builder makes of probe outcomes; JSON and text."""

from __future__ import annotations

import json

from natlib.derpmap import DERPMap, DERPRegion
from natlib.netcheck import Report, ReportBuilder
from natlib.stunclient import StunResult


def _ok(server: str, mapped: tuple[str, int], rtt: float) -> StunResult:
    return StunResult((server, 3478), mapped, rtt, None, sends=1)


def test_easy_nat_same_mapping_from_two_servers() -> None:
    b = ReportBuilder(full=True, os_has_ipv6=True)
    assert b.mapping_varies_by_dest_ip is None
    assert b.add_stun(1, _ok("198.51.100.10", ("203.0.113.2", 40000), 0.020))
    assert b.mapping_varies_by_dest_ip is None  # one server cannot tell
    assert b.add_stun(1, _ok("198.51.100.10", ("203.0.113.2", 40000), 0.015))
    assert b.mapping_varies_by_dest_ip is None  # the same server again cannot either
    assert b.add_stun(2, _ok("198.51.100.20", ("203.0.113.2", 40000), 0.030))
    assert b.mapping_varies_by_dest_ip is False
    r = b.report(preferred_derp=1)
    assert (r.udp, r.ipv4, r.ipv6, r.ipv4_can_send, r.ipv6_can_send) == (True, True, False, True, False)
    assert r.region_latency == {1: 0.015, 2: 0.030} and r.region_v4_latency == r.region_latency
    assert r.global_v4 == ("203.0.113.2", 40000)
    assert r.global_v4_counters == {("203.0.113.2", 40000): 3}
    assert r.latency_source == {1: "stun", 2: "stun"}


def test_hard_nat_and_failures() -> None:
    b = ReportBuilder(full=False)
    b.add_stun(1, _ok("198.51.100.10", ("203.0.113.2", 1111), 0.02))
    assert not b.add_stun(3, StunResult(("198.51.100.30", 3478), None, None, "timeout", sends=3))
    b.add_stun(2, _ok("198.51.100.20", ("203.0.113.2", 2222), 0.03))
    b.add_stun(2, _ok("2001:db8::20", ("2001:db8:1::2", 5), 0.04))
    assert b.mapping_varies_by_dest_ip is True
    r = b.report()
    assert r.region_latency == {1: 0.02, 2: 0.03}
    assert r.region_v6_latency == {2: 0.04} and r.ipv6 and r.global_v6 == ("2001:db8:1::2", 5)
    assert r.global_v4 == ("203.0.113.2", 1111)  # the first seen
    assert 3 not in r.region_latency


def test_udp_blocked_latency_from_https() -> None:
    b = ReportBuilder(full=True)
    b.note_sent(4)
    b.add_https_latency(1, 0.05)
    b.add_https_latency(1, 0.04)
    b.captive_portal = False
    r = b.report(preferred_derp=1)
    assert (r.udp, r.ipv4, r.ipv4_can_send) == (False, False, True)
    assert r.region_latency == {1: 0.04} and r.latency_source == {1: "https"} and r.region_v4_latency == {}


def test_json_is_exact_and_round_trips_through_json() -> None:
    r = Report(
        udp=True,
        ipv4=True,
        ipv4_can_send=True,
        mapping_varies_by_dest_ip=False,
        pmp=True,
        pcp=False,
        upnp=False,
        preferred_derp=900,
        region_latency={901: 0.5, 900: 0.25},
        region_v4_latency={900: 0.25, 901: 0.5},
        latency_source={900: "stun", 901: "stun"},
        global_v4=("203.0.113.2", 41641),
        global_v4_counters={("203.0.113.2", 41641): 2},
        global_v6=("2001:db8::1", 5),
        full=True,
    )
    assert json.loads(r.to_json()) == {
        "udp": True,
        "ipv4": True,
        "ipv6": False,
        "ipv4_can_send": True,
        "ipv6_can_send": False,
        "os_has_ipv6": False,
        "mapping_varies_by_dest_ip": False,
        "upnp": False,
        "pmp": True,
        "pcp": False,
        "captive_portal": None,
        "preferred_derp": 900,
        "region_latency": {"900": 0.25, "901": 0.5},
        "region_v4_latency": {"900": 0.25, "901": 0.5},
        "region_v6_latency": {},
        "latency_source": {"900": "stun", "901": "stun"},
        "global_v4": "203.0.113.2:41641",
        "global_v6": "[2001:db8::1]:5",
        "global_v4_counters": {"203.0.113.2:41641": 2},
        "global_v6_counters": {},
        "full": True,
    }
    assert list(json.loads(r.to_json())["region_latency"]) == ["900", "901"]


def test_text_names_regions_and_sorts_by_latency() -> None:
    m = DERPMap(regions={900: DERPRegion(900, "fra", "Frankfurt"), 901: DERPRegion(901)})
    r = Report(
        udp=True,
        ipv4=True,
        os_has_ipv6=True,
        preferred_derp=900,
        region_latency={901: 0.0125, 900: 0.005},
        latency_source={900: "stun", 901: "https"},
        global_v4=("203.0.113.2", 41641),
    )
    assert r.format_text(m).splitlines() == [
        "Report:",
        "  * UDP: yes",
        "  * IPv4: yes, 203.0.113.2:41641",
        "  * IPv6: no, but the OS supports it",
        "  * Mapping varies by destination IP (hard NAT): not checked",
        "  * Port mapping: UPnP not checked, NAT-PMP not checked, PCP not checked",
        "  * Captive portal: not checked",
        "  * Nearest relay: fra (Frankfurt)",
        "  * Relay latency:",
        "      - fra (Frankfurt): 5.0 ms",
        "      - 901: 12.5 ms, via HTTPS",
    ]
    assert "(no region answered)" in Report().format_text()
