"""The relay's Prometheus endpoint (``-metrics-addr``): exact counts after real DERP traffic,
content negotiation, gzip, routing, the command line, and a real Prometheus server scraping it.

Everything runs on 127.0.0.1; nothing sleeps to synchronise (the few loops that wait for another
process poll with a deadline).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import h11
import pytest
import trio
from derppeer import Peer, RelayHandle
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from relayproc import free_ports, relay_process

from natlib import stun
from natlib.derp import PeerGone, PeerGoneReason, RecvPacket
from natlib.keys import NodePrivateKey
from relay._config import ConfigError, build_flagset, config_from_args
from relay._metrics import build_registry, serve_metrics
from relay._stats import DROP_REASONS, PACKET_KINDS
from relay._stun_server import StunStats, serve_stun

DISCO_MAGIC = "TS💬".encode()
Labels = frozenset[tuple[str, str]]

# -- helpers ---------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


async def http_request(
    port: int, target: str, headers: list[tuple[str, str]] | None = None, method: str = "GET"
) -> Response:
    """One HTTP/1.1 request to 127.0.0.1:port (h11 client, deadline 5 s)."""
    responses = await http_requests(port, [(method, target, headers or [])])
    return responses[0]


async def http_requests(port: int, requests: list[tuple[str, str, list[tuple[str, str]]]]) -> list[Response]:
    """Several requests in turn on one keep-alive connection."""
    out: list[Response] = []
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            for method, target, headers in requests:
                if out:
                    conn.start_next_cycle()
                req = h11.Request(method=method, target=target, headers=[("Host", "127.0.0.1"), *headers])
                await stream.send_all((conn.send(req) or b"") + (conn.send(h11.EndOfMessage()) or b""))
                resp: h11.Response | None = None
                body = b""
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(ev, h11.Response):
                        resp = ev
                    elif isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    else:
                        raise AssertionError(f"unexpected {ev!r}")
                assert resp is not None
                out.append(Response(resp.status_code, {k.lower(): v for k, v in resp.headers}, body))
    return out


def samples(text: str, *, openmetrics: bool = False) -> dict[tuple[str, Labels], float]:
    """Every sample of an exposition: (sample name, labels) -> value."""
    parse = parse_openmetrics if openmetrics else parse_text
    return {(s.name, frozenset(s.labels.items())): s.value for fam in parse(text) for s in fam.samples}


def value(data: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    return data[(name, frozenset(labels.items()))]


async def scrape(port: int, accept: str | None = None) -> dict[tuple[str, Labels], float]:
    resp = await http_request(port, "/metrics", [("Accept", accept)] if accept else [])
    assert resp.status == 200
    return samples(resp.body.decode(), openmetrics=b"openmetrics" in resp.headers[b"content-type"])


def disco_like(n: int = 56) -> bytes:
    return DISCO_MAGIC + bytes(n)


@dataclass
class MetricsHandle:
    port: int
    stun: StunStats


@pytest.fixture
async def metrics(nursery: trio.Nursery, relay_http: RelayHandle) -> MetricsHandle:
    """The metrics endpoint of ``relay_http`` on 127.0.0.1, port chosen by the kernel."""
    stun_stats = StunStats()
    registry = build_registry(relay_http.relay, stun_stats)  # type: ignore[arg-type]
    bound = await nursery.start(serve_metrics, "127.0.0.1", 0, registry)
    return MetricsHandle(int(bound[0][1]), stun_stats)


async def drive_traffic(relay: RelayHandle, sizes: list[int]) -> tuple[Peer, Peer, bytes]:
    """c0 sends ``sizes`` packets to c1, then one disco packet to an unknown key.

    Returns after both clients' barriers, so every counter of that traffic is final.
    """
    c0 = await Peer.connect(relay)
    c1 = await Peer.connect(relay)
    for i, n in enumerate(sizes):
        await c0.send(c1.key, bytes([i]) * n)
    for i, n in enumerate(sizes):
        assert await c1.recv() == RecvPacket(c0.key.raw, bytes([i]) * n)
    nobody = NodePrivateKey.generate().public
    disco = disco_like()
    await c0.send(nobody, disco)
    assert await c0.barrier() == [PeerGone(nobody.raw, PeerGoneReason.NOT_HERE)]
    assert await c1.barrier() == []
    return c0, c1, disco


# -- the collector over live traffic ----------------------------------------------------------------


async def test_scrape_shows_exact_counts_after_traffic(
    relay_http: RelayHandle, metrics: MetricsHandle
) -> None:
    sizes = [1, 100, 1000, 1200, 7]
    _c0, _c1, disco = await drive_traffic(relay_http, sizes)
    m = await scrape(metrics.port)

    assert value(m, "meshrelay_packets_received_total", kind="other") == len(sizes)
    assert value(m, "meshrelay_packets_received_total", kind="disco") == 1
    assert value(m, "meshrelay_received_bytes_total") == sum(sizes) + len(disco)
    assert value(m, "meshrelay_packets_sent_total") == len(sizes)
    assert value(m, "meshrelay_sent_bytes_total") == sum(sizes)
    assert value(m, "meshrelay_packets_dropped_total", reason="unknown_dest", kind="disco") == 1
    assert value(m, "meshrelay_dropped_bytes_total", reason="unknown_dest", kind="disco") == len(disco)
    assert value(m, "meshrelay_peer_gone_frames_total", reason="not_here") == 1
    assert value(m, "meshrelay_current_connections") == 2
    assert value(m, "meshrelay_clients", location="local") == 2
    assert value(m, "meshrelay_clients", location="remote") == 0
    assert value(m, "meshrelay_accepts_total") == 2  # scrapes use their own listener
    assert value(m, "meshrelay_pings_received_total") == 2  # the two barriers
    assert value(m, "meshrelay_pongs_sent_total") == 2
    assert value(m, "meshrelay_http_requests_total", route="derp", code="101") == 2
    assert value(m, "meshrelay_current_websocket_connections") == 0
    assert value(m, "meshrelay_mesh_peers_up") == 0
    assert value(m, "meshrelay_build_info", version=_relay_version()) == 1

    # Every drop series exists from the start, and only the one drop is non-zero.
    for family in ("meshrelay_packets_dropped_total", "meshrelay_dropped_bytes_total"):
        combos = {
            dict(labels)["reason"] + "/" + dict(labels)["kind"]: v
            for (n, labels), v in m.items()
            if n == family
        }
        assert set(combos) == {f"{r}/{k}" for r in DROP_REASONS for k in PACKET_KINDS}
        assert len(combos) == 14
        assert sum(combos.values()) == (1 if family.startswith("meshrelay_packets") else len(disco))

    # Features not built yet are exported at 0 with their label values.
    for result in ("allowed", "denied", "fail_open", "fail_closed"):
        assert value(m, "meshrelay_admission_results_total", result=result) == 0
    assert value(m, "meshrelay_rate_limit_waits_total") == 0
    assert value(m, "meshrelay_rate_limit_wait_seconds_total") == 0

    # The registry's own process and Python series are there too.
    assert value(m, "process_cpu_seconds_total") > 0
    assert ("python_info", frozenset()) not in m  # it has labels
    assert any(n == "python_info" for n, _ in m)
    assert any(n == "python_gc_collections_total" for n, _ in m)


def _relay_version() -> str:
    from relay import __version__

    return __version__


async def test_gauges_follow_disconnects(relay_http: RelayHandle, metrics: MetricsHandle) -> None:
    c0 = await Peer.connect(relay_http)
    dup_key = NodePrivateKey.generate()
    await Peer.connect(relay_http, key=dup_key)
    await Peer.connect(relay_http, key=dup_key)
    m = await scrape(metrics.port)
    assert value(m, "meshrelay_current_connections") == 3
    assert value(m, "meshrelay_current_dup_client_keys") == 1
    assert value(m, "meshrelay_current_dup_client_connections") == 2
    assert value(m, "meshrelay_dup_client_connections_total") == 1
    assert value(m, "meshrelay_clients", location="local") == 2
    await c0.aclose()
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    with trio.fail_after(5):
        while stats.current_connections != 2:
            await trio.sleep(0.005)  # polling the server-side effect of a close, with a deadline
    m = await scrape(metrics.port)
    assert value(m, "meshrelay_current_connections") == 2
    assert value(m, "meshrelay_clients", location="local") == 1


async def test_tls_versions_counted(nursery: trio.Nursery, relay_https: RelayHandle) -> None:
    registry = build_registry(relay_https.relay)  # type: ignore[arg-type]
    bound = await nursery.start(serve_metrics, "127.0.0.1", 0, registry)
    await Peer.connect(relay_https)
    m = await scrape(int(bound[0][1]))
    assert value(m, "meshrelay_tls_connections_total", version="1.3") == 1
    assert value(m, "meshrelay_tls_connections_total", version="1.2") == 0
    assert value(m, "meshrelay_current_tls_connections", version="1.3") == 1
    assert value(m, "meshrelay_current_tls_connections", version="1.2") == 0
    assert value(m, "meshrelay_tls_handshake_errors_total") == 0


async def test_stun_requests_by_disposition_and_family(nursery: trio.Nursery, metrics: MetricsHandle) -> None:
    bound = await nursery.start(serve_stun, "127.0.0.1", 0, metrics.stun)
    stun_port = int(bound[0][1])
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        await sock.sendto(b"not a STUN message at all", ("127.0.0.1", stun_port))
        txid = os.urandom(12)
        await sock.sendto(stun.binding_request(txid), ("127.0.0.1", stun_port))
        with trio.fail_after(5):
            data, _ = await sock.recvfrom(2048)
        assert stun.parse_binding_response(data, txid)[0] == "127.0.0.1"
    # The server handles one socket's datagrams in order: the garbage was counted before the reply.
    m = await scrape(metrics.port)
    assert value(m, "meshrelay_stun_requests_total", disposition="not_stun") == 1
    assert value(m, "meshrelay_stun_binding_requests_total", family="ipv4") == 1
    assert value(m, "meshrelay_stun_binding_requests_total", family="ipv6") == 0
    with trio.fail_after(5):  # "success" is counted once sendto returned, just after the reply left
        while value(m, "meshrelay_stun_requests_total", disposition="success") != 1:
            m = await scrape(metrics.port)


# -- the HTTP endpoint ------------------------------------------------------------------------------


async def test_content_negotiation_and_gzip(relay_http: RelayHandle, metrics: MetricsHandle) -> None:
    await drive_traffic(relay_http, [10, 20])

    plain = await http_request(metrics.port, "/metrics")
    assert plain.headers[b"content-type"] == b"text/plain; version=0.0.4; charset=utf-8"
    assert b"content-encoding" not in plain.headers
    assert value(samples(plain.body.decode()), "meshrelay_packets_sent_total") == 2

    om = await http_request(
        metrics.port, "/metrics", [("Accept", "application/openmetrics-text; version=1.0.0")]
    )
    assert om.headers[b"content-type"].startswith(b"application/openmetrics-text; version=1.0.0")
    assert om.body.endswith(b"# EOF\n")
    assert b"# UNIT meshrelay_received_bytes bytes" in om.body
    m = samples(om.body.decode(), openmetrics=True)
    assert value(m, "meshrelay_packets_sent_total") == 2
    assert value(m, "meshrelay_received_bytes_total") == 30 + len(disco_like())
    assert not any(name.endswith("_created") and name.startswith("meshrelay_") for name, _ in m)

    # What Prometheus 2.x sends picks OpenMetrics too.
    prom_accept = (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
        "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )
    gz = await http_request(metrics.port, "/metrics", [("Accept", prom_accept), ("Accept-Encoding", "gzip")])
    assert gz.headers[b"content-encoding"] == b"gzip"
    assert gz.headers[b"content-type"].startswith(b"application/openmetrics-text")
    assert b"accept-encoding" in gz.headers[b"vary"].lower()
    unzipped = gzip.decompress(gz.body)
    assert unzipped.endswith(b"# EOF\n")
    assert value(samples(unzipped.decode(), openmetrics=True), "meshrelay_packets_sent_total") == 2
    assert len(gz.body) < len(unzipped) / 3

    ident = await http_request(metrics.port, "/metrics", [("Accept-Encoding", "identity")])
    assert b"content-encoding" not in ident.headers


async def test_routes_methods_keepalive_and_name_filter(metrics: MetricsHandle) -> None:
    index, missing, post, head, only = await http_requests(
        metrics.port,
        [
            ("GET", "/", []),
            ("GET", "/debug/varz", []),
            ("POST", "/metrics", [("Content-Length", "0")]),
            ("HEAD", "/metrics", []),
            ("GET", "/metrics?name[]=meshrelay_current_connections", []),
        ],
    )
    assert index.status == 200 and b'<a href="/metrics">' in index.body
    assert index.headers[b"content-type"].startswith(b"text/html")
    assert missing.status == 404
    assert post.status == 405 and post.headers[b"allow"] == b"GET, HEAD"
    assert head.status == 200 and head.body == b"" and int(head.headers[b"content-length"]) > 1000
    assert samples(only.body.decode()) == {("meshrelay_current_connections", frozenset()): 0.0}
    # A request the server cannot parse gets 400 and a closed connection.
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", metrics.port)
        async with stream:
            await stream.send_all(b"NOT HTTP\r\n\r\n")
            got = b""
            while chunk := await stream.receive_some(4096):
                got += chunk
    assert got.startswith(b"HTTP/1.1 400 ")


async def test_exposition_passes_promtool(relay_http: RelayHandle, metrics: MetricsHandle) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (bash .ci/metrics-deps.sh installs Debian's prometheus)")
    await drive_traffic(relay_http, [5])
    resp = await http_request(metrics.port, "/metrics")
    result = await trio.run_process(
        [promtool, "check", "metrics"], stdin=resp.body, capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


# -- configuration and the command line -------------------------------------------------------------


def test_metrics_addr_flag() -> None:
    fs = build_flagset()
    assert fs.flags["metrics-addr"].default == "127.0.0.1:9380"
    assert '(default "127.0.0.1:9380")' in fs.usage()

    def cfg(*argv: str) -> object:
        values, given = build_flagset().parse(["-dev", *argv])
        return config_from_args(values, given).metrics_addr

    assert cfg() == ("127.0.0.1", 9380)
    assert cfg("-metrics-addr=off") is None
    assert cfg("-metrics-addr=") is None
    assert cfg("-metrics-addr", ":9999") == ("", 9999)
    assert cfg("-metrics-addr", "[::1]:0") == ("::1", 0)
    with pytest.raises(ConfigError, match=r"^-metrics-addr: .*bad port"):
        cfg("-metrics-addr", "127.0.0.1:http-alt")
    with pytest.raises(ConfigError, match=r"^-metrics-addr: "):
        cfg("-metrics-addr", "localhost")


async def test_meshrelay_command_serves_metrics(tmp_path: Path) -> None:
    """``meshrelay -metrics-addr 127.0.0.1:0`` logs the bound address and serves /metrics there."""
    args = [
        "-c",
        str(tmp_path / "derper.key"),
        "-a",
        "127.0.0.1:0",
        "-stun=false",
        "-metrics-addr",
        "127.0.0.1:0",
    ]
    async with relay_process(*args) as relay:
        line = await relay.wait_for("serving metrics on http://", timeout=15)
        metrics_port = int(line.rsplit(":", 1)[1].split("/", 1)[0])
        m = await scrape(metrics_port)
        assert value(m, "meshrelay_current_connections") == 0
        assert value(m, "meshrelay_stun_requests_total", disposition="success") == 0
        assert any(n == "process_resident_memory_bytes" for n, _ in m)
    assert relay.returncode == 0


# -- a real Prometheus server ----------------------------------------------------------------------


async def _promql(port: int, query: str) -> list[dict[str, object]] | None:
    """The result vector of an instant query, or None while Prometheus is not answering yet."""
    import json

    try:
        resp = await http_request(port, "/api/v1/query?query=" + quote(query))
    except (OSError, trio.TooSlowError, h11.ProtocolError):
        return None
    if resp.status != 200:
        return None
    doc = json.loads(resp.body)
    assert doc["status"] == "success", doc
    result: list[dict[str, object]] = doc["data"]["result"]
    return result


def _scalar(result: list[dict[str, object]] | None) -> float | None:
    if not result:
        return None
    sample = result[0]["value"]
    assert isinstance(sample, list)
    return float(sample[1])


@pytest.mark.slow
async def test_real_prometheus_scrapes_live_relay(
    relay_http: RelayHandle, metrics: MetricsHandle, tmp_path: Path
) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("the prometheus server is not installed (bash .ci/metrics-deps.sh installs Debian's)")
    sizes = [64] * 7
    await drive_traffic(relay_http, sizes)

    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: meshrelay\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics.port}']\n"
    )
    web_port = free_ports()[0]
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        received = None
        with trio.move_on_after(25):
            while received != len(sizes) + 1:
                assert proc.poll() is None, "prometheus exited:\n" + log_path.read_text()[-3000:]
                received = _scalar(await _promql(web_port, "sum(meshrelay_packets_received_total)"))
                if received != len(sizes) + 1:
                    await trio.sleep(0.2)  # poll interval while Prometheus starts and scrapes
        assert received == len(sizes) + 1, (
            "no scrape in 25 s; prometheus log:\n" + log_path.read_text()[-3000:]
        )

        # The same scrape has the rest of the relay's series.
        assert _scalar(await _promql(web_port, 'up{job="meshrelay"}')) == 1
        assert _scalar(await _promql(web_port, "meshrelay_packets_sent_total")) == len(sizes)
        assert _scalar(await _promql(web_port, "meshrelay_sent_bytes_total")) == sum(sizes)
        query = 'meshrelay_packets_dropped_total{reason="unknown_dest",kind="disco"}'
        assert _scalar(await _promql(web_port, query)) == 1
        assert _scalar(await _promql(web_port, "count(meshrelay_packets_dropped_total)")) == 14
        assert _scalar(await _promql(web_port, "meshrelay_current_connections")) == 2
        assert _scalar(await _promql(web_port, "sum(meshrelay_clients)")) == 2
        assert (_scalar(await _promql(web_port, 'process_open_fds{job="meshrelay"}')) or 0) > 0
    finally:
        proc.kill()  # this process only, by its PID
        await trio.to_thread.run_sync(proc.wait)
