"""``meshnode demo``: a relay and three nodes behind different NATs, in a throwaway lab (root).

It builds a :mod:`natlib.testing` lab: a relay on a public server host (``python -m relay``, TLS
with a self-signed certificate pinned in the DERPMap, and its STUN server on both of the host's
addresses), node ``alpha`` behind an easy NAT, ``beta`` behind a hard NAT and ``gamma`` behind a
NAT that blocks UDP. It writes the mesh file and the three key files into the lab's directory,
starts ``meshnode up`` in each node's namespace, pings every pair over the overlay, prints each
node's path table, then tears everything down (also on an error or Ctrl-C: the lab stops every
process and deletes every namespace).

The helpers (:class:`MeshLab`) are what tests/netlab/test_meshnode_e2e.py drives, step by step.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import client

from .keyfile import NodeKeys, write_key_file

__all__ = ["DEMO_TOPOLOGY", "NODES", "MeshLab", "echoes_received", "run_demo"]

#: name → (lab host, NAT kind); a node's overlay address follows its position here
NODES: Final = {"alpha": ("a1", "easy"), "beta": ("b1", "hard"), "gamma": ("c1", "udp_blocked")}
DEMO_TOPOLOGY: Final = "a=easy,b=hard,c=udp_blocked"
RELAY_SERVER: Final = "relay"
REGION_ID: Final = 900
STUN_PORT: Final = 3478
_NAT_WORDS: Final = {"easy": "an easy NAT", "hard": "a hard NAT", "udp_blocked": "a NAT that blocks UDP"}
_ROOT: Final = Path(client.__file__).resolve().parents[1]
_ENV: Final = {"PYTHONPATH": str(_ROOT)}


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def echoes_received(ping_output: str) -> int:
    """The ``N received`` of iputils ``ping``'s summary (0 if there is none)."""
    match = re.search(r"^\d+ packets transmitted, (\d+) received", ping_output, re.MULTILINE)
    return int(match.group(1)) if match else 0


class MeshLab:
    """The demo's mesh in a running lab: relay, files, and one ``meshnode up`` per node."""

    def __init__(
        self,
        lab: Any,
        nodes: Mapping[str, tuple[str, str]] = NODES,
        workdir: Path | None = None,
        *,
        verbose: bool = False,
    ) -> None:
        self.lab = lab
        self.verbose = verbose  # ``meshnode up -v``: debug logs, for tests that explain failures
        self.nodes = dict(nodes)  # name → (lab host, NAT kind)
        self.workdir = workdir or lab.workdir / "mesh"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keys = {name: NodeKeys.generate() for name in self.nodes}
        self.procs: dict[str, Any] = {}
        self.relay: Any = None
        self.last_ping = ""  # the last ping_overlay's command and output, for diagnostics

    # --- the relay ------------------------------------------------------------------------------

    def start_relay(self) -> None:
        """Start (or restart) the relay; the first start writes the DERPMap with its cert pin.

        STUN comes from the relay too (port 3478 on every address of the host, each answered from
        the address it was asked on). The DERPMap lists both of the server's addresses: two STUN
        addresses let every node tell whether its NAT's mapping varies by destination, which
        decides its side in birthday probing (hard↔easy direct).
        """
        host = self.lab.host(RELAY_SERVER)
        relay_dir = self.workdir / "relay"
        argv = [
            sys.executable, "-m", "relay", "-a", ":443", "-certmode", "manual",
            "-certdir", str(relay_dir / "certs"), "-hostname", host.ipv4[0],
            "-c", str(relay_dir / "derper.key"), "-stun-port", str(STUN_PORT), "-metrics-addr=off",
        ]  # fmt: skip
        self.relay = self.lab.spawn(RELAY_SERVER, argv, name="relay", env=_ENV)
        node = json.loads(self.relay.wait_for_output(r"^\s*(\{.*sha256-raw:.*\})\s*$", timeout=30).group(1))
        self.relay.wait_for_output(r"serving DERP on", timeout=30)
        self.relay.wait_for_output(r"STUN server listening on UDP", timeout=30)
        derp_map = {
            "Regions": {
                str(REGION_ID): {
                    "RegionID": REGION_ID,
                    "RegionCode": "lab",
                    "RegionName": "lab relay",
                    "Nodes": [
                        {
                            "Name": f"{REGION_ID}a",
                            "RegionID": REGION_ID,
                            "HostName": host.ipv4[0],
                            "IPv4": host.ipv4[0],
                            "CertName": node["CertName"],
                            "STUNPort": STUN_PORT,
                        },
                        *(
                            [
                                {
                                    "Name": f"{REGION_ID}b",
                                    "RegionID": REGION_ID,
                                    "HostName": host.ipv4[1],
                                    "IPv4": host.ipv4[1],
                                    "STUNPort": STUN_PORT,
                                    "STUNOnly": True,
                                }
                            ]
                            if len(host.ipv4) > 1
                            else []
                        ),
                    ],
                }
            }
        }
        (self.workdir / "derpmap.json").write_text(json.dumps(derp_map, indent=2) + "\n")

    def stop_relay(self) -> None:
        """Stop the relay (its DERP and STUN service)."""
        if self.relay is not None:
            self.relay.stop(timeout=10)
            self.relay = None

    # --- files and nodes ------------------------------------------------------------------------

    @property
    def mesh_path(self) -> Path:
        return self.workdir / "mesh.toml"

    def key_path(self, name: str) -> Path:
        return self.workdir / f"{name}.key"

    def control(self, name: str) -> Path:
        return self.workdir / f"{name}.sock"

    def ifname(self, name: str) -> str:
        return f"mn{self.lab.id}{name[0]}"  # the UAPI socket directory is shared by all namespaces

    def overlay(self, name: str) -> str:
        return f"100.64.0.{list(self.nodes).index(name) + 1}"

    def write_files(self) -> None:
        text = '[mesh]\nname = "demo"\n\n[relay_map]\nderpmap = "derpmap.json"\n'
        for name, keys in self.keys.items():
            i = list(self.nodes).index(name) + 1
            text += textwrap.dedent(f"""
                [[node]]
                name = "{name}"
                node_key = "{keys.node_key.public.text()}"
                disco_key = "{keys.disco_key.public.text()}"
                overlay_v4 = "100.64.0.{i}"
                overlay_v6 = "fd7a:115c:a1e0::{i}"
                """)
            write_key_file(self.key_path(name), keys, overwrite=True)
        self.mesh_path.write_text(text)

    def start_node(self, name: str, timeout: float = 60.0) -> None:
        argv = [
            sys.executable, "-m", "client", "up", "-c", str(self.mesh_path), "-k", str(self.key_path(name)),
            "--ifname", self.ifname(name), "--control", str(self.control(name)),
        ]  # fmt: skip
        if self.verbose:
            argv.append("-v")
        proc = self.procs[name] = self.lab.spawn(self.nodes[name][0], argv, name=f"meshnode-{name}", env=_ENV)
        proc.wait_for_output(r"^meshnode up: mesh ", timeout=timeout)

    def stop_node(self, name: str) -> int:
        status: int = self.procs.pop(name).stop(timeout=15)
        return status

    def meshnode(self, name: str, *args: str, check: bool = True, timeout: float = 60.0) -> Any:
        argv = [sys.executable, "-m", "client", *args, "--control", str(self.control(name))]
        return self.lab.run(self.nodes[name][0], argv, env=_ENV, check=check, timeout=timeout)

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.meshnode(name, "status", "--json").stdout)
        return status

    def peer(self, name: str, peer: str) -> dict[str, Any]:
        return next(p for p in self.status(name)["peers"] if p["name"] == peer)

    def ping_overlay(self, name: str, peer: str, count: int = 3, deadline: float = 20.0) -> bool:
        """ICMP over the overlay; True if ``count`` echoes came back within ``deadline`` seconds.

        ``ping -c N -w D`` sends until N replies arrive; replies that arrive together (a slow
        first round trip while a path is set up) can make it more than N, which counts too.
        """
        argv = ["ping", "-c", str(count), "-i", "0.2", "-w", str(int(deadline)), self.overlay(peer)]
        out = self.lab.run(self.nodes[name][0], argv, check=False, timeout=deadline + 10)
        self.last_ping = f"{name}$ {' '.join(argv)}\n{out.stdout}{out.stderr}"
        return echoes_received(out.stdout) >= count

    def wait_all_online(self, names: Sequence[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            for peer in names:
                if peer == name:
                    continue
                while not self.peer(name, peer)["online"]:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{peer} not online at {name} within {timeout} s")
                    time.sleep(0.5)  # polling another process's state, with a deadline

    def diagnostics(self, log_lines: int = 60) -> str:
        """What a failed check needs explained: each node's ``status --json`` and log tail, the relay's."""
        parts = [f"--- last ping: {self.last_ping}"]
        for name in self.nodes:
            proc = self.procs.get(name)
            if proc is None:
                parts.append(f"--- {name}: not running")
                continue
            try:
                out = self.meshnode(name, "status", "--json", check=False, timeout=10)
                parts.append(f"--- {name} status (exit {out.returncode}):\n{out.stdout}{out.stderr}")
            except Exception as e:  # a diagnostic must not hide the failure it explains
                parts.append(f"--- {name} status: {e!r}")
            if shutil.which("wg") is not None:
                wg = self.lab.run(self.nodes[name][0], ["wg", "show", self.ifname(name)], check=False)
                parts.append(f"--- {name} wg show:\n{wg.stdout}{wg.stderr}")
            tail = proc.output().splitlines()[-log_lines:]
            parts.append(f"--- {name} log ({proc.log_path}), last {len(tail)} lines:\n" + "\n".join(tail))
        if self.relay is not None:
            tail = self.relay.output().splitlines()[-log_lines:]
            parts.append("--- relay log, last lines:\n" + "\n".join(tail))
        return "\n".join(parts)

    def up(self) -> None:
        self.start_relay()
        self.write_files()
        for name in self.nodes:
            self.start_node(name)


def run_demo() -> int:
    """The README's demo; returns the exit status (0: every pair pinged, 1: a failure, explained)."""
    from natlib.testing import LabError, missing_tools

    missing = missing_tools() + [t for t in ("wireguard-go",) if shutil.which(t) is None]
    if missing:
        _write(f"meshnode demo: missing tools: {', '.join(missing)} (see .ci/netlab-deps.sh)\n")
        return 1
    try:
        return _run_demo()
    except (LabError, TimeoutError) as e:
        _write(f"meshnode demo: {e}\n")
        return 1


def _run_demo() -> int:
    from natlib.testing import Lab, ServerSpec, Topology

    topology = Topology(sites=Topology.parse(DEMO_TOPOLOGY).sites, servers=(ServerSpec(RELAY_SERVER),))
    failures = 0
    with Lab(topology) as lab:
        mesh = MeshLab(lab)
        _write(f"lab {lab.id}: relay on {lab.host(RELAY_SERVER).address}; ")
        _write(", ".join(f"{n} behind {_NAT_WORDS.get(kind, kind)}" for n, (_, kind) in NODES.items()) + "\n")
        mesh.up()
        _write(f"mesh up (files in {mesh.workdir}); waiting for every peer to answer...\n")
        mesh.wait_all_online(list(NODES))
        for name in NODES:
            for peer in NODES:
                if peer != name:
                    ok = mesh.ping_overlay(name, peer)
                    failures += not ok
                    _write(f"  {name} -> {peer} ({mesh.overlay(peer)}): {'ok' if ok else 'FAILED'}\n")
        for name in NODES:
            _write(f"\n$ meshnode status   # on {name}\n")
            _write(mesh.meshnode(name, "status").stdout)
        _write("\n$ meshnode ping beta   # on alpha\n")
        _write(mesh.meshnode("alpha", "ping", "beta", "--count", "5", check=False).stdout)
        for name in list(mesh.procs):
            mesh.stop_node(name)
        mesh.stop_relay()
    _write("\nlab torn down\n" if not failures else f"\n{failures} pairs failed; lab torn down\n")
    return 0 if not failures else 1
