"""``-workers N`` (relay/_workers.py): one relay served by several processes.

Real relay processes on loopback: clients land on both workers through the shared port (the
supervisor's per-worker connection gauge proves it) and every pair exchanges packets byte for byte;
a client leaving one worker is announced to the other's clients; a killed worker is restarted and
its clients are reachable again once they reconnect; SIGTERM drains every worker; with another
relay meshed in, clients on all three processes reach each other. The sans-io parts (the hand-over,
link identities, metric merging) and the private endpoint's admission rule are tested in process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from relayproc import RelayProcess, free_ports

from natlib import stun
from natlib.derp import DerpError, PeerGone, PeerGoneReason, RecvPacket, Restarting
from natlib.derphttp import DerpClient, DerpConnectionClosed, connect
from natlib.keys import NodePrivateKey
from relay import RelayServer
from relay._config import _cgroup_cpu_quota, build_flagset, default_workers
from relay._mesh import (
    SIBLING_QUEUE_HIGH,
    SIBLING_RUN,
    SIBLING_RUN_HEADER_LEN,
    SIBLING_RUN_MAX_LEN,
    MeshPeer,
    SiblingLink,
)
from relay._metrics import WorkerMetricsMerger
from relay._queue import QueueEntry
from relay._workers import CRASH_LIMIT, WorkerSpec, WorkerSpecError, link_identity

N_CLIENTS = 16  # both workers get some: P(all on one) = 2 * 2**-16 with SO_REUSEPORT's hash


# -- helpers ---------------------------------------------------------------------------------------


async def _scrape(port: int) -> dict[str, float]:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    text = await trio.to_thread.run_sync(fetch)
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


async def _until_metric(port: int, series: str, want: float, timeout: float = 20) -> dict[str, float]:
    with trio.fail_after(timeout):
        while True:
            m = await _scrape(port)
            if m.get(series) == want:
                return m
            await trio.sleep(0.05)


def _relay_args(tmp_path: Path, port: int, metrics_port: int, *extra: str) -> list[str]:
    return [
        "-a",
        f"127.0.0.1:{port}",
        "-c",
        str(tmp_path / "derper.key"),
        "-stun=false",
        "-metrics-addr",
        f"127.0.0.1:{metrics_port}",
        *extra,
    ]


async def _exchange_all(clients: Sequence[DerpClient], timeout: float = 30) -> int:
    """Every ordered pair exchanges one packet, byte-exact; resend what did not arrive.

    Right after a client connects, the other worker may not have heard of it yet, so a round can
    miss pairs; those are sent again until all arrived or the deadline. Returns the rounds used.
    """
    n = len(clients)
    missing = {(i, j) for i in range(n) for j in range(n) if i != j}
    index = {c.local_key.raw: i for i, c in enumerate(clients)}
    rounds = 0
    with trio.fail_after(timeout):
        while missing:
            rounds += 1
            for i, j in sorted(missing):
                payload = b"pkt %d->%d round %d " % (i, j, rounds) + bytes(range(i, i + 40))
                await clients[i].send(clients[j].local_key, payload)

            async def drain(j: int) -> None:
                with trio.move_on_after(0.5):
                    while True:
                        ev = await clients[j].receive()
                        if not isinstance(ev, RecvPacket):
                            continue
                        i = index[ev.src]
                        m = re.fullmatch(rb"pkt (\d+)->(\d+) round (\d+) ", ev.packet[:-40])
                        assert m is not None, ev.packet
                        assert (int(m[1]), int(m[2])) == (i, j)
                        assert ev.packet[-40:] == bytes(range(i, i + 40))
                        missing.discard((i, j))

            async with trio.open_nursery() as nursery:
                for j in range(n):
                    nursery.start_soon(drain, j)
    return rounds


async def _connect_on_worker(
    url: str, metrics_port: int, worker: str, tries: int = 40
) -> tuple[DerpClient, list[DerpClient]]:
    """Connect clients one at a time until one lands on ``worker`` (seen in the per-worker gauge).

    Returns it and the clients that landed elsewhere (still connected)."""
    others: list[DerpClient] = []
    series = f'meshrelay_worker_current_connections{{worker="{worker}"}}'
    for _ in range(tries):
        before = (await _scrape(metrics_port)).get(series, 0.0)
        total = (await _scrape(metrics_port))["meshrelay_current_connections"]
        c = await connect(url, NodePrivateKey.generate())
        m = await _until_metric(metrics_port, "meshrelay_current_connections", total + 1)
        if m.get(series, 0.0) == before + 1:
            return c, others
        others.append(c)
    raise AssertionError(f"no client landed on worker {worker} in {tries} tries")


async def _close_all(clients: Sequence[DerpClient]) -> None:
    with trio.CancelScope(shield=True):
        for c in clients:
            await c.aclose()


async def _until_closed(client: DerpClient) -> None:
    """Read until the relay closes the connection (anything else fails the test)."""
    try:
        while True:
            await client.receive()
    except DerpConnectionClosed:
        return


def _pids(relay: RelayProcess, worker: int) -> list[int]:
    return [
        int(m[1]) for line in relay.lines if (m := re.search(rf"worker {worker} started \(pid (\d+)\)", line))
    ]


# -- sans-io pieces --------------------------------------------------------------------------------


def test_worker_spec_round_trip_and_errors() -> None:
    key = NodePrivateKey.generate()
    spec = WorkerSpec(
        index=1,
        count=3,
        private_key=key,
        link_secret=b"\x07" * 32,
        derp_fds=(5, 6),
        http_fds=(),
        stun_fds=(7,),
        link_fd=8,
        metrics_fd=None,
        sibling_ports={0: 40001, 2: 40003},
    )
    back = WorkerSpec.from_json(spec.to_json())
    assert back.private_key.raw == key.raw
    assert (back.index, back.count, back.derp_fds, back.stun_fds, back.link_fd) == (1, 3, (5, 6), (7,), 8)
    assert back.sibling_ports == {0: 40001, 2: 40003} and back.metrics_fd is None
    links = list(back.siblings())
    assert [(link.index, link.port) for link in links] == [(0, 40001), (2, 40003)]
    assert all(
        link.identity.raw == link_identity(key, 1).raw and link.secret == b"\x07" * 32 for link in links
    )
    with pytest.raises(WorkerSpecError, match="bad worker hand-over"):
        WorkerSpec.from_json(b'{"index": 1}')
    with pytest.raises(WorkerSpecError, match="bad worker hand-over"):
        WorkerSpec.from_json(b"not json")


def test_link_identity_is_per_worker_and_never_the_server_key() -> None:
    key = NodePrivateKey.generate()
    ids = [link_identity(key, i).public.raw for i in range(4)]
    assert len(set(ids)) == 4
    assert key.public.raw not in ids
    assert link_identity(key, 2).raw == link_identity(key, 2).raw  # stable across restarts
    assert link_identity(NodePrivateKey.generate(), 2).raw != link_identity(key, 2).raw


def _expo(accepts: float, conns: float, peers_up: float, queue_s: float) -> str:
    return (
        "# HELP meshrelay_accepts_total a\n# TYPE meshrelay_accepts_total counter\n"
        f"meshrelay_accepts_total {accepts}\n"
        "# HELP meshrelay_current_connections c\n# TYPE meshrelay_current_connections gauge\n"
        f"meshrelay_current_connections {conns}\n"
        "# HELP meshrelay_mesh_peers_up m\n# TYPE meshrelay_mesh_peers_up gauge\n"
        f"meshrelay_mesh_peers_up {peers_up}\n"
        "# HELP meshrelay_average_queue_duration_seconds q\n"
        "# TYPE meshrelay_average_queue_duration_seconds gauge\n"
        f"meshrelay_average_queue_duration_seconds {queue_s}\n"
    )


def _merged(m: WorkerMetricsMerger) -> dict[str, float]:
    return {s.name: s.value for fam in m.collect() for s in fam.samples}


def test_metrics_merger_sums_counters_across_restarts_and_applies_gauge_rules() -> None:
    m = WorkerMetricsMerger()
    m.update({0: (100, _expo(5, 3, 2, 0.002)), 1: (101, _expo(7, 4, 1, 0.004))})
    assert _merged(m) == {
        "meshrelay_accepts_total": 12,
        "meshrelay_current_connections": 7,
        "meshrelay_mesh_peers_up": 1,  # the worst worker
        "meshrelay_average_queue_duration_seconds": pytest.approx(0.003),
    }
    assert m.worker_connections == {0: 3, 1: 4}
    # Worker 1 does not answer: its last counters stay, its gauges go.
    m.update({0: (100, _expo(6, 3, 2, 0.002)), 1: (101, None)})
    got = _merged(m)
    assert got["meshrelay_accepts_total"] == 13 and got["meshrelay_current_connections"] == 3
    assert m.worker_connections == {0: 3}
    # Worker 1 was restarted (new pid): the old process's 7 accepts are kept, the new one counts on.
    m.update({0: (100, _expo(6, 3, 2, 0.002)), 1: (202, _expo(1, 1, 2, 0.0))})
    got = _merged(m)
    assert got["meshrelay_accepts_total"] == 6 + 7 + 1
    assert got["meshrelay_current_connections"] == 4 and got["meshrelay_mesh_peers_up"] == 2
    m.update({0: (100, "garbage {{{"), 1: (202, _expo(2, 1, 2, 0.0))})
    assert _merged(m)["meshrelay_accepts_total"] == 7 + 2  # an unreadable scrape is skipped


def test_workers_flag_default_and_help() -> None:
    fs = build_flagset()
    values, _ = fs.parse([])
    assert values["workers"] == default_workers()
    assert 1 <= default_workers() <= len(os.sched_getaffinity(0))
    usage = fs.usage()
    assert "  -workers int\n" in usage
    assert f"(default {default_workers()})" in usage.split("  -workers int\n", 1)[1].split("\n  -", 1)[0]
    assert "internal-worker" not in usage


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "-workers 0: want 1 to 256 relay processes"),
        ("-3", "-workers -3: want 1 to 256 relay processes"),
        ("100000", "-workers 100000: want 1 to 256 relay processes"),
        ("two", 'invalid value "two" for flag -workers: parse error'),
        ("", 'invalid value "" for flag -workers: parse error'),
    ],
)
def test_bad_workers_values_exit_2(value: str, message: str) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "relay", "-dev", f"-workers={value}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 2
    assert p.stderr.splitlines()[0] == (message if "invalid" in message else f"meshrelay: {message}")


def test_internal_worker_flag_without_supervisor_is_a_clear_error() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "relay", "-dev", "-internal-worker"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 2
    assert "set by the -workers supervisor" in p.stderr


async def test_private_endpoint_admits_sibling_links_only() -> None:
    key = NodePrivateKey.generate()
    secret = os.urandom(32)
    server = RelayServer(key, mesh_key=os.urandom(32), sibling_secret=secret)
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/derp"
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: server.serve_sockets([sock], sibling_listener=True, task_status=task_status)
        )
        # An ordinary client, and one with the regional mesh key: refused, no ServerInfo.
        for mesh_key in (None, server.mesh_key):
            with pytest.raises((DerpError, OSError, trio.BrokenResourceError)):
                await connect(url, NodePrivateKey.generate(), mesh_key=mesh_key)
        assert server.stats.rejected_clients["not_a_sibling"] == 2
        # A sibling: admitted as a link, not as a client; it watches this worker's clients.
        link = await connect(url, link_identity(key, 1), mesh_key=secret)
        assert link.server_key == key.public
        assert server.stats.current_connections == 0 and server.stats.accepts == 0
        await link.watch_conns()
        with trio.fail_after(5):
            while not server.table.sibling_watchers:
                await trio.sleep(0.01)
        assert server.table.watchers == set() and server.stats.watchers == 0
        await link.aclose()
        nursery.cancel_scope.cancel()


# -- real processes --------------------------------------------------------------------------------


async def test_two_workers_all_pairs_and_peer_gone(tmp_path: Path) -> None:
    port, mport = free_ports(2)
    relay = RelayProcess(_relay_args(tmp_path, port, mport, "-workers", "2"))
    relay.start()
    clients: list[DerpClient] = []
    try:
        await relay.wait_for("all 2 workers ready")
        await _until_metric(mport, "meshrelay_worker_links_up", 2)
        url = f"http://127.0.0.1:{port}/derp"
        for _ in range(N_CLIENTS):
            clients.append(await connect(url, NodePrivateKey.generate()))
        m = await _until_metric(mport, "meshrelay_current_connections", N_CLIENTS)
        on0 = m['meshrelay_worker_current_connections{worker="0"}']
        on1 = m['meshrelay_worker_current_connections{worker="1"}']
        assert on0 + on1 == N_CLIENTS and on0 > 0 and on1 > 0, m
        assert m['meshrelay_clients{location="local"}'] == N_CLIENTS
        assert m['meshrelay_clients{location="remote"}'] == 0

        await _exchange_all(clients)
        m = await _scrape(mport)
        # Cross-worker packets went over the links, one hop each, and nothing counts as regional mesh.
        assert m['meshrelay_worker_forwarded_packets_total{direction="out"}'] >= on0 * on1 * 2
        assert (
            m['meshrelay_worker_forwarded_packets_total{direction="in"}']
            == m['meshrelay_worker_forwarded_packets_total{direction="out"}']
        )
        assert m['meshrelay_packets_forwarded_total{direction="out"}'] == 0
        assert m["meshrelay_accepts_total"] == N_CLIENTS  # links are not counted as clients

        # PeerGone across workers: a client on worker 1 leaves; one on worker 0 that heard from it
        # is told it is gone.
        await _close_all(clients)
        clients.clear()
        a, extra = await _connect_on_worker(url, mport, "0")
        clients += [a, *extra]
        b, extra = await _connect_on_worker(url, mport, "1")
        clients += [b, *extra]
        before = (await _scrape(mport))['meshrelay_worker_forwarded_packets_total{direction="out"}']
        await _exchange_all([a, b])
        after = (await _scrape(mport))['meshrelay_worker_forwarded_packets_total{direction="out"}']
        assert after >= before + 2
        # A disco packet (its own queue, sent one by one) crosses too, byte for byte.
        disco = "TS💬".encode() + os.urandom(32 + 24) + b"sealed box"
        await a.send(b.local_key, disco)
        with trio.fail_after(10):
            while not isinstance(ev := await b.receive(), RecvPacket):
                pass
        assert (ev.src, ev.packet) == (a.local_key.raw, disco)
        await b.aclose()
        with trio.fail_after(10):
            while True:
                ev = await a.receive()
                if isinstance(ev, PeerGone):
                    assert ev == PeerGone(b.local_key.raw, PeerGoneReason.DISCONNECTED)
                    break
    finally:
        await _close_all(clients)
        rc = relay.stop()
        sys.stderr.write("--- relay log ---\n" + "".join(relay.lines))
    assert rc == 0


async def test_killed_worker_is_restarted_and_reachable_again(tmp_path: Path) -> None:
    port, mport = free_ports(2)
    relay = RelayProcess(_relay_args(tmp_path, port, mport, "-workers", "2"))
    relay.start()
    clients: list[DerpClient] = []
    try:
        await relay.wait_for("all 2 workers ready")
        url = f"http://127.0.0.1:{port}/derp"
        a, extra = await _connect_on_worker(url, mport, "0")
        clients += [a, *extra]
        b, extra = await _connect_on_worker(url, mport, "1")
        clients += [b, *extra]
        await _exchange_all([a, b])

        (old_pid,) = _pids(relay, 1)
        os.kill(old_pid, signal.SIGKILL)
        line = await relay.wait_for("worker 1 started (pid", count=2)
        assert f"worker 1 (pid {old_pid}): killed by SIGKILL" in await relay.wait_for("killed by SIGKILL")
        new_pid = _pids(relay, 1)[1]
        assert new_pid != old_pid, line
        await relay.wait_for(f"worker 1 (pid {new_pid}) ready")
        # a heard from b, whose worker died: it is told b is gone.
        with trio.fail_after(10):
            while not isinstance(ev := await a.receive(), PeerGone):
                pass
        assert ev == PeerGone(b.local_key.raw, PeerGoneReason.DISCONNECTED)
        await _until_metric(mport, "meshrelay_worker_links_up", 2)
        m = await _until_metric(mport, "meshrelay_workers", 2)
        assert m["meshrelay_worker_restarts_total"] == 1

        # Clients that connect again are reachable, including those on the restarted worker.
        b2, extra = await _connect_on_worker(url, mport, "1")
        clients += [b2, *extra]
        await _exchange_all([a, b2, *extra])
    finally:
        await _close_all(clients)
        rc = relay.stop()
        sys.stderr.write("--- relay log ---\n" + "".join(relay.lines))
    assert rc == 0


async def test_sigterm_drains_every_worker_and_exits_0(tmp_path: Path) -> None:
    port, mport = free_ports(2)
    relay = RelayProcess(
        _relay_args(
            tmp_path, port, mport, "-workers", "2", "-shutdown-grace", "5s", "-restart-reconnect-in", "250ms"
        )
    )
    relay.start()
    clients: list[DerpClient] = []
    try:
        await relay.wait_for("all 2 workers ready")
        url = f"http://127.0.0.1:{port}/derp"
        a, extra = await _connect_on_worker(url, mport, "0")
        clients += [a, *extra]
        b, extra = await _connect_on_worker(url, mport, "1")
        clients += [b, *extra]
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        # Every client, on either worker, is told to come back in 250 ms; then they leave.
        for c in clients:
            with trio.fail_after(10):
                while not isinstance(ev := await c.receive(), Restarting):
                    pass
            assert ev.reconnect_in_ms == 250
            await c.aclose()
        rc = await trio.to_thread.run_sync(relay.stop)
    finally:
        await _close_all(clients)
        relay.stop()
        sys.stderr.write("--- relay log ---\n" + "".join(relay.lines))
    assert rc == 0
    told = [line for line in relay.lines if "received SIGTERM: told" in line]
    assert len(told) == 2 and {"[worker 0]" in t for t in told} == {True, False}
    assert any("all 2 workers stopped" in line for line in relay.lines)
    assert not any("drained: 1 connections left" in line for line in relay.lines)


async def test_workers_with_an_external_relay_all_exchange(tmp_path: Path) -> None:
    port_w, port_x, mport_w, mport_x = free_ports(4)
    psk = tmp_path / "mesh.key"
    psk.write_text(os.urandom(32).hex() + "\n")
    mesh_with = f"127.0.0.1:{port_w},127.0.0.1:{port_x}"
    common = ["-mesh-psk-file", str(psk), "-mesh-with", mesh_with]
    (tmp_path / "w").mkdir()
    (tmp_path / "x").mkdir()
    w = RelayProcess(_relay_args(tmp_path / "w", port_w, mport_w, "-workers", "2", *common))
    x = RelayProcess(_relay_args(tmp_path / "x", port_x, mport_x, "-workers", "1", *common))
    clients: list[DerpClient] = []
    try:
        w.start()
        x.start()
        await w.wait_for("all 2 workers ready")
        # Each worker dials the other relay itself; the entry naming this relay is recognised as
        # itself by whichever worker answers.
        await w.wait_for("mesh: connected to", count=2)
        await w.wait_for("is this relay itself", count=2)
        await x.wait_for("mesh: connected to")
        await x.wait_for("is this relay itself")
        await _until_metric(mport_w, "meshrelay_mesh_peers_up", 1)  # (the worst worker's count)

        url_w, url_x = f"http://127.0.0.1:{port_w}/derp", f"http://127.0.0.1:{port_x}/derp"
        on_w: list[DerpClient] = []
        for _ in range(12):
            on_w.append(await connect(url_w, NodePrivateKey.generate()))
        on_x = [await connect(url_x, NodePrivateKey.generate()) for _ in range(2)]
        clients += on_w + on_x
        # (x's mesh connection counts as a connection, as in derper)
        m = await _until_metric(mport_w, "meshrelay_current_connections", 12 + 1)
        assert m['meshrelay_worker_current_connections{worker="0"}'] > 0, m
        assert m['meshrelay_worker_current_connections{worker="1"}'] > 0, m
        # x learns all twelve through the one worker its watcher landed on.
        await _until_metric(mport_x, 'meshrelay_clients{location="remote"}', 12)
        await _until_metric(mport_w, 'meshrelay_clients{location="remote"}', 2)

        await _exchange_all(clients)
        mx, mw = await _scrape(mport_x), await _scrape(mport_w)
        # x → w: 2 × 12 packets (at least) arrive as ForwardPackets at one worker, and the half or
        # so for the other worker's clients take one loopback hop there.
        assert mx['meshrelay_packets_forwarded_total{direction="out"}'] >= 20
        assert mw['meshrelay_packets_forwarded_total{direction="in"}'] >= 20
        assert mw['meshrelay_packets_forwarded_total{direction="out"}'] >= 20  # each worker dials x itself
        assert mw['meshrelay_worker_forwarded_packets_total{direction="in"}'] >= 1
        assert mw['meshrelay_packets_dropped_total{kind="other",reason="unknown_dest_on_fwd"}'] == 0

        # ClosePeer from another relay of the region (here a mesh client of our own) closes clients
        # on whichever worker they are: the worker it lands on passes it on to its siblings.
        admin = await connect(
            url_w, NodePrivateKey.generate(), mesh_key=bytes.fromhex(psk.read_text().strip())
        )
        clients.append(admin)
        for c in on_w[4:]:
            await admin.close_peer(c.local_key)
        for c in on_w[4:]:
            with trio.fail_after(10):
                await _until_closed(c)
        await _until_metric(mport_w, "meshrelay_current_connections", 4 + 2)  # + x's link, + admin

        # A client of w leaving is announced to x's clients that heard from it.
        gone = on_w[0]
        await gone.aclose()
        closed = {c.local_key.raw for c in on_w[4:]}
        for c in on_x:
            with trio.fail_after(10):
                while not isinstance(ev := await c.receive(), PeerGone) or ev.key in closed:
                    pass
            assert ev == PeerGone(gone.local_key.raw, PeerGoneReason.DISCONNECTED)
    finally:
        await _close_all(clients)
        codes = [w.stop(), x.stop()]
        sys.stderr.write("--- w log ---\n" + "".join(w.lines) + "--- x log ---\n" + "".join(x.lines))
    assert codes == [0, 0]


async def test_worker_that_keeps_crashing_stops_the_relay_with_exit_1(tmp_path: Path) -> None:
    port, mport = free_ports(2)
    relay = RelayProcess(_relay_args(tmp_path, port, mport, "-workers", "2"))
    relay.start()
    try:
        await relay.wait_for("all 2 workers ready")
        for n in range(1, CRASH_LIMIT + 1):
            await relay.wait_for("worker 1 started (pid", count=n)
            os.kill(_pids(relay, 1)[n - 1], signal.SIGKILL)
        assert relay.proc is not None
        with trio.fail_after(30):
            while relay.proc.poll() is None:
                await trio.sleep(0.05)
        rc = relay.stop()
    finally:
        relay.stop()
        sys.stderr.write("--- relay log ---\n" + "".join(relay.lines))
    assert rc == 1
    assert relay.lines[-1] == (
        f"meshrelay: worker 1 keeps crashing ({CRASH_LIMIT} exits within 60s, last: killed by SIGKILL)\n"
    )
    restarts = [line for line in relay.lines if "restarting it in" in line]
    assert [line.rsplit(" ", 1)[1] for line in restarts] == ["0.25s\n", "0.5s\n", "1s\n", "2s\n"]


async def test_workers_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    port, mport = free_ports(2)
    relay = RelayProcess(_relay_args(tmp_path, port, mport, "-workers", "2"))
    relay.start()
    try:
        await relay.wait_for("all 2 workers ready")
        pids = [_pids(relay, 0)[0], _pids(relay, 1)[0]]
        assert relay.proc is not None
        relay.proc.kill()
        with trio.fail_after(20):
            for pid in pids:
                while _proc_state(pid) not in ("gone", "Z"):  # (a zombie has exited)
                    await trio.sleep(0.05)
        # (the workers still hold the log pipe: their last lines arrive after the supervisor's death)
        with trio.fail_after(5):
            while sum("supervisor is gone; shutting down" in line for line in list(relay.lines)) < 2:
                await trio.sleep(0.02)
    finally:
        relay.stop()


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


async def test_stun_is_answered_on_the_shared_port_with_workers(tmp_path: Path) -> None:
    port, mport = free_ports(2)
    args = _relay_args(tmp_path, port, mport, "-workers", "2")
    args[args.index("-stun=false")] = "-stun-port=0"
    relay = RelayProcess(args)
    relay.start()
    try:
        line = await relay.wait_for("STUN server listening on UDP 127.0.0.1:")
        stun_port = int(re.search(r"127\.0\.0\.1:(\d+) \(every worker\)", line)[1])  # type: ignore[index]
        await relay.wait_for("all 2 workers ready")
        n = 24  # from as many source ports: SO_REUSEPORT hashes them over both workers
        for _ in range(n):
            with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as s:
                await s.bind(("127.0.0.1", 0))
                txid = stun.new_transaction_id()
                with trio.fail_after(5):
                    await s.sendto(stun.tailscale_binding_request(txid), ("127.0.0.1", stun_port))
                    data = await s.recv(2048)
                assert stun.parse_binding_response(data, txid) == s.getsockname()
        m = await _scrape(mport)
        assert m['meshrelay_stun_requests_total{disposition="success"}'] == n
        assert m['meshrelay_stun_binding_requests_total{family="ipv4"}'] == n
    finally:
        rc = relay.stop()
    assert rc == 0, "".join(relay.lines)


async def test_sibling_runs_are_chunked_and_a_backlog_pauses_the_feeders() -> None:
    server = RelayServer(NodePrivateKey.generate(), sibling_secret=b"s" * 32)
    link = SiblingLink(1, 1, link_identity(server.private_key, 0), b"s" * 32)
    peer = MeshPeer.to_sibling(server, link)
    peer.connected = True  # (as if the link were up; nothing is written in this test)
    src, dst = b"S" * 32, b"D" * 32
    frame = b"\x05" + (32 + 100).to_bytes(4, "big") + src + b"p" * 100  # a RecvPacket, 137 bytes
    count = 1000
    peer.forward_run(dst, QueueEntry(frame * count, count, 100 * count, src, 0.0))
    runs = list(peer._runs)
    per_chunk = (SIBLING_RUN_MAX_LEN - SIBLING_RUN_HEADER_LEN) // len(frame)
    assert [n for _f, n, _b in runs] == [per_chunk] * (count // per_chunk) + [count % per_chunk]
    for data, n, nbytes in runs:
        assert len(data) <= SIBLING_RUN_MAX_LEN + 5 and nbytes == 100 * n
        assert data[0] == SIBLING_RUN and int.from_bytes(data[1:5], "big") == len(data) - 5
        assert data[5:37] == dst and data[37:69] == src
        assert (int.from_bytes(data[69:73], "big"), int.from_bytes(data[73:77], "big")) == (n, 100 * n)
        assert data[77:] == frame * n
    assert peer.drained.is_set()  # 137 kB waiting: under the high mark
    while peer._run_bytes <= SIBLING_QUEUE_HIGH:
        peer.forward_run(dst, QueueEntry(frame * count, count, 100 * count, src, 0.0))
    assert not peer.drained.is_set()  # feeders of this link now wait
    queued = sum(n for _f, n, _b in peer._runs)
    peer._forget_all()  # the link broke: what waited is dropped, and the feeders go on
    assert peer.drained.is_set()
    assert server.stats.packets_dropped[("gone_disconnected", "other")] == queued
    peer.connected = False
    peer.forward_run(dst, QueueEntry(frame, 1, 100, src, 0.0))
    assert server.stats.packets_dropped[("unknown_dest", "other")] == 1


async def test_sighup_reloads_every_worker(tmp_path: Path) -> None:
    port, mport = free_ports(2)
    allowed, newcomer = NodePrivateKey.generate(), NodePrivateKey.generate()
    allow = tmp_path / "allow.txt"
    allow.write_text(allowed.public.text() + "\n")
    relay = RelayProcess(_relay_args(tmp_path, port, mport, "-workers", "2", "-allow-file", str(allow)))
    relay.start()
    clients: list[DerpClient] = []
    try:
        await relay.wait_for("all 2 workers ready")
        url = f"http://127.0.0.1:{port}/derp"
        with pytest.raises((DerpError, OSError, trio.BrokenResourceError)):
            await connect(url, newcomer)
        allow.write_text(allowed.public.text() + "\n" + newcomer.public.text() + "\n")
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGHUP)
        await relay.wait_for("received SIGHUP: passing it to 2 workers")
        await relay.wait_for(f"reloaded allow file {allow}: 2 node keys", count=2)
        # Wherever they land (8 connections: both workers, but for 2**-7), both keys are admitted.
        for key in [allowed, newcomer] * 4:
            clients.append(await connect(url, key))
        m = await _until_metric(mport, "meshrelay_current_connections", 8)
        assert m['meshrelay_client_rejections_total{reason="not_in_allow_file"}'] == 1, m
    finally:
        await _close_all(clients)
        rc = relay.stop()
    assert rc == 0, "".join(relay.lines)


def test_default_workers_respects_a_cgroup_cpu_quota(tmp_path: Path) -> None:
    own = tmp_path / "proc-self-cgroup"
    own.write_text("0::/system.slice/meshrelay.service\n")
    service = tmp_path / "system.slice" / "meshrelay.service"
    service.mkdir(parents=True)
    (service / "cpu.max").write_text("150000 100000\n")  # CPUQuota=150%
    assert _cgroup_cpu_quota(tmp_path, own) == 1.5
    (service / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_quota(tmp_path, own) is None
    (service / "cpu.max").unlink()
    (tmp_path / "cpu.max").write_text("400000 100000\n")  # a container's own root
    assert _cgroup_cpu_quota(tmp_path, own) == 4.0
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpu_quota(tmp_path, own) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_cpu_quota(tmp_path, own) is None
    assert 1 <= default_workers() <= len(os.sched_getaffinity(0))
