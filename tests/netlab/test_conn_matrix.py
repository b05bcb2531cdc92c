"""The NAT matrix: two natlib.conn peers in every pair of NAT kinds reach the best path for the pair.

Each cell runs the peer program of ``connlab.py`` in two lab hosts: they start on our relay (on the
lab server, with STUN), are handed each other's endpoints (the control plane's job) and stream
sequence-numbered datagrams both ways at 100/s. A cell passes when both end on the expected path
("direct" or "relay"), nothing was lost, and the direct path came within 1 relay RTT + 1 direct
RTT + 200 ms after the endpoints were handed over.

Kinds: the lab's ``none``, ``easy``, ``easyAF``, ``hard``, ``easyPMP``, ``hardPMP``, ``one2one``,
``udp_blocked``, ``v6only``, plus ``sameLAN``: a host on an easy site with two hosts; ``sameLAN``
with itself means both peers on that one LAN, with another kind it behaves as ``easy``. A kind
paired with itself uses two sites of that kind.

Expected paths, and why (nat-traversal.md §4):

* any pair with ``udp_blocked``: relay (no UDP at all);
* ``hard`` ↔ ``hard``: relay (both mappings unpredictable; birthday odds are ~0 for two hard sides);
* ``v6only`` with anything but ``v6only``: relay. In the lab's address plan only ``v6only`` sites
  have IPv6 (other sites are IPv4-only unless built with ``ipv6``), so there is no common family;
  ``v6only`` ↔ ``v6only`` is direct over IPv6 (no NAT, stateful firewalls punch like ``easy``);
* everything else: direct. ``hard`` with an address-and-port-filtering easy NAT without port
  mapping (``easy``, ``sameLAN``) gets there by birthday probing (natlib.birthday, started after
  1 s on the relay), so those cells are bounded by 10 s instead.

The cells run in parallel (bounded) in one lab; the results table is written to
``docs/nat-matrix.md``. A last test covers a dual-stack pair (both IPv4 and IPv6): the IPv6
direct path must be found.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import connlab
import pytest

from natlib.testing import Lab

KINDS = (
    "none",
    "easy",
    "easyAF",
    "hard",
    "easyPMP",
    "hardPMP",
    "one2one",
    "sameLAN",
    "udp_blocked",
    "v6only",
)
_SITE_NAME = {
    "none": "pub",
    "easy": "easy",
    "easyAF": "eaf",
    "hard": "hard",
    "easyPMP": "epmp",
    "hardPMP": "hpmp",
    "one2one": "oto",
    "udp_blocked": "ublk",
    "v6only": "vsix",
}
NETLAB_TOPOLOGY = ",".join(
    [f"{_SITE_NAME[k]}{s}={k}" for s in ("a", "b") for k in _SITE_NAME] + ["lan=easy:hosts=2"]
)
CELLS = [(a, b) for a, b in itertools.combinations_with_replacement(KINDS, 2)]
# The whole matrix runs in the module fixture, inside the first test's setup: about 85 s on a
# loaded 2-core machine, so that test needs more than the suite's 120 s default.
pytestmark = pytest.mark.timeout(300)
PARALLEL = 4
"""Cells at a time (2 processes each): bounded for CI's 2 cores."""
DIRECT_WAIT = 10.0
RELAY_OBSERVE = 3.0
"""A cell expected to stay on the relay is watched this long for a (wrong) direct path."""
SLACK = 0.2
BIRTHDAY_BOUND = 10.0
DOC = Path(__file__).resolve().parents[2] / "docs" / "nat-matrix.md"


def _host(kind: str, other: str, first: bool) -> str:
    if kind == "sameLAN":
        return "lan1" if first or other != "sameLAN" else "lan2"
    site = _SITE_NAME[kind]
    return f"{site}a1" if first or kind != other else f"{site}b1"


def expected_path(a: str, b: str) -> str:
    pair = {a, b}
    if "udp_blocked" in pair:
        return "relay"
    if "v6only" in pair:
        return "direct" if pair == {"v6only"} else "relay"
    if pair == {"hard"}:
        return "relay"
    return "direct"


def needs_birthday(a: str, b: str) -> bool:
    return "hard" in (a, b) and ({a, b} - {"hard"}) <= {"easy", "sameLAN"} and a != b


@dataclass
class CellResult:
    a: str
    b: str
    hosts: tuple[str, str]
    path: tuple[str, str]
    time_to_direct: float | None
    relay_rtt: float
    direct_rtt: float | None
    lost: tuple[int, int]
    error: str | None = None

    @property
    def bound(self) -> float:
        if needs_birthday(self.a, self.b):
            return BIRTHDAY_BOUND
        return self.relay_rtt + (self.direct_rtt or 0.0) + SLACK


def _run_cell(lab: Lab, a_kind: str, b_kind: str) -> CellResult:
    host_a, host_b = _host(a_kind, b_kind, True), _host(b_kind, a_kind, False)
    want = expected_path(a_kind, b_kind)
    a, b = connlab.spawn_pair(lab, host_a, host_b, name=f"conn-{a_kind}-{b_kind}")
    try:
        info = connlab.start_stream(a, b)
        deadline = time.monotonic() + (DIRECT_WAIT if want == "direct" else RELAY_OBSERVE)
        while time.monotonic() < deadline:
            if connlab.first_direct(a) and connlab.first_direct(b):
                time.sleep(0.3)  # a little stream on the direct path
                break
            time.sleep(0.05)
        done_a, done_b = connlab.stop_stream(a, b)
    except AssertionError as e:
        return CellResult(a_kind, b_kind, (host_a, host_b), ("?", "?"), None, math.nan, None, (0, 0), str(e))
    finally:
        connlab.stop_peers(a, b)
    da, db = connlab.first_direct(a), connlab.first_direct(b)
    # t is None for a side that went direct before its own "go" (the other side's pings got there
    # first): it waited zero time after receiving the endpoints.
    ttd = max(da["t"] or 0.0, db["t"] or 0.0) if da and db else None
    direct_rtt = max(da["rtt"] or 0.0, db["rtt"] or 0.0) if da and db else None
    return CellResult(
        a_kind,
        b_kind,
        (host_a, host_b),
        (done_a["path"], done_b["path"]),
        ttd,
        info["relay_rtt"],
        direct_rtt,
        (done_a["sent"] - done_b["received"], done_b["sent"] - done_a["received"]),
    )


def _write_doc(results: dict[tuple[str, str], CellResult]) -> None:
    def cell(r: CellResult | None) -> str:
        if r is None:
            return ""
        if r.error:
            return "error"
        kind = r.path[0] if r.path[0] == r.path[1] else f"{r.path[0]}/{r.path[1]}"
        if kind == "direct" and r.time_to_direct is not None:
            return f"direct {r.time_to_direct * 1000:.0f} ms"
        return kind

    lines = [
        "# NAT matrix (natlib.conn in the lab)",
        "",
        "Written by `tests/netlab/test_conn_matrix.py` (run as root: "
        "`python3 -m pytest -q tests/netlab/test_conn_matrix.py`). Each cell: the path both peers end on "
        "and the time from handing each peer the other's endpoints to the direct path on both sides "
        "(relay RTT and direct RTT in the lab are about 1–3 ms). Expected: direct everywhere except "
        "pairs with `udp_blocked`, `hard`↔`hard`, and `v6only` with an IPv4-only peer (relay); "
        "`hard` with `easy`/`sameLAN` goes direct by birthday probing (bound 10 s), everything else "
        "within 1 relay RTT + 1 direct RTT + 200 ms.",
        "",
        "Definitions: `sameLAN` is a host on an `easy` site with two hosts; `sameLAN`↔`sameLAN` puts "
        "both peers on that one LAN, with another kind it behaves as `easy`. A kind paired with itself "
        "uses two sites of that kind. Only `v6only` sites have IPv6 in the lab's address plan (other "
        "sites are IPv4-only), so `v6only` reaches only `v6only` directly. Birthday probing: each "
        "side knows from its own two-server STUN round whether its mapping varies by destination "
        "(hard); a peer still on the relay 1 s after it started sending probes as its side "
        "(hard: 256 sockets toward the peer's public endpoint; easy: 2500 random ports of the peer's "
        "public IP at 250/s), at most once a minute.",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| | " + " | ".join(KINDS) + " |",
        "|---|" + "---|" * len(KINDS),
    ]
    for row in KINDS:
        cells = [cell(results.get((row, col)) or results.get((col, row))) for col in KINDS]
        lines.append(f"| **{row}** | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| cell | hosts | expected | path | time to direct | bound | lost |",
        "|---|---|---|---|---|---|---|",
    ]
    for (a, b), r in sorted(results.items(), key=lambda kv: (KINDS.index(kv[0][0]), KINDS.index(kv[0][1]))):
        ttd = f"{r.time_to_direct * 1000:.1f} ms" if r.time_to_direct is not None else "-"
        lines.append(
            f"| {a}↔{b} | {r.hosts[0]}, {r.hosts[1]} | {expected_path(a, b)} | {'/'.join(r.path)} | {ttd} "
            f"| {r.bound * 1000:.0f} ms | {r.lost[0]}, {r.lost[1]} |"
        )
    DOC.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def matrix(netlab_module: Lab) -> Iterator[dict[tuple[str, str], CellResult]]:
    relay = connlab.start_relay(netlab_module)
    try:
        with ThreadPoolExecutor(PARALLEL) as pool:
            futures = {cell: pool.submit(_run_cell, netlab_module, *cell) for cell in CELLS}
            results = {cell: f.result() for cell, f in futures.items()}
        _write_doc(results)
        yield results
    finally:
        relay.stop()


@pytest.mark.parametrize(
    ("a", "b"),
    [pytest.param(a, b, id=f"{a}-{b}") for a, b in CELLS],
)
def test_cell_reaches_best_path(matrix: dict[tuple[str, str], CellResult], a: str, b: str) -> None:
    r = matrix[(a, b)]
    assert r.error is None, r.error
    want = expected_path(a, b)
    assert r.path == (want, want), f"{a}↔{b}: {r.path}, expected {want}"
    assert r.lost == (0, 0), f"{a}↔{b}: datagrams lost {r.lost}"
    if want == "direct":
        assert r.time_to_direct is not None
        assert r.time_to_direct <= r.bound, (
            f"{a}↔{b}: direct after {r.time_to_direct:.3f} s > {r.bound:.3f} s"
        )


def test_matrix_table_written(matrix: dict[tuple[str, str], CellResult]) -> None:
    text = DOC.read_text()
    assert len(matrix) == 55
    for kind in KINDS:
        assert f"| **{kind}** |" in text


def test_dual_stack_pair_finds_the_ipv6_path(netlab_factory: Callable[[str], Lab]) -> None:
    """Both peers have IPv4 behind easy NATs and routed IPv6 behind stateful firewalls: each side's
    IPv6 candidate of the other answers pings (the IPv6 direct path works both ways) and the pair is
    direct. Which family carries the data is natlib.path's betterAddr choice (+10 points for IPv6
    against RTT points), so with RTTs this close either may win."""
    lab = netlab_factory("a=easy:ipv6,b=easy:ipv6")
    relay = connlab.start_relay(lab)
    a, b = connlab.spawn_pair(lab, "a1", "b1", name="dual-stack")
    try:
        connlab.start_stream(a, b)
        deadline = time.monotonic() + DIRECT_WAIT
        while not (connlab.first_direct(a) and connlab.first_direct(b)):
            assert time.monotonic() < deadline, "never direct"
            time.sleep(0.05)
        time.sleep(0.3)
        v6_answered = {}
        for peer in (a, b):
            peer.send(cmd="candidates")
            got = peer.wait_line("candidates", 5)["candidates"]
            v6_answered[peer.host] = [c for c in got if ":" in c[0] and c[2] is not None]
        done_a, done_b = connlab.stop_stream(a, b)
    finally:
        connlab.stop_peers(a, b)
        relay.stop()
    assert all(v6_answered.values()), v6_answered
    assert done_a["path"] == done_b["path"] == "direct"
    assert done_b["received"] == done_a["sent"] and done_a["received"] == done_b["sent"]
