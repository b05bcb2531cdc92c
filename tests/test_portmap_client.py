"""natlib.portmap's driver and sans-io bookkeeping, without root.

The driver runs against ``FakeRouter``: a scripted NAT-PMP/PCP/SSDP/HTTP router on a loopback
address of its own (127.x.y.z, so the real ports 5351 and 1900 are free to use). It plays what the
lab's miniupnpd cannot: IGDv2, SOAP faults 725/402/718, a private ("double NAT") external address,
PCP result codes, wrong nonces and garbage datagrams. Everything that miniupnpd can do is tested
against it in tests/netlab/test_portmap_lab.py.
"""

from __future__ import annotations

import ipaddress
import random
import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trio

from natlib import portmap
from natlib.portmap import (
    Gateway,
    GatewayUnsupportedError,
    Mapping,
    PortMapper,
    PortMapProtocolError,
    PortMapUnavailableError,
    Protocol,
    UnusableExternalAddressError,
    UpnpSoapFault,
    _client,
    parse_proc_net_route,
    usable_external_ip,
)
from natlib.portmap._gateway import check_gateway
from natlib.portmap._state import ServiceCache, epoch_says_reboot, protocol_order, renew_time

# -- sans-io bookkeeping ---------------------------------------------------------------------------


def test_epoch_going_backwards_is_a_reboot() -> None:
    assert epoch_says_reboot(1000, 0.0, 999, 0.0)
    assert not epoch_says_reboot(1000, 0.0, 1000, 0.0)
    assert not epoch_says_reboot(1000, 0.0, 1100, 100.0)


def test_epoch_that_advanced_too_little_is_a_reboot() -> None:
    # RFC 6886 §3.6: after 100 s the epoch must have grown by at least 7/8 of that, less 2 s.
    assert not epoch_says_reboot(1000, 0.0, 1000 + 86, 100.0)
    assert epoch_says_reboot(1000, 0.0, 1000 + 80, 100.0)


def test_service_cache_trusts_presence_for_ten_minutes_and_absence_for_five_seconds() -> None:
    cache = ServiceCache()
    cache.record("natpmp", True, 0.0)
    cache.record("pcp", False, 0.0)
    assert (cache.state("natpmp", 599.0), cache.state("pcp", 4.9), cache.state("upnp", 0.0)) == (
        True,
        False,
        None,
    )
    assert (cache.state("natpmp", 600.0), cache.state("pcp", 5.0)) == (None, None)
    cache.forget()
    assert cache.state("natpmp", 1.0) is None


def test_protocol_order() -> None:
    all3: tuple[Protocol, ...] = ("natpmp", "pcp", "upnp")
    cache = ServiceCache()
    assert protocol_order(all3, cache, 0.0) == ["natpmp", "pcp", "upnp"]
    cache.record("natpmp", False, 0.0)
    cache.record("pcp", False, 0.0)
    assert protocol_order(all3, cache, 1.0) == ["upnp"]  # a recent probe saw neither: straight to UPnP
    assert protocol_order(all3, cache, 6.0) == ["natpmp", "pcp", "upnp"]  # absence is forgotten fast
    cache.record("pcp", True, 6.0)
    assert protocol_order(all3, cache, 6.0) == ["pcp", "natpmp", "upnp"]  # only PCP seen: PCP first
    assert protocol_order(("upnp", "natpmp"), cache, 6.0) == ["natpmp", "upnp"]


def test_renewal_at_half_lifetime_and_an_hour_for_upnp() -> None:
    assert renew_time("natpmp", 100.0, 7200) == 3700.0
    assert renew_time("pcp", 100.0, 60) == 130.0
    assert renew_time("upnp", 100.0, 0) == 3700.0
    m = Mapping("upnp", ("203.0.113.2", 1), 1, 0, 5.0, 3605.0)
    assert m.expires_at is None
    assert Mapping("pcp", ("203.0.113.2", 1), 1, 60, 5.0, 35.0).expires_at == 65.0


# -- gateway and addresses -------------------------------------------------------------------------

ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
wlan0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
tun0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0
bad line
eth1\t00000000\tZZZZ\t0003\t0\t0\t0\t00000000\t0\t0\t0
"""


def test_default_gateway_from_proc_net_route() -> None:
    assert parse_proc_net_route(ROUTES) == "10.0.0.1"  # the lower metric wins; tun0 has no gateway
    assert parse_proc_net_route(ROUTES.replace("\t100\t", "\t900\t")) == "192.168.1.1"
    assert parse_proc_net_route(ROUTES.splitlines()[0]) is None
    assert parse_proc_net_route("") is None


@pytest.mark.parametrize(
    ("gateway", "local"), [("203.0.113.1", "192.168.1.2"), ("192.168.1.1", "100.64.0.2"), ("::1", "::2")]
)
def test_non_private_gateway_is_unsupported(gateway: str, local: str) -> None:
    with pytest.raises(GatewayUnsupportedError, match="gateway range likely lacks support"):
        check_gateway(gateway, local)


def test_private_gateway_is_accepted() -> None:
    assert check_gateway("172.16.0.1", "172.16.0.9") == Gateway("172.16.0.1", "172.16.0.9")


async def test_probe_of_a_public_gateway_says_why_and_sends_nothing() -> None:
    result = await portmap.probe("198.51.100.1")
    assert (result.pmp, result.pcp, result.upnp) == (False, False, False)
    assert result.gateway == "198.51.100.1"
    assert result.error is not None and "gateway range likely lacks support" in result.error


@pytest.mark.parametrize(
    "address",
    ["0.0.0.0", "0.1.2.3", "127.0.0.1", "10.1.2.3", "172.20.0.1", "192.168.0.1", "100.64.0.1", "169.254.1.1",
     "224.0.0.1", "255.255.255.255", "2001:db8::1", "junk", None],
)  # fmt: skip
def test_unusable_external_addresses_are_refused(address: str | None) -> None:
    with pytest.raises(UnusableExternalAddressError, match="natpmp"):
        usable_external_ip(address, protocol="natpmp")


@pytest.mark.parametrize("address", ["203.0.113.2", "198.51.100.7", "8.8.8.8", "100.128.0.1"])
def test_public_external_addresses_are_accepted(address: str) -> None:
    assert usable_external_ip(ipaddress.IPv4Address(address), protocol="pcp") == address


# -- the fake router -------------------------------------------------------------------------------

FLOATING = "10.99.0.1"  # what the router's SSDP answers name as description host (§3.3)


@dataclass
class FakeRouter:
    ip: str
    pmp: bool = True
    pcp: bool = True
    upnp: bool = False
    epoch: int = 5000
    pmp_external: str = "203.0.113.7"
    pcp_external: str = "203.0.113.7"
    pcp_announce_result: int = 0
    pcp_map_results: list[int] = field(default_factory=list)  # consumed first, then success
    pmp_map_results: list[int] = field(default_factory=list)
    granted_lifetime: int | None = None  # None: grant what was asked
    noise: list[bytes] = field(default_factory=list)  # sent before every NAT-PMP/PCP answer
    wrong_nonce_first: bool = False
    igd_version: int = 1
    ssdp_reply_port: int = 1900
    ssdp_st: str | None = None
    upnp_external: str = "203.0.113.7"
    soap_faults: dict[str, list[int]] = field(default_factory=dict)
    reserved_port: int | None = None
    description_body: bytes | None = None  # instead of the root description
    pmp_requests: list[bytes] = field(default_factory=list)
    pcp_requests: list[bytes] = field(default_factory=list)
    soap_calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    http_paths: list[str] = field(default_factory=list)
    http_port: int = 0
    request_seen: trio.Event = field(default_factory=trio.Event)

    def gateway(self) -> Gateway:
        return Gateway(self.ip, "127.0.0.1")

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        pmp_sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        ssdp_sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        reply_sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await pmp_sock.bind((self.ip, 5351))
        await ssdp_sock.bind((self.ip, 1900))
        await reply_sock.bind(
            (self.ip, self.ssdp_reply_port) if self.ssdp_reply_port != 1900 else (self.ip, 0)
        )
        listeners = await trio.open_tcp_listeners(0, host=self.ip)
        self.http_port = listeners[0].socket.getsockname()[1]
        with pmp_sock, ssdp_sock, reply_sock:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_pmp, pmp_sock)
                nursery.start_soon(
                    self._serve_ssdp, ssdp_sock, reply_sock if self.ssdp_reply_port != 1900 else ssdp_sock
                )
                nursery.start_soon(trio.serve_listeners, self._serve_http, listeners)
                task_status.started()

    async def _serve_pmp(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, peer = await sock.recvfrom(2048)
            answer = self._answer_pmp_pcp(data)
            if answer is None:
                continue
            for junk in self.noise:
                await sock.sendto(junk, peer)
            await sock.sendto(answer, peer)
            self.request_seen.set()

    def _answer_pmp_pcp(self, data: bytes) -> bytes | None:
        if data[:1] == b"\x00":
            self.pmp_requests.append(data)
            if not self.pmp:
                return None
            if data[1] == 0:
                return struct.pack(
                    "!BBHI4s", 0, 128, 0, self.epoch, ipaddress.IPv4Address(self.pmp_external).packed
                )
            _, op, _, internal, suggested, lifetime = struct.unpack("!BBHHHI", data)
            if self.pmp_map_results:
                code = self.pmp_map_results.pop(0)
                return struct.pack("!BBHIHHI", 0, 128 + op, code, self.epoch, internal, 0, 0)
            granted = lifetime if self.granted_lifetime is None or lifetime == 0 else self.granted_lifetime
            return struct.pack(
                "!BBHIHHI", 0, 128 + op, 0, self.epoch, internal, suggested or internal, granted
            )
        if data[:1] == b"\x02":
            self.pcp_requests.append(data)
            if not self.pcp:
                return struct.pack("!BBHI", 0, 128 + data[1], 1, self.epoch) if self.pmp else None
            lifetime = struct.unpack("!I", data[4:8])[0]
            if data[1] == 0:
                return struct.pack("!BBBBII12x", 2, 128, 0, self.pcp_announce_result, 0, self.epoch)
            result = self.pcp_map_results.pop(0) if self.pcp_map_results else 0
            granted = lifetime if self.granted_lifetime is None or lifetime == 0 else self.granted_lifetime
            nonce, internal, suggested = data[24:36], *struct.unpack("!HH", data[40:44])
            ext_ip = b"\0" * 10 + b"\xff\xff" + ipaddress.IPv4Address(self.pcp_external).packed
            body = struct.pack("!B3xHH", 17, internal, suggested or internal) + ext_ip
            header = struct.pack("!BBBBII12x", 2, 129, 0, result, granted, self.epoch)
            if self.wrong_nonce_first:
                self.wrong_nonce_first = False
                self.noise = [header + bytes(12) + body]
            return header + nonce + body
        return None

    async def _serve_ssdp(self, sock: trio.socket.SocketType, reply: trio.socket.SocketType) -> None:
        while True:
            data, peer = await sock.recvfrom(2048)
            if not self.upnp or not data.startswith(b"M-SEARCH"):
                continue
            st = self.ssdp_st or f"urn:schemas-upnp-org:device:InternetGatewayDevice:{self.igd_version}"
            answer = (
                f"HTTP/1.1 200 OK\r\nST: {st}\r\nUSN: uuid:fake::{st}\r\n"
                f"LOCATION: http://{FLOATING}:{self.http_port}/rootDesc.xml\r\n\r\n"
            )
            await reply.sendto(answer.encode(), peer)

    async def _serve_http(self, stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)) if b"ength" in head else 0  # type: ignore[union-attr]
        while len(body) < length:
            body += await stream.receive_some(4096)
        path = head.split()[1].decode()
        self.http_paths.append(path)
        status, reply = 200, b""
        service = f"urn:schemas-upnp-org:service:WANIPConnection:{self.igd_version}"
        if path == "/rootDesc.xml" and self.description_body is not None:
            reply = self.description_body
        elif path == "/rootDesc.xml":
            reply = (
                '<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0"><device><serviceList>'
                f"<service><serviceType>{service}</serviceType><controlURL>/ctl/IPConn</controlURL></service>"
                "</serviceList></device></root>"
            ).encode()
        else:
            action = re.search(rb'#(\w+)"', head).group(1).decode()  # type: ignore[union-attr]
            args = dict(re.findall(r"<(New\w+)>([^<]*)</New\w+>", body.decode()))
            self.soap_calls.append((action, args))
            faults = self.soap_faults.get(action, [])
            if faults:
                status = 500
                reply = soap_envelope(
                    "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
                    '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
                    f"<errorCode>{faults.pop(0)}</errorCode>"
                    "<errorDescription>scripted</errorDescription></UPnPError></detail></s:Fault>"
                )
            else:
                out = ""
                if action == "AddAnyPortMapping":
                    out = (
                        f"<NewReservedPort>{self.reserved_port or args['NewExternalPort']}</NewReservedPort>"
                    )
                elif action == "GetExternalIPAddress":
                    out = f"<NewExternalIPAddress>{self.upnp_external}</NewExternalIPAddress>"
                reply = soap_envelope(f'<u:{action}Response xmlns:u="{service}">{out}</u:{action}Response>')
        await stream.send_all(
            f"HTTP/1.1 {status} X\r\nContent-Length: {len(reply)}\r\nConnection: close\r\n\r\n".encode()
            + reply
        )
        await stream.aclose()


def soap_envelope(inner: str) -> bytes:
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
        f"<s:Body>{inner}</s:Body></s:Envelope>"
    ).encode()


RouterFactory = Callable[..., Awaitable[FakeRouter]]


@pytest.fixture
def router_factory(nursery: trio.Nursery) -> RouterFactory:
    """``await make(**options)``: a FakeRouter serving until the test ends."""

    _client._recent_probes.clear()  # probes are shared per gateway: start afresh

    async def make(**options: object) -> FakeRouter:
        ip = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        router = FakeRouter(ip, **options)  # type: ignore[arg-type]
        await nursery.start(router.serve)
        return router

    return make


# -- probe -----------------------------------------------------------------------------------------


async def test_probe_sees_all_three_and_rewrites_the_location(router_factory: RouterFactory) -> None:
    router = await router_factory(upnp=True)
    async with PortMapper(40000, gateway=router.gateway()) as mapper:
        result = await mapper.probe()
    assert (result.pmp, result.pcp, result.upnp) == (True, True, True)
    assert result.upnp_locations == (f"http://{router.ip}:{router.http_port}/rootDesc.xml",)
    assert (result.pmp_external_ip, result.pmp_epoch, result.pcp_result, result.double_nat) == (
        "203.0.113.7",
        5000,
        0,
        False,
    )
    assert result.elapsed < 0.25
    # The probe's own datagrams: a NAT-PMP external address request and a PCP ANNOUNCE from us.
    assert router.pmp_requests == [b"\x00\x00"]
    assert router.pcp_requests == [bytes.fromhex("0200000000000000" + "00" * 10 + "ffff7f000001")]


async def test_probe_accepts_igd_answers_from_another_port_but_not_others(
    router_factory: RouterFactory,
) -> None:
    igd = await router_factory(upnp=True, igd_version=2, ssdp_reply_port=random.randint(20000, 30000))
    async with PortMapper(40000, gateway=igd.gateway()) as mapper:
        assert (await mapper.probe()).upnp
    other = await router_factory(
        upnp=True, ssdp_st="upnp:rootdevice", ssdp_reply_port=random.randint(30001, 40000)
    )
    async with PortMapper(40000, gateway=other.gateway()) as mapper:
        result = await mapper.probe()
    assert (result.upnp, result.upnp_locations) == (False, ())


async def test_probe_reports_double_nat_and_a_nat_pmp_only_router(router_factory: RouterFactory) -> None:
    router = await router_factory(pcp_announce_result=12)
    async with PortMapper(40000, gateway=router.gateway()) as mapper:
        result = await mapper.probe()
    assert (result.pmp, result.pcp, result.pcp_result, result.double_nat) == (True, False, 12, True)
    pmp_only = await router_factory(pcp=False)
    async with PortMapper(40000, gateway=pmp_only.gateway()) as mapper:
        result = await mapper.probe()
    assert (result.pmp, result.pcp, result.pcp_result) == (True, False, None)


# -- mappings --------------------------------------------------------------------------------------


def natpmp_map_request(internal: int, suggested: int, lifetime: int) -> bytes:
    return struct.pack("!BBHHHI", 0, 1, 0, internal, suggested, lifetime)


async def test_natpmp_map_renew_and_release_on_the_wire(router_factory: RouterFactory) -> None:
    router = await router_factory()
    async with PortMapper(41641, gateway=router.gateway(), protocols=("natpmp",)) as mapper:
        mapping = await mapper.map()
        assert mapping == Mapping(
            protocol="natpmp",
            external=("203.0.113.7", 41641),
            internal_port=41641,
            lifetime=7200,
            obtained_at=mapping.obtained_at,
            renew_at=mapping.obtained_at + 3600,
            epoch=5000,
        )
        router.epoch += 1
        renewed = await mapper.renew()
        assert (renewed.external, renewed.epoch, mapper.reboots_detected) == (mapping.external, 5001, 0)
        assert renewed.obtained_at > mapping.obtained_at
    assert mapper.mapping is None
    assert router.pmp_requests == [
        b"\x00\x00",  # the probe
        b"\x00\x00",  # map: external address, then the mapping of our own port
        natpmp_map_request(41641, 41641, 7200),
        b"\x00\x00",  # renew: the same, suggesting the port we hold
        natpmp_map_request(41641, 41641, 7200),
        natpmp_map_request(41641, 0, 0),  # release on close: lifetime 0
    ]


async def test_router_reboot_drops_and_recreates_the_mapping(router_factory: RouterFactory) -> None:
    router = await router_factory()
    async with PortMapper(41641, gateway=router.gateway(), protocols=("natpmp",)) as mapper:
        first = await mapper.map()
        router.epoch = 3  # the router restarted: its epoch began again
        again = await mapper.renew()
        assert mapper.reboots_detected == 1
        assert (again.epoch, again.external) == (3, first.external)
        assert mapper.mapping == again


async def test_background_renewal_at_half_the_granted_lifetime(router_factory: RouterFactory) -> None:
    router = await router_factory(granted_lifetime=1)
    async with PortMapper(41641, gateway=router.gateway(), protocols=("pcp",)) as mapper:
        first = await mapper.map()
        assert first.renew_at == pytest.approx(first.obtained_at + 0.5)
        with trio.fail_after(5):
            while mapper.mapping is None or mapper.mapping.obtained_at == first.obtained_at:
                router.request_seen = trio.Event()
                await router.request_seen.wait()
        renewed = mapper.mapping
        assert renewed is not None
        assert renewed.obtained_at >= first.renew_at
    # The renewal reused the nonce (RFC 6887 §11.2.1: a refresh names the same mapping).
    maps = [r for r in router.pcp_requests if r[1] == 1]
    assert len({r[24:36] for r in maps}) == 1
    assert maps[-1][4:8] == b"\0\0\0\0"  # released on close


async def test_private_nat_pmp_address_is_refused_then_pcp_is_used(router_factory: RouterFactory) -> None:
    router = await router_factory(pmp_external="10.0.0.1")
    async with PortMapper(41641, gateway=router.gateway()) as mapper:
        with pytest.raises(UnusableExternalAddressError, match=r"10\.0\.0\.1"):
            await mapper.map("natpmp")
        mapping = await mapper.map()
    assert mapping.protocol == "pcp"
    assert mapping.external == ("203.0.113.7", 41641)


@pytest.mark.parametrize(("code", "text"), [(2, "NOT_AUTHORIZED"), (8, "NO_RESOURCES"), (12, "double NAT")])
async def test_pcp_error_results(router_factory: RouterFactory, code: int, text: str) -> None:
    router = await router_factory(pcp_map_results=[code])
    async with PortMapper(41641, gateway=router.gateway(), protocols=("pcp",)) as mapper:
        with pytest.raises(PortMapProtocolError, match=text) as info:
            await mapper.map("pcp")
        assert (info.value.protocol, info.value.code) == ("pcp", code)
        assert mapper.mapping is None


async def test_wrong_nonce_and_garbage_answers_are_ignored(router_factory: RouterFactory) -> None:
    other_port_pmp = struct.pack("!BBHIHHI", 0, 0x81, 0, 5000, 1234, 1234, 7200)  # another host's answer
    garbage = [
        other_port_pmp,
        b"",
        b"\x02",
        b"\x02\x81" + b"\xff" * 30,
        b"\x00\x81\x00",
        b"\x07" * 60,
        b"\x02\x01" + bytes(58),
    ]
    router = await router_factory(noise=garbage, wrong_nonce_first=True)
    async with PortMapper(41641, gateway=router.gateway(), protocols=("pcp",)) as mapper:
        mapping = await mapper.map()
    assert mapping.external == ("203.0.113.7", 41641)
    router2 = await router_factory(noise=garbage)
    async with PortMapper(41641, gateway=router2.gateway(), protocols=("natpmp",)) as mapper:
        assert (await mapper.map()).external == ("203.0.113.7", 41641)


async def test_nothing_offered_is_reported_per_protocol(router_factory: RouterFactory) -> None:
    router = await router_factory(pmp=False, pcp=False)
    async with PortMapper(41641, gateway=router.gateway()) as mapper:
        with pytest.raises(PortMapUnavailableError) as info:
            await mapper.map()
    assert set(info.value.failures) == {"natpmp", "pcp", "upnp"}


async def test_upnp_v1_add_port_mapping_and_delete(router_factory: RouterFactory) -> None:
    router = await router_factory(pmp=False, pcp=False, upnp=True)
    async with PortMapper(41641, gateway=router.gateway()) as mapper:
        mapping = await mapper.map()
        assert mapping.protocol == "upnp"
        assert mapping.external == ("203.0.113.7", 41641)
        assert (mapping.lifetime, mapping.renew_at - mapping.obtained_at) == (7200, 3600)
    assert router.http_paths[0] == "/rootDesc.xml"  # fetched from the gateway, not the floating host
    assert router.soap_calls == [
        (
            "AddPortMapping",
            {
                "NewRemoteHost": "",
                "NewExternalPort": "41641",
                "NewProtocol": "UDP",
                "NewInternalPort": "41641",
                "NewInternalClient": "127.0.0.1",
                "NewEnabled": "1",
                "NewPortMappingDescription": "natlib",
                "NewLeaseDuration": "7200",
            },
        ),
        ("GetExternalIPAddress", {}),
        ("DeletePortMapping", {"NewRemoteHost": "", "NewExternalPort": "41641", "NewProtocol": "UDP"}),
    ]


async def test_upnp_v2_uses_add_any_port_mapping(router_factory: RouterFactory) -> None:
    router = await router_factory(upnp=True, igd_version=2, reserved_port=50123)
    async with PortMapper(41641, gateway=router.gateway(), protocols=("upnp",)) as mapper:
        mapping = await mapper.map()
    assert mapping.external == ("203.0.113.7", 50123)
    assert [c[0] for c in router.soap_calls] == [
        "AddAnyPortMapping",
        "GetExternalIPAddress",
        "DeletePortMapping",
    ]
    assert router.soap_calls[-1][1]["NewExternalPort"] == "50123"


@pytest.mark.parametrize("code", [725, 402])
async def test_upnp_retries_with_a_permanent_lease(router_factory: RouterFactory, code: int) -> None:
    router = await router_factory(upnp=True, soap_faults={"AddPortMapping": [code]})
    async with PortMapper(41641, gateway=router.gateway(), protocols=("upnp",)) as mapper:
        mapping = await mapper.map()
    assert [args["NewLeaseDuration"] for action, args in router.soap_calls if action == "AddPortMapping"] == [
        "7200",
        "0",
    ]
    assert (mapping.lifetime, mapping.expires_at) == (0, None)
    assert mapping.renew_at == mapping.obtained_at + 3600


async def test_upnp_conflict_picks_another_port(router_factory: RouterFactory) -> None:
    router = await router_factory(upnp=True, soap_faults={"AddPortMapping": [718]})
    async with PortMapper(41641, gateway=router.gateway(), protocols=("upnp",)) as mapper:
        mapping = await mapper.map()
    ports = [int(args["NewExternalPort"]) for action, args in router.soap_calls if action == "AddPortMapping"]
    assert ports[0] == 41641 and ports[1] >= 1024 and len(ports) == 2
    assert mapping.external[1] == ports[1]
    assert mapping.internal_port == 41641  # always our real local port


async def test_upnp_other_faults_and_zero_address_are_errors(router_factory: RouterFactory) -> None:
    router = await router_factory(upnp=True, soap_faults={"AddPortMapping": [501]})
    async with PortMapper(41641, gateway=router.gateway(), protocols=("upnp",)) as mapper:
        with pytest.raises(UpnpSoapFault) as info:
            await mapper.map("upnp")
        assert info.value.code == 501
    zero = await router_factory(upnp=True, upnp_external="0.0.0.0")
    async with PortMapper(41641, gateway=zero.gateway(), protocols=("upnp",)) as mapper:
        with pytest.raises(UnusableExternalAddressError, match=r"0\.0\.0\.0"):
            await mapper.map("upnp")


def test_port_mapper_argument_checks() -> None:
    with pytest.raises(ValueError, match="not mappable"):
        PortMapper(0)
    with pytest.raises(ValueError, match="protocols"):
        PortMapper(1, protocols=("smtp",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="protocols"):
        PortMapper(1, protocols=())


async def test_a_recent_probe_of_the_gateway_is_reused(router_factory: RouterFactory) -> None:
    router = await router_factory()
    async with PortMapper(41641, gateway=router.gateway()) as first:
        await first.probe()
    async with PortMapper(41642, gateway=router.gateway()) as second:
        mapping = await second.map()
    assert mapping.protocol == "natpmp"
    # One probe (b"\x00\x00" plus PCP ANNOUNCE), then the second mapper's create and release.
    assert router.pmp_requests.count(b"\x00\x00") == 2
    assert len([r for r in router.pcp_requests if r[1] == 0]) == 1


@pytest.mark.parametrize(
    ("code", "name"), [(2, "NOT_AUTHORIZED"), (3, "NETWORK_FAILURE"), (4, "OUT_OF_RESOURCES")]
)
async def test_natpmp_error_results(router_factory: RouterFactory, code: int, name: str) -> None:
    router = await router_factory(pmp_map_results=[code])
    async with PortMapper(41641, gateway=router.gateway(), protocols=("natpmp",)) as mapper:
        with pytest.raises(PortMapProtocolError, match=f"result {code} {name}") as info:
            await mapper.map("natpmp")
    assert (info.value.protocol, info.value.code) == ("natpmp", code)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><root>&a;</root>',
            "document type declaration",
        ),
        (b"\x00\xffgarbage", "malformed XML"),
        (b"<root>" + b"x" * 70000 + b"</root>", "exceeds"),
        (b"<html>router login</html>", "not <root>"),
    ],
)
async def test_hostile_or_garbage_description_is_a_clear_error(
    router_factory: RouterFactory, body: bytes, reason: str
) -> None:
    router = await router_factory(upnp=True, description_body=body)
    async with PortMapper(41641, gateway=router.gateway(), protocols=("upnp",)) as mapper:
        with pytest.raises(portmap.PortMapError, match=reason):
            await mapper.map("upnp")
    assert router.soap_calls == []
