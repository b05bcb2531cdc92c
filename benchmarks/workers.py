"""``-workers 1`` against ``-workers 2``: how much a second relay process buys, as a ratio.

    python -m benchmarks.workers            # 3 alternating repetitions, 20 pairs, 100 B and 1200 B
    python -m benchmarks.workers --quick    # 1 repetition, short windows

Starts two plain relays side by side (``python -m relay -a 127.0.0.1:<port> -c <tmp>/key
-stun=false -metrics-addr=off -workers N`` for N = 1 and 2, the same key file), waits until each
completes a DERP handshake, then runs the throughput load generator (:mod:`benchmarks.loadgen`,
20 pairs streaming both ways) against them in alternation: for every repetition and payload size,
one run against each relay, the order flipped every repetition. Reports the median frames/s of
each and the ratio workers-2 / workers-1 per payload size, plus the relays' CPU (the supervisor and
all its workers, from /proc) and the load generator's. Writes
``benchmarks/results/workers-<timestamp>.json`` and ``benchmarks/results/workers-latest.json``.
Exit status 1 if a run failed (bad frames, broken connections, a relay crash).

Read the ratio with the machine in mind: the load generator is a Python process too, and on a
2-core box it shares the cores with the relay's workers, so the relay never gets two whole cores.
With random placement about half of the pairs have their two clients on different workers, and
each of their packets takes the extra loopback hop between workers. The relay's CPU per frame
(all its processes, from /proc) is therefore reported too: its ratio says what the hop costs, and
twice it is the ratio two workers would reach with two cores of their own
(``projected_ratio_with_2_free_cores``, a projection, labelled as such).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/workers.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.loadgen import proc_cpu_seconds
from benchmarks.run import RESULTS, Relay, invoke_loadgen, relay_base_cmd, run_failed, write_results

WORKER_COUNTS = (1, 2)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux: /proc/PID/task/*/children)."""
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the supervisor and its workers)."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        total += proc_cpu_seconds(p) or 0.0
    return total


def run_one(relay: Relay, size: int, pairs: int, warmup: float, duration: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.loadgen",
        "throughput",
        "--json",
        "--host",
        "127.0.0.1",
        "--port",
        str(relay.port),
        "--size",
        str(size),
        "--pairs",
        str(pairs),
        "--warmup",
        str(warmup),
        "--duration",
        str(duration),
    ]
    cpu0, t0 = tree_cpu_seconds(relay.pid), time.monotonic()
    res = invoke_loadgen(cmd, warmup + duration + 60)
    cpu1, t1 = tree_cpu_seconds(relay.pid), time.monotonic()
    # Over the whole load generator run (connect, warm-up, window, drain): the relay's share of
    # the machine, all its processes together.
    res["relay_tree_cpu_pct"] = round(100.0 * (cpu1 - cpu0) / (t1 - t0), 1)
    # Relay CPU per frame handled (delivered or dropped), all processes: how much work one frame
    # costs, whatever else the machine was doing.
    handled = res.get("sent_frames_total") or 0
    res["relay_us_per_frame"] = round((cpu1 - cpu0) * 1e6 / handled, 3) if handled else None
    if not relay.alive():
        res["relay_crashed"] = True
    return res


def one_line(rep: int, size: int, workers: int, res: dict[str, Any]) -> str:
    return (
        f"rep {rep + 1} {size:>5} B -workers {workers}: {res['frames_per_s']:>12,.0f} frames/s "
        f"{res['mbit_per_s']:>9,.0f} Mbit/s  relay CPU {res['relay_tree_cpu_pct']:>5.1f}% "
        f"({res['relay_us_per_frame']} µs/frame)  loadgen CPU {res.get('loadgen_cpu_pct')}%  "
        f"lost {res.get('lost_pct')}%"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, 0.5 s warm-up, 1.5 s windows")
    p.add_argument("--reps", type=int, help="alternating repetitions (default 3; quick 1)")
    p.add_argument("--warmup", type=float, help="warm-up seconds (default 1.0)")
    p.add_argument("--duration", type=float, help="measure window seconds (default 3.0)")
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1200])
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    a = p.parse_args(argv)
    a.reps = a.reps or (1 if a.quick else 3)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if a.quick else 1.0)
    a.duration = a.duration if a.duration is not None else (1.5 if a.quick else 3.0)
    if not 1 <= a.reps <= 10 or not 0 < a.duration <= 30 or not 0 <= a.warmup <= 10:
        p.error("reps 1..10, duration (0, 30], warm-up [0, 10]")
    if not 1 <= a.pairs <= 200 or any(not 0 <= n <= 65536 for n in a.sizes):
        p.error("pairs 1..200, sizes 0..65536")
    return a


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if not run_failed(r) and r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    base = relay_base_cmd(None)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {(s, w): [] for s in a.sizes for w in WORKER_COUNTS}
    load_before = os.getloadavg()
    failed = False
    with tempfile.TemporaryDirectory(prefix="meshrelay-workers-bench-") as tmp:
        relays: dict[int, Relay] = {}
        try:
            for w in WORKER_COUNTS:
                r = Relay(base, False, Path(tmp))
                r.cmd += ["-workers", str(w)]
                r.log_path = Path(tmp) / f"relay-workers{w}.log"
                relays[w] = r
                ready = r.start()
                print(
                    f"relay -workers {w}: pid {r.pid} on 127.0.0.1:{r.port}, ready in {ready * 1000:.0f} ms"
                )
            for rep in range(a.reps):
                for size in a.sizes:
                    order = WORKER_COUNTS if rep % 2 == 0 else WORKER_COUNTS[::-1]
                    for w in order:
                        res = run_one(relays[w], size, a.pairs, a.warmup, a.duration)
                        res["rep"] = rep + 1
                        runs[(size, w)].append(res)
                        if run_failed(res):
                            failed = True
                            print(
                                f"!! rep {rep + 1} {size} B -workers {w}: failed: {res.get('error') or res}"
                            )
                            if not relays[w].alive():
                                print(relays[w].log_tail())
                                relays[w].stop()
                                relays[w].start()
                        else:
                            print(one_line(rep, size, w, res))
        finally:
            for r in relays.values():
                r.stop()
    summary: dict[str, Any] = {}
    print(
        f"\n{'payload':>8} {'-workers 1':>14} {'-workers 2':>14} {'ratio 2/1':>10}"
        f" {'µs/frame 1':>11} {'µs/frame 2':>11}   (medians; µs = relay CPU, all processes)"
    )
    for size in a.sizes:
        one, two = _median(runs[(size, 1)], "frames_per_s"), _median(runs[(size, 2)], "frames_per_s")
        ratio = round(two / one, 3) if one and two else None
        per_rep = [
            round(r2["frames_per_s"] / r1["frames_per_s"], 3)
            for r1, r2 in zip(runs[(size, 1)], runs[(size, 2)], strict=True)
            if not run_failed(r1) and not run_failed(r2) and r1.get("frames_per_s")
        ]
        us1 = _median(runs[(size, 1)], "relay_us_per_frame")
        us2 = _median(runs[(size, 2)], "relay_us_per_frame")
        # Relay CPU per frame, 1 worker over 2: what the hop between workers costs (1.0 = nothing).
        # Times 2 it is the ratio two workers would reach with two whole cores to themselves (the
        # load generator elsewhere): a projection, not a measurement.
        efficiency = round(us1 / us2, 3) if us1 and us2 else None
        summary[f"{size}B"] = {
            "frames_per_s_workers1": one,
            "frames_per_s_workers2": two,
            "ratio_2_over_1": ratio,
            "ratio_per_rep": per_rep,
            "cpu_efficiency_2_vs_1": efficiency,
            "projected_ratio_with_2_free_cores": round(2 * efficiency, 2) if efficiency else None,
            "relay_us_per_frame_workers1": us1,
            "relay_us_per_frame_workers2": us2,
            "relay_cpu_pct_workers1": _median(runs[(size, 1)], "relay_tree_cpu_pct"),
            "relay_cpu_pct_workers2": _median(runs[(size, 2)], "relay_tree_cpu_pct"),
            "loadgen_cpu_pct_workers1": _median(runs[(size, 1)], "loadgen_cpu_pct"),
            "loadgen_cpu_pct_workers2": _median(runs[(size, 2)], "loadgen_cpu_pct"),
        }
        print(
            f"{size:>6} B {one or 0:>14,.0f} {two or 0:>14,.0f} {ratio if ratio is not None else '-':>10}"
            f" {us1 if us1 is not None else '-':>11} {us2 if us2 is not None else '-':>11}"
        )
    out = {
        "benchmark": "workers",
        "started": stamp,
        "config": {
            "pairs": a.pairs,
            "sizes": a.sizes,
            "reps": a.reps,
            "warmup_s": a.warmup,
            "duration_s": a.duration,
            "tls": False,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "note": (
            "the load generator shares the cores with the relay; other processes on the box add noise "
            "(see loadavg); re-run on a quiet machine before quoting the ratio"
        ),
        "summary": summary,
        "runs": {f"{s}B-workers{w}": rs for (s, w), rs in runs.items()},
    }
    path = write_results(a.out, f"workers-{stamp}.json", "workers-latest.json", out)
    print(f"\nwrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
