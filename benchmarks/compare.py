"""Benchmark our relay and Tailscale's derper side by side, with one command.

    python -m benchmarks.compare            # full run: 3 interleaved repetitions, about 6-7 minutes
    python -m benchmarks.compare --quick    # 1 repetition, short windows, 1k idle clients only; ~1 minute

The same load generator (:mod:`benchmarks.loadgen`, a separate process) runs every scenario
against both relays in the same run, alternating: for each repetition and each scenario it runs
ours then derper (odd repetitions) or derper then ours (even repetitions), so drift on the box hits
both alike. Scenarios:

* throughput: {plain, TLS} × {100 B, 1200 B} × {1, 20 pairs}
* round trip at low load (one frame in flight): plain and TLS, p50 and p99
* TLS handshakes/s: a few client threads doing TCP + TLS + HTTP upgrade + DERP handshake + close
* memory per idle connection: 1k and 10k idle DERP clients (plain HTTP) against a *fresh* relay
  process each time; VmRSS before and after

Both relays get the same flags (``-a 127.0.0.1:<port> -c <key> -stun=false``; TLS adds
``-certmode manual -certdir D -hostname 127.0.0.1 -http-port -1``; ours also ``-metrics-addr=off``)
and the same RLIMIT_NOFILE (raised to the hard limit in this process before they are spawned).
Server CPU is read from /proc/PID/stat for both; derper is multi-threaded, so its CPU% can exceed
100 %. Writes ``benchmarks/results/compare-<ts>.json``, ``compare-latest.json``,
``compare-latest.md`` and PNG plots (when matplotlib is installed: ``pip install -e .[plot]``).
Exits 1 if any run saw bad frames, connection errors, a load generator error or a relay crash.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/compare.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.loadgen import raise_nofile
from benchmarks.run import (
    RESULTS,
    ROOT,
    Progress,
    Relay,
    failure_text,
    git_info,
    invoke_loadgen,
    machine,
    relay_base_cmd,
    run_failed,
    versions,
    write_results,
)

RELAYS = ("ours", "derper")
DEFAULT_INTEROP_BIN = "/var/cache/meshrelay-interop/bin"

# (kind, metric, label, unit, higher is better)
METRICS: dict[str, list[tuple[str, str, str, bool]]] = {
    "throughput": [
        ("frames_per_s", "frames/s", "frames/s", True),
        ("mbit_per_s", "Mbit/s", "Mbit/s", True),
        ("server_cpu_pct", "server CPU", "%", False),
        ("server_us_per_frame", "server CPU per frame", "µs", False),
        ("lost_pct", "lost", "%", False),
    ],
    "rtt": [
        ("rtt_p50_us", "RTT p50", "µs", False),
        ("rtt_p99_us", "RTT p99", "µs", False),
        ("server_us_per_rtt", "server CPU per RTT", "µs", False),
    ],
    "handshakes": [
        ("handshakes_per_s", "handshakes/s", "1/s", True),
        ("server_us_per_handshake", "server CPU per handshake", "µs", False),
        ("server_cpu_pct", "server CPU", "%", False),
        ("handshake_p50_ms", "handshake p50", "ms", False),
    ],
    "idle": [
        ("bytes_per_conn", "RSS per idle conn", "bytes", False),
        ("rss_after_mib", "RSS with all clients", "MiB", False),
    ],
}
PRIMARY = {
    "throughput": "frames_per_s",
    "rtt": "rtt_p50_us",
    "handshakes": "handshakes_per_s",
    "idle": "bytes_per_conn",
}

# The targets, as ratios ours/derper of the primary metric's median.
RATIO_TARGETS = [
    # (kind, metric, op, threshold, text)
    ("throughput", "frames_per_s", ">=", 1.0, "throughput ≥ 1.0× derper"),
    ("rtt", "rtt_p50_us", "<=", 1.2, "RTT p50 ≤ 1.2× derper"),
]


@dataclass
class Scenario:
    id: str
    kind: str  # throughput | rtt | handshakes | idle
    tls: bool
    size: int = 100
    pairs: int = 1
    clients: int = 0
    window: int = 0  # throughput: max frames in flight per sender; 0 = flood
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {r: [] for r in RELAYS})

    @property
    def label(self) -> str:
        m = "TLS" if self.tls else "plain"
        if self.kind == "throughput":
            return f"{m} {self.size} B {self.pairs}p" + ("" if self.window else " flood")
        if self.kind == "rtt":
            return f"{m} {self.size} B"
        if self.kind == "handshakes":
            return m
        return f"{self.clients:,} clients ({m})"


def metric_value(r: dict[str, Any], k: str) -> float | None:
    if r.get("error"):
        return None
    if k in ("rtt_p50_us", "rtt_p99_us", "handshake_p50_ms"):
        sub = r.get("handshake_ms" if k.startswith("handshake") else "rtt_us") or {}
        x = sub.get("p50" if "p50" in k else "p99")
        return None if x is None else float(x)
    if k == "rss_after_mib":
        v = r.get("rss_after_kib")
        return None if v is None else v / 1024.0
    v = r.get(k)
    return float(v) if isinstance(v, int | float) else None


def stat(vals: list[float]) -> dict[str, float] | None:
    if not vals:
        return None
    return {
        "median": round(statistics.median(vals), 3),
        "min": round(min(vals), 3),
        "max": round(max(vals), 3),
        "n": len(vals),
    }


def summarize(sc: Scenario) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rel in RELAYS:
        runs = sc.runs[rel]
        s: dict[str, Any] = {
            "runs": len(runs),
            "failed_runs": sum(1 for r in runs if run_failed(r)),
            "bad_frames": sum(r.get("bad_frames", 0) for r in runs),
        }
        for k, *_ in METRICS[sc.kind]:
            s[k] = stat([v for v in (metric_value(r, k) for r in runs) if v is not None])
        s["loadgen_cpu_pct"] = stat(
            [v for v in (metric_value(r, "loadgen_cpu_pct") for r in runs) if v is not None]
        )
        s["other_cpu_pct"] = stat(
            [v for v in (metric_value(r, "other_cpu_pct") for r in runs) if v is not None]
        )
        out[rel] = s
    ratio: dict[str, Any] = {}
    for k, *_ in METRICS[sc.kind]:
        a, b = out["ours"].get(k), out["derper"].get(k)
        # paired ratios: repetition i of ours / repetition i of derper
        pairs = []
        for ro, rd in zip(sc.runs["ours"], sc.runs["derper"], strict=False):
            vo, vd = metric_value(ro, k), metric_value(rd, k)
            if vo is not None and vd:
                pairs.append(vo / vd)
        ratio[k] = {
            "of_medians": round(a["median"] / b["median"], 3) if a and b and b["median"] else None,
            "paired": stat(pairs),
        }
    out["ratio"] = ratio
    return out


# --------------------------------------------------------------------------------------------------
# relays


def derper_cmd(a: argparse.Namespace) -> list[str]:
    if a.derper:
        return shlex.split(a.derper)
    d = Path(os.environ.get("MESHRELAY_INTEROP_BIN") or DEFAULT_INTEROP_BIN)
    exe = d / "derper"
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise SystemExit(
            f"derper not found at {exe}; build it with .ci/interop-deps.sh, set MESHRELAY_INTEROP_BIN, "
            "or pass --derper PATH"
        )
    return [str(exe)]


def derper_version(cmd: list[str]) -> str | None:
    v = Path(cmd[0]).parent / "VERSION"
    with contextlib.suppress(OSError):
        return v.read_text().strip() or None
    return None


def make_relay(which: str, base: dict[str, list[str]], tls: bool, workdir: Path) -> Relay:
    workdir.mkdir(parents=True, exist_ok=True)
    r = Relay(base[which], tls, workdir)
    if which == "derper":  # derper has no -metrics-addr; everything else is the same
        r.cmd = [x for x in r.cmd if x != "-metrics-addr=off"]
    return r


# --------------------------------------------------------------------------------------------------
# load generator


def run_loadgen(sc: Scenario, relay: Relay, a: argparse.Namespace) -> dict[str, Any]:
    ep = relay.endpoint()
    cmd = [sys.executable, "-m", "benchmarks.loadgen", sc.kind, "--json", "--host", ep.host]
    cmd += ["--port", str(ep.port), "--size", str(sc.size), "--server-pid", str(relay.pid)]
    if sc.tls:
        cmd.append("--tls")
        if ep.pin_sha256:
            cmd += ["--pin-sha256", ep.pin_sha256]
    if sc.kind == "throughput":
        cmd += ["--pairs", str(sc.pairs), "--warmup", str(a.warmup), "--duration", str(a.duration)]
        cmd += ["--window", str(sc.window)]
        limit = a.warmup + a.duration + 60
    elif sc.kind == "rtt":
        cmd += ["--count", str(a.rtt_count), "--warmup-count", str(a.rtt_warmup)]
        limit = 90 + a.rtt_count * 0.005
    elif sc.kind == "handshakes":
        cmd += ["--duration", str(a.hs_duration), "--warmup", "0.5", "--parallel", str(a.hs_parallel)]
        limit = a.hs_duration + 60
    else:
        cmd += ["--clients", str(sc.clients), "--hold", str(a.idle_hold)]
        limit = 90 + sc.clients * 0.02
    pre = None
    if a.loadgen_cpus:
        cpus = a.loadgen_cpus

        def pre() -> None:
            os.sched_setaffinity(0, cpus)

    return invoke_loadgen(cmd, limit, pre)


def one_line(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"ERROR {r['error']}"
    m = r.get("mode")
    if m == "rtt":
        q = r["rtt_us"]
        s = f"p50 {q['p50']:.0f} µs  p99 {q['p99']:.0f} µs  srv {r.get('server_us_per_rtt')} µs/RTT"
    elif m == "handshakes":
        s = (
            f"{r['handshakes_per_s']:,.0f} handshakes/s  srv {r.get('server_cpu_pct')}% "
            f"{r.get('server_us_per_handshake')} µs/hs  gen {r.get('loadgen_cpu_pct')}%"
        )
    elif m == "idle":
        bpc = r.get("bytes_per_conn")
        s = (
            f"{r['clients']:,} clients  RSS {((r.get('rss_before_kib') or 0) / 1024):.1f} → "
            f"{((r.get('rss_after_kib') or 0) / 1024):.1f} MiB  "
            f"{'–' if bpc is None else f'{bpc / 1024:.1f}'} KiB/conn  open {r.get('open_s')} s"
        )
        if r.get("stopped_at_rss_cap"):
            s += "  STOPPED AT RSS CAP"
    else:
        s = (
            f"{r['frames_per_s'] / 1e3:8,.0f} kf/s {r['mbit_per_s']:8,.0f} Mbit/s  "
            f"srv {r.get('server_cpu_pct')}% lost {r.get('lost_pct')}%  gen {r.get('loadgen_cpu_pct')}%"
        )
    if r.get("other_cpu_pct") is not None:
        s += f"  other {r['other_cpu_pct']:.0f}%"
    if r.get("bad_frames"):
        s += f"  BAD {r['bad_frames']}"
    if r.get("connection_errors"):
        s += f"  CONN-ERR {len(r['connection_errors'])}"
    return s


# --------------------------------------------------------------------------------------------------
# scenarios and arguments


def build_scenarios(a: argparse.Namespace) -> list[Scenario]:
    out: list[Scenario] = []
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        for size in a.sizes:
            for pairs in a.pairs:
                out.append(
                    Scenario(
                        f"tput-{m}-{size}B-{pairs}p", "throughput", m == "tls", size, pairs, window=a.window
                    )
                )
    if not a.no_flood:
        # open loop, senders as fast as the relay accepts: overload behaviour (drops vs backpressure)
        out.append(Scenario("flood-plain-100B-20p", "throughput", False, 100, 20, window=0))
    if not a.no_rtt:
        for m in modes:
            out.append(Scenario(f"rtt-{m}-{a.rtt_size}B", "rtt", m == "tls", a.rtt_size))
    if not a.no_handshakes:
        out.append(Scenario("handshakes-tls", "handshakes", True))
    for n in a.idle_clients:
        out.append(Scenario(f"idle-{n}", "idle", False, clients=n))
    return out


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, short windows, 1k idle clients only")
    p.add_argument("--reps", type=int, help="repetitions per scenario and relay (default 3; quick 1)")
    p.add_argument("--warmup", type=float, help="throughput warm-up seconds (default 1.0; quick 0.5)")
    p.add_argument("--duration", type=float, help="throughput window seconds (default 2.0; quick 1.0)")
    p.add_argument("--rtt-count", type=int, help="measured round trips (default 10000; quick 3000)")
    p.add_argument("--rtt-warmup", type=int, default=500, help="unmeasured round trips first")
    p.add_argument("--rtt-size", type=int, default=100)
    p.add_argument("--pairs", type=_ints, default=[1, 20])
    p.add_argument("--sizes", type=_ints, default=[100, 1200])
    p.add_argument("--modes", default="plain,tls", help="comma list of plain,tls (throughput and RTT)")
    p.add_argument(
        "--window",
        type=int,
        default=32,
        help="throughput: max frames in flight per sender (default 32, derper's per-client queue; 0 = flood)",
    )
    p.add_argument("--no-flood", action="store_true", help="skip the open-loop flood scenario")
    p.add_argument("--no-rtt", action="store_true")
    p.add_argument("--no-handshakes", action="store_true")
    p.add_argument("--hs-duration", type=float, help="TLS handshake window seconds (default 3; quick 1.5)")
    p.add_argument("--hs-parallel", type=int, default=4, help="client threads doing handshakes")
    p.add_argument(
        "--idle-clients",
        type=_ints,
        help="idle-connection counts, comma list (default 1000,10000; quick 1000)",
    )
    p.add_argument("--idle-hold", type=float, default=1.0, help="seconds idle before reading RSS")
    p.add_argument("--relay-cmd", help="our relay's command (default: python -m relay, else meshrelay)")
    p.add_argument(
        "--derper", help=f"derper command (default: $MESHRELAY_INTEROP_BIN or {DEFAULT_INTEROP_BIN})"
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin (default with ≥ 2 CPUs: both relays on CPU 0, the load generator on the others)",
    )
    p.add_argument("--no-plots", action="store_true", help="do not draw PNGs")
    p.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="run nothing: redraw the PNGs and compare-latest.md from a saved compare-*.json",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    a = p.parse_args(argv)
    q = a.quick
    a.reps = a.reps if a.reps is not None else (1 if q else 3)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if q else 1.0)
    a.duration = a.duration if a.duration is not None else (1.0 if q else 2.0)
    a.rtt_count = a.rtt_count if a.rtt_count is not None else (3000 if q else 10000)
    a.hs_duration = a.hs_duration if a.hs_duration is not None else (1.5 if q else 3.0)
    a.idle_clients = a.idle_clients if a.idle_clients is not None else ([1000] if q else [1000, 10000])
    if q:
        a.rtt_warmup = min(a.rtt_warmup, 200)
    if not (
        1 <= a.reps <= 10
        and 0 < a.duration <= 30
        and 0 <= a.warmup <= 10
        and 1 <= a.rtt_count <= 200_000
        and 0 < a.hs_duration <= 30
        and 1 <= a.hs_parallel <= 32
        and 0 <= a.idle_hold <= 30
        and 0 <= a.window <= 100_000
    ):
        p.error("bounds: reps 1..10, windows ≤ 30 s, warm-up ≤ 10 s, rtt-count ≤ 200000, hs-parallel ≤ 32")
    if set(a.modes.split(",")) - {"plain", "tls"}:
        p.error("--modes takes plain and/or tls")
    if any(not 1 <= n <= 200 for n in a.pairs) or any(not 0 <= n <= 65536 for n in a.sizes):
        p.error("pairs 1..200, sizes 0..65536")
    if any(not 1 <= n <= 15_000 for n in a.idle_clients):
        p.error("idle clients 1..15000")
    a.relay_cpus = a.loadgen_cpus = None
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not a.no_pin and len(cpus) >= 2:
        a.relay_cpus, a.loadgen_cpus = {cpus[0]}, set(cpus[1:])
    return a


# --------------------------------------------------------------------------------------------------
# reporting


def fnum(v: float | None, unit: str = "") -> str:
    if v is None:
        return "–"
    if unit == "frames/s":
        return f"{v / 1e3:,.0f} k"
    if unit == "bytes":
        return f"{v / 1024:,.1f} KiB"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:,.1f}"
    return f"{v:,.2f}"


def frange(s: dict[str, float] | None, unit: str) -> str:
    if s is None:
        return "–"
    if s.get("n", 1) <= 1:
        return fnum(s["median"], unit)
    return f"{fnum(s['median'], unit)} ({fnum(s['min'], unit)}–{fnum(s['max'], unit)})"


def fratio(r: dict[str, Any]) -> str:
    v = r.get("of_medians")
    if v is None:
        return "–"
    p = r.get("paired")
    if p and p.get("n", 1) > 1:
        return f"**{v:.2f}×** ({p['min']:.2f}–{p['max']:.2f})"
    return f"**{v:.2f}×**"


def check_targets(scenarios: list[Scenario], summaries: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for kind, metric, op, thr, text in RATIO_TARGETS:
        for sc in scenarios:
            if sc.kind != kind or (kind == "throughput" and not sc.window):
                continue
            v = summaries[sc.id]["ratio"][metric]["of_medians"]
            ok = None if v is None else (v >= thr if op == ">=" else v <= thr)
            out.append(
                {
                    "scenario": sc.id,
                    "metric": metric,
                    "op": op,
                    "threshold": thr,
                    "ratio": v,
                    "status": "n/a" if ok is None else "PASS" if ok else "MISS",
                    "target": text,
                }
            )
    return out


def primary_table(scenarios: list[Scenario], summaries: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows: scenario, metric (unit), ours, derper, ours/derper, better."""
    rows: list[tuple[str, ...]] = []
    for sc in scenarios:
        s = summaries[sc.id]
        shown = {
            "throughput": ("frames_per_s", "server_cpu_pct") + (() if sc.window else ("lost_pct",)),
            "rtt": ("rtt_p50_us", "rtt_p99_us"),
            "handshakes": ("handshakes_per_s", "server_us_per_handshake", "server_cpu_pct"),
            "idle": ("bytes_per_conn", "rss_after_mib"),
        }[sc.kind]
        for k, label, unit, higher in METRICS[sc.kind]:
            if k not in shown:
                continue
            u = "" if unit in ("frames/s", "bytes") else f" ({unit})"
            rows.append(
                (
                    f"{sc.kind} {sc.label}",
                    f"{label}{u}",
                    frange(s["ours"][k], unit),
                    frange(s["derper"][k], unit),
                    fratio(s["ratio"][k]),
                    "higher" if higher else "lower",
                )
            )
    return rows


def print_report(scenarios: list[Scenario], summaries: dict[str, Any], targets: list[dict[str, Any]]) -> None:
    rows = primary_table(scenarios, summaries)
    hdr = ("scenario", "metric", "ours", "derper", "ours/derper", "better")
    widths = [max(len(str(r[i]).replace("**", "")) for r in [hdr, *rows]) for i in range(len(hdr))]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(hdr, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).replace("**", "").ljust(w) for c, w in zip(r, widths, strict=True)))
    print()
    print("Targets (ratio of medians, ours/derper):")
    for t in targets:
        v = "–" if t["ratio"] is None else f"{t['ratio']:.2f}×"
        print(f"  [{t['status']:4}] {t['target']:28} {t['scenario']:22} {v}")


def write_markdown(
    path: Path, doc: dict[str, Any], scenarios: list[Scenario], summaries: dict[str, Any], plots: list[str]
) -> None:
    m, v, prm = doc["machine"], doc["versions"], doc["params"]
    lines = [
        "# meshrelay vs derper: side-by-side benchmark",
        "",
        f"Run {doc['started_at']} ({doc['wall_s']:.0f} s) with `{doc['command']}`.",
        "",
        f"* machine: {m['cpu_model']}, {m['cpus']} CPUs, Linux {m['kernel']}; everything on 127.0.0.1",
        f"* ours: `{' '.join(doc['relay_cmds']['ours'])}` "
        f"(Python {v['python']}, trio {v['trio']}, {v['openssl']})",
        f"* derper: `{' '.join(doc['relay_cmds']['derper'])}` (tailscale.com {doc['derper_version'] or '?'})",
        f"* git: {(doc['git'].get('commit') or '?')[:12]}{' (dirty)' if doc['git'].get('dirty') else ''}",
        f"* {prm['reps']} repetitions per scenario and relay, alternating ours/derper; throughput "
        f"{prm['warmup_s']} s warm-up + {prm['duration_s']} s window; {prm['rtt_count']:,} round trips; "
        f"handshakes {prm['hs_duration_s']} s with {prm['hs_parallel']} client threads; "
        f"RLIMIT_NOFILE {prm['nofile']} for both relays",
        "* CPU pinning: "
        + (
            f"both relays on CPU {prm['relay_cpus']} (derper's GOMAXPROCS follows: 1), the load generator on "
            f"CPU {prm['loadgen_cpus']}"
            if prm.get("relay_cpus")
            else "none (`--no-pin`): derper may use every core and compete with the load generator"
        ),
        "",
        "Cells are the median over repetitions (min–max). The ratio is median(ours) / median(derper);",
        "in brackets the min–max of the per-repetition ratios. For throughput and handshakes higher is",
        "better; for RTT, CPU and memory lower is better. Server CPU is the relay process's CPU time",
        "(all threads) over wall time. derper is multi-threaded; pinned to one CPU (the default) it stays",
        "at or below 100 %, unpinned (`--no-pin`) it can use more. Ours is one Python thread.",
        "",
        "## Targets",
        "",
        "| target | scenario | ours/derper | status |",
        "|---|---|---|---|",
    ]
    for t in doc["targets"]:
        r = "–" if t["ratio"] is None else f"{t['ratio']:.2f}×"
        lines.append(f"| {t['target']} | `{t['scenario']}` | {r} | {t['status']} |")
    lines += [
        "",
        "## Results",
        "",
        "| scenario | metric | ours | derper | ours/derper | better |",
        "|---|---|---|---|---|---|",
    ]
    for row in primary_table(scenarios, summaries):
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Notes:",
        "",
        "* throughput counts delivered RecvPacket frames per second, both directions of every pair",
        f"  summed. Each sender keeps at most {prm['window_frames']} frames in flight (sent, not yet",
        "  received by its partner; derper's per-client queue is 32 packets), so neither relay has to",
        "  drop and the number is the lossless rate. `server CPU` near 100 % means the relay's core is",
        "  the bottleneck.",
        "* `flood`: senders push as fast as the relay accepts. derper reads everything and drops what",
        "  its 32-packet per-client queue cannot hold (DERP is lossy by design); ours reads more slowly,",
        "  so TCP pushes back on the senders. The delivered rate there measures overload behaviour, not",
        "  capacity, and is not a target.",
        "* RTT: one pair, one frame in flight, A→relay→B→relay→A.",
        "* handshakes: TCP + full TLS handshake (no resumption) + HTTP upgrade + DERP handshake, then",
        "  close, from several client threads in one Python process; the load generator can be the limit,",
        "  so also compare the server CPU per handshake.",
        "* memory: N idle DERP clients over plain HTTP (no TLS) against a fresh relay process; bytes per",
        "  connection = (VmRSS with all clients − VmRSS before) / N.",
    ]
    if doc["failures"]:
        lines += ["", "## Failures", ""] + [f"* {f}" for f in doc["failures"]]
    if doc["busy_box"]:
        lines += [
            "",
            f"Other processes used > 25 % of a core during: {', '.join(doc['busy_box'])}; "
            "those numbers are noisy.",
        ]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# plots

COLORS = {"ours": "#1f77b4", "derper": "#ff7f0e"}


def make_plots(out: Path, scenarios: list[Scenario], summaries: dict[str, Any], title: str) -> list[str]:
    """PNG plots with matplotlib (Agg). Returns the file names written; [] if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e .[plot])")
        return []
    written: list[str] = []

    def bars(ax: Any, scs: list[Scenario], key: str, scale: float, ylabel: str) -> None:
        xs = list(range(len(scs)))
        w = 0.38
        for i, rel in enumerate(RELAYS):
            med, lo, hi = [], [], []
            for sc in scs:
                st = summaries[sc.id][rel].get(key)
                if st is None:
                    med.append(0.0)
                    lo.append(0.0)
                    hi.append(0.0)
                    continue
                med.append(st["median"] / scale)
                lo.append((st["median"] - st["min"]) / scale)
                hi.append((st["max"] - st["median"]) / scale)
            pos = [x + (i - 0.5) * w for x in xs]
            ax.bar(pos, med, w, yerr=[lo, hi], capsize=3, color=COLORS[rel], label=rel)
        for x, sc in zip(xs, scs, strict=True):
            r = summaries[sc.id]["ratio"][key]["of_medians"]
            if r is not None:
                top = max((summaries[sc.id][rel].get(key) or {"max": 0})["max"] / scale for rel in RELAYS)
                ax.annotate(
                    f"{r:.2f}×",
                    (x, top),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(0, 3),
                    textcoords="offset points",
                )
        ax.set_xticks(xs)
        ax.set_xticklabels([sc.label for sc in scs], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)

    def save(fig: Any, name: str, legend: bool = True) -> None:
        if legend:  # one legend for the figure, in the top left corner, clear of the bars and labels
            handles, labels = fig.axes[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="upper left", ncol=2, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    tput = [s for s in scenarios if s.kind == "throughput"]
    groups = [
        (
            [s for s in tput if s.window and s.size < 1000],
            "frames_per_s",
            1e3,
            "delivered frames/s (thousands)",
            "small packets (frames/s)",
        ),
        (
            [s for s in tput if s.window and s.size >= 1000],
            "mbit_per_s",
            1.0,
            "delivered Mbit/s (DERP wire bytes)",
            "large packets (Mbit/s)",
        ),
        (
            [s for s in tput if not s.window],
            "frames_per_s",
            1e3,
            "delivered frames/s (thousands)",
            "flood (overload)",
        ),
    ]
    groups = [g for g in groups if g[0]]
    if groups:
        widths = [max(2, len(g[0])) for g in groups]
        fig, axs = plt.subplots(
            1,
            len(groups),
            figsize=(max(9.0, 3 + 1.3 * sum(widths)), 4.8),
            gridspec_kw={"width_ratios": widths},
            squeeze=False,
        )
        for ax, (scs, key, scale, ylabel, name) in zip(axs[0], groups, strict=True):
            bars(ax, scs, key, scale, ylabel)
            ax.set_title(f"Throughput, {name}", fontsize=10)
        window = next((s.window for s in tput if s.window), 0)
        fig.suptitle(
            f"{title} — throughput\nmedian, min–max over repetitions; label = ours/derper"
            + (f"; at most {window} frames in flight per sender, except flood" if window else ""),
            fontsize=10,
        )
        save(fig, "compare-throughput.png")

    rtt = [s for s in scenarios if s.kind == "rtt"]
    hs = [s for s in scenarios if s.kind == "handshakes"]
    if rtt or hs:
        fig, axs = plt.subplots(1, 3, figsize=(12, 4.2))
        if rtt:
            bars(axs[0], rtt, "rtt_p50_us", 1.0, "round-trip time (µs)")
            axs[0].set_title("RTT p50, one frame in flight")
            bars(axs[1], rtt, "rtt_p99_us", 1.0, "round-trip time (µs)")
            axs[1].set_title("RTT p99")
        if hs:
            bars(axs[2], hs, "handshakes_per_s", 1.0, "handshakes/s")
            axs[2].set_title("TCP+TLS+DERP handshakes/s")
        fig.suptitle(f"{title} — latency and handshakes; label = ours/derper", fontsize=10)
        save(fig, "compare-latency.png")

    idle = [s for s in scenarios if s.kind == "idle"]
    if idle:
        fig, axs = plt.subplots(1, 2, figsize=(10, 4.2))
        bars(axs[0], idle, "bytes_per_conn", 1024.0, "RSS per idle connection (KiB)")
        axs[0].set_title("Memory per idle connection (plain HTTP)")
        bars(axs[1], idle, "rss_after_mib", 1.0, "relay RSS with all clients (MiB)")
        axs[1].set_title("Relay RSS with N idle clients")
        fig.suptitle(f"{title} — memory; label = ours/derper", fontsize=10)
        save(fig, "compare-memory.png")

    # one overview: every primary ratio, with a line at 1.0
    rows: list[tuple[str, float, bool]] = []
    for sc in scenarios:
        if sc.kind == "throughput" and not sc.window:
            continue  # the flood ratio measures drops, not capacity; it would squash the scale
        k = PRIMARY[sc.kind]
        higher = next(h for kk, _, _, h in METRICS[sc.kind] if kk == k)
        r = summaries[sc.id]["ratio"][k]["of_medians"]
        if r is not None:
            name = {
                "frames_per_s": "frames/s",
                "rtt_p50_us": "RTT p50",
                "handshakes_per_s": "handshakes/s",
                "bytes_per_conn": "bytes/conn",
            }[k]
            rows.append((f"{sc.kind} {sc.label}: {name}", r, higher))
        if sc.kind == "rtt":
            r99 = summaries[sc.id]["ratio"]["rtt_p99_us"]["of_medians"]
            if r99 is not None:
                rows.append((f"rtt {sc.label}: RTT p99", r99, False))
    if rows:
        fig, ax = plt.subplots(figsize=(9, 0.34 * len(rows) + 1.4))
        ys = list(range(len(rows)))[::-1]
        cols = ["#2ca02c" if (r >= 1.0) == h or r == 1.0 else "#d62728" for _, r, h in rows]
        ax.barh(ys, [r for _, r, _ in rows], color=cols)
        for y, (_, r, h) in zip(ys, rows, strict=True):
            ax.annotate(
                f"{r:.2f}× ({'higher' if h else 'lower'} is better)",
                (r, y),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        ax.axvline(1.0, color="black", lw=1)
        ax.set_yticks(ys)
        ax.set_yticklabels([n for n, _, _ in rows], fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("ours / derper (median; log scale; green = ours better, red = derper better)")
        ax.set_title(f"{title} — meshrelay relative to derper", fontsize=10)
        ax.margins(x=0.25)
        ax.grid(axis="x", alpha=0.3, which="both")
        save(fig, "compare-ratios.png", legend=False)
    return written


# --------------------------------------------------------------------------------------------------
# main


def replot(path: Path, out: Path, plots_on: bool) -> int:
    doc = json.loads(path.read_text())
    scenarios = []
    for d in doc["scenarios"]:
        window = d.get("window", 0 if d["id"].startswith("flood") else doc["params"].get("window_frames", 0))
        sc = Scenario(d["id"], d["kind"], d["tls"], d["payload"], d["pairs"], d["clients"], window)
        sc.runs = d["runs"]
        scenarios.append(sc)
    summaries = {sc.id: summarize(sc) for sc in scenarios}
    out.mkdir(parents=True, exist_ok=True)
    title = f"meshrelay vs derper {doc.get('derper_version') or ''}".strip()
    plots = make_plots(out, scenarios, summaries, title) if plots_on else []
    write_markdown(out / "compare-latest.md", doc, scenarios, summaries, plots)
    print(f"redrew compare-latest.md{', ' + ', '.join(plots) if plots else ''} in {out} from {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.replot:
        return replot(a.replot, a.out, not a.no_plots)
    args = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks.compare", *(shlex.quote(x) for x in args)])
    scenarios = build_scenarios(a)
    base = {"ours": relay_base_cmd(a.relay_cmd), "derper": derper_cmd(a)}
    # Both relays (and the load generators) inherit this limit: 10k idle clients need > 10k fds.
    nofile = raise_nofile()
    if a.relay_cpus:
        # Relays inherit this process's affinity (Go sizes GOMAXPROCS from it): each relay gets one
        # core, the load generator the rest. This process only waits on its children.
        os.sched_setaffinity(0, a.relay_cpus)
    need = max(a.idle_clients, default=0) + 256
    started_at = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started_at))
    total = len(scenarios) * a.reps * len(RELAYS)
    prog = Progress(total)
    if nofile < need:
        prog.log(f"warning: RLIMIT_NOFILE is {nofile}, {need} wanted for {max(a.idle_clients)} idle clients")
    failures: list[str] = []
    relay_meta: dict[str, Any] = {}
    modes = sorted({sc.tls for sc in scenarios if sc.kind != "idle"})
    persistent: dict[tuple[str, bool], Relay] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="meshrelay-compare-") as tmp:
            work = Path(tmp)
            try:
                for rel in RELAYS:
                    for tls in modes:
                        r = make_relay(rel, base, tls, work / rel)
                        persistent[(rel, tls)] = r
                        ready = r.start()
                        prog.log(
                            f"{rel:6} ({'TLS' if tls else 'plain'}) pid {r.pid} on 127.0.0.1:{r.port} "
                            f"ready in {ready * 1000:.0f} ms: {' '.join(r.cmd)}"
                        )
                for rep in range(a.reps):
                    order = scenarios[rep % len(scenarios) :] + scenarios[: rep % len(scenarios)]
                    rels = RELAYS if rep % 2 == 0 else RELAYS[::-1]
                    for sc in order:
                        for rel in rels:
                            prog.step(f"rep {rep + 1}/{a.reps} {sc.id} {rel}")
                            res = run_one(sc, rel, rep, base, persistent, work, a, prog, failures)
                            res["rep"] = rep + 1
                            sc.runs[rel].append(res)
                            prog.advance()
                            prog.log(
                                f"[{prog.done:>3}/{total}] rep {rep + 1} {sc.id:20} {rel:6} {one_line(res)}"
                            )
                            if run_failed(res):
                                failures.append(f"{sc.id} {rel} rep {rep + 1}: {failure_text(res)}")
                for (rel, tls), r in persistent.items():
                    relay_meta[f"{rel}-{'tls' if tls else 'plain'}"] = {
                        "cmd": r.cmd,
                        "starts": r.starts,
                        "crashes": r.crashes,
                        "cert_pinned": bool(r.pin) if tls else None,
                        "log_tail": r.log_tail(20),
                    }
            finally:
                for r in persistent.values():
                    r.stop()
    except RuntimeError as e:
        prog.close()
        print(f"benchmark aborted: {e}", file=sys.stderr)
        return 1
    finally:
        prog.close()

    summaries = {sc.id: summarize(sc) for sc in scenarios}
    targets = check_targets(scenarios, summaries)
    print_report(scenarios, summaries, targets)
    busy = [
        sc.id
        for sc in scenarios
        for rel in RELAYS
        if ((summaries[sc.id][rel].get("other_cpu_pct") or {}).get("median") or 0.0) > 25.0
    ]
    busy = sorted(set(busy))
    if busy:
        print(
            f"\nWARNING: other processes used > 25 % of a core during {', '.join(busy)}; "
            "those numbers are noisy."
        )
    doc: dict[str, Any] = {
        "schema": "meshrelay-compare/1",
        "command": command,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
        "wall_s": round(time.time() - started_at, 1),
        "params": {
            "reps": a.reps,
            "warmup_s": a.warmup,
            "duration_s": a.duration,
            "rtt_count": a.rtt_count,
            "rtt_warmup": a.rtt_warmup,
            "hs_duration_s": a.hs_duration,
            "hs_parallel": a.hs_parallel,
            "idle_clients": a.idle_clients,
            "idle_hold_s": a.idle_hold,
            "window_frames": a.window,
            "quick": a.quick,
            "nofile": nofile,
            "relay_cpus": sorted(a.relay_cpus) if a.relay_cpus else None,
            "loadgen_cpus": sorted(a.loadgen_cpus) if a.loadgen_cpus else None,
            "order": "per repetition and scenario: ours then derper on odd repetitions, "
            "derper then ours on even ones",
        },
        "relay_cmds": dict(base),
        "derper_version": derper_version(base["derper"]),
        "versions": versions(),
        "machine": machine(),
        "git": git_info(),
        "relays": relay_meta,
        "targets": targets,
        "failures": failures,
        "busy_box": busy,
        "scenarios": [
            {
                "id": sc.id,
                "kind": sc.kind,
                "label": sc.label,
                "tls": sc.tls,
                "payload": sc.size,
                "pairs": sc.pairs,
                "clients": sc.clients,
                "window": sc.window,
                "summary": summaries[sc.id],
                "runs": sc.runs,
            }
            for sc in scenarios
        ],
    }
    path = write_results(a.out, f"compare-{stamp}.json", "compare-latest.json", doc)
    plots = (
        []
        if a.no_plots
        else make_plots(
            a.out, scenarios, summaries, f"meshrelay vs derper {doc['derper_version'] or ''}".strip()
        )
    )
    write_markdown(a.out / "compare-latest.md", doc, scenarios, summaries, plots)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(
        f"\nwrote {shown}, compare-latest.json, compare-latest.md"
        + (f", {', '.join(plots)}" if plots else "")
        + f" ({doc['wall_s']:.0f} s)"
    )
    if failures:
        print("FAILURES:")
        for f in failures:
            print("  " + f)
        return 1
    return 0


def run_one(
    sc: Scenario,
    rel: str,
    rep: int,
    base: dict[str, list[str]],
    persistent: dict[tuple[str, bool], Relay],
    work: Path,
    a: argparse.Namespace,
    prog: Progress,
    failures: list[str],
) -> dict[str, Any]:
    if sc.kind == "idle":
        # a fresh relay each time, so earlier scenarios' heap growth does not hide the cost
        r = make_relay(rel, base, False, work / f"{rel}-idle-{sc.clients}-{rep}")
        try:
            try:
                r.start()
            except RuntimeError as e:
                return {"error": f"{rel} did not start: {e}"}
            res = run_loadgen(sc, r, a)
            if not r.alive():
                res["relay_crashed"] = True
            res["server_log_tail"] = r.log_tail(5) if run_failed(res) else None
            return res
        finally:
            r.stop()
    r = persistent[(rel, sc.tls)]
    if not r.alive():
        code = r.proc.returncode if r.proc else "?"
        msg = f"{rel} ({'TLS' if sc.tls else 'plain'}) died (exit {code})"
        r.crashes.append(msg + "\n" + r.log_tail())
        failures.append(msg)
        prog.log(f"!! {msg}; restarting it\n{r.log_tail()}")
        r.stop()
        r.start()
    res = run_loadgen(sc, r, a)
    if not r.alive():
        res["relay_crashed"] = True
    return res


if __name__ == "__main__":
    sys.exit(main())
