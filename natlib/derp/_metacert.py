"""The DERP meta-certificate, client side: find the relay's key in the TLS chain it served.

A relay appends a throwaway self-signed certificate to the end of the chain it serves (derp
§4.5). Its common name is ``derpkey`` followed by the 64 lowercase hex digits of the relay's
public key, and its serial number is the DERP protocol version (2), so it fits in 8 bits. A
client on TLS 1.3 (where the chain is encrypted) that finds such a certificate knows the relay's
key before the HTTP upgrade and can use "fast start". Before TLS 1.3 the chain travels in clear
text and clients ignore it; that check is the caller's job (``ssl_object.version()``).

Getting the chain out of Python's :mod:`ssl`:

* Python 3.13 has the public ``SSLObject.get_unverified_chain()`` /
  ``SSLSocket.get_unverified_chain()``, which return the DER certificates the peer sent, leaf first.
* Python 3.11 and 3.12 have **no public API** for the peer's chain: ``getpeercert(binary_form=True)``
  returns the leaf only. CPython 3.10–3.12 do have the private ``_sslobj.get_unverified_chain()``
  (returning ``_ssl.Certificate`` objects). :func:`unverified_peer_chain` uses the public method
  when present and falls back to the private one, returning ``None`` when neither exists, so
  callers must treat "no chain" as "no fast start" and do the normal HTTP upgrade.

Nothing here imports the relay (the relay imports this module for its own tests).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

__all__ = ["META_CN_PREFIX", "server_key_from_chain", "unverified_peer_chain"]

META_CN_PREFIX = "derpkey"
_MARKER = META_CN_PREFIX.encode()
_KEY_LEN = 32


def server_key_from_chain(der_certs: Sequence[bytes]) -> tuple[bytes, int] | None:
    """The relay key and protocol version from the first meta-certificate in ``der_certs``.

    A meta-certificate is one whose subject CN starts with ``derpkey`` followed by 64 hex digits
    and whose serial number is between 1 and 255. Returns ``(32-byte key, version)``, or ``None``
    when no certificate qualifies. Malformed certificates are skipped, never raised.

    The certificates are read with a minimal DER walker rather than ``cryptography``: the CN is
    71 characters, over X.520's 64-character limit, and ``cryptography`` warns about that on
    every parse (an error under ``-W error``); the walker is also much cheaper.
    """
    for der in der_certs:
        raw = bytes(der)
        if _MARKER not in raw:  # cheap pre-filter: the CN is stored as plain text in the DER
            continue
        try:
            found = _parse_meta(raw)
        except (IndexError, ValueError):
            continue
        if found is not None:
            return found
    return None


_SEQUENCE = 0x30
_SET = 0x31
_INTEGER = 0x02
_OID = 0x06
_CONTEXT_0 = 0xA0
_CN_OID = bytes([0x55, 0x04, 0x03])  # 2.5.4.3
_STRING_TAGS = frozenset({0x0C, 0x13, 0x14, 0x16, 0x1E})  # UTF8, Printable, T61, IA5, BMP(rejected below)


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, value start, value end) of the DER element at ``pos``; ValueError if malformed."""
    if pos + 2 > end:
        raise ValueError("truncated")
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        nbytes = length & 0x7F
        if nbytes == 0 or nbytes > 4 or pos + nbytes > end:
            raise ValueError("bad length")
        length = int.from_bytes(data[pos : pos + nbytes], "big")
        pos += nbytes
    if pos + length > end:
        raise ValueError("truncated")
    return tag, pos, pos + length


def _parse_meta(der: bytes) -> tuple[bytes, int] | None:
    tag, start, end = _tlv(der, 0, len(der))  # Certificate
    if tag != _SEQUENCE:
        return None
    tag, pos, tbs_end = _tlv(der, start, end)  # TBSCertificate
    if tag != _SEQUENCE:
        return None
    tag, vstart, vend = _tlv(der, pos, tbs_end)
    if tag == _CONTEXT_0:  # [0] version
        pos = vend
        tag, vstart, vend = _tlv(der, pos, tbs_end)
    if tag != _INTEGER or vend == vstart:
        return None
    serial = int.from_bytes(der[vstart:vend], "big", signed=True)
    if not 0 < serial <= 0xFF:
        return None
    pos = vend
    for _ in range(3):  # signature AlgorithmIdentifier, issuer, validity
        _, _, pos = _tlv(der, pos, tbs_end)
    tag, pos, subject_end = _tlv(der, pos, tbs_end)  # subject Name
    if tag != _SEQUENCE:
        return None
    while pos < subject_end:
        tag, rdn_pos, rdn_end = _tlv(der, pos, subject_end)  # RelativeDistinguishedName
        pos = rdn_end
        if tag != _SET:
            return None
        while rdn_pos < rdn_end:
            tag, atv_pos, atv_end = _tlv(der, rdn_pos, rdn_end)  # AttributeTypeAndValue
            rdn_pos = atv_end
            if tag != _SEQUENCE:
                return None
            tag, oid_start, oid_end = _tlv(der, atv_pos, atv_end)
            if tag != _OID or der[oid_start:oid_end] != _CN_OID:
                continue
            tag, val_start, val_end = _tlv(der, oid_end, atv_end)
            if tag not in _STRING_TAGS or tag == 0x1E:
                continue
            cn = der[val_start:val_end]
            if not cn.startswith(_MARKER) or len(cn) != len(_MARKER) + 2 * _KEY_LEN:
                continue
            hex_key = cn[len(_MARKER) :]
            try:
                return bytes.fromhex(hex_key.decode("ascii")), serial
            except (UnicodeDecodeError, ValueError):
                continue
    return None


def unverified_peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes] | None:
    """The DER certificates the peer sent (leaf first), or ``None`` if Python cannot tell.

    Uses the public ``get_unverified_chain()`` (Python ≥ 3.13) or else CPython's private
    ``_sslobj.get_unverified_chain()`` (3.10–3.12). Call it after the handshake.
    """
    public: Any = getattr(ssl_object, "get_unverified_chain", None)
    if public is not None:
        chain: Any = public()
        return [bytes(c) for c in chain or ()]
    inner: Any = getattr(ssl_object, "_sslobj", None)
    private: Any = getattr(inner, "get_unverified_chain", None)
    encoding: Any = getattr(ssl, "_ssl", None)
    der_format: Any = getattr(encoding, "ENCODING_DER", None)
    if private is None or der_format is None:
        return None
    try:
        certs: Any = private()
        if certs is None:
            return []
        return [bytes(c.public_bytes(der_format)) for c in certs]
    except (AttributeError, TypeError, ValueError, ssl.SSLError):
        return None
