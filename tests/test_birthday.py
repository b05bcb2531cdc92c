"""natlib.birthday: the success-probability math against nat-traversal.md §5, the two probing
plans' schedules and bounds, and many seeded runs through a simulated hard NAT and easy NAT."""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
from collections.abc import Callable

import pytest

from natlib.birthday import (
    EASY_MAX_PROBES,
    EASY_PROBE_RATE,
    HARD_SOCKETS,
    PORT_SPACE,
    BirthdayConfig,
    EasySidePlan,
    HardSidePlan,
    PlanState,
    ProbeGaveUp,
    ProbeSucceeded,
    SendProbe,
    hard_hard_success_probability,
    probes_needed,
    retry_interval,
    success_probability,
)
from natlib.disco import AddrPort

EASY = AddrPort.parse("198.51.100.2:41641")
HARD_IP = ipaddress.IPv4Address("203.0.113.1")


def tx_ids() -> Callable[[], bytes]:
    counter = itertools.count(1)
    return lambda: next(counter).to_bytes(12, "big")


# -- the numbers of §5 ----------------------------------------------------------------------------------


def test_defaults_are_the_articles_sockets_with_more_probes() -> None:
    # The article's 256 sockets; 2500 probes in its 10 s (250/s instead of 100/s, see natlib.birthday).
    assert (HARD_SOCKETS, EASY_MAX_PROBES, EASY_PROBE_RATE, PORT_SPACE) == (256, 2500, 250.0, 64512)


def test_success_probability_matches_section_5() -> None:
    assert round(success_probability(256, 256), 2) == 0.64  # the calculator's 256 × 256 → 64%
    assert 0.98 <= success_probability(256, 1024) < 0.99  # "about 98%"
    assert success_probability(256, 2048) >= 0.999  # "about 99.9%"
    assert BirthdayConfig().expected_success() == success_probability(256, 2500) > 0.9999
    # Brute force: all ports always work; no probes never do.
    assert success_probability(256, PORT_SPACE - 256) == 1.0
    assert success_probability(256, 0) == 0.0


def test_hard_hard_is_relay_territory() -> None:
    assert hard_hard_success_probability(256) < 1e-4  # "256 × 256 probes give about 0%"
    assert round(hard_hard_success_probability(65536), 2) == 0.64  # "about 65,536 per side for 64%"
    assert hard_hard_success_probability(170_000) >= 0.999  # the "about 170k probes" summary


def test_probes_needed_inverts_the_probability() -> None:
    n = probes_needed(0.98)
    assert success_probability(256, n) >= 0.98 > success_probability(256, n - 1)
    assert n <= EASY_MAX_PROBES
    with pytest.raises(ValueError, match="between 0 and 1"):
        probes_needed(1.0)
    with pytest.raises(ValueError, match="port_space"):
        success_probability(256, PORT_SPACE + 1)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="positive"):
        BirthdayConfig(hard_sockets=0)
    with pytest.raises(ValueError, match="more probes than ports"):
        BirthdayConfig(min_port=65000, easy_max_probes=1024)


# -- the plans' schedules ----------------------------------------------------------------------------------


def drive(plan: HardSidePlan | EasySidePlan, until: float) -> list[tuple[float, object]]:
    """Run a plan's timer alone up to ``until``; returns (time, action) pairs."""
    out: list[tuple[float, object]] = []
    while (deadline := plan.next_deadline()) is not None and deadline <= until:
        plan.handle_timer(deadline)
        out += [(deadline, a) for a in plan.take_actions()]
    return out


def test_easy_side_probes_distinct_random_ports_at_250_per_second_and_gives_up() -> None:
    plan = EasySidePlan(0.0, HARD_IP, rng=random.Random(1), tx_id_factory=tx_ids())
    timeline = drive(plan, 100.0)
    probes = [(t, a) for t, a in timeline if isinstance(a, SendProbe)]
    assert len(probes) == EASY_MAX_PROBES
    ports = [a.addr.port for _, a in probes]
    assert len(set(ports)) == len(ports) and min(ports) >= 1024
    assert all(a.addr.ip == HARD_IP and a.socket == 0 for _, a in probes)
    for window_start in range(11):  # at most 250 in any second
        assert sum(window_start <= t < window_start + 1 for t, _ in probes) <= 250
    assert probes[-1][0] == pytest.approx(9.996)
    (end_time, end), *_ = [(t, a) for t, a in timeline if not isinstance(a, SendProbe)]
    assert isinstance(end, ProbeGaveUp) and end_time == pytest.approx(11.0)
    assert plan.state is PlanState.GAVE_UP and plan.next_deadline() is None


def test_hard_side_opens_every_socket_quickly_and_refreshes() -> None:
    plan = HardSidePlan(0.0, EASY, tx_id_factory=tx_ids())
    assert plan.sockets == 256
    timeline = drive(plan, 100.0)
    probes = [(t, a) for t, a in timeline if isinstance(a, SendProbe)]
    first_round = [(t, a) for t, a in probes if t < 1.0]
    assert [a.socket for _, a in first_round] == list(range(256))
    assert max(t for t, _ in first_round) < 0.1
    assert all(a.addr == EASY for _, a in probes)
    # Rounds start at 0, 3, 6 and 9 s; then the 11 s limit.
    assert len(probes) == 4 * 256
    assert isinstance(timeline[-1][1], ProbeGaveUp)


def test_success_stops_everything_and_wrong_answers_do_not_count() -> None:
    easy = EasySidePlan(0.0, HARD_IP, rng=random.Random(2), tx_id_factory=tx_ids())
    timeline = drive(easy, 0.05)
    probe = timeline[0][1]
    assert isinstance(probe, SendProbe)
    easy.on_ping(0.06, AddrPort(HARD_IP, 1))  # port 1 was never probed: not through our filter
    easy.on_pong(0.06, b"x" * 12, probe.addr)  # not our TxID
    easy.on_pong(0.06, probe.tx_id, AddrPort.parse("192.0.2.9:1"))  # not the hard side's IP
    assert easy.state is PlanState.PROBING
    easy.on_pong(0.07, probe.tx_id, probe.addr)
    assert easy.take_actions() == [ProbeSucceeded(0, probe.addr, 0.07, 13)]  # 0.00 … 0.048 s
    assert easy.next_deadline() is None and drive(easy, 100.0) == []

    hard = HardSidePlan(0.0, EASY, tx_id_factory=tx_ids())
    sent = [a for _, a in drive(hard, 0.01) if isinstance(a, SendProbe)]
    hard.on_pong(0.02, sent[3].tx_id, 4, EASY)  # a TxID sent from socket 3 arriving on socket 4
    assert hard.state is PlanState.PROBING
    hard.on_ping(0.03, 7, EASY)
    assert hard.take_actions() == [ProbeSucceeded(7, EASY, 0.03, len(sent))]
    assert hard.finished and hard.next_deadline() is None


# -- a hard NAT and an easy NAT, simulated ------------------------------------------------------------------


def run_trial(seed: int, one_way: float = 0.02) -> tuple[float | None, int, int]:
    """One attempt through an EDM NAT (random port per socket and destination, address-and-port
    dependent filtering) and an EIM NAT with address-and-port dependent filtering.

    Returns (time both sides succeeded or None, easy probes, hard pings)."""
    rng = random.Random(seed)
    queue: list[tuple[float, int, Callable[[], None]]] = []
    seq = itertools.count()
    now = 0.0

    def at(t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(queue, (t, next(seq), fn))

    hard = HardSidePlan(0.0, EASY, tx_id_factory=tx_ids())
    easy = EasySidePlan(0.0, HARD_IP, rng=random.Random(seed + 10_000), tx_id_factory=tx_ids())
    free_ports = rng.sample(range(1024, 65536), 2000)
    hard_mappings: dict[tuple[int, AddrPort], int] = {}  # (socket, destination) → public port
    hard_inbound: dict[int, tuple[int, AddrPort]] = {}  # public port → (socket, admitted source)
    easy_sent_to: set[AddrPort] = set()
    done: dict[str, float] = {}
    timers: dict[str, float] = {}

    def hard_out(socket: int, dst: AddrPort, deliver: Callable[[AddrPort], None]) -> None:
        port = hard_mappings.get((socket, dst))
        if port is None:
            port = hard_mappings[socket, dst] = free_ports.pop()
            hard_inbound[port] = (socket, dst)
        src = AddrPort(HARD_IP, port)
        at(now + one_way, lambda: deliver(src))

    def easy_receives_ping(src: AddrPort, tx_id: bytes) -> None:
        if src in easy_sent_to:  # our filter admits only destinations we sent to
            easy.on_ping(now, src)
            at(now + one_way, lambda: hard_receives(src.port, tx_id, pong=True))  # every ping is answered
            pump()

    def easy_receives_pong(src: AddrPort, tx_id: bytes) -> None:
        if src in easy_sent_to:
            easy.on_pong(now, tx_id, src)
            pump()

    def hard_receives(dst_port: int, tx_id: bytes, pong: bool = False) -> None:
        entry = hard_inbound.get(dst_port)
        if entry is None or entry[1] != EASY:  # no mapping, or one for another destination
            return
        socket = entry[0]
        if pong:
            hard.on_pong(now, tx_id, socket, EASY)
        else:
            hard.on_ping(now, socket, EASY)
            hard_out(socket, EASY, lambda src: easy_receives_pong(src, tx_id))  # the pong
        pump()

    def pump() -> None:
        for action in hard.take_actions():
            if isinstance(action, SendProbe):
                tx = action.tx_id
                hard_out(action.socket, action.addr, lambda src, t=tx: easy_receives_ping(src, t))  # type: ignore[misc]
            elif isinstance(action, ProbeSucceeded):
                done.setdefault("hard", now)
        for action in easy.take_actions():
            if isinstance(action, SendProbe):
                easy_sent_to.add(action.addr)
                port, tx_id = action.addr.port, action.tx_id
                at(now + one_way, lambda p=port, t=tx_id: hard_receives(p, t))  # type: ignore[misc]
            elif isinstance(action, ProbeSucceeded):
                done.setdefault("easy", now)
        for name, plan in (("hard", hard), ("easy", easy)):
            deadline = plan.next_deadline()
            if deadline is not None and timers.get(name) != deadline:  # one pending timer per plan
                timers[name] = deadline
                at(deadline, lambda n=name, p=plan: on_timer(n, p))  # type: ignore[misc]

    def on_timer(name: str, plan: HardSidePlan | EasySidePlan) -> None:
        if timers.get(name) == now:
            del timers[name]
            plan.handle_timer(now)
            pump()

    pump()
    while queue and not (hard.finished and easy.finished):
        now, _, fn = heapq.heappop(queue)
        fn()
    both = max(done.values()) if len(done) == 2 else None
    return both, easy.probes_sent, hard.probes_sent


def test_simulated_easy_hard_pairs_go_direct_within_10s_in_at_least_95_percent() -> None:
    trials = [run_trial(seed) for seed in range(100)]
    within_10s = sum(t is not None and t <= 10.0 for t, _, _ in trials)
    assert within_10s >= 95
    # Bounded: never more than 2500 probes from the easy side or 4 rounds of 256 from the hard side.
    assert max(e for _, e, _ in trials) <= 2500
    assert max(h for _, _, h in trials) <= 4 * 256
    # The median attempt needs far fewer probes than the bound.
    times = sorted(t for t, _, _ in trials if t is not None)
    assert times[len(times) // 2] < 3.0


def test_retries_back_off_while_attempts_find_nothing() -> None:
    assert retry_interval(0) == retry_interval(1) == 60.0  # after a success, or a first miss
    assert [retry_interval(n) for n in (2, 3, 4, 5)] == [120.0, 240.0, 480.0, 960.0]
    assert retry_interval(6) == retry_interval(60) == 1920.0  # at most every 32 minutes
    with pytest.raises(ValueError, match="negative"):
        retry_interval(-1)
