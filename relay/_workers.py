"""``-workers N``: one relay served by N processes, so it can use N cores.

Design, written down once
=========================

**Processes.** ``meshrelay -workers N`` (N > 1) runs a *supervisor*: it validates the configuration,
loads (or, with ``-dev``, makes) the server key, then starts N workers, each
``python -m relay <the same flags> -internal-worker`` in its own process group. A worker re-parses
the same flags, so its configuration is the supervisor's; what only the supervisor knows (the
private key, the group's link secret, its sockets) arrives as one JSON line on the worker's
stdin, a pipe the supervisor keeps open: when the supervisor dies, the worker reads EOF and exits,
so no orphan keeps the port. ``-workers 1`` never gets here: the relay serves in the process that
parsed the flags, exactly as before.

**Shared ports.** The supervisor binds every listening socket and hands it over with ``pass_fds``:
for each worker, its own DERP (and, with TLS, plain-HTTP) listeners and its own STUN sockets, all
with ``SO_REUSEPORT`` on the same address, so the kernel spreads new connections and datagrams
over the workers. The supervisor closes its copies once the worker has them: when a worker dies
its sockets leave the port's group and new clients go to the survivors instead of queueing for a
dead process. It keeps one bound, never listening ``SO_REUSEPORT`` TCP socket per address as an
anchor (it receives nothing) so the port stays ours while every worker is down, and so that
``-a :0`` gives one port to all workers. **STUN** is served by every worker on its own
``SO_REUSEPORT`` UDP socket: a Binding Request is stateless and answered from the socket it
arrived on (same address and port), so any worker can answer it and STUN keeps working while a
worker restarts; a single STUN worker would be a single point of failure for no gain.

**Identity.** Every worker presents the one server key: clients see one derper.

**Worker links.** Each worker also listens on a private endpoint, a loopback port the supervisor
binds once and keeps for the whole run (a restarted worker gets the same port back, and a sibling
that dials meanwhile just waits in the backlog). Each worker dials every sibling there as a mesh
client (``_mesh.MeshPeer.to_sibling``), sends WatchConns and learns the sibling's clients as
forwarders. The usual mesh rules would break here, because the siblings share the server key:
"ServerKey == own key: that is me" would stop every link, and a watcher with our own key is
refused. So sibling links have their own rule: the dialer identifies itself with a **per-worker
link identity** derived from the server key (:func:`link_identity`, never the server key), and
authenticates with the group's **link secret** (32 random bytes per supervisor run) in the mesh-key
field. The private endpoint admits nothing else, and the public listeners never treat that secret
as a mesh key. A link's dialer expects the sibling to present our own key (anything else is
refused) and skips the self-check; ``-mesh-with`` self-detection is untouched: an entry naming
this relay lands on one of the workers through the shared port, presents our key, and is
recognised as ourselves, whichever worker answered. A sibling link is not a client
(``_state``): it gets no PeerPresent, is not counted and does not hold up a drain.

**Routing.** A client on worker A sending to a client on worker B: A finds B's forwarder and
hands the packet to its own link to B, which delivers it: one hop. A packet received from a
sibling is never forwarded again (no loops). The hop is cheap because it is batched: A's hot loop
rewrites a run of SendPackets into RecvPackets exactly as for a local receiver and puts the whole
run on the link as one private SiblingRun frame (``_mesh``); B enqueues those bytes for the
receiver as they are, so the hop costs one copy and a share of one write and one read per run,
not per packet (disco packets, rare, go one by one as ForwardPackets). A link carries only what
the sibling can take: when more than :data:`~relay._mesh.SIBLING_QUEUE_HIGH` bytes wait for it,
the readers of the clients feeding it pause until it drains, as one process would by being busy,
instead of dropping packets at the other end. With ``-mesh-with``, **each worker dials every other
relay itself**, with the server key and the mesh key as before, so a client's packet to another
relay leaves from the worker it is on, in one hop, and a worker's clients are reachable through
its own links (if only one worker dialled out, the others' packets would need a sibling hop
*before* the regional hop, and that worker would have to forward what it got from siblings). The
other relay's watcher lands on one worker W through the shared port, so W's WatchConns stream
covers the whole group: its own clients plus those it learned from its siblings (PeerGone only
when a key has left every worker). A packet W receives from another relay for a sibling's client
takes exactly one more loopback hop; that sibling delivers it or drops it. A ClosePeer from another
relay is passed on the same way to the siblings that have the key.

**Supervision.** A worker that exits while the relay is not stopping is restarted after a backoff
(0.25 s, doubling, at most 8 s). :data:`CRASH_LIMIT` exits within :data:`CRASH_WINDOW` seconds mean
it keeps crashing: the supervisor stops the others and exits 1 saying so. SIGTERM, SIGINT and
SIGHUP are forwarded to every worker: on SIGTERM each worker sends Restarting to its clients and
drains (graceful restart, ``-shutdown-grace``); the supervisor exits 0 when every worker exited 0,
else 1. Workers still running ``-shutdown-grace`` + 10 s after the signal are killed.
Because workers have their own process group, a terminal's Ctrl-C reaches them once, through the
supervisor; under systemd use ``KillMode=mixed`` for the same reason.

**Metrics.** Workers serve their registry on a private loopback port each; the supervisor alone
listens on ``-metrics-addr``. At each scrape it fetches every worker's exposition and merges them
(:class:`~relay._metrics.WorkerMetricsMerger`): the series are those of a single relay, counters
summed (and kept monotonic across worker restarts), gauges summed except where a sum means
nothing; plus ``meshrelay_workers`` and ``meshrelay_worker_restarts_total``. See docs/metrics.md.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, Final

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from natlib.keys import NodePrivateKey

from ._mesh import MeshPeer, SiblingLink
from ._metrics import PREFIX, WorkerMetricsMerger, build_registry, serve_metrics
from ._stun_server import StunStats, _serve_socket

if TYPE_CHECKING:
    import ssl

    from ._config import RelayConfig
    from ._server import RelayServer

__all__ = [
    "CRASH_LIMIT",
    "CRASH_WINDOW",
    "Supervisor",
    "WorkerSpec",
    "WorkerSpecError",
    "link_identity",
    "read_worker_spec",
    "serve_worker",
]

log = logging.getLogger("relay.workers")

CRASH_LIMIT: Final = 5  # unexpected exits of one worker ...
CRASH_WINDOW: Final = 60.0  # ... within this many seconds: it keeps crashing, give up
RESTART_BACKOFF_FIRST: Final = 0.25
RESTART_BACKOFF_MAX: Final = 8.0
KILL_MARGIN: Final = 10.0  # after the drain, seconds before stragglers get SIGKILL
SCRAPE_TIMEOUT: Final = 2.0
MAX_SCRAPE_BYTES: Final = 32 << 20
READY_LINE: Final = b"ready\n"
SIBLING_READY_WAIT: Final = 3.0  # seconds a starting worker waits for its sibling links to come up


class WorkerSpecError(Exception):
    """The supervisor's hand-over on stdin is missing or malformed."""


def link_identity(server_key: NodePrivateKey, index: int) -> NodePrivateKey:
    """Worker ``index``'s key on sibling links: derived from the server key, never equal to it.

    Stable across restarts of the worker, so a restarted worker is the same sibling.
    """
    digest = blake2b(index.to_bytes(4, "big"), key=server_key.raw, digest_size=32, person=b"meshrelay-wlink")
    return NodePrivateKey(digest.digest())


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker gets from its supervisor (one JSON line on stdin)."""

    index: int
    count: int
    private_key: NodePrivateKey
    link_secret: bytes
    derp_fds: tuple[int, ...]
    http_fds: tuple[int, ...]
    stun_fds: tuple[int, ...]
    link_fd: int
    metrics_fd: int | None
    sibling_ports: dict[int, int]  # sibling index -> its private port on 127.0.0.1

    def to_json(self) -> bytes:
        obj = {
            "index": self.index,
            "count": self.count,
            "private_key": self.private_key.text(),
            "link_secret": self.link_secret.hex(),
            "derp_fds": list(self.derp_fds),
            "http_fds": list(self.http_fds),
            "stun_fds": list(self.stun_fds),
            "link_fd": self.link_fd,
            "metrics_fd": self.metrics_fd,
            "sibling_ports": {str(k): v for k, v in self.sibling_ports.items()},
        }
        return json.dumps(obj).encode() + b"\n"

    @classmethod
    def from_json(cls, line: bytes) -> WorkerSpec:
        try:
            obj: dict[str, Any] = json.loads(line)
            metrics_fd = obj["metrics_fd"]
            return cls(
                index=int(obj["index"]),
                count=int(obj["count"]),
                private_key=NodePrivateKey.from_text(str(obj["private_key"])),
                link_secret=bytes.fromhex(str(obj["link_secret"])),
                derp_fds=tuple(int(x) for x in obj["derp_fds"]),
                http_fds=tuple(int(x) for x in obj["http_fds"]),
                stun_fds=tuple(int(x) for x in obj["stun_fds"]),
                link_fd=int(obj["link_fd"]),
                metrics_fd=None if metrics_fd is None else int(metrics_fd),
                sibling_ports={int(k): int(v) for k, v in dict(obj["sibling_ports"]).items()},
            )
        except (ValueError, KeyError, TypeError) as e:
            raise WorkerSpecError(f"bad worker hand-over from the supervisor: {e!r}") from None

    def siblings(self) -> Iterator[SiblingLink]:
        me = link_identity(self.private_key, self.index)
        for index, port in sorted(self.sibling_ports.items()):
            yield SiblingLink(index, port, me, self.link_secret)


def read_worker_spec() -> WorkerSpec:
    """Read the hand-over line from stdin (the pipe from the supervisor, which stays open)."""
    line = sys.stdin.buffer.readline()
    if not line:
        raise WorkerSpecError("-internal-worker is set by the -workers supervisor; stdin had nothing")
    return WorkerSpec.from_json(line)


# -- the worker side --------------------------------------------------------------------------------


def _adopt(fd: int) -> trio.socket.SocketType:
    return trio.socket.from_stdlib_socket(socket.socket(fileno=fd))


async def serve_worker(
    nursery: trio.Nursery,
    server: RelayServer,
    spec: WorkerSpec,
    *,
    ssl_context: ssl.SSLContext | None,
    stun_stats: StunStats,
    on_supervisor_gone: trio.CancelScope,
) -> None:
    """Start a worker's listeners, its sibling links and its private metrics in ``nursery``; tell
    the supervisor once they serve. Cancels ``on_supervisor_gone`` if the supervisor goes away.

    The sibling links come first, and the client listeners only once every link is up (or after
    :data:`SIBLING_READY_WAIT`, should a sibling be down): a client accepted earlier could not yet
    reach the clients of the other workers. Connections arriving meanwhile wait in the backlog.
    """
    await nursery.start(
        lambda task_status: server.serve_sockets(
            [_adopt(spec.link_fd)], sibling_listener=True, task_status=task_status
        )
    )
    links = [MeshPeer.to_sibling(server, link) for link in spec.siblings()]
    for peer in links:
        nursery.start_soon(peer.run, name=f"worker link {peer.name}")
    with trio.move_on_after(SIBLING_READY_WAIT) as wait:
        for peer in links:
            await peer.first_connected.wait()
    if wait.cancelled_caught:
        down = [p.name for p in links if not p.first_connected.is_set()]
        log.warning("worker %d: serving without links to %s (not up yet)", spec.index, ", ".join(down))
    await nursery.start(
        lambda task_status: server.serve_sockets(
            [_adopt(fd) for fd in spec.derp_fds], ssl_context=ssl_context, task_status=task_status
        )
    )
    if spec.http_fds:
        await nursery.start(
            lambda task_status: server.serve_sockets(
                [_adopt(fd) for fd in spec.http_fds], http_side_listener=True, task_status=task_status
            )
        )
    for fd in spec.stun_fds:
        nursery.start_soon(_serve_socket, _adopt(fd), stun_stats)
    if spec.metrics_fd is not None:
        registry = build_registry(server, stun_stats)
        metrics_sock = _adopt(spec.metrics_fd)
        await nursery.start(
            lambda task_status: serve_metrics(
                None, 0, registry, sockets=[metrics_sock], task_status=task_status
            )
        )
    nursery.start_soon(_watch_supervisor, on_supervisor_gone)
    os.write(1, READY_LINE)
    log.debug("worker %d of %d serving", spec.index, spec.count)


async def _watch_supervisor(scope: trio.CancelScope) -> None:
    """Our stdin is a pipe from the supervisor: EOF means it is gone, and so must we be."""
    stream = trio.lowlevel.FdStream(os.dup(0))
    try:
        while await stream.receive_some(4096):
            pass
    except (OSError, trio.BrokenResourceError):
        pass
    finally:
        await stream.aclose()
    log.error("the -workers supervisor is gone; shutting down")
    scope.cancel()


# -- the supervisor ---------------------------------------------------------------------------------


def _describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class _Address:
    family: int
    sockaddr: tuple[Any, ...]

    @property
    def host(self) -> str:
        return str(self.sockaddr[0])

    @property
    def port(self) -> int:
        return int(self.sockaddr[1])


def _new_socket(family: int, kind: int) -> socket.socket:
    s = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except BaseException:
        s.close()
        raise
    return s


def _resolve(host: str, port: int, kind: int) -> list[_Address]:
    """Bind-ready addresses for ``host`` (``""``: every address) with one port for all of them."""
    infos = socket.getaddrinfo(host or None, port, type=kind, flags=socket.AI_PASSIVE)
    seen: list[_Address] = []
    for family, _t, _p, _c, sockaddr in infos:
        addr = _Address(family, tuple(sockaddr))
        if addr not in seen and family in (socket.AF_INET, socket.AF_INET6):
            seen.append(addr)
    return seen


def _with_port(addr: _Address, port: int) -> _Address:
    return _Address(addr.family, (addr.sockaddr[0], port, *addr.sockaddr[2:]))


def _bind_all(addrs: list[_Address], kind: int, *, listen: bool) -> list[socket.socket]:
    """Bind a SO_REUSEPORT socket to each address; port 0 is chosen once, by the first."""
    socks: list[socket.socket] = []
    port = addrs[0].port if addrs else 0
    try:
        for addr in addrs:
            s = _new_socket(addr.family, kind)
            socks.append(s)
            s.bind(_with_port(addr, port).sockaddr)
            port = int(s.getsockname()[1])
            if listen:
                s.listen(socket.SOMAXCONN)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _loopback_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(socket.SOMAXCONN)
    return s


@dataclass(slots=True)
class _Slot:
    """One worker position: its private sockets (kept for the whole run) and its current process."""

    index: int
    link_sock: socket.socket
    metrics_sock: socket.socket | None
    proc: trio.Process | None = None
    pid: int = 0
    ready: bool = False
    final_status: int | None = None
    exits: deque[float] = field(default_factory=deque)
    restarts: int = 0


class Supervisor:
    """Run ``cfg.workers`` relay processes as one relay. See the module docstring.

    :meth:`run` returns the exit status: 0 after a clean shutdown, 1 if workers kept crashing or
    did not exit cleanly.
    """

    def __init__(self, cfg: RelayConfig, key: NodePrivateKey, argv: Sequence[str]) -> None:
        self.cfg = cfg
        self.key = key
        self.argv = list(argv)
        self.link_secret = os.urandom(32)
        self.stopping = False
        self.failure = ""
        self._stop_event = trio.Event()
        self._kill_deadline = float("inf")
        self._stop_signal = 0
        self.merger = WorkerMetricsMerger()
        self._anchors: list[socket.socket] = []
        self._derp_addrs: list[_Address] = []
        self._http_addrs: list[_Address] = []
        self._stun_addrs: list[_Address] = []
        self._slots: list[_Slot] = []
        self._announced_ready = False

    # -- sockets -------------------------------------------------------------------------------------

    def _reserve_tcp(self, host: str, port: int) -> list[_Address]:
        """Anchor the port: bound, never listening, so it receives nothing but stays ours."""
        anchors = _bind_all(_resolve(host, port, socket.SOCK_STREAM), socket.SOCK_STREAM, listen=False)
        self._anchors += anchors
        return [_Address(s.family, tuple(s.getsockname())) for s in anchors]

    def _prepare(self) -> None:
        cfg = self.cfg
        self._derp_addrs = self._reserve_tcp(cfg.listen_host, cfg.listen_port)
        if cfg.tls and cfg.http_port >= 0:
            self._http_addrs = self._reserve_tcp(cfg.listen_host, cfg.http_port)
        if cfg.stun:
            # Bound once to learn the port (-stun-port 0), then closed: an idle UDP socket in the
            # group would swallow its share of the datagrams.
            probe = _bind_all(
                _resolve(cfg.listen_host, cfg.stun_port, socket.SOCK_DGRAM), socket.SOCK_DGRAM, listen=False
            )
            self._stun_addrs = [_Address(s.family, tuple(s.getsockname())) for s in probe]
            for s in probe:
                s.close()
        for i in range(cfg.workers):
            metrics = _loopback_listener() if cfg.metrics_addr is not None else None
            self._slots.append(_Slot(i, _loopback_listener(), metrics))

    def _close_all(self) -> None:
        for s in self._anchors:
            s.close()
        for slot in self._slots:
            slot.link_sock.close()
            if slot.metrics_sock is not None:
                slot.metrics_sock.close()

    # -- running -------------------------------------------------------------------------------------

    async def run(self) -> int:
        cfg = self.cfg
        self._prepare()
        scheme = "https" if cfg.tls else "http"
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                async with trio.open_nursery() as nursery:
                    for a in self._derp_addrs:
                        log.info(
                            "serving DERP on %s://%s/derp with %d workers",
                            scheme,
                            _fmt(a.host, a.port),
                            cfg.workers,
                        )
                    log.info("server key nodekey:%s", self.key.public.hex())
                    for a in self._http_addrs:
                        log.info("serving plain HTTP (generate_204, redirects) on %s", _fmt(a.host, a.port))
                    for a in self._stun_addrs:
                        log.info("STUN server listening on UDP %s (every worker)", _fmt(a.host, a.port))
                    if cfg.metrics_addr is not None:
                        registry = CollectorRegistry(auto_describe=False)
                        registry.register(_GroupCollector(self))
                        mhost, mport = cfg.metrics_addr
                        bound = await nursery.start(
                            lambda task_status: serve_metrics(
                                mhost,
                                mport,
                                registry,
                                before_scrape=self._scrape_workers,
                                task_status=task_status,
                            )
                        )
                        for host, port in bound:
                            log.info("serving metrics on http://%s/metrics", _fmt(host, port))
                    nursery.start_soon(self._signal_loop, signals)
                    nursery.start_soon(self._kill_stragglers)
                    async with trio.open_nursery() as keepers:
                        for slot in self._slots:
                            keepers.start_soon(self._keep_worker, slot)
                    nursery.cancel_scope.cancel()
        finally:
            self._close_all()
        if self.failure:
            sys.stderr.write(f"meshrelay: {self.failure}\n")
            return 1
        bad = [s for s in self._slots if s.final_status not in (0, None)]
        if bad:
            for s in bad:
                assert s.final_status is not None
                log.error(
                    "worker %d exited with %s while shutting down", s.index, _describe_status(s.final_status)
                )
            return 1
        log.info("all %d workers stopped", cfg.workers)
        return 0

    @property
    def workers_ready(self) -> int:
        return sum(1 for s in self._slots if s.ready)

    @property
    def worker_restarts(self) -> int:
        return sum(s.restarts for s in self._slots)

    def _running(self) -> list[trio.Process]:
        return [s.proc for s in self._slots if s.proc is not None and s.proc.returncode is None]

    def _signal_all(self, signum: int, *, ready_only: bool = False) -> None:
        for slot in self._slots:
            proc = slot.proc
            if proc is None or proc.returncode is not None or (ready_only and not slot.ready):
                continue
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def _stop(self, signum: int) -> None:
        self.stopping = True
        self._stop_signal = signum
        wait = self.cfg.shutdown_grace if signum == signal.SIGTERM else 0.0
        self._kill_deadline = trio.current_time() + wait + KILL_MARGIN
        self._stop_event.set()
        for s in self._anchors:  # the port is released as the workers' listeners close
            s.close()
        self._signal_all(signum)

    async def _signal_loop(self, signals: Any) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                # A worker still starting up reads the files anyway (and would die of a SIGHUP).
                log.info("received SIGHUP: passing it to %d workers (reload)", self.workers_ready)
                self._signal_all(signum, ready_only=True)
            elif self.stopping:
                log.info("received %s: already stopping", name)
            else:
                how = "drain and exit" if signum == signal.SIGTERM and self.cfg.shutdown_grace > 0 else "exit"
                log.info("received %s: telling %d workers to %s", name, len(self._running()), how)
                self._stop(signum)

    async def _kill_stragglers(self) -> None:
        await self._stop_event.wait()
        await trio.sleep_until(self._kill_deadline)
        for proc in self._running():
            log.error("worker pid %d still running %gs after the stop; killing it", proc.pid, KILL_MARGIN)
            proc.kill()

    def _fail(self, message: str) -> None:
        if self.stopping:
            return
        self.failure = message
        log.error("%s; stopping the other workers", message)
        self._stop(signal.SIGINT)

    async def _keep_worker(self, slot: _Slot) -> None:
        """Run worker ``slot.index`` until the relay stops, restarting it when it dies."""
        while not self.stopping:
            try:
                proc = await self._spawn(slot)
            except OSError as e:
                status_text = f"could not start: {e}"
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_ready, slot, proc)
                    status = await proc.wait()
                assert proc.stdin is not None
                await proc.stdin.aclose()  # (the worker is gone; this is only our end of its pipe)
                was_ready, slot.ready = slot.ready, False
                if self._stop_event.is_set():
                    if not was_ready and status == -self._stop_signal:
                        # Stopped while starting up, before it handles signals: it had no clients.
                        status = 0
                    slot.final_status = status
                    return
                status_text = _describe_status(status)
            now = trio.current_time()
            slot.exits.append(now)
            while slot.exits and slot.exits[0] < now - CRASH_WINDOW:
                slot.exits.popleft()
            if len(slot.exits) >= CRASH_LIMIT:
                self._fail(
                    f"worker {slot.index} keeps crashing ({len(slot.exits)} exits within "
                    f"{CRASH_WINDOW:g}s, last: {status_text})"
                )
                return
            delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_FIRST * 2 ** (len(slot.exits) - 1))
            log.error(
                "worker %d (pid %d): %s; restarting it in %gs", slot.index, slot.pid, status_text, delay
            )
            with trio.move_on_after(delay):
                await self._stop_event.wait()
            slot.restarts += 1

    async def _spawn(self, slot: _Slot) -> trio.Process:
        derp = _bind_all(self._derp_addrs, socket.SOCK_STREAM, listen=True)
        http = _bind_all(self._http_addrs, socket.SOCK_STREAM, listen=True) if self._http_addrs else []
        stun = _bind_all(self._stun_addrs, socket.SOCK_DGRAM, listen=False) if self._stun_addrs else []
        try:
            spec = WorkerSpec(
                index=slot.index,
                count=len(self._slots),
                private_key=self.key,
                link_secret=self.link_secret,
                derp_fds=tuple(s.fileno() for s in derp),
                http_fds=tuple(s.fileno() for s in http),
                stun_fds=tuple(s.fileno() for s in stun),
                link_fd=slot.link_sock.fileno(),
                metrics_fd=slot.metrics_sock.fileno() if slot.metrics_sock is not None else None,
                sibling_ports={
                    s.index: int(s.link_sock.getsockname()[1]) for s in self._slots if s is not slot
                },
            )
            fds = [*spec.derp_fds, *spec.http_fds, *spec.stun_fds, spec.link_fd]
            if spec.metrics_fd is not None:
                fds.append(spec.metrics_fd)
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "relay", *self.argv, "-internal-worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=fds,
                process_group=0,  # signals come from us only (see the module docstring)
            )
        finally:
            for s in (*derp, *http, *stun):  # the worker has its own copies now
                s.close()
        slot.proc, slot.pid = proc, proc.pid
        assert proc.stdin is not None
        try:
            await proc.stdin.send_all(spec.to_json())
        except (trio.BrokenResourceError, OSError):
            pass  # it died at once; proc.wait() will tell
        log.info("worker %d started (pid %d)", slot.index, proc.pid)
        return proc

    async def _read_ready(self, slot: _Slot, proc: trio.Process) -> None:
        assert proc.stdout is not None
        buf = b""
        async for chunk in proc.stdout:
            buf += chunk
            if not slot.ready and READY_LINE in buf:
                slot.ready = True
                log.info("worker %d (pid %d) ready", slot.index, proc.pid)
                if not self._announced_ready and all(s.ready for s in self._slots):
                    self._announced_ready = True
                    log.info("all %d workers ready", len(self._slots))
            buf = buf[-len(READY_LINE) :]

    # -- metrics -------------------------------------------------------------------------------------

    async def _scrape_workers(self) -> None:
        results: dict[int, tuple[int, str | None]] = {}

        async def one(slot: _Slot) -> None:
            text = None
            if slot.metrics_sock is not None and slot.proc is not None and slot.proc.returncode is None:
                port = int(slot.metrics_sock.getsockname()[1])
                with trio.move_on_after(SCRAPE_TIMEOUT):
                    text = await _fetch_metrics(port)
            results[slot.index] = (slot.pid, text)

        async with trio.open_nursery() as nursery:
            for slot in self._slots:
                nursery.start_soon(one, slot)
        self.merger.update(results)


async def _fetch_metrics(port: int) -> str | None:
    """GET /metrics from a worker's private endpoint (Prometheus text); None if that fails."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return None
    async with stream:
        try:
            await stream.send_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            data = bytearray()
            while len(data) <= MAX_SCRAPE_BYTES:
                chunk = await stream.receive_some(64 << 10)
                if not chunk:
                    break
                data += chunk
        except (OSError, trio.BrokenResourceError):
            return None
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep or not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        return None
    return body.decode("utf-8", "replace")


class _GroupCollector:
    """The supervisor's /metrics: the workers' merged numbers and the supervisor's own."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        yield from self.sup.merger.collect()
        yield GaugeMetricFamily(
            PREFIX + "workers",
            "Worker processes of this relay that are up and serving (-workers).",
            value=self.sup.workers_ready,
        )
        per_worker = GaugeMetricFamily(
            PREFIX + "worker_current_connections",
            "DERP clients connected to each worker process (their sum is current_connections).",
            labels=["worker"],
        )
        for index, value in sorted(self.sup.merger.worker_connections.items()):
            per_worker.add_metric([str(index)], value)
        yield per_worker
        yield CounterMetricFamily(
            PREFIX + "worker_restarts",
            "Worker processes restarted after they exited unexpectedly.",
            value=self.sup.worker_restarts,
        )
