"""The routing table's forwarder rules (spec §6), driven through a real relay with real clients.

A mesh peer here is a real :class:`relay._mesh.MeshPeer` that is never started: the table only
keeps it as the place to forward to, and its queue shows what would go out.
"""

from __future__ import annotations

from derppeer import Peer, RelayHandle
from test_relay_conformance import _until

from natlib.derp import ClientInfo, PeerGone, PeerGoneReason, RecvPacket
from natlib.keys import NodePrivateKey
from relay._mesh import MeshPeer, MeshTarget


def _peer(relay: RelayHandle, port: int) -> MeshPeer:
    p = MeshPeer(relay.relay, MeshTarget("127.0.0.1", port, "127.0.0.1", port), tls=False)  # type: ignore[arg-type]
    p.connected = True  # as if its session were up
    return p


async def test_forward_to_first_registered_then_next(relay_http: RelayHandle) -> None:
    table = relay_http.relay.table  # type: ignore[attr-defined]
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    remote = NodePrivateKey.generate().public
    first, second = _peer(relay_http, 1), _peer(relay_http, 2)
    table.add_forwarder(remote.raw, first)
    table.add_forwarder(remote.raw, second)
    table.add_forwarder(remote.raw, first)  # re-registering is ignored
    assert stats.multiforwarder_created == 1
    sender = await Peer.connect(relay_http)
    await sender.send(remote, b"via mesh")
    await sender.barrier()
    assert list(first._queue) == [(sender.key.raw, remote.raw, b"via mesh")]
    assert not second._queue
    table.remove_forwarder(remote.raw, first)
    await sender.send(remote, b"via second")
    await sender.barrier()
    assert list(second._queue) == [(sender.key.raw, remote.raw, b"via second")]
    assert stats.multiforwarder_deleted == 1
    table.remove_forwarder(remote.raw, first)  # absent: counted, nothing else
    assert stats.packet_forwarder_delete_other_value == 1


async def test_local_connection_beats_forwarder(relay_http: RelayHandle) -> None:
    table = relay_http.relay.table  # type: ignore[attr-defined]
    sender = await Peer.connect(relay_http)
    local = await Peer.connect(relay_http)
    fwd = _peer(relay_http, 1)
    table.add_forwarder(local.key.raw, fwd)
    await sender.send(local.key, b"stay local")
    assert await local.recv() == RecvPacket(sender.key.raw, b"stay local")
    assert not fwd._queue


async def test_peer_gone_when_last_forwarder_goes(relay_http: RelayHandle) -> None:
    table = relay_http.relay.table  # type: ignore[attr-defined]
    remote_key = NodePrivateKey.generate()
    fwd = _peer(relay_http, 1)
    table.add_forwarder(remote_key.public.raw, fwd)
    receiver = await Peer.connect(relay_http)
    # A packet forwarded in from another relay registers the receiver for PeerGone.
    mesh = await Peer.connect(relay_http, info=ClientInfo(mesh_key=relay_http.relay.mesh_key))  # type: ignore[attr-defined]
    await mesh.send_raw(mesh.conn.forward_packet(remote_key.public, receiver.key, b"from afar"))
    assert await receiver.recv() == RecvPacket(remote_key.public.raw, b"from afar")
    table.remove_forwarder(remote_key.public.raw, fwd)
    assert await receiver.recv() == PeerGone(remote_key.public.raw, PeerGoneReason.DISCONNECTED)


async def test_local_client_leaving_while_a_forwarder_exists_is_not_gone(relay_http: RelayHandle) -> None:
    table = relay_http.relay.table  # type: ignore[attr-defined]
    x = await Peer.connect(relay_http)
    receiver = await Peer.connect(relay_http)
    await x.send(receiver.key, b"hi")
    assert await receiver.recv() == RecvPacket(x.key.raw, b"hi")
    table.add_forwarder(x.key.raw, _peer(relay_http, 1))  # x is also on another relay
    await x.aclose()
    await _until(lambda: x.key.raw not in table.sets)
    assert await receiver.barrier() == []
