"""Regional mesh (spec §6): three relay processes meshed on loopback, clients on different nodes.

Packets between nodes go one hop over the mesh; a node that dies takes its clients with it
(their peers elsewhere hear PeerGone); a restarted node rejoins and traffic flows again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio

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


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class RelayProcess:
    """One ``python -m relay`` process whose log lines are collected by a reader thread."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.lines = []
        proc = subprocess.Popen(
            self.argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        self.proc = proc

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.lines.append(line)

        threading.Thread(target=pump, daemon=True).start()

    async def wait_for(self, text: str, count: int = 1, timeout: float = 20) -> None:
        with trio.fail_after(timeout):
            while sum(text in line for line in list(self.lines)) < count:
                assert self.proc is not None and self.proc.poll() is None, "".join(self.lines)
                await trio.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return rc


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
    ports, metrics_ports = _free_ports(3), _free_ports(3)
    psk = tmp_path / "mesh.key"
    psk.write_text(os.urandom(32).hex() + "\n")
    mesh_with = ",".join(f"127.0.0.1:{p}" for p in ports)  # includes each node itself
    nodes = [
        RelayProcess(
            [
                sys.executable,
                "-m",
                "relay",
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
