"""Prometheus metrics for the relay, served on their own listener (``-metrics-addr``).

The hot path only bumps plain integers in :class:`~relay._stats.RelayStats` and
:class:`~relay._stun_server.StunStats`. :class:`RelayCollector` turns them into metric families at
scrape time, and computes the cheap gauges (non-ideal, WebSocket and TLS connections, clients in the
region) from the live routing table. Nothing is locked: the scrape runs on the trio thread, between
two checkpoints of the relay's tasks, so it sees a consistent snapshot.

Every name starts with ``meshrelay_`` and follows the Prometheus conventions (``_total`` counters,
base units ``_bytes`` and ``_seconds``, labels whose ``sum()`` makes sense). ``docs/metrics.md``
maps each one to derper's expvar name. The registry also carries the ``process_*`` and
``python_*`` series of prometheus-client's process, platform and GC collectors.

The endpoint is a small trio + h11 server, separate from the relay's front end:

- ``GET /metrics``: the exposition, in the format the ``Accept`` header asks for
  (``choose_encoder``: Prometheus text 0.0.4 by default, OpenMetrics when asked), gzipped when
  ``Accept-Encoding`` allows it; ``?name[]=...`` restricts it to some series, like
  prometheus-client's own servers;
- ``GET /``: a short page linking to ``/metrics``;
- anything else: 404; methods other than GET and HEAD: 405.
"""

from __future__ import annotations

import errno
import gzip
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs

import h11
import trio
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families

from . import __version__
from ._stats import RelayStats
from ._stun_server import StunStats
from ._ws import WebSocketTransport

if TYPE_CHECKING:
    from ._mesh import WorkerLinkStats
    from ._server import RelayServer
    from ._state import RoutingTable

__all__ = [
    "DEFAULT_METRICS_PORT",
    "PREFIX",
    "RelayCollector",
    "WorkerMetricsMerger",
    "build_registry",
    "render",
    "serve_metrics",
]

log = logging.getLogger(__name__)

PREFIX: Final = "meshrelay_"
DEFAULT_METRICS_PORT: Final = 9380
REQUEST_TIMEOUT: Final = 30.0  # for a request head, and for an idle keep-alive connection
MAX_CONNECTIONS: Final = 64  # concurrent scrapers; more wait in the kernel's accept queue
MAX_HEADER: Final = 16 << 10
MAX_BODY: Final = 64 << 10
_ACCEPT_RETRY_ERRNOS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

INDEX_PAGE: Final = b"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>meshrelay metrics</title></head>
<body><h1>meshrelay metrics</h1><p><a href="/metrics">/metrics</a></p></body></html>
"""


def _counter(name: str, doc: str, value: float, unit: str = "") -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value, unit=unit)


def _gauge(name: str, doc: str, value: float, unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value, unit=unit)


def _labelled_counter(
    name: str,
    doc: str,
    labels: Iterable[str],
    items: Iterable[tuple[Iterable[object], float]],
    unit: str = "",
) -> CounterMetricFamily:
    m = CounterMetricFamily(PREFIX + name, doc, labels=list(labels), unit=unit)
    for label_values, value in items:
        m.add_metric([str(v) for v in label_values], value)
    return m


def _labelled_gauge(
    name: str, doc: str, labels: Iterable[str], items: Iterable[tuple[Iterable[object], float]]
) -> GaugeMetricFamily:
    m = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
    for label_values, value in items:
        m.add_metric([str(v) for v in label_values], value)
    return m


class RelayCollector:
    """A custom collector over the relay's plain-int counters and its routing table.

    ``table`` may be None (counters only, e.g. for a STUN-only process); gauges read from it are
    then 0.
    """

    def __init__(
        self,
        stats: RelayStats,
        stun: StunStats | None = None,
        table: RoutingTable | None = None,
        links: WorkerLinkStats | None = None,
        idle_spin: Callable[[], tuple[int, int]] | None = None,
    ):
        self.idle_spin = idle_spin  # (spins, spins ended by data), read at scrape time
        self.stats = stats
        self.stun = stun
        self.table = table
        self.links = links  # set in a worker of a -workers group

    def describe(self) -> list[Metric]:
        # The families are the same at every scrape: describe them by collecting once, so the
        # registry can check for clashing names at registration.
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield from self._connection_gauges()

        # -- traffic --------------------------------------------------------------------------
        yield _counter("accepts", "TCP connections accepted on the relay's listeners.", s.accepts)
        yield _counter(
            "websocket_accepts", "Connections upgraded to DERP over WebSocket.", s.websocket_accepts
        )
        yield _counter(
            "dup_client_connections",
            "Connections registered for a key that already had one (duplicate clients).",
            s.total_dup_client_conns,
        )
        yield _labelled_counter(
            "packets_received",
            "SendPacket payloads received from local clients, by kind (disco or other); "
            "forwarded packets are not counted.",
            ["kind"],
            [
                (["disco"], s.packets_received_disco),
                (["other"], s.packets_received - s.packets_received_disco),
            ],
        )
        yield _counter(
            "received_bytes",
            "Payload bytes of the SendPacket frames counted in packets_received.",
            s.bytes_received,
            "bytes",
        )
        yield _counter("packets_sent", "Packets written to clients (RecvPacket payloads).", s.packets_sent)
        yield _counter(
            "sent_bytes", "Payload bytes of the packets counted in packets_sent.", s.bytes_sent, "bytes"
        )
        yield _labelled_counter(
            "packets_dropped",
            "Packets dropped, by reason and kind (derper's reasons; every combination is exported).",
            ["reason", "kind"],
            sorted(s.packets_dropped.items()),
        )
        yield _labelled_counter(
            "dropped_bytes",
            "Payload bytes of the packets counted in packets_dropped, by reason and kind.",
            ["reason", "kind"],
            sorted(s.bytes_dropped.items()),
            "bytes",
        )
        yield _labelled_counter(
            "packets_forwarded",
            "Packets forwarded between relays of the region: out = to another relay, "
            "in = ForwardPacket received from one.",
            ["direction"],
            [(["in"], s.packets_forwarded_in), (["out"], s.packets_forwarded_out)],
        )
        yield _gauge(
            "average_queue_duration_seconds",
            "Time packets wait in a client's send queue: exponential moving average (alpha 0.1), "
            "as derper's average_queue_duration_ms.",
            s.average_queue_duration_ms / 1000.0,
            "seconds",
        )

        # -- DERP frames ----------------------------------------------------------------------
        yield _labelled_counter(
            "home_moves",
            "NotePreferred changes more than 5 s after connecting: in = became home, out = left.",
            ["direction"],
            [(["in"], s.home_moves_in), (["out"], s.home_moves_out)],
        )
        yield _counter("pings_received", "Ping frames received from clients.", s.got_ping)
        yield _counter("pongs_sent", "Pong frames written to clients.", s.sent_pong)
        yield _labelled_counter(
            "peer_gone_frames",
            "PeerGone frames queued to clients, by reason.",
            ["reason"],
            [
                (["disconnected"], s.peer_gone_disconnected_frames),
                (["not_here"], s.peer_gone_not_here_frames),
            ],
        )
        yield _counter("unknown_frames", "Frames of unknown type received (skipped).", s.unknown_frames)
        yield _counter(
            "write_timeouts", "Client connections closed because a write timed out.", s.sclient_write_timeouts
        )
        spins, spins_with_data = self.idle_spin() if self.idle_spin is not None else (0, 0)
        yield _counter(
            "idle_spins", "Times the relay polled its sockets before sleeping (-idle-spin).", spins
        )
        yield _counter(
            "idle_spins_ended_by_data",
            "Idle spins that ended because a socket became readable (a sleep and wake-up saved).",
            spins_with_data,
        )

        # -- mesh -----------------------------------------------------------------------------
        yield _gauge(
            "mesh_peers_up", "Other relays of the region this relay is connected to.", s.mesh_peers_up
        )
        yield _counter(
            "multiforwarders_created",
            "Times a key became reachable through a second relay of the region.",
            s.multiforwarder_created,
        )
        yield _counter(
            "multiforwarders_deleted",
            "Times a key went back to being reachable through a single relay of the region.",
            s.multiforwarder_deleted,
        )
        yield _counter(
            "forwarder_delete_mismatches",
            "Forwarder removals for a key/relay pair that was not registered.",
            s.packet_forwarder_delete_other_value,
        )

        # -- connection handling, TLS, admission, rate limits ---------------------------------
        yield _labelled_counter(
            "protocol_errors",
            "Connections closed for breaking the protocol or a limit, by reason.",
            ["reason"],
            sorted(([r], n) for r, n in s.protocol_errors.items()),
        )
        yield _labelled_counter(
            "http_requests",
            "HTTP requests answered on the relay's listeners, by route and status code.",
            ["route", "code"],
            sorted(s.http_requests.items()),
        )
        yield _counter(
            "handshake_timeouts",
            "Connections closed because the HTTP request or the DERP handshake took too long.",
            s.handshake_timeouts,
        )
        yield _counter(
            "tls_handshake_errors", "TLS handshakes that failed or timed out.", s.tls_handshake_errors
        )
        yield _labelled_counter(
            "tls_connections",
            "TLS connections accepted, by negotiated TLS version.",
            ["version"],
            sorted(([v], n) for v, n in s.tls_versions.items()),
        )
        yield _labelled_counter(
            "tls_listener_connections",
            "Connections on the TLS listener, by the accept limiter's decision "
            "(-accept-connection-limit; rejected ones are closed at once).",
            ["result"],
            [(["accepted"], s.tls_listener_accepted), (["rejected"], s.tls_listener_rejected)],
        )
        yield _labelled_counter(
            "admission_results",
            "Client admission decisions (-verify-client-url), by result.",
            ["result"],
            sorted(([r], n) for r, n in s.admission.items()),
        )
        yield _labelled_counter(
            "client_rejections",
            "Clients refused after the handshake, by reason.",
            ["reason"],
            sorted(([r], n) for r, n in s.rejected_clients.items()),
        )
        yield _gauge(
            "rate_limit_bytes_per_second",
            "Per-client receive rate limit in force (-rate-config); 0 = off.",
            s.rate_limit_bytes_per_second,
        )
        yield _gauge(
            "rate_limit_burst_bytes",
            "Per-client receive burst in force (-rate-config); 0 = off.",
            s.rate_limit_burst_bytes,
            "bytes",
        )
        yield _counter(
            "rate_limit_waits",
            "Socket reads (up to 64 KiB each) that waited for a client's rate-limit token bucket.",
            s.rate_limit_waits,
        )
        yield _counter(
            "rate_limit_wait_seconds",
            "Time spent waiting for clients' rate-limit token buckets.",
            s.rate_limit_wait_seconds,
            "seconds",
        )

        # -- STUN ----------------------------------------------------------------------------
        st = self.stun if self.stun is not None else StunStats()
        yield _labelled_counter(
            "stun_requests",
            "STUN datagrams received, by disposition (success = answered).",
            ["disposition"],
            [([d], n) for d, n in st.by_disposition().items()],
        )
        yield _labelled_counter(
            "stun_binding_requests",
            "Valid STUN Binding Requests, by the requester's address family.",
            ["family"],
            [([f], n) for f, n in st.by_family().items()],
        )

        if self.links is not None:
            yield from self._worker_link_metrics(self.links)

        info = InfoMetricFamily(PREFIX + "build", "meshrelay version (value always 1).")
        info.add_metric([], {"version": __version__})
        yield info

    def _worker_link_metrics(self, links: WorkerLinkStats) -> Iterator[Metric]:
        yield _gauge(
            "worker_links_up",
            "Links up between sibling workers of this relay (-workers N: N*(N-1) when all are up).",
            links.links_up,
        )
        yield _labelled_counter(
            "worker_forwarded_packets",
            "Packets handed between sibling workers over their loopback links: out = to a sibling, "
            "in = received from one.",
            ["direction"],
            [(["in"], links.forwarded_in), (["out"], links.forwarded_out)],
        )

    def _connection_gauges(self) -> Iterator[Metric]:
        s = self.stats
        notideal = websocket = local = remote = 0
        tls: dict[str, int] = {}
        table = self.table
        if table is not None:
            local = len(table.sets)
            # Keys only at other relays of the region (a sibling worker's clients are local to
            # this relay; sibling forwarders come first in each list).
            remote = sum(
                1 for k, p in table.forwarders.items() if k not in table.sets and not p[0].is_sibling
            )
            for cs in table.sets.values():
                for c in cs.conns:
                    if c.not_ideal:
                        notideal += 1
                    if isinstance(c.transport, WebSocketTransport):
                        websocket += 1
                    if c.transport.is_tls:
                        v = c.transport.tls_version or "unknown"
                        tls[v] = tls.get(v, 0) + 1
        yield _gauge(
            "current_connections", "DERP clients connected (after the handshake).", s.current_connections
        )
        yield _gauge(
            "current_home_connections",
            "Connected clients that say this relay is their home (NotePreferred).",
            s.current_home_connections,
        )
        yield _gauge(
            "current_notideal_connections",
            "Connected clients whose Ideal-Node header named another relay.",
            notideal,
        )
        yield _gauge(
            "current_dup_client_keys", "Keys with more than one connection.", s.current_dup_client_keys
        )
        yield _gauge(
            "current_dup_client_connections",
            "Connections of keys with more than one connection.",
            s.current_dup_client_conns,
        )
        yield _gauge("current_websocket_connections", "DERP clients connected over WebSocket.", websocket)
        for v in ("1.2", "1.3"):
            tls.setdefault(v, 0)
        yield _labelled_gauge(
            "current_tls_connections",
            "DERP clients connected over TLS, by negotiated TLS version.",
            ["version"],
            sorted(([v], n) for v, n in tls.items()),
        )
        yield _gauge("watchers", "Mesh peers watching this relay's connections (WatchConns).", s.watchers)
        yield _labelled_gauge(
            "clients",
            "Distinct client keys in the region: local = connected here, remote = only through "
            "another relay of the region.",
            ["location"],
            [(["local"], local), (["remote"], remote)],
        )


def build_registry(server: RelayServer, stun: StunStats | None = None) -> CollectorRegistry:
    """A dedicated registry: the relay's collector plus process, platform and GC collectors."""
    registry = CollectorRegistry(auto_describe=True)
    links = server.worker_links if server.sibling_secret is not None else None
    registry.register(
        RelayCollector(server.stats, stun, server.table, links, lambda: server.idle_spin_counts)
    )
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


# -- one picture of a -workers group -------------------------------------------------------------

_SampleKey = tuple[str, str, tuple[tuple[str, str], ...]]  # (family, sample name, labels)

# How a gauge of several workers becomes the group's value (default: the sum). Counters are summed.
_GAUGE_MAX: Final = frozenset(
    {
        PREFIX + "rate_limit_bytes_per_second",  # configuration: the same in every worker
        PREFIX + "rate_limit_burst_bytes",
        PREFIX + "build_info",
        "python_info",
        "process_max_fds",
    }
)
# Every worker dials every other relay: the worst worker is the group's mesh connectivity.
_GAUGE_MIN: Final = frozenset({PREFIX + "mesh_peers_up", "process_start_time_seconds"})
_GAUGE_MEAN: Final = frozenset({PREFIX + "average_queue_duration_seconds"})


def _gauge_rule(sample: str, labels: tuple[tuple[str, str], ...]) -> str:
    if sample in _GAUGE_MAX:
        return "max"
    if sample in _GAUGE_MIN:
        return "min"
    if sample in _GAUGE_MEAN:
        return "mean"
    if sample == PREFIX + "clients" and ("location", "remote") in labels:
        return "max"  # every worker learns the same keys from the other relays
    return "sum"


@dataclass(slots=True)
class _WorkerSeen:
    pid: int
    counters: dict[_SampleKey, float] = field(default_factory=dict)


class WorkerMetricsMerger:
    """Merge the expositions of the workers of a ``-workers`` group into the numbers of one relay.

    Sans-io: :meth:`update` takes each worker's scrape (Prometheus text, or None if it did not
    answer), :meth:`collect` yields the merged families. Counters are summed, and stay monotonic
    across worker restarts: the last numbers seen from a worker that has since been replaced are
    kept and added (what it counted between that scrape and its end is lost). A worker that does
    not answer contributes its last counters and no gauges. Gauges are summed except for the few
    where the sum means nothing (see ``_gauge_rule``).
    """

    def __init__(self) -> None:
        self._seen: dict[int, _WorkerSeen] = {}  # worker index -> its latest scrape
        self._retired: dict[_SampleKey, float] = {}
        self._meta: dict[str, tuple[str, str]] = {}  # family -> (type, help)
        self._merged: dict[_SampleKey, float] = {}
        # Each worker's own connection count (its share of the relay's clients), as last scraped.
        self.worker_connections: dict[int, float] = {}

    def update(self, scrapes: dict[int, tuple[int, str | None]]) -> None:
        """``scrapes``: worker index -> (pid, exposition text or None)."""
        counters: dict[_SampleKey, list[float]] = {}
        gauges: dict[_SampleKey, list[float]] = {}
        for index, (pid, text) in sorted(scrapes.items()):
            seen = self._seen.get(index)
            if seen is not None and seen.pid != pid:  # restarted: keep what the old one counted
                for k, v in seen.counters.items():
                    self._retired[k] = self._retired.get(k, 0.0) + v
                seen = None
                del self._seen[index]
            if text is None:
                self.worker_connections.pop(index, None)
                if seen is not None:
                    for k, v in seen.counters.items():
                        counters.setdefault(k, []).append(v)
                continue
            try:
                families = list(text_string_to_metric_families(text))
            except ValueError:
                log.warning("metrics: worker %d sent an unreadable exposition; skipped", index)
                continue
            fresh = _WorkerSeen(pid)
            for fam in families:
                self._meta.setdefault(fam.name, (fam.type, fam.documentation))
                for sample in fam.samples:
                    # (label order as the workers wrote it: they all run the same code)
                    key = (fam.name, sample.name, tuple(sample.labels.items()))
                    if fam.type == "gauge":
                        gauges.setdefault(key, []).append(sample.value)
                        if sample.name == PREFIX + "current_connections":
                            self.worker_connections[index] = sample.value
                    else:
                        fresh.counters[key] = sample.value
                        counters.setdefault(key, []).append(sample.value)
            self._seen[index] = fresh
        merged: dict[_SampleKey, float] = {}
        for key in [*counters, *(k for k in self._retired if k not in counters)]:
            merged[key] = sum(counters.get(key, ())) + self._retired.get(key, 0.0)
        for key, values in gauges.items():
            rule = _gauge_rule(key[1], key[2])
            if rule == "max":
                merged[key] = max(values)
            elif rule == "min":
                merged[key] = min(values)
            elif rule == "mean":
                merged[key] = sum(values) / len(values)
            else:
                merged[key] = sum(values)
        self._merged = merged

    def collect(self) -> Iterator[Metric]:
        by_family: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        for (family, sample, label_pairs), value in self._merged.items():
            by_family.setdefault(family, []).append((sample, dict(label_pairs), value))
        for family, samples in by_family.items():
            typ, doc = self._meta[family]
            m = Metric(family, doc, typ)
            for sample, labels, value in samples:
                m.add_sample(sample, labels, value)
            yield m


# -- the HTTP endpoint ---------------------------------------------------------------------------


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    return b", ".join(v for k, v in headers if k == name).decode("latin-1")


def render(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], registry: CollectorRegistry
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Answer one request: (status, headers, body). Header names must be lowercase."""
    path, _, query = target.partition(b"?")
    if method not in (b"GET", b"HEAD"):
        return (
            405,
            [(b"Allow", b"GET, HEAD"), (b"Content-Type", b"text/plain; charset=utf-8")],
            (b"method not allowed\n"),
        )
    if path == b"/metrics":
        encoder, content_type = choose_encoder(_header(headers, b"accept"))
        params = parse_qs(query.decode("latin-1"))
        source = registry.restricted_registry(params["name[]"]) if "name[]" in params else registry
        body = encoder(source)
        out = [(b"Content-Type", content_type.encode()), (b"Vary", b"Accept, Accept-Encoding")]
        if gzip_accepted(_header(headers, b"accept-encoding")):
            body = gzip.compress(body, compresslevel=6)
            out.append((b"Content-Encoding", b"gzip"))
        return 200, out, body
    if path == b"/":
        return 200, [(b"Content-Type", b"text/html; charset=utf-8")], INDEX_PAGE
    return 404, [(b"Content-Type", b"text/plain; charset=utf-8")], b"not found; try /metrics\n"


Refresh = Callable[[], Awaitable[None]]


async def serve_metrics(
    host: str | None,
    port: int,
    registry: CollectorRegistry,
    *,
    sockets: Sequence[trio.socket.SocketType] = (),
    before_scrape: Refresh | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``registry`` over HTTP on ``host:port`` (``None``/``""``: every address) until cancelled.

    ``task_status.started`` reports the bound addresses, so port 0 works in tests. ``sockets``:
    listening sockets made elsewhere, served instead of ``host:port``. ``before_scrape`` is awaited
    before each ``/metrics`` answer (a ``-workers`` supervisor collects its workers' numbers there).
    """
    if sockets:
        listeners = [trio.SocketListener(s) for s in sockets]
    else:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
    bound = [(str(lst.socket.getsockname()[0]), int(lst.socket.getsockname()[1])) for lst in listeners]
    slots = trio.Semaphore(MAX_CONNECTIONS)
    try:
        async with trio.open_nursery() as nursery:
            for lst in listeners:
                nursery.start_soon(_accept_loop, lst, registry, slots, before_scrape)
            task_status.started(bound)
    finally:
        for lst in listeners:
            lst.socket.close()


async def _accept_loop(
    listener: trio.SocketListener,
    registry: CollectorRegistry,
    slots: trio.Semaphore,
    before_scrape: Refresh | None = None,
) -> None:
    async with trio.open_nursery() as handlers:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as e:
                slots.release()
                if e.errno in _ACCEPT_RETRY_ERRNOS:
                    log.error("metrics: accept failed (%s); retrying in 100 ms", e)
                    await trio.sleep(0.1)
                    continue
                raise
            except BaseException:
                slots.release()
                raise
            handlers.start_soon(_serve_connection, stream, registry, slots, before_scrape)


async def _serve_connection(
    stream: trio.SocketStream,
    registry: CollectorRegistry,
    slots: trio.Semaphore,
    before_scrape: Refresh | None = None,
) -> None:
    try:
        await _serve_http(stream, registry, before_scrape)
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except h11.ProtocolError as e:
        log.debug("metrics: HTTP error: %s", e)
    except Exception:
        log.exception("metrics: unexpected error serving a scrape")
    finally:
        slots.release()
        await trio.aclose_forcefully(stream)


async def _serve_http(
    stream: trio.SocketStream, registry: CollectorRegistry, before_scrape: Refresh | None = None
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER)
    while True:
        with trio.fail_after(REQUEST_TIMEOUT):
            request: h11.Request | None = None
            body_len = 0
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as e:
                    await _send(
                        stream, conn, b"GET", e.error_status_hint, [], str(e).encode() + b"\n", close=True
                    )
                    return
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(16 << 10))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body_len += len(event.data)
                    if body_len > MAX_BODY:
                        return
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # ConnectionClosed, or PAUSED (cannot happen before EndOfMessage)
                    return
        assert request is not None
        headers = [(k.lower(), v) for k, v in request.headers.raw_items()]
        if before_scrape is not None and request.target.startswith(b"/metrics"):
            await before_scrape()
        # Generated inline on the trio thread: the collector reads live state without locks.
        status, out, body = render(request.method, request.target, headers, registry)
        await _send(stream, conn, request.method, status, out, body)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()


async def _send(
    stream: trio.SocketStream,
    conn: h11.Connection,
    method: bytes,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    close: bool = False,
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    all_headers = [*headers, (b"Content-Length", str(len(body)).encode())]
    if close:
        all_headers.append((b"Connection", b"close"))
    data = conn.send(h11.Response(status_code=status, headers=all_headers)) or b""
    if method != b"HEAD" and body:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    with trio.fail_after(REQUEST_TIMEOUT):
        await stream.send_all(data)
