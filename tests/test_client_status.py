"""client._status: the path table (online/offline from pongs, engine counters, paths) and its text forms."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import pytest

from client._status import OFFLINE_AFTER, PeerTable, format_ping_event, format_status_table, path_json
from client.meshfile import MeshNode
from client.uapi import DeviceStats, PeerStats
from natlib.conn import PathInfo, PingResult
from natlib.keys import DiscoPrivateKey, NodePrivateKey


def mesh_node(name: str, i: int) -> MeshNode:
    return MeshNode(
        name,
        NodePrivateKey.generate().public,
        DiscoPrivateKey.generate().public,
        ipaddress.IPv4Address(f"100.64.0.{i}"),
        ipaddress.IPv6Address(f"fd7a:115c:a1e0::{i}"),
    )


BETA, GAMMA = mesh_node("beta", 2), mesh_node("gamma", 3)
DIRECT = PathInfo("direct", ("198.51.100.7", 41641), 0.0123, 5.0, None)
RELAY = PathInfo("relay", None, None, 1.0, 900)


def test_path_json() -> None:
    assert path_json(DIRECT) == {
        "path": "direct",
        "address": "198.51.100.7:41641",
        "region": None,
        "path_rtt_ms": 12.3,
    }
    assert (
        path_json(PathInfo("both", ("2001:db8::7", 41641), None, 0.0, 900))["address"]
        == "[2001:db8::7]:41641"
    )
    assert path_json(None) == {"path": "none", "address": None, "region": None, "path_rtt_ms": None}


def test_online_follows_pongs_with_the_offline_threshold() -> None:
    table = PeerTable([BETA, GAMMA])
    assert not table.online(BETA.node_key, now=100.0)  # never answered
    table.pong(BETA.node_key, PingResult("direct", ("198.51.100.7", 41641), 0.002), now=100.0)
    assert table.answered_last_ping(BETA.node_key)
    assert table.online(BETA.node_key, now=100.0 + OFFLINE_AFTER)
    assert not table.online(BETA.node_key, now=100.0 + OFFLINE_AFTER + 0.001)
    table.ping_lost(BETA.node_key)
    assert not table.answered_last_ping(BETA.node_key)
    table.pong(BETA.node_key, PingResult("relay", None, 0.04), now=120.0)
    assert table.online(BETA.node_key, now=121.0)
    assert table.answered_last_ping(BETA.node_key)


def test_snapshot_rows() -> None:
    table = PeerTable([BETA, GAMMA])
    table.pong(BETA.node_key, PingResult("direct", ("198.51.100.7", 41641), 0.0021), now=50.0)
    table.pong(GAMMA.node_key, PingResult("relay", None, 0.040), now=10.0)
    table.ping_lost(GAMMA.node_key)
    table.engine_stats(
        DeviceStats(
            listen_port=5555,
            peers=(
                PeerStats(BETA.node_key, last_handshake_time_sec=1_000, rx_bytes=1500, tx_bytes=3 << 20),
                PeerStats(NodePrivateKey.generate().public, rx_bytes=99),  # not in the mesh: ignored
            ),
        )
    )
    beta, gamma = table.snapshot({BETA.node_key: DIRECT, GAMMA.node_key: RELAY}, now=52.0, wall_now=1_030.0)
    assert beta == {
        "name": "beta",
        "node_key": BETA.node_key.text(),
        "overlay": ["100.64.0.2", "fd7a:115c:a1e0::2"],
        "online": True,
        "path": "direct",
        "address": "198.51.100.7:41641",
        "region": None,
        "path_rtt_ms": 12.3,
        "rtt_ms": 2.1,
        "last_pong_age_s": 2.0,
        "lost_pings": 0,
        "last_handshake": 1000.0,
        "handshake_age_s": 30.0,
        "rx_bytes": 1500,
        "tx_bytes": 3 << 20,
    }
    # gamma answered once, 42 s ago: offline, whatever path natlib still holds for it.
    assert (gamma["online"], gamma["path"], gamma["region"], gamma["lost_pings"]) == (
        False,
        "offline",
        900,
        1,
    )
    assert (gamma["last_handshake"], gamma["handshake_age_s"], gamma["rx_bytes"]) == (None, None, 0)


def test_find_by_name_address_or_key() -> None:
    table = PeerTable([BETA, GAMMA])
    for text in ("gamma", "100.64.0.3", "fd7a:115c:a1e0::3", GAMMA.node_key.text(), GAMMA.node_key.hex()):
        assert table.find(text) is GAMMA
    with pytest.raises(KeyError):
        table.find("delta")


@dataclass
class Row:
    name: str
    online: bool
    path: str
    address: str | None
    region: int | None
    rtt_ms: float | None
    age: float | None
    rx: int
    tx: int

    def json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "overlay": [f"100.64.0.{len(self.name)}"],
            "online": self.online,
            "path": self.path,
            "address": self.address,
            "region": self.region,
            "rtt_ms": self.rtt_ms,
            "handshake_age_s": self.age,
            "rx_bytes": self.rx,
            "tx_bytes": self.tx,
        }


def test_status_table_exact_text() -> None:
    status = {
        "mesh": "lab",
        "node": {
            "name": "alpha",
            "overlay": ["100.64.0.1", "fd7a:115c:a1e0::1"],
            "ifname": "mn-lab",
            "engine_port": 5,
        },
        "peers": [
            Row("beta", True, "direct", "198.51.100.7:41641", None, 2.14, 5.2, 1500, 3 << 20).json(),
            Row("gamma", True, "relay", None, 900, 40.0, 125.0, 0, 1023).json(),
            Row("delta", False, "offline", None, 900, 3.0, None, 5 << 30, 2048).json(),
        ],
    }
    assert format_status_table(status) == (
        "mesh lab: alpha 100.64.0.1, fd7a:115c:a1e0::1 on mn-lab (engine port 5)\n"
        "PEER   OVERLAY IP  PATH                       RTT      HANDSHAKE  RX       TX\n"
        "beta   100.64.0.4  direct 198.51.100.7:41641  2.1 ms   5s ago     1.5 KiB  3.0 MiB\n"
        "gamma  100.64.0.5  relay region 900           40.0 ms  2m ago     0 B      1023 B\n"
        "delta  100.64.0.5  offline                    -        never      5.0 GiB  2.0 KiB\n"
    )


def test_ping_lines() -> None:
    base = {"peer": "beta", "overlay": "100.64.0.2", "seq": 0}
    assert (
        format_ping_event(
            {**base, "kind": "direct", "address": "198.51.100.7:41641", "region": None, "rtt_ms": 12.34}
        )
        == "pong from beta (100.64.0.2) via 198.51.100.7:41641 in 12.3 ms"
    )
    assert (
        format_ping_event({**base, "kind": "relay", "address": None, "region": 900, "rtt_ms": 41.0})
        == "pong from beta (100.64.0.2) via relay region 900 in 41.0 ms"
    )
    assert format_ping_event({**base, "timeout": True}) == "timeout waiting for pong from beta (100.64.0.2)"
