"""Curve25519 key types and their text forms.

Tailscale writes keys as a type prefix and 64 lowercase hex digits: ``nodekey:<hex>`` for a node
public key, ``privkey:<hex>`` for a node private key, ``discokey:<hex>`` for a disco public key.
The bare 64 hex digits (the "untyped" form) appear in DERP's ``Derp-Public-Key`` header and in the
meta-certificate's common name.

Keys are small frozen value objects; their ``raw`` bytes are what goes on the wire and what hot
paths (such as the relay's routing table) use as dictionary keys.
"""

from __future__ import annotations

import hmac
from typing import ClassVar, Self

import nacl.bindings
import nacl.utils

__all__ = [
    "KEY_LEN",
    "DiscoPrivateKey",
    "DiscoPublicKey",
    "KeyFormatError",
    "NodePrivateKey",
    "NodePublicKey",
]

KEY_LEN = 32


class KeyFormatError(ValueError):
    """A key's bytes or text form is malformed."""


def _clamp(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


class _Key:
    """32 bytes with a text prefix. Subclasses set ``PREFIX``."""

    __slots__ = ("_raw",)
    PREFIX: ClassVar[str]
    _raw: bytes

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes | bytearray | memoryview) or len(raw) != KEY_LEN:
            raise KeyFormatError(f"{type(self).__name__} needs exactly {KEY_LEN} bytes")
        object.__setattr__(self, "_raw", bytes(raw))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @property
    def raw(self) -> bytes:
        return self._raw

    def hex(self) -> str:
        """The untyped form: 64 lowercase hex digits."""
        return self._raw.hex()

    def text(self) -> str:
        """The typed text form, for example ``nodekey:<hex>``."""
        return f"{self.PREFIX}{self._raw.hex()}"

    @classmethod
    def from_hex(cls, text: str) -> Self:
        """Parse the untyped form (exactly 64 hex digits)."""
        if len(text) != 2 * KEY_LEN:
            raise KeyFormatError(f"expected {2 * KEY_LEN} hex digits, got {len(text)} characters")
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise KeyFormatError(f"not hex: {text!r}") from None

    @classmethod
    def from_text(cls, text: str) -> Self:
        """Parse the typed text form; the prefix must be this type's."""
        text = text.strip()
        if not text.startswith(cls.PREFIX):
            raise KeyFormatError(f"{cls.__name__} text must start with {cls.PREFIX!r}")
        return cls.from_hex(text[len(cls.PREFIX) :])

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Key)
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._raw))

    def __str__(self) -> str:
        return self.text()


class _PublicKey(_Key):
    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.text()!r})"

    def short(self) -> str:
        """An abbreviated form for logs: ``[abcde]`` of the first 5 hex digits, like Tailscale."""
        return f"[{self._raw.hex()[:5]}]"


class _PrivateKey(_Key):
    __slots__ = ()
    PUBLIC_TYPE: ClassVar[type[_PublicKey]]

    def __init__(self, raw: bytes) -> None:
        if isinstance(raw, bytes | bytearray | memoryview) and len(raw) == KEY_LEN:
            raw = _clamp(bytes(raw))
        super().__init__(raw)  # validates type and length

    @classmethod
    def generate(cls) -> Self:
        return cls(nacl.utils.random(KEY_LEN))

    def public_raw(self) -> bytes:
        return nacl.bindings.crypto_scalarmult_base(self._raw)

    def __repr__(self) -> str:
        # Never print private key material.
        return f"{type(self).__name__}(<redacted>)"


class NodePublicKey(_PublicKey):
    """A node's WireGuard public key; DERP addresses clients by it. Text form ``nodekey:<hex>``."""

    __slots__ = ()
    PREFIX = "nodekey:"


class NodePrivateKey(_PrivateKey):
    """A node's private key (clamped). Text form ``privkey:<hex>``."""

    __slots__ = ()
    PREFIX = "privkey:"

    @property
    def public(self) -> NodePublicKey:
        return NodePublicKey(self.public_raw())


class DiscoPublicKey(_PublicKey):
    """A disco public key, separate from the node key. Text form ``discokey:<hex>``."""

    __slots__ = ()
    PREFIX = "discokey:"


class DiscoPrivateKey(_PrivateKey):
    """A disco private key. Text form ``privkey:<hex>`` (Tailscale has no separate prefix)."""

    __slots__ = ()
    PREFIX = "privkey:"

    @property
    def public(self) -> DiscoPublicKey:
        return DiscoPublicKey(self.public_raw())
