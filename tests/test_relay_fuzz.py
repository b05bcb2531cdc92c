"""Random and truncated input never escapes a connection handler and never affects other clients."""

from __future__ import annotations

import trio
from derppeer import Peer, RelayHandle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natlib.derp import RecvPacket


async def _blast(relay: RelayHandle, data: bytes, chunk: int) -> None:
    stream = await trio.open_tcp_stream(relay.host, relay.port)
    async with stream:
        try:
            for i in range(0, len(data), chunk):
                await stream.send_all(data[i : i + chunk])
            await stream.send_eof()
            with trio.fail_after(5):
                while await stream.receive_some(65536):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


http_garbage = st.one_of(
    st.binary(max_size=600),
    st.builds(
        lambda method, path, hdr, tail: b"%s %s HTTP/1.1\r\n%s\r\n\r\n%s" % (method, path, hdr, tail),
        st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"\x00"]),
        st.sampled_from([b"/derp", b"/generate_204", b"/", b"/derp/probe", b"*"]),
        st.sampled_from(
            [
                b"Upgrade: DERP\r\nConnection: Upgrade",
                b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Protocol: derp",
                b"Upgrade: DERP\r\nDerp-Fast-Start: 1",
                b"Content-Length: 5",
                b"Transfer-Encoding: chunked",
            ]
        ),
        st.binary(max_size=300),
    ),
)


async def test_fuzzed_connections_never_hurt_others(relay_http: RelayHandle) -> None:
    a = await Peer.connect(relay_http)
    b = await Peer.connect(relay_http)
    samples: list[tuple[bytes, int]] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(http_garbage, st.integers(min_value=1, max_value=64))
    def collect(data: bytes, chunk: int) -> None:
        samples.append((data, chunk))

    collect()
    for data, chunk in samples:
        await _blast(relay_http, data, chunk)
    await a.send(b.key, b"unaffected")
    assert await b.recv() == RecvPacket(a.key.raw, b"unaffected")
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    assert stats.protocol_errors["internal_error"] == 0


async def test_fuzzed_frames_after_handshake(relay_http: RelayHandle) -> None:
    """Connected clients that send random frame streams are closed or ignored, never crash anything."""
    a = await Peer.connect(relay_http)
    b = await Peer.connect(relay_http)
    samples: list[bytes] = []

    frame = st.builds(
        lambda t, n, body: bytes([t]) + n.to_bytes(4, "big") + body,
        st.integers(min_value=0, max_value=0x20),
        st.one_of(st.integers(min_value=0, max_value=80), st.just(0xFFFFFFFF), st.just(65569)),
        st.binary(max_size=80),
    )

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(frame, max_size=6))
    def collect(frames: list[bytes]) -> None:
        samples.append(b"".join(frames))

    collect()
    for data in samples:
        victim = await Peer.connect(relay_http)
        try:
            await victim.send_raw(data)
            await victim.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await a.send(b.key, b"unaffected")
    got = await b.recv()
    assert got == RecvPacket(a.key.raw, b"unaffected")
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    assert stats.protocol_errors["internal_error"] == 0
