"""The DERP handshake: NaCl-boxed ClientInfo and ServerInfo (spec §3).

Flow, written down once::

    server                                   client
      ServerKey(magic ‖ server pub)  ──────►
                                     ◄──────  ClientInfo(client pub ‖ nonce ‖ box(JSON))
      (open the box with server priv + client pub, check mesh key, admit, register)
      ServerInfo(nonce ‖ box({"version":2})) ──────►
      ... packets ...

With fast start the client already knows the server key (meta-certificate or configuration) and
sends ClientInfo without waiting; the server still sends ServerKey first and the client skips it.

A box is ``crypto_box`` (Curve25519, XSalsa20-Poly1305) with a random 24-byte nonce, encoded as
``nonce(24) ‖ tag(16) ‖ ciphertext`` — PyNaCl's ``Box.encrypt`` output, byte-compatible with Go's
``box.Seal`` after the nonce.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.public

from ..keys import NodePrivateKey, NodePublicKey
from ._errors import HandshakeError
from ._frames import KEY_LEN, MAX_INFO_LEN, NONCE_LEN, PROTOCOL_VERSION

__all__ = [
    "MESH_KEY_LEN",
    "ClientInfo",
    "ServerInfo",
    "open_client_info",
    "open_server_info",
    "parse_mesh_key",
    "seal_client_info",
    "seal_server_info",
]

MESH_KEY_LEN = 32

# Go's encoding/json HTML-escapes these inside strings (json.Marshal's default).
_GO_JSON_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def parse_mesh_key(text: str) -> bytes:
    """A mesh key: exactly 64 hex digits after trimming whitespace (spec §6)."""
    t = text.strip()
    if len(t) != 2 * MESH_KEY_LEN:
        raise ValueError(f"invalid mesh key: want {2 * MESH_KEY_LEN} hex digits, got {len(t)} characters")
    try:
        key = bytes.fromhex(t)
    except ValueError:
        raise ValueError("invalid mesh key: not hex") from None
    if len(key) != MESH_KEY_LEN:  # bytes.fromhex skips whitespace between digit pairs
        raise ValueError("invalid mesh key: not hex")
    return key


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What a client tells the server about itself, inside the ClientInfo box."""

    mesh_key: bytes | None = None
    version: int = PROTOCOL_VERSION
    can_ack_pings: bool = True
    is_prober: bool = False
    app_name: str = ""

    def to_json(self) -> bytes:
        """Go's encoding, key order and omissions included (compact, no spaces)."""
        obj: dict[str, Any] = {}
        if self.mesh_key is not None:
            obj["meshKey"] = self.mesh_key.hex()
        if self.version:
            obj["version"] = self.version
        obj["CanAckPings"] = self.can_ack_pings
        if self.is_prober:
            obj["IsProber"] = True
        if self.app_name:
            obj["AppName"] = self.app_name
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        return text.translate(_GO_JSON_ESCAPES).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ClientInfo:
        """Decode as Go does: keys match case-insensitively, unknown keys are ignored.

        ``meshKey`` must be exactly 64 hex digits when present (``""`` and ``null`` are errors).
        """
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise HandshakeError("bad_client_info_json", f"ClientInfo is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise HandshakeError("bad_client_info_json", "ClientInfo JSON is not an object")
        fields: dict[str, Any] = {k.lower(): v for k, v in obj.items()}
        mesh_key: bytes | None = None
        if "meshkey" in fields:
            mk = fields["meshkey"]
            if not isinstance(mk, str):
                raise HandshakeError("bad_mesh_key", "invalid mesh key")
            try:
                mesh_key = parse_mesh_key(mk)
            except ValueError as e:
                raise HandshakeError("bad_mesh_key", str(e)) from None
        version = fields.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise HandshakeError("bad_client_info_json", "ClientInfo version is not an integer")
        flags = {}
        for name in ("canackpings", "isprober"):
            v = fields.get(name, False)
            if not isinstance(v, bool):
                raise HandshakeError("bad_client_info_json", f"ClientInfo {name} is not a boolean")
            flags[name] = v
        app = fields.get("appname", "")
        if not isinstance(app, str):
            raise HandshakeError("bad_client_info_json", "ClientInfo AppName is not a string")
        return cls(mesh_key, version, flags["canackpings"], flags["isprober"], app)

    def has_mesh_key(self, server_mesh_key: bytes | None) -> bool:
        """Constant-time mesh key check; an absent key on either side never matches."""
        if not server_mesh_key or self.mesh_key is None:
            return False
        return hmac.compare_digest(self.mesh_key, server_mesh_key)


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the server tells the client, inside the ServerInfo box.

    The token bucket fields are part of the protocol but Go's server never sets them.
    """

    version: int = PROTOCOL_VERSION
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0

    def to_json(self) -> bytes:
        obj: dict[str, Any] = {}
        if self.version:
            obj["version"] = self.version
        if self.token_bucket_bytes_per_second:
            obj["TokenBucketBytesPerSecond"] = self.token_bucket_bytes_per_second
        if self.token_bucket_bytes_burst:
            obj["TokenBucketBytesBurst"] = self.token_bucket_bytes_burst
        return json.dumps(obj, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ServerInfo:
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise HandshakeError("bad_server_info_json", f"ServerInfo is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise HandshakeError("bad_server_info_json", "ServerInfo JSON is not an object")
        fields = {k.lower(): v for k, v in obj.items()}
        vals = []
        for name in ("version", "tokenbucketbytespersecond", "tokenbucketbytesburst"):
            v = fields.get(name, 0)
            if not isinstance(v, int) or isinstance(v, bool):
                raise HandshakeError("bad_server_info_json", f"ServerInfo {name} is not an integer")
            vals.append(v)
        return cls(*vals)


def _box(priv: NodePrivateKey, pub: bytes) -> nacl.public.Box:
    return nacl.public.Box(nacl.public.PrivateKey(priv.raw), nacl.public.PublicKey(pub))


def seal_client_info(client: NodePrivateKey, server_public: bytes, info: ClientInfo) -> bytes:
    """The ClientInfo frame payload: ``client pub ‖ nonce ‖ box(JSON)``."""
    try:
        box = _box(client, server_public)
    except (nacl.exceptions.CryptoError, ValueError):  # e.g. a low-order server key
        raise HandshakeError("bad_server_key", "server public key is unusable") from None
    return client.public.raw + bytes(box.encrypt(info.to_json()))


def open_client_info(server: NodePrivateKey, payload: bytes) -> tuple[NodePublicKey, ClientInfo]:
    """Server side: authenticate and decode a ClientInfo payload."""
    if len(payload) < KEY_LEN + NONCE_LEN:
        raise HandshakeError("short_client_info", f"ClientInfo of {len(payload)} bytes")
    client_pub = payload[:KEY_LEN]
    try:
        plain = _box(server, client_pub).decrypt(payload[KEY_LEN:])
    except (nacl.exceptions.CryptoError, ValueError):
        raise HandshakeError("bad_client_info_box", "ClientInfo box did not open") from None
    return NodePublicKey(client_pub), ClientInfo.from_json(plain)


def seal_server_info(server: NodePrivateKey, client_public: bytes, info: ServerInfo) -> bytes:
    """The ServerInfo frame payload: ``nonce ‖ box(JSON)``."""
    return bytes(_box(server, client_public).encrypt(info.to_json()))


def open_server_info(client: NodePrivateKey, server_public: bytes, payload: bytes) -> ServerInfo:
    """Client side: the box must be 24 .. 24 + 1 MiB bytes and open with our key."""
    if not NONCE_LEN <= len(payload) <= NONCE_LEN + MAX_INFO_LEN:
        raise HandshakeError("bad_server_info_len", f"ServerInfo of {len(payload)} bytes")
    try:
        plain = _box(client, server_public).decrypt(payload)
    except (nacl.exceptions.CryptoError, ValueError):
        raise HandshakeError("bad_server_info_box", "ServerInfo box did not open") from None
    return ServerInfo.from_json(plain)
