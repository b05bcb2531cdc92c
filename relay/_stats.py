"""The relay's counters: plain integers on the hot path, read by the metrics exporter.

Names follow derper's expvar names (spec §5, §7) so the Prometheus mapping is one table.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final

__all__ = ["ADMISSION_RESULTS", "DROP_REASONS", "PACKET_KINDS", "TLS_VERSIONS", "RelayStats"]

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
# TLS versions counted from the start (others appear when negotiated; "unknown" if not reported).
TLS_VERSIONS: Final = ("1.2", "1.3")
# Results of client admission (-verify-client-url), counted from the start: "allowed" (HTTP 200 with
# {"Allow":true}), "denied" (any other answer), "fail_open" (unreachable, admitted because of
# -verify-client-url-fail-open), "fail_closed" (unreachable, rejected). Mesh peers are not counted.
ADMISSION_RESULTS: Final = ("allowed", "denied", "fail_open", "fail_closed")


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
    # Regional mesh: relays of the region connected to, and the forwarder table's churn.
    mesh_peers_up: int = 0
    multiforwarder_created: int = 0
    multiforwarder_deleted: int = 0
    packet_forwarder_delete_other_value: int = 0
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
    # Accepted TLS connections by negotiated version (derper's derper_tls_request_version).
    tls_versions: Counter[str] = field(default_factory=Counter)
    # Client admission (relay/_admission.py); rejections of any check are in rejected_clients.
    admission: Counter[str] = field(default_factory=Counter)  # by result, see ADMISSION_RESULTS
    # Per-client rate limits (-rate-config, relay/_ratelimit.py): the limits in force (0 = off)...
    rate_limit_bytes_per_second: float = 0.0
    rate_limit_burst_bytes: float = 0.0
    rate_limit_waits: int = 0  # ...socket reads (<= 64 KiB each) that had to wait for the bucket
    rate_limit_wait_seconds: float = 0.0  # total time spent in those waits
    # The TLS listener's accept limiter (-accept-connection-limit/-burst), as derper's tls_listener.
    tls_listener_accepted: int = 0
    tls_listener_rejected: int = 0

    def __post_init__(self) -> None:
        for r in DROP_REASONS:
            for k in PACKET_KINDS:
                self.packets_dropped[(r, k)] += 0
                self.bytes_dropped[(r, k)] += 0
        for v in TLS_VERSIONS:
            self.tls_versions[v] += 0
        for a in ADMISSION_RESULTS:
            self.admission[a] += 0

    def drop(self, reason: str, disco: bool, packets: int, nbytes: int) -> None:
        key = (reason, "disco" if disco else "other")
        self.packets_dropped[key] += packets
        self.bytes_dropped[key] += nbytes

    def note_queue_delay(self, seconds: float) -> None:
        # Exponential moving average with alpha 0.1, like derper.
        self.average_queue_duration_ms = 0.9 * self.average_queue_duration_ms + 0.1 * seconds * 1000.0
