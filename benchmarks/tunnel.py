"""iperf3 over the mesh tunnel: natlib's direct path and the relay path, against bare wireguard-go.

Root only (a :mod:`natlib.testing` lab). Two public hosts a1 and b1 (no NAT) and a relay on a
server host. Three scenarios, in one lab, one after the other, each ``--reps`` times:

* ``bare``: wireguard-go in a1 and b1 configured with each other's real address as the endpoint
  (client.engine and client.wgconfig, no natlib, no proxy): the reference;
* ``direct``: ``meshnode up`` on both; the test waits until ``meshnode status`` shows the direct path;
* ``relay``: ``meshnode up`` on both with UDP between a1 and b1 dropped (nftables), so natlib
  stays on the relay.

Each run is ``iperf3 -c <overlay of b1> -t SECONDS -J`` from a1 (TCP, one stream); the number is
the receiver's bits per second. The JSON result (median per scenario, every run, and the ratios
to ``bare``) goes to stdout and to ``benchmarks/results/tunnel-<timestamp>.json`` and
``tunnel-latest.json``. Goal (issue #6): direct ≥ 50 % of bare.

    sudo python3 -m benchmarks.tunnel --seconds 5 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from benchmarks.run import RESULTS, ROOT, write_results

ENV = {"PYTHONPATH": str(ROOT)}
NODES = {"alpha": ("a1", "none"), "beta": ("b1", "none")}
BARE_PORT = 51820
MAX_SECONDS = 30
MAX_REPS = 5

# Bare wireguard-go from the mesh file (with static endpoints) and the key file, until SIGTERM.
BARE_PROGRAM = textwrap.dedent(r"""
    import signal, sys, trio
    from client.engine import open_wireguard_go
    from client.keyfile import read_key_file
    from client.meshfile import load_mesh_file
    from client.wgconfig import engine_request, find_self, interface_config

    async def main():
        mesh, keys = load_mesh_file(sys.argv[1]), read_key_file(sys.argv[2])
        me = find_self(mesh, keys, sys.argv[2])
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with open_wireguard_go(sys.argv[3], interface_config(mesh, me)) as wg:
                await wg.configure(engine_request(mesh, keys, listen_port=int(sys.argv[4])))
                print("bare ready", flush=True)
                async for _ in signals:
                    return
    trio.run(main)
""")


def _iperf(lab: Any, mesh: Any, seconds: int) -> float:
    server = lab.spawn(
        "b1", ["iperf3", "-s", "-1", "--forceflush", "-B", mesh.overlay("beta")], name="iperf3-server"
    )
    server.wait_for_output("Server listening", timeout=10)
    out = lab.run(
        "a1",
        ["iperf3", "-c", mesh.overlay("beta"), "-t", str(seconds), "-J"],
        timeout=seconds + 30,
    )
    server.wait(timeout=10)
    report = json.loads(out.stdout)
    return float(report["end"]["sum_received"]["bits_per_second"])


def _bare(lab: Any, mesh: Any, seconds: int) -> float:
    bare_mesh = mesh.workdir / "bare.toml"
    text = mesh.mesh_path.read_text()
    for name, (host, _) in mesh.nodes.items():
        line = f'overlay_v4 = "{mesh.overlay(name)}"\n'
        text = text.replace(line, line + f'endpoints = ["{lab.host(host).address}:{BARE_PORT}"]\n')
    bare_mesh.write_text(text)
    procs = []
    for name, (host, _) in mesh.nodes.items():
        argv = [
            sys.executable, "-c", BARE_PROGRAM, str(bare_mesh), str(mesh.key_path(name)),
            f"wb{lab.id}{name[0]}", str(BARE_PORT),
        ]  # fmt: skip
        proc = lab.spawn(host, argv, name=f"bare-{name}", env=ENV)
        procs.append(proc)
    try:
        for proc in procs:
            proc.wait_for_output("bare ready", timeout=20)
        lab.run("a1", ["ping", "-c", "1", "-w", "10", mesh.overlay("beta")], timeout=20)
        return _iperf(lab, mesh, seconds)
    finally:
        for proc in procs:
            proc.stop(timeout=10)


def _udp_errors(lab: Any, host: str) -> dict[str, int]:
    """The namespace's UDP counters that mean a lost datagram (socket buffers full, and so on)."""
    lines = [ln.split() for ln in lab.run(host, ["cat", "/proc/net/snmp"]).stdout.splitlines()]
    names, values = [ln for ln in lines if ln and ln[0] == "Udp:"][:2]
    udp = dict(zip(names[1:], map(int, values[1:]), strict=True))
    return {k: udp.get(k, 0) for k in ("RcvbufErrors", "SndbufErrors", "InErrors")}


def _socket_drops(lab: Any, host: str, labels: dict[int, str]) -> dict[str, int]:
    """Per-socket drop counters (/proc/net/udp's last column) of the host's UDP sockets that have any,
    named by ``labels`` (port → what the socket is)."""
    out: dict[str, int] = {}
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        for line in lab.run(host, ["cat", path]).stdout.splitlines()[1:]:
            fields = line.split()
            port, drops = int(fields[1].rsplit(":", 1)[1], 16), int(fields[-1])
            if drops:
                name = labels.get(port, f"port {port}")
                out[name] = out.get(name, 0) + drops
    return out


def _drops(lab: Any, mesh: Any, before: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Where datagrams were lost during one meshnode run: between the proxies (sent by one node's
    proxy, not delivered to the other's engine), in natlib's counters, and in the kernel's."""
    out: dict[str, Any] = {}
    status = {name: mesh.status(name) for name in mesh.nodes}
    for name, other in (("alpha", "beta"), ("beta", "alpha")):
        sent = status[name]["proxies"][other]["to_peer_packets"]
        delivered = status[other]["proxies"][name]["to_engine_packets"]
        conn = status[other]["conn"]
        host = mesh.nodes[other][0]
        kernel = _udp_errors(lab, host)
        labels = {status[other]["node"]["engine_port"]: "wireguard-go"}
        out[f"{name}->{other}"] = {
            "sent": sent,
            "delivered": delivered,
            "lost": sent - delivered,
            "receive_queue_full": conn["data_dropped_receive_queue_full"],
            "to_engine_dropped": status[other]["proxies"][name]["to_engine_dropped"],
            "udp_send_errors": status[name]["conn"]["udp_send_errors"],
            "via_relay": status[name]["conn"]["paths"]["datagrams_relay"],
            "kernel_udp_errors_at_receiver": {k: v - before[host][k] for k, v in kernel.items()},
            "socket_drops_at_receiver": _socket_drops(lab, host, labels),
        }
    return out


def _meshnode(lab: Any, mesh: Any, seconds: int, want: str, drops: list[dict[str, Any]]) -> float:
    for name in mesh.nodes:
        mesh.start_node(name)
    try:
        mesh.wait_all_online(list(mesh.nodes), timeout=60)
        deadline = time.monotonic() + 30
        while mesh.peer("alpha", "beta")["path"] != want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"path never became {want}: {mesh.peer('alpha', 'beta')}")
            lab.run("a1", ["ping", "-c", "1", "-W", "1", mesh.overlay("beta")], check=False)  # traffic
            time.sleep(0.5)  # polling the daemon's state, with a deadline
        lab.run("a1", ["ping", "-c", "1", "-w", "10", mesh.overlay("beta")], timeout=20)
        before = {host: _udp_errors(lab, host) for host, _ in mesh.nodes.values()}
        bps = _iperf(lab, mesh, seconds)
        drops.append({"path": want, **_drops(lab, mesh, before)})
        return bps
    finally:
        for name in list(mesh.procs):
            mesh.stop_node(name)


def _block_direct_udp(lab: Any, block: bool) -> None:
    for host, other in (("a1", "b1"), ("b1", "a1")):
        if block:
            rules = (
                "table inet tunnelbench {\n  chain out {\n    type filter hook output priority 0;\n"
                f"    ip daddr {lab.host(other).address} meta l4proto udp drop\n  }}\n}}\n"
            )
            lab.run(host, ["nft", "-f", "-"], input=rules)
        else:
            lab.run(host, ["nft", "delete", "table", "inet", "tunnelbench"], check=False)


def run(seconds: int, reps: int) -> dict[str, Any]:
    from client._demo import RELAY_SERVER, MeshLab
    from natlib.testing import Lab, ServerSpec, Topology

    topology = Topology(sites=Topology.parse("a=none,b=none").sites, servers=(ServerSpec(RELAY_SERVER),))
    runs: dict[str, list[float]] = {"bare": [], "direct": [], "relay": []}
    drops: list[dict[str, Any]] = []
    with Lab(topology) as lab:
        mesh = MeshLab(lab, NODES)
        mesh.start_relay()
        mesh.write_files()
        for rep in range(reps):
            runs["bare"].append(_bare(lab, mesh, seconds))
            runs["direct"].append(_meshnode(lab, mesh, seconds, "direct", drops))
            _block_direct_udp(lab, True)
            try:
                runs["relay"].append(_meshnode(lab, mesh, seconds, "relay", drops))
            finally:
                _block_direct_udp(lab, False)
            print(
                f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1] / 1e6:.0f} Mbit/s" for k, v in runs.items()),
                file=sys.stderr,
                flush=True,
            )
        mesh.stop_relay()
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "benchmark": "tunnel",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": seconds,
        "reps": reps,
        "bits_per_second": {k: round(v) for k, v in medians.items()},
        "runs": {k: [round(x) for x in v] for k, v in runs.items()},
        "ratio_to_bare": {k: round(medians[k] / medians["bare"], 3) for k in ("direct", "relay")},
        "goal_direct_ratio": 0.5,
        "goal_met": medians["direct"] / medians["bare"] >= 0.5,
        "drops": drops,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tunnel", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help=f"iperf3 duration per run (1-{MAX_SECONDS})")
    parser.add_argument("--reps", type=int, default=1, help=f"repetitions (1-{MAX_REPS})")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= MAX_SECONDS or not 1 <= args.reps <= MAX_REPS:
        parser.error(f"--seconds must be 1-{MAX_SECONDS} and --reps 1-{MAX_REPS}")
    result = run(args.seconds, args.reps)
    write_results(args.out, f"tunnel-{time.strftime('%Y%m%d-%H%M%S')}.json", "tunnel-latest.json", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
