"""``Endpoint``: a UDP address (IP and port) in the text form WireGuard uses.

IPv4 is written ``198.51.100.7:41641`` and IPv6 ``[2001:db8::7]:41641``, exactly as UAPI's
``endpoint=`` line, ``wg``'s ``endpoint`` argument and the mesh file's ``endpoints`` list want it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Self

__all__ = ["Endpoint", "EndpointFormatError"]


class EndpointFormatError(ValueError):
    """The text is not ``ipv4:port`` or ``[ipv6]:port`` with a port in 1–65535."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An IP address and a UDP port."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def __post_init__(self) -> None:
        if not 0 < self.port <= 0xFFFF:
            raise EndpointFormatError(f"port {self.port} is not in 1-65535")

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``a.b.c.d:port`` or ``[v6]:port`` (no host names: the mesh works on addresses)."""
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise EndpointFormatError(f"{text!r} is not ip:port")
        if host.startswith("["):
            if not host.endswith("]"):
                raise EndpointFormatError(f"{text!r}: unbalanced brackets")
            host = host[1:-1]
        elif ":" in host:
            raise EndpointFormatError(f"{text!r}: an IPv6 endpoint must be written [addr]:port")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise EndpointFormatError(f"{text!r}: {host!r} is not an IP address") from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            raise EndpointFormatError(f"{text!r}: scoped IPv6 addresses are not supported")
        if not port_text.isdigit() or len(port_text) > 5:
            raise EndpointFormatError(f"{text!r}: {port_text!r} is not a port number")
        return cls(ip, int(port_text))

    def text(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"

    def __str__(self) -> str:
        return self.text()
