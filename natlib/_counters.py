"""Counters of the disco and path machinery, kept as plain integers.

The sans-io machines increment them; drivers read them (``as_dict()``) for the client's status
output and, later, for Prometheus. Counters only ever grow, so a scraper can export them as
Prometheus counters directly. Nothing here is thread-safe or needs to be: one task drives one
machine.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

__all__ = ["DiscoCounters", "PathCounters"]


@dataclass(slots=True)
class PathCounters:
    """Per-peer counters of :class:`natlib.path.PeerPath`."""

    pings_sent: int = 0
    """Disco pings asked for (discovery, heartbeat, confirmation and ping-back)."""
    pings_lost: int = 0
    """Pings with no pong within the ping timeout (5 s)."""
    pings_overdue: int = 0
    """Pings to a path carrying data whose pong was later than the failover timeout."""
    pongs_received: int = 0
    """Pongs that matched a ping we sent, from the address we sent it to."""
    pongs_ignored: int = 0
    """Pongs with an unknown or expired TxID, from the wrong address, or over the relay."""
    pings_received: int = 0
    pings_duplicate: int = 0
    pongs_sent: int = 0
    call_me_maybe_sent: int = 0
    call_me_maybe_received: int = 0
    path_switches: int = 0
    """Changes of the reported path (kind or address)."""
    failovers: int = 0
    """Times a trusted direct path was given up because a ping went unanswered."""
    candidates_rejected: int = 0
    """Candidates refused: unusable addresses, or the per-peer cap was reached."""
    datagrams_direct: int = 0
    datagrams_relay: int = 0
    bytes_direct: int = 0
    bytes_relay: int = 0
    datagrams_replayed: int = 0
    """Datagrams sent directly but never confirmed, re-sent over the relay at a failover."""
    bytes_replayed: int = 0
    bytes_received_direct: int = 0
    bytes_received_relay: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class DiscoCounters:
    """Counters for disco packets a driver opens: how many, and why some were dropped."""

    opened: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    """Drop counts by :attr:`natlib.disco.DiscoError.reason` (plus the driver's own labels)."""

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def as_dict(self) -> dict[str, int]:
        return {"opened": self.opened, **{f"dropped_{k}": v for k, v in sorted(self.dropped.items())}}
