"""The topology API: the text form, validation, addressing, connectivity, running programs."""

from __future__ import annotations

import ipaddress
import json

import pytest

from natlib.testing import (
    NAT_KINDS,
    Lab,
    LabCommandError,
    LabError,
    SiteSpec,
    StunServer,
    Topology,
    TopologyError,
    measure_tcp,
)
from natlib.testing._spec import is_documentation_address


def test_parse_short_form() -> None:
    topo = Topology.parse("easy,x=hard:hosts=2:hairpin:timeout=5,c=v6only")
    assert [s.name for s in topo.sites] == ["a", "x", "c"]
    assert topo.sites[1].host_names == ("x1", "x2")
    assert topo.sites[1].hairpin and topo.sites[1].mapping_timeout == 5.0
    assert topo.sites[2].has_ipv6 and not topo.sites[2].kind.ipv4
    assert [s.name for s in topo.servers] == ["stun"]


def test_parse_json_roundtrip() -> None:
    topo = Topology(sites=(SiteSpec("a", "easyAF", hosts=("alice", "bob")),))
    again = Topology.parse(json.dumps(topo.to_dict()))
    assert again == topo


@pytest.mark.parametrize(
    "text",
    [
        "nosuchkind",
        "easy:bogus",
        "a=easy,a=hard",
        "none:filtering=endpoint_independent",
        "easy:public=8.8.8.8",
        "easy:lan=8.8.8.0/24",
        "averyverylongsitename=easy",
        "v6only:pmp",
    ],
)
def test_invalid_topologies_are_rejected(text: str) -> None:
    with pytest.raises((TopologyError, ValueError)):
        Topology.parse(text)


def test_every_kind_is_documented() -> None:
    assert {
        "none",
        "easy",
        "easyAF",
        "hard",
        "one2one",
        "udp_blocked",
        "v6only",
        "easyPMP",
        "hardPMP",
    } <= set(NAT_KINDS)


@pytest.mark.netlab("a=easy:hosts=2:ipv6,b=none:ipv6,c=v6only")
def test_addresses_and_connectivity(netlab: Lab, netlab_stun: StunServer) -> None:
    lab = netlab
    # Only documentation ranges on the internet, RFC 1918 / documentation v6 inside sites.
    for h in lab.hosts.values():
        for a in [*h.ipv4, *h.ipv6]:
            if h.role == "lan" and ":" not in a:
                assert ipaddress.ip_address(a).is_private
            else:
                assert is_documentation_address(a), (h.name, a)
        assert h.netns.startswith(lab.prefix)
    assert lab.site("a").public_ipv4 == "203.0.113.2"
    assert lab.site("c").public_ipv4 is None and lab.host("c1").ipv4 == []
    # Every host reaches the server over each family it has (TCP), seen from the right address.
    for name, public in (("a1", "203.0.113.2"), ("a2", "203.0.113.2"), ("b1", lab.host("b1").ipv4[0])):
        seen = measure_tcp(lab, name, netlab_stun, family=4)
        assert seen is not None and seen[0] == public
    for name in ("a1", "b1", "c1"):
        seen = measure_tcp(lab, name, netlab_stun, family=6)
        assert seen is not None and seen[0] == lab.host(name).ipv6[0]  # no NAT for IPv6
    # v6only really has no IPv4.
    assert measure_tcp(lab, "c1", netlab_stun, family=4, timeout=1.0) is None


@pytest.mark.netlab("a=easy:hosts=2")
def test_same_lan_hosts_see_private_addresses(netlab: Lab) -> None:
    lab = netlab
    rx = lab.spawn("a1", lab.agent_argv("recv", "--bind", "0.0.0.0:7000", "--timeout", "5"), name="recv")
    rx.wait_for_output(r'"ready"')
    lab.agent("a2", "send", "--bind", "0.0.0.0:7001", "--to", f"{lab.host('a1').ipv4[0]}:7000")
    rx.wait(10)
    got = [x for x in rx.json_lines() if "from" in x]
    assert got == [{"from": [lab.host("a2").ipv4[0], 7001], "data": "hello"}]


@pytest.mark.netlab("easy")
def test_run_and_spawn(netlab: Lab) -> None:
    lab = netlab
    p = lab.run("a1", ["sh", "-c", "echo out; echo err >&2"])
    assert p.stdout == "out\n" and p.stderr == "err\n"
    with pytest.raises(LabCommandError, match="exited with 3"):
        lab.run("a1", ["sh", "-c", "exit 3"])
    assert lab.run("a1", ["sh", "-c", "exit 3"], check=False).returncode == 3
    bg = lab.spawn("a1", ["sh", "-c", "echo started; exec sleep 60"], name="sleeper")
    bg.wait_for_output("^started$")
    assert bg.returncode is None
    assert bg.log_path.is_file()
    bg.stop()
    assert bg.returncode is not None
    with pytest.raises(LabError, match="no host"):
        lab.run("nosuchhost", ["true"])
