"""Lab helpers for the natlib.conn tests: our relay on the lab server, and a peer program.

The peer program (``python connlab.py peer ARGS``, started with ``Lab.spawn`` inside a lab host)
opens a :func:`natlib.conn.open_conn`, adds the other peer, and then obeys JSON commands on stdin:

* ``{"cmd": "ping"}``: one disco ping (over the relay before any direct path): prints its RTT;
* ``{"cmd": "go", "endpoints": [[ip, port], ...]}``: the peer's endpoints arrive (the control plane's
  job in real life); a sequence-numbered datagram stream starts (``rate`` per second);
* ``{"cmd": "candidates"}``: prints the peer's candidates (ip, port, RTT or null);
* ``{"cmd": "mark"}``: prints ``mark`` with the time since ``go`` (to place a test's events);
* ``{"cmd": "stop"}``: the stream stops; after a drain period it prints the counts and exits.

It prints JSON lines: ``ready`` (with our endpoints), ``ping``, ``path`` (every path event, ``t``
seconds after ``go``), ``done`` (``sent``, ``received``: distinct sequence numbers, ``max_seq``,
``duplicates``, ``max_gap``: the longest wait for a new datagram, and when, ``stats``).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REGION = 900
DERP_PORT = 3340
STUN_PORT = 3478
DATAGRAM_LEN = 64  # sequence number (8 bytes) + padding
_LAB_LOCK = threading.Lock()  # Lab.spawn and LabProcess.stop are not thread-safe (shared state file)


def derp_map_document(lab: Any) -> dict[str, Any]:
    """The lab's relay map: region 900, our relay on the first server's first addresses."""
    server = lab.server()
    v4, v6 = server.ipv4, server.ipv6

    def node(name: str, i: int, stun_only: bool) -> dict[str, Any]:
        return {
            "Name": name,
            "RegionID": REGION,
            "HostName": v4[i],
            "IPv4": v4[i],
            "IPv6": v6[i] if len(v6) > i else "none",
            "DERPPort": DERP_PORT,
            "STUNPort": STUN_PORT,
            "STUNOnly": stun_only,
        }

    # Two STUN addresses (the lab's STUN server answers on both), so a hard NAT shows as one.
    nodes = [node("900a", 0, False), *([node("900b", 1, True)] if len(v4) > 1 else [])]
    return {"Regions": {str(REGION): {"RegionID": REGION, "RegionCode": "lab", "Nodes": nodes}}}


class LabRelay:
    """Our relay (DERP only) plus the lab's STUN server, both on the lab's first server host."""

    def __init__(self, lab: Any) -> None:
        from natlib.testing import start_stun_server

        server = lab.server()
        self.stun = start_stun_server(lab, ports=(STUN_PORT,))
        self.derp = lab.spawn(
            server.name,
            [
                sys.executable, "-m", "relay", "-a", f":{DERP_PORT}", "-http-port", "-1", "-stun=false",
                "-metrics-addr=off", "-workers=1", "-c", str(lab.workdir / "relay-key.json"),
            ],
            name="relay",
        )  # fmt: skip
        self.derp.wait_for_output("serving DERP", timeout=20)

    def stop(self) -> None:
        self.derp.stop()
        self.stun.process.stop()


def start_relay(lab: Any) -> LabRelay:
    """``python -m relay`` (DERP over HTTP on :3340) and STUN on :3478 of both server addresses.

    The relay's own STUN socket is bound to the wildcard address, so it answers queries to the
    server's second address from its first, which STUN clients drop; the lab's STUN server binds
    each address, so two STUN servers tell easy from hard NATs.
    """
    return LabRelay(lab)


@dataclass
class Peer:
    """One peer program in a lab host, with its keys."""

    host: str
    proc: Any
    node_hex: str
    disco_hex: str

    def lines(self, kind: str) -> list[dict[str, Any]]:
        return [x for x in self.proc.json_lines() if x.get("type") == kind]

    def wait_line(self, kind: str, timeout: float, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.lines(kind)
            if len(got) >= count:
                return got[count - 1]
            if self.proc.returncode is not None:
                break
            time.sleep(0.02)
        raise AssertionError(
            f"{self.host}: no {kind!r} line within {timeout} s:\n{self.proc.output()[-3000:]}"
        )

    def send(self, **command: Any) -> None:
        self.proc.write_line(json.dumps(command))


def spawn_pair(
    lab: Any,
    host_a: str,
    host_b: str,
    *,
    rate: float = 100.0,
    backend: str = "trio",
    name: str = "conn",
    debug: bool = False,
) -> tuple[Peer, Peer]:
    """Start the peer program in two hosts, each knowing the other's keys (not its endpoints)."""
    from natlib.keys import DiscoPrivateKey, NodePrivateKey

    keys = [(NodePrivateKey.generate(), DiscoPrivateKey.generate()) for _ in range(2)]
    doc = derp_map_document(lab)
    peers = []
    for i, host in enumerate((host_a, host_b)):
        mine, theirs = keys[i], keys[1 - i]
        args = {
            "backend": backend,
            "node": mine[0].hex(),
            "disco": mine[1].hex(),
            "peer_node": theirs[0].public.hex(),
            "peer_disco": theirs[1].public.hex(),
            "derp_map": doc,
            "rate": rate,
            "debug": debug,
        }
        with _LAB_LOCK:
            proc = lab.spawn(
                host, [sys.executable, str(HERE), "peer", json.dumps(args)], name=name, stdin=True
            )
        peers.append(Peer(host, proc, mine[0].public.hex(), mine[1].public.hex()))
    return peers[0], peers[1]


def stop_peers(*peers: Peer) -> None:
    for peer in peers:
        peer.proc.stop()


def start_stream(a: Peer, b: Peer, timeout: float = 20.0) -> dict[str, float]:
    """Wait for both to be ready, measure the relay RTT with a disco ping, then hand each the other's
    endpoints and start the streams. Returns ``relay_rtt``."""
    ready_a = a.wait_line("ready", timeout)
    ready_b = b.wait_line("ready", timeout)
    a.send(cmd="ping")
    ping = a.wait_line("ping", 10)
    a.send(cmd="go", endpoints=ready_b["endpoints"])
    b.send(cmd="go", endpoints=ready_a["endpoints"])
    return {"relay_rtt": float(ping["rtt"]) if ping.get("rtt") is not None else float("nan")}


def stop_stream(a: Peer, b: Peer, timeout: float = 15.0) -> tuple[dict[str, Any], dict[str, Any]]:
    a.send(cmd="stop")
    b.send(cmd="stop")
    return a.wait_line("done", timeout), b.wait_line("done", timeout)


def first_direct(peer: Peer) -> dict[str, Any] | None:
    for event in peer.lines("path"):
        if event["kind"] == "direct":
            return event
    return None


# -- the peer program ----------------------------------------------------------------------------------


def _peer_main(raw: str) -> None:
    import anyio

    args = json.loads(raw)
    if args.get("debug"):
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)d %(name)s %(message)s")
    anyio.run(_peer, args, backend=args["backend"])


async def _peer(args: dict[str, Any]) -> None:
    import struct

    import anyio

    from natlib.conn import PingTimeoutError, open_conn
    from natlib.derpmap import parse_derp_map
    from natlib.keys import DiscoPrivateKey, DiscoPublicKey, NodePrivateKey, NodePublicKey

    def emit(**fields: Any) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    derp_map = parse_derp_map(json.dumps(args["derp_map"]))
    peer_node = NodePublicKey.from_hex(args["peer_node"])
    peer_disco = DiscoPublicKey.from_hex(args["peer_disco"])
    seq_struct = struct.Struct("!Q")
    received: set[int] = set()
    duplicates = 0
    state: dict[str, Any] = {"t0": None, "sent": 0, "sending": False, "max_gap": 0.0, "max_gap_at": None}
    stop = anyio.Event()
    async with open_conn(
        NodePrivateKey.from_hex(args["node"]),
        DiscoPrivateKey.from_hex(args["disco"]),
        derp_map,
        home_region=REGION,
        derp_tls=False,
        port_mapping=args.get("port_mapping", True),
    ) as conn:
        conn.add_peer(peer_node, peer_disco, REGION)

        async def events() -> None:
            async for _, info in conn.path_events():
                t0 = state["t0"]
                emit(
                    type="path",
                    kind=info.kind,
                    addr=list(info.address) if info.address else None,
                    rtt=info.rtt,
                    t=None if t0 is None else anyio.current_time() - t0,
                )

        async def receive() -> None:
            nonlocal duplicates
            last_new: float | None = None
            while True:
                _, data = await conn.receive()
                if len(data) < seq_struct.size:
                    continue
                (seq,) = seq_struct.unpack_from(data)
                if seq in received:
                    duplicates += 1
                    continue
                received.add(seq)
                now = anyio.current_time()
                # The longest wait for a new datagram while the peer streams: how long traffic stalled.
                if last_new is not None and state["t0"] is not None and now - last_new > state["max_gap"]:
                    state["max_gap"] = now - last_new
                    state["max_gap_at"] = now - state["t0"]
                last_new = now

        async def stream() -> None:
            interval = 1.0 / float(args["rate"])
            next_at = anyio.current_time()
            pad = bytes(DATAGRAM_LEN - seq_struct.size)
            while state["sending"]:
                await conn.send(peer_node, seq_struct.pack(state["sent"]) + pad)
                state["sent"] += 1
                next_at += interval
                await anyio.sleep(max(0.0, next_at - anyio.current_time()))

        async def commands(tg: anyio.abc.TaskGroup) -> None:
            stdin = anyio.wrap_file(sys.stdin)
            async for line in stdin:
                cmd = json.loads(line)
                if cmd["cmd"] == "ping":
                    try:
                        result = await conn.ping(peer_node, timeout=5.0)
                        emit(type="ping", kind=result.kind, rtt=result.rtt)
                    except PingTimeoutError:
                        emit(type="ping", kind=None, rtt=None)
                elif cmd["cmd"] == "go":
                    conn.add_peer(peer_node, peer_disco, REGION, [tuple(e) for e in cmd["endpoints"]])
                    state["t0"] = anyio.current_time()
                    state["sending"] = True
                    tg.start_soon(stream)
                    emit(type="started")
                elif cmd["cmd"] == "candidates":
                    emit(
                        type="candidates",
                        candidates=[[str(c.addr.ip), c.addr.port, c.rtt] for c in conn.candidates(peer_node)],
                    )
                elif cmd["cmd"] == "mark":
                    emit(type="mark", t=anyio.current_time() - state["t0"])
                elif cmd["cmd"] == "stop":
                    state["sending"] = False
                    stop.set()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(events)
            tg.start_soon(receive)
            tg.start_soon(commands, tg)
            await anyio.sleep(0.05)  # let the event iterator subscribe before "ready"
            emit(
                type="ready",
                endpoints=[list(c.address) for c in conn.local_endpoints()],
                port=conn.local_port,
            )
            await stop.wait()
            await anyio.sleep(1.5)  # drain: the other side may still be sending
            emit(
                type="done",
                sent=state["sent"],
                received=len(received),
                max_seq=max(received, default=-1),
                duplicates=duplicates,
                max_gap=state["max_gap"],
                max_gap_at=state["max_gap_at"],
                path=conn.path(peer_node).kind,
                stats=conn.stats(),
            )
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "peer":
        _peer_main(sys.argv[2])
    else:
        sys.exit("usage: connlab.py peer JSON")
