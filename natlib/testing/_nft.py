"""The nftables rulesets of the lab's routers (rendered as ``nft -f`` input; see docs/netlab.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ._spec import FilteringType, NatKind

__all__ = ["DEFAULT_FILTER_TIMEOUT", "MINIUPNPD_TABLE", "TABLE", "RouterRules", "miniupnpd_skeleton"]

TABLE: Final = "natlab"
MINIUPNPD_TABLE: Final = "miniupnpd"
WAN: Final = "wan"
LAN: Final = "lan"
#: Lifetime (s) of the filtering state (the ``eim`` map and ``seen`` set) when no mapping timeout is set:
#: Linux's own ``nf_conntrack_udp_timeout_stream``.
DEFAULT_FILTER_TIMEOUT: Final = 120


@dataclass(frozen=True)
class RouterRules:
    """Everything the router's ruleset depends on."""

    kind: NatKind
    filtering: FilteringType | None
    wan_ipv4: str | None
    lan_subnet: str | None
    one2one_host: str | None
    hairpin: bool
    mapping_timeout: float | None

    def render(self) -> str:
        """The whole ``table inet natlab`` (deleting any previous one first), as ``nft -f`` input."""
        k = self.kind
        t = max(1, round(self.mapping_timeout)) if self.mapping_timeout else DEFAULT_FILTER_TIMEOUT
        pre: list[str] = []
        post: list[str] = []
        record: list[str] = []
        fwd: list[str] = []
        inp: list[str] = []
        wan4 = self.wan_ipv4
        if k.udp_blocked:
            fwd.append("meta l4proto udp drop")
        fwd += ["ct state established,related accept", "ct status dnat accept", f'iifname "{LAN}" accept']
        inp += ["ct state established,related accept"]
        if k.nat == "one2one":
            fwd.append(f'iifname "{WAN}" meta nfproto ipv6 accept')
        if k.nat in ("masquerade", "masquerade_random", "one2one") and wan4 is not None:
            # Unsolicited packets to the router itself are dropped before conntrack confirms them:
            # no stray conntrack entry can later steal a port from a LAN host's mapping.
            inp.append(f'iifname "{WAN}" meta l4proto {{ udp, tcp }} drop')
            inp.append(f'iifname "{LAN}" ip daddr {wan4} meta l4proto udp drop')
            if k.nat == "one2one":
                assert self.one2one_host is not None
                pre.append(f'iifname "{WAN}" ip daddr {wan4} dnat ip to {self.one2one_host}')
                post.append(f'oifname "{WAN}" ip saddr {self.one2one_host} snat ip to {wan4}')
                post.append(f'oifname "{WAN}" meta nfproto ipv4 masquerade')
            else:
                rnd = " random" if k.nat == "masquerade_random" else ""
                if self.filtering == "endpoint_independent":
                    pre.append(
                        f'iifname "{WAN}" ip daddr {wan4} udp dport @eim dnat ip to udp dport map @eim'
                    )
                elif self.filtering == "address_dependent":
                    pre.append(
                        f'iifname "{WAN}" ip daddr {wan4} udp dport . ip saddr @seen '
                        "dnat ip to udp dport map @eim"
                    )
                if self.hairpin:
                    pre.append(
                        f'iifname "{LAN}" ip daddr {wan4} udp dport @eim dnat ip to udp dport map @eim'
                    )
                    post.append(f'iifname "{LAN}" oifname "{LAN}" ct status dnat snat ip to {wan4}')
                post.append(f'oifname "{WAN}" meta nfproto ipv4 masquerade{rnd}')
                record.append(
                    f'oifname "{WAN}" meta nfproto ipv4 ct direction original '
                    "update @eim { udp sport : ct original ip saddr . ct original proto-src } "
                    "update @seen { udp sport . ip daddr }"
                )
        lines = [
            f"table inet {TABLE}",
            f"delete table inet {TABLE}",
            f"table inet {TABLE} {{",
            "  map eim { type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; "
            f"timeout {t}s; }}",
            f"  set seen {{ type inet_service . ipv4_addr; flags dynamic,timeout; timeout {t}s; }}",
        ]

        def chain(name: str, hook: str, rules: list[str], policy: str = "accept") -> None:
            lines.append(f"  chain {name} {{")
            lines.append(f"    {hook}; policy {policy};")
            lines.extend(f"    {r}" for r in rules)
            lines.append("  }")

        chain("nat_pre", "type nat hook prerouting priority dstnat", pre)
        chain("nat_post", "type nat hook postrouting priority srcnat", post)
        chain("record", "type filter hook postrouting priority 200", record)
        chain("forward", "type filter hook forward priority filter", fwd, "drop")
        chain("input", "type filter hook input priority filter", inp)
        lines.append("}")
        return "\n".join(lines) + "\n"


def miniupnpd_skeleton() -> str:
    """The table and chains miniupnpd fills in (its own table, ahead of the lab's chains)."""
    return f"""table inet {MINIUPNPD_TABLE} {{
  chain forward {{
    type filter hook forward priority -10; policy accept;
    jump miniupnpd
  }}
  chain miniupnpd {{
  }}
  chain prerouting {{
    type nat hook prerouting priority -110; policy accept;
    jump prerouting_miniupnpd
  }}
  chain postrouting {{
    type nat hook postrouting priority 90; policy accept;
    jump postrouting_miniupnpd
  }}
  chain prerouting_miniupnpd {{
  }}
  chain postrouting_miniupnpd {{
  }}
}}
"""
