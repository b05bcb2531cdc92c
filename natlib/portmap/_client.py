"""The I/O half of natlib.portmap: probing, creating, renewing and releasing mappings on anyio.

Everything protocol-shaped happens in the sans-io modules (``_natpmp``, ``_pcp``, ``_upnp``,
``_state``); this module owns sockets, clocks and tasks, and runs under trio and asyncio alike.

:func:`probe` asks the gateway for all three services at once from one ephemeral UDP socket and
returns within ``timeout`` (250 ms): a NAT-PMP external address request and a PCP ANNOUNCE to port
5351, and SSDP M-SEARCHes, first unicast to the gateway's port 1900 (so that a stateful host
firewall lets the router's unicast answer to the multicast search in), then multicast, then one
for InternetGatewayDevice:1 (some routers answer ``ssdp:all`` with only their first, non-IGD
device). Once the first UPnP answer is in, it collects others for 50 ms more; answers from the
gateway's address are accepted from any source port if they name an IGD.

:class:`PortMapper` keeps one UDP mapping for one local port: protocols in the order NAT-PMP, PCP,
UPnP (or only those allowed), lifetime 7200 s, renewal at half the lifetime by a background task,
release on close, and router reboot detection through the NAT-PMP/PCP epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, TypeVar

import anyio
import anyio.abc

from . import _natpmp, _pcp, _upnp
from ._errors import (
    GatewayUnsupportedError,
    NoGatewayError,
    PortMapError,
    PortMapParseError,
    PortMapProtocolError,
    PortMapTimeoutError,
    PortMapUnavailableError,
    UpnpSoapFault,
)
from ._gateway import Gateway, find_gateway, usable_external_ip
from ._http import http_request
from ._state import (
    DEFAULT_LIFETIME,
    PRESENT_TTL,
    PROTOCOLS,
    Mapping,
    Protocol,
    ServiceCache,
    epoch_says_reboot,
    protocol_order,
    renew_time,
)

__all__ = ["PROBE_TIMEOUT", "PortMapper", "ProbeResult", "probe"]

logger = logging.getLogger(__name__)

PROBE_TIMEOUT: Final = 0.25
"""The whole probe's budget, in seconds."""
UPNP_COLLECT: Final = 0.05
"""After the first UPnP answer, wait this long for more."""
MAX_UPNP_ANSWERS: Final = 10
SSDP_HEAD_START: Final = 0.02
"""The SSDP searches leave once NAT-PMP and PCP have answered, or after this many seconds.
miniupnpd serves one datagram per socket per loop turn and, once it has SSDP answers scheduled,
sleeps until they are due: a PCP request queued behind a NAT-PMP one then waits up to ~200 ms."""
SSDP_MX: Final = 1
"""The smallest MX UPnP allows: devices that delay answers by up to MX seconds answer sooner."""
UPNP_DISCOVERY_TIMEOUT: Final = 2.0
"""How long the mapper searches for an IGD when the quick probe found none."""
DESCRIPTION_TIMEOUT: Final = 1.0
"""Budget for fetching the root description."""
SOAP_TIMEOUT: Final = 2.0
"""Budget for one SOAP call."""
MAX_SOAP_BYTES: Final = 16 * 1024
RELEASE_TIMEOUT: Final = 1.0
"""Budget for the best-effort release on close (shielded from cancellation)."""
UDP_SCHEDULE_UNKNOWN: Final = ((0.0, 0.125), 0.25)
"""NAT-PMP/PCP sends (offsets) and deadline when the service was not seen: fail fast, fall back."""
UDP_SCHEDULE_PRESENT: Final = ((0.0, 0.25, 0.75), 1.75)
"""NAT-PMP/PCP sends and deadline when the service is known to be there (RFC 6886 doubling)."""
RETRY_MIN: Final = 5.0
RETRY_MAX: Final = 60.0
UPNP_CONFLICT_TRIES: Final = 3
UPNP_PERMANENT_LEASE_ERRORS: Final = frozenset({725, 402})
UPNP_CONFLICT: Final = 718

_T = TypeVar("_T")


# -- probe -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """Which port mapping services the gateway offers."""

    pmp: bool
    """A NAT-PMP external address request succeeded."""
    pcp: bool
    """A PCP ANNOUNCE succeeded (not merely answered: NOT_AUTHORIZED or ADDRESS_MISMATCH give False)."""
    upnp: bool
    """The gateway answered an SSDP search (as an IGD, or from port 1900)."""
    gateway: str | None
    """The gateway asked, or None if there was none to ask."""
    local_ip: str | None = None
    """Our address on the gateway's subnet."""
    upnp_locations: tuple[str, ...] = ()
    """Root description URLs of the IGDs that answered, IGD:2 first, hosts rewritten to the gateway."""
    pmp_external_ip: str | None = None
    """The external address NAT-PMP reported (not yet checked for being public)."""
    pmp_epoch: int | None = None
    pcp_result: int | None = None
    """The PCP ANNOUNCE result code, if PCP answered (2 NOT_AUTHORIZED, 12 ADDRESS_MISMATCH...)."""
    pcp_epoch: int | None = None
    double_nat: bool = False
    """PCP said ADDRESS_MISMATCH: another NAT sits between us and the gateway."""
    error: str | None = None
    """Why nothing was probed, e.g. "gateway range likely lacks support"."""
    elapsed: float = 0.0
    """Seconds the probe took."""


@dataclass
class _ProbeState:
    gateway: str
    pmp: bool | None = None
    pcp: bool | None = None
    pmp_external_ip: str | None = None
    pmp_epoch: int | None = None
    pcp_result: int | None = None
    pcp_epoch: int | None = None
    upnp_first_at: float | None = None
    upnp_answers: list[_upnp.SsdpResponse] = field(default_factory=list)

    def feed(self, data: bytes, source: tuple[str, int], now: float) -> None:
        """Classify one datagram; anything malformed or from elsewhere is ignored (and logged)."""
        host, port = source[0], source[1]
        if host != self.gateway:
            return
        try:
            if port == _natpmp.NATPMP_PORT and data[:1] == b"\x00":
                self._feed_natpmp(_natpmp.parse_response(data))
            elif port == _pcp.PCP_PORT and data[:1] == b"\x02":
                self._feed_pcp(_pcp.parse_response(data))
            elif data[:5].upper() == b"HTTP/":
                answer = _upnp.parse_ssdp_response(data)
                if port != _upnp.SSDP_PORT and answer.igd_version is None:
                    return  # only IGD answers are trusted from another source port
                if len(self.upnp_answers) < MAX_UPNP_ANSWERS:
                    self.upnp_answers.append(answer)
                if self.upnp_first_at is None:
                    self.upnp_first_at = now
        except PortMapParseError as e:
            logger.debug("probe: ignoring a malformed answer from %s:%d: %s", host, port, e)

    def _feed_natpmp(self, response: _natpmp.NatPmpResponse) -> None:
        if not isinstance(response, _natpmp.ExternalAddressResponse):
            return
        if response.result == _natpmp.NatPmpResult.UNSUPPORTED_VERSION and self.pcp is None:
            # A NAT-PMP-only router answering our PCP ANNOUNCE (version 2) with "version 0 only".
            self.pcp = False
        if response.result == _natpmp.NatPmpResult.SUCCESS:
            self.pmp = True
            self.pmp_epoch = response.epoch
            self.pmp_external_ip = str(response.external_ip)
        elif self.pmp is None and response.result != _natpmp.NatPmpResult.UNSUPPORTED_VERSION:
            self.pmp = False

    def _feed_pcp(self, response: _pcp.PcpResponse) -> None:
        if response.opcode != _pcp.OP_ANNOUNCE:
            return
        self.pcp = response.result == _pcp.PcpResult.SUCCESS
        self.pcp_result = response.result
        self.pcp_epoch = response.epoch

    def done(self, now: float) -> bool:
        upnp_done = self.upnp_first_at is not None and now >= self.upnp_first_at + UPNP_COLLECT
        return self.pmp is not None and self.pcp is not None and upnp_done

    def wake_at(self, deadline: float) -> float:
        if self.upnp_first_at is not None:
            return min(deadline, self.upnp_first_at + UPNP_COLLECT)
        return deadline

    def locations(self) -> tuple[str, ...]:
        # IGD:2 answers first, then IGD:1, then any other answer from the gateway (typically
        # "upnp:rootdevice", which spec-following servers send first and whose description is
        # the IGD's; miniupnpd spaces its ssdp:all answers by MX/15 seconds).
        ranked = sorted(self.upnp_answers, key=lambda a: -(a.igd_version or 0))
        out: list[str] = []
        for answer in ranked:
            try:
                url = _upnp.rewrite_url_host(answer.location, self.gateway)
            except (PortMapParseError, ValueError):
                continue
            if url not in out:
                out.append(url)
        return tuple(out)


def _probe_datagrams(gateway: str, local_ip: str) -> list[tuple[bytes, str, int]]:
    multicast_host = f"{_upnp.SSDP_MULTICAST}:{_upnp.SSDP_PORT}"
    return [
        (_natpmp.encode_external_address_request(), gateway, _natpmp.NATPMP_PORT),
        (_pcp.encode_announce_request(local_ip), gateway, _pcp.PCP_PORT),
        (
            _upnp.encode_msearch(_upnp.ST_ALL, host=f"{gateway}:{_upnp.SSDP_PORT}", mx=SSDP_MX),
            gateway,
            _upnp.SSDP_PORT,
        ),
        (
            _upnp.encode_msearch(_upnp.ST_ALL, host=multicast_host, mx=SSDP_MX),
            _upnp.SSDP_MULTICAST,
            _upnp.SSDP_PORT,
        ),
        (
            _upnp.encode_msearch(_upnp.IGD_V1, host=multicast_host, mx=SSDP_MX),
            _upnp.SSDP_MULTICAST,
            _upnp.SSDP_PORT,
        ),
    ]


async def probe(
    gateway: str | None = None,
    *,
    timeout: float = PROBE_TIMEOUT,  # noqa: ASYNC109 (a collection window, not a cancellation timeout)
) -> ProbeResult:
    """Find out which of NAT-PMP, PCP and UPnP IGD the default gateway (or ``gateway``) offers.

    Never raises for network trouble: without a usable gateway the result is all False with
    :attr:`ProbeResult.error` set ("gateway range likely lacks support" for a non-private gateway
    or local address). Returns after at most ``timeout`` seconds, sooner when all three answered.
    Cancelling it closes its socket and cancels the probe.
    """
    start = anyio.current_time()
    try:
        gw = find_gateway(gateway)
    except (NoGatewayError, GatewayUnsupportedError) as e:
        return ProbeResult(False, False, False, gateway, error=str(e), elapsed=anyio.current_time() - start)
    state = await _run_probe(gw, timeout)
    result = _probe_result(gw, state, anyio.current_time() - start)
    _remember_probe(result)
    return result


_recent_probes: dict[str, tuple[ProbeResult, float]] = {}
"""The last probe result per gateway and when (``time.monotonic()``, valid across event loops), so
that a PortMapper made after a netcheck's :func:`probe` does not probe again: probing twice in a
row is not only slow but counterproductive with miniupnpd, which is busy for up to MX seconds
sending its spaced-out SSDP answers and then answers a second search late."""


def _remember_probe(result: ProbeResult) -> None:
    if result.gateway is not None and result.error is None:
        _recent_probes[result.gateway] = (result, time.monotonic())


def _recent_probe(gateway: str) -> tuple[ProbeResult, float] | None:
    """The last probe of ``gateway`` if it is younger than :data:`PRESENT_TTL`, with its age."""
    entry = _recent_probes.get(gateway)
    if entry is None:
        return None
    age = time.monotonic() - entry[1]
    return (entry[0], age) if age < PRESENT_TTL else None


def _probe_result(gw: Gateway, state: _ProbeState, elapsed: float) -> ProbeResult:
    return ProbeResult(
        pmp=bool(state.pmp),
        pcp=bool(state.pcp),
        upnp=bool(state.upnp_answers),
        gateway=gw.gateway,
        local_ip=gw.local_ip,
        upnp_locations=state.locations(),
        pmp_external_ip=state.pmp_external_ip,
        pmp_epoch=state.pmp_epoch,
        pcp_result=state.pcp_result,
        pcp_epoch=state.pcp_epoch,
        double_nat=state.pcp_result == _pcp.PcpResult.ADDRESS_MISMATCH,
        elapsed=elapsed,
    )


async def _run_probe(gw: Gateway, budget: float) -> _ProbeState:
    state = _ProbeState(gw.gateway)
    start = anyio.current_time()
    deadline = start + budget
    pmp_pcp, ssdp = (
        _probe_datagrams(gw.gateway, gw.local_ip)[:2],
        _probe_datagrams(gw.gateway, gw.local_ip)[2:],
    )
    ssdp_due: float | None = start + SSDP_HEAD_START
    async with await anyio.create_udp_socket(family=socket.AF_INET, local_host=gw.local_ip) as sock:
        raw = sock.extra(anyio.abc.SocketAttribute.raw_socket)
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(gw.local_ip))
        await _send_all(sock, pmp_pcp)
        while not state.done(anyio.current_time()) and anyio.current_time() < deadline:
            now = anyio.current_time()
            if ssdp_due is not None and (
                now >= ssdp_due or (state.pmp is not None and state.pcp is not None)
            ):
                await _send_all(sock, ssdp)
                ssdp_due = None
            wake = state.wake_at(deadline) if ssdp_due is None else min(deadline, ssdp_due)
            with anyio.move_on_at(wake):
                try:
                    data, source = await sock.receive()
                except OSError as e:
                    logger.debug("probe: receive failed: %s", e)
                    continue
                state.feed(data, source, anyio.current_time())
    return state


async def _send_all(sock: anyio.abc.UDPSocket, datagrams: Sequence[tuple[bytes, str, int]]) -> None:
    for data, host, port in datagrams:
        try:
            await sock.sendto(data, host, port)
        except OSError as e:  # e.g. no multicast route: the other searches still count
            logger.debug("probe: send to %s:%d failed: %s", host, port, e)


# -- mapping ---------------------------------------------------------------------------------------


@dataclass
class _PmpReplies:
    external: _natpmp.ExternalAddressResponse | None = None
    mapped: _natpmp.MapResponse | None = None


class PortMapper:
    """Keeps one UDP port mapping for ``local_port`` on the default gateway (or ``gateway``).

    Use it as an async context manager (or call :meth:`start` and :meth:`close`)::

        sock = await anyio.create_udp_socket(local_host="0.0.0.0", local_port=0)
        port = sock.extra(anyio.abc.SocketAttribute.local_port)
        async with PortMapper(port) as mapper:
            mapping = await mapper.map()          # Mapping(protocol="natpmp", external=(ip, port), ...)
            ...                                   # renewed in the background at half its lifetime

    ``gateway`` is the router's address (default: the IPv4 default gateway), or a
    :class:`Gateway` (router and our address toward it), which is used as given, without the
    private-range check: for tests and unusual networks.

    ``local_port`` must be the real local port of the socket that will receive the traffic; it is
    what every request names (never the external port a router handed out). ``protocols`` limits
    which protocols may be used (default all three, tried NAT-PMP, PCP, UPnP). With
    ``auto_renew`` a background task renews the mapping when :attr:`Mapping.renew_at` comes (or
    recreates it after a failure or a router reboot); without it the caller calls :meth:`renew`
    at that time.

    Leaving the context (also by cancellation) stops the background task and releases the mapping
    (NAT-PMP/PCP lifetime 0, UPnP DeletePortMapping), best effort within one second, shielded from
    the cancellation; errors during release are logged, not raised.
    """

    def __init__(
        self,
        local_port: int,
        *,
        gateway: str | Gateway | None = None,
        protocols: Sequence[Protocol] = PROTOCOLS,
        lifetime: int = DEFAULT_LIFETIME,
        auto_renew: bool = True,
        description: str = "natlib",
    ) -> None:
        if not 1 <= local_port <= 0xFFFF:
            raise ValueError(f"local port {local_port} is not mappable")
        unknown = set(protocols) - set(PROTOCOLS)
        if unknown or not protocols:
            raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {tuple(protocols)}")
        if not 1 <= lifetime <= 0xFFFFFFFF:
            raise ValueError(f"lifetime {lifetime} out of range")
        self.local_port = local_port
        self._gateway_arg = gateway
        self._protocols = tuple(p for p in PROTOCOLS if p in protocols)
        self._lifetime = lifetime
        self._auto_renew = auto_renew
        self._description = description
        self._gw: Gateway | None = None
        self._sock: anyio.abc.ConnectedUDPSocket | None = None
        self._cache = ServiceCache()
        self._probe: ProbeResult | None = None
        self._probe_at = -math.inf
        self._mapping: Mapping | None = None
        self._upnp_service: _upnp.UpnpService | None = None
        self._pcp_nonce = _pcp.new_nonce()
        self._epochs: dict[Protocol, tuple[int, float]] = {}
        self._lock = anyio.Lock()
        self._changed = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._wanted = False  # a mapping was asked for and not released: keep one
        self.reboots_detected = 0
        """How many router reboots (epoch going backwards) were seen."""

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def gateway(self) -> str | None:
        """The gateway in use (after :meth:`start`)."""
        return self._gw.gateway if self._gw else None

    @property
    def mapping(self) -> Mapping | None:
        """The current mapping, or None."""
        return self._mapping

    @property
    def last_probe(self) -> ProbeResult | None:
        """The probe result this mapper goes by (its own, or a recent one of the same gateway)."""
        return self._probe

    async def start(self) -> None:
        """Find the gateway and open the NAT-PMP/PCP socket. Raises :class:`NoGatewayError` or
        :class:`GatewayUnsupportedError` if there is no gateway worth asking."""
        if self._gw is not None:
            return
        gw = self._gateway_arg if isinstance(self._gateway_arg, Gateway) else find_gateway(self._gateway_arg)
        self._sock = await anyio.create_connected_udp_socket(
            gw.gateway, _natpmp.NATPMP_PORT, family=socket.AF_INET, local_host=gw.local_ip
        )
        self._gw = gw

    async def close(self) -> None:
        """Release the mapping (best effort, shielded, at most :data:`RELEASE_TIMEOUT`) and close."""
        with anyio.CancelScope(shield=True):
            try:
                with anyio.move_on_after(2 * RELEASE_TIMEOUT):  # also bounds waiting for a busy map()
                    await self.release()
            finally:
                if self._sock is not None:
                    await self._sock.aclose()
                    self._sock = None
                self._gw = None

    async def __aenter__(self) -> PortMapper:
        await self.start()
        if self._auto_renew:
            task_group = anyio.create_task_group()
            await task_group.__aenter__()
            self._task_group = task_group
            task_group.start_soon(self.maintain)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        try:
            if self._task_group is not None:
                self._task_group.cancel_scope.cancel()
                # The body's own exception is not the background task's: let it propagate as is.
                await self._task_group.__aexit__(None, None, None)
        finally:
            self._task_group = None
            await self.close()
        return None

    # -- public operations --------------------------------------------------------------------

    async def probe(
        self,
        *,
        timeout: float = PROBE_TIMEOUT,  # noqa: ASYNC109 (a collection window, not a cancellation timeout)
    ) -> ProbeResult:
        """Probe the gateway now (see :func:`probe`) and remember what is present for 10 minutes."""
        gw = self._require_gateway()
        start = anyio.current_time()
        state = await _run_probe(gw, timeout)
        now = anyio.current_time()
        result = _probe_result(gw, state, now - start)
        _remember_probe(result)
        self._absorb_probe(result, now, long_search=timeout >= UPNP_DISCOVERY_TIMEOUT)
        for protocol, epoch in (("natpmp", result.pmp_epoch), ("pcp", result.pcp_epoch)):
            if epoch is not None:
                self._note_epoch(protocol, epoch, now)  # type: ignore[arg-type]
        return result

    def _absorb_probe(self, result: ProbeResult, at: float, *, long_search: bool) -> None:
        self._cache.record("natpmp", result.pmp, at)
        self._cache.record("pcp", result.pcp, at)
        if result.upnp or long_search:
            # A quick probe can miss an IGD that spaces its answers out (miniupnpd, by MX/15 s):
            # only a long search's silence counts as "no UPnP".
            self._cache.record("upnp", result.upnp, at)
        self._probe, self._probe_at = result, at

    def _adopt_recent_probe(self) -> bool:
        """Use another probe of our gateway from the last 10 minutes (e.g. netcheck's), if any."""
        gw = self._require_gateway()
        recent = _recent_probe(gw.gateway)
        if recent is None or recent[0].local_ip != gw.local_ip:
            return False
        result, age = recent
        self._absorb_probe(result, anyio.current_time() - age, long_search=False)
        return True

    async def map(self, protocol: Protocol | None = None) -> Mapping:
        """Create (or refresh) the mapping and return it.

        With ``protocol`` only that one is tried; otherwise the allowed protocols in order NAT-PMP,
        PCP, UPnP, skipping those a recent probe found absent (a probe is run first when none is
        fresh). Raises :class:`PortMapUnavailableError` (with the reason per protocol) when none
        works, or, for a forced protocol, that protocol's error, e.g.
        :class:`UnusableExternalAddressError` for a private or zero external address or
        :class:`PortMapProtocolError` with the router's result code. Cancellation abandons the
        attempt; a mapping the router may have created then expires on its own.
        """
        async with self._lock:
            return await self._map_locked(protocol)

    async def renew(self) -> Mapping:
        """Refresh the current mapping with the same protocol (creating one if there is none).

        If the router's epoch shows it rebooted, the old mapping is considered lost and the new
        one (same request, possibly another external port) replaces it. If the protocol fails,
        the others are tried as in :meth:`map`.
        """
        async with self._lock:
            current = self._mapping
            if current is not None:
                try:
                    return await self._create(current.protocol)
                except PortMapError as e:
                    logger.warning("renewing the %s mapping failed (%s); trying afresh", current.protocol, e)
                    self._set_mapping(None)
            return await self._map_locked(None)

    async def release(self) -> None:
        """Delete the mapping on the router (best effort, bounded by :data:`RELEASE_TIMEOUT`)."""
        async with self._lock:
            mapping = self._mapping
            self._wanted = False
            if mapping is None or self._gw is None:
                self._set_mapping(None)
                return
            self._set_mapping(None)
            try:
                with anyio.fail_after(RELEASE_TIMEOUT):
                    if mapping.protocol == "natpmp":
                        await self._natpmp_request(lifetime=0, suggested=0)
                    elif mapping.protocol == "pcp":
                        await self._pcp_request(lifetime=0, suggested=0)
                    else:
                        await self._upnp_delete(mapping.external[1])
            except (PortMapError, OSError, TimeoutError) as e:
                logger.info("releasing the %s mapping %s failed: %s", mapping.protocol, mapping.external, e)
            else:
                logger.debug("released the %s mapping %s", mapping.protocol, mapping.external)

    # -- internals ----------------------------------------------------------------------------

    def _require_gateway(self) -> Gateway:
        if self._gw is None or self._sock is None:
            raise PortMapError("PortMapper is not started (use 'async with' or start())")
        return self._gw

    def _set_mapping(self, mapping: Mapping | None) -> None:
        self._mapping = mapping
        self._changed.set()
        self._changed = anyio.Event()

    async def _map_locked(self, protocol: Protocol | None) -> Mapping:
        self._require_gateway()
        if protocol is not None:
            if protocol not in self._protocols:
                raise ValueError(f"protocol {protocol!r} is not allowed for this PortMapper")
            return await self._create(protocol)
        if self._probe is None:
            self._adopt_recent_probe()
        now = anyio.current_time()
        if all(self._cache.state(p, now) is None for p in self._protocols):
            await self.probe()  # (UPnP, when its turn comes, searches longer if this missed it)
        failures: dict[str, str] = {}
        for candidate in protocol_order(self._protocols, self._cache, anyio.current_time()):
            try:
                return await self._create(candidate)
            except (PortMapError, OSError) as e:
                failures[candidate] = str(e) or type(e).__name__
                logger.debug("port mapping via %s failed: %s", candidate, failures[candidate])
        for p in self._protocols:
            failures.setdefault(p, "not offered by the gateway (probe)")
        raise PortMapUnavailableError(failures)

    def _fresh_locations(self) -> bool:
        return (
            bool(self._probe and self._probe.upnp_locations)
            and anyio.current_time() - self._probe_at < PRESENT_TTL
        )

    async def _create(self, protocol: Protocol) -> Mapping:
        previous = self._mapping
        suggested = previous.external[1] if previous is not None else self.local_port
        if protocol == "natpmp":
            mapping = await self._natpmp_map(suggested)
        elif protocol == "pcp":
            mapping = await self._pcp_map(suggested)
        else:
            mapping = await self._upnp_map(suggested, previous)
        self._cache.record(protocol, True, anyio.current_time())
        self._wanted = True
        if previous is not None and previous.protocol != protocol:
            logger.info("port mapping moved from %s to %s", previous.protocol, protocol)
        self._set_mapping(mapping)
        logger.debug("port mapping via %s: %s -> :%d", protocol, mapping.external, self.local_port)
        return mapping

    def _note_epoch(self, protocol: Protocol, epoch: int, now: float) -> bool:
        """Record an epoch; True (and the mapping dropped) if it shows a reboot."""
        previous = self._epochs.get(protocol)
        self._epochs[protocol] = (epoch, now)
        if previous is None or not epoch_says_reboot(previous[0], previous[1], epoch, now):
            return False
        self.reboots_detected += 1
        logger.warning(
            "%s epoch went from %d to %d: the router rebooted, mappings lost", protocol, previous[0], epoch
        )
        if self._mapping is not None and self._mapping.protocol == protocol:
            self._set_mapping(None)
        return True

    async def _udp_exchange(
        self, requests: Sequence[bytes], accept: Callable[[bytes], _T | None], protocol: Protocol
    ) -> _T:
        """Send ``requests`` on the schedule for ``protocol``; return the first accepted answer."""
        sock = self._sock
        if sock is None:
            raise PortMapError("PortMapper is closed")
        offsets, budget = (
            UDP_SCHEDULE_PRESENT
            if self._cache.state(protocol, anyio.current_time())
            else (UDP_SCHEDULE_UNKNOWN)
        )
        start = anyio.current_time()
        sent = 0
        while True:
            now = anyio.current_time()
            while sent < len(offsets) and start + offsets[sent] <= now:
                for request in requests:
                    with contextlib.suppress(OSError):  # a refused port shows up on receive
                        await sock.send(request)
                sent += 1
            wake = start + (offsets[sent] if sent < len(offsets) else budget)
            if now >= start + budget:
                self._cache.record(protocol, False, now)
                raise PortMapTimeoutError(f"{protocol}: no answer from {self.gateway} within {budget}s")
            with anyio.move_on_at(wake):
                try:
                    data = await sock.receive()
                except (OSError, anyio.BrokenResourceError) as e:
                    # ICMP port unreachable on the connected socket: nobody serves 5351.
                    self._cache.record(protocol, False, anyio.current_time())
                    raise PortMapTimeoutError(f"{protocol}: {self.gateway} refused: {e}") from None
                result = accept(data)
                if result is not None:
                    return result

    async def _natpmp_request(self, *, lifetime: int, suggested: int) -> _PmpReplies:
        replies = _PmpReplies()
        requests = [
            _natpmp.encode_map_request(self.local_port, suggested_external_port=suggested, lifetime=lifetime)
        ]
        if lifetime:
            requests.insert(0, _natpmp.encode_external_address_request())
        else:
            replies.external = _natpmp.ExternalAddressResponse(0, 0, None)  # not needed to delete

        def accept(data: bytes) -> _PmpReplies | None:
            try:
                response = _natpmp.parse_response(data)
            except PortMapParseError as e:
                logger.debug("natpmp: ignoring a malformed answer: %s", e)
                return None
            if isinstance(response, _natpmp.ExternalAddressResponse):
                if lifetime:
                    replies.external = response
            elif (
                response.protocol == "udp"
                and response.internal_port in (self.local_port, 0)
                # A late answer to an earlier create must not pass for the answer to a delete.
                and (response.lifetime == 0) == (lifetime == 0 or response.result != 0)
            ):
                replies.mapped = response
            return replies if replies.external is not None and replies.mapped is not None else None

        return await self._udp_exchange(requests, accept, "natpmp")

    async def _natpmp_map(self, suggested: int) -> Mapping:
        replies = await self._natpmp_request(lifetime=self._lifetime, suggested=suggested)
        assert replies.external is not None and replies.mapped is not None
        now = anyio.current_time()
        for response in (replies.external, replies.mapped):
            if response.result != _natpmp.NatPmpResult.SUCCESS:
                raise PortMapProtocolError(
                    f"natpmp: result {_result_name(_natpmp.NatPmpResult, response.result)}",
                    protocol="natpmp",
                    code=response.result,
                )
        self._note_epoch("natpmp", replies.mapped.epoch, now)
        external_ip = usable_external_ip(replies.external.external_ip, protocol="natpmp")
        if replies.mapped.external_port == 0:
            raise PortMapProtocolError("natpmp: the router mapped external port 0", protocol="natpmp")
        lifetime = replies.mapped.lifetime
        return Mapping(
            protocol="natpmp",
            external=(external_ip, replies.mapped.external_port),
            internal_port=self.local_port,
            lifetime=lifetime,
            obtained_at=now,
            renew_at=renew_time("natpmp", now, lifetime),
            epoch=replies.mapped.epoch,
        )

    async def _pcp_request(self, *, lifetime: int, suggested: int) -> _pcp.PcpResponse:
        gw = self._require_gateway()
        request = _pcp.encode_map_request(
            gw.local_ip,
            self._pcp_nonce,
            self.local_port,
            suggested_external_port=suggested,
            lifetime=lifetime,
        )

        def accept(data: bytes) -> _pcp.PcpResponse | None:
            try:
                response = _pcp.parse_map_response(data, self._pcp_nonce)
            except PortMapParseError as e:
                logger.debug("pcp: ignoring an answer: %s", e)
                return None
            if response.map is not None and (
                response.map.internal_port != self.local_port or response.map.protocol != _pcp.IPPROTO_UDP
            ):
                return None
            if response.result == _pcp.PcpResult.SUCCESS and (response.lifetime == 0) != (lifetime == 0):
                return None  # a late answer to an earlier create (or delete) with the same nonce
            return response

        return await self._udp_exchange([request], accept, "pcp")

    async def _pcp_map(self, suggested: int) -> Mapping:
        response = await self._pcp_request(lifetime=self._lifetime, suggested=suggested)
        now = anyio.current_time()
        if response.result != _pcp.PcpResult.SUCCESS:
            name = _result_name(_pcp.PcpResult, response.result)
            hint = " (another NAT between us and the gateway: double NAT)" if response.result == 12 else ""
            raise PortMapProtocolError(f"pcp: result {name}{hint}", protocol="pcp", code=response.result)
        assert response.map is not None  # parse_response guarantees it for a successful MAP
        self._note_epoch("pcp", response.epoch, now)
        external_ip = usable_external_ip(str(response.map.external_ip), protocol="pcp")
        if response.map.external_port == 0:
            raise PortMapProtocolError("pcp: the router mapped external port 0", protocol="pcp")
        return Mapping(
            protocol="pcp",
            external=(external_ip, response.map.external_port),
            internal_port=self.local_port,
            lifetime=response.lifetime,
            obtained_at=now,
            renew_at=renew_time("pcp", now, response.lifetime),
            epoch=response.epoch,
        )

    # -- UPnP ---------------------------------------------------------------------------------

    async def _upnp_service_for(self) -> _upnp.UpnpService:
        if self._upnp_service is not None:
            return self._upnp_service
        gw = self._require_gateway()
        if self._probe is None:
            self._adopt_recent_probe()
        locations = self._probe.upnp_locations if self._probe and self._fresh_locations() else ()
        if not locations:
            # The quick probe can miss an IGD that delays its answers (up to MX seconds): look longer.
            locations = (await self.probe(timeout=UPNP_DISCOVERY_TIMEOUT)).upnp_locations
        if not locations:
            raise PortMapError("upnp: no Internet Gateway Device answered the SSDP search")
        problems: list[str] = []
        for location in locations:
            try:
                reply = await http_request(
                    location, time_limit=DESCRIPTION_TIMEOUT, max_body=_upnp.MAX_XML_BYTES
                )
                if reply.status != 200:
                    raise PortMapProtocolError(f"HTTP {reply.status}", protocol="upnp", code=reply.status)
                service = _upnp.choose_service(_upnp.parse_root_description(reply.body, location, gw.gateway))
            except (PortMapError, OSError) as e:
                problems.append(f"{location}: {e}")
                continue
            if service is not None:
                self._upnp_service = service
                return service
            problems.append(f"{location}: no WAN connection service")
        raise PortMapError("upnp: " + "; ".join(problems))

    async def _soap(
        self, service: _upnp.UpnpService, action: str, args: Sequence[tuple[str, str]]
    ) -> dict[str, str]:
        request = _upnp.encode_soap_request(service.service_type, action, args)
        reply = await http_request(
            service.control_url,
            method="POST",
            headers=request.headers,
            body=request.body,
            time_limit=SOAP_TIMEOUT,
            max_body=MAX_SOAP_BYTES,
        )
        try:
            return _upnp.parse_soap_response(reply.body, action)
        except UpnpSoapFault:
            raise
        except PortMapParseError as e:
            if reply.status != 200:
                raise PortMapProtocolError(
                    f"upnp: {action}: HTTP {reply.status}", protocol="upnp", code=reply.status
                )
            raise PortMapParseError(f"upnp: {action}: {e}") from None

    async def _upnp_add(self, service: _upnp.UpnpService, external_port: int, lease: int) -> int:
        """One AddAnyPortMapping (IGDv2) or AddPortMapping call; returns the external port."""
        gw = self._require_gateway()
        args = _upnp.add_port_mapping_args(
            external_port=external_port,
            internal_port=self.local_port,
            internal_client=gw.local_ip,
            lease=lease,
            description=self._description,
        )
        if service.version >= 2:
            out = await self._soap(service, "AddAnyPortMapping", args)
            reserved = out.get("NewReservedPort", "")
            if not reserved.isdigit() or not 1 <= int(reserved) <= 0xFFFF:
                raise PortMapParseError(f"upnp: AddAnyPortMapping returned port {reserved[:20]!r}")
            return int(reserved)
        await self._soap(service, "AddPortMapping", args)
        return external_port

    async def _upnp_map(self, suggested: int, previous: Mapping | None) -> Mapping:
        service = await self._upnp_service_for()
        lease = self._lifetime
        port = suggested
        for attempt in range(UPNP_CONFLICT_TRIES):
            try:
                try:
                    external_port = await self._upnp_add(service, port, lease)
                except UpnpSoapFault as e:
                    if e.code not in UPNP_PERMANENT_LEASE_ERRORS or lease == 0:
                        raise
                    logger.info(
                        "upnp: error %s for a %d s lease; retrying with a permanent lease", e.code, lease
                    )
                    lease = 0
                    external_port = await self._upnp_add(service, port, lease)
                break
            except UpnpSoapFault as e:
                if e.code != UPNP_CONFLICT or attempt == UPNP_CONFLICT_TRIES - 1:
                    raise
                port = random.randint(1024, 0xFFFF)  # the suggested port is taken: try another one
        out = await self._soap(service, "GetExternalIPAddress", [])
        external_ip = usable_external_ip(out.get("NewExternalIPAddress"), protocol="upnp")
        now = anyio.current_time()
        if previous is not None and previous.protocol == "upnp" and previous.external[1] != external_port:
            with contextlib.suppress(PortMapError, OSError):
                await self._upnp_delete(previous.external[1])
        return Mapping(
            protocol="upnp",
            external=(external_ip, external_port),
            internal_port=self.local_port,
            lifetime=lease,
            obtained_at=now,
            renew_at=renew_time("upnp", now, lease),
        )

    async def _upnp_delete(self, external_port: int) -> None:
        service = await self._upnp_service_for()
        await self._soap(service, "DeletePortMapping", _upnp.delete_port_mapping_args(external_port))

    # -- background renewal -------------------------------------------------------------------

    async def maintain(self) -> None:
        """Keep the mapping alive: renew it at :attr:`Mapping.renew_at`; after a failure (or a
        reboot that lost it) try again with backoff (5 to 60 s) until a mapping exists again or
        :meth:`release` is called. Runs until cancelled; does nothing until :meth:`map` succeeded.

        The context manager runs it in a background task when ``auto_renew`` is true; callers of
        :meth:`start` / :meth:`close` run it in their own task group (and cancel it before close).
        Cancelling it in the middle of a renewal abandons that renewal; the mapping stays as it was.
        """
        retry_at: float | None = None
        while True:
            changed = self._changed
            if not self._wanted:
                await changed.wait()
                retry_at = None
                continue
            mapping = self._mapping
            due = (
                retry_at if retry_at is not None else (mapping.renew_at if mapping else anyio.current_time())
            )
            with anyio.move_on_at(due):
                await changed.wait()
            if self._changed is not changed:
                retry_at = None
                continue  # replaced, renewed or released meanwhile: recompute the due time
            try:
                await self.renew()
                retry_at = None
            except PortMapError as e:
                now = anyio.current_time()
                left = mapping.expires_at - now if mapping and mapping.expires_at is not None else RETRY_MAX
                retry_at = now + min(RETRY_MAX, max(RETRY_MIN, left / 2))
                logger.warning("port mapping renewal failed (%s); retrying in %.0f s", e, retry_at - now)


def _result_name(enum_type: type[_natpmp.NatPmpResult] | type[_pcp.PcpResult], code: int) -> str:
    try:
        return f"{code} {enum_type(code).name}"
    except ValueError:
        return str(code)
