"""Our DERP client (natlib.derphttp) and STUN codec (natlib.stun) against Tailscale's derper.

derper is built from the pinned tailscale.com module and run on 127.0.0.1 with a key we chose:
plain HTTP (a non-443 ``-a``), or TLS with ``-certmode manual -hostname 127.0.0.1`` (its own
self-signed IP certificate, which we trust; plus its meta-certificate). Over every transport
(HTTP, HTTPS with and without fast start, ws, wss) two of our clients exchange packets both ways,
ping, and see PeerGone; one of ours also trades packets with Tailscale's own client (derpcheck)
through derper. With a mesh key (``-mesh-psk-file``) our client watches connections, forwards
packets and closes peers. Not covered: mesh between our relay and derper (our -mesh-with is not
implemented yet, issue 7).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from interop_support import (
    GO_EXCHANGE_ARGS,
    Derper,
    derpcheck_client,
    exchange,
    gone,
    packet_from,
    receive_matching,
    requires_binaries,
    run_derper,
    spawn,
)

from natlib import stun
from natlib.derp import PeerGone, PeerGoneReason, PeerPresent, PeerPresentFlags, RecvPacket
from natlib.derphttp import DerpClient, DerpConnectionClosed, connect
from natlib.keys import NodePrivateKey

pytestmark = requires_binaries

DISCO_MAGIC = "TS💬".encode()


async def connect_to(derper: Derper, key: NodePrivateKey, transport: str, **kwargs: object) -> DerpClient:
    url = derper.ws_url() if transport in ("ws", "wss") else derper.url
    if transport == "https-fast-start":
        kwargs["server_key"] = derper.server_key
    return await connect(url, key, ssl_context=derper.ssl_context(), **kwargs)  # type: ignore[arg-type]


async def receive_until_closed(client: DerpClient, timeout: float = 10) -> None:
    """Receive until the relay closes the connection (fails after ``timeout``)."""
    with trio.fail_after(timeout):
        while True:
            try:
                await client.receive()
            except DerpConnectionClosed:
                return


@pytest.mark.parametrize("transport", ["http", "https", "https-fast-start", "ws", "wss"])
async def test_natlib_clients_through_derper(transport: str, tmp_path: Path) -> None:
    tls = transport in ("https", "https-fast-start", "wss")
    async with run_derper(tmp_path, tls=tls) as derper:
        a_key, b_key = NodePrivateKey.generate(), NodePrivateKey.generate()
        b = await connect_to(derper, b_key, transport)
        async with b:
            a = await connect_to(derper, a_key, transport)
            async with a:
                for payload in (b"", b"hello from natlib", os.urandom(1200), os.urandom(65536)):
                    await a.send(b_key.public, payload)
                    assert await receive_matching(b, packet_from(a_key.public)) == RecvPacket(
                        a_key.public.raw, payload
                    )
                    await b.send(a_key.public, payload[::-1])
                    assert await receive_matching(a, packet_from(b_key.public)) == RecvPacket(
                        b_key.public.raw, payload[::-1]
                    )
                with trio.fail_after(10):
                    rtt = await a.ping(b"\x01\x02\x03\x04\x05\x06\x07\x2a")
                assert rtt > 0
                # A disco-looking packet to a key derper does not know: PeerGone(NotHere).
                nobody = NodePrivateKey.generate().public
                await a.send(nobody, DISCO_MAGIC + bytes(56))
                event = await receive_matching(a, gone(nobody))
                assert event == PeerGone(nobody.raw, PeerGoneReason.NOT_HERE)
            # a leaves; b received from a, so derper tells b.
            event = await receive_matching(b, gone(a_key.public))
            assert event == PeerGone(a_key.public.raw, PeerGoneReason.DISCONNECTED)


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_natlib_and_go_client_through_derper(tls: bool, tmp_path: Path) -> None:
    async with run_derper(tmp_path, tls=tls) as derper:
        go_key, our_key = NodePrivateKey.generate(), NodePrivateKey.generate()
        async with await connect(derper.url, our_key, ssl_context=derper.ssl_context()) as ours:
            pin = ["-certname", derper.cert_pin(), "-want-metacert", "true"] if tls else []
            argv = derpcheck_client(
                derper.url, *pin, "-send-to", our_key.public.text(), *GO_EXCHANGE_ARGS, key=go_key
            )
            async with spawn("derpcheck", argv, tmp_path) as go:
                connected = await go.event("connected")
                await exchange(go, connected, ours, go_key, derper.server_key)


async def test_natlib_mesh_client_against_derper(tmp_path: Path) -> None:
    mesh_key = os.urandom(32)
    async with run_derper(tmp_path, tls=True, mesh_key=mesh_key) as derper:
        url, ctx = derper.url, derper.ssl_context()
        w_key, b_key, c_key = (NodePrivateKey.generate() for _ in range(3))
        async with await connect(url, w_key, ssl_context=ctx, mesh_key=mesh_key) as watcher:
            await watcher.watch_conns()
            me = await receive_matching(watcher, lambda e: isinstance(e, PeerPresent))
            assert isinstance(me, PeerPresent)
            assert me.key == w_key.public.raw
            assert me.flags == PeerPresentFlags.IS_MESH_PEER
            b = await connect(url, b_key, ssl_context=ctx)
            async with b:
                present = await receive_matching(
                    watcher, lambda e: isinstance(e, PeerPresent) and e.key == b_key.public.raw
                )
                assert isinstance(present, PeerPresent)
                assert present.flags == PeerPresentFlags.IS_REGULAR
                assert str(present.ip) == "127.0.0.1"
                assert present.port > 0
                # ForwardPacket: derper delivers it to b as if it came from the given source.
                src = NodePrivateKey.generate().public
                await watcher.forward_packet(src, b_key.public, b"forwarded by a mesh peer")
                assert await receive_matching(b, packet_from(src)) == RecvPacket(
                    src.raw, b"forwarded by a mesh peer"
                )
            event = await receive_matching(watcher, gone(b_key.public))
            assert event == PeerGone(b_key.public.raw, PeerGoneReason.DISCONNECTED)
            # ClosePeer: derper closes c's connection; the watcher hears c is gone.
            c = await connect(url, c_key, ssl_context=ctx)
            async with c:
                await receive_matching(
                    watcher, lambda e: isinstance(e, PeerPresent) and e.key == c_key.public.raw
                )
                await watcher.close_peer(c_key.public)
                await receive_until_closed(c)
            await receive_matching(watcher, gone(c_key.public))


async def test_natlib_without_mesh_key_cannot_watch_derper(tmp_path: Path) -> None:
    """A well-formed but wrong mesh key makes a regular client; derper then drops its WatchConns."""
    async with run_derper(tmp_path, tls=False, mesh_key=os.urandom(32)) as derper:
        c = await connect(derper.url, NodePrivateKey.generate(), mesh_key=os.urandom(32))
        async with c:
            await c.watch_conns()
            await receive_until_closed(c)


async def test_natlib_stun_against_derper(tmp_path: Path) -> None:
    """Tailscale's Binding Request from natlib.stun; derper answers only that kind (SOFTWARE
    ``tailnode`` and FINGERPRINT), so a plain RFC 5389 request is not tried here."""
    async with run_derper(tmp_path, tls=False, stun=True) as derper:
        assert derper.stun_port is not None
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            await sock.connect(("127.0.0.1", derper.stun_port))
            txid = stun.new_transaction_id()
            request = stun.tailscale_binding_request(txid)
            # derper starts its STUN listener in the background: retransmit until it answers
            # (a deadline, not a sleep, bounds the wait).
            data = b""
            with trio.fail_after(10):
                while not data:
                    await sock.send(request)
                    with trio.move_on_after(0.2):
                        data = await sock.recv(2048)
            assert stun.parse_binding_response(data, txid) == sock.getsockname()
            assert len(data) == 32
