"""WireGuard engines for the mesh client, behind one small :class:`Engine` protocol.

* :func:`open_wireguard_go` starts and supervises ``wireguard-go -f <ifname>`` and talks the UAPI
  (:mod:`client.uapi`) over its UNIX socket. This is the engine the client uses and tests.
* :func:`open_kernel_wireguard` creates a kernel interface and drives it with ``wg``. Its command
  lines and ``wg show dump`` parsing are unit-tested; it cannot run where the kernel has no
  WireGuard module (the project's machines).

Both are async context managers: they set up the interface with ``ip`` (addresses, MTU
:data:`DEFAULT_MTU`, up, routes) from an :class:`InterfaceConfig`, and leaving the context, also by
cancellation, removes the interface. Everything runs under trio or asyncio (anyio).

::

    async with open_wireguard_go("mesh0", InterfaceConfig(addresses=(ip_interface("100.64.0.1/32"),))) as wg:
        await wg.configure(SetRequest(private_key=key, listen_port=41641, peers=(...)))
        stats = await wg.stats()
"""

from typing import TYPE_CHECKING

from ._base import DEFAULT_MTU, Engine, EngineError, InterfaceConfig, interface_commands
from ._kernel import KernelWireGuard, WgCommand, open_kernel_wireguard, parse_wg_dump, wg_set_command
from ._uapi_socket import uapi_get, uapi_set
from ._wggo import DEFAULT_SOCKET_DIR, WireGuardGo, open_wireguard_go

__all__ = [
    "DEFAULT_MTU",
    "DEFAULT_SOCKET_DIR",
    "Engine",
    "EngineError",
    "InterfaceConfig",
    "KernelWireGuard",
    "WgCommand",
    "WireGuardGo",
    "interface_commands",
    "open_kernel_wireguard",
    "open_wireguard_go",
    "parse_wg_dump",
    "uapi_get",
    "uapi_set",
    "wg_set_command",
]

if TYPE_CHECKING:
    # mypy checks here that both backends satisfy the Engine protocol.
    def _backends_are_engines(a: WireGuardGo, b: KernelWireGuard) -> tuple[Engine, Engine]:
        return a, b
