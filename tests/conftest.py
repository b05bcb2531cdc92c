from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import pytest
import trio
import trustme
from derppeer import RelayHandle, close_all_peers  # tests/ is on sys.path (rootdir conftest)

from natlib.keys import NodePrivateKey
from relay import RelayServer

pytest_plugins = ["natlib.testing.pytest_plugin"]


async def _start_relay(
    nursery: trio.Nursery, server: RelayServer, ssl_context: ssl.SSLContext | None = None
) -> tuple[str, int]:
    bound = await nursery.start(
        lambda task_status: server.serve_tcp("127.0.0.1", 0, ssl_context=ssl_context, task_status=task_status)
    )
    host, port = bound[0]
    return str(host), int(port)


@pytest.fixture
def relay_key() -> NodePrivateKey:
    return NodePrivateKey.generate()


@pytest.fixture
def mesh_key() -> bytes:
    return bytes(range(32))


@pytest.fixture
async def relay_http(
    nursery: trio.Nursery, relay_key: NodePrivateKey, mesh_key: bytes
) -> AsyncIterator[RelayHandle]:
    """A relay on 127.0.0.1 (plain HTTP) with a known mesh key."""
    server = RelayServer(relay_key, mesh_key=mesh_key, hostname="relay.test")
    host, port = await _start_relay(nursery, server)
    yield RelayHandle(server, host, port, relay_key.public)
    await close_all_peers()
    server.close_all_connections()


@pytest.fixture
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def relay_https(
    nursery: trio.Nursery, relay_key: NodePrivateKey, mesh_key: bytes, tls_ca: trustme.CA, tmp_path: object
) -> AsyncIterator[RelayHandle]:
    """A TLS relay whose certificate (for 127.0.0.1) is issued by ``tls_ca``, meta-cert appended."""
    from relay._tls import build_server_context, make_meta_certificate

    cert = tls_ca.issue_cert("127.0.0.1", "relay.test")
    meta_cert_pem, _meta_key_pem = make_meta_certificate(relay_key.public.raw)
    chain_pem = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    ctx = build_server_context(chain_pem, cert.private_key_pem.bytes(), meta_cert_pem)
    server = RelayServer(relay_key, mesh_key=mesh_key, hostname="127.0.0.1")
    host, port = await _start_relay(nursery, server, ctx)
    client_ctx = ssl.create_default_context()
    tls_ca.configure_trust(client_ctx)
    yield RelayHandle(
        server, host, port, relay_key.public, scheme="https", ca=tls_ca, client_ssl_context=client_ctx
    )
    await close_all_peers()
    server.close_all_connections()
