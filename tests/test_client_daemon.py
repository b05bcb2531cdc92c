"""client.daemon: ``meshnode up``'s lifecycle with the real wireguard-go, natlib replaced.

The configuration helpers are tested directly. The lifecycle runs in the NAT lab: two public hosts
each run :func:`client.daemon.run_daemon` with the real wireguard-go and tests/fakeconn.py's
``UdpConn`` (a static direct path over one UDP socket) in place of natlib's connection, so that
what is under test is the daemon: engine setup, loopback proxies, control socket, keepalive pings,
offline detection, rejoin and clean shutdown. The same with natlib's real connection, a relay and
three NATs is tests/netlab/test_meshnode_e2e.py.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import client
from client._demo import echoes_received
from client.daemon import default_ifname, load_config, overlay_exclusions, relay_derp_map
from client.keyfile import KeyFileError, NodeKeys, write_key_file
from client.meshfile import MeshFileError, parse_mesh_file
from natlib.testing import Lab, LabProcess

ROOT = Path(client.__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": f"{ROOT}:{TESTS}"}
CONN_PORT = 41641

RELAYS = """\
[mesh]
name = "{name}"
[[relay_map.region]]
id = 900
code = "lab"
[[relay_map.region.node]]
host = "relay.lab.test"
ipv4 = "198.51.100.10"
derp_port = 8443
stun_port = -1
insecure_for_tests = true
"""


def node_table(name: str, keys: NodeKeys, index: int) -> str:
    return textwrap.dedent(f"""
        [[node]]
        name = "{name}"
        node_key = "{keys.node_key.public.text()}"
        disco_key = "{keys.disco_key.public.text()}"
        overlay_v4 = "100.64.0.{index}"
        overlay_v6 = "fd7a:115c:a1e0::{index}"
        """)


def test_default_ifname_fits_linux() -> None:
    assert default_ifname("lab") == "mn-lab"
    assert default_ifname("a-very-long-mesh-name") == "mn-a-very-long-"[:15].rstrip("-")
    assert len(default_ifname("x" * 63)) == 15


def test_inline_relay_map_becomes_a_derp_map() -> None:
    keys = NodeKeys.generate()
    mesh = parse_mesh_file(RELAYS.format(name="lab") + node_table("alpha", keys, 1))
    derp_map = relay_derp_map(mesh.relay_map)
    assert list(derp_map.regions) == [900]
    [node] = derp_map.regions[900].nodes
    assert (node.host_name, node.ipv4, node.ipv6) == ("relay.lab.test", "198.51.100.10", "")
    assert (node.derp_port, node.effective_stun_port, node.insecure_for_tests) == (8443, None, True)
    assert derp_map.regions[900].region_code == "lab"


def test_overlay_exclusions_cover_the_interface_and_every_allowed_ip() -> None:
    alpha, beta = NodeKeys.generate(), NodeKeys.generate()
    routed = node_table("beta", beta, 2) + 'subnet_routes = ["10.1.0.0/24"]\n'
    mesh = parse_mesh_file(RELAYS.format(name="lab") + node_table("alpha", alpha, 1) + routed)
    assert overlay_exclusions(mesh, "mn-lab") == {
        "exclude_interfaces": ("mn-lab",),
        "exclude_prefixes": (
            "100.64.0.1/32",
            "fd7a:115c:a1e0::1/128",
            "100.64.0.2/32",
            "fd7a:115c:a1e0::2/128",
            "10.1.0.0/24",
        ),
    }


def test_load_config_names_the_bad_file(tmp_path: Path) -> None:
    keys, stranger = NodeKeys.generate(), NodeKeys.generate()
    (tmp_path / "mesh.toml").write_text(RELAYS.format(name="lab") + node_table("alpha", keys, 1))
    write_key_file(tmp_path / "alpha.key", keys)
    write_key_file(tmp_path / "stranger.key", stranger)
    assert load_config(tmp_path / "mesh.toml", tmp_path / "alpha.key").mesh.name == "lab"
    with pytest.raises(KeyFileError, match=r"stranger\.key:2: node_key: its public key .* is not a node of"):
        load_config(tmp_path / "mesh.toml", tmp_path / "stranger.key")
    (tmp_path / "bad.toml").write_text(RELAYS.format(name="Lab!") + node_table("alpha", keys, 1))
    with pytest.raises(MeshFileError, match=r"bad\.toml:2: mesh\.name: 'Lab!' must be a DNS label"):
        load_config(tmp_path / "bad.toml", tmp_path / "alpha.key")


# --- the lifecycle in the lab -----------------------------------------------------------------------

RUNNER = textwrap.dedent(r"""
    import json, sys
    from pathlib import Path
    import trio
    from fakeconn import udp_conn_factory
    from client.daemon import DaemonOptions, run_daemon
    from natlib.keys import NodePublicKey

    cfg = json.loads(sys.argv[1])
    addresses = {NodePublicKey.from_text(k): (h, p) for k, (h, p) in cfg["addresses"].items()}
    options = DaemonOptions(
        Path(cfg["mesh"]), Path(cfg["key"]), ifname=cfg["ifname"], control_path=Path(cfg["control"]),
        port=cfg["port"],
    )
    def ready(status):
        print(json.dumps({"event": "ready", **status}), flush=True)
    trio.run(lambda: run_daemon(options, open_conn=udp_conn_factory(addresses), on_ready=ready))
    print(json.dumps({"event": "stopped"}), flush=True)
""")


class LabMesh:
    def __init__(self, lab: Lab, tmp_path: Path) -> None:
        self.lab = lab
        self.hosts = {"alpha": "a1", "beta": "b1"}
        self.keys = {name: NodeKeys.generate() for name in self.hosts}
        text = RELAYS.format(name="duo")
        for i, name in enumerate(self.hosts, start=1):
            text += node_table(name, self.keys[name], i)
            write_key_file(tmp_path / f"{name}.key", self.keys[name])
        (tmp_path / "mesh.toml").write_text(text)
        self.tmp_path = tmp_path
        self.procs: dict[str, LabProcess] = {}

    def ifname(self, name: str) -> str:
        return f"mn{self.lab.id}{name[0]}"

    def control(self, name: str) -> Path:
        return self.lab.workdir / f"{name}.sock"

    def start(self, name: str) -> dict[str, Any]:
        addresses = {
            self.keys[other].node_key.public.text(): (self.lab.host(host).address, CONN_PORT)
            for other, host in self.hosts.items()
            if other != name
        }
        cfg = {
            "mesh": str(self.tmp_path / "mesh.toml"),
            "key": str(self.tmp_path / f"{name}.key"),
            "ifname": self.ifname(name),
            "control": str(self.control(name)),
            "port": CONN_PORT,
            "addresses": addresses,
        }
        argv = [sys.executable, "-c", RUNNER, json.dumps(cfg)]
        proc = self.procs[name] = self.lab.spawn(self.hosts[name], argv, name=f"meshnode-{name}", env=ENV)
        proc.wait_for_output(r'"event": "ready"', timeout=30)
        return next(e for e in proc.json_lines() if e.get("event") == "ready")

    def meshnode(self, name: str, *args: str, check: bool = True) -> Any:
        argv = [sys.executable, "-m", "client", *args, "--control", str(self.control(name))]
        return self.lab.run(self.hosts[name], argv, env=ENV, check=check, timeout=60)

    def status(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.meshnode(name, "status", "--json").stdout)
        return result

    def peer_row(self, name: str, peer: str) -> dict[str, Any]:
        return next(p for p in self.status(name)["peers"] if p["name"] == peer)

    def wait_for(self, name: str, peer: str, online: bool, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            row = self.peer_row(name, peer)
            if row["online"] is online:
                return row
            assert time.monotonic() < deadline, f"{peer} never became online={online} for {name}: {row}"
            time.sleep(0.5)  # polling another process's state with a deadline


@pytest.mark.netlab("a=none,b=none", tools=["wireguard-go", "ping"])
def test_daemon_lifecycle_with_wireguard_go(netlab: Lab, tmp_path: Path) -> None:
    mesh = LabMesh(netlab, tmp_path)
    ready = mesh.start("alpha")
    mesh.start("beta")
    assert ready["node"] == {
        "name": "alpha",
        "node_key": mesh.keys["alpha"].node_key.public.text(),
        "overlay": ["100.64.0.1", "fd7a:115c:a1e0::1"],
        "ifname": mesh.ifname("alpha"),
        "engine_port": ready["node"]["engine_port"],
    }
    assert oct(mesh.control("alpha").stat().st_mode & 0o777) == "0o600"

    # Overlay traffic (ICMP on both families, then TCP) through engine → proxy → conn → proxy → engine.
    # (-w: WireGuard's first handshake may need its 5 s retry: alpha's went out before beta was up.)
    for target in ("100.64.0.2", "fd7a:115c:a1e0::2"):
        out = netlab.run("a1", ["ping", "-c", "3", "-i", "0.2", "-w", "15", target], check=False, timeout=30)
        assert echoes_received(out.stdout) >= 3, out.stdout + mesh.procs["alpha"].output()
    server = netlab.spawn(
        "b1",
        [sys.executable, "-c", "import socket;s=socket.create_server(('100.64.0.2',7000));c,_=s.accept();"
         "c.sendall(c.recv(100)[::-1])"],
        name="tcp-echo",
    )  # fmt: skip
    client_code = (
        "import socket,time\nfor _ in range(50):\n  try:\n"
        "    c=socket.create_connection(('100.64.0.2',7000),5)\n    break\n"
        "  except ConnectionRefusedError:\n    time.sleep(0.1)\n"
        "c.sendall(b'overlay');print(c.recv(100).decode())"
    )
    assert netlab.run("a1", [sys.executable, "-c", client_code], timeout=30).stdout.strip() == "yalrevo"
    assert server.wait(timeout=10) == 0

    # status --json: beta online on the direct (fake) path, counters and handshake from the engine.
    row = mesh.wait_for("alpha", "beta", online=True)
    assert row["path"] == "direct"
    assert row["address"] == f"{netlab.host('b1').address}:{CONN_PORT}"
    assert row["overlay"] == ["100.64.0.2", "fd7a:115c:a1e0::2"]
    assert row["rtt_ms"] is not None and row["rtt_ms"] > 0
    deadline = time.monotonic() + 10
    while row["rx_bytes"] == 0 or row["last_handshake"] is None:  # the engine is polled every 2 s
        assert time.monotonic() < deadline, row
        time.sleep(0.5)
        row = mesh.peer_row("alpha", "beta")
    assert row["tx_bytes"] > 0

    table = mesh.meshnode("alpha", "status").stdout.splitlines()
    assert table[0] == (
        f"mesh duo: alpha 100.64.0.1, fd7a:115c:a1e0::1 on {mesh.ifname('alpha')} "
        f"(engine port {ready['node']['engine_port']})"
    )
    assert table[1].split() == ["PEER", "OVERLAY", "IP", "PATH", "RTT", "HANDSHAKE", "RX", "TX"]
    beta_address = f"{netlab.host('b1').address}:{CONN_PORT}"
    assert table[2].split()[:4] == ["beta", "100.64.0.2", "direct", beta_address]

    # meshnode ping: the first pong is direct, so it stops there.
    pings = mesh.meshnode("alpha", "ping", "beta", "--json").stdout.splitlines()
    assert len(pings) == 2, pings
    pong, result = json.loads(pings[0]), json.loads(pings[1])["result"]
    assert (pong["peer"], pong["kind"], pong["seq"]) == ("beta", "direct", 0)
    assert result == {"peer": "beta", "overlay": "100.64.0.2", "sent": 1, "pongs": 1, "direct": True}
    text = mesh.meshnode("alpha", "ping", "100.64.0.2").stdout
    assert text.startswith(f"pong from beta (100.64.0.2) via {netlab.host('b1').address}:{CONN_PORT} in ")
    bad = mesh.meshnode("alpha", "ping", "delta", check=False)
    assert (bad.returncode, bad.stderr) == (1, "meshnode ping: ping: no peer 'delta' in mesh 'duo'\n")

    # Stop beta (SIGTERM): its interface and control socket go; alpha shows it offline.
    assert mesh.procs["beta"].stop(timeout=15) == 0, mesh.procs["beta"].output()
    assert '"event": "stopped"' in mesh.procs["beta"].output()
    assert mesh.ifname("beta") not in netlab.run("b1", ["ip", "-o", "link"]).stdout
    assert not mesh.control("beta").exists()
    row = mesh.wait_for("alpha", "beta", online=False)
    assert row["path"] == "offline"
    assert "offline" in mesh.meshnode("alpha", "status").stdout.splitlines()[2]

    # Start it again: it rejoins, alpha's daemon and interface were never touched.
    alpha_pid = mesh.procs["alpha"].pid
    mesh.start("beta")
    mesh.wait_for("alpha", "beta", online=True)
    ping = ["ping", "-c", "2", "-i", "0.2", "-w", "15", "100.64.0.2"]
    out = netlab.run("a1", ping, check=False, timeout=30)
    assert echoes_received(out.stdout) >= 2, out.stdout
    assert mesh.procs["alpha"].pid == alpha_pid and mesh.procs["alpha"].returncode is None

    # A shutdown request stops alpha cleanly.
    assert json.loads(mesh.meshnode("alpha", "status", "--json").stdout)["peers"][0]["online"] is True
    shutdown = netlab.run(
        "a1",
        [sys.executable, "-c", SHUTDOWN, str(mesh.control("alpha"))],
        env=ENV,
        timeout=30,
    )
    assert shutdown.stdout.strip() == "{'stopping': True}"
    assert mesh.procs["alpha"].wait(timeout=20) == 0
    assert mesh.ifname("alpha") not in netlab.run("a1", ["ip", "-o", "link"]).stdout
    assert not mesh.control("alpha").exists()


SHUTDOWN = textwrap.dedent("""
    import sys, trio
    from pathlib import Path
    from client._control import control_call
    async def main():
        async for reply in control_call(Path(sys.argv[1]), "shutdown"):
            print(dict(reply.data))
    trio.run(main)
""")
