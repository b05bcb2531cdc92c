"""natlib.netmon: the sans-io change detector, the polling mode, real netlink events in the lab."""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

import pytest
import trio
import trio.testing

from natlib import netif
from natlib.candidates import AddressFilter
from natlib.netmon import ChangeDetector, NetworkMonitor, NetworkState, is_relevant, read_state
from natlib.testing import Lab, LabProcess


def addr(
    address: str, interface: str = "eth0", index: int = 2, prefixlen: int = 24
) -> netif.InterfaceAddress:
    return netif.InterfaceAddress(interface, index, address, prefixlen, 0, netif.IFF_UP)


STATE_A = NetworkState(frozenset({addr("192.168.1.2")}), frozenset({(4, "192.168.1.1", "eth0")}))
STATE_B = NetworkState(frozenset({addr("192.168.1.254")}), frozenset({(4, "192.168.1.1", "eth0")}))


def nlmsg(msg_type: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), msg_type, 0, 0, 0) + payload


def route_payload(table: int) -> bytes:
    return struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, table, 3, 0, 1, 0)


NEWADDR = nlmsg(netif.RTM_NEWADDR, struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 2))
MAIN_ROUTE = nlmsg(netif.RTM_NEWROUTE, route_payload(netif.RT_TABLE_MAIN))
LOCAL_TABLE_ROUTE = nlmsg(netif.RTM_NEWROUTE, route_payload(255))


def test_relevance() -> None:
    def one(data: bytes) -> bool:
        return is_relevant(netif.parse_messages(data)[0])

    assert one(NEWADDR)
    assert one(nlmsg(netif.RTM_DELLINK, bytes(16)))
    assert one(MAIN_ROUTE)
    assert not one(LOCAL_TABLE_ROUTE)  # the kernel's local table churns with every address
    assert one(nlmsg(netif.RTM_DELROUTE, b"\x02"))  # undecodable route: re-read to be safe
    assert not one(nlmsg(netif.NLMSG_DONE, bytes(4)))


def test_debounce_coalesces_a_burst() -> None:
    d = ChangeDetector(STATE_A, now=0.0, debounce=0.25, max_delay=1.0, poll_interval=60.0)
    assert d.next_deadline() == 60.0 and d.read_due(0.0) is None
    assert d.feed(NEWADDR + MAIN_ROUTE, 10.0) == 2
    d.feed(NEWADDR, 10.1)
    assert d.next_deadline() == pytest.approx(10.35)
    assert d.read_due(10.34) is None and d.read_due(10.35) == "netlink"
    change = d.update(STATE_B, 10.35, "netlink")
    assert change is not None and change.reason == "netlink" and change.at == 10.35
    assert [a.address for a in change.added] == ["192.168.1.254"]
    assert [a.address for a in change.removed] == ["192.168.1.2"]
    assert change.addresses == [addr("192.168.1.254")] and not change.default_route_changed
    assert d.state == STATE_B and not d.dirty and d.notifications == 3
    assert d.next_deadline() == pytest.approx(70.35)  # the periodic check restarts


def test_steady_stream_is_bounded_by_max_delay() -> None:
    d = ChangeDetector(STATE_A, now=0.0, debounce=0.25, max_delay=1.0)
    t = 5.0
    while t < 7.0:
        d.feed(NEWADDR, t)
        if d.read_due(t):
            break
        t = round(t + 0.2, 6)
    assert t == pytest.approx(6.0)  # never quiet for 250 ms: read 1 s after the first message


def test_no_event_when_nothing_changed_and_irrelevant_messages_ignored() -> None:
    d = ChangeDetector(STATE_A, now=0.0)
    assert d.feed(LOCAL_TABLE_ROUTE, 1.0) == 0 and not d.dirty
    d.feed(NEWADDR, 2.0)
    assert d.update(STATE_A, 2.25, "netlink") is None
    # Same addresses with other flag bits: equal states, no event.
    flags_moved = NetworkState(
        frozenset({netif.InterfaceAddress("eth0", 2, "192.168.1.2", 24, 0, 0x41, 0x80)}),
        STATE_A.default_routes,
    )
    assert d.update(flags_moved, 3.0, "poll") is None


def test_default_route_change_alone_is_an_event() -> None:
    d = ChangeDetector(STATE_A, now=0.0)
    moved = NetworkState(STATE_A.addresses, frozenset({(4, "192.168.1.254", "eth0")}))
    change = d.update(moved, 1.0, "poll")
    assert change is not None and change.default_route_changed and change.added == change.removed == []


def test_malformed_datagrams_mark_dirty_without_raising() -> None:
    d = ChangeDetector(STATE_A, now=0.0, poll_interval=30.0)
    assert d.feed(b"\x01\x02\x03", 1.0) == 0
    assert d.malformed == 1 and d.dirty and d.read_due(1.25) == "netlink"
    assert d.feed(NEWADDR[:-3], 2.0) == 0 and d.malformed == 2
    with pytest.raises(ValueError, match="debounce"):
        ChangeDetector(STATE_A, now=0.0, debounce=2.0, max_delay=1.0)


def test_periodic_check_without_notifications() -> None:
    d = ChangeDetector(STATE_A, now=0.0, poll_interval=10.0)
    assert d.read_due(9.999) is None and d.read_due(10.0) == "poll"
    change = d.update(STATE_B, 10.0, "poll")
    assert change is not None and change.reason == "poll"


async def test_poll_mode_monitor(autojump_clock: trio.testing.MockClock) -> None:
    current = [STATE_A]
    reads = 0

    def read() -> NetworkState:
        nonlocal reads
        reads += 1
        return current[0]

    async with NetworkMonitor(use_netlink=False, poll_interval=10.0, read=read) as mon:
        assert mon.mode == "poll" and mon.state == STATE_A
        start = trio.current_time()

        async def renumber_later() -> None:
            await trio.sleep(25.0)
            current[0] = STATE_B

        async with trio.open_nursery() as nursery:
            nursery.start_soon(renumber_later)
            change = await mon.__anext__()
        assert change.state == STATE_B and change.reason == "poll"
        assert trio.current_time() - start == pytest.approx(30.0)  # the first check after the change
        assert reads == 4  # initial, 10 s, 20 s, 30 s
        with trio.move_on_after(15.0):
            await mon.__anext__()
            pytest.fail("no change, no event")
    with pytest.raises(StopAsyncIteration):
        await mon.__anext__()


async def test_netlink_monitor_opens_and_closes_under_cancellation() -> None:
    async with NetworkMonitor() as mon:
        assert mon.mode == "netlink"
        assert mon.state.addresses == frozenset(netif.interface_addresses())
        with trio.move_on_after(0.05) as scope:
            await mon.__anext__()  # nothing changes here; cancellation leaves the monitor usable
        assert scope.cancelled_caught
        with trio.move_on_after(0.05):
            await mon.__anext__()
    with pytest.raises(StopAsyncIteration):
        await mon.__anext__()


def test_read_state_leaves_excluded_addresses_out() -> None:
    everything = netif.interface_addresses()
    assert everything, "this test needs one usable interface address"
    name = everything[0].interface
    state = read_state(exclude=AddressFilter.of([name], ["::/0"]))
    assert state.addresses == frozenset(a for a in everything if a.interface != name and a.family == 4)
    assert all(route[2] != name for route in state.default_routes)
    assert read_state().addresses == frozenset(everything)


async def test_aclose_ends_a_waiting_iteration() -> None:
    async with NetworkMonitor() as mon:
        result: list[str] = []

        async def iterate() -> None:
            async for _change in mon:
                result.append("event")
            result.append("ended")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(iterate)
            await trio.testing.wait_all_tasks_blocked()
            await mon.aclose()
        assert result == ["ended"]


_MONITOR_PROGRAM = """
import json, sys, time
import anyio
from natlib.netmon import NetworkMonitor

async def main():
    async with NetworkMonitor() as mon:
        state = [a.address for a in mon.state.sorted_addresses()]
        print(json.dumps({"ready": state, "mode": mon.mode}), flush=True)
        async for ch in mon:
            print(json.dumps({
                "event": [a.address for a in ch.addresses],
                "added": [a.address for a in ch.added],
                "removed": [a.address for a in ch.removed],
                "routes": sorted(map(list, ch.state.default_routes)),
                "reason": ch.reason,
                "monotonic": time.monotonic(),
            }), flush=True)

anyio.run(main, backend=sys.argv[1])
"""


def _events(proc_lines: list[dict[str, object]]) -> list[dict[str, object]]:
    return [line for line in proc_lines if "event" in line]


def _wait_events(proc: LabProcess, n: int, timeout: float = 5.0) -> list[dict[str, object]]:
    """Poll the monitor's log (with a deadline) until it has printed ``n`` events."""
    deadline = time.monotonic() + timeout
    while True:
        events = _events(proc.json_lines())
        if len(events) >= n:
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(events)} events, wanted {n}; log:\n{proc.output()}")
        proc.wait_for_output(r'^\{"event"', timeout=max(0.0, deadline - time.monotonic()))
        time.sleep(0.01)


@pytest.mark.netlab("a=easy")
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_lab_address_change_and_link_events(netlab: Lab, backend: str) -> None:
    lab = netlab
    old = lab.host("a1").ipv4[0]
    proc = lab.spawn("a1", [sys.executable, "-c", _MONITOR_PROGRAM, backend], name=f"netmon-{backend}")
    ready = proc.wait_for_output(r'^\{"ready".*$')
    assert json.loads(ready.group(0)) == {"ready": [old], "mode": "netlink"}

    before = time.monotonic()
    new = lab.set_address("a1")
    (event,) = _wait_events(proc, 1)
    latency = float(event["monotonic"]) - before  # type: ignore[arg-type]
    assert event["event"] == [new] and event["added"] == [new] and event["removed"] == [old]
    assert event["reason"] == "netlink"
    assert [4, lab.gateway("a1"), "eth0"] in event["routes"]  # type: ignore[operator]
    assert 0.0 < latency < 2.0, latency  # debounce 0.25 s, cap 1 s

    lab.link_down("a1")
    events = _wait_events(proc, 2)
    assert events[1]["event"] == [] and events[1]["removed"] == [new] and events[1]["routes"] == []
    lab.link_up("a1")
    events = _wait_events(proc, 3)
    assert events[2]["event"] == [new] and events[2]["added"] == [new]
    assert [4, lab.gateway("a1"), "eth0"] in events[2]["routes"]  # type: ignore[operator]
    # The next event is the next change: nothing spurious came in between.
    newer = lab.set_address("a1")
    events = _wait_events(proc, 4)
    assert len(events) == 4 and events[3]["added"] == [newer] and events[3]["removed"] == [new]
    proc.stop()
