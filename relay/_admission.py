"""Client admission: which node keys may connect (``-allow-file``, ``-verify-client-url``).

Admission runs in the DERP handshake, after ClientInfo has been opened and inside the same 10 s
budget (spec §3, §5). Mesh peers (correct mesh key) never get here. A client must pass every check
that is enabled; the first failure rejects it, and the server then closes the connection silently
(no ServerInfo), as derper does.

Allow file (``-allow-file``, ours). Two formats, chosen by the file name:

- ``*.toml``: the mesh/inventory TOML. Every ``[[node]]`` (or ``[[nodes]]``) table names one key
  in ``node_key`` (or ``public_key``); other fields (``name``, ``addr``, ...) are ignored::

      [[node]]
      name = "laptop"
      node_key = "nodekey:6c1b...e0"

- anything else: one ``nodekey:<64 hex>`` per line; ``#`` starts a comment; blank lines are
  skipped.

Errors name the file, the line and the field. On SIGHUP the file is read again; if the new one is
bad, the old list stays in force and the error is logged.

Verify URL (``-verify-client-url``, derper's, headscale's ``/verify`` is compatible): POST
``{"NodePublic":"nodekey:<hex>","Source":"<client ip>"}``; admit only on status 200 with a JSON
body (at most 4 KiB) whose ``Allow`` is ``true``. A network failure before the response head
(refused, unreachable, TLS error, 5 s timeout) admits when ``-verify-client-url-fail-open`` is set
(the default) and rejects otherwise; any answer that is not a 200 with ``Allow: true`` rejects.
The client is h11 over trio, ``http://`` or ``https://`` (system trust store).
"""

from __future__ import annotations

import json
import logging
import ssl
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import h11
import trio

from natlib.keys import KeyFormatError, NodePublicKey

__all__ = [
    "MAX_RESPONSE_BODY",
    "VERIFY_URL_TIMEOUT",
    "AdmissionPolicy",
    "AllowListError",
    "Decision",
    "load_allow_file",
    "parse_allow_text",
    "parse_allow_toml",
    "validate_verify_url",
    "verify_client_url",
]

log = logging.getLogger(__name__)

VERIFY_URL_TIMEOUT: Final = 5.0
MAX_RESPONSE_BODY: Final = 4 << 10
_MAX_RESPONSE_HEAD: Final = 16 << 10
_USER_AGENT: Final = "meshrelay"

# Reasons in RelayStats.rejected_clients (and the log line "client <key> rejected: <detail>").
REJECT_NOT_ALLOWED: Final = "not_in_allow_file"
REJECT_URL_DENIED: Final = "verify_url_denied"
REJECT_URL_UNREACHABLE: Final = "verify_url_unreachable"


class AllowListError(ValueError):
    """A bad allow file; the message names the file, the line and the field."""


# -- the allow file (sans-io parsers) ------------------------------------------------------------


def _parse_key(value: str) -> bytes:
    return NodePublicKey.from_text(value).raw


def parse_allow_text(text: str, name: str) -> frozenset[bytes]:
    """One ``nodekey:<hex>`` per line, ``#`` comments, blank lines."""
    keys: set[bytes] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            keys.add(_parse_key(item))
        except KeyFormatError as e:
            raise AllowListError(f"{name}:{lineno}: node key {item!r}: {e}") from None
    return frozenset(keys)


def _line_of(text: str, needle: str) -> int:
    for i, ln in enumerate(text.splitlines(), 1):
        if needle in ln:
            return i
    return 1


def parse_allow_toml(text: str, name: str) -> frozenset[bytes]:
    """``[[node]]``/``[[nodes]]`` tables with a ``node_key`` or ``public_key`` field."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AllowListError(f"{name}: not valid TOML: {e}") from None
    nodes: list[object] = []
    for table in ("node", "nodes"):
        value = doc.get(table, [])
        if not isinstance(value, list):
            line = _line_of(text, table)
            raise AllowListError(f"{name}:{line}: field {table!r}: want an array of tables [[{table}]]")
        nodes.extend(value)
    keys: set[bytes] = set()
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise AllowListError(f"{name}: node #{i + 1}: want a table")
        field = "node_key" if "node_key" in node else "public_key" if "public_key" in node else None
        label = f"node {node.get('name')!r}" if isinstance(node.get("name"), str) else f"node #{i + 1}"
        if field is None:
            line = _line_of(text, f'"{node["name"]}"') if isinstance(node.get("name"), str) else 1
            raise AllowListError(f'{name}:{line}: {label}: field "node_key" is missing')
        value = node[field]
        if not isinstance(value, str):
            raise AllowListError(f'{name}: {label}: field {field!r} must be a string "nodekey:<64 hex>"')
        try:
            keys.add(_parse_key(value))
        except KeyFormatError as e:
            raise AllowListError(f"{name}:{_line_of(text, value)}: {label}: field {field!r}: {e}") from None
    return frozenset(keys)


def load_allow_file(path: str) -> frozenset[bytes]:
    """Read and parse an allow file (format by suffix: ``.toml`` or the line format)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise AllowListError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise AllowListError(f"{path}: not UTF-8 text: {e}") from None
    if path.endswith(".toml"):
        return parse_allow_toml(text, path)
    return parse_allow_text(text, path)


# -- the verify-client-url client ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UrlVerdict:
    """``status``: ``allow``, ``deny`` (an answer that is not a yes) or ``unreachable``."""

    status: str
    detail: str


def validate_verify_url(url: str) -> None:
    """Raise ValueError unless ``url`` is an absolute http:// or https:// URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: want an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as e:
        raise ValueError(f"{url!r}: {e}") from None


def _decode_answer(body: bytes) -> UrlVerdict:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return UrlVerdict("deny", f"admission controller: bad JSON answer: {e}")
    if not isinstance(obj, dict):
        return UrlVerdict("deny", "admission controller: answer is not a JSON object")
    # Go's encoding/json matches field names case-insensitively.
    allow = next((v for k, v in obj.items() if isinstance(k, str) and k.lower() == "allow"), False)
    if allow is True:
        return UrlVerdict("allow", "")
    return UrlVerdict("deny", "admission controller denied connection")


async def verify_client_url(
    url: str,
    node_public: str,
    source: str,
    *,
    time_limit: float = VERIFY_URL_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> UrlVerdict:
    """Ask the admission controller at ``url`` about ``node_public`` connecting from ``source``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rpartition("@")[2]
    body = json.dumps({"NodePublic": node_public, "Source": source}, separators=(",", ":")).encode()
    got_head = False
    stream: trio.abc.Stream | None = None
    with trio.move_on_after(time_limit) as scope:
        try:
            stream = await trio.open_tcp_stream(host, port)
            if https:
                ctx = ssl_context if ssl_context is not None else _default_ssl_context()
                tls = trio.SSLStream(stream, ctx, server_hostname=host, https_compatible=True)
                stream = tls
                await tls.do_handshake()
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE_HEAD)
            request = h11.Request(
                method="POST",
                target=target,
                headers=[
                    ("Host", host_header),
                    ("User-Agent", _USER_AGENT),
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ],
            )
            await stream.send_all(
                (conn.send(request) or b"")
                + (conn.send(h11.Data(data=body)) or b"")
                + (conn.send(h11.EndOfMessage()) or b"")
            )
            status = 0
            reason = b""
            received = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(16 << 10)))
                    continue
                if isinstance(event, h11.Response):
                    got_head = True
                    status, reason = event.status_code, event.reason
                    if status != 200:
                        return UrlVerdict(
                            "deny", f"admission controller: {status} {reason.decode('latin-1')}".rstrip()
                        )
                elif isinstance(event, h11.Data):
                    received += event.data
                    if len(received) > MAX_RESPONSE_BODY:
                        return UrlVerdict(
                            "deny", f"admission controller: answer longer than {MAX_RESPONSE_BODY} bytes"
                        )
                elif isinstance(event, h11.EndOfMessage):
                    return _decode_answer(bytes(received))
                elif isinstance(event, h11.ConnectionClosed):
                    break
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as e:
            if not got_head:
                return UrlVerdict("unreachable", f"admission controller unreachable: {e}")
            return UrlVerdict("deny", f"admission controller: reading the answer failed: {e}")
        except h11.RemoteProtocolError as e:
            if not got_head:
                return UrlVerdict("unreachable", f"admission controller: bad HTTP answer: {e}")
            return UrlVerdict("deny", f"admission controller: bad HTTP answer: {e}")
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
    if scope.cancelled_caught:
        if not got_head:
            return UrlVerdict(
                "unreachable", f"admission controller unreachable: no answer within {time_limit:g}s"
            )
        return UrlVerdict("deny", f"admission controller: answer not complete within {time_limit:g}s")
    return UrlVerdict("deny", "admission controller: connection closed before the answer was complete")


_ssl_context: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
    return _ssl_context


# -- the policy ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one client.

    ``reject``: None to admit, else the reason counted in ``rejected_clients``; ``url_result``:
    what to count in ``RelayStats.admission`` (``allowed``/``denied``/``fail_open``/
    ``fail_closed``), None when the URL was not asked; ``detail``: for the log line.
    """

    reject: str | None
    url_result: str | None = None
    detail: str = ""


class AdmissionPolicy:
    """The admission checks of one relay. ``allow_file`` and ``verify_url`` may each be empty."""

    def __init__(
        self,
        *,
        allow_file: str = "",
        verify_url: str = "",
        fail_open: bool = True,
        url_timeout: float = VERIFY_URL_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if verify_url:
            validate_verify_url(verify_url)
        self.allow_file = allow_file
        self.allowed: frozenset[bytes] | None = load_allow_file(allow_file) if allow_file else None
        self.verify_url = verify_url
        self.fail_open = fail_open
        self.url_timeout = url_timeout
        self.ssl_context = ssl_context

    @property
    def enabled(self) -> bool:
        return self.allowed is not None or bool(self.verify_url)

    def reload(self) -> str:
        """Re-read the allow file. Raises :class:`AllowListError` and keeps the old list if bad."""
        if not self.allow_file:
            return "no allow file"
        keys = load_allow_file(self.allow_file)
        self.allowed = keys
        return f"allow file {self.allow_file}: {len(keys)} node keys"

    async def check(self, key: bytes, source: str) -> Decision:
        if self.allowed is not None and key not in self.allowed:
            return Decision(REJECT_NOT_ALLOWED, None, f"not in allow file {self.allow_file}")
        if not self.verify_url:
            return Decision(None)
        verdict = await verify_client_url(
            self.verify_url,
            "nodekey:" + key.hex(),
            source,
            time_limit=self.url_timeout,
            ssl_context=self.ssl_context,
        )
        if verdict.status == "allow":
            return Decision(None, "allowed")
        if verdict.status == "deny":
            return Decision(REJECT_URL_DENIED, "denied", verdict.detail)
        if self.fail_open:
            log.warning("%s; allowing client nodekey:%s (fail open)", verdict.detail, key.hex()[:16])
            return Decision(None, "fail_open", verdict.detail)
        return Decision(REJECT_URL_UNREACHABLE, "fail_closed", verdict.detail)
