"""relay._sclient.ClientConn's writer paths, on a real server object and a real socket pair.

The conformance tests (test_relay_conformance.py) cover the protocol end to end; these pin down
the order of bytes when ``enqueue`` writes directly (the writer-idle fast path) and when
something else is already waiting for the writer.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from natlib.derp import ClientInfo, PeerGone, PeerGoneReason
from natlib.keys import NodePrivateKey
from relay._queue import QueueEntry
from relay._sclient import ClientConn
from relay._server import RelayServer
from relay._transport import SocketTransport

DEADLINE = 10.0
SRC = bytes(range(32))


def recv_packet_frame(src: bytes, payload: bytes) -> bytes:
    return bytes([0x05]) + (32 + len(payload)).to_bytes(4, "big") + src + payload


class Running:
    def __init__(self, conn: ClientConn, peer: socket.socket) -> None:
        self.conn = conn
        self.peer = peer  # the client's end, blocking stdlib socket

    def read_exactly(self, n: int) -> bytes:
        got = b""
        self.peer.settimeout(DEADLINE)
        while len(got) < n:
            chunk = self.peer.recv(n - len(got))
            assert chunk, f"EOF after {len(got)} of {n} bytes"
            got += chunk
        return got


@pytest.fixture
async def running(nursery: trio.Nursery) -> AsyncIterator[Running]:
    server = RelayServer(NodePrivateKey.generate(), keepalive_interval=3600.0)
    a, b = socket.socketpair()
    transport = SocketTransport(trio.socket.from_stdlib_socket(a), peer_address=("127.0.0.1", 1))
    conn = ClientConn(
        server,
        transport,
        NodePrivateKey.generate().public.raw,
        ClientInfo(),
        is_mesh_peer=False,
        remote=("127.0.0.1", 1),
    )
    nursery.start_soon(conn.run)
    await trio.testing.wait_all_tasks_blocked()  # the writer is idle, waiting for work
    with b:
        yield Running(conn, b)
        conn.close("test over")
    await transport.aclose()


def entry(payload: bytes) -> QueueEntry:
    return QueueEntry(recv_packet_frame(SRC, payload), 1, len(payload), SRC, trio.current_time())


async def test_enqueue_writes_at_once_when_the_writer_is_idle(running: Running) -> None:
    stats = running.conn.stats
    running.conn.enqueue(entry(b"direct"), False)
    # No checkpoint since: the bytes were written by enqueue itself, not by the writer task.
    want = recv_packet_frame(SRC, b"direct")
    assert running.read_exactly(len(want)) == want
    assert stats.packets_sent == 1 and stats.bytes_sent == 6
    assert SRC in running.conn.received_from  # it will hear PeerGone when SRC leaves


async def test_control_frame_queued_first_is_written_first(running: Running) -> None:
    """A PeerGone queued while the writer is idle must not be overtaken by a packet enqueued
    right after it (before the writer has run): the packet waits for the writer too."""
    gone_key = bytes(range(100, 132))
    running.conn.queue_peer_gone(gone_key, PeerGoneReason.DISCONNECTED)
    running.conn.enqueue(entry(b"after"), False)
    peer_gone = PeerGone(gone_key, PeerGoneReason.DISCONNECTED).encode()
    with trio.fail_after(DEADLINE):
        await trio.testing.wait_all_tasks_blocked()  # the writer runs and goes idle again
    want = peer_gone + recv_packet_frame(SRC, b"after")
    assert running.read_exactly(len(want)) == want
    # Idle again: the fast path is open.
    running.conn.enqueue(entry(b"again"), False)
    want = recv_packet_frame(SRC, b"again")
    assert running.read_exactly(len(want)) == want
    assert running.conn.stats.packets_sent == 2
