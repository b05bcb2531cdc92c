"""natlib.keys: text forms, validation, clamping, public-key derivation and value semantics."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from natlib.keys import (
    KEY_LEN,
    DiscoPrivateKey,
    DiscoPublicKey,
    KeyFormatError,
    NodePrivateKey,
    NodePublicKey,
)

# RFC 7748 §6.1 (X25519 Diffie-Hellman test vector).
ALICE_PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUB = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIV = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUB = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")

HEX = "00112233445566778899aabbccddeeff" * 2
RAW = bytes.fromhex(HEX)

PUBLIC_TYPES = [(NodePublicKey, "nodekey:"), (DiscoPublicKey, "discokey:")]
ALL_TYPES = [*PUBLIC_TYPES, (NodePrivateKey, "privkey:"), (DiscoPrivateKey, "privkey:")]


def _clamp(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


# -- text forms ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "prefix"), PUBLIC_TYPES)
def test_public_text_round_trip(cls: type[NodePublicKey | DiscoPublicKey], prefix: str) -> None:
    k = cls(RAW)
    assert k.raw == RAW
    assert k.hex() == HEX
    assert k.text() == prefix + HEX
    assert str(k) == prefix + HEX
    assert cls.from_text(k.text()) == k
    assert cls.from_hex(k.hex()) == k


@pytest.mark.parametrize("cls", [NodePrivateKey, DiscoPrivateKey])
def test_private_text_round_trip(cls: type[NodePrivateKey | DiscoPrivateKey]) -> None:
    k = cls.generate()
    assert k.text() == "privkey:" + k.hex()
    assert k.text().startswith("privkey:")
    assert len(k.hex()) == 64
    assert k.hex() == k.hex().lower()
    back = cls.from_text(k.text())
    assert back == k
    assert back.raw == k.raw
    assert cls.from_hex(k.hex()) == k


def test_known_text_forms() -> None:
    assert NodePublicKey(ALICE_PUB).text() == (
        "nodekey:8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert DiscoPublicKey(BOB_PUB).text() == (
        "discokey:de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    )


def test_uppercase_hex_is_accepted_and_normalised() -> None:
    k = NodePublicKey.from_text("nodekey:" + HEX.upper())
    assert k.raw == RAW
    assert k.text() == "nodekey:" + HEX


@pytest.mark.parametrize(
    ("cls", "text"),
    [
        (NodePublicKey, "discokey:" + HEX),
        (NodePublicKey, "privkey:" + HEX),
        (NodePublicKey, HEX),  # the untyped form is not the text form
        (NodePublicKey, "NODEKEY:" + HEX),
        (NodePublicKey, "nodekey" + HEX),
        (DiscoPublicKey, "nodekey:" + HEX),
        (NodePrivateKey, "nodekey:" + HEX),
        (DiscoPrivateKey, "discokey:" + HEX),
    ],
)
def test_wrong_prefix(cls: type[NodePublicKey], text: str) -> None:
    with pytest.raises(KeyFormatError):
        cls.from_text(text)


@pytest.mark.parametrize(("cls", "prefix"), ALL_TYPES)
@pytest.mark.parametrize("digits", ["", "00", HEX[:-1], HEX[:-2], HEX + "0", HEX + "00", HEX * 2])
def test_wrong_length(cls: type[NodePublicKey], prefix: str, digits: str) -> None:
    with pytest.raises(KeyFormatError):
        cls.from_text(prefix + digits)
    with pytest.raises(KeyFormatError):
        cls.from_hex(digits)


@pytest.mark.parametrize(("cls", "prefix"), ALL_TYPES)
@pytest.mark.parametrize(
    "digits",
    [
        "g" + HEX[1:],
        HEX[:-1] + "z",
        HEX[:10] + " " + HEX[11:],
        HEX[:2] + " " + HEX[2:-1],  # 64 characters but a space inside
        HEX[:30] + "  " + HEX[32:],  # 64 characters, 62 digits: bytes.fromhex would give 31 bytes
        "é" + HEX[1:],
        "0x" + HEX[2:],
        "-" + HEX[1:],
    ],
)
def test_not_hex(cls: type[NodePublicKey], prefix: str, digits: str) -> None:
    with pytest.raises(KeyFormatError):
        cls.from_text(prefix + digits)
    with pytest.raises(KeyFormatError):
        cls.from_hex(digits)


def test_key_format_error_is_a_value_error() -> None:
    assert issubclass(KeyFormatError, ValueError)


@pytest.mark.parametrize(("cls", "prefix"), ALL_TYPES)
@pytest.mark.parametrize("raw", [b"", bytes(31), bytes(33), bytes(64)])
def test_wrong_raw_length(cls: type[NodePublicKey], prefix: str, raw: bytes) -> None:
    with pytest.raises(KeyFormatError):
        cls(raw)


def test_raw_accepts_bytearray_and_memoryview() -> None:
    assert NodePublicKey(bytearray(RAW)) == NodePublicKey(RAW)
    assert NodePublicKey(memoryview(RAW)) == NodePublicKey(RAW)
    assert type(NodePublicKey(bytearray(RAW)).raw) is bytes


@pytest.mark.parametrize("cls", [NodePublicKey, DiscoPublicKey, NodePrivateKey, DiscoPrivateKey])
@pytest.mark.parametrize("raw", ["x" * 32, HEX, 32, None, [0] * 32])
def test_raw_must_be_bytes(cls: type[NodePublicKey], raw: object) -> None:
    with pytest.raises(KeyFormatError):
        cls(raw)  # type: ignore[arg-type]


# -- clamping and derivation ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", [NodePrivateKey, DiscoPrivateKey])
def test_private_keys_are_clamped(cls: type[NodePrivateKey | DiscoPrivateKey]) -> None:
    k = cls(b"\xff" * 32)
    assert k.raw[0] == 0xF8
    assert k.raw[1:31] == b"\xff" * 30
    assert k.raw[31] == 0x7F
    z = cls(bytes(32))
    assert z.raw == bytes(31) + b"\x40"
    assert cls(ALICE_PRIV).raw == _clamp(ALICE_PRIV)
    # Text parsing clamps too, and an unclamped and a clamped form are the same key.
    assert cls.from_text("privkey:" + "ff" * 32).raw == k.raw
    assert cls(b"\xff" * 32) == cls(_clamp(b"\xff" * 32))


@pytest.mark.parametrize("cls", [NodePrivateKey, DiscoPrivateKey])
def test_generated_keys_are_clamped_and_distinct(cls: type[NodePrivateKey | DiscoPrivateKey]) -> None:
    keys = [cls.generate() for _ in range(20)]
    for k in keys:
        assert len(k.raw) == KEY_LEN
        assert k.raw == _clamp(k.raw)
    assert len({k.raw for k in keys}) == len(keys)


def test_public_keys_are_not_clamped() -> None:
    raw = b"\xff" * 32
    assert NodePublicKey(raw).raw == raw
    assert DiscoPublicKey(raw).raw == raw


def test_rfc7748_public_derivation() -> None:
    alice = NodePrivateKey(ALICE_PRIV)
    assert alice.public == NodePublicKey(ALICE_PUB)
    assert alice.public_raw() == ALICE_PUB
    bob = DiscoPrivateKey(BOB_PRIV)
    assert bob.public == DiscoPublicKey(BOB_PUB)
    assert type(alice.public) is NodePublicKey
    assert type(bob.public) is DiscoPublicKey


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_derivation_matches_cryptography(raw: bytes) -> None:
    """X25519 clamps internally, so the public key of the clamped and the unclamped scalar agree."""
    expected = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    assert NodePrivateKey(raw).public.raw == expected
    assert DiscoPrivateKey(raw).public.raw == expected


# -- value semantics -----------------------------------------------------------------------------


def test_equality_and_hash() -> None:
    a, b = NodePublicKey(RAW), NodePublicKey(bytes(RAW))
    assert a == b
    assert not a != b  # noqa: SIM202 (__ne__ is exercised on purpose)
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert {a: 1}[b] == 1
    assert a != NodePublicKey(bytes(32))
    # Same bytes, different type: never equal.
    assert a != DiscoPublicKey(RAW)
    assert NodePrivateKey(ALICE_PRIV) != DiscoPrivateKey(ALICE_PRIV)
    assert len({NodePublicKey(RAW), DiscoPublicKey(RAW)}) == 2
    # Not equal to the raw bytes or the text either.
    assert a != RAW
    assert a != a.text()
    assert NodePrivateKey(ALICE_PRIV) == NodePrivateKey(ALICE_PRIV)
    assert hash(NodePrivateKey(ALICE_PRIV)) == hash(NodePrivateKey(ALICE_PRIV))


def test_immutable() -> None:
    k = NodePublicKey(RAW)
    with pytest.raises(AttributeError):
        k._raw = bytes(32)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        k.other = 1  # type: ignore[attr-defined]
    assert k.raw == RAW


def test_public_repr_and_short() -> None:
    k = NodePublicKey(RAW)
    assert repr(k) == f"NodePublicKey('nodekey:{HEX}')"
    assert repr(DiscoPublicKey(RAW)) == f"DiscoPublicKey('discokey:{HEX}')"
    assert k.short() == "[00112]"


@pytest.mark.parametrize("cls", [NodePrivateKey, DiscoPrivateKey])
def test_private_repr_is_redacted(cls: type[NodePrivateKey | DiscoPrivateKey]) -> None:
    k = cls(ALICE_PRIV)
    r = repr(k)
    assert r == f"{cls.__name__}(<redacted>)"
    for text in (r, repr([k]), repr({"k": k})):
        assert k.hex() not in text
        assert k.hex()[:16] not in text
        assert ALICE_PRIV.hex()[:16] not in text
