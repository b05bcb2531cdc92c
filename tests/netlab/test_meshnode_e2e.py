"""``meshnode up`` end to end (issue #6 acceptance): natlib's real connection, our relay, three NATs.

alpha behind an easy NAT, beta behind a hard NAT, gamma behind a NAT that blocks UDP, and a relay
on a public server host (client._demo.MeshLab builds it, as ``meshnode demo`` does). Checked:
every pair pings over the overlay (ICMP, and a TCP connection), ``meshnode status --json`` shows
the paths (anything with gamma relayed; alpha↔beta direct, with birthday probing, at an address
outside the overlay: natlib leaves the overlay's addresses out), a stopped node shows offline and rejoins,
a relay restart is survived, and a bad key file gives the one-line error and exit 2.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from client._demo import DEMO_TOPOLOGY, NODES, RELAY_SERVER, MeshLab
from natlib.testing import Lab, ServerSpec, Topology

NETLAB_TOPOLOGY = Topology(sites=Topology.parse(DEMO_TOPOLOGY).sites, servers=(ServerSpec(RELAY_SERVER),))
PAIRS = list(itertools.permutations(NODES, 2))
ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.netlab(NETLAB_TOPOLOGY, tools=["wireguard-go", "ping"]), pytest.mark.slow]

TCP_ECHO = (
    "import socket,sys;s=socket.create_server((sys.argv[1],7000));print('listening',flush=True);"
    "c,_=s.accept();c.sendall(c.recv(100)[::-1])"
)
TCP_CLIENT = (
    "import socket,sys;c=socket.create_connection((sys.argv[1],7000),10);c.sendall(b'overlay');"
    "print(c.recv(100).decode())"
)


@pytest.fixture(scope="module")
def mesh(netlab_module: Lab) -> MeshLab:
    mesh = MeshLab(netlab_module, verbose=True)
    mesh.up()
    mesh.wait_all_online(list(NODES), timeout=60)
    return mesh  # the lab's teardown stops every process


def test_every_pair_pings_over_icmp_and_tcp(mesh: MeshLab) -> None:
    failed = [(a, b) for a, b in PAIRS if not mesh.ping_overlay(a, b)]
    assert failed == [], mesh.diagnostics()
    lab = mesh.lab
    for a, b in PAIRS:
        server = lab.spawn(NODES[b][0], [sys.executable, "-c", TCP_ECHO, mesh.overlay(b)], name=f"echo-{b}")
        server.wait_for_output("listening")
        out = lab.run(NODES[a][0], [sys.executable, "-c", TCP_CLIENT, mesh.overlay(b)], timeout=30)
        assert out.stdout.strip() == "yalrevo", ((a, b), mesh.diagnostics())
        assert server.wait(timeout=10) == 0


OVERLAY_PREFIXES = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd00::/8"))


def _in_overlay(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]"))
    return any(ip in net for net in OVERLAY_PREFIXES)


def test_status_shows_the_paths(mesh: MeshLab) -> None:
    # easy↔hard goes direct with birthday probing (≤ 10 s in > 99.9 % of attempts once traffic flows;
    # ping drives it): the easy side's probes open its address-dependent filter to the hard side's IP,
    # so the hit is either a probe on one of the hard side's sockets or the hard side's own disco
    # ping (then the hard side never needs to start its half). The deadline leaves room for one
    # retry (natlib.birthday.retry_interval: 60 s).
    deadline = time.monotonic() + 80
    while {mesh.peer("alpha", "beta")["path"], mesh.peer("beta", "alpha")["path"]} != {"direct"}:
        assert time.monotonic() < deadline, mesh.diagnostics()
        mesh.ping_overlay("alpha", "beta", count=1)
    for a, b in PAIRS:
        row = mesh.peer(a, b)
        assert row["online"] is True, (a, b, row)
        if "gamma" in (a, b):
            assert row["path"] == "relay", (a, b, row)
            assert row["region"] == 900
        else:
            assert row["path"] == "direct", (a, b, row)
            assert row["region"] is None
            # The NAT's public address: never an overlay address (a tunnel inside the tunnel).
            assert not _in_overlay(row["address"]), (a, b, row)
        assert row["rx_bytes"] > 0 and row["tx_bytes"] > 0
    conns = {name: mesh.status(name)["conn"] for name in NODES}
    assert conns["alpha"]["birthday_started"] + conns["beta"]["birthday_started"] >= 1, conns
    assert conns["gamma"]["birthday_started"] == 0, conns  # no STUN answer: it cannot judge its NAT
    for name, conn in conns.items():
        assert conn["disco_dropped"].get("excluded_source", 0) == 0, (name, conn)


def test_meshnode_ping_through_natlib(mesh: MeshLab) -> None:
    out = mesh.meshnode("alpha", "ping", "gamma", "--count", "3", "--json")
    *pongs, last = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(p["seq"], p["kind"], p["region"]) for p in pongs] == [
        (0, "relay", 900),
        (1, "relay", 900),
        (2, "relay", 900),
    ]
    assert all(p["rtt_ms"] > 0 for p in pongs)
    assert last == {
        "result": {"peer": "gamma", "overlay": "100.64.0.3", "sent": 3, "pongs": 3, "direct": False}
    }
    text = mesh.meshnode("gamma", "ping", "alpha", "--count", "2").stdout.splitlines()
    assert [line.split(" in ")[0] for line in text] == [
        "pong from alpha (100.64.0.1) via relay region 900",
        "pong from alpha (100.64.0.1) via relay region 900",
        "direct connection not established with alpha after 2 pings",
    ]


def test_relay_restart_relayed_pairs_recover(mesh: MeshLab) -> None:
    mesh.stop_relay()
    mesh.start_relay()
    started = time.monotonic()
    # Relayed pairs recover within 10 s of the relay being back (plus ping's own second).
    assert mesh.ping_overlay("alpha", "gamma", count=1, deadline=12), mesh.diagnostics()
    assert mesh.ping_overlay("gamma", "beta", count=1, deadline=12), mesh.diagnostics()
    assert time.monotonic() - started < 25


def test_stopped_node_shows_offline_and_rejoins(mesh: MeshLab) -> None:
    others = {name: mesh.procs[name].pid for name in ("alpha", "gamma")}
    assert mesh.stop_node("beta") == 0
    for name in ("alpha", "gamma"):
        deadline = time.monotonic() + 30
        while mesh.peer(name, "beta")["online"]:
            assert time.monotonic() < deadline
            time.sleep(0.5)  # polling another process's state, with a deadline
        assert mesh.peer(name, "beta")["path"] == "offline"
    assert mesh.ping_overlay("alpha", "gamma", count=1)  # the others are undisturbed
    mesh.start_node("beta")
    mesh.wait_all_online(list(NODES), timeout=60)
    assert mesh.ping_overlay("alpha", "beta"), mesh.diagnostics()
    assert mesh.ping_overlay("gamma", "beta"), mesh.diagnostics()
    # Rejoining touched nobody else: the same daemons, still running.
    assert {name: mesh.procs[name].pid for name in others} == others
    assert all(mesh.procs[name].returncode is None for name in others)


def test_netcheck_with_the_mesh_relays(mesh: MeshLab) -> None:
    reports = {}
    for name, (host, _) in NODES.items():
        argv = [sys.executable, "-m", "client", "netcheck", "-c", str(mesh.mesh_path), "--json"]
        out = mesh.lab.run(host, argv, env={"PYTHONPATH": str(ROOT)}, timeout=60)
        reports[name] = json.loads(out.stdout)
    # netcheck's plan answers this only across regions (one region here); the daemons' gatherers
    # ask both STUN addresses of the region, which is what test_status_shows_the_paths relies on.
    assert (reports["alpha"]["udp"], reports["alpha"]["mapping_varies_by_dest_ip"]) == (True, None)
    assert (reports["beta"]["udp"], reports["beta"]["mapping_varies_by_dest_ip"]) == (True, None)
    assert reports["alpha"]["global_v4"] != reports["beta"]["global_v4"]
    assert reports["gamma"]["udp"] is False
    assert {r["preferred_derp"] for r in reports.values()} == {900}
    text = mesh.lab.run(
        "c1",
        [sys.executable, "-m", "client", "netcheck", "-c", str(mesh.mesh_path)],
        env={"PYTHONPATH": str(ROOT)},
        timeout=60,
    ).stdout
    assert "  * UDP: no\n" in text
    assert "  * Nearest relay: lab (lab relay)\n" in text


def test_bad_key_file_is_one_line_exit_2(mesh: MeshLab, tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text('node_key = "privkey:00"\ndisco_key = "privkey:00"\n')
    bad.chmod(0o600)
    out = mesh.lab.run(
        "a1",
        [sys.executable, "-m", "client", "up", "-c", str(mesh.mesh_path), "-k", str(bad)],
        check=False,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 2
    assert out.stderr == f'meshnode up: {bad}:1: node_key: not a "privkey:<64 hex digits>" key\n'


def test_direct_pair_survives_the_relay(netlab_factory: Callable[[Topology], Lab]) -> None:
    """Two hosts whose UDP can meet (no NAT): natlib goes direct, and stays up without the relay."""
    lab = netlab_factory(
        Topology(sites=Topology.parse("a=none,b=none").sites, servers=(ServerSpec(RELAY_SERVER),))
    )
    mesh = MeshLab(lab, {"alpha": ("a1", "none"), "beta": ("b1", "none")})
    mesh.up()
    mesh.wait_all_online(["alpha", "beta"], timeout=60)
    deadline = time.monotonic() + 30
    while {mesh.peer("alpha", "beta")["path"], mesh.peer("beta", "alpha")["path"]} != {"direct"}:
        assert time.monotonic() < deadline, (mesh.peer("alpha", "beta"), mesh.peer("beta", "alpha"))
        mesh.ping_overlay("alpha", "beta", count=1)  # traffic drives natlib's path discovery
    row = mesh.peer("alpha", "beta")
    assert row["address"] == f"{lab.host('b1').address}:{row['address'].rsplit(':', 1)[1]}"
    assert row["region"] is None
    out = mesh.meshnode("alpha", "ping", "beta", "--json")
    [pong, result] = [json.loads(line) for line in out.stdout.splitlines()]
    assert (pong["kind"], result["result"]["direct"], result["result"]["sent"]) == ("direct", True, 1)

    mesh.stop_relay()
    assert mesh.ping_overlay("alpha", "beta", count=5, deadline=10)
    assert mesh.ping_overlay("beta", "alpha", count=5, deadline=10)
    assert mesh.peer("alpha", "beta")["path"] == "direct"
