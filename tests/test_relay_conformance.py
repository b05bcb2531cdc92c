"""The relay's behaviour, checked the way Tailscale's derp tests check derper (spec §10).

Every test runs a real relay on 127.0.0.1 and real DERP clients over TCP.
"""

from __future__ import annotations

import pytest
import trio
from derppeer import Peer, RelayHandle

from natlib.derp import (
    ClientInfo,
    HandshakeError,
    KeepAlive,
    PeerGone,
    PeerGoneReason,
    PeerPresent,
    PeerPresentFlags,
    Pong,
    RecvPacket,
)
from natlib.keys import NodePrivateKey

DISCO_MAGIC = "TS💬".encode()
UPGRADE_REQUEST = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"


def disco_like(n: int = 56) -> bytes:
    """A packet the relay classifies as disco: the magic plus ``n`` more bytes (≥ 56)."""
    return DISCO_MAGIC + bytes(n)


async def test_send_recv_three_clients(relay_http: RelayHandle) -> None:
    c0 = await Peer.connect(relay_http)
    c1 = await Peer.connect(relay_http)
    c2 = await Peer.connect(relay_http)
    await c0.send(c1.key, b"hello 1")
    got = await c1.recv()
    assert got == RecvPacket(c0.key.raw, b"hello 1")
    await c1.send(c2.key, b"hello 2")
    got = await c2.recv()
    assert got == RecvPacket(c1.key.raw, b"hello 2")
    # Nobody else received anything.
    assert await c0.barrier() == []
    assert await c1.barrier() == []
    assert await c2.barrier() == []
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    assert stats.packets_received == 2
    assert stats.packets_sent == 2
    assert stats.current_connections == 3


async def test_unknown_destination_peer_gone_not_here_rate_limited(relay_http: RelayHandle) -> None:
    c0 = await Peer.connect(relay_http)
    nobody = NodePrivateKey.generate().public
    # A non-disco packet to an unknown key is dropped silently.
    await c0.send(nobody, b"not disco")
    assert await c0.barrier() == []
    # A disco-looking one gets PeerGone(NotHere) ...
    await c0.send(nobody, disco_like())
    assert await c0.barrier() == [PeerGone(nobody.raw, PeerGoneReason.NOT_HERE)]
    # ... and five more in a row bring the total to exactly 3 (1/s, burst 3).
    for _ in range(5):
        await c0.send(nobody, disco_like())
    frames = await c0.barrier()
    assert frames == [PeerGone(nobody.raw, PeerGoneReason.NOT_HERE)] * 2
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    assert stats.peer_gone_not_here_frames == 3
    assert stats.packets_dropped[("unknown_dest", "disco")] == 6
    assert stats.packets_dropped[("unknown_dest", "other")] == 1


async def test_disco_boundary_61_bytes_is_not_disco(relay_http: RelayHandle) -> None:
    c0 = await Peer.connect(relay_http)
    nobody = NodePrivateKey.generate().public
    await c0.send(nobody, DISCO_MAGIC + bytes(55))  # 61 bytes
    assert await c0.barrier() == []


async def test_note_preferred_moves_home_gauge_idempotently(relay_http: RelayHandle) -> None:
    c0 = await Peer.connect(relay_http)
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    for _ in range(2):
        await c0.send_raw(c0.conn.note_preferred(True))
        await c0.barrier()
        assert stats.current_home_connections == 1
    for _ in range(2):
        await c0.send_raw(c0.conn.note_preferred(False))
        await c0.barrier()
        assert stats.current_home_connections == 0
    await c0.send_raw(c0.conn.note_preferred(True))
    await c0.barrier()
    await c0.aclose()
    await _until(lambda: stats.current_connections == 0)
    assert stats.current_home_connections == 0


async def _until(pred: object, timeout: float = 5.0) -> None:
    """Poll a condition with a deadline (for server-side effects of a client closing)."""
    assert callable(pred)
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)


async def test_peer_gone_disconnected_only_to_those_who_received(relay_http: RelayHandle) -> None:
    c0 = await Peer.connect(relay_http)
    c1 = await Peer.connect(relay_http)
    c2 = await Peer.connect(relay_http)
    await c1.send(c0.key, b"from 1")
    assert await c0.recv() == RecvPacket(c1.key.raw, b"from 1")
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    await c1.aclose()
    assert await c0.recv() == PeerGone(c1.key.raw, PeerGoneReason.DISCONNECTED)
    await _until(lambda: stats.current_connections == 2)
    # c2 never received from c1: it hears nothing.
    assert await c2.barrier() == []
    # Closing c2, from whom nobody received, adds nothing for c0.
    await c2.aclose()
    await _until(lambda: stats.current_connections == 1)
    assert await c0.barrier() == []
    assert stats.peer_gone_disconnected_frames == 1


async def test_send_freeze_one_stalled_receiver_does_not_block_others(relay_http: RelayHandle) -> None:
    """Alice sends to Bob and Cathy; Cathy stops reading; Bob keeps receiving everything."""
    alice = await Peer.connect(relay_http)
    bob = await Peer.connect(relay_http)
    cathy = await Peer.connect(relay_http)  # never reads again
    payload = bytes(1000)
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    received = 0
    rounds = 10000  # ~10 MB to Cathy: far beyond socket buffers, so her writer stalls

    async def bob_reader() -> None:
        nonlocal received
        while received < rounds:
            ev = await bob.recv(timeout=10)
            assert isinstance(ev, RecvPacket) and ev.src == alice.key.raw
            received += 1

    async with trio.open_nursery() as n:
        n.start_soon(bob_reader)
        for i in range(rounds):
            await alice.send(cathy.key, payload)
            await alice.send(bob.key, i.to_bytes(4, "big") + payload)
    assert received == rounds
    # Cathy's queue overflowed: her oldest packets were dropped, nobody was blocked.
    assert stats.packets_dropped[("queue_head", "other")] > 0
    cathy_conn = relay_http.relay.table.active.get(cathy.key.raw)  # type: ignore[attr-defined]
    if cathy_conn is not None:  # (her 2 s write timeout may already have closed her)
        assert len(cathy_conn._send_queue) <= 32
    # When Cathy goes, every packet is accounted for: delivered, or dropped with a reason.
    await cathy.aclose()
    await _until(lambda: stats.current_connections == 2)
    assert bob.key.raw in relay_http.relay.table.active  # type: ignore[attr-defined]
    # (unknown_dest: Cathy's 2 s write timeout may close her before Alice finishes sending.)
    dropped = sum(n for (_reason, kind), n in stats.packets_dropped.items() if kind == "other")
    assert dropped + stats.packets_sent == 2 * rounds


async def test_ping_gets_identical_pong(relay_http: RelayHandle) -> None:
    c0 = await Peer.connect(relay_http)
    ping = bytes([1, 2, 3, 4, 5, 6, 7, 0x2A])
    await c0.send_raw(b"\x12\x00\x00\x00\x08" + ping)
    raw = await c0.recv()
    assert raw == Pong(ping)
    # A Ping carrying up to 1000 bytes is accepted; only the first 8 are echoed.
    await c0.send_raw(b"\x12\x00\x00\x03\xe8" + ping + bytes(992))
    assert await c0.recv() == Pong(ping)


async def test_watch_conns_snapshot_and_updates(relay_http: RelayHandle, mesh_key: bytes) -> None:
    plain = await Peer.connect(relay_http)
    watcher = await Peer.connect(relay_http, info=ClientInfo(mesh_key=mesh_key))
    await watcher.send_raw(watcher.conn.watch_conns())
    snapshot = await watcher.barrier()
    by_key = {f.key: f for f in snapshot if isinstance(f, PeerPresent)}
    assert set(by_key) == {plain.key.raw, watcher.key.raw}
    assert by_key[watcher.key.raw].flags == PeerPresentFlags.IS_MESH_PEER
    assert by_key[plain.key.raw].flags == PeerPresentFlags.IS_REGULAR
    assert str(by_key[plain.key.raw].ip) == "127.0.0.1"
    # A new client is announced; its departure too.
    late = await Peer.connect(relay_http)
    ev = await watcher.recv()
    assert isinstance(ev, PeerPresent) and ev.key == late.key.raw
    await late.aclose()
    assert await watcher.recv() == PeerGone(late.key.raw, PeerGoneReason.DISCONNECTED)
    # A second watcher gets a full snapshot.
    second = await Peer.connect(relay_http, info=ClientInfo(mesh_key=mesh_key))
    ev = await watcher.recv()
    assert isinstance(ev, PeerPresent) and ev.key == second.key.raw
    await second.send_raw(second.conn.watch_conns())
    keys = {f.key for f in await second.barrier() if isinstance(f, PeerPresent)}
    assert keys == {plain.key.raw, watcher.key.raw, second.key.raw}


async def test_mesh_frames_from_non_mesh_client_close_only_that_client(relay_http: RelayHandle) -> None:
    bystander = await Peer.connect(relay_http)
    intruder = await Peer.connect(relay_http, info=ClientInfo(mesh_key=bytes(32)))  # wrong key
    await intruder.send_raw(intruder.conn.watch_conns())
    await intruder.expect_closed()
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    assert stats.protocol_errors["insufficient_permissions"] == 1
    await bystander.send(bystander.key, b"still fine")
    assert await bystander.recv() == RecvPacket(bystander.key.raw, b"still fine")


async def test_close_peer_closes_every_connection_of_that_key(
    relay_http: RelayHandle, mesh_key: bytes
) -> None:
    victim_key = NodePrivateKey.generate()
    v1 = await Peer.connect(relay_http, key=victim_key)
    v2 = await Peer.connect(relay_http, key=victim_key)
    admin = await Peer.connect(relay_http, info=ClientInfo(mesh_key=mesh_key))
    await admin.send_raw(admin.conn.close_peer(victim_key.public))
    await v1.expect_closed()
    await v2.expect_closed()
    assert await admin.barrier() == []


async def test_forward_packet_from_mesh_peer(relay_http: RelayHandle, mesh_key: bytes) -> None:
    mesh = await Peer.connect(relay_http, info=ClientInfo(mesh_key=mesh_key))
    local = await Peer.connect(relay_http)
    remote_src = NodePrivateKey.generate().public
    await mesh.send_raw(mesh.conn.forward_packet(remote_src, local.key, b"via mesh"))
    assert await local.recv() == RecvPacket(remote_src.raw, b"via mesh")
    # To an unknown destination: dropped, never re-forwarded; disco gets NotHere back.
    nobody = NodePrivateKey.generate().public
    await mesh.send_raw(mesh.conn.forward_packet(remote_src, nobody, disco_like()))
    assert await mesh.barrier() == [PeerGone(nobody.raw, PeerGoneReason.NOT_HERE)]
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    assert stats.packets_dropped[("unknown_dest_on_fwd", "disco")] == 1
    assert stats.packets_forwarded_in == 2


async def test_send_to_self(relay_http: RelayHandle) -> None:
    c0 = await Peer.connect(relay_http)
    await c0.send(c0.key, b"echo")
    assert await c0.recv() == RecvPacket(c0.key.raw, b"echo")


async def test_fast_start(relay_http: RelayHandle) -> None:
    fast = await Peer.connect(relay_http, fast_start=True)
    other = await Peer.connect(relay_http)
    assert fast.upgrade_response == b""  # no HTTP response at all
    await fast.send(other.key, b"fast")
    assert await other.recv() == RecvPacket(fast.key.raw, b"fast")


async def test_upgrade_response_bytes(relay_http: RelayHandle) -> None:
    c = await Peer.connect(relay_http)
    assert c.upgrade_response == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
        b"Derp-Version: 2\r\nDerp-Public-Key: " + relay_http.server_key.hex().encode() + b"\r\n\r\n"
    )


# -- timers, limits and deadlines ---------------------------------------------------------------


async def _custom_relay(nursery: trio.Nursery, **kwargs: object) -> RelayHandle:
    from relay import RelayServer

    key = NodePrivateKey.generate()
    server = RelayServer(key, **kwargs)  # type: ignore[arg-type]
    bound = await nursery.start(lambda task_status: server.serve_tcp("127.0.0.1", 0, task_status=task_status))
    return RelayHandle(server, str(bound[0][0]), int(bound[0][1]), key.public)


async def test_keepalive_frames_arrive_on_schedule(nursery: trio.Nursery) -> None:
    relay = await _custom_relay(nursery, keepalive_interval=0.05, keepalive_jitter=0.01)
    c = await Peer.connect(relay)
    for _ in range(3):
        assert isinstance(await c.recv(timeout=2, skip_keepalive=False), KeepAlive)


async def test_write_timeout_closes_a_frozen_receiver(nursery: trio.Nursery) -> None:
    relay = await _custom_relay(nursery, write_timeout=0.2)
    stats = relay.relay.stats  # type: ignore[attr-defined]
    sender = await Peer.connect(relay)
    frozen = await Peer.connect(relay)  # never reads
    with trio.fail_after(20):
        while stats.sclient_write_timeouts == 0:
            await sender.send(frozen.key, bytes(16000))
    await _until(lambda: stats.current_connections == 1)
    assert frozen.key.raw not in relay.relay.table.active  # type: ignore[attr-defined]
    assert stats.packets_dropped[("write_error", "other")] > 0


async def test_client_that_never_sends_client_info_is_dropped(nursery: trio.Nursery) -> None:
    relay = await _custom_relay(nursery, handshake_timeout=0.2)
    stream = await trio.open_tcp_stream(relay.host, relay.port)
    async with stream:
        await stream.send_all(UPGRADE_REQUEST)
        got = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                got += chunk
    assert got.startswith(b"HTTP/1.1 101 ")
    assert relay.relay.stats.handshake_timeouts == 1  # type: ignore[attr-defined]


async def test_slow_http_request_is_dropped(nursery: trio.Nursery) -> None:
    relay = await _custom_relay(nursery, http_timeout=0.2)
    stream = await trio.open_tcp_stream(relay.host, relay.port)
    async with stream:
        await stream.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        with trio.fail_after(5):
            assert await stream.receive_some(65536) == b""


async def test_oversized_send_packet_closes_only_that_client(relay_http: RelayHandle) -> None:
    good = await Peer.connect(relay_http)
    bad = await Peer.connect(relay_http)
    await bad.send_raw(b"\x04" + (32 + 65537).to_bytes(4, "big") + good.key.raw)
    await bad.expect_closed()
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    assert stats.protocol_errors["bad_send_packet_len"] == 1
    await good.send(good.key, bytes(65536))  # the largest legal packet still works
    got = await good.recv()
    assert isinstance(got, RecvPacket) and len(got.packet) == 65536


async def test_client_info_too_large_is_rejected(relay_http: RelayHandle) -> None:
    stream = await trio.open_tcp_stream(relay_http.host, relay_http.port)
    async with stream:
        await stream.send_all(UPGRADE_REQUEST)
        await stream.send_all(b"\x02" + (256 * 1024 + 1).to_bytes(4, "big"))
        with trio.fail_after(5):
            while await stream.receive_some(65536):
                pass
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    assert stats.protocol_errors["client_info_too_large"] == 1


async def test_client_info_sealed_to_the_wrong_key_is_rejected(relay_http: RelayHandle) -> None:
    impostor_server = NodePrivateKey.generate().public
    # The client notices the mismatched ServerKey, or the relay closes first; either way no session.
    with pytest.raises((ConnectionError, EOFError, trio.BrokenResourceError, HandshakeError)):
        await Peer.connect(
            RelayHandle(relay_http.relay, relay_http.host, relay_http.port, impostor_server), fast_start=True
        )
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    await _until(lambda: stats.protocol_errors["bad_client_info_box"] == 1)
