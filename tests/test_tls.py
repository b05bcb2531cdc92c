"""relay._tls: the meta-certificate, manual certificate mode and the server context (derp §4.5)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import ssl
import stat
import warnings
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from natlib.derp._metacert import server_key_from_chain, unverified_peer_chain
from relay._config import ConfigError
from relay._tls import (
    CertificateError,
    build_server_context,
    filter_hostname,
    load_manual_certificate,
    make_meta_certificate,
    served_chain_pem,
    server_context_for_manual_mode,
    sha256_raw_pin,
)
from relay._transport import TLSTransport

DEADLINE = 10.0
SERVER_KEY = bytes.fromhex("5a" * 16 + "0f" * 16)


def load_cert(pem_or_der: bytes) -> x509.Certificate:
    # The meta-certificate's 71-character CN is over X.520's limit: cryptography warns on parse.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if pem_or_der.startswith(b"-----"):
            return x509.load_pem_x509_certificate(pem_or_der)
        return x509.load_der_x509_certificate(pem_or_der)


def common_name(cert: x509.Certificate) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


def der_of(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


# -- a one-connection TLS server on 127.0.0.1 ----------------------------------------------------


class OneShotServer:
    """Accepts connections, runs the rawtls handshake, reads until EOF, closes."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.port = 0
        self.errors: list[BaseException] = []
        self.versions: list[str | None] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with listener:
            await listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            self.port = listener.getsockname()[1]
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self._serve, sock)

    async def _serve(self, sock: trio.socket.SocketType) -> None:
        transport = TLSTransport(sock, self.ctx)
        try:
            with trio.fail_after(DEADLINE):
                await transport.handshake()
                self.versions.append(transport.tls_version)
                buf = memoryview(bytearray(4096))
                while await transport.receive_into(buf):
                    pass
        except (ssl.SSLError, trio.BrokenResourceError) as e:
            self.errors.append(e)
        finally:
            await transport.aclose()


async def start_server(nursery: trio.Nursery, ctx: ssl.SSLContext) -> OneShotServer:
    server = OneShotServer(ctx)
    await nursery.start(server.run)
    return server


async def tls_connect(
    port: int, ctx: ssl.SSLContext, server_hostname: str | None
) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=server_hostname)
    try:
        with trio.fail_after(DEADLINE):
            await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


def insecure_client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


# -- meta-certificate ------------------------------------------------------------------------------


async def test_meta_certificate_fields() -> None:
    before = dt.datetime.now(dt.UTC)
    cert_pem, key_pem = make_meta_certificate(SERVER_KEY)
    after = dt.datetime.now(dt.UTC)
    cert = load_cert(cert_pem)
    assert cert.serial_number == 2
    assert common_name(cert) == "derpkey" + SERVER_KEY.hex()
    assert common_name(cert) == common_name(cert).lower()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cert.issuer == cert.subject  # self-signed
    assert cert.version == x509.Version.v3
    assert len(cert.extensions) == 1
    ext = cert.extensions[0]
    assert isinstance(ext.value, x509.BasicConstraints)
    assert ext.value.ca is False and ext.value.path_length is None
    public = cert.public_key()
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(cert.signature, cert.tbs_certificate_bytes)  # signed by its own key
    private = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert private.public_key().public_bytes_raw() == public.public_bytes_raw()
    slack = dt.timedelta(seconds=5)
    thirty = dt.timedelta(days=30)
    assert before - thirty - slack <= cert.not_valid_before_utc <= after - thirty + slack
    assert before + thirty - slack <= cert.not_valid_after_utc <= after + thirty + slack


async def test_meta_certificate_is_fresh_each_time_and_rejects_bad_keys() -> None:
    a, _ = make_meta_certificate(SERVER_KEY)
    b, _ = make_meta_certificate(SERVER_KEY)
    assert load_cert(a).public_key() != load_cert(b).public_key()
    with pytest.raises(ValueError, match="32 bytes"):
        make_meta_certificate(b"\x01" * 31)


async def test_server_key_from_chain(ca: trustme.CA) -> None:
    leaf_pem = ca.issue_cert("relay.test").cert_chain_pems[0].bytes()
    meta_pem, _ = make_meta_certificate(SERVER_KEY)
    chain = [der_of(leaf_pem), der_of(ca.cert_pem.bytes()), der_of(meta_pem)]
    assert server_key_from_chain(chain) == (SERVER_KEY, 2)
    assert server_key_from_chain(chain[:2]) is None
    assert server_key_from_chain([]) is None
    # Garbage that happens to contain the marker is skipped, not raised.
    assert server_key_from_chain([b"\x30\x03derpkey", b"derpkey" * 20, *chain]) == (SERVER_KEY, 2)


def _cert_with(cn: str, serial: int) -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("cn", "serial", "expected"),
    [
        ("derpkey" + "ab" * 32, 2, (bytes([0xAB]) * 32, 2)),
        ("derpkey" + "ab" * 32, 255, (bytes([0xAB]) * 32, 255)),
        ("derpkey" + "ab" * 32, 256, None),  # serial must fit in 8 bits
        ("derpkey" + "ab" * 31, 2, None),  # short key
        ("derpkey" + "zz" * 32, 2, None),  # not hex
        ("xderpkey" + "ab" * 32, 2, None),
    ],
)
async def test_server_key_from_chain_rules(cn: str, serial: int, expected: tuple[bytes, int] | None) -> None:
    assert server_key_from_chain([_cert_with(cn, serial)]) == expected


async def test_sha256_raw_pin() -> None:
    der = b"\x30\x00"
    pin = sha256_raw_pin(der)
    assert pin == "sha256-raw:" + hashlib.sha256(der).hexdigest()
    assert re.fullmatch(r"sha256-raw:[0-9a-f]{64}", pin)


# -- the served chain and context settings ---------------------------------------------------------


def _issue(ca: trustme.CA, *names: str) -> tuple[bytes, bytes]:
    cert = ca.issue_cert(*names)
    return b"".join(b.bytes() for b in cert.cert_chain_pems), cert.private_key_pem.bytes()


async def test_served_chain_ends_with_meta_certificate_python_client(
    nursery: trio.Nursery, ca: trustme.CA
) -> None:
    chain_pem, key_pem = _issue(ca, "relay.test", "127.0.0.1")
    meta_pem, _ = make_meta_certificate(SERVER_KEY)
    server = await start_server(nursery, build_server_context(chain_pem, key_pem, meta_pem))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    stream = await tls_connect(server.port, client_ctx, "relay.test")
    try:
        assert stream.selected_alpn_protocol() == "http/1.1"
        assert stream.version() == "TLSv1.3"
        chain = unverified_peer_chain(stream._ssl_object)  # the DER chain as sent, leaf first
        if chain is None:
            pytest.skip("this Python cannot show the peer's chain")
        assert chain[0] == der_of(chain_pem)
        assert chain[-1] == der_of(meta_pem)
        assert server_key_from_chain(chain) == (SERVER_KEY, 2)
    finally:
        await stream.aclose()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_served_chain_ends_with_meta_certificate_openssl(nursery: trio.Nursery, ca: trustme.CA) -> None:
    chain_pem, key_pem = _issue(ca, "relay.test")
    meta_pem, _ = make_meta_certificate(SERVER_KEY)
    server = await start_server(nursery, build_server_context(chain_pem, key_pem, meta_pem))
    with trio.fail_after(DEADLINE):
        result = await trio.run_process(
            [
                *("openssl", "s_client", "-connect", f"127.0.0.1:{server.port}"),
                *("-servername", "relay.test", "-showcerts", "-alpn", "http/1.1"),
            ],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = result.stdout.decode()
    pems = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", out, re.DOTALL)
    served = [der_of(p.encode()) for p in pems]
    expected = [der_of(p) for p in served_chain_pem(chain_pem, meta_pem)]
    assert served == expected, out
    assert len(served) == 2
    assert "ALPN protocol: http/1.1" in out
    assert "TLSv1.3" in out


async def test_minimum_version_is_tls12(nursery: trio.Nursery, ca: trustme.CA) -> None:
    chain_pem, key_pem = _issue(ca, "relay.test")
    meta_pem, _ = make_meta_certificate(SERVER_KEY)
    ctx = build_server_context(chain_pem, key_pem, meta_pem)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_RENEGOTIATION


async def test_build_server_context_does_not_touch_inputs_and_checks_them(ca: trustme.CA) -> None:
    chain_pem, key_pem = _issue(ca, "relay.test")
    meta_pem, _ = make_meta_certificate(SERVER_KEY)
    with pytest.raises(CertificateError, match="no PEM certificate"):
        build_server_context(b"", key_pem, meta_pem)
    with pytest.raises(CertificateError, match="meta-certificate"):
        build_server_context(chain_pem, key_pem, meta_pem + meta_pem)
    _, other_key = _issue(ca, "other.test")
    with pytest.raises(CertificateError, match="cannot load"):
        build_server_context(chain_pem, other_key, meta_pem)  # key does not match the leaf
    assert served_chain_pem(chain_pem, meta_pem)[-1].strip() == meta_pem.strip()


# -- SNI ---------------------------------------------------------------------------------------------


async def test_sni_must_match_dns_hostname(nursery: trio.Nursery, ca: trustme.CA) -> None:
    chain_pem, key_pem = _issue(ca, "relay.test", "other.test")
    meta_pem, _ = make_meta_certificate(SERVER_KEY)
    ctx = build_server_context(chain_pem, key_pem, meta_pem, hostname="relay.test")
    server = await start_server(nursery, ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    stream = await tls_connect(server.port, client_ctx, "RELAY.test")  # case-insensitive
    await stream.aclose()
    # Valid certificate for other.test, but that is not the relay's hostname: refused.
    with pytest.raises(trio.BrokenResourceError) as info:
        await tls_connect(server.port, client_ctx, "other.test")
    assert "UNRECOGNIZED_NAME" in str(info.value.__cause__).upper()
    # No SNI at all (derper refuses that too).
    with pytest.raises(trio.BrokenResourceError):
        await tls_connect(server.port, insecure_client_context(), None)


# -- manual certificate mode -----------------------------------------------------------------------


def _write(certdir: Path, stem: str, chain_pem: bytes, key_pem: bytes) -> None:
    certdir.mkdir(parents=True, exist_ok=True)
    (certdir / f"{stem}.crt").write_bytes(chain_pem)
    (certdir / f"{stem}.key").write_bytes(key_pem)


async def test_manual_mode_with_dns_hostname(nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path) -> None:
    chain_pem, key_pem = _issue(ca, "derp.example.com")
    _write(tmp_path, "derp.example.com", chain_pem, key_pem)
    manual = load_manual_certificate(tmp_path, "derp.example.com")
    assert not manual.created and manual.derp_node_json is None
    assert manual.cert_path == tmp_path / "derp.example.com.crt"
    assert manual.leaf_der == der_of(chain_pem)
    ctx = server_context_for_manual_mode(tmp_path, "derp.example.com", SERVER_KEY)
    server = await start_server(nursery, ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    stream = await tls_connect(server.port, client_ctx, "derp.example.com")
    chain = unverified_peer_chain(stream._ssl_object)
    await stream.aclose()
    if chain is not None:
        assert server_key_from_chain(chain) == (SERVER_KEY, 2)


async def test_manual_mode_wildcard_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    chain_pem, key_pem = _issue(ca, "*.example.com")
    _write(tmp_path, "derp.example.com", chain_pem, key_pem)
    assert load_manual_certificate(tmp_path, "derp.example.com").leaf_der == der_of(chain_pem)
    _write(tmp_path, "a.b.example.com", chain_pem, key_pem)
    with pytest.raises(CertificateError, match="not valid for hostname"):
        load_manual_certificate(tmp_path, "a.b.example.com")  # a wildcard covers one label only


async def test_manual_mode_certificate_must_cover_hostname(ca: trustme.CA, tmp_path: Path) -> None:
    chain_pem, key_pem = _issue(ca, "other.example.com")
    _write(tmp_path, "derp.example.com", chain_pem, key_pem)
    with pytest.raises(CertificateError, match=r"derp\.example\.com\.crt is not valid for hostname 'derp"):
        load_manual_certificate(tmp_path, "derp.example.com")


async def test_manual_mode_missing_files_names_the_paths(tmp_path: Path) -> None:
    with pytest.raises(CertificateError) as info:
        load_manual_certificate(tmp_path / "certs", "derp.example.com")
    msg = str(info.value)
    assert str(tmp_path / "certs" / "derp.example.com.crt") in msg
    assert str(tmp_path / "certs" / "derp.example.com.key") in msg
    assert isinstance(info.value, ConfigError)  # the CLI turns it into a one-line error, exit 2
    assert not (tmp_path / "certs").exists()  # nothing created for a DNS name


async def test_manual_mode_missing_key_is_named(ca: trustme.CA, tmp_path: Path) -> None:
    chain_pem, _ = _issue(ca, "derp.example.com")
    (tmp_path / "derp.example.com.crt").write_bytes(chain_pem)
    with pytest.raises(CertificateError, match=re.escape(str(tmp_path / "derp.example.com.key"))):
        load_manual_certificate(tmp_path, "derp.example.com")


async def test_manual_mode_garbage_certificate(tmp_path: Path) -> None:
    _write(tmp_path, "derp.example.com", b"not a certificate\n", b"nor a key\n")
    with pytest.raises(CertificateError, match="no PEM certificate"):
        load_manual_certificate(tmp_path, "derp.example.com")


async def test_manual_mode_hostname_is_filtered(ca: trustme.CA, tmp_path: Path) -> None:
    assert filter_hostname("derp.example.com") == "derp.example.com"
    assert filter_hostname("../../etc/passwd") == "....etcpasswd"
    assert filter_hostname("a b_c:d/e\\f") == "abcdef"
    assert filter_hostname("::1") == "1"
    with pytest.raises(CertificateError, match="hostname"):
        load_manual_certificate(tmp_path, "")
    with pytest.raises(CertificateError, match="usable"):
        load_manual_certificate(tmp_path, "/:/")
    with pytest.raises(CertificateError) as info:
        load_manual_certificate(tmp_path, "../evil")
    assert str(tmp_path / "..evil.crt") in str(info.value)


async def test_manual_mode_ip_creates_self_signed_certificate(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    certdir = tmp_path / "certs"
    caplog.set_level(logging.INFO)
    log = logging.getLogger("relay.test")
    ctx = server_context_for_manual_mode(certdir, "127.0.0.1", SERVER_KEY, log=log)
    crt, key = certdir / "127.0.0.1.crt", certdir / "127.0.0.1.key"
    assert crt.is_file() and key.is_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(certdir.stat().st_mode) == 0o700

    cert = load_cert(crt.read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=364) < lifetime <= dt.timedelta(days=366)

    lines = [r.getMessage() for r in caplog.records if r.name == "relay.test"]
    assert len(lines) == 1
    node = json.loads(lines[0].splitlines()[-1].strip())
    leaf_der = cert.public_bytes(serialization.Encoding.DER)
    assert node == {
        "Name": "custom",
        "RegionID": 900,
        "HostName": "127.0.0.1",
        "CertName": "sha256-raw:" + hashlib.sha256(leaf_der).hexdigest(),
        "IPv4": "127.0.0.1",
    }

    # The pin matches the leaf actually served, and the meta-certificate follows it.
    server = await start_server(nursery, ctx)
    stream = await tls_connect(server.port, insecure_client_context(), None)  # no SNI for an IP
    try:
        served_leaf = stream.getpeercert(binary_form=True)
        assert served_leaf is not None
        assert sha256_raw_pin(served_leaf) == node["CertName"]
        chain = unverified_peer_chain(stream._ssl_object)
        if chain is not None:
            assert server_key_from_chain(chain) == (SERVER_KEY, 2)
    finally:
        await stream.aclose()

    # A second start loads the same files and logs the same pin.
    again = load_manual_certificate(certdir, "127.0.0.1")
    assert not again.created
    assert again.derp_node_json is not None
    assert json.loads(again.derp_node_json)["CertName"] == node["CertName"]


async def test_manual_mode_ipv6_hostname(tmp_path: Path) -> None:
    manual = load_manual_certificate(tmp_path, "::1")
    assert manual.created
    assert manual.cert_path == tmp_path / "1.crt"  # derper's filter drops the colons
    assert manual.derp_node_json is not None
    node = json.loads(manual.derp_node_json)
    assert node["HostName"] == "::1" and node["IPv6"] == "::1" and "IPv4" not in node
    assert oct(os.stat(manual.key_path).st_mode & 0o777) == oct(0o600)


async def test_manual_mode_ip_with_existing_foreign_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    chain_pem, key_pem = _issue(ca, "derp.example.com")
    _write(tmp_path, "192.0.2.1", chain_pem, key_pem)
    with pytest.raises(CertificateError, match=r"not valid for hostname '192\.0\.2\.1'"):
        load_manual_certificate(tmp_path, "192.0.2.1")
