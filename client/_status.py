"""The path table: what ``meshnode status`` shows, kept sans-io (times are passed in).

The daemon feeds a :class:`PeerTable` with what it learns: disco pongs and lost pings (its own
keepalive pings and ``meshnode ping``), the engine's counters read through UAPI, and natlib's path
for each peer. :meth:`PeerTable.snapshot` turns that into the JSON document of ``status --json``;
:func:`format_status_table` and :func:`format_ping_event` render the text forms.

A peer is *online* while it answered a disco ping within :data:`OFFLINE_AFTER` seconds. WireGuard's
handshake time cannot tell: it is renewed only every two minutes, and only while there is traffic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from natlib.keys import NodePublicKey

from ._meshconn import PathView, PingView
from .meshfile import MeshNode
from .uapi import DeviceStats

__all__ = [
    "OFFLINE_AFTER",
    "PeerTable",
    "format_ping_event",
    "format_status_table",
    "path_json",
]

#: No pong for this long (seconds) and a peer shows offline. The daemon pings every peer every
#: couple of seconds, so this is several lost pings, not one.
OFFLINE_AFTER: Final = 10.0


@dataclass(slots=True)
class _PeerState:
    node: MeshNode
    last_pong: float | None = None  # monotonic
    last_pong_kind: str | None = None
    last_rtt: float | None = None
    lost_pings: int = 0
    last_handshake: float | None = None  # Unix time
    rx_bytes: int = 0
    tx_bytes: int = 0


def _address_text(address: Any) -> str | None:
    if address is None:
        return None
    if isinstance(address, tuple) and len(address) == 2:
        host, port = address
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def path_json(path: PathView | None) -> dict[str, Any]:
    """natlib's path for one peer as JSON fields (``kind`` "none" when natlib has no path)."""
    if path is None:
        return {"path": "none", "address": None, "region": None, "path_rtt_ms": None}
    rtt = path.rtt
    return {
        "path": path.kind,
        "address": _address_text(path.address),
        "region": path.region,
        "path_rtt_ms": None if rtt is None else round(rtt * 1000, 3),
    }


class PeerTable:
    """Every peer of this node, with what the daemon last learned about it."""

    def __init__(self, peers: Sequence[MeshNode], *, offline_after: float = OFFLINE_AFTER) -> None:
        self._peers = {p.node_key: _PeerState(p) for p in peers}
        self.offline_after = offline_after

    @property
    def nodes(self) -> tuple[MeshNode, ...]:
        return tuple(p.node for p in self._peers.values())

    def find(self, text: str) -> MeshNode:
        """The peer named ``text``, or with that overlay address or node key; KeyError if none."""
        for state in self._peers.values():
            node = state.node
            if text in (node.name, node.node_key.text(), node.node_key.hex()) or text in {
                str(a) for a in node.overlay_addresses
            }:
                return node
        raise KeyError(text)

    def pong(self, peer: NodePublicKey, result: PingView, now: float) -> None:
        state = self._peers[peer]
        state.last_pong, state.last_pong_kind, state.last_rtt = now, result.kind, result.rtt
        state.lost_pings = 0

    def ping_lost(self, peer: NodePublicKey) -> None:
        self._peers[peer].lost_pings += 1

    def answered_last_ping(self, peer: NodePublicKey) -> bool:
        """True if the latest ping of ``peer`` was answered (no loss since its last pong)."""
        state = self._peers[peer]
        return state.last_pong is not None and state.lost_pings == 0

    def engine_stats(self, stats: DeviceStats) -> None:
        for peer in stats.peers:
            state = self._peers.get(peer.public_key)
            if state is not None:
                state.last_handshake = peer.last_handshake
                state.rx_bytes, state.tx_bytes = peer.rx_bytes, peer.tx_bytes

    def online(self, peer: NodePublicKey, now: float) -> bool:
        last = self._peers[peer].last_pong
        return last is not None and now - last <= self.offline_after

    def snapshot(
        self, paths: Mapping[NodePublicKey, PathView | None], now: float, wall_now: float
    ) -> list[dict[str, Any]]:
        """One JSON object per peer, in mesh file order. ``now`` is monotonic, ``wall_now`` Unix."""
        rows = []
        for key, state in self._peers.items():
            node = state.node
            online = self.online(key, now)
            row: dict[str, Any] = {
                "name": node.name,
                "node_key": key.text(),
                "overlay": [str(a) for a in node.overlay_addresses],
                "online": online,
                **path_json(paths.get(key)),
                "rtt_ms": None if state.last_rtt is None else round(state.last_rtt * 1000, 3),
                "last_pong_age_s": None if state.last_pong is None else round(now - state.last_pong, 3),
                "lost_pings": state.lost_pings,
                "last_handshake": state.last_handshake,
                "handshake_age_s": (
                    None
                    if state.last_handshake is None
                    else round(max(0.0, wall_now - state.last_handshake), 3)
                ),
                "rx_bytes": state.rx_bytes,
                "tx_bytes": state.tx_bytes,
            }
            if not online:
                # natlib may still hold a path it has not given up on yet; the peer is not answering.
                row["path"] = "offline" if state.last_pong is not None else row["path"]
            rows.append(row)
        return rows


# --- text forms ------------------------------------------------------------------------------------

STATUS_COLUMNS: Final = ("PEER", "OVERLAY IP", "PATH", "RTT", "HANDSHAKE", "RX", "TX")


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{math.floor(seconds)}s ago"
    if seconds < 3600:
        return f"{math.floor(seconds / 60)}m ago"
    return f"{math.floor(seconds / 3600)}h ago"


def _path_text(row: Mapping[str, Any]) -> str:
    kind = row["path"]
    if not row["online"]:
        return "offline"
    if kind in ("direct", "both") and row["address"]:
        return f"direct {row['address']}"
    if kind == "relay":
        return f"relay region {row['region']}" if row["region"] is not None else "relay"
    return str(kind)


def format_status_table(status: Mapping[str, Any]) -> str:
    """``meshnode status``: a header line, then one row per peer in aligned columns."""
    me = status["node"]
    lines = [
        f"mesh {status['mesh']}: {me['name']} {', '.join(me['overlay'])} on {me['ifname']} "
        f"(engine port {me['engine_port']})"
    ]
    rows = [STATUS_COLUMNS]
    for peer in status["peers"]:
        rtt = peer["rtt_ms"] if peer["online"] else None
        rows.append(
            (
                peer["name"],
                peer["overlay"][0],
                _path_text(peer),
                "-" if rtt is None else f"{rtt:.1f} ms",
                _age(peer["handshake_age_s"]),
                _bytes(peer["rx_bytes"]),
                _bytes(peer["tx_bytes"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(STATUS_COLUMNS))]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


def format_ping_event(event: Mapping[str, Any]) -> str:
    """One ``meshnode ping`` line, like ``tailscale ping``'s::

    pong from beta (100.64.0.2) via 198.51.100.7:41641 in 12.3 ms
    pong from gamma (100.64.0.3) via relay region 900 in 41.0 ms
    timeout waiting for pong from gamma (100.64.0.3)
    """
    who = f"{event['peer']} ({event['overlay']})"
    if event.get("timeout"):
        return f"timeout waiting for pong from {who}"
    if event["kind"] == "direct":
        via = event["address"]
    else:
        via = f"relay region {event['region']}" if event.get("region") is not None else "relay"
    return f"pong from {who} via {via} in {event['rtt_ms']:.1f} ms"
