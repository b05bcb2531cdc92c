"""natlib.disco against Tailscale's Go disco package, live (``discovector/main.go``).

With fresh random keys each run: Go's AppendMarshal equals our encoding, Go opens what we seal
(random nonces) and reads the same messages, and we open what Go seals. tests/test_disco.py holds
one such run as fixed vectors, so the format is checked even where Go is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from interop_support import bin_dir

from natlib.disco import AddrPort, CallMeMaybe, Message, Ping, Pong, encode_message, open_packet, seal
from natlib.keys import DiscoPrivateKey, NodePublicKey

BINARY = bin_dir() / "discovector"
pytestmark = pytest.mark.skipif(
    not os.access(BINARY, os.X_OK),
    reason=f"{BINARY} is missing; build it with: cd tests/interop && go build -o {BINARY} ./discovector",
)

TX = bytes(range(1, 13))
NODE = NodePublicKey(b"0123456789abcdef0123456789abcdef")
# The messages discovector marshals and seals, in its order, with Go's summary of each.
MESSAGES: list[tuple[Message, str]] = [
    (Ping(TX), "ping 0102030405060708090a0b0c  0"),
    (Ping(TX, NODE), f"ping 0102030405060708090a0b0c {NODE.text()} 0"),
    (Ping(TX, NODE, 7), f"ping 0102030405060708090a0b0c {NODE.text()} 7"),
    (Pong(TX, AddrPort.parse("192.0.2.1:41641")), "pong 0102030405060708090a0b0c 192.0.2.1:41641"),
    (Pong(TX, AddrPort.parse("[2001:db8::1]:3478")), "pong 0102030405060708090a0b0c [2001:db8::1]:3478"),
    (CallMeMaybe(), "cmm"),
    (
        CallMeMaybe([AddrPort.parse("198.51.100.7:41641"), AddrPort.parse("[2001:db8::2]:41641")]),
        "cmm 198.51.100.7:41641 [2001:db8::2]:41641",
    ),
]


def test_go_and_natlib_agree_on_every_message_both_ways() -> None:
    sender, receiver = DiscoPrivateKey.generate(), DiscoPrivateKey.generate()
    ours = [seal(m, sender, receiver.public).hex() for m, _ in MESSAGES]
    tampered = bytearray(bytes.fromhex(ours[0]))
    tampered[-1] ^= 1
    request = {"sender": sender.hex(), "receiver": receiver.hex(), "open": [*ours, tampered.hex()]}
    result = subprocess.run(
        [str(BINARY)], input=json.dumps(request).encode(), capture_output=True, timeout=30, check=True
    )
    reply = json.loads(result.stdout)
    assert reply["sender_public"] == sender.public.hex()
    assert reply["plaintexts"] == [encode_message(m).hex() for m, _ in MESSAGES]
    assert reply["opened"] == [summary for _, summary in MESSAGES] + ["error: does not open"]
    for (message, _), packet in zip(MESSAGES, reply["sealed"], strict=True):
        assert open_packet(bytes.fromhex(packet), receiver) == (sender.public, message)
