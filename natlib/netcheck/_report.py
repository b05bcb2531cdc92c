"""The netcheck report (nat-traversal §2.1), the sans-io builder that fills it, and its renderings."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

from ..derpmap import DERPMap
from ..stunclient import Endpoint, StunResult

__all__ = ["Family", "LatencySource", "Report", "ReportBuilder"]

Family: TypeAlias = Literal[4, 6]
LatencySource: TypeAlias = Literal["stun", "https"]


def _format_endpoint(endpoint: Endpoint | None) -> str | None:
    if endpoint is None:
        return None
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Report:
    """What one netcheck run found. Latencies are in seconds; tri-states use None for "not checked".

    ``preferred_derp`` is 0 when no home region could be chosen (Tailscale's convention).
    """

    udp: bool = False
    """Any STUN round trip succeeded."""
    ipv4: bool = False
    """An IPv4 STUN round trip succeeded."""
    ipv6: bool = False
    """An IPv6 STUN round trip succeeded."""
    ipv4_can_send: bool = False
    """At least one IPv4 STUN request could be sent."""
    ipv6_can_send: bool = False
    """At least one IPv6 STUN request could be sent."""
    os_has_ipv6: bool = False
    """A UDP socket could be bound to ``::1``."""
    mapping_varies_by_dest_ip: bool | None = None
    """Two IPv4 STUN servers at different addresses saw different ip:port (a hard NAT)."""
    upnp: bool | None = None
    pmp: bool | None = None
    pcp: bool | None = None
    captive_portal: bool | None = None
    preferred_derp: int = 0
    region_latency: Mapping[int, float] = field(default_factory=dict)
    """Best latency per region over either family (or HTTPS when UDP is blocked)."""
    region_v4_latency: Mapping[int, float] = field(default_factory=dict)
    region_v6_latency: Mapping[int, float] = field(default_factory=dict)
    latency_source: Mapping[int, LatencySource] = field(default_factory=dict)
    """How each region's latency in ``region_latency`` was measured."""
    global_v4: Endpoint | None = None
    """The first public IPv4 ip:port seen by a STUN server."""
    global_v6: Endpoint | None = None
    global_v4_counters: Mapping[Endpoint, int] = field(default_factory=dict)
    """How many STUN replies reported each IPv4 mapping."""
    global_v6_counters: Mapping[Endpoint, int] = field(default_factory=dict)
    full: bool = False
    """Whether every region was probed (else: the fastest few and the home)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: endpoints as ``ip:port`` text, region IDs as string keys, seconds."""

        def regions(m: Mapping[int, Any]) -> dict[str, Any]:
            return {str(k): m[k] for k in sorted(m)}

        def counters(m: Mapping[Endpoint, int]) -> dict[str, int]:
            return {str(_format_endpoint(k)): v for k, v in sorted(m.items())}

        return {
            "udp": self.udp,
            "ipv4": self.ipv4,
            "ipv6": self.ipv6,
            "ipv4_can_send": self.ipv4_can_send,
            "ipv6_can_send": self.ipv6_can_send,
            "os_has_ipv6": self.os_has_ipv6,
            "mapping_varies_by_dest_ip": self.mapping_varies_by_dest_ip,
            "upnp": self.upnp,
            "pmp": self.pmp,
            "pcp": self.pcp,
            "captive_portal": self.captive_portal,
            "preferred_derp": self.preferred_derp,
            "region_latency": regions(self.region_latency),
            "region_v4_latency": regions(self.region_v4_latency),
            "region_v6_latency": regions(self.region_v6_latency),
            "latency_source": regions(self.latency_source),
            "global_v4": _format_endpoint(self.global_v4),
            "global_v6": _format_endpoint(self.global_v6),
            "global_v4_counters": counters(self.global_v4_counters),
            "global_v6_counters": counters(self.global_v6_counters),
            "full": self.full,
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        """The report as JSON text (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=indent)

    def format_text(self, derp_map: DERPMap | None = None) -> str:
        """A readable multi-line summary, naming regions from ``derp_map`` when given."""

        def tri(value: bool | None) -> str:
            return "not checked" if value is None else "yes" if value else "no"

        def region_name(region_id: int) -> str:
            region = derp_map.regions.get(region_id) if derp_map is not None else None
            if region is None:
                return str(region_id)
            label = region.region_code or str(region_id)
            return f"{label} ({region.region_name})" if region.region_name else label

        v4 = f"yes, {_format_endpoint(self.global_v4)}" if self.ipv4 else "no"
        if self.ipv6:
            v6 = f"yes, {_format_endpoint(self.global_v6)}"
        else:
            v6 = "no, but the OS supports it" if self.os_has_ipv6 else "no, the OS has no IPv6"
        lines = [
            "Report:",
            f"  * UDP: {'yes' if self.udp else 'no'}",
            f"  * IPv4: {v4}",
            f"  * IPv6: {v6}",
            f"  * Mapping varies by destination IP (hard NAT): {tri(self.mapping_varies_by_dest_ip)}",
            f"  * Port mapping: UPnP {tri(self.upnp)}, NAT-PMP {tri(self.pmp)}, PCP {tri(self.pcp)}",
            f"  * Captive portal: {tri(self.captive_portal)}",
            f"  * Nearest relay: {region_name(self.preferred_derp) if self.preferred_derp else 'none'}",
            "  * Relay latency:",
        ]
        for region_id in sorted(self.region_latency, key=lambda r: (self.region_latency[r], r)):
            parts = [f"{self.region_latency[region_id] * 1000:.1f} ms"]
            if self.latency_source.get(region_id) == "https":
                parts.append("via HTTPS")
            lines.append(f"      - {region_name(region_id)}: {', '.join(parts)}")
        if not self.region_latency:
            lines.append("      (no region answered)")
        return "\n".join(lines)

    def with_home(self, preferred_derp: int) -> Report:
        """A copy with ``preferred_derp`` set."""
        return replace(self, preferred_derp=preferred_derp)


class ReportBuilder:
    """Sans-io accumulator of probe outcomes into a :class:`Report`.

    The driver feeds STUN results (tagged with the region they measured), HTTPS latencies,
    send outcomes and the port-mapping and captive-portal verdicts, then calls :meth:`report`.
    """

    def __init__(self, *, full: bool, os_has_ipv6: bool = False) -> None:
        self.full = full
        self.os_has_ipv6 = os_has_ipv6
        self.can_send: dict[Family, bool] = {4: False, 6: False}
        self.latency: dict[Family, dict[int, float]] = {4: {}, 6: {}}
        self.https_latency: dict[int, float] = {}
        self.global_addr: dict[Family, Endpoint | None] = {4: None, 6: None}
        self.counters: dict[Family, dict[Endpoint, int]] = {4: {}, 6: {}}
        self._v4_mapped_by_server_ip: dict[str, Endpoint] = {}
        self.mapping_varies_by_dest_ip: bool | None = None
        self.upnp: bool | None = None
        self.pmp: bool | None = None
        self.pcp: bool | None = None
        self.captive_portal: bool | None = None

    def note_sent(self, family: Family) -> None:
        """A STUN request of ``family`` left the socket."""
        self.can_send[family] = True

    def add_stun(self, region_id: int, result: StunResult) -> bool:
        """Record one STUN transaction's outcome; return True if it was a success."""
        if result.mapped is None or result.rtt is None:
            return False
        family: Family = 6 if ipaddress.ip_address(result.server[0]).version == 6 else 4
        self.can_send[family] = True
        region = self.latency[family]
        region[region_id] = min(result.rtt, region.get(region_id, result.rtt))
        if self.global_addr[family] is None:
            self.global_addr[family] = result.mapped
        self.counters[family][result.mapped] = self.counters[family].get(result.mapped, 0) + 1
        if family == 4:
            server_ip = result.server[0]
            self._v4_mapped_by_server_ip.setdefault(server_ip, result.mapped)
            seen = set(self._v4_mapped_by_server_ip.values())
            if len(self._v4_mapped_by_server_ip) >= 2:
                self.mapping_varies_by_dest_ip = len(seen) > 1
        return True

    def add_https_latency(self, region_id: int, latency: float) -> None:
        self.https_latency[region_id] = min(latency, self.https_latency.get(region_id, latency))

    def regions_with_latency(self) -> set[int]:
        return set(self.latency[4]) | set(self.latency[6]) | set(self.https_latency)

    def max_latency(self) -> float:
        values = [*self.latency[4].values(), *self.latency[6].values(), *self.https_latency.values()]
        return max(values, default=0.0)

    @property
    def udp(self) -> bool:
        return bool(self.latency[4] or self.latency[6])

    def report(self, preferred_derp: int = 0) -> Report:
        combined: dict[int, float] = {}
        source: dict[int, LatencySource] = {}
        for region_id, latency in self.https_latency.items():
            combined[region_id] = latency
            source[region_id] = "https"
        for family in (4, 6):
            fam: Family = 4 if family == 4 else 6
            for region_id, latency in self.latency[fam].items():
                if region_id not in combined or source[region_id] == "https" or latency < combined[region_id]:
                    combined[region_id] = latency
                    source[region_id] = "stun"
        return Report(
            udp=self.udp,
            ipv4=bool(self.latency[4]),
            ipv6=bool(self.latency[6]),
            ipv4_can_send=self.can_send[4],
            ipv6_can_send=self.can_send[6],
            os_has_ipv6=self.os_has_ipv6,
            mapping_varies_by_dest_ip=self.mapping_varies_by_dest_ip,
            upnp=self.upnp,
            pmp=self.pmp,
            pcp=self.pcp,
            captive_portal=self.captive_portal,
            preferred_derp=preferred_derp,
            region_latency=combined,
            region_v4_latency=dict(self.latency[4]),
            region_v6_latency=dict(self.latency[6]),
            latency_source=source,
            global_v4=self.global_addr[4],
            global_v6=self.global_addr[6],
            global_v4_counters=dict(self.counters[4]),
            global_v6_counters=dict(self.counters[6]),
            full=self.full,
        )
