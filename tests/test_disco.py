"""natlib.disco: byte-exact wire format (cross-checked with Tailscale's Go disco package),
authentication, tolerant parsing and rejection of bad packets with the right error."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natlib.disco import (
    HEADER_LEN,
    MAGIC,
    MIN_PACKET_LEN,
    PING_LEN,
    AddrPort,
    CallMeMaybe,
    DiscoCounters,
    DiscoError,
    MalformedMessageError,
    NotDiscoError,
    Ping,
    Pong,
    UnauthenticatedError,
    UnknownMessageTypeError,
    decode_endpoint,
    decode_message,
    encode_endpoint,
    encode_message,
    looks_like_disco,
    open_packet,
    peek_sender,
    seal,
)
from natlib.keys import DiscoPrivateKey, DiscoPublicKey, NodePublicKey

# Keys and messages of the Go cross-check (tests/interop/discovector, tailscale.com v1.102.5).
SENDER = DiscoPrivateKey(bytes(range(32)))
RECEIVER = DiscoPrivateKey(bytes(range(100, 132)))
SENDER_PUBLIC = "8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f"
TX = bytes(range(1, 13))
NODE = NodePublicKey(b"0123456789abcdef0123456789abcdef")
MESSAGES = [
    Ping(TX),
    Ping(TX, NODE),
    Ping(TX, NODE, 7),
    Pong(TX, AddrPort.parse("192.0.2.1:41641")),
    Pong(TX, AddrPort.parse("[2001:db8::1]:3478")),
    CallMeMaybe(),
    CallMeMaybe([AddrPort.parse("198.51.100.7:41641"), AddrPort.parse("[2001:db8::2]:41641")]),
]
# Go's AppendMarshal of MESSAGES.
GO_PLAINTEXTS = [
    "01000102030405060708090a0b0c",
    "01000102030405060708090a0b0c3031323334353637383961626364656630313233343536373839616263646566",
    "01000102030405060708090a0b0c303132333435363738396162636465663031323334353637383961626364656600000000000000",
    "02000102030405060708090a0b0c00000000000000000000ffffc0000201a2a9",
    "02000102030405060708090a0b0c20010db80000000000000000000000010d96",
    "0300",
    "030000000000000000000000ffffc6336407a2a920010db8000000000000000000000002a2a9",
]
# MESSAGES sealed by Go (disco.Magic ‖ public key ‖ DiscoShared.Seal, random nonces).
GO_SEALED = [
    bytes.fromhex(
        "5453f09f92ac8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f312149b7946b34185efe"
        "e1d34115e59c2481ef228195cea990d03a2ee0a2f790ca3581b14d4c44d5b4b582e78ef20406d95d773f6e2a"
    ),
    bytes.fromhex(
        "5453f09f92ac8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285fb9ae37b50b3164e65cbf"
        "d37531b09b10c2974a7cb9e1b58cc01e151ede24e3a5cc5a194e4e80759a7b260058a39b88be906781dbe93e5b34f36e"
        "2cd34c32a9ab22a60023ffa71e891e09168b63cf0f26efe015b7dbbf"
    ),
    bytes.fromhex(
        "5453f09f92ac8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f31f88003d0408b2e680d"
        "d465e1bd01c5d64e8ffcbc03c9a861537124cae74b1ba3bbb2bc069c0b35d9401986142f83120a1c2ca5e9146d2301ff"
        "648eebf254468efaffd088961338e22e8b1018b7189dff73c5a950408433cf7ffe0aea"
    ),
    bytes.fromhex(
        "5453f09f92ac8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f48737d0777e7eb588eab"
        "80f9a35302525d9406df85ee5553f559a852516e5604a217e24b28196761067ee090b5021fa6a3a2132d09553316e203"
        "2aeb9308ac43deab107eae86e982"
    ),
    bytes.fromhex(
        "5453f09f92ac8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285fa3eb7d804227eea7e7ff"
        "309b73ad3206321908894fc5cc8ed556c70d4e4c4892ca8188ab7a978d824982ef60b1ecc168dbea060c6fb2e9dea6c4"
        "90de1d8f54bc9b3e6adb38dd994c"
    ),
    bytes.fromhex(
        "5453f09f92ac8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f9abb436dc1ca04c59750"
        "10e055eaa97977c2ea257541b1f043ff1e11e32ad7d4f0fba0ac3c6896b27d24"
    ),
    bytes.fromhex(
        "5453f09f92ac8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f6f6d484f4a9aedbb907b"
        "65f39a44c5e32c1a7be7357234a530df40ae1421d0e1423bdf0ee20ea39e22d76227100707a32ce99d2027a3cf580982"
        "4e03a4373025588af0217a8b88c45a59a2a5b778"
    ),
]
# Ours with nonce = 24 × 0x00 (MESSAGES[0]) and 24 × 0x06 (MESSAGES[6]); Go opened both as those messages.
OUR_PING_NONCE_00 = bytes.fromhex(
    "5453f09f92ac8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f000000000000000000000000"
    "0000000000000000000000009e5604215ddbcf7cfc748c662a539d9ffc7260e4295cb8ac1918b6c277cd"
)
OUR_CMM_NONCE_06 = bytes.fromhex(
    "5453f09f92ac8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f060606060606060606060606"
    "06060606060606060606060698294e5a0b1a998db26882765ada98c5d7f711866ed7f3fdb9c9b1ad15458f88ea968b9d2e9f"
    "7c4a2af8e2219475c04170217ece095a"
)


# -- wire format ---------------------------------------------------------------------------------------


def test_constants() -> None:
    assert bytes.fromhex("5453f09f92ac") == MAGIC
    assert (HEADER_LEN, MIN_PACKET_LEN, PING_LEN) == (62, 80, 124)


def test_spec_vector_ping_without_key() -> None:
    # derp-protocol.md §9: a Ping with TxID 01..0c and no key is 01 00 01 02 … 0c.
    assert encode_message(Ping(TX)) == bytes([1, 0, *range(1, 13)])


@pytest.mark.parametrize(("message", "go_hex"), list(zip(MESSAGES, GO_PLAINTEXTS, strict=True)))
def test_plaintext_matches_go(message: object, go_hex: str) -> None:
    assert encode_message(message) == bytes.fromhex(go_hex)  # type: ignore[arg-type]
    assert decode_message(bytes.fromhex(go_hex)) == message


@pytest.mark.parametrize(("message", "packet"), list(zip(MESSAGES, GO_SEALED, strict=True)))
def test_open_packets_sealed_by_go(message: object, packet: bytes) -> None:
    sender, opened = open_packet(packet, RECEIVER)
    assert sender == SENDER.public
    assert sender.hex() == SENDER_PUBLIC
    assert opened == message


def test_seal_is_byte_exact_with_a_fixed_nonce() -> None:
    assert seal(MESSAGES[0], SENDER, RECEIVER.public, nonce=bytes(24)) == OUR_PING_NONCE_00
    assert seal(MESSAGES[6], SENDER, RECEIVER.public, nonce=b"\x06" * 24) == OUR_CMM_NONCE_06


def test_packet_layout_and_sizes() -> None:
    packet = seal(Ping(TX, NODE), SENDER, RECEIVER.public)
    assert len(packet) == PING_LEN
    assert packet[:6] == MAGIC
    assert packet[6:38] == SENDER.public.raw
    assert len(seal(Pong(TX, AddrPort.parse("192.0.2.1:1")), SENDER, RECEIVER.public)) == 62 + 16 + 2 + 30
    assert len(seal(CallMeMaybe(), SENDER, RECEIVER.public)) == MIN_PACKET_LEN
    assert peek_sender(packet) == SENDER.public
    nonce_a, nonce_b = (seal(Ping(TX), SENDER, RECEIVER.public)[38:62] for _ in range(2))
    assert nonce_a != nonce_b  # random nonces unless given


def test_endpoint_encoding_is_v4_mapped() -> None:
    v4 = AddrPort.parse("192.0.2.1:41641")
    assert encode_endpoint(v4) == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1]) + b"\xa2\xa9"
    assert decode_endpoint(encode_endpoint(v4)) == v4
    v6 = AddrPort.parse("[2001:db8::1]:53")
    assert encode_endpoint(v6) == ipaddress.IPv6Address("2001:db8::1").packed + b"\x00\x35"
    # A mapped address given as IPv6 is the IPv4 endpoint.
    assert AddrPort(ipaddress.IPv6Address("::ffff:192.0.2.1"), 41641) == v4
    with pytest.raises(ValueError, match="18 bytes"):
        decode_endpoint(bytes(17))


def test_addrport_text_forms() -> None:
    assert str(AddrPort.parse("192.0.2.1:7")) == "192.0.2.1:7"
    assert str(AddrPort.parse("[2001:db8::1]:7")) == "[2001:db8::1]:7"
    assert AddrPort.from_socket(("2001:db8::1", 7, 0, 0)).socket_address() == ("2001:db8::1", 7)
    for bad in ("192.0.2.1", "2001:db8::1:7", "192.0.2.1:x", "host:7"):
        with pytest.raises(ValueError, match=r"ip:port|brackets|does not appear"):
            AddrPort.parse(bad)
    with pytest.raises(ValueError, match="port"):
        AddrPort(ipaddress.IPv4Address("192.0.2.1"), 70000)


# -- tolerant parsing (as Tailscale) ------------------------------------------------------------------------


def test_trailing_bytes_are_ignored() -> None:
    pong = encode_message(Pong(TX, AddrPort.parse("192.0.2.1:1")))
    assert decode_message(pong + b"future") == Pong(TX, AddrPort.parse("192.0.2.1:1"))


def test_ping_key_and_padding_like_go() -> None:
    # No key but under 32 more bytes: padding. An all-zero key is "no key" (Go's zero value).
    assert decode_message(bytes([1, 0]) + TX + bytes(5)) == Ping(TX, None, 5)
    assert decode_message(bytes([1, 0]) + TX + bytes(40)) == Ping(TX, None, 8)
    with pytest.raises(ValueError, match="padding"):
        Ping(TX, padding=-1)


@pytest.mark.parametrize(
    "payload",
    [
        bytes(17),  # not a multiple of 18
        bytes(19),
    ],
)
def test_call_me_maybe_bad_length_is_empty(payload: bytes) -> None:
    assert decode_message(bytes([3, 0]) + payload) == CallMeMaybe()


def test_call_me_maybe_unknown_version_is_empty() -> None:
    body = encode_endpoint(AddrPort.parse("192.0.2.1:1"))
    assert decode_message(bytes([3, 1]) + body) == CallMeMaybe()
    assert decode_message(bytes([3, 0]) + body) == CallMeMaybe([AddrPort.parse("192.0.2.1:1")])


# -- rejection -------------------------------------------------------------------------------------------


def test_not_disco() -> None:
    good = seal(Ping(TX), SENDER, RECEIVER.public)
    assert looks_like_disco(good)
    assert not looks_like_disco(good[:61])
    assert not looks_like_disco(b"\x01" + good[1:])
    with pytest.raises(NotDiscoError) as info:
        open_packet(good[:61], RECEIVER)
    assert info.value.reason == "not_disco"


def test_wrong_receiver_key_is_unauthenticated() -> None:
    packet = seal(Ping(TX), SENDER, RECEIVER.public)
    with pytest.raises(UnauthenticatedError) as info:
        open_packet(packet, DiscoPrivateKey.generate())
    assert info.value.reason == "unauthenticated"


@pytest.mark.parametrize("where", [0, 10, 20, 40])
def test_tampering_is_unauthenticated(where: int) -> None:
    packet = bytearray(seal(Ping(TX), SENDER, RECEIVER.public))
    packet[HEADER_LEN - 24 + where] ^= 0x01  # nonce, tag or ciphertext
    with pytest.raises(UnauthenticatedError):
        open_packet(bytes(packet), RECEIVER)


def test_forged_sender_key_is_unauthenticated() -> None:
    packet = bytearray(seal(Ping(TX), SENDER, RECEIVER.public))
    packet[6:38] = DiscoPrivateKey.generate().public.raw
    with pytest.raises(UnauthenticatedError):
        open_packet(bytes(packet), RECEIVER)


def test_low_order_sender_key_is_unauthenticated() -> None:
    packet = MAGIC + bytes(32) + bytes(24) + bytes(30)
    with pytest.raises(UnauthenticatedError):
        open_packet(packet, RECEIVER)
    with pytest.raises(ValueError, match="low order"):
        seal(Ping(TX), SENDER, DiscoPublicKey(bytes(32)))


def _seal_plaintext(plaintext: bytes) -> bytes:
    # A correctly sealed box around arbitrary plaintext, to test what happens after authentication.
    import nacl.public

    box = nacl.public.Box(nacl.public.PrivateKey(SENDER.raw), nacl.public.PublicKey(RECEIVER.public.raw))
    return MAGIC + SENDER.public.raw + bytes(box.encrypt(plaintext, bytes(24)))


@pytest.mark.parametrize(
    "plaintext",
    [b"", b"\x01", bytes([1, 0]) + bytes(11), bytes([2, 0]) + bytes(29)],
)
def test_short_messages_are_malformed(plaintext: bytes) -> None:
    with pytest.raises(MalformedMessageError) as info:
        open_packet(_seal_plaintext(plaintext), RECEIVER)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize("mtype", [0x00, 0x04, 0x07, 0x09, 0xFF])
def test_unknown_types(mtype: int) -> None:
    with pytest.raises(UnknownMessageTypeError) as info:
        open_packet(_seal_plaintext(bytes([mtype, 0]) + bytes(72)), RECEIVER)
    assert info.value.message_type == mtype
    assert info.value.reason == "unknown_type"


# -- fuzz --------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_open_raises_only_disco_errors(data: bytes) -> None:
    for candidate in (data, MAGIC + data, MAGIC + SENDER.public.raw + data):
        try:
            open_packet(candidate, RECEIVER)
        except DiscoError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_authenticated_plaintext_parses_or_raises_disco_error(plaintext: bytes) -> None:
    try:
        sender, message = open_packet(_seal_plaintext(plaintext), RECEIVER)
    except DiscoError:
        return
    assert sender == SENDER.public
    assert encode_message(message)[0] == plaintext[0]  # parsed as the type it says it is


endpoints = st.builds(
    AddrPort,
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(0, 0xFFFF),
)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.builds(Ping, st.binary(min_size=12, max_size=12), st.none(), st.integers(0, 31)),
        st.builds(
            Ping,
            st.binary(min_size=12, max_size=12),
            st.binary(min_size=32, max_size=32).filter(any).map(NodePublicKey),
            st.integers(0, 100),
        ),
        st.builds(Pong, st.binary(min_size=12, max_size=12), endpoints),
        st.builds(CallMeMaybe, st.lists(endpoints, max_size=5)),
    )
)
def test_roundtrip(message: Ping | Pong | CallMeMaybe) -> None:
    assert open_packet(seal(message, SENDER, RECEIVER.public), RECEIVER) == (SENDER.public, message)


def test_drops_are_counted_by_reason() -> None:
    counters = DiscoCounters()
    good = seal(Ping(TX), SENDER, RECEIVER.public)
    packets = [
        good,
        good[:50],  # not disco
        seal(Ping(TX), SENDER, DiscoPrivateKey.generate().public),  # for someone else
        _seal_plaintext(b"\x02\x00"),  # a Pong with no payload
        _seal_plaintext(b"\x09\x00"),  # a peer-relay message natlib does not speak
    ]
    for packet in packets:
        try:
            open_packet(packet, RECEIVER)
        except DiscoError as e:
            counters.drop(e.reason)
        else:
            counters.opened += 1
    assert counters.as_dict() == {
        "opened": 1,
        "dropped_malformed": 1,
        "dropped_not_disco": 1,
        "dropped_unauthenticated": 1,
        "dropped_unknown_type": 1,
    }
