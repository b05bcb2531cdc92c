"""Client admission (issue 7 item 2): ``-allow-file`` and ``-verify-client-url``.

Real relays on 127.0.0.1, real DERP clients, and a real admission controller: a small trio + h11
HTTP server answering like headscale's ``/verify``. A refused client sees the connection close
after ClientInfo with no ServerInfo; the metrics say why.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import h11
import pytest
import trio
from derppeer import Peer, RelayHandle
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from relayproc import free_ports, relay_process

from natlib.derp import ClientInfo, RecvPacket
from natlib.keys import NodePrivateKey, NodePublicKey
from relay import RelayServer
from relay._admission import (
    MAX_RESPONSE_BODY,
    VERIFY_URL_TIMEOUT,
    AdmissionPolicy,
    AllowListError,
    load_allow_file,
    verify_client_url,
)
from relay._config import ConfigError, build_flagset, config_from_args
from relay._metrics import build_registry
from relay.cli import main

REFUSED = (ConnectionError, trio.BrokenResourceError, EOFError)

# -- helpers ---------------------------------------------------------------------------------------


def metrics(server: RelayServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(build_registry(server)).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


@asynccontextmanager
async def running_relay(
    nursery: trio.Nursery, admission: AdmissionPolicy, mesh_key: bytes
) -> AsyncIterator[RelayHandle]:
    key = NodePrivateKey.generate()
    server = RelayServer(key, mesh_key=mesh_key, hostname="relay.test", admission=admission)
    bound = await nursery.start(lambda task_status: server.serve_tcp("127.0.0.1", 0, task_status=task_status))
    host, port = bound[0]
    try:
        yield RelayHandle(server, str(host), int(port), key.public)
    finally:
        server.close_all_connections()


def stats_of(handle: RelayHandle) -> RelayServer:
    assert isinstance(handle.relay, RelayServer)
    return handle.relay


async def assert_refused(handle: RelayHandle, key: NodePrivateKey | None = None) -> None:
    with pytest.raises(REFUSED):
        await Peer.connect(handle, key=key)


@dataclass
class Controller:
    """An admission controller: ``answer(request_json)`` → (status, body, delay before answering)."""

    answer: Callable[[dict[str, object]], tuple[int, bytes, float]]
    requests: list[tuple[bytes, bytes, dict[bytes, bytes], dict[str, object]]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/verify"

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            request: h11.Request | None = None
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            obj = json.loads(body)
            self.requests.append((request.method, request.target, dict(request.headers), obj))
            status, answer, delay = self.answer(obj)
            await trio.sleep(delay)
            out = conn.send(
                h11.Response(
                    status_code=status,
                    reason=HTTPStatus(status).phrase,
                    headers=[("Content-Type", "application/json"), ("Content-Length", str(len(answer)))],
                )
            )
            out = (
                (out or b"")
                + (conn.send(h11.Data(data=answer)) or b"")
                + (conn.send(h11.EndOfMessage()) or b"")
            )
            try:
                await stream.send_all(out)
            except trio.BrokenResourceError:
                pass


async def start_controller(
    nursery: trio.Nursery, answer: Callable[[dict[str, object]], tuple[int, bytes, float]]
) -> Controller:
    c = Controller(answer)
    await nursery.start(c.serve)
    return c


def allow_keys(*keys: NodePublicKey) -> Callable[[dict[str, object]], tuple[int, bytes, float]]:
    """headscale's /verify: 200 with {"Allow": true|false}."""
    texts = {k.text() for k in keys}
    return lambda req: (200, json.dumps({"Allow": req["NodePublic"] in texts}).encode(), 0.0)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the allow file --------------------------------------------------------------------------------


def test_allow_file_line_format(tmp_path: Path) -> None:
    a, b = NodePrivateKey.generate().public, NodePrivateKey.generate().public
    f = tmp_path / "allow"
    f.write_text(f"# the office\n{a.text()}\n\n  {b.text()}   # laptop\n{a.text()}\n")
    assert load_allow_file(str(f)) == frozenset({a.raw, b.raw})
    f.write_text(f"{a.text()}\nnodekey:xyz\n")
    with pytest.raises(AllowListError, match=rf"^{f}:2: node key 'nodekey:xyz': "):
        load_allow_file(str(f))
    f.write_text(f"{a.hex()}\n")  # untyped hex: the prefix is required
    with pytest.raises(AllowListError, match=rf"^{f}:1: node key .*must start with 'nodekey:'"):
        load_allow_file(str(f))
    with pytest.raises(AllowListError, match=rf"^{tmp_path / 'missing'}: No such file"):
        load_allow_file(str(tmp_path / "missing"))


def test_allow_file_mesh_toml(tmp_path: Path) -> None:
    a, b = NodePrivateKey.generate().public, NodePrivateKey.generate().public
    f = tmp_path / "mesh.toml"
    f.write_text(
        f'region = "home"\n\n[[node]]\nname = "laptop"\nnode_key = "{a.text()}"\naddr = "10.0.0.2"\n\n'
        f'[[node]]\nname = "phone"\npublic_key = "{b.text()}"\n'
    )
    assert load_allow_file(str(f)) == frozenset({a.raw, b.raw})
    f.write_text(
        f'[[node]]\nname = "laptop"\nnode_key = "{a.text()}"\n\n'
        '[[node]]\nname = "phone"\nnode_key = "nodekey:12"\n'
    )
    with pytest.raises(AllowListError, match=rf"^{f}:7: node 'phone': field 'node_key': expected 64 hex"):
        load_allow_file(str(f))
    f.write_text('[[node]]\nname = "tv"\n')
    with pytest.raises(AllowListError, match=rf'^{f}:2: node \'tv\': field "node_key" is missing'):
        load_allow_file(str(f))
    f.write_text("[[node]\n")
    with pytest.raises(AllowListError, match=rf"^{f}: not valid TOML: .*line 1"):
        load_allow_file(str(f))


def test_reload_keeps_the_old_list_when_the_new_file_is_bad(tmp_path: Path) -> None:
    a, b = NodePrivateKey.generate().public, NodePrivateKey.generate().public
    f = tmp_path / "allow"
    f.write_text(a.text() + "\n")
    policy = AdmissionPolicy(allow_file=str(f))
    assert policy.allowed == {a.raw}
    f.write_text(a.text() + "\n" + b.text() + "\n")
    assert policy.reload() == f"allow file {f}: 2 node keys"
    assert policy.allowed == {a.raw, b.raw}
    f.write_text("garbage\n")
    with pytest.raises(AllowListError, match=":1: node key 'garbage'"):
        policy.reload()
    assert policy.allowed == {a.raw, b.raw}


async def test_allow_file_admits_listed_keys_and_mesh_peers(
    nursery: trio.Nursery, tmp_path: Path, mesh_key: bytes
) -> None:
    a, stranger = NodePrivateKey.generate(), NodePrivateKey.generate()
    f = tmp_path / "allow"
    f.write_text(a.public.text() + "\n")
    async with running_relay(nursery, AdmissionPolicy(allow_file=str(f)), mesh_key) as relay:
        server = stats_of(relay)
        peer_a = await Peer.connect(relay, key=a)
        await assert_refused(relay, stranger)
        await assert_refused(relay)
        # A mesh peer (right mesh key) is never checked; a wrong mesh key is just a stranger.
        mesh = await Peer.connect(relay, info=ClientInfo(mesh_key=mesh_key))
        await peer_a.send(mesh.key, b"admitted")
        got = await mesh.recv()
        assert isinstance(got, RecvPacket) and got.packet == b"admitted"
        assert server.stats.rejected_clients == {"not_in_allow_file": 2}
        assert server.stats.current_connections == 2
        # The URL was not configured: no admission results.
        assert set(server.stats.admission.values()) == {0}
        m = metrics(server)
        assert m[("meshrelay_client_rejections_total", frozenset({("reason", "not_in_allow_file")}))] == 2


async def test_refused_client_gets_no_server_info(
    nursery: trio.Nursery, tmp_path: Path, mesh_key: bytes
) -> None:
    """derper: the connection just closes after ClientInfo (ServerKey was the only frame)."""
    f = tmp_path / "allow"
    f.write_text("")
    async with running_relay(nursery, AdmissionPolicy(allow_file=str(f)), mesh_key) as relay:
        from natlib.derp import ClientConnection

        stream = await trio.open_tcp_stream(relay.host, relay.port)
        async with stream:
            conn = ClientConnection(NodePrivateKey.generate(), server_key=relay.server_key)
            await stream.send_all(
                b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                b"Derp-Fast-Start: 1\r\n\r\n" + conn.data_to_send()
            )
            received = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    received += chunk
        assert received[:1] == b"\x01" and len(received) == 5 + 8 + 32  # ServerKey frame only
        assert stats_of(relay).stats.rejected_clients == {"not_in_allow_file": 1}


# -- verify-client-url -----------------------------------------------------------------------------


async def test_verify_url_allow_and_deny(nursery: trio.Nursery, mesh_key: bytes) -> None:
    good = NodePrivateKey.generate()
    ctl = await start_controller(nursery, allow_keys(good.public))
    async with running_relay(nursery, AdmissionPolicy(verify_url=ctl.url), mesh_key) as relay:
        server = stats_of(relay)
        await Peer.connect(relay, key=good)
        await assert_refused(relay)
        await Peer.connect(relay, info=ClientInfo(mesh_key=mesh_key))  # mesh: not asked
        assert len(ctl.requests) == 2
        method, target, headers, body = ctl.requests[0]
        assert (method, target) == (b"POST", b"/verify")
        assert headers[b"content-type"] == b"application/json"
        assert body == {"NodePublic": good.public.text(), "Source": "127.0.0.1"}
        assert list(body) == ["NodePublic", "Source"]
        assert dict(server.stats.admission) == {"allowed": 1, "denied": 1, "fail_open": 0, "fail_closed": 0}
        assert server.stats.rejected_clients == {"verify_url_denied": 1}
        m = metrics(server)
        assert m[("meshrelay_admission_results_total", frozenset({("result", "denied")}))] == 1
        assert m[("meshrelay_client_rejections_total", frozenset({("reason", "verify_url_denied")}))] == 1


@pytest.mark.parametrize(
    ("status", "body", "why"),
    [
        (403, b'{"Allow":true}', "admission controller: 403 Forbidden"),
        (500, b"", "admission controller: 500"),
        (200, b"{not json", "bad JSON answer"),
        (200, b"[true]", "not a JSON object"),
        (200, b'{"Allow":"yes"}', "denied connection"),
        (200, b"{}", "denied connection"),
        (200, b'{"Allow":true,"pad":"' + b"x" * MAX_RESPONSE_BODY + b'"}', "answer longer than 4096 bytes"),
    ],
)
async def test_verify_url_rejects_anything_but_200_allow_true(
    nursery: trio.Nursery, status: int, body: bytes, why: str
) -> None:
    ctl = await start_controller(nursery, lambda _req: (status, body, 0.0))
    verdict = await verify_client_url(ctl.url, "nodekey:" + "11" * 32, "192.0.2.7")
    assert verdict.status == "deny"
    assert why in verdict.detail
    # ... and fail-open does not apply to answers.
    policy = AdmissionPolicy(verify_url=ctl.url, fail_open=True)
    decision = await policy.check(b"\x11" * 32, "192.0.2.7")
    assert (decision.reject, decision.url_result) == ("verify_url_denied", "denied")


async def test_verify_url_lowercase_allow_and_exactly_4k(nursery: trio.Nursery) -> None:
    """Go decodes field names case-insensitively; 4096 bytes is still allowed."""
    answer = b'{"allow":true}'
    padded = answer[:-1] + b',"p":"' + b"x" * (MAX_RESPONSE_BODY - len(answer) - 7) + b'"}'
    assert len(padded) == MAX_RESPONSE_BODY
    for body in (answer, padded):
        ctl = await start_controller(nursery, lambda _req, body=body: (200, body, 0.0))
        assert (await verify_client_url(ctl.url, "nodekey:" + "22" * 32, "::1")).status == "allow"


@pytest.mark.parametrize("fail_open", [True, False])
async def test_verify_url_timeout_and_unreachable(
    nursery: trio.Nursery, mesh_key: bytes, fail_open: bool
) -> None:
    assert VERIFY_URL_TIMEOUT == 5.0
    slow = await start_controller(nursery, lambda _req: (200, b'{"Allow":true}', 10.0))
    for url in (slow.url, f"http://127.0.0.1:{closed_port()}/verify"):
        policy = AdmissionPolicy(verify_url=url, fail_open=fail_open, url_timeout=0.3)
        async with running_relay(nursery, policy, mesh_key) as relay:
            server = stats_of(relay)
            if fail_open:
                await Peer.connect(relay)
                assert dict(server.stats.admission) == {
                    "allowed": 0,
                    "denied": 0,
                    "fail_open": 1,
                    "fail_closed": 0,
                }
                assert not server.stats.rejected_clients
            else:
                await assert_refused(relay)
                assert dict(server.stats.admission) == {
                    "allowed": 0,
                    "denied": 0,
                    "fail_open": 0,
                    "fail_closed": 1,
                }
                assert server.stats.rejected_clients == {"verify_url_unreachable": 1}


async def test_both_checks_must_pass(nursery: trio.Nursery, tmp_path: Path, mesh_key: bytes) -> None:
    listed_ok, listed_denied, unlisted = (NodePrivateKey.generate() for _ in range(3))
    f = tmp_path / "allow"
    f.write_text(f"{listed_ok.public.text()}\n{listed_denied.public.text()}\n")
    ctl = await start_controller(nursery, allow_keys(listed_ok.public, unlisted.public))
    async with running_relay(
        nursery, AdmissionPolicy(allow_file=str(f), verify_url=ctl.url), mesh_key
    ) as relay:
        server = stats_of(relay)
        await Peer.connect(relay, key=listed_ok)
        await assert_refused(relay, listed_denied)
        await assert_refused(relay, unlisted)  # refused by the file: the URL is not asked
        assert [r[3]["NodePublic"] for r in ctl.requests] == [
            listed_ok.public.text(),
            listed_denied.public.text(),
        ]
        assert server.stats.rejected_clients == {"verify_url_denied": 1, "not_in_allow_file": 1}
        assert server.stats.admission["allowed"] == 1 and server.stats.admission["denied"] == 1


async def test_verify_url_https_with_system_style_trust(nursery: trio.Nursery) -> None:
    """https:// works (the trust store is the SSL context's; tests inject a trustme CA)."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    listeners = await trio.open_ssl_over_tcp_listeners(0, server_ctx, host="127.0.0.1")
    port = listeners[0].transport_listener.socket.getsockname()[1]
    ctl = Controller(lambda _req: (200, b'{"Allow":true}', 0.0))

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        with trio.move_on_after(5):
            await ctl._handle(stream)  # type: ignore[arg-type]

    await nursery.start(trio.serve_listeners, handle, listeners)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    url = f"https://127.0.0.1:{port}/verify"
    verdict = await verify_client_url(url, "nodekey:" + "33" * 32, "127.0.0.1", ssl_context=client_ctx)
    assert verdict.status == "allow"
    # Without the CA (the system store does not know it): a TLS failure is "unreachable".
    verdict = await verify_client_url(
        url, "nodekey:" + "33" * 32, "127.0.0.1", ssl_context=ssl.create_default_context()
    )
    assert verdict.status == "unreachable"


# -- flags and the process -------------------------------------------------------------------------


def test_flags(tmp_path: Path) -> None:
    def cfg(*argv: str) -> object:
        values, given = build_flagset().parse(["-dev", *argv])
        return config_from_args(values, given)

    c = cfg(
        "-verify-client-url",
        "http://127.0.0.1:8080/verify",
        "-verify-client-url-fail-open=false",
        "-allow-file",
        "/x",
    )
    assert (c.verify_client_url, c.verify_client_url_fail_open, c.allow_file) == (  # type: ignore[attr-defined]
        "http://127.0.0.1:8080/verify",
        False,
        "/x",
    )
    with pytest.raises(ConfigError, match="-verify-client-url 'ftp://x/': want an http:// or https:// URL"):
        cfg("-verify-client-url", "ftp://x/")
    with pytest.raises(ConfigError, match="-verify-clients: client verification through a local tailscaled"):
        cfg("-verify-clients")


def test_bad_allow_file_is_a_startup_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "allow"
    bad.write_text("nodekey:00\n")
    argv = ["-a", "127.0.0.1:0", "-c", str(tmp_path / "k"), "-stun=false", "-metrics-addr=off"]
    assert main([*argv, "-allow-file", str(bad)]) == 2
    err = capsys.readouterr().err
    why = "node key 'nodekey:00': expected 64 hex digits, got 2 characters"
    assert err == f"meshrelay: -allow-file {bad}:1: {why}\n"


async def test_sighup_reloads_the_allow_file(tmp_path: Path) -> None:
    a, b = NodePrivateKey.generate(), NodePrivateKey.generate()
    f = tmp_path / "allow.toml"
    f.write_text(f'[[node]]\nname = "a"\nnode_key = "{a.public.text()}"\n')
    port = free_ports()[0]
    args = ["-a", f"127.0.0.1:{port}", "-c", str(tmp_path / "k"), "-stun=false", "-metrics-addr=off"]
    async with relay_process(*args, "-allow-file", str(f)) as proc:
        line = await proc.wait_for("server key nodekey:")
        await proc.wait_for("allow file")
        handle = RelayHandle(None, "127.0.0.1", port, NodePublicKey.from_text(line.rsplit(" ", 1)[1].strip()))
        pa = await Peer.connect(handle, key=a)
        await assert_refused(handle, b)
        await proc.wait_for(f"client {b.public.text()} rejected: not in allow file")
        # A bad edit is logged and changes nothing.
        f.write_text("[[node]]\nnode_key = 1\n")
        assert proc.proc is not None
        os.kill(proc.proc.pid, 1)  # SIGHUP
        await proc.wait_for("allow file not reloaded, keeping the old list")
        await assert_refused(handle, b)
        # Now add b: after SIGHUP the previously refused key connects.
        f.write_text(f'[[node]]\nnode_key = "{a.public.text()}"\n[[node]]\nnode_key = "{b.public.text()}"\n')
        os.kill(proc.proc.pid, 1)
        await proc.wait_for(f"reloaded allow file {f}: 2 node keys")
        pb = await Peer.connect(handle, key=b)
        await pa.send(pb.key, b"hello after SIGHUP")
        got = await pb.recv()
        assert isinstance(got, RecvPacket) and got.packet == b"hello after SIGHUP"
        await pa.aclose()
        await pb.aclose()
    assert proc.returncode == 0
