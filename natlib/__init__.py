"""natlib: NAT traversal for Python programs, the Tailscale way.

Public namespaces:

- :mod:`natlib.keys`: node and disco key types with their text forms.
- :mod:`natlib.derp`: the DERP v2 wire format, handshake and client state machine (sans-io).
- :mod:`natlib.derphttp`: the DERP client driver (HTTP upgrade, TLS, WebSocket), under trio or asyncio.
- :mod:`natlib.stun`: a sans-io STUN codec over aioice's.
- :mod:`natlib.testing`: a NAT lab in network namespaces, with pytest fixtures.

natlib logs through ``logging.getLogger("natlib....")`` and never configures handlers.
"""

import logging

from .keys import DiscoPrivateKey, DiscoPublicKey, KeyFormatError, NodePrivateKey, NodePublicKey

__all__ = ["DiscoPrivateKey", "DiscoPublicKey", "KeyFormatError", "NodePrivateKey", "NodePublicKey"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
