"""natlib.stunclient in the NAT lab: one socket behind an easy and a hard NAT, Binding requests to our
relay's STUN server, coturn and stund on the lab's server host, under trio and under asyncio."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from natlib.testing import Lab

pytestmark = pytest.mark.netlab(tools=["turnserver", "stund"])

NETLAB_TOPOLOGY = "easy=easy,hard=hard"
LOCAL_PORT = 40000

# Runs in a LAN host: stun_probe to every server from one socket (retrying the whole probe until
# every server answered, for at most 15 s, because the servers start in the background), then
# prints the results as one JSON line.
CLIENT = r"""
import json, sys, time
import anyio
from natlib.stunclient import stun_probe

backend, port = sys.argv[1], int(sys.argv[2])
servers = [(host, int(p)) for host, p in (arg.rsplit(":", 1) for arg in sys.argv[3:])]

async def main():
    deadline = time.monotonic() + 15
    while True:
        results = await stun_probe(servers, local_port=port, timeout=1.0)
        if all(r.mapped for r in results) or time.monotonic() > deadline:
            return results

results = anyio.run(main, backend=backend)
print(json.dumps([{"server": list(r.server), "mapped": r.mapped and list(r.mapped), "error": r.error,
                   "rtt": r.rtt} for r in results]))
"""


@pytest.fixture(scope="module")
def servers(netlab_module: Lab) -> Iterator[dict[str, tuple[str, int]]]:
    """Our relay's STUN on address A:3478, coturn on B:3478, stund on A:3479 (and B, 3480)."""
    lab = netlab_module
    server = lab.server()
    a, b = server.ipv4[:2]
    relay = lab.spawn(
        server.name,
        [
            sys.executable, "-m", "relay", "-c", str(lab.workdir / "derper.key"), "-a", f"{a}:8080",
            "-stun-port", "3478", "-http-port", "-1", "-metrics-addr=off",
        ],
        name="relay",
    )  # fmt: skip
    lab.spawn(
        server.name,
        [
            "turnserver", "-n", f"--listening-ip={b}", "--listening-port=3478", "--stun-only", "--no-cli",
            "--no-tls", "--no-dtls", "--log-file=stdout", "--simple-log",
        ],
        name="coturn",
    )  # fmt: skip
    lab.spawn(server.name, ["stund", "-h", a, "-a", b, "-p", "3479", "-o", "3480"], name="stund")
    relay.wait_for_output("STUN server listening", timeout=20)
    yield {"relay": (a, 3478), "coturn": (b, 3478), "stund": (a, 3479)}
    for proc in lab.processes:
        proc.stop()


def probe(lab: Lab, host: str, servers: dict[str, tuple[str, int]], backend: str) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-c",
        CLIENT,
        backend,
        str(LOCAL_PORT),
        *(f"{h}:{p}" for h, p in servers.values()),
    ]
    done = lab.run(host, argv, timeout=60)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return dict(zip(servers, results, strict=True))


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_easy_nat_one_mapping_for_every_server(
    netlab_module: Lab, servers: dict[str, tuple[str, int]], backend: str
) -> None:
    results = probe(netlab_module, "easy1", servers, backend)
    public = netlab_module.site("easy").public_ipv4
    for name, r in results.items():
        assert r["error"] is None, (name, r)
        assert r["server"] == list(servers[name])
        assert r["mapped"] == [public, LOCAL_PORT], (name, r)  # endpoint-independent, port preserved
        assert 0 <= r["rtt"] < 1.0


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_hard_nat_one_mapping_per_destination(
    netlab_module: Lab, servers: dict[str, tuple[str, int]], backend: str
) -> None:
    results = probe(netlab_module, "hard1", servers, backend)
    public = netlab_module.site("hard").public_ipv4
    assert all(r["error"] is None and r["mapped"][0] == public for r in results.values()), results
    assert len({r["mapped"][1] for r in results.values()}) == 3, results
