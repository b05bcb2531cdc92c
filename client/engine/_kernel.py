"""The kernel WireGuard backend: ``ip link add type wireguard``, configured with ``wg``.

The kernel module has no UAPI socket, so a :class:`~client.uapi.SetRequest` is translated into a
``wg`` command line (:func:`wg_set_command`) and ``wg show <ifname> dump`` is parsed back into
:class:`~client.uapi.DeviceStats` (:func:`parse_wg_dump`). ``wg`` writes keys in base64, UAPI in hex;
the translation is done here. Private keys go to ``wg`` on stdin (``/dev/stdin``), never on argv.

Two UAPI features have no ``wg set`` spelling and are refused with EngineError rather than approximated:
``update_only``, and adding allowed IPs without replacing them (``wg set ... allowed-ips`` always
replaces the peer's list). ``replace_peers`` is done with ``wg setconf`` (which replaces the whole
configuration) fed a config file on stdin.

Not runnable on the project's machines (no kernel module there: ``ip link add ... type wireguard``
fails with "Unknown device type"); the command lines and the dump parser are unit-tested.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from natlib.keys import KeyFormatError, NodePrivateKey, NodePublicKey

from .._endpoint import Endpoint, EndpointFormatError
from ..uapi import DeviceStats, PeerStats, SetRequest
from ._base import EngineError, InterfaceConfig, check_ifname, configure_interface, link_exists, run_command

__all__ = ["KernelWireGuard", "WgCommand", "open_kernel_wireguard", "parse_wg_dump", "wg_set_command"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WgCommand:
    """A ``wg`` invocation: its argv and what to write to its stdin (private keys, config text)."""

    argv: tuple[str, ...]
    stdin: bytes = b""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def wg_set_command(ifname: str, request: SetRequest, *, wg: str = "wg") -> WgCommand:
    """Translate a UAPI ``set`` request into one ``wg set`` (or ``wg setconf``) command."""
    for peer in request.peers:
        if peer.update_only and not peer.remove:
            raise EngineError(f"kernel backend: wg has no update-only mode (peer {peer.public_key.short()})")
    if request.replace_peers:
        return WgCommand((wg, "setconf", ifname, "/dev/stdin"), _setconf_text(request).encode("ascii"))
    argv = [wg, "set", ifname]
    stdin = b""
    if request.listen_port is not None:
        argv += ["listen-port", str(request.listen_port)]
    if request.fwmark is not None:
        argv += ["fwmark", str(request.fwmark)]
    if request.private_key is not None:
        argv += ["private-key", "/dev/stdin"]
        stdin = _b64(request.private_key.raw).encode("ascii") + b"\n"
    for peer in request.peers:
        argv += ["peer", _b64(peer.public_key.raw)]
        if peer.remove:
            argv.append("remove")
            continue
        if peer.endpoint is not None:
            argv += ["endpoint", peer.endpoint.text()]
        if peer.persistent_keepalive_interval is not None:
            argv += ["persistent-keepalive", str(peer.persistent_keepalive_interval)]
        if peer.allowed_ips and not peer.replace_allowed_ips:
            raise EngineError(
                f"kernel backend: wg set always replaces allowed IPs; set replace_allowed_ips with the "
                f"full list (peer {peer.public_key.short()})"
            )
        if peer.replace_allowed_ips:
            argv += ["allowed-ips", ",".join(str(p) for p in peer.allowed_ips)]
    return WgCommand(tuple(argv), stdin)


def _setconf_text(request: SetRequest) -> str:
    lines = ["[Interface]"]
    if request.private_key is not None:
        lines.append(f"PrivateKey = {_b64(request.private_key.raw)}")
    if request.listen_port is not None:
        lines.append(f"ListenPort = {request.listen_port}")
    if request.fwmark is not None:
        lines.append(f"FwMark = {request.fwmark}")
    for peer in request.peers:
        if peer.remove:
            continue  # setconf replaces every peer: one that is removed is simply not listed
        if peer.allowed_ips and not peer.replace_allowed_ips:
            raise EngineError(
                f"kernel backend: with replace_peers a peer's allowed IPs are its full list; set "
                f"replace_allowed_ips (peer {peer.public_key.short()})"
            )
        lines += ["", "[Peer]", f"PublicKey = {_b64(peer.public_key.raw)}"]
        if peer.endpoint is not None:
            lines.append(f"Endpoint = {peer.endpoint.text()}")
        if peer.persistent_keepalive_interval is not None:
            lines.append(f"PersistentKeepalive = {peer.persistent_keepalive_interval}")
        if peer.allowed_ips:
            lines.append(f"AllowedIPs = {', '.join(str(p) for p in peer.allowed_ips)}")
    return "\n".join(lines) + "\n"


class WgDumpError(EngineError):
    """``wg show <ifname> dump`` printed something this parser does not understand."""


def _key_from_b64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WgDumpError(f"wg dump: {what} {text[:50]!r} is not base64") from None
    if len(raw) != 32:
        raise WgDumpError(f"wg dump: {what} is {len(raw)} bytes, not 32")
    return raw


def _number(text: str, what: str, *, off: str | None = None) -> int:
    if off is not None and text == off:
        return 0
    if not text.isascii() or not text.isdigit():
        raise WgDumpError(f"wg dump: {what} {text[:30]!r} is not a number")
    return int(text)


def parse_wg_dump(text: str) -> DeviceStats:
    """Parse ``wg show <ifname> dump``: a tab-separated interface line, then one line per peer.

    Interface: private-key, public-key, listen-port, fwmark ("off" = 0). Peer: public-key,
    preshared-key, endpoint ("(none)"), allowed-ips (comma-separated or "(none)"), latest-handshake
    (seconds, 0 = never), transfer-rx, transfer-tx, persistent-keepalive ("off" = 0).
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise WgDumpError("wg dump: empty output")
    head = lines[0].split("\t")
    if len(head) != 4:
        raise WgDumpError(f"wg dump: interface line has {len(head)} fields, not 4")
    try:
        private_key = None if head[0] == "(none)" else NodePrivateKey(_key_from_b64(head[0], "private key"))
    except KeyFormatError:
        raise WgDumpError("wg dump: bad private key") from None
    listen_port = _number(head[2], "listen port")
    fwmark = _number(head[3], "fwmark", off="off")
    peers = []
    for lineno, line in enumerate(lines[1:], start=2):
        f = line.split("\t")
        if len(f) != 8:
            raise WgDumpError(f"wg dump: line {lineno} has {len(f)} fields, not 8")
        endpoint = None
        if f[2] != "(none)":
            try:
                endpoint = Endpoint.parse(f[2])
            except EndpointFormatError as e:
                raise WgDumpError(f"wg dump: line {lineno}: endpoint: {e}") from None
        allowed = []
        if f[3] != "(none)":
            for prefix in f[3].split(","):
                try:
                    allowed.append(ipaddress.ip_network(prefix.strip(), strict=False))
                except ValueError:
                    raise WgDumpError(f"wg dump: line {lineno}: {prefix[:50]!r} is not a prefix") from None
        peers.append(
            PeerStats(
                public_key=NodePublicKey(_key_from_b64(f[0], "public key")),
                endpoint=endpoint,
                last_handshake_time_sec=_number(f[4], "latest handshake"),
                rx_bytes=_number(f[5], "transfer-rx"),
                tx_bytes=_number(f[6], "transfer-tx"),
                persistent_keepalive_interval=_number(f[7], "persistent keepalive", off="off"),
                allowed_ips=tuple(allowed),
            )
        )
    return DeviceStats(private_key, listen_port, fwmark, tuple(peers))


class KernelWireGuard:
    """A kernel WireGuard interface driven with ``wg``. Made by :func:`open_kernel_wireguard`."""

    def __init__(self, ifname: str, *, wg: str = "wg") -> None:
        self._ifname = ifname
        self._wg = wg

    @property
    def ifname(self) -> str:
        return self._ifname

    async def configure(self, request: SetRequest) -> None:
        command = wg_set_command(self._ifname, request, wg=self._wg)
        await run_command(command.argv, input=command.stdin)

    async def stats(self) -> DeviceStats:
        return parse_wg_dump(await run_command([self._wg, "show", self._ifname, "dump"]))


def link_add_command(ifname: str) -> list[str]:
    return ["ip", "link", "add", "dev", ifname, "type", "wireguard"]


@asynccontextmanager
async def open_kernel_wireguard(
    ifname: str, interface: InterfaceConfig | None = None, *, wg: str = "wg"
) -> AsyncIterator[KernelWireGuard]:
    """Create the kernel interface ``ifname``, set it up with ``ip`` and yield the engine; leaving the
    context (also by cancellation, shielded) deletes the interface."""
    check_ifname(ifname)
    if await link_exists(ifname):
        raise EngineError(f"interface {ifname} already exists; pick another name or delete it")
    await run_command(link_add_command(ifname))
    try:
        if interface is not None:
            await configure_interface(ifname, interface)
        yield KernelWireGuard(ifname, wg=wg)
    finally:
        with anyio.CancelScope(shield=True):
            await run_command(["ip", "link", "del", "dev", ifname])
            logger.info("deleted kernel WireGuard interface %s", ifname)
