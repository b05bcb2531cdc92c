"""Port mapping on the lab router: the lab build of Debian's miniupnpd (NAT-PMP, PCP, UPnP IGD).

A mapping counts only if an unsolicited UDP datagram from the internet, to the mapped public port,
really reaches the LAN host. Clients: Debian's natpmpc and upnpc, and raw NAT-PMP / PCP requests.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from natlib.testing import Lab, StunServer, measure_mapping, start_stun_server

NETLAB_TOPOLOGY = "pmp=easyPMP,hpmp=hardPMP"

RAW_CLIENT = r"""
import ipaddress, json, os, socket, struct, sys
proto, gw, port, lifetime = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
if proto == "natpmp":   # RFC 6886: version 0, opcode 1 (map UDP)
    req = struct.pack("!BBHHHI", 0, 1, 0, port, port, lifetime)
else:                   # RFC 6887: PCP MAP for UDP, suggesting the same external port
    s.connect((gw, 5351))
    me = ipaddress.IPv4Address(s.getsockname()[0]).packed
    v4mapped = b"\0" * 10 + b"\xff\xff"
    req = struct.pack("!BBHI", 2, 1, 0, lifetime) + v4mapped + me
    req += os.urandom(12) + struct.pack("!B3xHH", 17, port, port) + v4mapped + b"\0" * 4
for _ in range(5):
    s.sendto(req, (gw, 5351))
    try:
        data = s.recv(1100)
        break
    except socket.timeout:
        continue
else:
    sys.exit("no answer")
if proto == "natpmp":
    ver, op, result, epoch, internal, external, life = struct.unpack("!BBHIHHI", data[:16])
    print(json.dumps({"result": result, "op": op, "external_port": external, "lifetime": life}))
else:
    ver, op, _r, result, life, epoch = struct.unpack("!BBBBII", data[:12])
    _nonce, proto_, internal, external = data[24:36], data[36], *struct.unpack("!HH", data[40:44])
    ext_ip = str(ipaddress.IPv4Address(data[56:60]))
    print(json.dumps({"result": result, "op": op, "external_port": external, "external_ip": ext_ip,
                      "lifetime": life}))
"""


@pytest.fixture(scope="module")
def stun(netlab_module: Lab) -> StunServer:
    return start_stun_server(netlab_module)


def inbound_arrives(lab: Lab, host: str, local_port: int, public: tuple[str, int]) -> list[object]:
    """Listen on ``host``:local_port, send one datagram from the server (from a port that never sent
    anything) to ``public``; return the sender seen by the LAN host (fails after 5 s without it)."""
    rx = lab.spawn(
        host, lab.agent_argv("recv", "--bind", f"0.0.0.0:{local_port}", "--timeout", "10"), name="recv"
    )
    rx.wait_for_output(r'"ready"')
    srv = lab.server()
    lab.agent(
        srv.name,
        "send",
        "--bind",
        f"{srv.ipv4[1]}:{local_port + 7}",
        "--to",
        f"{public[0]}:{public[1]}",
        "--data",
        "inbound",
    )
    m = rx.wait_for_output(r'^\{"from".*"inbound"\}$', timeout=5.0)
    rx.stop()
    return list(json.loads(m.group(0))["from"])


@pytest.mark.netlab(tools=["natpmpc"])
@pytest.mark.parametrize("site", ["pmp", "hpmp"])
def test_natpmpc_maps_a_port_that_forwards(netlab_module: Lab, site: str) -> None:
    lab = netlab_module
    host = f"{site}1"
    out = lab.run(host, ["natpmpc", "-g", lab.gateway(host), "-a", "40001", "40001", "udp", "600"]).stdout
    assert f"Public IP address : {lab.site(site).public_ipv4}" in out
    m = re.search(r"Mapped public port (\d+) protocol UDP to local port 40001", out)
    assert m, out
    public = (lab.site(site).public_ipv4 or "", int(m.group(1)))
    src = inbound_arrives(lab, host, 40001, public)
    assert src == [lab.server().ipv4[1], 40008]


@pytest.mark.netlab(tools=["upnpc"])
def test_upnpc_maps_a_port_that_forwards(netlab_module: Lab) -> None:
    lab = netlab_module
    host = "pmp1"
    url = f"http://{lab.gateway(host)}:5000/rootDesc.xml"
    lan_ip = lab.host(host).ipv4[0]
    out = lab.run(host, ["upnpc", "-u", url, "-e", "natlab", "-a", lan_ip, "40002", "40002", "UDP"]).stdout
    public_ip = lab.site("pmp").public_ipv4
    assert f"external {public_ip}:40002 UDP is redirected to internal {lan_ip}:40002" in out, out
    status = lab.run(host, ["upnpc", "-u", url, "-s"]).stdout
    assert "Status : Connected" in status, status
    assert inbound_arrives(lab, host, 40002, (public_ip or "", 40002)) == [lab.server().ipv4[1], 40009]


@pytest.mark.parametrize("proto", ["natpmp", "pcp"])
def test_raw_request_maps_a_port_that_forwards(netlab_module: Lab, proto: str) -> None:
    lab = netlab_module
    host = "pmp1"
    port = 40003 if proto == "natpmp" else 40004
    out = lab.run(
        host, [sys.executable, "-I", "-c", RAW_CLIENT, proto, lab.gateway(host), str(port), "600"]
    ).stdout
    reply = json.loads(out)
    assert reply["result"] == 0, reply
    assert reply["op"] == 0x81  # a response to opcode 1 (NAT-PMP "map UDP", PCP MAP)
    assert reply["external_port"] == port  # the suggested port was free
    if proto == "pcp":
        assert reply["external_ip"] == lab.site("pmp").public_ipv4
    public = (lab.site("pmp").public_ipv4 or "", int(reply["external_port"]))
    assert inbound_arrives(lab, host, port, public)[0] == lab.server().ipv4[1]


def test_hardpmp_is_still_hard_for_unmapped_ports(netlab_module: Lab, stun: StunServer) -> None:
    m = measure_mapping(netlab_module, "hpmp1", stun, port=45000)
    assert len(set(m.ports)) == 3
    m = measure_mapping(netlab_module, "pmp1", stun, port=45000)
    assert m.ports == (45000, 45000, 45000)
