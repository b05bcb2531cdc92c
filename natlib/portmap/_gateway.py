"""Which router to ask: the default IPv4 gateway and our address on its subnet.

:func:`parse_proc_net_route` is pure (the text of ``/proc/net/route`` in, the gateway out); the
lookup :func:`find_gateway` reads that file and asks the kernel which source address it would use
toward the gateway (``connect`` on a UDP socket sends nothing). Port mapping only makes sense with
a home router, so both addresses must be private IPv4 (RFC 1918); otherwise
:class:`~natlib.portmap.GatewayUnsupportedError` ("gateway range likely lacks support"), like
Tailscale. An IPv6-only host has no IPv4 default route: :class:`~natlib.portmap.NoGatewayError`.

:func:`usable_external_ip` is the check applied to every external address a router reports: it
must be a unicast address outside the private, shared (CGNAT), loopback, link-local, "this
network", multicast and reserved blocks. Documentation ranges are accepted on purpose: the NAT lab
uses them as its internet.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ._errors import GatewayUnsupportedError, NoGatewayError, UnusableExternalAddressError

__all__ = [
    "Gateway",
    "check_gateway",
    "find_gateway",
    "is_private_ipv4",
    "parse_proc_net_route",
    "usable_external_ip",
]

PROC_NET_ROUTE: Final = Path("/proc/net/route")
_RTF_UP: Final = 0x1
_RTF_GATEWAY: Final = 0x2

_RFC1918: Final = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_NOT_PUBLIC: Final = (
    *_RFC1918,
    ipaddress.IPv4Network("0.0.0.0/8"),
    ipaddress.IPv4Network("100.64.0.0/10"),
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv4Network("169.254.0.0/16"),
    ipaddress.IPv4Network("224.0.0.0/4"),
    ipaddress.IPv4Network("240.0.0.0/4"),
)


@dataclass(frozen=True, slots=True)
class Gateway:
    """The router to ask and our address toward it."""

    gateway: str
    local_ip: str


def is_private_ipv4(address: str) -> bool:
    """True for an RFC 1918 IPv4 address (what a home router and its LAN use)."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return any(ip in net for net in _RFC1918)


def usable_external_ip(address: str | ipaddress.IPv4Address | None, *, protocol: str) -> str:
    """``address`` as a string if a router may report it as our public address; else raise
    :class:`UnusableExternalAddressError` naming ``protocol`` and the reason."""
    if address is None:
        raise UnusableExternalAddressError(f"{protocol}: the router reported no external address")
    try:
        ip = ipaddress.IPv4Address(str(address))
    except ValueError:
        raise UnusableExternalAddressError(f"{protocol}: external address {address!r} is not IPv4") from None
    for net in _NOT_PUBLIC:
        if ip in net:
            hint = " (double NAT?)" if net in _RFC1918 or net.prefixlen == 10 else ""
            raise UnusableExternalAddressError(
                f"{protocol}: external address {ip} is in {net}, not public{hint}"
            )
    return str(ip)


def parse_proc_net_route(text: str) -> str | None:
    """The gateway of the best IPv4 default route in ``/proc/net/route`` text, or None.

    Only routes that are up, have a gateway and cover 0.0.0.0/0 count; the lowest metric wins.
    Malformed lines are skipped.
    """
    best: tuple[int, str] | None = None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination, gateway, flags = int(fields[1], 16), int(fields[2], 16), int(fields[3], 16)
            metric, mask = int(fields[6]), int(fields[7], 16)
        except ValueError:
            continue
        if destination != 0 or mask != 0 or not flags & _RTF_UP or not flags & _RTF_GATEWAY:
            continue
        # The kernel prints the address as a native-endian u32; on every Linux we run it is little-endian.
        address = str(ipaddress.IPv4Address(struct.pack("<I", gateway)))
        if best is None or metric < best[0]:
            best = (metric, address)
    return best[1] if best else None


def check_gateway(gateway: str, local_ip: str) -> Gateway:
    """Validate a (gateway, our address) pair: both private IPv4, else GatewayUnsupportedError."""
    if not is_private_ipv4(gateway) or not is_private_ipv4(local_ip):
        raise GatewayUnsupportedError(
            f"gateway {gateway} / local address {local_ip}: gateway range likely lacks support"
        )
    return Gateway(gateway, local_ip)


def local_ip_toward(gateway: str) -> str:
    """Our source address toward ``gateway`` as the kernel would pick it (nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((gateway, 5351))
        address: str = s.getsockname()[0]
        return address


def find_gateway(gateway: str | None = None) -> Gateway:
    """The default IPv4 gateway (or ``gateway`` if given) and our address toward it, validated.

    Raises :class:`NoGatewayError` without an IPv4 default route and
    :class:`GatewayUnsupportedError` when either address is not private IPv4. Blocking but quick
    (a file read and a socket call), so drivers call it directly.
    """
    if gateway is None:
        try:
            gateway = parse_proc_net_route(PROC_NET_ROUTE.read_text())
        except OSError:
            gateway = None
        if gateway is None:
            raise NoGatewayError("no IPv4 default route")
    try:
        ipaddress.IPv4Address(gateway)
    except ValueError:
        raise GatewayUnsupportedError(f"gateway {gateway!r} is not IPv4: gateway range likely lacks support")
    try:
        local_ip = local_ip_toward(gateway)
    except OSError as e:
        raise NoGatewayError(f"no route to gateway {gateway}: {e}") from None
    return check_gateway(gateway, local_ip)
