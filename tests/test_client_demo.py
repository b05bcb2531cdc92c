"""client._demo's pieces that run without a lab (the lab itself: tests/netlab/test_meshnode_e2e.py)."""

from __future__ import annotations

from client._demo import echoes_received

# ``ping -c 1 -i 0.2 -w 12`` right after a relay restart: the first replies arrive together, so ping
# counts three before it stops. That is a success for count=1 (matching "1 received" was a flaky test).
SLOW_FIRST_ROUND_TRIP = """\
PING 100.64.0.3 (100.64.0.3) 56(84) bytes of data.
64 bytes from 100.64.0.3: icmp_seq=1 ttl=64 time=560 ms
64 bytes from 100.64.0.3: icmp_seq=2 ttl=64 time=359 ms
64 bytes from 100.64.0.3: icmp_seq=3 ttl=64 time=155 ms

--- 100.64.0.3 ping statistics ---
3 packets transmitted, 3 received, 0% packet loss, time 405ms
rtt min/avg/max/mdev = 155.026/357.935/559.758/165.232 ms, pipe 3
"""

NO_ROUTE = """\
PING 100.64.0.9 (100.64.0.9) 56(84) bytes of data.
From 100.64.0.1 icmp_seq=1 Destination Host Unreachable

--- 100.64.0.9 ping statistics ---
4 packets transmitted, 0 received, +4 errors, 100% packet loss, time 3059ms
"""


def test_echoes_received_counts_late_replies() -> None:
    assert echoes_received(SLOW_FIRST_ROUND_TRIP) == 3


def test_echoes_received_with_errors_is_zero() -> None:
    assert echoes_received(NO_ROUTE) == 0


def test_echoes_received_without_a_summary_is_zero() -> None:
    # ping killed, or an error before any packet: no summary line, nothing counted.
    assert echoes_received("ping: connect: Network is unreachable\n") == 0
    assert echoes_received("") == 0


def test_echoes_received_ignores_the_transmitted_count() -> None:
    assert echoes_received("5 packets transmitted, 2 received, 60% packet loss, time 800ms\n") == 2
