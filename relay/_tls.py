"""TLS for the relay: the meta-certificate, manual certificate mode and the server context.

Spec: derp §4.5 and §8 (DERPNode).

* :func:`make_meta_certificate` makes the throwaway self-signed Ed25519 certificate that carries
  the relay's public key (CN ``derpkey<hex>``, serial 2 = protocol version). It is appended to
  the end of the served chain, so TLS 1.3 clients learn the key before the HTTP upgrade.
* :func:`load_manual_certificate` implements ``-certmode manual``: ``<certdir>/<hostname>.crt``
  and ``.key``; for an IP hostname with no files yet it creates a self-signed P-256 certificate
  and returns the DERPNode JSON line an operator pastes into a DERP map (with the
  ``sha256-raw:`` pin of the leaf).
* :func:`build_server_context` builds the :class:`ssl.SSLContext` the relay's TLS transports use:
  TLS ≥ 1.2, ALPN ``http/1.1`` only, chain + meta-certificate, optional SNI check.
* :func:`server_context_for_manual_mode` ties the three together for the command line.

SNI policy (derper's manual mode does the same): when the configured hostname is a DNS name, a
ClientHello whose SNI is missing or differs from it (compared case-insensitively, ignoring one
trailing dot) is refused with an ``unrecognized_name`` alert, so the handshake fails. When the
hostname is an IP address, no SNI check is made (clients send no SNI for IP literals).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import re
import ssl
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from natlib.derp._metacert import META_CN_PREFIX

from ._config import ConfigError

__all__ = [
    "META_CERT_SERIAL",
    "CertificateError",
    "ManualCertificate",
    "build_server_context",
    "derp_node_json",
    "filter_hostname",
    "load_manual_certificate",
    "make_meta_certificate",
    "served_chain_pem",
    "server_context_for_manual_mode",
    "sha256_raw_pin",
]

logger = logging.getLogger(__name__)

META_CERT_SERIAL = 2  # the DERP protocol version
_META_VALIDITY = dt.timedelta(days=30)
_SELF_SIGNED_VALIDITY = dt.timedelta(days=365)
_UNSAFE_HOSTNAME_CHARS = re.compile(r"[^A-Za-z0-9.-]")
_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


class CertificateError(ConfigError):
    """A certificate problem at start-up; the message names the file or hostname at fault."""


# -- helpers ------------------------------------------------------------------------------------


def sha256_raw_pin(der: bytes) -> str:
    """The DERPNode ``CertName`` pinning a leaf certificate: ``sha256-raw:<hex of SHA-256(DER)>``."""
    return "sha256-raw:" + hashlib.sha256(der).hexdigest()


def filter_hostname(hostname: str) -> str:
    """The hostname with every character outside ``[A-Za-z0-9.-]`` removed (the file-name stem).

    Like derper, this also drops the colons of an IPv6 address (``::1`` → ``1``).
    """
    return _UNSAFE_HOSTNAME_CHARS.sub("", hostname)


def _parse_ip(hostname: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(hostname)
    except ValueError:
        return None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _split_pem_certs(pem: bytes) -> list[bytes]:
    return [m.group(0) + b"\n" for m in _PEM_CERT_RE.finditer(pem)]


def derp_node_json(
    hostname: str, leaf_der: bytes, *, region_id: int = 900, name: str = "custom", derp_port: int = 0
) -> str:
    """A one-line DERPNode JSON (derp §8) for a relay reached at an IP, pinned to ``leaf_der``.

    Field order follows ``tailcfg.DERPNode``; ``IPv4``/``IPv6`` is set from the address and
    ``DERPPort`` only when it is not the default 443.
    """
    node: dict[str, object] = {
        "Name": name,
        "RegionID": region_id,
        "HostName": hostname,
        "CertName": sha256_raw_pin(leaf_der),
    }
    ip = _parse_ip(hostname)
    if isinstance(ip, ipaddress.IPv4Address):
        node["IPv4"] = str(ip)
    elif isinstance(ip, ipaddress.IPv6Address):
        node["IPv6"] = str(ip)
    if derp_port and derp_port != 443:
        node["DERPPort"] = derp_port
    return json.dumps(node, separators=(",", ":"))


# -- meta-certificate ----------------------------------------------------------------------------


def _long_common_name(cn: str) -> x509.NameAttribute[str]:
    """A CN attribute longer than X.520's 64-character limit, which Go (and derper) ignore.

    ``cryptography`` only builds one through its private ``_validate`` switch, and warns when it
    does; the warning is expected here and silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return x509.NameAttribute(NameOID.COMMON_NAME, cn, _ASN1Type.PrintableString, _validate=False)


def make_meta_certificate(server_public_key: bytes) -> tuple[bytes, bytes]:
    """A throwaway self-signed Ed25519 certificate carrying the relay's public key.

    CN ``derpkey<64 lowercase hex>``, serial 2, valid from 30 days ago to 30 days ahead, and
    BasicConstraints (CA false, critical, as Go marshals it) as the only extension. Returns
    ``(cert_pem, key_pem)``; the key is never needed after signing, but is returned for tests.
    """
    key_bytes = bytes(server_public_key)
    if len(key_bytes) != 32:
        raise ValueError(f"server public key must be 32 bytes, got {len(key_bytes)}")
    private = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([_long_common_name(META_CN_PREFIX + key_bytes.hex())])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(META_CERT_SERIAL)
        .not_valid_before(now - _META_VALIDITY)
        .not_valid_after(now + _META_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(private, None)
    )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# -- manual certificate mode ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManualCertificate:
    """What :func:`load_manual_certificate` found or made."""

    cert_path: Path
    key_path: Path
    cert_chain_pem: bytes
    key_pem: bytes
    leaf_der: bytes
    created: bool
    """True when a self-signed certificate for an IP hostname was created just now."""
    derp_node_json: str | None
    """For an IP hostname: the DERPNode JSON line (with the ``sha256-raw:`` pin) to log."""


def _covers_hostname(cert: x509.Certificate, hostname: str) -> bool:
    """Whether the certificate's SANs cover ``hostname`` (like Go's VerifyHostname: no CN)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    ip = _parse_ip(hostname)
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    want = hostname.rstrip(".").lower()
    for pattern in san.get_values_for_type(x509.DNSName):
        pat = pattern.rstrip(".").lower()
        if pat == want:
            return True
        if pat.startswith("*.") and "." in want:
            head, _, rest = want.partition(".")
            if head and rest == pat[2:]:
                return True
    return False


def _make_self_signed_ip_cert(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[bytes, bytes]:
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(ip))])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _SELF_SIGNED_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip)]), critical=False)
        .sign(private, hashes.SHA256())
    )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_manual_certificate(
    certdir: str | os.PathLike[str], hostname: str, *, derp_port: int = 0
) -> ManualCertificate:
    """Load (or, for an IP hostname, create) the ``-certmode manual`` certificate.

    Files: ``<certdir>/<h>.crt`` (PEM chain, leaf first) and ``<certdir>/<h>.key`` where ``h`` is
    the hostname filtered to ``[A-Za-z0-9.-]``. If the hostname is an IP address and the
    ``.crt`` file is missing, a self-signed P-256 certificate with that IP as its only SAN,
    valid for one year, is created (key file mode 0600, directory created 0700 if needed).

    Raises :class:`CertificateError` for a missing file (naming the expected paths), an
    unreadable or mismatched key, or a certificate that does not cover the hostname.
    """
    if not hostname:
        raise CertificateError("-hostname is empty; manual cert mode needs it to find <hostname>.crt")
    stem = filter_hostname(hostname)
    if not stem or stem.strip(".") == "":
        raise CertificateError(f"-hostname {hostname!r} has no usable characters for a file name")
    directory = Path(certdir)
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    ip = _parse_ip(hostname)
    created = False
    if not cert_path.exists():
        if ip is None:
            missing = [str(p) for p in (cert_path, key_path) if not p.exists()]
            raise CertificateError(
                f"-certmode manual: no certificate for {hostname!r}: expected {cert_path} and "
                f"{key_path} (missing: {', '.join(missing)}); only an IP -hostname gets a "
                "self-signed certificate automatically"
            )
        cert_pem, key_pem = _make_self_signed_ip_cert(ip)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_atomically(key_path, key_pem, 0o600)
            _write_atomically(cert_path, cert_pem, 0o644)
        except OSError as e:
            raise CertificateError(f"cannot write self-signed certificate to {directory}: {e}") from e
        created = True
        logger.info("created self-signed certificate for %s in %s", hostname, cert_path)
    try:
        cert_chain_pem = cert_path.read_bytes()
    except OSError as e:
        raise CertificateError(f"cannot read certificate {cert_path}: {e.strerror or e}") from e
    try:
        key_pem = key_path.read_bytes()
    except OSError as e:
        raise CertificateError(
            f"cannot read private key {key_path} (for certificate {cert_path}): {e.strerror or e}"
        ) from e
    pems = _split_pem_certs(cert_chain_pem)
    if not pems:
        raise CertificateError(f"{cert_path}: no PEM certificate found")
    try:
        leaf = x509.load_pem_x509_certificate(pems[0])
    except ValueError as e:
        raise CertificateError(f"{cert_path}: cannot parse the first certificate: {e}") from e
    if not _covers_hostname(leaf, hostname):
        raise CertificateError(
            f"certificate {cert_path} is not valid for hostname {hostname!r} "
            "(no matching subjectAltName entry)"
        )
    now = _now()
    if leaf.not_valid_after_utc < now:
        logger.warning("certificate %s expired on %s", cert_path, leaf.not_valid_after_utc.isoformat())
    leaf_der = leaf.public_bytes(serialization.Encoding.DER)
    node = derp_node_json(str(ip), leaf_der, derp_port=derp_port) if ip is not None else None
    return ManualCertificate(
        cert_path=cert_path,
        key_path=key_path,
        cert_chain_pem=cert_chain_pem,
        key_pem=key_pem,
        leaf_der=leaf_der,
        created=created,
        derp_node_json=node,
    )


# -- server context ------------------------------------------------------------------------------


_SniCallback = Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None]


def _sni_checker(hostname: str) -> _SniCallback:
    want = hostname.rstrip(".").lower()

    def check(ssl_obj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> int | None:
        # Must never raise: an exception here is only reported through sys.unraisablehook.
        if server_name is not None and server_name.rstrip(".").lower() == want:
            return None
        logger.debug("TLS: refusing SNI %r (this relay serves %r)", server_name, hostname)
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

    return check


def build_server_context(
    cert_chain_pem: bytes,
    key_pem: bytes,
    meta_cert_pem: bytes,
    *,
    hostname: str | None = None,
) -> ssl.SSLContext:
    """The relay's TLS server context.

    * Minimum TLS 1.2; ALPN offers only ``http/1.1``; renegotiation off; no client certificates.
    * The served chain is ``cert_chain_pem`` (leaf first) **followed by** ``meta_cert_pem``.
      :meth:`ssl.SSLContext.load_cert_chain` wants files, so the combined chain and the key are
      written to a private temporary directory (mode 0700) that is removed before returning;
      the caller's files are never touched.
    * With ``hostname`` set to a DNS name, SNI must equal it (see the module docstring); with an
      IP address or ``None``, any SNI (or none) is accepted.

    Raises :class:`CertificateError` if the PEM data cannot be loaded or the key does not match.
    """
    chain = _split_pem_certs(cert_chain_pem)
    meta = _split_pem_certs(meta_cert_pem)
    if not chain:
        raise CertificateError("certificate chain: no PEM certificate found")
    if len(meta) != 1:
        raise CertificateError(f"meta-certificate: expected one PEM certificate, got {len(meta)}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    with tempfile.TemporaryDirectory(prefix="meshrelay-tls-") as tmp:
        cert_file = os.path.join(tmp, "chain.pem")
        key_file = os.path.join(tmp, "key.pem")
        for path, data in ((cert_file, b"".join([*chain, *meta])), (key_file, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as e:
            raise CertificateError(f"cannot load the TLS certificate and key: {e}") from e
    if hostname and _parse_ip(hostname) is None:
        ctx.sni_callback = _sni_checker(hostname)
    return ctx


def served_chain_pem(cert_chain_pem: bytes, meta_cert_pem: bytes) -> list[bytes]:
    """The PEM certificates :func:`build_server_context` serves, in order (for tests and logs)."""
    return [*_split_pem_certs(cert_chain_pem), *_split_pem_certs(meta_cert_pem)]


def server_context_for_manual_mode(
    certdir: str | os.PathLike[str],
    hostname: str,
    server_public_key: bytes,
    *,
    log: logging.Logger | None = None,
    derp_port: int = 0,
) -> ssl.SSLContext:
    """``-certmode manual``: load or create the certificate, add the meta-certificate, build the
    context with the SNI check. For an IP hostname, logs the DERPNode JSON line to paste into a
    DERP map. Raises :class:`CertificateError` (a :class:`ConfigError`) on any problem.
    """
    out = log if log is not None else logger
    manual = load_manual_certificate(certdir, hostname, derp_port=derp_port)
    meta_cert_pem, _ = make_meta_certificate(server_public_key)
    ctx = build_server_context(manual.cert_chain_pem, manual.key_pem, meta_cert_pem, hostname=hostname)
    if manual.derp_node_json is not None:
        out.info(
            "using %s certificate %s for IP address %s; configure it in the DERP map with:\n  %s",
            "new self-signed" if manual.created else "existing",
            manual.cert_path,
            hostname,
            manual.derp_node_json,
        )
    return ctx
