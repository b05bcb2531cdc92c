"""netcheck in the NAT lab: real relays (``python -m relay``, TLS + STUN + port 80) on two server
hosts, netcheck run inside LAN hosts behind each NAT kind, under trio and under asyncio.

Acceptance (issue #4): easy → MappingVariesByDestIP false; hard → true; udp_blocked → no UDP and
region latency over HTTPS; easyPMP/hardPMP → the protocols miniupnpd offers; two regions at
different added delays (tc netem) → the nearer one preferred, and no flapping under the hysteresis.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from natlib.testing import Lab, LabProcess, ServerSpec, Topology

NETLAB_TOPOLOGY = Topology(
    sites=Topology.parse("easy=easy,hard=hard,udpb=udp_blocked").sites,
    servers=(ServerSpec("r1"), ServerSpec("r2")),
)
REGIONS = {"r1": 901, "r2": 902}

# Runs inside a lab host: N netchecks with one NetcheckState, one JSON report per line; before each
# run after the first it waits for a line on stdin (the test changes the delays in between).
RUNNER = r"""
import json, sys
import anyio
from natlib.derpmap import load_derp_map
from natlib.netcheck import NetcheckState, netcheck

map_path, backend, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
options = {}
if len(sys.argv) > 4:  # a longer port-mapping probe window than netcheck's 250 ms
    import functools, natlib.portmap
    options["portmap_probe"] = functools.partial(natlib.portmap.probe, timeout=float(sys.argv[4]))

async def main() -> None:
    derp_map = load_derp_map(map_path)
    state = NetcheckState()
    for i in range(runs):
        if i:
            await anyio.to_thread.run_sync(sys.stdin.readline)
        report = await netcheck(derp_map, state=state, **options)
        print(json.dumps(report.to_dict()), flush=True)

anyio.run(main, backend=backend)
"""


# A delay line on an NFQUEUE (nfnetlink_queue over raw netlink): every queued packet is accepted
# `delay` ms after it arrived; a line on stdin sets a new delay. It stands in for `tc ... netem
# delay`, which this kernel (and CI's) lacks: sch_netem is not built.
DELAY_LINE = r"""
import os, select, socket, struct, sys, time

NETLINK_NETFILTER, SUBSYS_QUEUE = 12, 3
MSG_PACKET, MSG_VERDICT, MSG_CONFIG = 0, 1, 2
CFG_CMD, CFG_PARAMS, PACKET_HDR, VERDICT_HDR = 1, 2, 1, 2
CMD_BIND, COPY_META, NF_ACCEPT, NLM_F_REQUEST = 1, 1, 1, 1

queue, delay = int(sys.argv[1]), float(sys.argv[2]) / 1000


def attr(kind, payload):
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def message(msg_type, attrs):
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (SUBSYS_QUEUE << 8) | msg_type, NLM_F_REQUEST, 0, 0) + body


sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
sock.bind((0, 0))
sock.send(message(MSG_CONFIG, [attr(CFG_CMD, struct.pack("!BxH", CMD_BIND, socket.AF_INET))]))
sock.send(message(MSG_CONFIG, [attr(CFG_PARAMS, struct.pack("!IB", 0, COPY_META))]))
print("delay line ready", flush=True)
pending = []  # (due, packet id), in arrival order, so in due order for a fixed delay
while True:
    timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
    ready, _, _ = select.select([sock, sys.stdin], [], [], timeout)
    if sys.stdin in ready:
        line = sys.stdin.readline()
        if not line:
            break
        delay = float(line) / 1000
        print(f"delay {line.strip()} ms", flush=True)
    if sock in ready:
        data = sock.recv(65536)
        pos = 0
        while pos + 16 <= len(data):
            length, msg_type = struct.unpack_from("=IH", data, pos)
            if msg_type == (SUBSYS_QUEUE << 8) | MSG_PACKET:
                apos = pos + 20
                while apos + 4 <= pos + length:
                    alen, atype = struct.unpack_from("=HH", data, apos)
                    if atype & 0x7FFF == PACKET_HDR:
                        (packet_id,) = struct.unpack_from("!I", data, apos + 4)
                        pending.append((time.monotonic() + delay, packet_id))
                    apos += max(4, (alen + 3) & ~3)
            pos += max(16, (length + 3) & ~3)
    now = time.monotonic()
    while pending and pending[0][0] <= now:
        _, packet_id = pending.pop(0)
        sock.send(message(MSG_VERDICT, [attr(VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))]))
"""


def start_relays(lab: Lab) -> Path:
    """A relay on every server host (TLS on :443 with a self-signed IP certificate, HTTP on :80,
    STUN on :3478); returns the path of a DERPMap JSON naming them, with the certificate pins."""
    regions: dict[str, Any] = {}
    for server, region_id in REGIONS.items():
        host = lab.host(server)
        workdir = lab.workdir / f"relay-{server}"
        argv = [
            sys.executable, "-m", "relay", "-a", ":443", "-certmode", "manual",
            "-certdir", str(workdir / "certs"), "-hostname", host.ipv4[0], "-c", str(workdir / "derper.key"),
            "-http-port", "80", "-stun-port", "3478", "-metrics-addr=off",
        ]  # fmt: skip
        proc = lab.spawn(server, argv, name=f"relay-{server}")
        proc.wait_for_output(r"STUN server listening", timeout=20)
        node = json.loads(proc.wait_for_output(r"^\s*(\{.*sha256-raw:.*\})\s*$", timeout=20).group(1))
        regions[str(region_id)] = {
            "RegionID": region_id,
            "RegionCode": server,
            "RegionName": f"lab {server}",
            "Nodes": [
                {
                    "Name": f"{region_id}a",
                    "RegionID": region_id,
                    "HostName": host.ipv4[0],
                    "IPv4": host.ipv4[0],
                    "IPv6": host.ipv6[0] if host.ipv6 else "none",
                    "CertName": node["CertName"],
                    "STUNPort": 3478,
                    "CanPort80": True,
                }
            ],
        }
    path = lab.workdir / "derpmap.json"
    path.write_text(json.dumps({"Regions": regions}))
    return path


class StunDelay:
    """Delays the STUN replies a server host sends (its OUTPUT chain queues UDP from port 3478)."""

    def __init__(self, lab: Lab, server: str, ms: int) -> None:
        self.lab, self.server = lab, server
        rule = [
            "OUTPUT",
            "-p",
            "udp",
            "--sport",
            "3478",
            "-j",
            "NFQUEUE",
            "--queue-num",
            "0",
            "--queue-bypass",
        ]
        self.rule = rule
        lab.run(server, ["iptables", "-A", *rule])
        self.proc = lab.spawn(
            server, [sys.executable, "-c", DELAY_LINE, "0", str(ms)], name="delayline", stdin=True
        )
        self.proc.wait_for_output("delay line ready")
        self.changes = 0

    def set(self, ms: int) -> None:
        self.proc.write_line(str(ms))
        self.changes += 1
        self.proc.wait_for_output(rf"(delay .*\n){{{self.changes}}}")

    def close(self) -> None:
        self.lab.run(self.server, ["iptables", "-D", *self.rule], check=False)
        self.proc.stop()


def run_netcheck(
    lab: Lab, host: str, derp_map: Path, backend: str, portmap_window: float | None = None
) -> dict[str, Any]:
    extra = [] if portmap_window is None else [str(portmap_window)]
    done = lab.run(host, [sys.executable, "-c", RUNNER, str(derp_map), backend, "1", *extra], timeout=60)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(lines[0])
    return report


@pytest.fixture(scope="module")
def derp_map(netlab_module: Lab) -> Iterator[Path]:
    path = start_relays(netlab_module)
    yield path
    for proc in netlab_module.processes:
        proc.stop()


BACKENDS = ["trio", "asyncio"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_easy_nat(netlab_module: Lab, derp_map: Path, backend: str) -> None:
    lab = netlab_module
    r = run_netcheck(lab, "easy1", derp_map, backend)
    assert (r["udp"], r["ipv4"], r["ipv4_can_send"]) == (True, True, True)
    assert (r["ipv6"], r["ipv6_can_send"]) == (False, False)  # the site has no IPv6 route
    assert r["mapping_varies_by_dest_ip"] is False
    public = lab.site("easy").public_ipv4
    global_v4 = r["global_v4"]
    assert global_v4.startswith(f"{public}:")
    assert r["global_v4_counters"] == {global_v4: 2}  # the same mapping from both relays
    assert set(r["region_latency"]) == {"901", "902"}
    assert r["latency_source"] == {"901": "stun", "902": "stun"}
    assert r["preferred_derp"] in (901, 902) and r["full"] is True
    # None when STUN answered within 200 ms (the check is then cancelled); False when the first answer
    # was slower (a loaded machine, a fresh lab): the relay echoes the challenge. Never a portal.
    assert r["captive_portal"] in (None, False)
    assert (r["pmp"], r["pcp"], r["upnp"]) == (False, False, False)  # a router without miniupnpd


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_nat(netlab_module: Lab, derp_map: Path, backend: str) -> None:
    lab = netlab_module
    r = run_netcheck(lab, "hard1", derp_map, backend)
    assert r["udp"] is True
    assert r["mapping_varies_by_dest_ip"] is True
    public = lab.site("hard").public_ipv4
    assert len(r["global_v4_counters"]) == 2  # one mapping per destination
    assert all(ep.startswith(f"{public}:") for ep in r["global_v4_counters"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_udp_blocked(netlab_module: Lab, derp_map: Path, backend: str) -> None:
    r = run_netcheck(netlab_module, "udpb1", derp_map, backend)
    assert (r["udp"], r["ipv4"], r["ipv4_can_send"]) == (False, False, True)
    assert r["mapping_varies_by_dest_ip"] is None and r["global_v4"] is None
    assert set(r["region_latency"]) == {"901", "902"}
    assert r["latency_source"] == {"901": "https", "902": "https"}
    assert r["region_v4_latency"] == {}
    assert r["preferred_derp"] in (901, 902)
    assert r["captive_portal"] is False  # /generate_204 answered with the challenge echoed


@pytest.mark.netlab(tools=["iptables"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nearer_region_preferred_without_flapping(netlab_module: Lab, derp_map: Path, backend: str) -> None:
    lab = netlab_module
    delays = [StunDelay(lab, "r1", 90)]
    try:
        r2_delay = StunDelay(lab, "r2", 110)
        delays.append(r2_delay)
        proc: LabProcess = lab.spawn(
            "easy1", [sys.executable, "-c", RUNNER, str(derp_map), backend, "3"], name="netcheck", stdin=True
        )

        def report(n: int) -> dict[str, Any]:
            proc.wait_for_output(rf"^(\{{.*\n){{{n}}}", timeout=30)
            return proc.json_lines()[n - 1]

        first = report(1)
        assert first["preferred_derp"] == 901, first["region_latency"]  # 90 ms beats 110 ms
        # r2 becomes 20 ms faster than the home, but not a third faster (70 > 2/3 x 90): stay.
        r2_delay.set(70)
        proc.write_line("next")
        second = report(2)
        assert second["full"] is False
        assert second["region_latency"]["902"] < second["region_latency"]["901"], second["region_latency"]
        assert second["preferred_derp"] == 901, second["region_latency"]
        # r2 becomes clearly better (20 ms: 70 ms and over 70 % faster): move.
        r2_delay.set(20)
        proc.write_line("next")
        third = report(3)
        assert third["preferred_derp"] == 902, third["region_latency"]
        assert proc.wait(timeout=10) == 0
    finally:
        for delay in delays:
            delay.close()


PMP_TOPOLOGY = Topology(
    sites=Topology.parse("pmp=easyPMP,hpmp=hardPMP").sites, servers=(ServerSpec("r1"), ServerSpec("r2"))
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_port_mapping_protocols_of_miniupnpd(netlab_factory: Callable[[Topology], Lab], backend: str) -> None:
    lab = netlab_factory(PMP_TOPOLOGY)
    derp_map = start_relays(lab)
    for host, varies in (("pmp1", False), ("hpmp1", True)):
        r = run_netcheck(lab, host, derp_map, backend)
        # NAT-PMP and PCP answer at once. miniupnpd delays each SSDP answer by a random part of
        # the search's MX (1 s, the least allowed), so within netcheck's 250 ms UPnP is seen only
        # sometimes: any verdict is fine here, the next assertion uses a full MX window.
        assert (r["pmp"], r["pcp"]) == (True, True), (host, r)
        assert isinstance(r["upnp"], bool)
        assert r["udp"] is True and r["mapping_varies_by_dest_ip"] is varies, (host, r)
        r = run_netcheck(lab, host, derp_map, backend, portmap_window=1.5)
        assert (r["pmp"], r["pcp"], r["upnp"]) == (True, True, True), (host, r)
