"""Regional mesh (spec §6): three relay processes meshed on loopback, clients on different nodes.

Packets between nodes go one hop over the mesh; a node that dies takes its clients with it
(their peers elsewhere hear PeerGone); a restarted node rejoins and traffic flows again.
"""

from __future__ import annotations

import os
import signal
import sys
import urllib.request
from pathlib import Path

import pytest
import trio
from relayproc import RelayProcess, free_ports

from natlib.derp import PeerGone, PeerGoneReason, RecvPacket
from natlib.derphttp import DerpClient, connect
from natlib.keys import NodePrivateKey
from relay._mesh import MeshTarget, parse_mesh_with


def test_parse_mesh_with() -> None:
    assert parse_mesh_with("a.example, b.example:8443/10.0.0.2,[::1]:3340", 443) == [
        MeshTarget("a.example", 443, "a.example", 443),
        MeshTarget("b.example", 8443, "10.0.0.2", 8443),
        MeshTarget("::1", 3340, "::1", 3340),
    ]
    with pytest.raises(ValueError, match="bad -mesh-with entry"):
        parse_mesh_with("host:notaport", 443)


async def _metric(port: int, series: str) -> float:
    """One sample from a relay's /metrics."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    text = await trio.to_thread.run_sync(fetch)
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in the scrape of port {port}")


async def _deliver(sender: DerpClient, receiver: DerpClient, tag: bytes, timeout: float = 15) -> None:
    """Send until one arrives: right after a client connects, the other relays may not know it yet."""
    with trio.fail_after(timeout):
        attempt = 0
        while True:
            attempt += 1
            payload = tag + b"#%d" % attempt
            await sender.send(receiver.local_key, payload)
            with trio.move_on_after(0.2):
                while True:
                    ev = await receiver.receive()
                    if isinstance(ev, RecvPacket) and ev.packet.startswith(tag):
                        assert ev.src == sender.local_key.raw
                        return


async def test_three_relay_processes_mesh_forward_and_recover(tmp_path: Path) -> None:
    ports, metrics_ports = free_ports(3), free_ports(3)
    psk = tmp_path / "mesh.key"
    psk.write_text(os.urandom(32).hex() + "\n")
    mesh_with = ",".join(f"127.0.0.1:{p}" for p in ports)  # includes each node itself
    nodes = [
        RelayProcess(
            [
                "-a",
                f"127.0.0.1:{p}",
                "-c",
                str(tmp_path / f"node{i}.key"),
                "-stun=false",
                "-mesh-psk-file",
                str(psk),
                "-mesh-with",
                mesh_with,
                "-metrics-addr",
                f"127.0.0.1:{metrics_ports[i]}",
            ]
        )
        for i, p in enumerate(ports)
    ]
    clients: list[DerpClient] = []
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            await node.wait_for("mesh: connected to", count=2)
            await node.wait_for("is this relay itself")

        keys = [NodePrivateKey.generate() for _ in range(3)]
        a, b, c = [await connect(f"http://127.0.0.1:{p}/derp", k) for p, k in zip(ports, keys, strict=True)]
        clients += [a, b, c]
        await _deliver(a, b, b"a->b")
        await _deliver(b, a, b"b->a")
        await _deliver(c, a, b"c->a")
        await _deliver(a, c, b"a->c")
        # Each node's /metrics shows the packets it forwarded over the mesh and received from it.
        for mport in metrics_ports:
            out = await _metric(mport, 'meshrelay_packets_forwarded_total{direction="out"}')
            inn = await _metric(mport, 'meshrelay_packets_forwarded_total{direction="in"}')
            assert out >= 1
            assert inn >= 1

        # Node 3 dies: a, who received from c, hears that c is gone from the region.
        nodes[2].stop(signal.SIGKILL)
        with trio.fail_after(10):
            while True:
                ev = await a.receive()
                if isinstance(ev, PeerGone):
                    assert ev == PeerGone(keys[2].public.raw, PeerGoneReason.DISCONNECTED)
                    break
        await c.aclose()

        # Node 3 comes back with its key; the mesh re-forms and c's successor is reachable.
        nodes[2].start()
        await nodes[2].wait_for("mesh: connected to", count=2)
        c2 = await connect(f"http://127.0.0.1:{ports[2]}/derp", keys[2])
        clients.append(c2)
        await _deliver(a, c2, b"a->c again", timeout=20)
        await _deliver(c2, b, b"c->b again", timeout=20)
    finally:
        for cl in clients:
            with trio.CancelScope(shield=True):
                await cl.aclose()
        codes = [node.stop() for node in nodes]
        for i, node in enumerate(nodes):
            sys.stderr.write(f"--- node {i} log ---\n" + "".join(node.lines))
    assert codes[:2] == [0, 0]
