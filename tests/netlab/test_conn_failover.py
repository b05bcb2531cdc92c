"""Failover: the direct path breaks mid-stream; traffic moves to the relay within 2 s, nothing is
lost, and the direct path comes back once it works again.

Two natlib.conn peers behind easy NATs stream 100 sequence-numbered datagrams/s each way. The
direct path is broken in two ways:

* a blackhole: an nftables table in site a's router drops UDP between the two NATs' public
  addresses (the relay's TCP still passes), then is deleted;
* ``lab.flush_nat``: the NAT forgets its mappings and filtering state mid-stream.

Counted by the receivers: after the blackhole every sequence number arrives (zero loss) and no
new datagram waits longer than 2 s. ``flush_nat`` on an easy NAT is a blip, not a break: the
next outgoing datagram re-creates the same mapping (port preserved) within one send interval,
so no ping goes unanswered and nothing fails over; a datagram from the peer that arrives inside
that window is dropped by the NAT, and the pong of a later ping, which passes, makes it look
delivered (natlib.path confirms datagrams by later pongs). So there at most
``FLUSH_WINDOW_LOSS`` datagrams per direction may go, and the path must stay or return direct.
"""

from __future__ import annotations

import time

import connlab
import pytest

from natlib.testing import Lab

NETLAB_TOPOLOGY = "a=easy,b=easy"
FAILOVER_BOUND = 2.0
FLUSH_WINDOW_LOSS = 2
REUPGRADE_WAIT = 15.0


def _blackhole(lab: Lab, on: bool) -> None:
    router = lab.site("a").router
    assert router is not None
    other = lab.site("b").public_ipv4
    if on:
        rules = (
            "table inet connfail {\n"
            "  chain cut {\n"
            "    type filter hook forward priority -5; policy accept;\n"
            f"    ip daddr {other} meta l4proto udp drop\n"
            f"    ip saddr {other} meta l4proto udp drop\n"
            "  }\n"
            "}\n"
        )
        lab.run(router.name, ["nft", "-f", "-"], input=rules)
    else:
        lab.run(router.name, ["nft", "delete", "table", "inet", "connfail"])


def _wait_both_direct(a: connlab.Peer, b: connlab.Peer, after: int, timeout: float) -> None:
    """Until each side's latest path event (beyond the first ``after``) is direct."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ea, eb = a.lines("path"), b.lines("path")
        if len(ea) > after and len(eb) > after and ea[-1]["kind"] == eb[-1]["kind"] == "direct":
            return
        time.sleep(0.05)
    raise AssertionError(f"not direct again: {[e['kind'] for e in a.lines('path')]}")


@pytest.fixture(scope="module")
def relay(netlab_module: Lab) -> object:
    proc = connlab.start_relay(netlab_module)
    yield proc
    proc.stop()


@pytest.mark.parametrize("breaker", ["blackhole", "flush_nat"])
def test_direct_path_breaks_then_returns(netlab_module: Lab, relay: object, breaker: str) -> None:
    lab = netlab_module
    a, b = connlab.spawn_pair(lab, "a1", "b1", name=f"failover-{breaker}")
    try:
        connlab.start_stream(a, b)
        _wait_both_direct(a, b, 0, 10)
        time.sleep(0.5)
        a.send(cmd="mark")
        broken_at = a.wait_line("mark", 5)["t"]
        events_before = len(a.lines("path"))
        if breaker == "blackhole":
            _blackhole(lab, True)
            time.sleep(3.0)  # longer than the failover bound: the stream must have moved
            kinds = [e["kind"] for e in a.lines("path")[events_before:]]
            assert kinds and kinds[0] in ("both", "relay"), kinds
            left = a.lines("path")[events_before]
            assert left["t"] - broken_at <= FAILOVER_BOUND, (left, broken_at)
            _blackhole(lab, False)
            _wait_both_direct(a, b, events_before, REUPGRADE_WAIT)
        else:
            lab.flush_nat("a")
            time.sleep(2.0)
            _wait_both_direct(a, b, 0, REUPGRADE_WAIT)
        time.sleep(0.5)
        done_a, done_b = connlab.stop_stream(a, b)
    finally:
        connlab.stop_peers(a, b)
    lost = (done_a["sent"] - done_b["received"], done_b["sent"] - done_a["received"])
    if breaker == "blackhole":
        assert lost == (0, 0), (done_a, done_b)  # zero loss through a real failover
    else:
        assert 0 <= lost[0] <= FLUSH_WINDOW_LOSS and 0 <= lost[1] <= FLUSH_WINDOW_LOSS, lost
    # Traffic never stalled for longer than the failover bound.
    assert done_a["max_gap"] <= FAILOVER_BOUND and done_b["max_gap"] <= FAILOVER_BOUND, (
        done_a["max_gap"],
        done_b["max_gap"],
    )
    assert done_a["path"] == done_b["path"] == "direct"
    if breaker == "blackhole":
        assert done_a["stats"]["paths"]["failovers"] + done_b["stats"]["paths"]["failovers"] >= 1
