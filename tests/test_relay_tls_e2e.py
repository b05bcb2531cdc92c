"""The acceptance path for operators: ``meshrelay -certmode manual`` with an IP hostname, as a real
process; our own DERP clients exchange packets through it over TLS and over WebSocket (wss)."""

from __future__ import annotations

import hashlib
import json
import ssl
from pathlib import Path

import trio
from relayproc import free_ports, relay_process

from natlib.derp import RecvPacket
from natlib.derphttp import connect
from natlib.keys import NodePrivateKey


async def test_manual_cert_ip_relay_end_to_end(tmp_path: Path) -> None:
    port = free_ports()[0]
    certdir = tmp_path / "certs"
    argv = [
        "-a",
        f"127.0.0.1:{port}",
        "-certmode",
        "manual",
        "-certdir",
        str(certdir),
        "-hostname",
        "127.0.0.1",
        "-c",
        str(tmp_path / "derper.key"),
        "-http-port",
        "-1",
        "-stun=false",
        "-metrics-addr=off",
    ]
    async with relay_process(*argv) as relay:
        await relay.wait_for("serving DERP on https://")
        pinned = [ln for ln in relay.lines if ln.strip().startswith("{") and "sha256-raw:" in ln]
        assert pinned, "no DERPNode JSON line with the certificate pin was logged"
        node_json = json.loads(pinned[0])
        der = ssl.PEM_cert_to_DER_cert(
            (certdir / "127.0.0.1.crt").read_text().split("-----END CERTIFICATE-----")[0]
            + "-----END CERTIFICATE-----\n"
        )
        assert node_json["CertName"] == "sha256-raw:" + hashlib.sha256(der).hexdigest()
        assert node_json["HostName"] == "127.0.0.1"
        assert (certdir / "127.0.0.1.key").stat().st_mode & 0o777 == 0o600

        ctx = ssl.create_default_context(cafile=str(certdir / "127.0.0.1.crt"))
        a_key, b_key = NodePrivateKey.generate(), NodePrivateKey.generate()
        async with (
            await connect(f"https://127.0.0.1:{port}/derp", a_key, ssl_context=ctx) as a,
            await connect(f"wss://127.0.0.1:{port}/derp", b_key, ssl_context=ctx) as b,
        ):
            await a.send(b_key.public, b"tls to websocket")
            with trio.fail_after(5):
                assert await b.receive() == RecvPacket(a_key.public.raw, b"tls to websocket")
            await b.send(a_key.public, b"and back")
            with trio.fail_after(5):
                assert await a.receive() == RecvPacket(b_key.public.raw, b"and back")
        # The key file is derper's format and is reused on restart.
        saved = json.loads((tmp_path / "derper.key").read_text())
        assert saved["PrivateKey"].startswith("privkey:")
    assert relay.returncode == 0
