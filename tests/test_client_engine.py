"""client.engine without the lab: ``ip``/``wg`` command lines, ``wg show dump`` parsing, the UAPI
driver over a real UNIX socket, and wireguard-go start-up failures. (The running wireguard-go
backend is tested in the lab: tests/netlab/test_wireguard_go.py. The kernel backend cannot run on
the project's machines: no WireGuard module.)"""

from __future__ import annotations

import base64
import ipaddress
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from client.engine import (
    DEFAULT_MTU,
    EngineError,
    InterfaceConfig,
    WgCommand,
    interface_commands,
    open_wireguard_go,
    parse_wg_dump,
    uapi_get,
    uapi_set,
    wg_set_command,
)
from client.engine._base import check_ifname
from client.engine._kernel import link_add_command
from client.uapi import Endpoint, PeerConfig, SetRequest
from natlib.keys import NodePrivateKey, NodePublicKey

PRIV = NodePrivateKey(bytes(range(32)))
PRIV_B64 = base64.b64encode(PRIV.raw).decode()
PEER = NodePublicKey(bytes([0x11]) * 32)
PEER_B64 = base64.b64encode(PEER.raw).decode()
PEER2 = NodePublicKey(bytes([0x22]) * 32)
PEER2_B64 = base64.b64encode(PEER2.raw).decode()
NET = ipaddress.ip_network


# --- ip -------------------------------------------------------------------------------------------


def test_interface_commands_exact() -> None:
    config = InterfaceConfig(
        addresses=(ipaddress.ip_interface("100.64.0.1/32"), ipaddress.ip_interface("fd7a:115c:a1e0::1/128")),
        routes=(NET("100.64.0.2/32"), NET("10.1.0.0/24")),
    )
    assert DEFAULT_MTU == 1280
    assert interface_commands("mesh0", config) == [
        ["ip", "link", "set", "dev", "mesh0", "mtu", "1280"],
        ["ip", "address", "add", "100.64.0.1/32", "dev", "mesh0"],
        ["ip", "address", "add", "fd7a:115c:a1e0::1/128", "dev", "mesh0", "nodad"],
        ["ip", "link", "set", "dev", "mesh0", "up"],
        ["ip", "route", "replace", "100.64.0.2/32", "dev", "mesh0"],
        ["ip", "route", "replace", "10.1.0.0/24", "dev", "mesh0"],
    ]
    assert interface_commands("x", InterfaceConfig(mtu=1360)) == [
        ["ip", "link", "set", "dev", "x", "mtu", "1360"],
        ["ip", "link", "set", "dev", "x", "up"],
    ]
    with pytest.raises(ValueError, match="MTU 1000 is not in 1280-65535"):
        InterfaceConfig(mtu=1000)


@pytest.mark.parametrize("name", ["", "a" * 16, "bad name", "../x", "-x", "wg/0", "."])
def test_bad_interface_names(name: str) -> None:
    with pytest.raises(EngineError, match="is not a valid interface name"):
        check_ifname(name)


def test_good_interface_names() -> None:
    for name in ("wg0", "a" * 15, "mesh_0", "x.y-z"):
        assert check_ifname(name) == name


# --- wg (kernel backend) --------------------------------------------------------------------------


def test_wg_set_command_incremental() -> None:
    request = SetRequest(
        private_key=PRIV,
        listen_port=41641,
        fwmark=7,
        peers=(
            PeerConfig(
                PEER,
                endpoint=Endpoint.parse("[2001:db8::7]:41641"),
                persistent_keepalive_interval=25,
                replace_allowed_ips=True,
                allowed_ips=(NET("100.64.0.2/32"), NET("fd7a:115c:a1e0::2/128")),
            ),
            PeerConfig(PEER2, remove=True),
        ),
    )
    assert link_add_command("mesh0") == ["ip", "link", "add", "dev", "mesh0", "type", "wireguard"]
    # fmt: off
    expected_argv = (
        "wg", "set", "mesh0",
        "listen-port", "41641",
        "fwmark", "7",
        "private-key", "/dev/stdin",
        "peer", PEER_B64,
        "endpoint", "[2001:db8::7]:41641",
        "persistent-keepalive", "25",
        "allowed-ips", "100.64.0.2/32,fd7a:115c:a1e0::2/128",
        "peer", PEER2_B64, "remove",
    )
    # fmt: on
    assert wg_set_command("mesh0", request) == WgCommand(expected_argv, stdin=PRIV_B64.encode() + b"\n")
    assert "privkey" not in " ".join(wg_set_command("mesh0", request).argv)
    assert PRIV.hex() not in " ".join(wg_set_command("mesh0", request).argv)


def test_wg_set_command_clears_allowed_ips_with_an_empty_list() -> None:
    command = wg_set_command(
        "wg1", SetRequest(peers=(PeerConfig(PEER, replace_allowed_ips=True),)), wg="/usr/bin/wg"
    )
    assert command == WgCommand(("/usr/bin/wg", "set", "wg1", "peer", PEER_B64, "allowed-ips", ""))


def test_wg_setconf_for_replace_peers() -> None:
    request = SetRequest(
        private_key=PRIV,
        listen_port=51820,
        replace_peers=True,
        peers=(
            PeerConfig(
                PEER,
                endpoint=Endpoint.parse("198.51.100.7:41641"),
                persistent_keepalive_interval=0,
                replace_allowed_ips=True,
                allowed_ips=(NET("100.64.0.2/32"), NET("10.1.0.0/24")),
            ),
            PeerConfig(PEER2, remove=True),
        ),
    )
    command = wg_set_command("mesh0", request)
    assert command.argv == ("wg", "setconf", "mesh0", "/dev/stdin")
    assert command.stdin.decode() == (
        "[Interface]\n"
        f"PrivateKey = {PRIV_B64}\n"
        "ListenPort = 51820\n"
        "\n"
        "[Peer]\n"
        f"PublicKey = {PEER_B64}\n"
        "Endpoint = 198.51.100.7:41641\n"
        "PersistentKeepalive = 0\n"
        "AllowedIPs = 100.64.0.2/32, 10.1.0.0/24\n"
    )


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (SetRequest(peers=(PeerConfig(PEER, update_only=True),)), "wg has no update-only mode"),
        (SetRequest(peers=(PeerConfig(PEER, allowed_ips=(NET("10.0.0.0/8"),)),)), "wg set always replaces"),
        (
            SetRequest(replace_peers=True, peers=(PeerConfig(PEER, allowed_ips=(NET("10.0.0.0/8"),)),)),
            "set replace_allowed_ips",
        ),
    ],
)
def test_wg_refuses_what_it_cannot_express(request_: SetRequest, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        wg_set_command("mesh0", request_)


WG_DUMP = (
    f"{PRIV_B64}\t{base64.b64encode(PRIV.public.raw).decode()}\t51820\toff\n"
    f"{PEER_B64}\t(none)\t198.51.100.7:41641\t100.64.0.2/32,fd7a:115c:a1e0::2/128\t1700000000\t5678\t1234\t25\n"
    f"{PEER2_B64}\t(none)\t(none)\t(none)\t0\t0\t0\toff\n"
)


def test_parse_wg_dump() -> None:
    stats = parse_wg_dump(WG_DUMP)
    assert stats.private_key == PRIV
    assert (stats.listen_port, stats.fwmark) == (51820, 0)
    p1, p2 = stats.peers
    assert p1.public_key == PEER
    assert p1.endpoint == Endpoint.parse("198.51.100.7:41641")
    assert p1.allowed_ips == (NET("100.64.0.2/32"), NET("fd7a:115c:a1e0::2/128"))
    assert (p1.last_handshake, p1.rx_bytes, p1.tx_bytes, p1.persistent_keepalive_interval) == (
        1700000000.0,
        5678,
        1234,
        25,
    )
    assert p2.public_key == PEER2
    assert (p2.endpoint, p2.allowed_ips, p2.last_handshake, p2.persistent_keepalive_interval) == (
        None,
        (),
        None,
        0,
    )
    no_key = parse_wg_dump("(none)\t(none)\t0\t0x00000007\n".replace("0x00000007", "7"))
    assert (no_key.private_key, no_key.fwmark, no_key.peers) == (None, 7, ())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty output"),
        ("a\tb\tc\n", "interface line has 3 fields, not 4"),
        (f"(none)\t(none)\t51820\toff\n{PEER_B64}\t(none)\n", "line 2 has 2 fields, not 8"),
        ("!!!\t(none)\t1\toff\n", "private key '!!!' is not base64"),
        ("(none)\t(none)\tport\toff\n", "listen port 'port' is not a number"),
        (
            "(none)\t(none)\t1\toff\nAAAA\t(none)\t(none)\t(none)\t0\t0\t0\toff\n",
            "public key is 3 bytes, not 32",
        ),
        (f"(none)\t(none)\t1\toff\n{PEER_B64}\t(none)\tnowhere\t(none)\t0\t0\t0\toff\n", "endpoint"),
        (
            f"(none)\t(none)\t1\toff\n{PEER_B64}\t(none)\t(none)\t1.2.3.4/40\t0\t0\t0\toff\n",
            "is not a prefix",
        ),
        (f"(none)\t(none)\t1\toff\n{PEER_B64}\t(none)\t(none)\t(none)\t-1\t0\t0\toff\n", "latest handshake"),
    ],
)
def test_parse_wg_dump_rejects_garbage(text: str, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        parse_wg_dump(text)


# --- the UAPI driver over a UNIX socket ----------------------------------------------------------


async def _serve_once(
    path: Path,
    reply: Callable[[trio.SocketStream, bytes], Awaitable[None]],
    task_status: trio.TaskStatus[None],
) -> None:
    """A one-connection UAPI server: reads one request (up to its blank line), then runs ``reply``."""
    with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM) as listener:
        await listener.bind(str(path))
        listener.listen(1)
        task_status.started()
        conn, _ = await listener.accept()
    async with trio.SocketStream(conn) as stream:
        request = b""
        while not request.endswith(b"\n\n"):
            request += await stream.receive_some(4096)
        await reply(stream, request)


async def test_uapi_get_and_set_over_a_socket_with_replies_in_pieces(tmp_path: Path) -> None:
    path = tmp_path / "wg.sock"
    seen: list[bytes] = []
    body = f"listen_port=51820\npublic_key={PEER.hex()}\nrx_bytes=10\nerrno=0\n\n".encode()

    async def reply_in_pieces(stream: trio.SocketStream, request: bytes) -> None:
        seen.append(request)
        for i in range(0, len(body), 7):
            await stream.send_all(body[i : i + 7])
            await trio.testing.wait_all_tasks_blocked()

    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_once, path, reply_in_pieces)
        stats = await uapi_get(path)
    assert seen == [b"get=1\n\n"]
    assert stats.listen_port == 51820
    assert stats.peer(PEER).rx_bytes == 10

    async def accept(stream: trio.SocketStream, request: bytes) -> None:
        seen.append(request)
        await stream.send_all(b"errno=0\n\n")

    path.unlink()
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_once, path, accept)
        await uapi_set(path, SetRequest(listen_port=1))
    assert seen[-1] == b"set=1\nlisten_port=1\n\n"


async def test_uapi_errno_and_truncated_reply(tmp_path: Path) -> None:
    path = tmp_path / "wg.sock"

    async def refuse(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(b"errno=-98\n\n")

    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_once, path, refuse)
        with pytest.raises(Exception, match=r"errno=-98 \(EADDRINUSE") as info:
            await uapi_set(path, SetRequest(listen_port=1))
    assert type(info.value).__name__ == "UapiErrnoError"

    async def hang_up(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(b"listen_port=1\n")

    path.unlink()
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_once, path, hang_up)
        with pytest.raises(Exception, match="connection closed after 14 bytes, mid-reply"):
            await uapi_get(path)


async def test_uapi_no_socket_and_no_reply(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(EngineError, match=r"UAPI get on .*absent\.sock: No such file or directory"):
        await uapi_get(tmp_path / "absent.sock")

    path = tmp_path / "wg.sock"

    async def never_answer(stream: trio.SocketStream, request: bytes) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_once, path, never_answer)
        start = trio.current_time()
        with pytest.raises(EngineError, match=r"UAPI get on .*: no reply within 5\.0 s"):
            await uapi_get(path)
        assert trio.current_time() - start == pytest.approx(5.0)
        nursery.cancel_scope.cancel()


# --- wireguard-go start-up failures (nothing gets created) -----------------------------------------


async def test_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(
        EngineError, match=r"cannot start /nonexistent/wireguard-go: No such file or directory"
    ):
        async with open_wireguard_go("mrtest0", binary="/nonexistent/wireguard-go", socket_dir=tmp_path):
            pytest.fail("the engine cannot be running")


async def test_binary_that_exits_before_its_socket(tmp_path: Path) -> None:
    fake = tmp_path / "fake-wireguard-go"
    fake.write_text('#!/bin/sh\necho "cannot open tun device for $2"\nexit 7\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(EngineError) as info:
        async with open_wireguard_go("mrtest0", binary=str(fake), socket_dir=tmp_path):
            pytest.fail("the engine cannot be running")
    assert str(info.value) == (
        f"wireguard-go for mrtest0 exited (status 7) before creating {tmp_path / 'mrtest0.sock'}: "
        "cannot open tun device for mrtest0"
    )


async def test_bad_interface_name_starts_nothing(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="is not a valid interface name"):
        async with open_wireguard_go("no spaces", binary="/nonexistent", socket_dir=tmp_path):
            pytest.fail("the engine cannot be running")
    assert os.listdir(tmp_path) == []
