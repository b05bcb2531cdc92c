"""The relay's counters: plain integers on the hot path, read by the metrics exporter.

Names follow derper's expvar names (spec §5, §7) so the Prometheus mapping is one table.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final

__all__ = ["DROP_REASONS", "PACKET_KINDS", "RelayStats"]

DROP_REASONS: Final = (
    "unknown_dest",
    "unknown_dest_on_fwd",
    "gone_disconnected",
    "queue_head",
    "queue_tail",
    "write_error",
    "dup_client",
)
PACKET_KINDS: Final = ("disco", "other")


@dataclass(slots=True)
class RelayStats:
    accepts: int = 0
    current_connections: int = 0
    current_home_connections: int = 0
    current_dup_client_keys: int = 0
    current_dup_client_conns: int = 0
    total_dup_client_conns: int = 0
    watchers: int = 0
    websocket_accepts: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    packets_received: int = 0
    packets_received_disco: int = 0
    packets_sent: int = 0
    unknown_frames: int = 0
    home_moves_in: int = 0
    home_moves_out: int = 0
    got_ping: int = 0
    sent_pong: int = 0
    peer_gone_disconnected_frames: int = 0
    peer_gone_not_here_frames: int = 0
    packets_forwarded_out: int = 0
    packets_forwarded_in: int = 0
    sclient_write_timeouts: int = 0
    average_queue_duration_ms: float = 0.0
    # (reason, kind) -> count; every combination exists from the start, as derper does.
    packets_dropped: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes_dropped: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Connections closed for breaking the protocol or a limit, by reason (ours, not derper's).
    protocol_errors: Counter[str] = field(default_factory=Counter)
    # HTTP requests by route and status.
    http_requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    tls_handshake_errors: int = 0
    handshake_timeouts: int = 0
    rejected_clients: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        for r in DROP_REASONS:
            for k in PACKET_KINDS:
                self.packets_dropped[(r, k)] += 0
                self.bytes_dropped[(r, k)] += 0

    def drop(self, reason: str, disco: bool, packets: int, nbytes: int) -> None:
        key = (reason, "disco" if disco else "other")
        self.packets_dropped[key] += packets
        self.bytes_dropped[key] += nbytes

    def note_queue_delay(self, seconds: float) -> None:
        # Exponential moving average with alpha 0.1, like derper.
        self.average_queue_duration_ms = 0.9 * self.average_queue_duration_ms + 0.1 * seconds * 1000.0
