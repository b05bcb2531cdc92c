"""natlib.netif: the rtnetlink codec on captured and hand-built bytes; real dumps here and in the lab."""

from __future__ import annotations

import errno
import json
import shutil
import socket
import struct
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natlib import netif
from natlib.netif import (
    IFF_LOOPBACK,
    IFF_RUNNING,
    IFF_UP,
    RTM_GETADDR,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    AddressEntry,
    InterfaceAddress,
    Link,
    NetlinkMessage,
    NetlinkParseError,
    Route,
)
from natlib.testing import Lab

# Captured from a Linux 6.x kernel (RTM_GETADDR / RTM_GETROUTE dumps, pid 0x51ab, seq 1-3).
CAPTURED_V4_ADDR = bytes.fromhex(
    "580000001400020001000000ab510000021880000400000008000100c000020208000200c000020208000400c00002ff"
    "090003006574683000000000080008008000000014000600ffffffffffffffff1800000018000000"
)  # RTM_NEWADDR eth0 (index 4) 192.0.2.2/24 brd 192.0.2.255, scope global, IFA_F_PERMANENT
CAPTURED_V4_LOOPBACK = bytes.fromhex(
    "4c0000001400020001000000ab510000020880fe01000000080001007f000001080002007f000001070003006c6f0000"
    "080008008000000014000600ffffffffffffffff1800000018000000"
)  # RTM_NEWADDR lo (index 1) 127.0.0.1/8, scope host
CAPTURED_V6_ADDR = bytes.fromhex(
    "480000001400020003000000ab5100000a4082000400000014000100fd00000000000000000000000000000214000600"
    "ffffffffffffffff18000000180000000800080082000000"
)  # RTM_NEWADDR eth0 fd00::2/64, IFA_F_NODAD | IFA_F_PERMANENT
CAPTURED_V6_DEFAULT_ROUTE = bytes.fromhex(
    "740000001800020002000000ab5100000a000000fe0300010000000008000f00fe000000080006000004000014000500"
    "fd000000000000000000000000000001080004000400000024000c00000000000000000000000000000000000000000000"
    "00000000000000000000000500140000000000"
)  # RTM_NEWROUTE default via fd00::1 dev 4 metric 1024, table main
NLMSG_DONE_MSG = struct.pack("=IHHIIi", 20, netif.NLMSG_DONE, 2, 1, 0x51AB, 0)


def rtattr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + bytes(-len(raw) % 4)


def nlmsg(msg_type: int, payload: bytes, seq: int = 1, flags: int = 2) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), msg_type, flags, seq, 0) + payload


def link_msg(index: int, name: str, flags: int, mtu: int = 1500) -> bytes:
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 1, index, flags, 0)
    body += rtattr(netif.IFLA_IFNAME, name.encode() + b"\0") + rtattr(netif.IFLA_MTU, struct.pack("=I", mtu))
    return nlmsg(RTM_NEWLINK, body)


def test_captured_address_dump_decodes_exactly() -> None:
    messages = netif.parse_messages(CAPTURED_V4_LOOPBACK + CAPTURED_V4_ADDR + NLMSG_DONE_MSG)
    assert [m.type for m in messages] == [RTM_NEWADDR, RTM_NEWADDR, netif.NLMSG_DONE]
    assert [(m.seq, m.pid, m.flags) for m in messages] == [(1, 0x51AB, 2)] * 3
    assert netif.decode_address(messages[0]) == AddressEntry(
        4, 1, "127.0.0.1", 8, netif.SCOPE_HOST, 0x80, "lo"
    )
    assert netif.decode_address(messages[1]) == AddressEntry(4, 4, "192.0.2.2", 24, 0, 0x80, "eth0")
    v6 = netif.decode_address(netif.parse_messages(CAPTURED_V6_ADDR)[0])
    assert v6 == AddressEntry(6, 4, "fd00::2", 64, 0, 0x82, None)


def test_captured_default_route_decodes_exactly() -> None:
    (msg,) = netif.parse_messages(CAPTURED_V6_DEFAULT_ROUTE)
    route = netif.decode_route(msg)
    assert route == Route(6, None, 0, "fd00::1", 4, None, 254, 1024, netif.RTN_UNICAST)
    assert route.is_default
    links = [Link(4, "eth0", IFF_UP | IFF_RUNNING)]
    assert netif.select_default_routes(links, [route])[0].interface == "eth0"
    assert netif.select_default_routes([Link(4, "eth0", 0)], [route]) == []  # link down: no default route


def test_dump_request_bytes() -> None:
    assert netif.dump_request(RTM_GETADDR, 7, socket.AF_INET6) == (
        bytes.fromhex("20000000 1600 0103 07000000 00000000") + bytes([socket.AF_INET6]) + bytes(15)
    )
    with pytest.raises(ValueError, match="not a dump request"):
        netif.dump_request(RTM_NEWADDR, 1)


def test_error_message() -> None:
    err = struct.pack("=i", -13) + bytes(16)
    assert netif.decode_error(NetlinkMessage(netif.NLMSG_ERROR, 0, 1, 0, err)) == 13
    assert netif.decode_error(NetlinkMessage(netif.NLMSG_ERROR, 0, 1, 0, bytes(20))) == 0
    with pytest.raises(NetlinkParseError):
        netif.decode_error(NetlinkMessage(netif.NLMSG_ERROR, 0, 1, 0, b"\x01"))


def test_dump_reply_collects_until_done() -> None:
    reply = netif.DumpReply(RTM_GETADDR, seq=1)
    notification = struct.pack("=IHHII", 16 + 8, RTM_NEWADDR, 0, 0, 0) + bytes(8)  # seq 0: not ours
    assert not reply.feed(CAPTURED_V4_LOOPBACK + notification)
    assert reply.feed(CAPTURED_V4_ADDR + NLMSG_DONE_MSG + CAPTURED_V6_ADDR)  # seq 3 after DONE: ignored
    assert [m.payload for m in reply.messages] == [CAPTURED_V4_LOOPBACK[16:], CAPTURED_V4_ADDR[16:]]
    assert not reply.interrupted


def test_dump_reply_errors_and_interruption() -> None:
    reply = netif.DumpReply(RTM_GETADDR, seq=5)
    with pytest.raises(netif.NetlinkError, match="Permission denied") as err:
        reply.feed(struct.pack("=IHHIIi", 36, netif.NLMSG_ERROR, 0, 5, 0, -13) + bytes(16))
    assert err.value.errno == 13
    with pytest.raises(netif.NetlinkError, match="malformed netlink reply") as err:
        netif.DumpReply(RTM_GETADDR, seq=1).feed(CAPTURED_V4_ADDR[:30])
    assert err.value.errno == errno.EBADMSG
    ack = netif.DumpReply(RTM_GETADDR, seq=5)
    assert not ack.feed(struct.pack("=IHHIIi", 36, netif.NLMSG_ERROR, 0, 5, 0, 0) + bytes(16))  # an ACK
    interrupted = netif.DumpReply(RTM_GETADDR, seq=1)
    assert interrupted.feed(struct.pack("=IHHIIi", 20, netif.NLMSG_DONE, 2 | 0x10, 1, 0, 0))
    assert interrupted.interrupted


def test_missing_final_padding_is_accepted() -> None:
    # A 21-byte message is padded to 24 in a stream, but the last one may end at 21.
    msg = nlmsg(RTM_NEWLINK, b"\x00" * 5)
    assert len(netif.parse_messages(msg)) == 1
    assert len(netif.parse_messages(msg + bytes(3) + msg)) == 2


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (CAPTURED_V4_ADDR[:10], "truncated netlink header"),
        (CAPTURED_V4_ADDR[:-4], "bad netlink message length 88"),
        (struct.pack("=IHHII", 8, 20, 0, 0, 0), "bad netlink message length 8"),
        (CAPTURED_V4_ADDR + CAPTURED_V4_ADDR[:20], "bad netlink message length 88 at offset 88"),
    ],
)
def test_truncated_datagrams_are_clear_errors(data: bytes, match: str) -> None:
    with pytest.raises(NetlinkParseError, match=match):
        netif.parse_messages(data)


def test_bad_payloads_are_clear_errors() -> None:
    def addr(payload: bytes) -> NetlinkMessage:
        return NetlinkMessage(RTM_NEWADDR, 0, 1, 0, payload)

    head = struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 4)
    with pytest.raises(NetlinkParseError, match="truncated ifaddrmsg"):
        netif.decode_address(addr(head[:5]))
    with pytest.raises(NetlinkParseError, match="bad attribute length"):
        netif.decode_address(addr(head + struct.pack("=HH", 40, 2) + b"\xc0\x00\x02\x02"))
    with pytest.raises(NetlinkParseError, match="5 bytes for an IPv4"):
        netif.decode_address(addr(head + rtattr(netif.IFA_LOCAL, b"\xc0\x00\x02\x02\x02")))
    with pytest.raises(NetlinkParseError, match="without an address"):
        netif.decode_address(addr(head + rtattr(netif.IFA_LABEL, b"eth0\0")))
    with pytest.raises(NetlinkParseError, match="not IPv4/IPv6"):
        netif.decode_address(addr(struct.pack("=BBBBI", 17, 0, 0, 0, 4)))
    with pytest.raises(NetlinkParseError, match="prefix length 33"):
        netif.decode_address(addr(struct.pack("=BBBBI", socket.AF_INET, 33, 0, 0, 4)))
    with pytest.raises(NetlinkParseError, match="not an address message"):
        netif.decode_address(NetlinkMessage(RTM_NEWLINK, 0, 1, 0, head))
    with pytest.raises(NetlinkParseError, match="truncated ifinfomsg"):
        netif.decode_link(NetlinkMessage(RTM_NEWLINK, 0, 1, 0, bytes(8)))
    with pytest.raises(NetlinkParseError, match="IFLA_MTU: 2 bytes"):
        netif.decode_link(
            NetlinkMessage(RTM_NEWLINK, 0, 1, 0, bytes(16) + rtattr(netif.IFLA_MTU, b"\x05\xdc"))
        )
    with pytest.raises(NetlinkParseError, match="truncated rtmsg"):
        netif.decode_route(NetlinkMessage(RTM_NEWROUTE, 0, 1, 0, bytes(11)))


def test_link_decode_and_default_name() -> None:
    (msg,) = netif.parse_messages(link_msg(3, "wan", IFF_UP | IFF_RUNNING, 1400))
    assert netif.decode_link(msg) == Link(3, "wan", IFF_UP | IFF_RUNNING, 1400)
    bare = NetlinkMessage(RTM_NEWLINK, 0, 1, 0, struct.pack("=BxHiII", 0, 1, 9, 0, 0))
    assert netif.decode_link(bare) == Link(9, "if9", 0, None)


@given(st.binary(max_size=300))
def test_garbage_never_crashes(data: bytes) -> None:
    try:
        messages = netif.parse_messages(data)
    except NetlinkParseError:
        return
    for m in messages:
        for decode in (netif.decode_link, netif.decode_address, netif.decode_route, netif.decode_error):
            try:
                decode(m)
            except NetlinkParseError:
                pass


@given(st.integers(0, len(CAPTURED_V6_DEFAULT_ROUTE) - 1), st.binary(min_size=1, max_size=4))
def test_corrupted_captures_never_crash(at: int, junk: bytes) -> None:
    for captured in (CAPTURED_V4_ADDR, CAPTURED_V6_ADDR, CAPTURED_V6_DEFAULT_ROUTE):
        data = captured[:at] + junk + captured[at + len(junk) :]
        try:
            for m in netif.parse_messages(data):
                (netif.decode_route if m.type == RTM_NEWROUTE else netif.decode_address)(m)
        except NetlinkParseError:
            pass


def entry(index: int, address: str, prefixlen: int = 24, scope: int = 0, flags: int = 0x80) -> AddressEntry:
    return AddressEntry(6 if ":" in address else 4, index, address, prefixlen, scope, flags)


def test_select_addresses_skips_what_natlib_cannot_use() -> None:
    up = IFF_UP | IFF_RUNNING
    links = [Link(1, "lo", up | IFF_LOOPBACK), Link(2, "eth0", up), Link(3, "wlan0", 0), Link(4, "tun0", up)]
    addrs = [
        entry(1, "127.0.0.1", 8, netif.SCOPE_HOST),
        entry(2, "192.168.1.2"),
        entry(2, "fe80::1", 64, netif.SCOPE_LINK),
        entry(2, "169.254.7.7", 16, netif.SCOPE_LINK),
        entry(2, "2001:db8:1::2", 64),
        entry(2, "2001:db8:1::99", 64, flags=netif.IFA_F_TENTATIVE),
        entry(2, "2001:db8:1::98", 64, flags=netif.IFA_F_DADFAILED),
        entry(3, "10.0.0.5"),  # link down
        entry(4, "100.64.0.1", 32),
        entry(9, "10.9.9.9"),  # unknown link
        entry(2, "192.168.1.2"),  # duplicate
    ]
    got = netif.select_addresses(links, addrs)
    assert [(a.interface, a.address, a.prefixlen) for a in got] == [
        ("eth0", "192.168.1.2", 24),
        ("eth0", "2001:db8:1::2", 64),
        ("tun0", "100.64.0.1", 32),
    ]
    assert got[0].flags == up and got[0].scope == 0 and got[0].family == 4 and got[1].family == 6
    everything = netif.select_addresses(
        links, addrs, include_loopback=True, include_link_local=True, include_down=True
    )
    assert {a.address for a in everything} == {
        "127.0.0.1", "192.168.1.2", "fe80::1", "169.254.7.7", "2001:db8:1::2", "10.0.0.5", "100.64.0.1"
    }  # fmt: skip


def test_interface_address_equality_ignores_flags() -> None:
    a = InterfaceAddress("eth0", 2, "192.168.1.2", 24, 0, IFF_UP)
    b = InterfaceAddress("eth0", 2, "192.168.1.2", 24, 0, IFF_UP | IFF_RUNNING, 0x80)
    assert a == b and hash(a) == hash(b)
    assert a != InterfaceAddress("eth0", 2, "192.168.1.3", 24, 0, IFF_UP)


def _ip_json_addresses() -> set[tuple[str, str, int]]:
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout
    want = set()
    for link in json.loads(out):
        if "UP" not in link["flags"] or "LOOPBACK" in link["flags"]:
            continue
        for a in link.get("addr_info", []):
            if a.get("scope") != "global" or a.get("tentative") or a.get("dadfailed"):
                continue
            want.add((link["ifname"], a["local"], a["prefixlen"]))
    return want


@pytest.mark.skipif(
    shutil.which("ip") is None or not hasattr(socket, "AF_NETLINK"), reason="needs Linux iproute2"
)
def test_real_dump_matches_iproute2() -> None:
    got = {(a.interface, a.address, a.prefixlen) for a in netif.interface_addresses()}
    assert got == _ip_json_addresses()
    lo = [a for a in netif.interface_addresses(include_loopback=True) if a.address == "127.0.0.1"]
    assert len(lo) == 1 and lo[0].scope == netif.SCOPE_HOST and lo[0].flags & IFF_LOOPBACK


_DUMP_PROGRAM = """
import json
from natlib import netif
print(json.dumps({
    "addresses": [[a.interface, a.address, a.prefixlen, a.scope] for a in netif.interface_addresses()],
    "routes": [[r.family, r.gateway, r.interface] for r in netif.default_routes()],
}))
"""


@pytest.mark.netlab("a=easy:ipv6,p=none")
def test_lab_host_addresses_and_default_routes(netlab: Lab) -> None:
    lab = netlab
    for name in ("a1", "p1"):
        host = lab.host(name)
        out = json.loads(lab.run(name, [sys.executable, "-c", _DUMP_PROGRAM]).stdout)
        got = {(iface, addr) for iface, addr, _plen, _scope in out["addresses"]}
        assert got == {("eth0", a) for a in host.ipv4 + host.ipv6}
        assert all(scope == netif.SCOPE_UNIVERSE for *_, scope in out["addresses"])
        routes = {(fam, iface) for fam, _gw, iface in out["routes"]}
        assert (4, "eth0") in routes
    a1 = json.loads(lab.run("a1", [sys.executable, "-c", _DUMP_PROGRAM]).stdout)
    assert [4, lab.gateway("a1"), "eth0"] in a1["routes"]
    assert any(fam == 6 for fam, _gw, _if in a1["routes"])
    lab.link_down("a1")
    down = json.loads(lab.run("a1", [sys.executable, "-c", _DUMP_PROGRAM]).stdout)
    assert down == {"addresses": [], "routes": []}
