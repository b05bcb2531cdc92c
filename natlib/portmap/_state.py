"""Sans-io bookkeeping of the port mapper: which services are present, protocol order, epochs,
renewal times. Pure functions and small classes; times are floats in the caller's clock."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

__all__ = [
    "ABSENT_TTL",
    "DEFAULT_LIFETIME",
    "PRESENT_TTL",
    "UPNP_RENEW_AFTER",
    "Mapping",
    "Protocol",
    "ServiceCache",
    "epoch_says_reboot",
    "protocol_order",
]

Protocol: TypeAlias = Literal["natpmp", "pcp", "upnp"]
PROTOCOLS: Final[tuple[Protocol, ...]] = ("natpmp", "pcp", "upnp")

DEFAULT_LIFETIME: Final = 7200
"""Seconds requested for every mapping (RFC 6886's recommendation; Tailscale's value)."""
UPNP_RENEW_AFTER: Final = 3600.0
"""UPnP mappings are renewed after an hour whatever lease the router granted (0 = permanent)."""
PRESENT_TTL: Final = 600.0
"""A service seen answering is trusted for 10 minutes without probing again."""
ABSENT_TTL: Final = 5.0
"""A service that did not answer a probe is skipped for this long (then tried again)."""
EPOCH_SLACK: Final = 2.0
"""RFC 6886 §3.6: tolerated clock skew, in seconds, between the router's epoch and our clock."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """A port mapping held on a router.

    ``external`` is the public (ip, port) that forwards to ``internal_port`` on this host;
    ``lifetime`` is the granted lifetime in seconds (0 for a permanent UPnP lease); times are in
    the driver's clock (:func:`anyio.current_time`).
    """

    protocol: Protocol
    external: tuple[str, int]
    internal_port: int
    lifetime: float
    obtained_at: float
    renew_at: float
    """When to renew: half the lifetime after ``obtained_at`` (an hour for UPnP)."""
    epoch: int | None = None
    """The router's NAT-PMP/PCP epoch in its answer (None for UPnP)."""

    @property
    def expires_at(self) -> float | None:
        """When the router drops the mapping unless renewed; None for a permanent UPnP lease."""
        return None if self.lifetime == 0 else self.obtained_at + self.lifetime


def renew_time(protocol: Protocol, obtained_at: float, lifetime: float) -> float:
    """Half the lifetime for NAT-PMP and PCP; :data:`UPNP_RENEW_AFTER` for UPnP."""
    if protocol == "upnp":
        return obtained_at + UPNP_RENEW_AFTER
    return obtained_at + lifetime / 2


def epoch_says_reboot(previous_epoch: int, previous_time: float, epoch: int, now: float) -> bool:
    """True if the router rebooted (lost its mappings) between two answers.

    RFC 6886 §3.6 (PCP §8.5 likewise): the epoch must not go backwards, and must have advanced by at
    least 7/8 of our elapsed time, less :data:`EPOCH_SLACK`.
    """
    if epoch < previous_epoch:
        return True
    elapsed = max(0.0, now - previous_time)
    return epoch < previous_epoch + elapsed * 7 / 8 - EPOCH_SLACK


class ServiceCache:
    """What the last probes and mapping attempts said about each protocol, with expiry."""

    def __init__(self, *, present_ttl: float = PRESENT_TTL, absent_ttl: float = ABSENT_TTL) -> None:
        self._present_ttl = present_ttl
        self._absent_ttl = absent_ttl
        self._seen: dict[Protocol, tuple[bool, float]] = {}

    def record(self, protocol: Protocol, present: bool, now: float) -> None:
        self._seen[protocol] = (present, now)

    def forget(self) -> None:
        """Drop everything (the gateway changed or rebooted)."""
        self._seen.clear()

    def state(self, protocol: Protocol, now: float) -> bool | None:
        """True if seen present within the TTL, False if seen absent within the (short) TTL, else None."""
        entry = self._seen.get(protocol)
        if entry is None:
            return None
        present, at = entry
        ttl = self._present_ttl if present else self._absent_ttl
        return present if now - at < ttl else None


def protocol_order(allowed: tuple[Protocol, ...], cache: ServiceCache, now: float) -> list[Protocol]:
    """The protocols to try, in order: NAT-PMP, PCP, UPnP (§3.2), minus those known absent;
    PCP goes before NAT-PMP when only PCP is known present."""
    order = [p for p in PROTOCOLS if p in allowed and cache.state(p, now) is not False]
    if cache.state("pcp", now) and not cache.state("natpmp", now) and "natpmp" in order and "pcp" in order:
        order.remove("pcp")
        order.insert(0, "pcp")
    return order
