"""Plain-socket UDP hole punching in the lab: the lab is faithful if it works easy↔easy and fails
hard↔hard, as on real NATs (nat-traversal.md §4.3)."""

from __future__ import annotations

import pytest

from natlib.testing import Lab, StunServer, hole_punch

NETLAB_TOPOLOGY = "e1=easy,e2=easy,h1=hard,h2=hard,af=easyAF,one=one2one"


@pytest.fixture(scope="module")
def stun(netlab_module: Lab) -> StunServer:
    from natlib.testing import start_stun_server

    return start_stun_server(netlab_module)


def test_easy_easy_punches(netlab_module: Lab, stun: StunServer) -> None:
    lab = netlab_module
    r = hole_punch(lab, "e11", "e21", stun)
    assert r.ok, r
    # Each side hears the other from exactly the endpoint STUN reported (endpoint-independent mapping).
    assert r.a_heard_from == r.mapped_b
    assert r.b_heard_from == r.mapped_a
    assert r.mapped_a == (lab.site("e1").public_ipv4, 41641)


def test_hard_hard_fails(netlab_module: Lab, stun: StunServer) -> None:
    lab = netlab_module
    r = hole_punch(lab, "h11", "h21", stun, timeout=2.0)
    assert r.mapped_a is not None and r.mapped_b is not None
    assert not r.ok
    assert r.a_heard_from is None and r.b_heard_from is None


def test_easy_hard_fails(netlab_module: Lab, stun: StunServer) -> None:
    r = hole_punch(netlab_module, "e11", "h11", stun, port_a=41700, port_b=41700, timeout=2.0)
    assert r.a_heard_from is None and r.b_heard_from is None


@pytest.mark.parametrize("other", ["af1", "one1"])
def test_hard_punches_with_easyaf_and_one2one(netlab_module: Lab, stun: StunServer, other: str) -> None:
    # The easyAF side has sent to the hard side's address, so it accepts the hard side's fresh port;
    # a 1:1 NAT accepts everything. Each answers where the packets really come from.
    r = hole_punch(netlab_module, "h11", other, stun, port_a=41800, port_b=41800)
    assert r.ok, r
    assert r.a_heard_from == r.mapped_b
    assert r.b_heard_from is not None and r.b_heard_from != r.mapped_a  # a new port toward the peer
    assert r.b_heard_from[0] == netlab_module.site("h1").public_ipv4
