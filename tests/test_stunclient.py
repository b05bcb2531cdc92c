"""natlib.stunclient: the sans-io StunClient (exact bytes, schedules, what is ignored), fuzzing,
and the anyio drivers on loopback against our relay's STUN server, coturn and stund, under trio
and asyncio."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from relayproc import RelayProcess, free_ports

from natlib import stun
from natlib.stunclient import MAX_PENDING, StunClient, StunResult, stun_binding, stun_probe

SERVER = ("192.0.2.1", 3478)
MAPPED = ("203.0.113.7", 41641)


def _first_send(client: StunClient, now: float = 0.0) -> tuple[bytes, tuple[str, int]]:
    (sent,) = client.datagrams_to_send(now)
    return sent


# -- sans-io ---------------------------------------------------------------------------------------


def test_first_request_is_tailscales_binding_request_with_the_transaction_id() -> None:
    client = StunClient()
    txid = client.start(SERVER, 10.0)
    assert len(txid) == 12 and client.pending == 1
    data, dest = _first_send(client, 10.0)
    assert dest == SERVER
    assert data == stun.tailscale_binding_request(txid)
    assert data[:4] == b"\x00\x01\x00\x14" and data[4:8] == bytes.fromhex("2112a442") and data[8:20] == txid
    assert len(data) == 40


def test_retries_at_0_100_200_ms_each_with_its_own_id_then_timeout_at_3_s() -> None:
    client = StunClient()
    txid = client.start(SERVER, 0.0)
    assert client.next_deadline() == 0.0
    first = client.datagrams_to_send(0.0)
    assert client.datagrams_to_send(0.05) == []
    assert client.next_deadline() == pytest.approx(0.1)
    second = client.datagrams_to_send(0.1)
    assert client.next_deadline() == pytest.approx(0.2)
    third = client.datagrams_to_send(0.25)
    assert client.next_deadline() == 3.0
    txids = [d[0][0][8:20] for d in (first, second, third)]
    assert txids[0] == txid and len(set(txids)) == 3
    assert client.datagrams_to_send(1.0) == []
    assert client.expired(2.999) == []
    (result,) = client.expired(3.0)
    assert result == StunResult(SERVER, None, None, "timeout", sends=3, txid=txid)
    assert client.pending == 0 and client.next_deadline() is None


def test_an_answer_to_any_send_completes_with_that_sends_rtt() -> None:
    client = StunClient()
    txid = client.start(SERVER, 0.0)
    client.datagrams_to_send(0.0)
    ((second, _),) = client.datagrams_to_send(0.1)
    reply = stun.binding_response(second[8:20], MAPPED)
    result = client.receive_datagram(reply, SERVER, 0.13)
    assert result is not None
    assert (result.mapped, result.error, result.sends, result.txid) == (MAPPED, None, 2, txid)
    assert result.rtt == pytest.approx(0.03)
    assert client.pending == 0
    # A duplicate (or the first send's late answer) is no longer ours.
    assert client.receive_datagram(reply, SERVER, 0.2) is None
    assert client.receive_datagram(stun.binding_response(txid, MAPPED), SERVER, 0.2) is None


def test_many_servers_one_client_replies_matched_by_id_and_source() -> None:
    client = StunClient()
    servers = [("192.0.2.1", 3478), ("198.51.100.9", 3478), ("2001:db8::1", 3478)]
    ids = [client.start(s, 0.0) for s in servers]
    sends = dict((d[8:20], dest) for d, dest in client.datagrams_to_send(0.0))
    assert sends == dict(zip(ids, servers, strict=True))
    # The right TxID from the wrong server is not an answer (spoofing, or a reply meant elsewhere).
    assert client.receive_datagram(stun.binding_response(ids[0], MAPPED), servers[1], 0.01) is None
    r1 = client.receive_datagram(stun.binding_response(ids[1], MAPPED), servers[1], 0.02)
    r2 = client.receive_datagram(stun.binding_response(ids[2], ("2001:db8:1::5", 5)), servers[2], 0.03)
    assert r1 is not None and r1.server == servers[1] and r1.mapped == MAPPED
    assert r2 is not None and r2.mapped == ("2001:db8:1::5", 5)
    assert client.pending == 1


def test_v4_mapped_sources_and_servers_are_canonical() -> None:
    client = StunClient()
    txid = client.start(("::ffff:192.0.2.1", 3478), 0.0)
    assert _first_send(client)[1] == SERVER
    result = client.receive_datagram(stun.binding_response(txid, MAPPED), ("::ffff:192.0.2.1", 3478), 0.1)
    assert result is not None and result.server == SERVER


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("wrong txid", lambda t: stun.binding_response(bytes(12), MAPPED)),
        ("truncated", lambda t: stun.binding_response(t, MAPPED)[:-4]),
        ("header only", lambda t: stun.binding_response(t, MAPPED)[:20]),
        (
            "bad length",
            lambda t: (
                stun.binding_response(t, MAPPED)[:2] + b"\x00\x10" + stun.binding_response(t, MAPPED)[4:]
            ),
        ),
        ("request echoed", lambda t: stun.tailscale_binding_request(t)),
        ("no cookie", lambda t: b"\x01\x01\x00\x00" + bytes(4) + t),
        ("garbage", lambda t: b"\x04\x00\x00\x00" + bytes(28)),
        ("empty", lambda t: b""),
        ("no address", lambda t: b"\x01\x01\x00\x00" + bytes.fromhex("2112a442") + t),
    ],
)
def test_malformed_or_foreign_datagrams_are_not_ours(name: str, make: Callable[[bytes], bytes]) -> None:
    client = StunClient()
    txid = client.start(SERVER, 0.0)
    client.datagrams_to_send(0.0)
    assert client.receive_datagram(make(txid), SERVER, 0.01) is None
    assert client.pending == 1  # still waiting: a proper answer completes it
    assert client.receive_datagram(stun.binding_response(txid, MAPPED), SERVER, 0.02) is not None


def test_error_response_ends_the_transaction_with_the_code() -> None:
    client = StunClient()
    txid = client.start(SERVER, 0.0)
    client.datagrams_to_send(0.0)
    error_code = struct.pack("!HH", 0x0009, 8) + b"\x00\x00\x04\x00" + b"Bad!"  # 400
    reply = struct.pack("!HH", 0x0111, len(error_code)) + bytes.fromhex("2112a442") + txid + error_code
    result = client.receive_datagram(reply, SERVER, 0.01)
    assert result is not None and result.mapped is None and result.error is not None
    assert "400" in result.error
    assert client.pending == 0


def test_cancel_and_fail() -> None:
    client = StunClient()
    a = client.start(SERVER, 0.0)
    b = client.start(("192.0.2.2", 3478), 0.0)
    sends = client.datagrams_to_send(0.0)
    client.cancel(a)
    client.cancel(a)  # idempotent
    client.cancel(bytes(12))  # unknown: ignored
    assert client.receive_datagram(stun.binding_response(a, MAPPED), SERVER, 0.01) is None
    failed = client.fail(sends[1][0][8:20], "send failed: unreachable")
    assert failed is not None and failed.error == "send failed: unreachable" and failed.txid == b
    assert client.pending == 0 and client.datagrams_to_send(1.0) == []


def test_no_send_is_due_after_the_deadline() -> None:
    client = StunClient()
    client.start(SERVER, 0.0, schedule=(0.0, 0.5, 1.0), timeout=0.8)
    assert len(client.datagrams_to_send(0.9)) == 2  # the 1.0 s send falls after the 0.8 s timeout
    assert client.next_deadline() == 0.8


def test_bad_arguments_are_value_errors() -> None:
    client = StunClient()
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        client.start(("relay.example", 3478), 0.0)
    with pytest.raises(ValueError, match="port"):
        client.start(("192.0.2.1", 0), 0.0)
    with pytest.raises(ValueError, match="timeout"):
        client.start(SERVER, 0.0, timeout=0)
    with pytest.raises(ValueError, match="non-decreasing"):
        client.start(SERVER, 0.0, schedule=(0.2, 0.1))
    assert client.pending == 0


def test_pending_is_bounded() -> None:
    client = StunClient()
    for _ in range(MAX_PENDING):
        client.start(SERVER, 0.0)
    with pytest.raises(ValueError, match="in flight"):
        client.start(SERVER, 0.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.integers(min_value=0, max_value=43), st.binary(min_size=1, max_size=4))
def test_fuzz_never_raises_and_never_accepts_foreign_bytes(junk: bytes, at: int, patch: bytes) -> None:
    client = StunClient()
    txid = client.start(SERVER, 0.0)
    client.datagrams_to_send(0.0)
    assert client.receive_datagram(junk, SERVER, 0.01) is None or junk[8:20] == txid
    valid = bytearray(stun.binding_response(txid, MAPPED))
    valid[at : at + len(patch)] = patch
    result = client.receive_datagram(bytes(valid), SERVER, 0.02)
    assert result is None or result.txid == txid


# -- real sockets on loopback ----------------------------------------------------------------------


def _wait_until_answering(port: int, deadline: float = 15.0) -> None:
    """Poll the server with short STUN probes until it answers (its startup has no other signal)."""

    async def probe() -> bool:
        (r,) = await stun_probe([("127.0.0.1", port)], timeout=0.3)
        return r.mapped is not None

    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if anyio.run(probe):
            return
    raise AssertionError(f"STUN server on 127.0.0.1:{port} did not answer within {deadline} s")


@pytest.fixture
def relay_stun_port(tmp_path: Path) -> Iterator[int]:
    """Our relay (``python -m relay``) with its STUN server on a free loopback port."""
    http_port, stun_port = free_ports(2)
    relay = RelayProcess(
        [
            "-c", str(tmp_path / "derper.key"), "-a", f"127.0.0.1:{http_port}", "-stun-port", str(stun_port),
            "-http-port", "-1", "-metrics-addr=off",
        ]
    )  # fmt: skip
    relay.start()
    try:
        _wait_until_answering(stun_port)
        yield stun_port
    finally:
        relay.stop()


@pytest.fixture
def coturn_port() -> Iterator[int]:
    if shutil.which("turnserver") is None:
        pytest.skip("coturn's turnserver is not installed (bash .ci/stun-deps.sh)")
    port = free_ports(1)[0]
    argv = [
        "turnserver", "-n", "--listening-ip=127.0.0.1", f"--listening-port={port}", "--stun-only",
        "--no-cli", "--no-tls", "--no-dtls", "--log-file=stdout", "--simple-log",
    ]  # fmt: skip
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            _wait_until_answering(port)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.fixture
def stund_port() -> Iterator[int]:
    if shutil.which("stund") is None:
        pytest.skip("stund is not installed (package stun-server; bash .ci/stun-deps.sh)")
    port, alt_port = free_ports(2)
    argv = ["stund", "-h", "127.0.0.1", "-a", "127.0.0.2", "-p", str(port), "-o", str(alt_port)]
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            _wait_until_answering(port)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


def _mapped_is_our_socket(port: int, backend: str) -> None:
    """Bind a socket ourselves; the server must report exactly its address (loopback: no NAT)."""

    async def main() -> tuple[tuple[str, int], tuple[str, int]]:
        async with await anyio.create_udp_socket(family=socket.AF_INET, local_host="127.0.0.1") as sock:
            local = sock.extra(anyio.abc.SocketAttribute.local_address)
            mapped = await stun_binding(("127.0.0.1", port), sock=sock)
            return (str(local[0]), int(local[1])), mapped

    local, mapped = anyio.run(main, backend=backend)
    assert mapped == local


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_binding_against_our_relay(relay_stun_port: int, backend: str) -> None:
    _mapped_is_our_socket(relay_stun_port, backend)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_binding_against_coturn(coturn_port: int, backend: str) -> None:
    _mapped_is_our_socket(coturn_port, backend)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_binding_against_stund(stund_port: int, backend: str) -> None:
    _mapped_is_our_socket(stund_port, backend)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_probe_many_servers_from_one_socket_in_order(
    relay_stun_port: int, coturn_port: int, backend: str
) -> None:
    silent = free_ports(1)[0]  # nothing listens there: a timeout after three sends
    servers = [("127.0.0.1", coturn_port), ("127.0.0.1", silent), ("127.0.0.1", relay_stun_port)]

    async def main() -> list[StunResult]:
        return await stun_probe(servers, local_host="127.0.0.1", timeout=0.5)

    results = anyio.run(main, backend=backend)
    assert [r.server for r in results] == servers
    assert [r.error for r in results] == [None, "timeout", None]
    assert results[1].sends == 3
    assert results[0].mapped is not None and results[0].mapped == results[2].mapped  # one socket
    assert all(r.rtt is not None and 0 <= r.rtt < 0.5 for r in (results[0], results[2]))


def test_v4_and_v6_servers_get_a_socket_per_family(relay_stun_port: int) -> None:
    async def main() -> list[StunResult]:
        # The relay listens on 127.0.0.1 only, so [::1] times out, but it is tried from a v6 socket.
        return await stun_probe([("::1", relay_stun_port), ("127.0.0.1", relay_stun_port)], timeout=0.4)

    v6, v4 = anyio.run(main, backend="trio")
    assert v4.mapped is not None and v4.mapped[0] == "127.0.0.1"
    assert v6.error == "timeout" and v6.sends == 3
    # With only a v4 local address, a v6 server cannot be reached at all.

    async def v4_only() -> list[StunResult]:
        return await stun_probe([("::1", relay_stun_port)], local_host="127.0.0.1", timeout=0.4)

    (r,) = anyio.run(v4_only, backend="asyncio")
    assert r.error == "no socket for this address family" and r.sends == 1


async def test_timeout_error_names_the_server_and_the_tries() -> None:
    port = free_ports(1)[0]
    with pytest.raises(stun.StunTimeoutError, match=rf"from 127\.0\.0\.1:{port} after 3 tries in 0\.4 s"):
        await stun_binding(("127.0.0.1", port), timeout=0.4)
