"""What every engine backend shares: the Engine protocol, errors, and interface setup with ``ip``."""

from __future__ import annotations

import ipaddress
import logging
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

import anyio

from ..uapi import DeviceStats, SetRequest

__all__ = [
    "COMMAND_TIMEOUT",
    "DEFAULT_MTU",
    "Engine",
    "EngineError",
    "InterfaceConfig",
    "check_ifname",
    "interface_commands",
    "run_command",
]

logger = logging.getLogger(__name__)

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface

#: The overlay MTU. 1280 is IPv6's minimum link MTU, so the overlay can always carry IPv6, and it
#: leaves room on any underlay: WireGuard adds 32 bytes plus UDP/IP (80 in all over IPv6), and a
#: relayed packet also travels inside a DERP frame over TLS/TCP. Tailscale uses the same value.
#: (1360 = 1440 - 80 would also fit a 1500-byte IPv6 path; we prefer the value that always fits.)
DEFAULT_MTU: Final = 1280
#: How long one ``ip``/``wg`` command may take before the engine gives up on it.
COMMAND_TIMEOUT: Final = 10.0
MAX_IFNAME_LEN: Final = 15  # IFNAMSIZ - 1
_IFNAME_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")


class EngineError(Exception):
    """The engine could not be started, configured, queried or stopped."""


class Engine(Protocol):
    """A WireGuard engine with one interface, as the mesh client drives it.

    Backends are opened as async context managers (:func:`open_wireguard_go`,
    :func:`open_kernel_wireguard`); leaving the context removes the interface.
    """

    @property
    def ifname(self) -> str: ...

    async def configure(self, request: SetRequest) -> None:
        """Apply a UAPI ``set`` request (keys, listen port, peers); EngineError if refused.

        If cancelled, part of the request may have been applied: send it again (a request with
        ``replace_peers`` is idempotent).
        """
        ...

    async def stats(self) -> DeviceStats:
        """The device's current state: peers, endpoints, handshake times, rx/tx counters.

        Cancelling it changes nothing.
        """
        ...


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    """How the interface is set up with ``ip``: its addresses, MTU and the prefixes routed into it.

    Addresses are per node, Tailscale style (``100.64.0.1/32``, ``fd7a::1/128``); ``routes`` are the
    peers' allowed IPs, so the kernel sends exactly those prefixes into the tunnel.
    """

    addresses: tuple[IPInterface, ...] = ()
    mtu: int = DEFAULT_MTU
    routes: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        if not 1280 <= self.mtu <= 65535:
            raise ValueError(f"MTU {self.mtu} is not in 1280-65535")


def check_ifname(ifname: str) -> str:
    """Return ``ifname`` if Linux accepts it as an interface name; EngineError otherwise."""
    if not _IFNAME_RE.match(ifname) or ifname in (".", ".."):
        raise EngineError(
            f"{ifname!r} is not a valid interface name (1-{MAX_IFNAME_LEN} of A-Z a-z 0-9 _ . -)"
        )
    return ifname


def interface_commands(ifname: str, config: InterfaceConfig) -> list[list[str]]:
    """The ``ip`` commands that set up ``ifname`` as ``config`` says, in order."""
    commands = [["ip", "link", "set", "dev", ifname, "mtu", str(config.mtu)]]
    for address in config.addresses:
        command = ["ip", "address", "add", str(address), "dev", ifname]
        if address.version == 6:
            command.append("nodad")  # usable at once: nothing else can hold a mesh address here
        commands.append(command)
    commands.append(["ip", "link", "set", "dev", ifname, "up"])
    commands += [["ip", "route", "replace", str(route), "dev", ifname] for route in config.routes]
    return commands


async def run_command(argv: Sequence[str], *, input: bytes | None = None) -> str:
    """Run ``argv`` and return its stdout; EngineError (with its stderr) if it fails or times out.

    Cancellation kills the command.
    """
    logger.debug("running %s", " ".join(argv))
    try:
        with anyio.fail_after(COMMAND_TIMEOUT):
            result = await anyio.run_process(
                list(argv), input=input, check=False, stderr=subprocess.PIPE, stdout=subprocess.PIPE
            )
    except TimeoutError:
        raise EngineError(f"{' '.join(argv)}: no result within {COMMAND_TIMEOUT} s") from None
    except OSError as e:
        raise EngineError(f"{argv[0]}: cannot run: {e.strerror or e}") from None
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().replace("\n", "; ")
        raise EngineError(f"{' '.join(argv)} failed ({result.returncode}): {detail}")
    return result.stdout.decode(errors="replace")


async def configure_interface(ifname: str, config: InterfaceConfig) -> None:
    """Run :func:`interface_commands`; EngineError naming the failing command."""
    for command in interface_commands(ifname, config):
        await run_command(command)


async def link_exists(ifname: str) -> bool:
    try:
        result = await anyio.run_process(["ip", "link", "show", "dev", ifname], check=False)
    except OSError:
        return False
    return result.returncode == 0
