"""``meshrelay``'s command line: derper's flag syntax, key files, errors, and a real ``-dev`` run."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from derppeer import Peer, RelayHandle
from relayproc import relay_process

from natlib import stun
from natlib.keys import NodePublicKey
from relay._config import ConfigError, build_flagset, config_from_args, load_or_create_key
from relay._flags import FlagError, parse_go_duration
from relay.cli import main


def parse(*argv: str) -> tuple[dict[str, object], set[str]]:
    return build_flagset().parse(list(argv))


def test_go_flag_forms() -> None:
    values, given = parse("-a", ":8443", "--hostname=relay.example", "-stun=false", "--dev", "-derp=0")
    assert values["a"] == ":8443"
    assert values["hostname"] == "relay.example"
    assert values["stun"] is False and values["dev"] is True and values["derp"] is False
    assert given == {"a", "hostname", "stun", "dev", "derp"}
    values, _ = parse("-tcp-write-timeout=1m30s", "-http-port", "-1")
    assert values["tcp-write-timeout"] == 90.0
    assert values["http-port"] == -1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-nope"], "flag provided but not defined: -nope"),
        (["-stun-port=abc"], 'invalid value "abc" for flag -stun-port'),
        (["-stun=maybe"], 'invalid value "maybe" for flag -stun'),
        (["-a"], "flag needs an argument: -a"),
        (["positional"], "unexpected argument: positional"),
        (["-tcp-write-timeout=2"], 'invalid value "2" for flag -tcp-write-timeout'),
    ],
)
def test_bad_flags(argv: list[str], message: str) -> None:
    with pytest.raises(FlagError, match=message):
        build_flagset().parse(argv)


def test_go_durations() -> None:
    assert parse_go_duration("0") == 0
    assert parse_go_duration("500ms") == 0.5
    assert parse_go_duration("1h2m3.5s") == 3723.5
    with pytest.raises(ValueError, match="invalid duration"):
        parse_go_duration("5 seconds")


def test_main_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flag provided but not defined: -nope\nUsage of meshrelay:")
    assert main(["-version"]) == 0
    assert "meshrelay" in capsys.readouterr().out
    assert main(["-h"]) == 0
    usage = capsys.readouterr().out
    for flag in ("-a string", "-dev", "-tcp-write-timeout duration", "-mesh-psk-file string"):
        assert flag in usage
    assert "(default 2s)" in usage and '(default ":443")' in usage


def test_unsupported_features_fail_loudly() -> None:
    values, given = parse("-dev", "-verify-clients")
    with pytest.raises(ConfigError, match="-verify-clients: client verification through a local tailscaled"):
        config_from_args(values, given)
    values, given = parse("-a", ":443", "-c", "/tmp/k")
    with pytest.raises(ConfigError, match="-certmode letsencrypt"):
        config_from_args(values, given)


def test_dev_defaults() -> None:
    values, given = parse("-dev")
    cfg = config_from_args(values, given, is_root=False)
    assert (cfg.listen_host, cfg.listen_port, cfg.tls, cfg.stun_port, cfg.key_path) == (
        "",
        3340,
        False,
        3478,
        "",
    )
    values, given = parse("-a", ":8080")
    with pytest.raises(ConfigError, match="-c: no key file"):
        config_from_args(values, given, is_root=False)


def test_manual_certmode_means_tls_on_any_port() -> None:
    values, given = parse("-a", "127.0.0.1:8443", "-certmode", "manual", "-c", "/tmp/x.key")
    cfg = config_from_args(values, given)
    assert cfg.tls and cfg.listen_host == "127.0.0.1" and cfg.listen_port == 8443


def test_key_file_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "derper.key"
    key = load_or_create_key(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"PrivateKey": key.text()}
    assert load_or_create_key(str(path)) == key


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"derper.key:1: not valid JSON"),
        ('{"Other": 1}', r'field "PrivateKey" is missing'),
        ('{\n  "PrivateKey": "nodekey:00"\n}', r'derper.key:2: field "PrivateKey": .*privkey:'),
        ('{"PrivateKey": 5}', r'field "PrivateKey" must be a string'),
    ],
)
def test_bad_key_file_names_file_line_and_field(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "derper.key"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_or_create_key(str(path))


def test_mesh_psk_file_validation(tmp_path: Path) -> None:
    good = tmp_path / "mesh.key"
    good.write_text(("ab" * 32) + "\n")
    values, given = parse("-dev", "-mesh-psk-file", str(good))
    assert config_from_args(values, given).mesh_key == bytes([0xAB] * 32)
    bad = tmp_path / "bad.key"
    bad.write_text("short")
    values, given = parse("-dev", "-mesh-psk-file", str(bad))
    with pytest.raises(ConfigError, match=r"bad.key: invalid mesh key"):
        config_from_args(values, given)


def _port_free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_meshrelay_dev_serves_derp_http_and_stun() -> None:
    """The README's relay command: ``meshrelay -dev`` on :3340 with STUN on :3478."""
    if not (_port_free(3340) and _port_free(3478, socket.SOCK_DGRAM) and _port_free(9380)):
        pytest.skip("ports 3340/3478/9380 are in use on this machine")
    async with relay_process("-dev") as relay:
        line = await relay.wait_for("server key nodekey:")
        server_key = line.rsplit("nodekey:", 1)[1].strip()
        # HTTP: /generate_204 with the challenge echo (what the README shows with curl).
        stream = await trio.open_tcp_stream("127.0.0.1", 3340)
        async with stream:
            await stream.send_all(
                b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: hi\r\n\r\n"
            )
            with trio.fail_after(5):
                resp = b""
                while b"\r\n\r\n" not in resp:
                    resp += await stream.receive_some(4096)
        assert resp.startswith(b"HTTP/1.1 204 No Content\r\n")
        assert b"X-Tailscale-Response: response hi" in resp
        # DERP: two clients exchange a packet.
        handle = RelayHandle(None, "127.0.0.1", 3340, NodePublicKey.from_hex(server_key))
        a = await Peer.connect(handle)
        b = await Peer.connect(handle)
        await a.send(b.key, b"through meshrelay -dev")
        got = await b.recv()
        assert getattr(got, "packet", None) == b"through meshrelay -dev"
        await a.aclose()
        await b.aclose()
        # STUN: a standard RFC 5389 Binding Request gets our address back.
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            txid = os.urandom(12)
            await sock.sendto(stun.binding_request(txid), ("127.0.0.1", 3478))
            with trio.fail_after(5):
                data, _ = await sock.recvfrom(2048)
            assert stun.parse_binding_response(data, txid) == ("127.0.0.1", sock.getsockname()[1])
    assert relay.returncode == 0


def test_listen_address_in_use_is_one_line_exit_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "relay",
                "-a",
                f"127.0.0.1:{port}",
                "-c",
                str(tmp_path / "k"),
                "-stun=false",
                "-metrics-addr=off",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().splitlines()[-1] == "meshrelay: cannot start: [Errno 98] Address already in use"
    )
    assert "Traceback" not in proc.stderr
