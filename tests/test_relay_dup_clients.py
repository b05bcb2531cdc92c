"""Several connections with one node key: last writer is active (spec §5, derper's ServerDupClients)."""

from __future__ import annotations

from derppeer import Peer, RelayHandle
from test_relay_conformance import _until

from natlib.derp import PeerGone, PeerGoneReason, RecvPacket
from natlib.keys import NodePrivateKey


async def test_newest_connection_is_active_then_activity_takes_over(relay_http: RelayHandle) -> None:
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    key = NodePrivateKey.generate()
    sender = await Peer.connect(relay_http)
    first = await Peer.connect(relay_http, key=key)
    second = await Peer.connect(relay_http, key=key)
    assert (stats.current_dup_client_keys, stats.current_dup_client_conns, stats.total_dup_client_conns) == (
        1,
        2,
        1,
    )

    await sender.send(key.public, b"to newest")
    assert await second.recv() == RecvPacket(sender.key.raw, b"to newest")
    assert await first.barrier() == []

    # Any frame read on the older duplicate makes it the active one again.
    await first.barrier()
    await sender.send(key.public, b"to first")
    assert await first.recv() == RecvPacket(sender.key.raw, b"to first")
    assert await second.barrier() == []


async def test_closing_one_duplicate_sends_no_peer_gone(relay_http: RelayHandle) -> None:
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    key = NodePrivateKey.generate()
    sender = await Peer.connect(relay_http)
    first = await Peer.connect(relay_http, key=key)
    second = await Peer.connect(relay_http, key=key)
    await second.send(sender.key, b"hi")  # sender now hears PeerGone when `key` leaves
    assert await sender.recv() == RecvPacket(key.public.raw, b"hi")
    await second.aclose()
    await _until(lambda: stats.current_connections == 2)
    assert await sender.barrier() == []
    assert (stats.current_dup_client_keys, stats.current_dup_client_conns) == (0, 0)
    # The one left is normal again: it receives.
    await sender.send(key.public, b"still there")
    assert await first.recv() == RecvPacket(sender.key.raw, b"still there")
    await first.aclose()
    assert await sender.recv() == PeerGone(key.public.raw, PeerGoneReason.DISCONNECTED)


async def test_active_duplicate_leaving_with_two_left_drops_as_dup_client(relay_http: RelayHandle) -> None:
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    key = NodePrivateKey.generate()
    sender = await Peer.connect(relay_http)
    a = await Peer.connect(relay_http, key=key)
    b = await Peer.connect(relay_http, key=key)
    c = await Peer.connect(relay_http, key=key)  # active
    await c.aclose()
    await _until(lambda: stats.current_connections == 3)
    await sender.send(key.public, b"nobody active")
    await sender.barrier()
    assert stats.packets_dropped[("dup_client", "other")] == 1
    # b speaks, so it becomes active and receives.
    await b.barrier()
    await sender.send(key.public, b"to b")
    assert await b.recv() == RecvPacket(sender.key.raw, b"to b")
    assert await a.barrier() == []
