"""Roaming: a peer's address changes mid-stream; the stream survives and returns to direct.

Two natlib.conn peers behind easy NATs stream 100 sequence-numbered datagrams/s each way on a
direct path. Then ``lab.set_address("a1")`` renumbers peer a's LAN address (the old one is
deleted, so its NAT mapping and its relay TCP connection die with it). natlib.conn notices through
rtnetlink (natlib.netmon) or earlier, when a send on the direct path fails as unroutable;
it redials the relay (holding relay packets until then), re-gathers, sends every peer back to
the relay and re-discovers the path with a fresh CallMeMaybe. Seen here: no datagram lost, the
longest stall about 0.3–0.5 s; a small loss budget is allowed for a loaded CI machine.
"""

from __future__ import annotations

import time

import connlab
import pytest

from natlib.testing import Lab

NETLAB_TOPOLOGY = "a=easy,b=easy"
REDIRECT_WAIT = 15.0
MAX_STALL = 3.0
"""Longest wait for a new datagram across the renumbering (netmon debounce, relay redial, rediscovery)."""
MAX_LOST_FRACTION = 0.02


@pytest.fixture(scope="module")
def relay(netlab_module: Lab) -> object:
    proc = connlab.start_relay(netlab_module)
    yield proc
    proc.stop()


def test_address_change_mid_stream(netlab_module: Lab, relay: object) -> None:
    lab = netlab_module
    a, b = connlab.spawn_pair(lab, "a1", "b1", name="roaming")
    try:
        connlab.start_stream(a, b)
        deadline = time.monotonic() + 10
        while not (connlab.first_direct(a) and connlab.first_direct(b)):
            assert time.monotonic() < deadline, "never direct before the address change"
            time.sleep(0.05)
        time.sleep(0.5)
        n_before = len(b.lines("path"))
        new_ip = lab.set_address("a1")
        # b's view of a: back on the relay (or both), then direct again, on a's new NAT mapping.
        deadline = time.monotonic() + REDIRECT_WAIT
        while True:
            later = b.lines("path")[n_before:]
            if later and later[-1]["kind"] == "direct" and a.lines("path")[-1]["kind"] == "direct":
                break
            assert time.monotonic() < deadline, f"not direct again: {[e['kind'] for e in later]}"
            time.sleep(0.05)
        time.sleep(0.5)
        done_a, done_b = connlab.stop_stream(a, b)
    finally:
        connlab.stop_peers(a, b)
    assert new_ip != "192.168.1.2"
    assert done_a["stats"]["link_changes"] >= 1
    assert done_a["path"] == done_b["path"] == "direct"
    lost = (done_a["sent"] - done_b["received"], done_b["sent"] - done_a["received"])
    assert all(x >= 0 for x in lost)
    assert lost[0] <= MAX_LOST_FRACTION * done_a["sent"] and lost[1] <= MAX_LOST_FRACTION * done_b["sent"], (
        lost
    )
    assert done_a["max_gap"] <= MAX_STALL and done_b["max_gap"] <= MAX_STALL, (
        done_a["max_gap"],
        done_b["max_gap"],
    )
