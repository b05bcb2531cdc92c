"""wireguard-go driven by client.engine in the NAT lab: two public hosts, direct endpoints, real traffic.

Each host runs NODE_PROGRAM (below) with this Python inside its namespace: it starts wireguard-go
through :func:`client.engine.open_wireguard_go`, configures it through the UAPI codec with the other
host's public key and direct endpoint (no natlib yet), and then obeys commands on stdin (``stats``,
``stop``), answering with JSON lines. The test pings across the overlay (IPv4 and IPv6), opens a
TCP connection through it, reads the counters back through UAPI ``get`` and checks that a clean
stop removes the interface and the UAPI socket.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import client
from client.keyfile import NodeKeys, write_key_file
from natlib.keys import NodePrivateKey
from natlib.testing import Lab, LabProcess

pytestmark = pytest.mark.netlab("a=none,b=none", tools=["wireguard-go", "ping"])

ENV = {"PYTHONPATH": str(Path(client.__file__).resolve().parents[1])}
SOCKET_DIR = Path("/var/run/wireguard")
LISTEN_PORT = 51820
OVERLAY = {"a1": ("100.64.0.1", "fd7a:115c:a1e0::1"), "b1": ("100.64.0.2", "fd7a:115c:a1e0::2")}

NODE_PROGRAM = textwrap.dedent(r"""
    import ipaddress, json, os, signal, sys
    import trio
    from client.engine import EngineError, InterfaceConfig, open_wireguard_go
    from client.keyfile import read_key_file
    from client.meshfile import load_mesh_file
    from client.uapi import Endpoint, PeerConfig, SetRequest
    from client.wgconfig import engine_request, find_self, interface_config
    from natlib.keys import NodePrivateKey, NodePublicKey

    def say(**event):
        print(json.dumps(event), flush=True)

    def stats_json(stats):
        return [
            {"public_key": p.public_key.hex(), "endpoint": str(p.endpoint),
             "rx": p.rx_bytes, "tx": p.tx_bytes,
             "handshake_sec": p.last_handshake_time_sec, "handshake_nsec": p.last_handshake_time_nsec,
             "allowed_ips": [str(n) for n in p.allowed_ips], "keepalive": p.persistent_keepalive_interval}
            for p in stats.peers
        ]

    def from_mesh_file(cfg):
        # What `meshnode up` will do, minus natlib: mesh file + key file -> interface + UAPI set.
        mesh = load_mesh_file(cfg["mesh"])
        keys = read_key_file(cfg["key"])
        me = find_self(mesh, keys, cfg["key"])
        return interface_config(mesh, me), engine_request(mesh, keys, listen_port=cfg["listen_port"])

    def from_arguments(cfg):
        peer_nets = tuple(ipaddress.ip_network(a) for a in cfg["peer_overlay"])
        interface = InterfaceConfig(
            addresses=tuple(ipaddress.ip_interface(a) for a in cfg["overlay"]), routes=peer_nets
        )
        request = SetRequest(
            private_key=NodePrivateKey.from_hex(cfg["private_key"]), listen_port=cfg["listen_port"],
            replace_peers=True,
            peers=(PeerConfig(
                NodePublicKey.from_hex(cfg["peer_key"]), endpoint=Endpoint.parse(cfg["peer_endpoint"]),
                persistent_keepalive_interval=0, replace_allowed_ips=True, allowed_ips=peer_nets,
            ),),
        )
        return interface, request

    async def serve(cfg):
        interface, request = from_mesh_file(cfg) if "mesh" in cfg else from_arguments(cfg)
        async with open_wireguard_go(cfg["ifname"], interface) as wg:
            await wg.configure(request)
            say(event="ready", pid=wg.pid, socket=str(wg.socket_path))
            stdin = trio.lowlevel.FdStream(os.dup(0))
            pending = b""
            while True:
                while b"\n" not in pending:
                    chunk = await stdin.receive_some()
                    if not chunk:
                        return
                    pending += chunk
                line, _, pending = pending.partition(b"\n")
                command = line.decode().strip()
                if command == "stats":
                    stats = await wg.stats()
                    say(event="stats", listen_port=stats.listen_port, own_key=stats.public_key.hex(),
                        peers=stats_json(stats))
                elif command == "stop":
                    return

    async def main():
        cfg = json.loads(sys.argv[1])
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def on_signal():
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                nursery.start_soon(on_signal)
                try:
                    await serve(cfg)
                except EngineError as e:
                    say(event="engine_error", message=str(e))
                    return 3
                finally:
                    nursery.cancel_scope.cancel()
        say(event="stopped")
        return 0

    sys.exit(trio.run(main))
""")

TCP_SERVER = textwrap.dedent("""
    import socket, sys
    srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("listening", flush=True)
    conn, peer = srv.accept()
    data = b""
    while not data.endswith(b"\\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    conn.sendall(b"echo from " + sys.argv[1].encode() + b": " + data[::-1].strip() + b"\\n")
    conn.close()
    print("served", peer[0], flush=True)
""")

TCP_CLIENT = textwrap.dedent("""
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        s.sendall(b"hello over the overlay\\n")
        reply = b""
        while not reply.endswith(b"\\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    print(reply.decode().strip())
""")


def _ifname(lab: Lab, host: str) -> str:
    return f"mr{lab.id}{host[0]}"  # at most 11 characters; the UAPI socket directory is shared


def _node_config(lab: Lab, host: str, peer: str, keys: dict[str, NodePrivateKey]) -> dict[str, Any]:
    v4, v6 = OVERLAY[host]
    pv4, pv6 = OVERLAY[peer]
    return {
        "ifname": _ifname(lab, host),
        "private_key": keys[host].hex(),
        "listen_port": LISTEN_PORT,
        "overlay": [f"{v4}/32", f"{v6}/128"],
        "peer_overlay": [f"{pv4}/32", f"{pv6}/128"],
        "peer_key": keys[peer].public.hex(),
        "peer_endpoint": f"{lab.host(peer).address}:{LISTEN_PORT}",
    }


def _spawn_node(lab: Lab, host: str, config: dict[str, Any]) -> LabProcess:
    argv = [sys.executable, "-c", NODE_PROGRAM, json.dumps(config)]
    return lab.spawn(host, argv, name="node", stdin=True, env=ENV)


def _start_nodes(lab: Lab) -> dict[str, tuple[LabProcess, NodePrivateKey]]:
    keys = {h: NodePrivateKey.generate() for h in ("a1", "b1")}
    nodes = {}
    for host, peer in (("a1", "b1"), ("b1", "a1")):
        nodes[host] = (_spawn_node(lab, host, _node_config(lab, host, peer, keys)), keys[host])
    for proc, _ in nodes.values():
        proc.wait_for_output(r'"event": "ready"', timeout=20)
    return nodes


def _wireguard_go_pids(lab: Lab, host: str) -> list[int]:
    pids = []
    for pid in lab.run(host, ["ip", "netns", "pids", lab.host(host).netns]).stdout.split():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except FileNotFoundError:
            continue  # gone already (such as the `ip netns pids` process itself)
        if comm == "wireguard-go":
            pids.append(int(pid))
    return pids


def _last_event(proc: LabProcess, event: str) -> dict[str, Any]:
    proc.wait_for_output(rf'"event": "{event}"', timeout=10)
    return [e for e in proc.json_lines() if e.get("event") == event][-1]


def _request_stats(proc: LabProcess) -> dict[str, Any]:
    before = sum(1 for e in proc.json_lines() if e.get("event") == "stats")
    proc.write_line("stats")
    # Wait for one more stats line than there was before the request.
    proc.wait_for_output(rf'"event": "stats"(?:[\s\S]*?"event": "stats"){{{before}}}', timeout=10)
    return [e for e in proc.json_lines() if e.get("event") == "stats"][-1]


def test_two_public_hosts_ping_tcp_stats_and_clean_stop(netlab: Lab) -> None:
    nodes = _start_nodes(netlab)

    # Before any traffic: each engine knows its peer and its endpoint, and has never shaken hands.
    for host, peer in (("a1", "b1"), ("b1", "a1")):
        st = _request_stats(nodes[host][0])
        assert st["listen_port"] == LISTEN_PORT
        assert st["own_key"] == nodes[host][1].public.hex()
        [p] = st["peers"]
        assert p["public_key"] == nodes[peer][1].public.hex()
        assert p["endpoint"] == f"{netlab.host(peer).address}:{LISTEN_PORT}"
        assert p["handshake_sec"] == 0
        assert p["rx"] == 0
        assert sorted(p["allowed_ips"]) == sorted([f"{OVERLAY[peer][0]}/32", f"{OVERLAY[peer][1]}/128"])

    # ICMP both ways, IPv4 and IPv6 overlay addresses.
    for host, peer in (("a1", "b1"), ("b1", "a1")):
        for family, target in (("-4", OVERLAY[peer][0]), ("-6", OVERLAY[peer][1])):
            out = netlab.run(host, ["ping", family, "-c", "3", "-W", "1", target], check=False, timeout=20)
            assert out.returncode == 0, out.stdout + out.stderr
            assert "3 packets transmitted, 3 received" in out.stdout

    # One TCP connection from a1 to b1 through the tunnel.
    server = netlab.spawn(
        "b1", [sys.executable, "-c", TCP_SERVER, OVERLAY["b1"][0], "8080"], name="tcp-server"
    )
    server.wait_for_output("listening")
    reply = netlab.run("a1", [sys.executable, "-c", TCP_CLIENT, OVERLAY["b1"][0], "8080"], timeout=20).stdout
    assert reply.strip() == "echo from 100.64.0.2: yalrevo eht revo olleh"
    server.wait_for_output(r"served 100\.64\.0\.1")  # the server saw a1's overlay address
    assert server.wait(timeout=10) == 0

    # Counters and handshake time, read back through UAPI get.
    for host, peer in (("a1", "b1"), ("b1", "a1")):
        [p] = _request_stats(nodes[host][0])["peers"]
        assert p["public_key"] == nodes[peer][1].public.hex()
        assert p["rx"] > 0
        assert p["tx"] > 0
        assert p["handshake_sec"] > 0

    # Clean stop: a1 is told to stop, b1 gets SIGTERM (its nursery is cancelled, so the engine's
    # context exits by cancellation). Either way the interface, the socket and the process go away.
    nodes["a1"][0].write_line("stop")
    assert nodes["b1"][0].stop(timeout=15) == 0, nodes["b1"][0].output()
    for host in ("a1", "b1"):
        proc = nodes[host][0]
        assert proc.wait(timeout=15) == 0, proc.output()
        assert _last_event(proc, "stopped")
        links = netlab.run(host, ["ip", "-o", "link"]).stdout
        assert _ifname(netlab, host) not in links
        assert not (SOCKET_DIR / f"{_ifname(netlab, host)}.sock").exists()
        assert _wireguard_go_pids(netlab, host) == []


def test_engine_death_is_reported_and_cleaned_up(netlab: Lab) -> None:
    nodes = _start_nodes(netlab)
    proc, _ = nodes["a1"]
    ready = _last_event(proc, "ready")
    links = netlab.run("a1", ["ip", "-o", "link"]).stdout
    assert _ifname(netlab, "a1") in links

    os.kill(ready["pid"], signal.SIGKILL)  # wireguard-go dies under the client's feet

    error = _last_event(proc, "engine_error")
    assert "exited unexpectedly" in error["message"]
    assert str(-signal.SIGKILL) in error["message"]
    assert proc.wait(timeout=15) == 3
    assert _ifname(netlab, "a1") not in netlab.run("a1", ["ip", "-o", "link"]).stdout
    assert not (SOCKET_DIR / f"{_ifname(netlab, 'a1')}.sock").exists()
    # The other node is unaffected and still answers.
    st = _request_stats(nodes["b1"][0])
    assert st["listen_port"] == LISTEN_PORT


def test_start_failures_are_reported_and_leave_nothing_behind(netlab: Lab) -> None:
    keys = {h: NodePrivateKey.generate() for h in ("a1", "b1")}
    ifname = _ifname(netlab, "a1")

    # `ip address add` fails for the second, duplicate address: the engine stops wireguard-go again.
    config = _node_config(netlab, "a1", "b1", keys)
    config["overlay"] = ["100.64.0.1/32", "100.64.0.1/32"]
    proc = _spawn_node(netlab, "a1", config)
    error = _last_event(proc, "engine_error")
    assert error["message"].startswith(f"ip address add 100.64.0.1/32 dev {ifname} failed (2): ")
    assert error["message"].endswith("Error: ipv4: Address already assigned.")
    assert proc.wait(timeout=15) == 3
    assert ifname not in netlab.run("a1", ["ip", "-o", "link"]).stdout
    assert _wireguard_go_pids(netlab, "a1") == []
    assert not (SOCKET_DIR / f"{ifname}.sock").exists()

    # A second engine for an interface that exists is refused before anything starts.
    first = _spawn_node(netlab, "a1", _node_config(netlab, "a1", "b1", keys))
    first.wait_for_output(r'"event": "ready"', timeout=20)
    [engine_pid] = _wireguard_go_pids(netlab, "a1")
    second = _spawn_node(netlab, "a1", _node_config(netlab, "a1", "b1", keys))
    error = _last_event(second, "engine_error")
    assert error["message"] == f"interface {ifname} already exists; pick another name or delete it"
    assert second.wait(timeout=15) == 3
    assert _wireguard_go_pids(netlab, "a1") == [engine_pid]  # the first engine is untouched
    first.write_line("stats")
    first.wait_for_output(r'"event": "stats"', timeout=10)
    first.write_line("stop")
    assert first.wait(timeout=15) == 0
    assert _wireguard_go_pids(netlab, "a1") == []


@pytest.mark.netlab("a=easy:hosts=2", tools=["wireguard-go", "ping"])
def test_two_lan_hosts_from_a_mesh_file_and_key_files(netlab: Lab, tmp_path: Path) -> None:
    hosts = ("a1", "a2")
    names = {"a1": "alpha", "a2": "beta"}
    keys = {h: NodeKeys.generate() for h in hosts}
    mesh_text = textwrap.dedent("""\
        [mesh]
        name = "lan"
        [[relay_map.region]]
        id = 900
        code = "lab"
        [[relay_map.region.node]]
        host = "relay.lab.test"
        """)
    for i, host in enumerate(hosts, start=1):
        write_key_file(tmp_path / f"{host}.key", keys[host])
        mesh_text += textwrap.dedent(f"""
            [[node]]
            name = "{names[host]}"
            node_key = "{keys[host].node_key.public.text()}"
            disco_key = "{keys[host].disco_key.public.text()}"
            overlay_v4 = "100.64.1.{i}"
            overlay_v6 = "fd7a:115c:a1e0::1:{i}"
            endpoints = ["{netlab.host(host).address}:{LISTEN_PORT}"]
            """)
    (tmp_path / "mesh.toml").write_text(mesh_text)
    procs = {}
    for host in hosts:
        config = {
            "ifname": _ifname(netlab, host) + host[1],
            "mesh": str(tmp_path / "mesh.toml"),
            "key": str(tmp_path / f"{host}.key"),
            "listen_port": LISTEN_PORT,
        }
        procs[host] = _spawn_node(netlab, host, config)
    for proc in procs.values():
        proc.wait_for_output(r'"event": "ready"', timeout=20)

    for target in ("100.64.1.2", "fd7a:115c:a1e0::1:2"):
        out = netlab.run("a1", ["ping", "-c", "3", "-W", "1", target], check=False, timeout=20)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "3 packets transmitted, 3 received" in out.stdout
    [peer] = _request_stats(procs["a2"])["peers"]
    assert peer["public_key"] == keys["a1"].node_key.public.hex()
    assert peer["endpoint"] == f"{netlab.host('a1').address}:{LISTEN_PORT}"
    assert peer["rx"] > 0
    assert peer["handshake_sec"] > 0
    assert sorted(peer["allowed_ips"]) == ["100.64.1.1/32", "fd7a:115c:a1e0::1:1/128"]
    for proc in procs.values():
        proc.write_line("stop")
        assert proc.wait(timeout=15) == 0, proc.output()
