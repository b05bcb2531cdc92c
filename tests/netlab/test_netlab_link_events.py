"""Link events for roaming tests: renumbering a host or a NAT, dropping a link, flushing mappings."""

from __future__ import annotations

import pytest

from natlib.testing import Lab, LabError, StunServer, measure_mapping, measure_tcp


@pytest.mark.netlab("a=easy:hosts=2,h=hard,p=none")
def test_renumber_lan_host_and_public_host(netlab: Lab, netlab_stun: StunServer) -> None:
    lab = netlab
    old = lab.host("a1").ipv4[0]
    new = lab.set_address("a1")
    assert new != old and lab.host("a1").ipv4 == [new]
    out = lab.run("a1", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert f"inet {new}/24" in out and f"inet {old}/" not in out
    # Still online through the same NAT, same public address.
    m = measure_mapping(lab, "a1", netlab_stun, port=40000)
    assert m.mapped[0] == (lab.site("a").public_ipv4, 40000)
    # A public host moves to another public address: peers see the new one.
    newp = lab.set_address("p1", "192.0.2.200")
    m = measure_mapping(lab, "p1", netlab_stun, port=40000)
    assert m.mapped[0] == (newp, 40000)


@pytest.mark.netlab("a=easy,o=one2one")
def test_nat_gets_a_new_public_address(netlab: Lab, netlab_stun: StunServer) -> None:
    lab = netlab
    before = measure_mapping(lab, "a1", netlab_stun, port=40000).mapped[0]
    assert before == ("203.0.113.2", 40000)
    new = lab.set_public_address("a", "203.0.113.77")
    assert lab.site("a").public_ipv4 == new == "203.0.113.77"
    after = measure_mapping(lab, "a1", netlab_stun, port=40000).mapped[0]
    assert after == ("203.0.113.77", 40000)
    # 1:1 NAT: its snat/dnat follow the new address.
    new_o = lab.set_public_address("o")
    assert measure_mapping(lab, "o1", netlab_stun, port=40000).mapped[0] == (new_o, 40000)
    assert measure_tcp(lab, "o1", netlab_stun) is not None


@pytest.mark.netlab("a=easy,p=none")
@pytest.mark.parametrize("who", ["a1", "a-nat", "p1"])
def test_link_down_and_up(netlab: Lab, netlab_stun: StunServer, who: str) -> None:
    lab = netlab
    host = "a1" if who.startswith("a") else "p1"
    assert measure_mapping(lab, host, netlab_stun).behaviour == "endpoint_independent"
    lab.link_down(who)
    link = lab.run(who, ["ip", "-o", "link", "show", "dev", lab.host(who).uplink]).stdout
    assert "state DOWN" in link
    assert measure_mapping(lab, host, netlab_stun, timeout=0.5).mapped == (None, None, None)
    lab.link_up(who)
    assert measure_mapping(lab, host, netlab_stun).behaviour == "endpoint_independent"
    with pytest.raises(LabError):
        lab.link_down("inet")


@pytest.mark.netlab("h=hard")
def test_flush_nat_forgets_mappings(netlab: Lab, netlab_stun: StunServer) -> None:
    lab = netlab
    first = measure_mapping(lab, "h1", netlab_stun, port=40000)
    again = measure_mapping(lab, "h1", netlab_stun, port=40000)
    assert again.ports == first.ports  # the mappings are still there: reused
    lab.flush_nat("h")
    out = lab.run("h-nat", ["conntrack", "-L"], check=False)
    assert "dport=3478" not in out.stdout
    after = measure_mapping(lab, "h1", netlab_stun, port=40000)
    assert after.ports != first.ports  # new random ports: the NAT forgot
    assert len(set(after.ports)) == 3


@pytest.mark.netlab("a=easyEIF:timeout=2")
def test_mapping_timeout(netlab: Lab, netlab_stun: StunServer) -> None:
    lab = netlab
    sysctl = lab.run("a-nat", ["sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout"]).stdout.strip()
    assert sysctl == "2"
    rules = lab.run("a-nat", ["nft", "list", "map", "inet", "natlab", "eim"]).stdout
    assert "timeout 2s" in rules
