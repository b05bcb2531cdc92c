"""``meshnode up``: the mesh client daemon.

:func:`run_daemon` wires the pieces together and runs until asked to stop::

    mesh file + key file ──► wireguard-go (client.engine): interface, overlay addresses, routes
                          ──► natlib connection: one UDP socket + relay clients, a peer per node
    per-peer loopback proxies (client._proxy) between the two; the engine's peers point at them
    control socket (client._control): status, ping, shutdown

natlib is told to leave the overlay out (:func:`overlay_exclusions`: the interface and every
node's allowed IPs), so no peer ever takes a "direct" path through the tunnel itself.

Every node derives the same configuration from the shared mesh file, and there is no coordination
server to tell a node where its peers' relays are, so every node uses the relay map's first
region as its home and as every peer's home: the region where all nodes meet.

While it runs, the daemon polls the engine's counters every :data:`STATS_INTERVAL` seconds and
pings every peer (disco, through natlib) every :data:`KEEPALIVE_PING_INTERVAL` seconds: a peer that
stops answering shows offline after :data:`~client._status.OFFLINE_AFTER` seconds. Nothing a peer
does can stop the daemon; a restarted peer simply answers again.

It stops on SIGINT, SIGTERM or a ``shutdown`` request: the control socket is removed, the natlib
connection closed and wireguard-go stopped, which removes the interface (this cleanup also runs
when the daemon fails, and is shielded from cancellation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc

from natlib.conn import PingTimeoutError, UnknownPeerError
from natlib.derpmap import DERPMap, DERPNode, DERPRegion, load_derp_map

from ._control import Emit, Request, RequestError, default_control_path, serve_control
from ._meshconn import MeshConn, PathView
from ._proxy import LoopbackProxies, open_loopback_proxies
from ._status import PeerTable
from .engine import Engine, EngineError, InterfaceConfig, open_wireguard_go
from .engine._base import check_ifname
from .keyfile import NodeKeys, read_key_file
from .meshfile import MeshFile, MeshFileError, MeshNode, RelayMap, load_mesh_file
from .uapi import SetRequest
from .wgconfig import engine_request, find_self, interface_config

__all__ = [
    "KEEPALIVE_PING_INTERVAL",
    "KEEPALIVE_PING_TIMEOUT",
    "MAX_PING_COUNT",
    "PERSISTENT_KEEPALIVE",
    "STATS_INTERVAL",
    "DaemonOptions",
    "LoadedConfig",
    "default_ifname",
    "load_config",
    "overlay_exclusions",
    "relay_derp_map",
    "run_daemon",
]

logger = logging.getLogger(__name__)

STATS_INTERVAL: Final = 2.0
KEEPALIVE_PING_INTERVAL: Final = 2.0
KEEPALIVE_PING_TIMEOUT: Final = 3.0
#: The most pings one ``meshnode ping`` may ask for, and the longest it may wait for each pong.
MAX_PING_COUNT: Final = 1000
MAX_PING_TIMEOUT: Final = 60.0
#: Pause between the pings of one ``meshnode ping`` (after a pong; a timeout is its own pause).
PING_GAP: Final = 0.5
#: WireGuard's persistent keepalive for every peer. Besides keeping sessions warm, setting it makes
#: wireguard-go send a keepalive (so a handshake) to every peer at once: a restarted node announces
#: its new session itself instead of waiting for its peers' stale sessions to time out.
PERSISTENT_KEEPALIVE: Final = 25

OpenConn = Callable[..., AbstractAsyncContextManager[MeshConn]]
OpenEngine = Callable[[str, InterfaceConfig], AbstractAsyncContextManager[Engine]]


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    """How to run: the files, and the few local choices that are not in the mesh file."""

    mesh_path: Path
    key_path: Path
    ifname: str | None = None  # default: default_ifname(mesh name)
    control_path: Path | None = None  # default: /run/meshnode/<mesh>.sock
    port: int = 0  # natlib's UDP port (0: any)
    engine_port: int = 0  # wireguard-go's UDP port, used on loopback only (0: any)
    open_conn_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    mesh: MeshFile
    keys: NodeKeys
    derp_map: DERPMap


def default_ifname(mesh_name: str) -> str:
    """``mn-<mesh name>``, cut to Linux's 15 characters."""
    return check_ifname(f"mn-{mesh_name}"[:15].rstrip("-"))


def relay_derp_map(relay_map: RelayMap) -> DERPMap:
    """The mesh file's relay map as natlib's DERPMap (a DERPMap file is read again, whole: it may
    carry fields the mesh file does not model, such as certificate pins)."""
    if relay_map.source is not None:
        return load_derp_map(relay_map.source)
    regions = {}
    for region in relay_map.regions:
        nodes = tuple(
            DERPNode(
                name=n.name,
                region_id=n.region_id,
                host_name=n.host_name,
                ipv4="" if n.ipv4 is None else str(n.ipv4),
                ipv6="" if n.ipv6 is None else str(n.ipv6),
                stun_port=-1 if n.stun_port is None else n.stun_port,
                derp_port=n.derp_port,
                insecure_for_tests=n.insecure_for_tests,
            )
            for n in region.nodes
        )
        regions[region.region_id] = DERPRegion(region.region_id, region.code, region.name, nodes=nodes)
    return DERPMap(regions=regions)


def overlay_exclusions(mesh: MeshFile, ifname: str) -> dict[str, Any]:
    """natlib's options that keep the overlay out of its candidates (see natlib.conn.open_conn).

    The overlay interface and everything WireGuard routes into it (every node's overlay addresses
    and subnet routes) reach peers *through* natlib: a "direct" path there would be the tunnel
    inside itself, each datagram encapsulated again until the MTU runs out.
    """
    prefixes = dict.fromkeys(str(net) for node in mesh.nodes for net in node.allowed_ips)
    return {"exclude_interfaces": (ifname,), "exclude_prefixes": tuple(prefixes)}


def load_config(mesh_path: Path, key_path: Path) -> LoadedConfig:
    """Read and cross-check both files; MeshFileError / KeyFileError (one line) if anything is wrong."""
    mesh = load_mesh_file(mesh_path)
    keys = read_key_file(key_path)
    find_self(mesh, keys, key_path)
    try:
        derp_map = relay_derp_map(mesh.relay_map)
    except ValueError as e:  # natlib's DERPMapError: one line naming the file and field already
        raise MeshFileError(mesh_path, 1, "relay_map.derpmap", str(e)) from None
    return LoadedConfig(mesh, keys, derp_map)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class _Daemon:
    def __init__(self, config: LoadedConfig, ifname: str, engine: Engine, conn: MeshConn) -> None:
        self.config = config
        self.mesh = config.mesh
        self.me = self.mesh.node(config.keys.node_key.public)
        self.ifname = ifname
        self.engine = engine
        self.conn = conn
        self.table = PeerTable(self.mesh.peers_of(self.me.node_key))
        self.engine_port = 0
        self.proxies: LoopbackProxies | None = None
        self.stop = anyio.Event()

    # --- background tasks -------------------------------------------------------------------------

    async def poll_stats(self) -> None:
        while True:
            try:
                self.table.engine_stats(await self.engine.stats())
            except EngineError as e:
                logger.warning("cannot read the engine's counters: %s", e)
            await anyio.sleep(STATS_INTERVAL)

    async def keepalive(self, peer: MeshNode) -> None:
        """Disco-ping ``peer`` forever: its pongs (or their absence) make it online (or offline)."""
        key = peer.node_key
        online = False
        while True:
            try:
                result = await self.conn.ping(key, timeout=KEEPALIVE_PING_TIMEOUT)
            except PingTimeoutError:
                self.table.ping_lost(key)  # the timeout was the pause
            else:
                self.table.pong(key, result, time.monotonic())
            now_online = self.table.online(key, time.monotonic())
            if now_online != online:
                online = now_online
                logger.info("peer %s is %s", peer.name, "online" if online else "offline")
            if self.table.answered_last_ping(key):
                await anyio.sleep(KEEPALIVE_PING_INTERVAL)

    async def log_path_events(self) -> None:
        names = {n.node_key: n.name for n in self.table.nodes}
        async for key, path in self.conn.path_events():
            where = f" {path.address}" if path.address is not None else f" region {path.region}"
            logger.info("path to %s: %s%s", names.get(key, key.short()), path.kind, where)

    # --- control requests -------------------------------------------------------------------------

    def _paths(self) -> dict[Any, PathView | None]:
        paths: dict[Any, PathView | None] = {}
        for node in self.table.nodes:
            try:
                paths[node.node_key] = self.conn.path(node.node_key)
            except UnknownPeerError:
                paths[node.node_key] = None
        return paths

    def status(self) -> dict[str, Any]:
        return {
            "mesh": self.mesh.name,
            "node": {
                "name": self.me.name,
                "node_key": self.me.node_key.text(),
                "overlay": [str(a) for a in self.me.overlay_addresses],
                "ifname": self.ifname,
                "engine_port": self.engine_port,
            },
            "peers": self.table.snapshot(self._paths(), time.monotonic(), time.time()),
            "proxies": self._proxy_counters(),
            "conn": _json_safe(self.conn.stats()),
        }

    def _proxy_counters(self) -> dict[str, Any]:
        if self.proxies is None:
            return {}
        return {n.name: dataclasses.asdict(self.proxies.counters(n.node_key)) for n in self.table.nodes}

    async def ping(self, params: Mapping[str, Any], emit: Emit) -> dict[str, Any]:
        target = params.get("peer")
        count = params.get("count", 10)
        until_direct = params.get("until_direct", True)
        timeout = params.get("timeout", 5.0)
        if not isinstance(target, str):
            raise RequestError("ping: 'peer' must be a peer's name, overlay address or node key")
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_PING_COUNT:
            raise RequestError(f"ping: 'count' must be an integer in 1-{MAX_PING_COUNT}")
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 < timeout <= MAX_PING_TIMEOUT
        ):
            raise RequestError(f"ping: 'timeout' must be a number of seconds in (0, {MAX_PING_TIMEOUT:g}]")
        try:
            node = self.table.find(target)
        except KeyError:
            if target in (self.me.name, *(str(a) for a in self.me.overlay_addresses)):
                raise RequestError(f"ping: {target!r} is this node") from None
            raise RequestError(f"ping: no peer {target!r} in mesh {self.mesh.name!r}") from None
        base = {"peer": node.name, "overlay": str(node.overlay_v4)}
        pongs = 0
        direct = False
        for seq in range(count):
            try:
                result = await self.conn.ping(node.node_key, timeout=float(timeout))
            except PingTimeoutError:
                self.table.ping_lost(node.node_key)
                await emit({**base, "seq": seq, "timeout": True})
                continue
            self.table.pong(node.node_key, result, time.monotonic())
            pongs += 1
            region = None
            if result.kind != "direct":
                path = self._paths().get(node.node_key)
                region = path.region if path is not None else None
            address = result.address
            await emit(
                {
                    **base,
                    "seq": seq,
                    "kind": result.kind,
                    "address": None if address is None else _address(address),
                    "region": region,
                    "rtt_ms": round(result.rtt * 1000, 3),
                }
            )
            if result.kind == "direct":
                direct = True
                if until_direct:
                    break
            if seq + 1 < count:
                await anyio.sleep(PING_GAP)
        return {**base, "sent": seq + 1, "pongs": pongs, "direct": direct}

    async def handle(self, request: Request, emit: Emit) -> Mapping[str, Any]:
        if request.method == "status":
            return self.status()
        if request.method == "ping":
            return await self.ping(request.params, emit)
        self.stop.set()  # "shutdown"; the reply goes out before the daemon stops
        return {"stopping": True}


def _address(address: Any) -> str:
    if isinstance(address, tuple):
        host, port = address
        return f"[{host}]:{port}" if ipaddress.ip_address(host).version == 6 else f"{host}:{port}"
    return str(address)


@contextlib.asynccontextmanager
async def _open_default_engine(ifname: str, interface: InterfaceConfig) -> AsyncIterator[Engine]:
    async with open_wireguard_go(ifname, interface) as engine:
        yield engine


async def _watch_signals(
    cancel: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            logger.info("%s: shutting down", signal.Signals(signum).name)
            cancel.cancel()
            return


async def run_daemon(
    options: DaemonOptions,
    *,
    open_conn: OpenConn | None = None,
    open_engine: OpenEngine | None = None,
    on_ready: Callable[[Mapping[str, Any]], None] | None = None,
    handle_signals: bool = True,
) -> None:
    """Run ``meshnode up`` until SIGINT/SIGTERM, a ``shutdown`` request, or cancellation.

    File problems raise MeshFileError / KeyFileError before anything starts; an engine that fails
    raises EngineError, a control socket in use ControlError. ``on_ready`` is called once
    everything runs, with the status document. ``open_conn`` defaults to ``natlib.conn.open_conn``
    and ``open_engine`` to wireguard-go (tests pass their own). Whatever ends it, the control
    socket, the connection and the interface are gone when this returns.
    """
    config = load_config(options.mesh_path, options.key_path)
    try:
        async with anyio.create_task_group() as tg:
            if handle_signals:
                # From here on a signal unwinds everything in order (interface, sockets, control).
                await tg.start(_watch_signals, tg.cancel_scope)
            await _run(config, options, open_conn, open_engine, on_ready)
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Callers should see the error itself (EngineError, ControlError...) when there is one.
        while len(group.exceptions) == 1 and isinstance(group.exceptions[0], BaseExceptionGroup):
            group = group.exceptions[0]
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise


async def _run(
    config: LoadedConfig,
    options: DaemonOptions,
    open_conn: OpenConn | None,
    open_engine: OpenEngine | None,
    on_ready: Callable[[Mapping[str, Any]], None] | None,
) -> None:
    mesh, keys = config.mesh, config.keys
    me = mesh.node(keys.node_key.public)  # load_config checked it is there
    ifname = check_ifname(options.ifname) if options.ifname else default_ifname(mesh.name)
    control_path = options.control_path or default_control_path(mesh.name)
    if open_conn is None:
        from natlib.conn import open_conn as natlib_open_conn

        open_conn = natlib_open_conn
    if open_engine is None:
        open_engine = _open_default_engine
    meeting_region = mesh.relay_map.regions[0].region_id
    conn_options: dict[str, Any] = {
        "port": options.port,
        "home_region": meeting_region,
        **overlay_exclusions(mesh, ifname),
    }
    if me.endpoints:
        conn_options["static_endpoints"] = tuple((str(e.ip), e.port) for e in me.endpoints)
    conn_options.update(options.open_conn_options)

    async with open_engine(ifname, interface_config(mesh, me)) as engine:
        # The engine picks its port first: the proxies must know where to deliver.
        await engine.configure(SetRequest(private_key=keys.node_key, listen_port=options.engine_port))
        engine_port = (await engine.stats()).listen_port
        async with open_conn(keys.node_key, keys.disco_key, config.derp_map, **conn_options) as conn:
            peers = mesh.peers_of(me.node_key)
            for peer in peers:
                conn.add_peer(
                    peer.node_key,
                    peer.disco_key,
                    meeting_region,
                    endpoints=tuple((str(e.ip), e.port) for e in peer.endpoints),
                )
            daemon = _Daemon(config, ifname, engine, conn)
            daemon.engine_port = engine_port
            async with open_loopback_proxies(conn, [p.node_key for p in peers], engine_port) as proxies:
                daemon.proxies = proxies
                await engine.configure(
                    engine_request(
                        mesh,
                        keys,
                        listen_port=engine_port,
                        endpoints=proxies.endpoints(),
                        persistent_keepalive_interval=PERSISTENT_KEEPALIVE,
                    )
                )
                async with anyio.create_task_group() as tg:
                    await tg.start(serve_control, control_path, daemon.handle)
                    tg.start_soon(daemon.poll_stats)
                    tg.start_soon(daemon.log_path_events)
                    for peer in peers:
                        tg.start_soon(daemon.keepalive, peer)
                    logger.info(
                        "mesh %s up: %s on %s, control %s, %d peers",
                        mesh.name,
                        me.name,
                        ifname,
                        control_path,
                        len(peers),
                    )
                    if on_ready is not None:
                        on_ready({**daemon.status(), "control": str(control_path)})
                    await daemon.stop.wait()
                    # The shutdown reply is already written: the handler's send follows stop.set()
                    # with no wait in between (a socket write with buffer room does not block).
                    tg.cancel_scope.cancel()
