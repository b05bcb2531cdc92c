"""Run the relay benchmark matrix with one command and save the results as JSON.

    python -m benchmarks.run            # full run: 3 interleaved repetitions, about 3 minutes
    python -m benchmarks.run --quick    # 1 repetition, short windows, under a minute

Starts the relay as a separate process (plain: ``-a 127.0.0.1:<port> -c <tmp>/key -stun=false``;
TLS adds ``-certmode manual -certdir <tmp> -hostname 127.0.0.1 -http-port -1``), waits until a real
DERP handshake succeeds, then runs each scenario with the load generator (:mod:`benchmarks.loadgen`)
in another process: throughput for plain/TLS × 100/1200 B × 1/20 pairs and round trips for plain
and TLS. Repetitions are interleaved (rep 1 of every scenario, then rep 2, ...). Prints a table,
checks the targets, writes
``benchmarks/results/relay-<timestamp>.json`` and ``benchmarks/results/latest.json``. Exits 1 if
any scenario saw bad frames, a broken connection, a failed run or a relay crash. The relays it
started are always killed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.loadgen import Endpoint, HandshakeFailed, open_derp
from natlib.keys import NodePrivateKey

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# The issue's targets on the 2-core box.
TARGETS = [
    # (scenario id, metric, op, threshold, text)
    ("tput-tls-1200B-20p", "mbit_per_s", ">=", 2500.0, "TLS, 1200 B, 20 pairs ≥ 2.5 Gbit/s"),
    ("tput-plain-100B-1p", "frames_per_s", ">=", 1.5e6, "plain, 100 B, 1 pair ≥ 1.5 M frames/s"),
    ("tput-plain-100B-20p", "frames_per_s", ">=", 1.5e6, "plain, 100 B, 20 pairs ≥ 1.5 M frames/s"),
    ("rtt-tls-100B", "rtt_p50_us", "<=", 250.0, "TLS RTT p50 ≤ 250 µs at low load"),
]


@dataclass
class Scenario:
    id: str
    mode: str  # "throughput" | "rtt"
    tls: bool
    size: int
    pairs: int = 1
    runs: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# output


class Progress:
    """rich progress bar when rich is installed, stdout is a TTY and CI is unset; else plain lines."""

    def __init__(self, total: int) -> None:
        self._rich: Any = None
        self._task: Any = None
        if sys.stdout.isatty() and not os.environ.get("CI"):
            try:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            except ImportError:
                pass
            else:
                self._rich = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(),
                )
                self._rich.start()
                self._task = self._rich.add_task("benchmark", total=total)
        self.total = total
        self.done = 0

    def log(self, msg: str) -> None:
        if self._rich is not None:
            self._rich.console.print(msg)
        else:
            print(msg, flush=True)

    def step(self, desc: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=desc)

    def advance(self) -> None:
        self.done += 1
        if self._rich is not None:
            self._rich.advance(self._task)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


# --------------------------------------------------------------------------------------------------
# the relay process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relay_base_cmd(override: str | None) -> list[str]:
    if override:
        return override.split()
    # One process (-workers=1): the CPU and RSS read from --server-pid then cover the whole relay.
    # benchmarks.workers appends its own -workers N (the last one given wins, as in Go).
    if importlib.util.find_spec("relay.__main__") is not None:
        return [sys.executable, "-m", "relay", "-workers=1"]
    exe = shutil.which("meshrelay")
    if exe is None:
        raise SystemExit("cannot find the relay: no relay/__main__.py and no meshrelay on PATH")
    return [exe, "-workers=1"]


class Relay:
    def __init__(self, base: list[str], tls: bool, workdir: Path) -> None:
        self.tls = tls
        self.port = free_port()
        self.certdir = workdir / "certs"
        name = "tls" if tls else "plain"
        # Not -dev: like derper, -dev forces -a :3340 on all interfaces. A port other than 443
        # without -certmode manual is plain HTTP. -c keeps the node key in the temporary directory
        # (as root, derper's default is /var/lib/derper/derper.key).
        args = ["-a", f"127.0.0.1:{self.port}", "-c", str(workdir / f"derper-{name}.key"), "-stun=false"]
        args.append("-metrics-addr=off")
        if tls:
            args += ["-certmode", "manual", "-certdir", str(self.certdir), "-hostname", "127.0.0.1"]
            args += ["-http-port", "-1"]
        self.cmd = [*base, *args]
        self.log_path = workdir / f"relay-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pin: str | None = None
        self.starts = 0
        self.crashes: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port, self.tls, self.pin)

    def start(self, timeout: float = 30.0) -> float:
        """Start and poll until a DERP handshake succeeds; returns seconds to ready."""
        t0 = time.monotonic()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.starts += 1
        probe = Endpoint("127.0.0.1", self.port, self.tls, None, timeout=2.0)
        delay = 0.01
        last = ""
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"relay exited with {self.proc.returncode} during start-up:\n{self.log_tail()}"
                )
            try:
                s = open_derp(probe, NodePrivateKey.generate())
            except (OSError, HandshakeFailed, ssl.SSLError, ValueError) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                s.close()
                break
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(
                    f"relay not ready after {timeout:.0f} s (last: {last}):\n{self.log_tail()}"
                )
            time.sleep(delay)  # polling interval, not a fixed wait
            delay = min(delay * 1.5, 0.2)
        if self.tls:
            self.pin = self._cert_pin()
        return time.monotonic() - t0

    def _cert_pin(self) -> str | None:
        crt = self.certdir / "127.0.0.1.crt"
        if not crt.exists():
            return None
        pem = crt.read_text()
        first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
        pin = hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest()
        try:  # the pin must match what the relay serves
            open_derp(
                Endpoint("127.0.0.1", self.port, True, pin, timeout=2.0), NodePrivateKey.generate()
            ).close()
        except (OSError, HandshakeFailed, ssl.SSLError):
            return None
        return pin

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + ln for ln in lines[-n:])

    def stop(self) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)  # its own session, started by us
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        self.proc = None


# --------------------------------------------------------------------------------------------------
# running scenarios


def run_loadgen(sc: Scenario, relay: Relay, a: argparse.Namespace) -> dict[str, Any]:
    ep = relay.endpoint()
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.loadgen",
        sc.mode,
        "--json",
        "--host",
        ep.host,
        "--port",
        str(ep.port),
        "--size",
        str(sc.size),
        "--server-pid",
        str(relay.pid),
    ]
    if sc.tls:
        cmd.append("--tls")
        if ep.pin_sha256:
            cmd += ["--pin-sha256", ep.pin_sha256]
    if sc.mode == "throughput":
        cmd += ["--pairs", str(sc.pairs), "--warmup", str(a.warmup), "--duration", str(a.duration)]
        limit = a.warmup + a.duration + 60
    else:
        cmd += ["--count", str(a.rtt_count), "--warmup-count", str(a.rtt_warmup)]
        limit = 90 + a.rtt_count * 0.005
    return invoke_loadgen(cmd, limit)


def invoke_loadgen(
    cmd: list[str], limit: float, preexec_fn: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Run one load generator process (``--json``) and return its result, or ``{"error": ...}``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        p = subprocess.run(
            cmd, capture_output=True, cwd=ROOT, env=env, timeout=limit, check=False, preexec_fn=preexec_fn
        )
    except subprocess.TimeoutExpired:
        return {"error": f"load generator timed out after {limit:.0f} s"}
    out = p.stdout.decode(errors="replace").strip().splitlines()
    try:
        res: dict[str, Any] = json.loads(out[-1])
    except (IndexError, ValueError):
        err = p.stderr.decode(errors="replace").strip()[-2000:]
        return {"error": f"load generator exited {p.returncode} without a result: {err}"}
    return res


def write_results(out: Path, name: str, latest: str, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as ``out/name`` and as ``out/latest`` (the copy the README and reports read)."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2) + "\n"
    path = out / name
    path.write_text(text)
    (out / latest).write_text(text)
    return path


def run_failed(r: dict[str, Any]) -> bool:
    return bool(
        r.get("error")
        or r.get("bad_frames")
        or r.get("connection_errors")
        or r.get("relay_crashed")
        or r.get("stopped_at_rss_cap")
    )


def summarize(sc: Scenario) -> dict[str, Any]:
    ok = [r for r in sc.runs if not r.get("error")]

    def stat(get: Any) -> dict[str, float] | None:
        vals = [v for v in (get(r) for r in ok) if v is not None]
        if not vals:
            return None
        return {
            "median": round(statistics.median(vals), 3),
            "min": round(min(vals), 3),
            "max": round(max(vals), 3),
        }

    s: dict[str, Any] = {
        "runs": len(sc.runs),
        "failed_runs": sum(1 for r in sc.runs if run_failed(r)),
        "bad_frames": sum(r.get("bad_frames", 0) for r in sc.runs),
        "server_cpu_pct": stat(lambda r: r.get("server_cpu_pct")),
        "server_us_per_frame": stat(lambda r: r.get("server_us_per_frame")),
        "loadgen_cpu_pct": stat(lambda r: r.get("loadgen_cpu_pct")),
        "other_cpu_pct": stat(lambda r: r.get("other_cpu_pct")),
    }
    if sc.mode == "throughput":
        s["frames_per_s"] = stat(lambda r: r.get("frames_per_s"))
        s["mbit_per_s"] = stat(lambda r: r.get("mbit_per_s"))
        s["offered_frames_per_s"] = stat(lambda r: r.get("offered_frames_per_s"))
        s["lost_pct"] = stat(lambda r: r.get("lost_pct"))
        s["max_rx_gap_ms"] = stat(lambda r: r.get("max_rx_gap_ms"))
        s["server_rss_mib"] = stat(lambda r: r.get("server_rss_mib"))
    else:
        s["rtt_p50_us"] = stat(lambda r: r.get("rtt_us", {}).get("p50"))
        s["rtt_p99_us"] = stat(lambda r: r.get("rtt_us", {}).get("p99"))
        s["server_us_per_rtt"] = stat(lambda r: r.get("server_us_per_rtt"))
        s["frames_per_s"] = stat(lambda r: r.get("frames_per_s"))
    return s


def fmt(v: float | None, spec: str = ",.0f") -> str:
    return "–" if v is None else format(v, spec)


def med(s: dict[str, Any], k: str) -> float | None:
    x = s.get(k)
    return None if x is None else x["median"]


def rng(s: dict[str, Any], k: str, spec: str = ",.0f") -> str:
    x = s.get(k)
    if x is None:
        return "–"
    return f"{format(x['median'], spec)} ({format(x['min'], spec)}–{format(x['max'], spec)})"


def print_table(scenarios: list[Scenario], summaries: dict[str, dict[str, Any]], reps: int) -> None:
    print()
    print(
        f"Throughput (median of {reps}, min–max; frames/s and Mbit/s are delivered RecvPacket frames, "
        "wire bytes = 37 + payload)"
    )
    hdr = (
        f"{'scenario':22} {'kframes/s':>24} {'Mbit/s':>22} {'srv CPU%':>8} {'srv µs/frame':>12} "
        f"{'lost %':>7} {'gen CPU%':>8} {'other%':>6} {'bad':>4}"
    )
    print(hdr)
    print("-" * len(hdr))
    for sc in scenarios:
        if sc.mode != "throughput":
            continue
        s = summaries[sc.id]
        kf = s.get("frames_per_s")
        kfs = (
            "–"
            if kf is None
            else (f"{kf['median'] / 1e3:,.0f} ({kf['min'] / 1e3:,.0f}–{kf['max'] / 1e3:,.0f})")
        )
        print(
            f"{sc.id:22} {kfs:>24} {rng(s, 'mbit_per_s'):>22} {fmt(med(s, 'server_cpu_pct')):>8} "
            f"{fmt(med(s, 'server_us_per_frame'), '.2f'):>12} {fmt(med(s, 'lost_pct'), '.2f'):>7} "
            f"{fmt(med(s, 'loadgen_cpu_pct')):>8} {fmt(med(s, 'other_cpu_pct')):>6} {s['bad_frames']:>4}"
        )
    print()
    print("Round trip, one frame in flight (A→relay→B→relay→A), µs")
    hdr = (
        f"{'scenario':22} {'p50':>20} {'p99':>20} {'srv µs/RTT':>10} {'srv µs/frame':>12} "
        f"{'gen CPU%':>8} {'other%':>6} {'bad':>4}"
    )
    print(hdr)
    print("-" * len(hdr))
    for sc in scenarios:
        if sc.mode != "rtt":
            continue
        s = summaries[sc.id]
        print(
            f"{sc.id:22} {rng(s, 'rtt_p50_us'):>20} {rng(s, 'rtt_p99_us'):>20} "
            f"{fmt(med(s, 'server_us_per_rtt'), '.1f'):>10} {fmt(med(s, 'server_us_per_frame'), '.1f'):>12} "
            f"{fmt(med(s, 'loadgen_cpu_pct')):>8} {fmt(med(s, 'other_cpu_pct')):>6} {s['bad_frames']:>4}"
        )
    print("other% = CPU used on the box by processes other than the relay and the load generator")


def check_targets(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for sid, metric, op, thr, text in TARGETS:
        s = summaries.get(sid)
        v = None if s is None else med(s, metric)
        status = "n/a" if v is None else "PASS" if (v >= thr if op == ">=" else v <= thr) else "MISS"
        out.append(
            {
                "scenario": sid,
                "metric": metric,
                "op": op,
                "threshold": thr,
                "median": v,
                "status": status,
                "target": text,
            }
        )
    return out


# --------------------------------------------------------------------------------------------------
# environment


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo, with family/model/stepping (VMs often show a bare name)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = ln.partition(":")
            k = k.strip()
            if k in ("model name", "cpu family", "model", "stepping") and k not in info:
                info[k] = v.strip()
    name = info.get("model name") or platform.processor() or "unknown"
    if "cpu family" in info:
        fam, mod, step = info["cpu family"], info.get("model", "?"), info.get("stepping", "?")
        name += f" (family {fam}, model {mod}, stepping {step})"
    return name


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def versions() -> dict[str, Any]:
    def ver(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "trio": ver("trio"),
        "pynacl": ver("pynacl"),
        "meshrelay": ver("meshrelay"),
        "openssl": ssl.OPENSSL_VERSION,
    }


def machine() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------------------------------
# main


def build_scenarios(a: argparse.Namespace) -> list[Scenario]:
    out: list[Scenario] = []
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        tls = m == "tls"
        for size in a.sizes:
            for pairs in a.pairs:
                out.append(Scenario(f"tput-{m}-{size}B-{pairs}p", "throughput", tls, size, pairs))
    if not a.no_rtt:
        for m in modes:
            out.append(Scenario(f"rtt-{m}-{a.rtt_size}B", "rtt", m == "tls", a.rtt_size))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="1 repetition, 0.5 s warm-up, 1.5 s windows, 3000 RTTs"
    )
    p.add_argument("--reps", type=int, help="repetitions per scenario, interleaved (default 3; quick 1)")
    p.add_argument("--warmup", type=float, help="throughput warm-up seconds (default 1.0)")
    p.add_argument("--duration", type=float, help="throughput measure window seconds (default 3.0)")
    p.add_argument("--rtt-count", type=int, help="measured round trips (default 20000)")
    p.add_argument("--rtt-warmup", type=int, default=500, help="unmeasured round trips first")
    p.add_argument("--rtt-size", type=int, default=100, help="RTT payload bytes")
    p.add_argument("--pairs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 20])
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1200])
    p.add_argument("--modes", default="plain,tls", help="comma list of plain,tls")
    p.add_argument("--no-rtt", action="store_true")
    p.add_argument("--relay-cmd", help="relay command (default: python -m relay, else meshrelay)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    a = p.parse_args(argv)
    a.reps = a.reps if a.reps is not None else (1 if a.quick else 3)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if a.quick else 1.0)
    a.duration = a.duration if a.duration is not None else (1.5 if a.quick else 3.0)
    a.rtt_count = a.rtt_count if a.rtt_count is not None else (3000 if a.quick else 20000)
    if a.quick:
        a.rtt_warmup = min(a.rtt_warmup, 200)
    if not (
        1 <= a.reps <= 10 and 0 < a.duration <= 30 and 0 <= a.warmup <= 10 and 1 <= a.rtt_count <= 200_000
    ):
        p.error("bounds: reps 1..10, duration ≤ 30 s, warm-up ≤ 10 s, rtt-count ≤ 200000")
    if set(a.modes.split(",")) - {"plain", "tls"}:
        p.error("--modes takes plain and/or tls")
    if any(not 1 <= n <= 200 for n in a.pairs) or any(not 0 <= n <= 65536 for n in a.sizes):
        p.error("pairs 1..200, sizes 0..65536")
    return a


@contextlib.contextmanager
def relays(base: list[str], modes: list[str], workdir: Path) -> Iterator[dict[bool, Relay]]:
    started: dict[bool, Relay] = {}
    try:
        for m in modes:
            tls = m == "tls"
            started[tls] = Relay(base, tls, workdir)
        yield started
    finally:
        for r in started.values():
            r.stop()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    scenarios = build_scenarios(a)
    base = relay_base_cmd(a.relay_cmd)
    started_at = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started_at))
    total = len(scenarios) * a.reps
    prog = Progress(total)
    relay_meta: dict[str, Any] = {}
    failures: list[str] = []
    modes = [m for m in a.modes.split(",") if m]
    try:
        with (
            tempfile.TemporaryDirectory(prefix="meshrelay-bench-") as tmp,
            relays(base, modes, Path(tmp)) as rl,
        ):
            for tls, r in rl.items():
                ready = r.start()
                prog.log(
                    f"relay ({'TLS' if tls else 'plain'}) pid {r.pid} on 127.0.0.1:{r.port} ready in "
                    f"{ready * 1000:.0f} ms: {' '.join(r.cmd)}"
                    + (f"; cert pinned sha256:{r.pin[:16]}…" if tls and r.pin else "")
                )
            for rep in range(a.reps):
                # rotate the order each repetition so no scenario always follows the same one
                order = scenarios[rep % len(scenarios) :] + scenarios[: rep % len(scenarios)]
                for sc in order:
                    r = rl[sc.tls]
                    if not r.alive():
                        code = r.proc.returncode if r.proc else "?"
                        msg = f"relay ({'TLS' if sc.tls else 'plain'}) died (exit {code})"
                        r.crashes.append(msg + "\n" + r.log_tail())
                        failures.append(msg)
                        prog.log(f"!! {msg}; restarting it\n{r.log_tail()}")
                        r.stop()
                        r.start()
                    prog.step(f"rep {rep + 1}/{a.reps} {sc.id}")
                    res = run_loadgen(sc, r, a)
                    res["rep"] = rep + 1
                    if not r.alive():
                        res["relay_crashed"] = True
                        failures.append(f"{sc.id} rep {rep + 1}: relay crashed during the run")
                    sc.runs.append(res)
                    prog.advance()
                    prog.log(f"[{prog.done:>2}/{total}] rep {rep + 1} {sc.id:22} {one_line(res)}")
                    if run_failed(res):
                        failures.append(f"{sc.id} rep {rep + 1}: {failure_text(res)}")
            for tls, r in rl.items():
                relay_meta["tls" if tls else "plain"] = {
                    "cmd": r.cmd,
                    "starts": r.starts,
                    "crashes": r.crashes,
                    "cert_pinned": bool(r.pin) if tls else None,
                    "log_tail": r.log_tail(40),
                }
    except RuntimeError as e:  # the relay did not start
        prog.close()
        print(f"benchmark aborted: {e}", file=sys.stderr)
        return 1
    finally:
        prog.close()

    summaries = {sc.id: summarize(sc) for sc in scenarios}
    print_table(scenarios, summaries, a.reps)
    busy = [sid for sid, sm in summaries.items() if (med(sm, "other_cpu_pct") or 0.0) > 25.0]
    if busy:
        print()
        print(
            f"WARNING: other processes used > 25 % of a core during {len(busy)} scenario(s) "
            f"({', '.join(busy[:4])}{', …' if len(busy) > 4 else ''}); those numbers understate the relay."
        )
    targets = check_targets(summaries)
    print()
    print("Targets (median):")
    for t in targets:
        v = t["median"]
        vs = "–" if v is None else (f"{v:,.1f}" if v < 1e5 else f"{v:,.0f}")
        print(f"  [{t['status']:4}] {t['target']:45} measured {vs}")

    doc = {
        "schema": "meshrelay-bench/1",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
        "wall_s": round(time.time() - started_at, 1),
        "params": {
            "reps": a.reps,
            "warmup_s": a.warmup,
            "duration_s": a.duration,
            "rtt_count": a.rtt_count,
            "rtt_warmup": a.rtt_warmup,
            "quick": a.quick,
            "relay_cmd": base,
        },
        "versions": versions(),
        "machine": machine(),
        "git": git_info(),
        "relay": relay_meta,
        "targets": targets,
        "failures": failures,
        "busy_box_scenarios": busy,
        "scenarios": [
            {
                "id": sc.id,
                "mode": sc.mode,
                "tls": sc.tls,
                "payload": sc.size,
                "pairs": sc.pairs,
                "frame_bytes": 37 + sc.size,
                "summary": summaries[sc.id],
                "runs": sc.runs,
            }
            for sc in scenarios
        ],
    }
    path = write_results(a.out, f"relay-{stamp}.json", "latest.json", doc)
    print()
    print(
        f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} and latest.json "
        f"({doc['wall_s']:.0f} s)"
    )
    if failures:
        print("FAILURES:")
        for f in failures:
            print("  " + f)
        return 1
    return 0


def failure_text(r: dict[str, Any]) -> str:
    parts = []
    if r.get("error"):
        parts.append(r["error"])
    if r.get("bad_frames"):
        parts.append(f"{r['bad_frames']} bad frames: {'; '.join(r.get('bad_frame_examples', [])[:3])}")
    if r.get("connection_errors"):
        parts.append(f"connection errors: {'; '.join(r['connection_errors'][:3])}")
    if r.get("relay_crashed"):
        parts.append("relay crashed")
    if r.get("stopped_at_rss_cap"):
        parts.append(f"stopped at the RSS cap ({r.get('rss_cap_mib')} MiB) after {r.get('clients')} clients")
    return ", ".join(parts)


def one_line(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"ERROR {r['error']}"
    if r.get("mode") == "rtt":
        q = r["rtt_us"]
        s = f"p50 {q['p50']:.0f} µs  p99 {q['p99']:.0f} µs  srv {r.get('server_us_per_rtt')} µs/RTT"
    else:
        s = (
            f"{r['frames_per_s'] / 1e3:8,.0f} kf/s {r['mbit_per_s']:8,.0f} Mbit/s  "
            f"srv {r.get('server_cpu_pct')}% "
            f"{r.get('server_us_per_frame')} µs/f  lost {r.get('lost_pct')}%  gen {r.get('loadgen_cpu_pct')}%"
        )
    if r.get("other_cpu_pct") is not None:
        s += f"  other {r['other_cpu_pct']:.0f}%"
    if r.get("bad_frames"):
        s += f"  BAD {r['bad_frames']}"
    if r.get("connection_errors"):
        s += f"  CONN-ERR {len(r['connection_errors'])}"
    return s


if __name__ == "__main__":
    sys.exit(main())
