"""natlib.derp handshake: ClientInfo/ServerInfo JSON (Go's byte order and omissions, Go's lenient
decoding), the NaCl boxes in both directions, size bounds, and mesh keys (spec §3, §6, §10)."""

from __future__ import annotations

import json

import nacl.bindings
import nacl.public
import pytest

from natlib.derp import (
    MAX_INFO_LEN,
    MESH_KEY_LEN,
    NONCE_LEN,
    PROTOCOL_VERSION,
    ClientInfo,
    HandshakeError,
    ProtocolError,
    ServerInfo,
    open_client_info,
    open_server_info,
    parse_mesh_key,
    seal_client_info,
    seal_server_info,
)
from natlib.keys import NodePrivateKey, NodePublicKey

MESH = bytes(range(32))
MESH_HEX = MESH.hex()  # 000102...1f
TAG_LEN = 16


@pytest.fixture
def server() -> NodePrivateKey:
    return NodePrivateKey.generate()


@pytest.fixture
def client() -> NodePrivateKey:
    return NodePrivateKey.generate()


def _seal_raw(sender: NodePrivateKey, receiver_pub: bytes, plain: bytes) -> bytes:
    """``nonce ‖ box`` built with PyNaCl directly, independent of the code under test."""
    box = nacl.public.Box(nacl.public.PrivateKey(sender.raw), nacl.public.PublicKey(receiver_pub))
    return bytes(box.encrypt(plain))


# -- ClientInfo JSON -----------------------------------------------------------------------------


def test_client_info_json_full_go_order() -> None:
    info = ClientInfo(mesh_key=MESH, version=2, can_ack_pings=True, is_prober=True, app_name="x")
    assert info.to_json() == (
        b'{"meshKey":"'
        + MESH_HEX.encode()
        + b'","version":2,"CanAckPings":true,"IsProber":true,"AppName":"x"}'
    )


@pytest.mark.parametrize(
    ("info", "wire"),
    [
        (ClientInfo(), b'{"version":2,"CanAckPings":true}'),
        (ClientInfo(version=0), b'{"CanAckPings":true}'),
        (ClientInfo(version=0, can_ack_pings=False), b'{"CanAckPings":false}'),
        (ClientInfo(can_ack_pings=False), b'{"version":2,"CanAckPings":false}'),
        (ClientInfo(is_prober=True), b'{"version":2,"CanAckPings":true,"IsProber":true}'),
        (ClientInfo(app_name="tailscaled"), b'{"version":2,"CanAckPings":true,"AppName":"tailscaled"}'),
        (
            ClientInfo(mesh_key=MESH),
            b'{"meshKey":"' + MESH_HEX.encode() + b'","version":2,"CanAckPings":true}',
        ),
        # Go writes non-ASCII as raw UTF-8 ...
        (ClientInfo(app_name="é"), b'{"version":2,"CanAckPings":true,"AppName":"\xc3\xa9"}'),
        # ... and escapes control characters, quotes and backslashes ...
        (ClientInfo(app_name='a"\\\n'), b'{"version":2,"CanAckPings":true,"AppName":"a\\"\\\\\\n"}'),
        # ... and HTML-escapes <, >, & and U+2028/U+2029 (encoding/json's default).
        (
            ClientInfo(app_name="<a&b>\u2028\u2029"),
            b'{"version":2,"CanAckPings":true,"AppName":"\\u003ca\\u0026b\\u003e\\u2028\\u2029"}',
        ),
    ],
)
def test_client_info_json_omissions(info: ClientInfo, wire: bytes) -> None:
    assert info.to_json() == wire
    assert ClientInfo.from_json(wire) == info


def test_client_info_defaults() -> None:
    info = ClientInfo()
    assert info.mesh_key is None
    assert info.version == PROTOCOL_VERSION == 2
    assert info.can_ack_pings is True
    assert info.is_prober is False
    assert info.app_name == ""


def test_client_info_empty_object_decodes() -> None:
    assert ClientInfo.from_json(b"{}") == ClientInfo(
        mesh_key=None, version=0, can_ack_pings=False, is_prober=False, app_name=""
    )


@pytest.mark.parametrize(
    "doc",
    [
        {"MeshKey": MESH_HEX, "Version": 2},
        {"meshKey": MESH_HEX, "version": 2},
        {"MESHKEY": MESH_HEX, "VERSION": 2},
        {"meshkey": MESH_HEX, "vErSiOn": 2},
    ],
)
def test_client_info_case_insensitive_keys(doc: dict[str, object]) -> None:
    info = ClientInfo.from_json(json.dumps(doc).encode())
    assert info.mesh_key == MESH
    assert info.version == 2


def test_client_info_other_fields_case_insensitive() -> None:
    info = ClientInfo.from_json(b'{"canackpings":true,"ISPROBER":true,"appName":"probe"}')
    assert info == ClientInfo(None, 0, True, True, "probe")


def test_client_info_unknown_keys_ignored() -> None:
    info = ClientInfo.from_json(b'{"version":2,"CanAckPings":true,"Future":{"x":[1,2]},"n":null}')
    assert info == ClientInfo(None, 2, True, False, "")


def test_client_info_uppercase_mesh_hex() -> None:
    assert ClientInfo.from_json(json.dumps({"meshKey": MESH_HEX.upper()}).encode()).mesh_key == MESH


@pytest.mark.parametrize(
    "value",
    [
        MESH_HEX[:-1],  # too short
        MESH_HEX[:-2],
        MESH_HEX + "0",  # too long
        MESH_HEX + "00",
        "",
        None,
        "zz" + MESH_HEX[2:],  # not hex
        MESH_HEX[:30] + "  " + MESH_HEX[32:],  # 64 characters, 62 digits
        42,
        [MESH_HEX],
    ],
)
def test_client_info_invalid_mesh_key(value: object) -> None:
    with pytest.raises(HandshakeError, match="invalid mesh key") as ei:
        ClientInfo.from_json(json.dumps({"meshKey": value}).encode())
    assert ei.value.reason == "bad_mesh_key"


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"not json",
        b"[]",
        b"2",
        b'"x"',
        b"null",
        b"{",
        b"\xff\xfe{",
        b'{"version":"2"}',
        b'{"version":2.5}',
        b'{"version":true}',
        b'{"CanAckPings":1}',
        b'{"IsProber":"yes"}',
        b'{"AppName":5}',
        b"[" * 100_000,  # deep nesting: must not escape as RecursionError
        b'{"a":' * 100_000,
    ],
)
def test_client_info_bad_json(wire: bytes) -> None:
    with pytest.raises(HandshakeError) as ei:
        ClientInfo.from_json(wire)
    assert ei.value.reason == "bad_client_info_json"
    assert isinstance(ei.value, ProtocolError)


# -- ServerInfo JSON -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "wire"),
    [
        (ServerInfo(), b'{"version":2}'),
        (ServerInfo(version=0), b"{}"),
        (
            ServerInfo(2, 1000, 65568),
            b'{"version":2,"TokenBucketBytesPerSecond":1000,"TokenBucketBytesBurst":65568}',
        ),
        (ServerInfo(2, token_bucket_bytes_burst=7), b'{"version":2,"TokenBucketBytesBurst":7}'),
        (ServerInfo(2, token_bucket_bytes_per_second=7), b'{"version":2,"TokenBucketBytesPerSecond":7}'),
    ],
)
def test_server_info_json(info: ServerInfo, wire: bytes) -> None:
    assert info.to_json() == wire
    assert ServerInfo.from_json(wire) == info


def test_server_info_decoding_is_lenient() -> None:
    assert ServerInfo.from_json(b"{}") == ServerInfo(0, 0, 0)
    assert ServerInfo.from_json(b'{"Version":2,"tokenbucketbytespersecond":5,"x":[]}') == ServerInfo(2, 5, 0)


@pytest.mark.parametrize(
    "wire", [b"", b"[]", b"nope", b'{"version":"2"}', b'{"TokenBucketBytesBurst":1.5}', b"[" * 100_000]
)
def test_server_info_bad_json(wire: bytes) -> None:
    with pytest.raises(HandshakeError) as ei:
        ServerInfo.from_json(wire)
    assert ei.value.reason == "bad_server_info_json"


# -- boxes ---------------------------------------------------------------------------------------


def test_client_info_seal_open_round_trip(server: NodePrivateKey, client: NodePrivateKey) -> None:
    info = ClientInfo(mesh_key=MESH, is_prober=True, app_name="probe")
    payload = seal_client_info(client, server.public.raw, info)
    assert payload[:32] == client.public.raw
    assert len(payload) == 32 + NONCE_LEN + TAG_LEN + len(info.to_json())
    key, got = open_client_info(server, payload)
    assert key == client.public
    assert isinstance(key, NodePublicKey)
    assert got == info


def test_client_info_layout_is_nacl_box(server: NodePrivateKey, client: NodePrivateKey) -> None:
    """``client pub ‖ nonce(24) ‖ tag(16) ‖ ciphertext``, opened here with libsodium directly."""
    info = ClientInfo(app_name="x")
    payload = seal_client_info(client, server.public.raw, info)
    nonce, boxed = payload[32 : 32 + NONCE_LEN], payload[32 + NONCE_LEN :]
    plain = nacl.bindings.crypto_box_open(boxed, nonce, client.public.raw, server.raw)
    assert plain == info.to_json()


def test_client_info_nonces_are_random(server: NodePrivateKey, client: NodePrivateKey) -> None:
    a = seal_client_info(client, server.public.raw, ClientInfo())
    b = seal_client_info(client, server.public.raw, ClientInfo())
    assert a[32 : 32 + NONCE_LEN] != b[32 : 32 + NONCE_LEN]
    assert a != b


def test_client_info_opens_box_built_independently(server: NodePrivateKey, client: NodePrivateKey) -> None:
    doc = b'{"MeshKey":"' + MESH_HEX.encode() + b'","Version":2}'
    payload = client.public.raw + _seal_raw(client, server.public.raw, doc)
    key, info = open_client_info(server, payload)
    assert key == client.public
    assert info.mesh_key == MESH
    assert info.version == 2


def test_client_info_sealed_to_wrong_server(server: NodePrivateKey, client: NodePrivateKey) -> None:
    other = NodePrivateKey.generate()
    payload = seal_client_info(client, other.public.raw, ClientInfo())
    with pytest.raises(HandshakeError) as ei:
        open_client_info(server, payload)
    assert ei.value.reason == "bad_client_info_box"


def test_client_info_wrong_claimed_client_key(server: NodePrivateKey, client: NodePrivateKey) -> None:
    payload = seal_client_info(client, server.public.raw, ClientInfo())
    forged = NodePrivateKey.generate().public.raw + payload[32:]
    with pytest.raises(HandshakeError) as ei:
        open_client_info(server, forged)
    assert ei.value.reason == "bad_client_info_box"


@pytest.mark.parametrize("index", [32, 32 + NONCE_LEN, 32 + NONCE_LEN + TAG_LEN, -1])
def test_client_info_tampered(server: NodePrivateKey, client: NodePrivateKey, index: int) -> None:
    payload = bytearray(seal_client_info(client, server.public.raw, ClientInfo()))
    payload[index] ^= 0x01
    with pytest.raises(HandshakeError) as ei:
        open_client_info(server, bytes(payload))
    assert ei.value.reason == "bad_client_info_box"


@pytest.mark.parametrize("n", [0, 31, 32, 55])
def test_client_info_too_short(server: NodePrivateKey, n: int) -> None:
    with pytest.raises(HandshakeError) as ei:
        open_client_info(server, bytes(n))
    assert ei.value.reason == "short_client_info"


@pytest.mark.parametrize("extra", [0, TAG_LEN - 1])
def test_client_info_box_too_short_for_tag(
    server: NodePrivateKey, client: NodePrivateKey, extra: int
) -> None:
    payload = client.public.raw + bytes(NONCE_LEN + extra)
    with pytest.raises(HandshakeError) as ei:
        open_client_info(server, payload)
    assert ei.value.reason == "bad_client_info_box"


def test_client_info_low_order_client_key(server: NodePrivateKey) -> None:
    """An all-zero (low-order) client key makes libsodium refuse: still a HandshakeError."""
    with pytest.raises(HandshakeError) as ei:
        open_client_info(server, bytes(32) + bytes(NONCE_LEN + TAG_LEN + 2))
    assert ei.value.reason == "bad_client_info_box"


def test_client_info_box_with_bad_json(server: NodePrivateKey, client: NodePrivateKey) -> None:
    payload = client.public.raw + _seal_raw(client, server.public.raw, b"not json")
    with pytest.raises(HandshakeError) as ei:
        open_client_info(server, payload)
    assert ei.value.reason == "bad_client_info_json"
    payload = client.public.raw + _seal_raw(client, server.public.raw, b'{"meshKey":""}')
    with pytest.raises(HandshakeError, match="invalid mesh key"):
        open_client_info(server, payload)


def test_seal_client_info_to_low_order_server_key(client: NodePrivateKey) -> None:
    with pytest.raises(HandshakeError):
        seal_client_info(client, bytes(32), ClientInfo())


def test_server_info_seal_open_round_trip(server: NodePrivateKey, client: NodePrivateKey) -> None:
    for info in (ServerInfo(), ServerInfo(2, 10, 20), ServerInfo(0)):
        sealed = seal_server_info(server, client.public.raw, info)
        assert len(sealed) == NONCE_LEN + TAG_LEN + len(info.to_json())
        assert open_server_info(client, server.public.raw, sealed) == info
        plain = nacl.bindings.crypto_box_open(
            sealed[NONCE_LEN:], sealed[:NONCE_LEN], server.public.raw, client.raw
        )
        assert plain == info.to_json()


def test_server_info_wrong_key(server: NodePrivateKey, client: NodePrivateKey) -> None:
    other = NodePrivateKey.generate()
    sealed = seal_server_info(other, client.public.raw, ServerInfo())
    with pytest.raises(HandshakeError) as ei:
        open_server_info(client, server.public.raw, sealed)
    assert ei.value.reason == "bad_server_info_box"
    sealed = seal_server_info(server, other.public.raw, ServerInfo())
    with pytest.raises(HandshakeError) as ei:
        open_server_info(client, server.public.raw, sealed)
    assert ei.value.reason == "bad_server_info_box"


def test_server_info_box_length_bounds(server: NodePrivateKey, client: NodePrivateKey) -> None:
    with pytest.raises(HandshakeError) as ei:
        open_server_info(client, server.public.raw, bytes(NONCE_LEN - 1))
    assert ei.value.reason == "bad_server_info_len"
    with pytest.raises(HandshakeError) as ei:
        open_server_info(client, server.public.raw, b"")
    assert ei.value.reason == "bad_server_info_len"
    # Exactly 24 bytes passes the length check (and then fails to open).
    with pytest.raises(HandshakeError) as ei:
        open_server_info(client, server.public.raw, bytes(NONCE_LEN))
    assert ei.value.reason == "bad_server_info_box"
    # Exactly 24 + 1 MiB is accepted: a JSON document padded with whitespace.
    doc = b'{"version":2}'
    doc += b" " * (MAX_INFO_LEN - TAG_LEN - len(doc))
    sealed = _seal_raw(server, client.public.raw, doc)
    assert len(sealed) == NONCE_LEN + MAX_INFO_LEN
    assert open_server_info(client, server.public.raw, sealed) == ServerInfo(2)
    # One byte more is rejected before any crypto.
    sealed = _seal_raw(server, client.public.raw, doc + b" ")
    with pytest.raises(HandshakeError) as ei:
        open_server_info(client, server.public.raw, sealed)
    assert ei.value.reason == "bad_server_info_len"


def test_server_info_box_with_bad_json(server: NodePrivateKey, client: NodePrivateKey) -> None:
    sealed = _seal_raw(server, client.public.raw, b'{"version":"two"}')
    with pytest.raises(HandshakeError) as ei:
        open_server_info(client, server.public.raw, sealed)
    assert ei.value.reason == "bad_server_info_json"


# -- mesh keys -----------------------------------------------------------------------------------


def test_mesh_key_len() -> None:
    assert MESH_KEY_LEN == 32


@pytest.mark.parametrize(
    "text",
    [MESH_HEX, MESH_HEX.upper(), f"  {MESH_HEX}\n", f"\t{MESH_HEX}\r\n", f"{MESH_HEX}\n\n"],
)
def test_parse_mesh_key(text: str) -> None:
    assert parse_mesh_key(text) == MESH


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        MESH_HEX[:-1],
        MESH_HEX + "0",
        MESH_HEX * 2,
        "g" + MESH_HEX[1:],
        MESH_HEX[:30] + "  " + MESH_HEX[32:],
        MESH_HEX[:32] + " " + MESH_HEX[33:],
        "0x" + MESH_HEX[2:],
        "é" + MESH_HEX[1:],
    ],
)
def test_parse_mesh_key_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid mesh key"):
        parse_mesh_key(text)


def test_has_mesh_key() -> None:
    other = bytes(range(1, 33))
    assert ClientInfo(mesh_key=None).has_mesh_key(MESH) is False
    assert ClientInfo(mesh_key=None).has_mesh_key(None) is False
    assert ClientInfo(mesh_key=MESH).has_mesh_key(None) is False
    assert ClientInfo(mesh_key=MESH).has_mesh_key(other) is False
    assert ClientInfo(mesh_key=MESH).has_mesh_key(MESH[:31]) is False
    assert ClientInfo(mesh_key=MESH).has_mesh_key(MESH) is True
    assert ClientInfo(mesh_key=MESH).has_mesh_key(bytes(MESH)) is True
    # An empty server key never matches, not even an empty client key.
    assert ClientInfo(mesh_key=MESH).has_mesh_key(b"") is False
    assert ClientInfo(mesh_key=b"").has_mesh_key(b"") is False


def test_has_mesh_key_after_decode() -> None:
    info = ClientInfo.from_json(json.dumps({"MeshKey": MESH_HEX}).encode())
    assert info.has_mesh_key(MESH)
    assert not ClientInfo.from_json(b"{}").has_mesh_key(MESH)
