"""Declarative lab topology: NAT kinds, sites, servers, and the short text form used by the CLI."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

__all__ = [
    "FILTERINGS",
    "MAPPINGS",
    "NAT_KINDS",
    "FilteringType",
    "MappingType",
    "NatKind",
    "ServerSpec",
    "SiteSpec",
    "Topology",
    "TopologyError",
]

FilteringType = Literal["endpoint_independent", "address_dependent", "address_and_port_dependent"]
MappingType = Literal["endpoint_independent", "endpoint_dependent"]

FILTERINGS: Final[tuple[FilteringType, ...]] = (
    "endpoint_independent",
    "address_dependent",
    "address_and_port_dependent",
)
MAPPINGS: Final[tuple[MappingType, ...]] = ("endpoint_independent", "endpoint_dependent")

_NAME_RE: Final = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_SITE_RE: Final = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # "<site>-nat" must fit in an interface name


class TopologyError(ValueError):
    """The topology description is invalid."""


@dataclass(frozen=True)
class NatKind:
    """What a NAT kind does: its mapping, filtering and extras (see docs/netlab.md)."""

    name: str
    description: str
    nat: Literal["none", "masquerade", "masquerade_random", "one2one", "v6"]
    mapping: MappingType | None
    filtering: FilteringType | None
    udp_blocked: bool = False
    port_mapping: bool = False
    ipv4: bool = True


NAT_KINDS: Final[Mapping[str, NatKind]] = {
    k.name: k
    for k in (
        NatKind(
            "none",
            "a host directly on the internet (public address, no NAT, no firewall)",
            "none",
            None,
            None,
        ),
        NatKind(
            "easy",
            "endpoint-independent mapping, port preserved where free; "
            "address-and-port-dependent filtering (Linux masquerade)",
            "masquerade",
            "endpoint_independent",
            "address_and_port_dependent",
        ),
        NatKind(
            "easyAF",
            "endpoint-independent mapping; address-dependent filtering",
            "masquerade",
            "endpoint_independent",
            "address_dependent",
        ),
        NatKind(
            "easyEIF",
            "endpoint-independent mapping and filtering (full cone)",
            "masquerade",
            "endpoint_independent",
            "endpoint_independent",
        ),
        NatKind(
            "hard",
            "endpoint-dependent mapping (a random port per destination); "
            "address-and-port-dependent filtering (masquerade random)",
            "masquerade_random",
            "endpoint_dependent",
            "address_and_port_dependent",
        ),
        NatKind(
            "one2one",
            "1:1 NAT of the first LAN host: ports preserved, everything inbound forwarded",
            "one2one",
            "endpoint_independent",
            "endpoint_independent",
        ),
        NatKind(
            "udp_blocked",
            "easy NAT whose firewall drops all UDP (TCP still works)",
            "masquerade",
            "endpoint_independent",
            "address_and_port_dependent",
            udp_blocked=True,
        ),
        NatKind(
            "v6only",
            "IPv6 only, no IPv4 at all: routed global addresses behind a stateful firewall",
            "v6",
            None,
            "address_and_port_dependent",
            ipv4=False,
        ),
        NatKind(
            "easyPMP",
            "easy plus miniupnpd on the router (NAT-PMP, PCP, UPnP IGD)",
            "masquerade",
            "endpoint_independent",
            "address_and_port_dependent",
            port_mapping=True,
        ),
        NatKind(
            "hardPMP",
            "hard plus miniupnpd on the router (NAT-PMP, PCP, UPnP IGD)",
            "masquerade_random",
            "endpoint_dependent",
            "address_and_port_dependent",
            port_mapping=True,
        ),
    )
}


def _check_name(name: str, what: str) -> None:
    rx = _SITE_RE if what == "site" else _NAME_RE
    if not rx.match(name):
        raise TopologyError(f"{what} name {name!r} must match {rx.pattern}")


@dataclass(frozen=True)
class ServerSpec:
    """A host on the internet with fixed public addresses (STUN servers, relays, peers...).

    Empty ``ipv4``/``ipv6`` mean "allocate" (two IPv4 addresses from 198.51.100.0/24, so the server can
    answer from a second address, and one IPv6 address from 2001:db8:100::/64).
    """

    name: str
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    v4: bool = True
    v6: bool = True


@dataclass(frozen=True)
class SiteSpec:
    """A site: a NAT router (kind ``nat``) with LAN hosts, or public hosts when ``nat="none"``.

    ``hosts`` is a number (hosts named ``<site>1``, ``<site>2``...) or explicit host names.
    ``filtering`` overrides the kind's filtering (not for ``none``/``one2one``/``v6only``).
    ``mapping_timeout`` (seconds) sets the router's UDP conntrack timeouts and the lifetime of the
    filtering state. ``ipv6`` gives the site IPv6 as well (``v6only`` implies it).
    """

    name: str
    nat: str = "easy"
    hosts: int | tuple[str, ...] = 1
    filtering: FilteringType | None = None
    hairpin: bool = False
    mapping_timeout: float | None = None
    port_mapping: bool | None = None
    ipv6: bool = False
    lan_subnet: str | None = None
    public_ipv4: str | None = None

    @property
    def kind(self) -> NatKind:
        try:
            return NAT_KINDS[self.nat]
        except KeyError:
            raise TopologyError(f"unknown NAT kind {self.nat!r}; known: {', '.join(NAT_KINDS)}") from None

    @property
    def host_names(self) -> tuple[str, ...]:
        if isinstance(self.hosts, int):
            return tuple(f"{self.name}{i}" for i in range(1, self.hosts + 1))
        return tuple(self.hosts)

    @property
    def effective_filtering(self) -> FilteringType | None:
        return self.filtering if self.filtering is not None else self.kind.filtering

    @property
    def has_port_mapping(self) -> bool:
        return self.kind.port_mapping if self.port_mapping is None else self.port_mapping

    @property
    def has_ipv6(self) -> bool:
        return self.ipv6 or not self.kind.ipv4

    @property
    def router_name(self) -> str:
        return f"{self.name}-nat"


@dataclass(frozen=True)
class Topology:
    """An internet (one router) with server hosts and sites.

    >>> Topology(sites=(SiteSpec("a", "easy"), SiteSpec("b", "hard")))  # plus the default "stun" server
    """

    sites: tuple[SiteSpec, ...] = ()
    servers: tuple[ServerSpec, ...] = field(default_factory=lambda: (ServerSpec("stun"),))

    def __post_init__(self) -> None:
        seen: set[str] = {"inet"}
        for srv in self.servers:
            _check_name(srv.name, "server")
            if srv.name in seen:
                raise TopologyError(f"duplicate host name {srv.name!r}")
            seen.add(srv.name)
        for site in self.sites:
            _check_name(site.name, "site")
            kind = site.kind
            if site.filtering is not None:
                if site.filtering not in FILTERINGS:
                    raise TopologyError(f"site {site.name}: unknown filtering {site.filtering!r}")
                if kind.nat in ("none", "one2one", "v6"):
                    raise TopologyError(f"site {site.name}: filtering cannot be set for kind {kind.name}")
            names = site.host_names
            if not names:
                raise TopologyError(f"site {site.name} has no hosts")
            if len(names) > 200:
                raise TopologyError(f"site {site.name} has too many hosts")
            for n in (*names, site.router_name):
                if n in seen:
                    raise TopologyError(f"duplicate host name {n!r}")
                seen.add(n)
            for n in names:
                _check_name(n, "host")
            if site.lan_subnet is not None:
                net = ipaddress.ip_network(site.lan_subnet)
                if not isinstance(net, ipaddress.IPv4Network) or not net.is_private or net.prefixlen > 29:
                    raise TopologyError(f"site {site.name}: lan_subnet must be an RFC 1918 IPv4 /8–/29")
            if site.public_ipv4 is not None and not _is_doc_v4(site.public_ipv4):
                raise TopologyError(f"site {site.name}: public_ipv4 must be in a documentation range")
            if site.has_port_mapping and kind.nat not in ("masquerade", "masquerade_random"):
                raise TopologyError(f"site {site.name}: port mapping needs a NAT (easy/hard kinds)")
        for srv in self.servers:
            for a in srv.ipv4:
                if not _is_doc_v4(a):
                    raise TopologyError(f"server {srv.name}: {a} is not in a documentation range")
            for a in srv.ipv6:
                if ipaddress.IPv6Address(a) not in _DOC_V6:
                    raise TopologyError(f"server {srv.name}: {a} is not in 2001:db8::/32")
        if len(self.sites) > 60:
            raise TopologyError("at most 60 sites")

    @classmethod
    def parse(cls, text: str) -> Topology:
        """Parse the CLI's short form, or JSON.

        Short form: comma-separated sites, each ``KIND`` or ``NAME=KIND`` with ``:option`` suffixes:
        ``easy,hard`` or ``a=easyPMP:hosts=2:hairpin,b=v6only,c=easy:filtering=address_dependent``.
        Options: ``hosts=N``, ``hairpin``, ``ipv6``, ``timeout=SECONDS``, ``pmp``,
        ``filtering=F``, ``lan=CIDR``, ``public=ADDR``. Sites are named a, b, c... unless named.
        JSON: ``{"sites": [{"name": "a", "nat": "easy", "hosts": 2}], "servers": [{"name": "stun"}]}``.
        """
        text = text.strip()
        if text.startswith("{"):
            return cls.from_dict(json.loads(text))
        sites: list[SiteSpec] = []
        for i, item in enumerate(p for p in text.split(",") if p.strip()):
            head, *opts = item.strip().split(":")
            name, _, kind = head.rpartition("=")
            kw: dict[str, Any] = {"name": name or chr(ord("a") + i), "nat": kind}
            for opt in opts:
                key, eq, val = opt.partition("=")
                if key == "hosts" and eq:
                    kw["hosts"] = int(val)
                elif key == "hairpin" and not eq:
                    kw["hairpin"] = True
                elif key == "ipv6" and not eq:
                    kw["ipv6"] = True
                elif key == "pmp" and not eq:
                    kw["port_mapping"] = True
                elif key == "timeout" and eq:
                    kw["mapping_timeout"] = float(val)
                elif key == "filtering" and eq:
                    kw["filtering"] = val
                elif key == "lan" and eq:
                    kw["lan_subnet"] = val
                elif key == "public" and eq:
                    kw["public_ipv4"] = val
                else:
                    raise TopologyError(f"unknown site option {opt!r} in {item!r}")
            sites.append(SiteSpec(**kw))
        return cls(sites=tuple(sites))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Topology:
        def site(d: Mapping[str, Any]) -> SiteSpec:
            d = dict(d)
            if isinstance(d.get("hosts"), list):
                d["hosts"] = tuple(d["hosts"])
            return SiteSpec(**d)

        def server(d: Mapping[str, Any]) -> ServerSpec:
            d = dict(d)
            for k in ("ipv4", "ipv6"):
                if k in d:
                    d[k] = tuple(d[k])
            return ServerSpec(**d)

        kw: dict[str, Any] = {"sites": tuple(site(s) for s in data.get("sites", ()))}
        if "servers" in data:
            kw["servers"] = tuple(server(s) for s in data["servers"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_DOC_V4: Final = tuple(
    ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)
_DOC_V6: Final = ipaddress.IPv6Network("2001:db8::/32")


def _is_doc_v4(addr: str) -> bool:
    a = ipaddress.IPv4Address(addr)
    return any(a in n for n in _DOC_V4)


def is_documentation_address(addr: str) -> bool:
    """True for addresses in 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 and 2001:db8::/32."""
    a = ipaddress.ip_address(addr)
    if isinstance(a, ipaddress.IPv4Address):
        return any(a in n for n in _DOC_V4)
    return a in _DOC_V6


def host_list(names: Sequence[str]) -> str:
    return ", ".join(names)
