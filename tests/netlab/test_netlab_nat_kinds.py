"""Each NAT kind's mapping and filtering, measured with the lab's STUN server (RFC 5389/5780)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from natlib.testing import (
    Lab,
    LabError,
    StunServer,
    measure_filtering,
    measure_mapping,
    measure_tcp,
    start_stun_server,
)

NETLAB_TOPOLOGY = (
    "easy=easy,easyaf=easyAF,eif=easyEIF,hard=hard,one=one2one,udpb=udp_blocked,"
    "vsix=v6only,pub=none:ipv6,hp=easy:hosts=2:hairpin,nohp=easy:hosts=2"
)


@pytest.fixture(scope="module")
def stun(netlab_module: Lab) -> Iterator[StunServer]:
    server = start_stun_server(netlab_module)
    yield server
    server.stop()


# (site, mapping, port preserved, filtering, which unsolicited sources pass: A:P', B:P, B:P')
CASES = [
    ("easy", "endpoint_independent", True, "address_and_port_dependent", (False, False, False)),
    ("easyaf", "endpoint_independent", True, "address_dependent", (True, False, False)),
    ("eif", "endpoint_independent", True, "endpoint_independent", (True, True, True)),
    ("hard", "endpoint_dependent", False, "address_and_port_dependent", (False, False, False)),
    ("one", "endpoint_independent", True, "endpoint_independent", (True, True, True)),
    ("pub", "endpoint_independent", True, "endpoint_independent", (True, True, True)),
]


@pytest.mark.parametrize(
    ("site", "mapping", "preserved", "filtering", "passes"), CASES, ids=[c[0] for c in CASES]
)
def test_ipv4_mapping_and_filtering(
    netlab_module: Lab,
    stun: StunServer,
    site: str,
    mapping: str,
    preserved: bool,
    filtering: str,
    passes: tuple[bool, bool, bool],
) -> None:
    lab = netlab_module
    host = lab.site(site).hosts[0].name
    public = lab.site(site).public_ipv4 or lab.host(host).ipv4[0]
    m = measure_mapping(lab, host, stun, port=40000)
    assert all(ep is not None and ep[0] == public for ep in m.mapped), m
    ports = m.ports
    if mapping == "endpoint_independent":
        # The same external port toward two different destinations (and a third).
        assert ports[0] == ports[1] == ports[2], ports
    else:
        # A new port per destination.
        assert len(set(ports)) == 3, ports
    assert m.behaviour == mapping
    assert m.port_preserved == preserved
    f = measure_filtering(lab, host, stun, port=40001)
    assert f.mapped is not None and f.mapped[0] == public
    assert (f.other_port, f.other_addr, f.other_addr_port) == passes, f
    assert f.behaviour == filtering


def test_udp_blocked_blocks_udp_not_tcp(netlab_module: Lab, stun: StunServer) -> None:
    lab = netlab_module
    m = measure_mapping(lab, "udpb1", stun, port=40000, timeout=0.6)
    assert m.mapped == (None, None, None)
    assert m.behaviour == "blocked"
    tcp = measure_tcp(lab, "udpb1", stun)
    assert tcp is not None and tcp[0] == lab.site("udpb").public_ipv4
    # Same router kind without the UDP block, for contrast.
    assert measure_mapping(lab, "easy1", stun).behaviour == "endpoint_independent"


def test_tcp_is_translated(netlab_module: Lab, stun: StunServer) -> None:
    lab = netlab_module
    for site in ("easy", "hard", "one"):
        seen = measure_tcp(lab, f"{site}1", stun)
        assert seen is not None and seen[0] == lab.site(site).public_ipv4


def test_v6only(netlab_module: Lab, stun: StunServer) -> None:
    lab = netlab_module
    h = lab.host("vsix1")
    assert h.ipv4 == [] and h.ipv6
    m = measure_mapping(lab, "vsix1", stun, port=40000, family=6)
    # No NAT: the peer sees the host's own global address and port.
    assert m.mapped == ((h.ipv6[0], 40000),) * 3
    f = measure_filtering(lab, "vsix1", stun, port=40001, family=6)
    assert f.mapped == (h.ipv6[0], 40001)
    assert f.behaviour == "address_and_port_dependent"  # the router's stateful firewall
    assert measure_tcp(lab, "vsix1", stun, family=6) is not None
    # ... and no IPv4 at all.
    r = lab.run("vsix1", ["ip", "-4", "route", "show", "default"])
    assert r.stdout.strip() == ""


def _hairpin(lab: Lab, stun: StunServer, site: str, expect: bool) -> list[str] | None:
    """h1 learns its public endpoint (STUN) and listens on that socket; h2 sends to that public
    endpoint, then a control datagram to h1's private address. Returns the hairpinned packet's source."""
    h1, h2 = f"{site}1", f"{site}2"
    rx = lab.spawn(
        h1,
        lab.agent_argv(
            "recv",
            "--bind",
            "0.0.0.0:42000",
            "--count",
            "2",
            "--timeout",
            "10",
            "--stun",
            stun.endpoint_str(),
        ),
        name="recv",
    )
    m = rx.wait_for_output(r'^\{"ready".*$')
    mapped = json.loads(m.group(0))["mapped"]
    assert mapped is not None and mapped[0] == lab.site(site).public_ipv4
    lab.agent(h2, "send", "--bind", "0.0.0.0:42001", "--to", f"{mapped[0]}:{mapped[1]}", "--data", "hairpin")
    lab.agent(
        h2, "send", "--bind", "0.0.0.0:42002", "--to", f"{lab.host(h1).ipv4[0]}:42000", "--data", "control"
    )
    rx.wait_for_output(r'"data": "control"')
    try:
        # Positive case: it arrives (or already has). Negative case: the control, sent after it, is in;
        # allow 0.5 s for the longer routed path before concluding that it was dropped.
        rx.wait_for_output(r'"data": "hairpin"', timeout=5.0 if expect else 0.5)
    except LabError:
        return None
    finally:
        rx.stop()
    hair = [x for x in rx.json_lines() if x.get("data") == "hairpin"]
    return list(hair[0]["from"])


def test_hairpinning_on_and_off(netlab_module: Lab, stun: StunServer) -> None:
    lab = netlab_module
    src = _hairpin(lab, stun, "hp", expect=True)
    # The receiver sees the sender's public address, not its private one.
    assert src is not None and src[0] == lab.site("hp").public_ipv4
    assert _hairpin(lab, stun, "nohp", expect=False) is None
