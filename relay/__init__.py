"""meshrelay: a DERP v2 relay in trio, wire-compatible with Tailscale's ``derper``.

The command is ``meshrelay`` (:mod:`relay.cli`). Embedders and tests use :class:`RelayServer`.
"""

__version__ = "0.1.0"

from ._server import RelayServer
from ._stats import RelayStats

__all__ = ["RelayServer", "RelayStats", "__version__"]
