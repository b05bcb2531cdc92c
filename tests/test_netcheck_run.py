"""natlib.netcheck driver and ``python -m natlib netcheck`` on loopback, against two real relay
processes (TLS with pinned self-signed certificates, STUN), under trio and under asyncio."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import trio
from relayproc import RelayProcess, free_ports

from natlib.derpmap import DERPMap, parse_derp_map
from natlib.netcheck import NetcheckState, Report, netcheck


@dataclass
class LoopbackRelay:
    host: str
    derp_port: int
    stun_port: int
    cert_name: str


def _wait_for_line(relay: RelayProcess, text: str, deadline: float = 20.0) -> str:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for line in list(relay.lines):
            if text in line:
                return line
        assert relay.proc is not None and relay.proc.poll() is None, "relay exited:\n" + "".join(relay.lines)
        time.sleep(0.02)
    raise AssertionError(f"no {text!r} in the relay's log within {deadline} s:\n" + "".join(relay.lines))


@pytest.fixture(scope="module")
def relays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LoopbackRelay]]:
    """Two relays, on 127.0.0.1 and 127.0.0.2 (so STUN answers come from two server IPs)."""
    started: list[tuple[RelayProcess, LoopbackRelay]] = []
    try:
        for host in ("127.0.0.1", "127.0.0.2"):
            tmp = tmp_path_factory.mktemp("relay")
            derp_port, stun_port = free_ports(2)
            relay = RelayProcess(
                [
                    "-a", f"{host}:{derp_port}", "-certmode", "manual", "-certdir", str(tmp / "certs"),
                    "-hostname", host, "-c", str(tmp / "derper.key"), "-http-port", "-1",
                    "-stun-port", str(stun_port), "-metrics-addr=off",
                ]
            )  # fmt: skip
            relay.start()
            started.append((relay, LoopbackRelay(host, derp_port, stun_port, "")))
            _wait_for_line(relay, "STUN server listening")
            node = json.loads(_wait_for_line(relay, "sha256-raw:").strip())
            started[-1][1].cert_name = node["CertName"]
        yield [info for _, info in started]
    finally:
        for relay, _ in started:
            relay.stop()


def _map_document(relays: list[LoopbackRelay], *, stun: bool = True) -> dict[str, object]:
    regions = {}
    for i, r in enumerate(relays):
        region_id = 901 + i
        node = {
            "Name": f"{region_id}a",
            "RegionID": region_id,
            "HostName": r.host,
            "IPv4": r.host,
            "IPv6": "none",
            "CertName": r.cert_name,
            "DERPPort": r.derp_port,
            "STUNPort": r.stun_port if stun else free_ports(1)[0],
        }
        regions[str(region_id)] = {"RegionID": region_id, "RegionCode": f"lo{i}", "Nodes": [node]}
    return {"Regions": regions}


def _map(relays: list[LoopbackRelay], *, stun: bool = True) -> DERPMap:
    return parse_derp_map(json.dumps(_map_document(relays, stun=stun)))


@dataclass
class FakePortmap:
    pmp: bool = True
    pcp: bool = False
    upnp: bool = True


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_udp_report_over_two_regions(relays: list[LoopbackRelay], backend: str) -> None:
    derp_map = _map(relays)

    async def main() -> tuple[Report, Report, NetcheckState]:
        state = NetcheckState()

        async def portmap() -> FakePortmap:
            return FakePortmap()

        first = await netcheck(derp_map, state=state, portmap_probe=portmap)
        second = await netcheck(derp_map, state=state, portmap_probe=None)
        return first, second, state

    first, second, state = anyio.run(main, backend=backend)
    assert (first.udp, first.ipv4, first.ipv4_can_send, first.full) == (True, True, True, True)
    assert set(first.region_latency) == {901, 902} and set(first.latency_source.values()) == {"stun"}
    assert first.mapping_varies_by_dest_ip is False  # two server IPs, one socket, no NAT
    assert first.global_v4 is not None and first.global_v4[0] == "127.0.0.1"
    assert first.global_v4_counters == {first.global_v4: 2}
    assert (first.pmp, first.pcp, first.upnp) == (True, False, True)
    assert first.preferred_derp in (901, 902)
    assert first.captive_portal is None  # no node has CanPort80
    # The second run is incremental (within 5 min) and keeps the home (no clear improvement possible
    # between two loopback relays), with the port-mapping check skipped.
    assert not second.full and second.udp and (second.pmp, second.pcp, second.upnp) == (None, None, None)
    assert second.preferred_derp == first.preferred_derp
    assert len(state.history) == 2 and state.last_report == second


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_no_udp_answer_falls_back_to_https_latency(relays: list[LoopbackRelay], backend: str) -> None:
    derp_map = _map(relays, stun=False)  # STUN ports where nothing listens

    async def main() -> Report:
        return await netcheck(derp_map, portmap_probe=None, stun_timeout=0.4)

    report = anyio.run(main, backend=backend)
    assert (report.udp, report.ipv4, report.ipv4_can_send) == (False, False, True)
    assert set(report.region_latency) == {901, 902}
    assert report.latency_source == {901: "https", 902: "https"}
    assert all(0 < v < 1 for v in report.region_latency.values())
    assert report.preferred_derp in (901, 902)


async def test_a_broken_portmap_probe_is_reported_not_raised(
    relays: list[LoopbackRelay], caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> None:
        raise RuntimeError("gateway on fire")

    with caplog.at_level(logging.WARNING, logger="natlib.netcheck"):
        report = await netcheck(_map(relays), portmap_probe=broken)
    assert report.udp and (report.pmp, report.pcp, report.upnp) == (None, None, None)
    assert "port-mapping probe failed: RuntimeError('gateway on fire')" in caplog.text


async def test_a_wrongly_pinned_certificate_gives_no_https_latency(relays: list[LoopbackRelay]) -> None:
    bad = [LoopbackRelay(r.host, r.derp_port, r.stun_port, "sha256-raw:" + "00" * 32) for r in relays]
    report = await netcheck(_map(bad, stun=False), portmap_probe=None, stun_timeout=0.3)
    assert report.region_latency == {} and report.preferred_derp == 0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "natlib", "netcheck", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_json_and_text(relays: list[LoopbackRelay], tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps(_map_document(relays)))
    done = _cli("--derp-map", str(path), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["udp"] is True and set(data["region_latency"]) == {"901", "902"}
    done = _cli("--derp-map", str(path), "--trio")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Report:\n  * UDP: yes\n") and "  - lo0: " in done.stdout


def test_cli_bad_map_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "derp.yaml"
    path.write_text(
        "regions:\n  900:\n    nodes:\n      - name: a\n        hostname: h\n        stunport: many\n"
    )
    done = _cli("--derp-map", str(path))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"netcheck: {path}:6: regions[900].nodes[0].stunport: "
        "must be an integer from -1 to 65535, got 'many'\n"
    )
    done = _cli("--derp-map", str(tmp_path / "absent.json"))
    assert (done.returncode, done.stderr.count("\n")) == (2, 1) and "absent.json: cannot read" in done.stderr
    empty = tmp_path / "empty.json"
    empty.write_text('{"Regions": {}}')
    done = _cli("--derp-map", str(empty))
    assert (done.returncode, done.stderr) == (2, f"netcheck: {empty}: the relay map has no regions\n")


async def test_nodes_without_a_literal_address_are_resolved(relays: list[LoopbackRelay]) -> None:
    relay = relays[0]
    node = {"Name": "n", "HostName": "localhost", "STUNPort": relay.stun_port, "DERPPort": relay.derp_port}
    derp_map = parse_derp_map(json.dumps({"Regions": {"7": {"Nodes": [node]}}}))
    report = await netcheck(derp_map, portmap_probe=None, stun_timeout=1.0)
    assert report.udp and set(report.region_v4_latency) == {7}
    assert report.global_v4 is not None and report.global_v4[0] == "127.0.0.1"
    assert report.preferred_derp == 7


@pytest.mark.parametrize(
    ("answer", "portal"),
    [
        (b"HTTP/1.1 204 No Content\r\nX-Tailscale-Response: response ts_127.0.0.3\r\n\r\n", False),
        (b"HTTP/1.1 204 No Content\r\nX-Tailscale-Response: response ts_other\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlogin", True),
    ],
)
async def test_captive_portal_check_wants_the_challenge_echoed(
    nursery: trio.Nursery, answer: bytes, portal: bool
) -> None:
    """No STUN answer within 200 ms on a full report: GET http://<node>/generate_204 with a challenge."""
    requests: list[bytes] = []

    async def serve(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
        requests.append(data)
        await stream.send_all(answer)
        await stream.aclose()

    try:
        listeners = await trio.open_tcp_listeners(80, host="127.0.0.3")
    except OSError as e:
        pytest.skip(f"cannot listen on 127.0.0.3:80 here: {e}")
    nursery.start_soon(trio.serve_listeners, serve, listeners)
    silent, closed = free_ports(2)
    node = {"Name": "p", "HostName": "127.0.0.3", "IPv4": "127.0.0.3", "IPv6": "none", "STUNPort": silent,
            "DERPPort": closed, "CanPort80": True}  # fmt: skip
    derp_map = parse_derp_map(json.dumps({"Regions": {"5": {"Nodes": [node]}}}))
    report = await netcheck(derp_map, portmap_probe=None, stun_timeout=0.5)
    assert report.captive_portal is portal
    assert not report.udp and report.region_latency == {}
    (request,) = requests
    assert request.startswith(b"GET /generate_204 HTTP/1.1\r\n")
    assert b"\r\nX-Tailscale-Challenge: ts_127.0.0.3\r\n" in request
