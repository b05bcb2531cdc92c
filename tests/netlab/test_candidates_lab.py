"""Candidate gathering behind real NATs: the lab's STUN server, real sockets, real interfaces.

Each test runs a small gathering program inside a lab host's namespace (under trio and under
asyncio) and checks its candidates against what the lab knows about the host and its NAT.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest

from natlib.testing import Lab, StunServer, start_stun_server

NETLAB_TOPOLOGY = "a=easy:ipv6,h=hard"
PORT = 41641

_GATHER_PROGRAM = """
import json, socket, sys
import anyio, anyio.abc
from natlib.candidates import Gatherer

args = json.loads(sys.argv[2])

async def main():
    async with await anyio.create_udp_socket(
        family=socket.AF_INET, local_host="0.0.0.0", local_port=args["port"]
    ) as sock4:
        sock6 = None
        if args["ipv6"]:  # one socket per family, as Tailscale does: the IPv6 one must be V6ONLY
            raw6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            raw6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            raw6.bind(("::", args["port"]))
            sock6 = await anyio.abc.UDPSocket.from_socket(raw6)
        try:
            gatherer = Gatherer(
                sock4,
                sock6=sock6,
                stun_servers=[tuple(s) for s in args["servers"]],
                local_port_fixed=args["fixed"],
            )
            report = await gatherer.gather()
        finally:
            if sock6 is not None:
                await sock6.aclose()
    print(json.dumps({
        "candidates": [[c.type.value, c.address[0], c.address[1], c.priority] for c in report.candidates],
        "stun": [[list(s.server), list(s.mapped) if s.mapped else None, s.error] for s in report.stun],
        "varies": report.mapping_varies_by_dest_ip,
        "errors": dict(report.errors),
        "duration": report.duration,
    }))

anyio.run(main, backend=sys.argv[1])
"""


@pytest.fixture(scope="module")
def stun(netlab_module: Lab) -> StunServer:
    return start_stun_server(netlab_module)


def gather_in(
    lab: Lab,
    host: str,
    backend: str,
    servers: list[tuple[str, int]],
    *,
    ipv6: bool = False,
    fixed: bool = True,
) -> dict[str, Any]:
    args = json.dumps({"port": PORT, "servers": servers, "ipv6": ipv6, "fixed": fixed})
    out = lab.run(host, [sys.executable, "-c", _GATHER_PROGRAM, backend, args], timeout=30.0).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def v4_servers(stun: StunServer) -> list[tuple[str, int]]:
    # (A, P), (A, P') and (B, P): an endpoint-dependent NAT maps each to another port.
    return [stun.endpoint(4, 0, 0), stun.endpoint(4, 0, 1), stun.endpoint(4, 1, 0)]


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_easy_nat_gives_public_ip_and_local_port(netlab_module: Lab, stun: StunServer, backend: str) -> None:
    lab = netlab_module
    host = lab.host("a1")
    servers = [*v4_servers(stun), stun.endpoint(6, 0, 0), stun.endpoint(6, 1, 0)]
    r = gather_in(lab, "a1", backend, servers, ipv6=True)
    assert r["errors"] == {}
    assert r["varies"] is False
    public = lab.site("a").public_ipv4
    (v6,) = host.ipv6
    # IPv6 is routed, not translated: STUN sees our own address, which stays a local (host) candidate.
    by_server = {tuple(server): mapped for server, mapped, _error in r["stun"]}
    assert by_server == {tuple(s): ([v6, PORT] if ":" in s[0] else [public, PORT]) for s in servers}
    assert [c[:3] for c in r["candidates"]] == [
        ["stun", public, PORT],
        ["local", v6, PORT],
        ["local", host.ipv4[0], PORT],
    ]
    assert [c[3] for c in r["candidates"]] == [
        100 * 2**24 + 57344 * 256 + 255,  # public IPv4 (documentation range counts as public)
        126 * 2**24 + 65535 * 256 + 255,  # global IPv6
        126 * 2**24 + 40960 * 256 + 255,  # RFC 1918
    ]
    assert r["duration"] < 3.0


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_hard_nat_mapping_varies_and_stun4localport_appears(
    netlab_module: Lab, stun: StunServer, backend: str
) -> None:
    lab = netlab_module
    public = lab.site("h").public_ipv4
    r = gather_in(lab, "h1", backend, v4_servers(stun))
    assert r["errors"] == {}
    assert r["varies"] is True
    mapped = [tuple(s[1]) for s in r["stun"]]
    assert len(set(mapped)) == 3 and all(ip == public and port != PORT for ip, port in mapped)
    kinds = [(c[0], c[1], c[2]) for c in r["candidates"]]
    assert kinds[0][0] == "stun" and kinds[0][1:] in mapped  # the best mapping only: none was seen twice
    assert kinds[1:] == [("stun4localport", public, PORT), ("local", lab.host("h1").ipv4[0], PORT)]

    # Without a configured (fixed) local port there is nothing to guess.
    r = gather_in(lab, "h1", backend, v4_servers(stun), fixed=False)
    assert [c[0] for c in r["candidates"]] == ["stun", "local"]


def test_unreachable_stun_is_reported_not_raised(netlab_module: Lab, stun: StunServer) -> None:
    lab = netlab_module
    lab.link_down("h-nat")
    try:
        r = gather_in(lab, "h1", "trio", v4_servers(stun)[:1])
    finally:
        lab.link_up("h-nat")
    assert r["errors"]["stun"].startswith("no STUN server answered")
    assert [c[:3] for c in r["candidates"]] == [["local", lab.host("h1").ipv4[0], PORT]]
    assert r["duration"] == pytest.approx(3.0, abs=0.5)


_ROAMING_PROGRAM = """
import json, socket, sys, time
import anyio
from natlib.candidates import Gatherer
from natlib.netmon import NetworkMonitor

async def main():
    async with await anyio.create_udp_socket(
        family=socket.AF_INET, local_host="0.0.0.0", local_port=int(sys.argv[2])
    ) as sock:
        gatherer = Gatherer(sock, stun_servers=[tuple(s) for s in json.loads(sys.argv[3])])

        async def on_report(report):
            print(json.dumps({
                "candidates": [[c.type.value, c.address[0], c.address[1]] for c in report.candidates],
                "monotonic": time.monotonic(),
            }), flush=True)

        async with NetworkMonitor() as monitor, anyio.create_task_group() as tg:
            await tg.start(gatherer.run, on_report)
            async for _change in monitor:
                gatherer.request_refresh()

anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.netlab("r=easy")
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_local_address_change_regathers(netlab: Lab, netlab_stun: StunServer, backend: str) -> None:
    """Roaming (issue 5 item 6): netmon notices the new address and the gatherer re-gathers at once."""
    lab = netlab
    old = lab.host("r1").ipv4[0]
    public = lab.site("r").public_ipv4
    servers = json.dumps(v4_servers(netlab_stun))
    proc = lab.spawn("r1", [sys.executable, "-c", _ROAMING_PROGRAM, backend, str(PORT), servers], name="roam")
    proc.wait_for_output(r'^\{"candidates"')
    (first,) = proc.json_lines()
    assert first["candidates"] == [["stun", public, PORT], ["local", old, PORT]]

    before = time.monotonic()
    new = lab.set_address("r1")
    proc.wait_for_output(r'^\{"candidates".*\n\{"candidates"', timeout=10.0)
    second = proc.json_lines()[1]
    latency = second["monotonic"] - before
    kinds = [(kind, ip, port) for kind, ip, port in second["candidates"]]
    assert kinds[-1] == ("local", new, PORT) and ("local", old, PORT) not in kinds
    stun_seen = [(ip, port) for kind, ip, port in kinds if kind == "stun"]
    # The NAT may have to give the new LAN address another port; the old mapping is still
    # advertised for 5 min 10 s either way.
    assert all(ip == public for ip, _ in stun_seen) and (public, PORT) in stun_seen
    assert 0.0 < latency < 3.0, latency  # debounce (<= 1 s) + one STUN round on a LAN
    proc.stop()


_PORTMAP_PROGRAM = """
import json, socket, sys
import anyio
from natlib import portmap
from natlib.candidates import Gatherer, port_mapper_source

async def main():
    port = int(sys.argv[2])
    sock = await anyio.create_udp_socket(family=socket.AF_INET, local_host="0.0.0.0", local_port=port)
    async with sock, portmap.PortMapper(port) as mapper:
        gatherer = Gatherer(
            sock,
            stun_servers=[tuple(s) for s in json.loads(sys.argv[3])],
            port_mapping=port_mapper_source(mapper),
            local_port_fixed=True,
        )
        report = await gatherer.gather()
        print(json.dumps({
            "candidates": [[c.type.value, c.address[0], c.address[1]] for c in report.candidates],
            "mapping": [mapper.mapping.protocol, *mapper.mapping.external],
            "varies": report.mapping_varies_by_dest_ip,
            "errors": dict(report.errors),
        }), flush=True)

anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.netlab("p=hardPMP")
def test_port_mapped_candidate_comes_first(netlab: Lab, netlab_stun: StunServer) -> None:
    lab = netlab
    public = lab.site("p").public_ipv4
    servers = json.dumps(v4_servers(netlab_stun))
    out = lab.run("p1", [sys.executable, "-c", _PORTMAP_PROGRAM, "trio", str(PORT), servers]).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["errors"] == {} and r["varies"] is True
    protocol, ip, mapped_port = r["mapping"]
    assert protocol == "natpmp" and ip == public
    kinds = [(kind, ip, port) for kind, ip, port in r["candidates"]]
    assert kinds[0] == ("portmapped", public, mapped_port)
    assert kinds[-1] == ("local", lab.host("p1").ipv4[0], PORT)
    assert [k for k, _, _ in kinds[1:-1]].count("stun") == 1
    assert len({(ip, port) for _, ip, port in kinds}) == len(kinds)  # one candidate per address
    # stun4localport guesses (public, local port); if the router mapped exactly that port, the
    # port-mapped candidate (higher priority) stands for it.
    assert (("stun4localport", public, PORT) in kinds) == (mapped_port != PORT)
