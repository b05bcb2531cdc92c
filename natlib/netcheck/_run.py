"""The netcheck driver: sockets, timers and HTTP around the sans-io planning, report and home choice.

:func:`netcheck` runs one report under anyio (trio or asyncio). In parallel it sends the plan's
STUN requests over one UDP socket per family (:class:`~natlib.stunclient.StunClient`), asks
the port-mapping probe which protocols the gateway speaks, and on a full report checks for a
captive portal 200 ms in unless a STUN answer came first. If no UDP answer came back at all, it
measures every region's latency over HTTPS (``GET /derp/latency-check``) instead. Finally it
chooses the home region with hysteresis over the history kept in a :class:`NetcheckState`.

The whole run is bounded by ``report_timeout`` (5 s) and its STUN phase by ``stun_timeout``
(3 s). Cancelling :func:`netcheck` cancels every probe and closes every socket it opened; the
state is only updated by a run that completes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSAttribute

from ..derpmap import DERPMap, DERPNode
from ..stunclient import StunClient, StunResult
from ._home import LatencyHistory, choose_home
from ._plan import (
    PORTMAP_PROBE_TIMEOUT,
    REPORT_TIMEOUT,
    STUN_PROBE_TIMEOUT,
    Probe,
    StopRule,
    plan_probes,
    wants_full_report,
)
from ._report import Family, Report, ReportBuilder

__all__ = [
    "CAPTIVE_PORTAL_DELAY",
    "DNS_LOOKUP_LIMIT",
    "HTTP_TIMEOUT",
    "PORTMAP_RESULT_WAIT",
    "NetcheckState",
    "PortmapAvailability",
    "PortmapProbe",
    "https_latency",
    "netcheck",
]

log = logging.getLogger("natlib.netcheck")

CAPTIVE_PORTAL_DELAY: Final = 0.2
"""The captive-portal check starts this long after the STUN requests, so a STUN answer can cancel it."""
DNS_LOOKUP_LIMIT: Final = 1.0
"""Host names of nodes without a literal IP are looked up for at most this long before probing."""
PORTMAP_RESULT_WAIT: Final = 2.0
"""A port-mapping probe still running after this long is cancelled and its fields stay None."""
HTTP_TIMEOUT: Final = 3.0
"""Each HTTP(S) probe (latency check, captive-portal check) gives up after this long."""
_MAX_RESPONSE_BYTES: Final = 64 << 10
_CHALLENGE_CHARS: Final = re.compile(r"[^A-Za-z0-9._:-]")


class PortmapAvailability(Protocol):
    """What a port-mapping probe reports (``natlib.portmap.ProbeResult`` has these fields)."""

    @property
    def pmp(self) -> bool: ...
    @property
    def pcp(self) -> bool: ...
    @property
    def upnp(self) -> bool: ...


PortmapProbe = Callable[[], Awaitable[PortmapAvailability | None]]
"""An async callable probing the gateway for NAT-PMP, PCP and UPnP; None: could not tell."""


@functools.cache
def _portmap_module() -> Any:
    try:
        return importlib.import_module("natlib.portmap")
    except ImportError:
        return None


async def _default_portmap_probe() -> PortmapAvailability | None:
    """``natlib.portmap.probe()`` if that module provides it; None otherwise."""
    probe = getattr(_portmap_module(), "probe", None)
    if probe is None:
        return None
    result = probe(timeout=PORTMAP_PROBE_TIMEOUT)
    if inspect.isawaitable(result):
        result = await result
    return result  # type: ignore[no-any-return]


@dataclass
class NetcheckState:
    """What one report needs from the ones before: the last report, when the last full one ran,
    and the latency history for the home choice. Times come from ``clock`` (monotonic seconds)."""

    clock: Callable[[], float] = time.monotonic
    history: LatencyHistory = field(default_factory=LatencyHistory)
    last_report: Report | None = None
    last_full_at: float | None = None

    @property
    def home(self) -> int:
        return self.last_report.preferred_derp if self.last_report is not None else 0


def _os_has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- HTTP(S) probes --------------------------------------------------------------------------------


class _HttpProbeError(Exception):
    pass


async def _http_exchange(
    stream: anyio.abc.ByteStream, host: str, path: str, headers: Sequence[tuple[str, str]] = ()
) -> h11.Response:
    """Send ``GET path`` and return the response head (the body is not read)."""
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET", target=path, headers=[("Host", host), *headers, ("Connection", "close")]
    )
    data = conn.send(request) + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send(data)
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise _HttpProbeError(f"bad HTTP response: {e}")
        if isinstance(event, h11.Response):
            return event
        if event is h11.NEED_DATA:
            try:
                chunk = await stream.receive()
            except anyio.EndOfStream:
                chunk = b""
            received += len(chunk)
            if received > _MAX_RESPONSE_BYTES:
                raise _HttpProbeError("HTTP response head too large")
            conn.receive_data(chunk)
        elif isinstance(event, h11.ConnectionClosed):
            raise _HttpProbeError("connection closed before a response")


_PROBE_ERRORS: Final = (
    OSError,  # refused, unreachable, DNS failure (gaierror), TLS (ssl.SSLError)
    TimeoutError,
    anyio.BrokenResourceError,
    h11.ProtocolError,  # e.g. a host name that cannot go into a Host header
    _HttpProbeError,
)
"""What an HTTP(S) probe may fail with; each leaves its fact unknown instead of failing the report."""


async def https_latency(node: DERPNode, *, ssl_context: ssl.SSLContext | None = None) -> float:
    """Seconds an HTTPS ``GET /derp/latency-check`` to ``node`` takes on an established connection.

    TLS is verified against the node's ``CertName`` (or ``HostName``); a ``sha256-raw:`` CertName
    pins the leaf certificate instead, and ``InsecureForTests`` skips verification. Raises
    :class:`OSError`, :class:`ssl.SSLError` or ``_HttpProbeError`` (an :class:`Exception`) on
    failure. Cancellation closes the connection.
    """
    ctx, server_name, pin = node.tls_context(), node.tls_server_name, node.cert_pin
    if ssl_context is not None:
        ctx, pin = ssl_context, None
    stream = await anyio.connect_tcp(
        node.dial_host(), node.effective_derp_port, tls=True, ssl_context=ctx, tls_hostname=server_name
    )
    async with stream:
        if pin is not None:
            der = stream.extra(TLSAttribute.peer_certificate_binary)
            if der is None or hashlib.sha256(der).hexdigest() != pin.lower():
                raise _HttpProbeError(f"{node.name}: the certificate does not match the pinned sha256-raw")
        start = anyio.current_time()
        response = await _http_exchange(stream, node.host_name, "/derp/latency-check")
        latency = anyio.current_time() - start
    if response.status_code != 200:
        raise _HttpProbeError(f"{node.name}: /derp/latency-check answered {response.status_code}")
    return latency


async def _captive_portal_check(node: DERPNode) -> bool:
    """True if ``http://<node>/generate_204`` does not answer as a relay does (a portal intercepts)."""
    challenge = "ts_" + _CHALLENGE_CHARS.sub("", node.host_name)[:61]
    stream = await anyio.connect_tcp(node.dial_host(), 80)
    async with stream:
        response = await _http_exchange(
            stream, node.host_name, "/generate_204", [("X-Tailscale-Challenge", challenge)]
        )
    expected = f"response {challenge}".encode()
    answer = dict(response.headers).get(b"x-tailscale-response")
    return response.status_code != 204 or answer != expected


def _captive_portal_node(derp_map: DERPMap, home: int) -> DERPNode | None:
    order = [home] if home in derp_map.regions else []
    order += [r for r in derp_map.region_ids() if r != home]
    for region_id in order:
        for node in derp_map.regions[region_id].nodes:
            if node.can_port80 and not node.stun_only:
                return node
    return None


# -- the run ---------------------------------------------------------------------------------------


async def _stun_phase(
    plan_probes_: Sequence[Probe],
    sockets: Mapping[Family, anyio.abc.UDPSocket],
    builder: ReportBuilder,
    rule: StopRule,
    first_answer: anyio.Event,
    stun_timeout: float,
) -> None:
    client = StunClient()
    start = anyio.current_time()
    probe_of: dict[bytes, Probe] = {}
    by_set: dict[tuple[int, Family], list[bytes]] = {}
    for probe in plan_probes_:
        if probe.family not in sockets:
            continue
        txid = client.start((probe.host, probe.port), start, schedule=probe.delays, timeout=stun_timeout)
        probe_of[txid] = probe
        by_set.setdefault(probe.probe_set, []).append(txid)
    woken = anyio.Event()

    def handle(result: StunResult, now: float) -> None:
        probe = probe_of.pop(result.txid, None)
        if probe is None:
            return
        if result.error is not None:
            log.debug("STUN to region %d node %s: %s", probe.region_id, probe.node, result.error)
        if builder.add_stun(probe.region_id, result):
            first_answer.set()
            for other in by_set[probe.probe_set]:  # the probe set is answered: skip its other requests
                if other in probe_of:
                    client.cancel(other)
                    del probe_of[other]
            rule.update(now, len(builder.regions_with_latency()), builder.max_latency())

    async def receive(sock: anyio.abc.UDPSocket) -> None:
        nonlocal woken
        while True:
            try:
                data, source = await sock.receive()
            except OSError as e:
                log.debug("netcheck receive error (ignored): %s", e)
                continue
            now = anyio.current_time()
            result = client.receive_datagram(data, (source[0], source[1]), now)
            if result is not None:
                handle(result, now)
                woken.set()

    async with anyio.create_task_group() as tg:
        for sock in sockets.values():
            tg.start_soon(receive, sock)
        while client.pending:
            now = anyio.current_time()
            if now >= rule.deadline:
                break
            for result in client.expired(now):
                handle(result, now)
            for data, (host, port) in client.datagrams_to_send(now):
                family: Family = 6 if ":" in host else 4
                try:
                    await sockets[family].sendto(data, host, port)
                    builder.note_sent(family)
                except OSError as e:
                    failed = client.fail(data[8:20], f"send failed: {e.strerror or e}")
                    if failed is not None:
                        handle(failed, now)
            wake_at = min(client.next_deadline() or rule.deadline, rule.deadline)
            with anyio.move_on_at(wake_at):
                await woken.wait()
            woken = anyio.Event()
        tg.cancel_scope.cancel()


async def _resolve_nodes(derp_map: DERPMap, limit: float) -> dict[str, list[str]]:
    """Addresses of the STUN nodes that have no literal IPv4/IPv6, looked up concurrently within
    ``limit`` seconds; nodes whose lookup fails or is late are simply absent."""
    wanted = [
        node
        for region in derp_map.regions.values()
        if not region.no_measure_no_home
        for node in region.nodes
        if node.effective_stun_port is not None
        and not node.stun_test_ip
        and (node.ipv4 == "" or node.ipv6 == "")
    ]
    out: dict[str, list[str]] = {}

    async def lookup(node: DERPNode) -> None:
        try:
            infos = await anyio.getaddrinfo(node.host_name, None, type=socket.SOCK_DGRAM)
        except OSError as e:
            log.debug("netcheck: cannot resolve %s (node %s): %s", node.host_name, node.name, e)
            return
        addrs = [str(info[4][0]) for info in infos]
        out[node.name] = list(dict.fromkeys(addrs))

    with anyio.move_on_after(limit):
        async with anyio.create_task_group() as tg:
            for node in wanted:
                tg.start_soon(lookup, node)
    return out


async def _open_udp(family: Family, local_port: int) -> anyio.abc.UDPSocket | None:
    try:
        if family == 4:
            return await anyio.create_udp_socket(socket.AF_INET, local_host="0.0.0.0", local_port=local_port)
        return await anyio.create_udp_socket(socket.AF_INET6, local_host="::", local_port=local_port)
    except OSError as e:
        log.debug("netcheck: no IPv%d socket: %s", family, e)
        return None


async def netcheck(
    derp_map: DERPMap,
    *,
    state: NetcheckState | None = None,
    force_full: bool = False,
    portmap_probe: PortmapProbe | None = _default_portmap_probe,
    captive_portal: bool = True,
    stun_timeout: float = STUN_PROBE_TIMEOUT,
    report_timeout: float = REPORT_TIMEOUT,
    local_port: int = 0,
    home_last_heard: float | None = None,
    forced_region: int = 0,
    resolved: Mapping[str, Sequence[str]] | None = None,
) -> Report:
    """Measure the network and return a :class:`Report`; update ``state`` for the next run.

    ``state`` carries the previous report and the latency history: pass the same object to
    every run (a fresh one is used when None, so the report is full and there is no hysteresis).
    ``portmap_probe`` is an async callable returning an object with ``pmp``/``pcp``/``upnp``
    bools (default: ``natlib.portmap.probe`` when it exists); None skips the check and leaves
    those fields None. ``home_last_heard`` is when (in ``state.clock`` time) a DERP frame last
    arrived from the current home; ``forced_region`` pins the home when reachable; ``resolved``
    maps node names to addresses for nodes without a literal IP (default: looked up with
    getaddrinfo, for at most :data:`DNS_LOOKUP_LIMIT` seconds). Never raises for network
    failures: they show up as missing facts in the report.
    """
    if state is None:
        state = NetcheckState()
    if portmap_probe is _default_portmap_probe:
        _portmap_module()  # import now, not while STUN round trips are being timed
    started = state.clock()
    full = force_full or wants_full_report(
        started, last_full_at=state.last_full_at, last_report=state.last_report
    )
    last = state.last_report
    builder = ReportBuilder(full=full, os_has_ipv6=_os_has_ipv6())
    first_answer = anyio.Event()

    async with contextlib.AsyncExitStack() as stack:
        sockets: dict[Family, anyio.abc.UDPSocket] = {}
        for family in (4, 6):
            fam: Family = 4 if family == 4 else 6
            if fam == 6 and not builder.os_has_ipv6:
                continue
            sock = await _open_udp(fam, local_port)
            if sock is not None:
                sockets[fam] = await stack.enter_async_context(sock)
        if resolved is None:
            resolved = await _resolve_nodes(derp_map, DNS_LOOKUP_LIMIT)
        plan = plan_probes(
            derp_map, full=full, last=last, have_v4=4 in sockets, have_v6=6 in sockets, resolved=resolved
        )
        builder.full = plan.full

        async def run_portmap(probe: PortmapProbe) -> None:
            try:
                with anyio.move_on_after(PORTMAP_RESULT_WAIT):
                    result = await probe()
                    if result is not None:
                        builder.pmp, builder.pcp, builder.upnp = result.pmp, result.pcp, result.upnp
            except Exception as e:  # a broken probe must not take the report down
                log.warning("netcheck: port-mapping probe failed: %r", e)

        async def run_captive(node: DERPNode) -> None:
            with anyio.move_on_after(CAPTIVE_PORTAL_DELAY):
                await first_answer.wait()
            if first_answer.is_set():
                return
            try:
                with anyio.fail_after(HTTP_TIMEOUT):
                    builder.captive_portal = await _captive_portal_check(node)
            except _PROBE_ERRORS as e:
                log.debug("netcheck: captive-portal check via %s failed: %s", node.name, e)

        async def run_https(region_id: int, node: DERPNode) -> None:
            try:
                with anyio.fail_after(HTTP_TIMEOUT):
                    builder.add_https_latency(region_id, await https_latency(node))
            except _PROBE_ERRORS as e:
                log.debug("netcheck: HTTPS latency to region %d (%s) failed: %s", region_id, node.name, e)

        with anyio.move_on_after(report_timeout):
            async with anyio.create_task_group() as tg:
                if portmap_probe is not None:
                    tg.start_soon(run_portmap, portmap_probe)
                portal_node = (
                    _captive_portal_node(derp_map, state.home) if captive_portal and plan.full else None
                )
                if portal_node is not None:
                    tg.start_soon(run_captive, portal_node)
                rule = StopRule(anyio.current_time(), full=plan.full, budget=stun_timeout)
                await _stun_phase(plan.probes, sockets, builder, rule, first_answer, stun_timeout)
                if not builder.udp:
                    for region_id in derp_map.region_ids():
                        region = derp_map.regions[region_id]
                        nodes = [n for n in region.nodes if not n.stun_only]
                        if (
                            region.no_measure_no_home
                            or not nodes
                            or region_id in builder.regions_with_latency()
                        ):
                            continue
                        tg.start_soon(run_https, region_id, nodes[0])

    now = state.clock()
    interim = builder.report()
    state.history.add(now, interim.region_latency)
    never_home = {r for r, reg in derp_map.regions.items() if reg.avoid or reg.no_measure_no_home}
    home = choose_home(
        now=now,
        current=interim.region_latency,
        best_recent=state.history.best(),
        previous_home=state.home,
        region_score=derp_map.region_score,
        last_heard_from_home=home_last_heard,
        forced_region=forced_region,
        never_home=never_home,
    )
    report = interim.with_home(home)
    state.last_report = report
    if report.full:
        state.last_full_at = started
    return report
