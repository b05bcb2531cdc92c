"""Smoke test for the benchmark code paths (no derper, tiny counts, no performance assertions).

Starts our relay as a subprocess (plain HTTP on a free loopback port), runs the load generator's
windowed throughput, handshake-rate and idle-memory modes against it for a fraction of a second,
and feeds fake results through the side-by-side report (summary, ratios, markdown; plots only if
matplotlib is installed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import compare
from benchmarks.loadgen import run_handshakes, run_idle, run_throughput
from benchmarks.run import Relay, relay_base_cmd


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r = Relay(relay_base_cmd(None), False, tmp_path)
    try:
        r.start(timeout=20)
        yield r
    finally:
        r.stop()


def test_loadgen_modes_against_relay(relay: Relay) -> None:
    ep = relay.endpoint()
    t = run_throughput(ep, pairs=1, size=100, warmup=0.05, duration=0.2, server_pid=relay.pid, window=8)
    assert t["bad_frames"] == 0 and not t["connection_errors"]
    assert t["frames"] > 0 and t["window_frames"] == 8

    h = run_handshakes(ep, duration=0.3, parallel=2, server_pid=relay.pid, warmup=0.05)
    assert h["handshake_errors"] == 0, h["connection_errors"]
    assert h["handshakes"] > 0 and h["server_cpu_s"] is not None

    i = run_idle(ep, clients=20, server_pid=relay.pid, parallel=2, hold=0.0, settle=0.5)
    assert i["clients"] == 20 and i["clients_alive_at_end"] == 20
    assert i["rss_before_kib"] and i["rss_after_kib"] and i["bytes_per_conn"] is not None
    assert not i["connection_errors"] and not i["stopped_at_rss_cap"]
    assert relay.alive()


def _fake(kind: str, v: float) -> dict[str, object]:
    if kind == "throughput":
        return {
            "mode": kind,
            "frames_per_s": v,
            "mbit_per_s": v / 1e3,
            "server_cpu_pct": 90.0,
            "lost_pct": 0.0,
        }
    if kind == "rtt":
        return {"mode": kind, "rtt_us": {"p50": v, "p99": 2 * v}}
    if kind == "handshakes":
        return {"mode": kind, "handshakes_per_s": v, "server_us_per_handshake": 1e6 / v}
    return {"mode": kind, "clients": 10, "bytes_per_conn": v, "rss_before_kib": 1000, "rss_after_kib": 2000}


def test_compare_report_from_saved_json(tmp_path: Path) -> None:
    a = compare.parse_args(
        ["--quick", "--sizes", "100", "--pairs", "1", "--modes", "plain", "--idle-clients", "10"]
    )
    scenarios = compare.build_scenarios(a)
    assert {sc.kind for sc in scenarios} == {"throughput", "rtt", "handshakes", "idle"}
    for sc in scenarios:
        sc.runs = {"ours": [_fake(sc.kind, 200.0)], "derper": [_fake(sc.kind, 100.0)]}
    summaries = {sc.id: compare.summarize(sc) for sc in scenarios}
    tput = next(sc for sc in scenarios if sc.kind == "throughput" and sc.window)
    assert summaries[tput.id]["ratio"]["frames_per_s"]["of_medians"] == 2.0
    targets = compare.check_targets(scenarios, summaries)
    assert {t["status"] for t in targets} <= {"PASS", "MISS"}

    doc = {
        "command": "python -m benchmarks.compare --quick",
        "started_at": "now",
        "wall_s": 1.0,
        "params": {
            "reps": 1,
            "warmup_s": 0.5,
            "duration_s": 1.0,
            "rtt_count": 10,
            "hs_duration_s": 1.0,
            "hs_parallel": 2,
            "nofile": 1024,
            "window_frames": 32,
        },
        "relay_cmds": {"ours": ["python", "-m", "relay"], "derper": ["derper"]},
        "derper_version": "v0",
        "versions": {"python": "3", "trio": "0", "openssl": "x"},
        "machine": {"cpu_model": "cpu", "cpus": 2, "kernel": "k"},
        "git": {"commit": None, "dirty": None},
        "targets": targets,
        "failures": [],
        "busy_box": [],
        "scenarios": [
            {
                "id": sc.id,
                "kind": sc.kind,
                "tls": sc.tls,
                "payload": sc.size,
                "pairs": sc.pairs,
                "clients": sc.clients,
                "window": sc.window,
                "runs": sc.runs,
            }
            for sc in scenarios
        ],
    }
    saved = tmp_path / "compare-x.json"
    saved.write_text(json.dumps(doc))
    assert compare.main(["--replot", str(saved), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "compare-latest.md").read_text()
    assert "ours/derper" in md and "2.00×" in md
