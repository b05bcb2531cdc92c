"""meshnode: a thin WireGuard mesh client built on natlib (issue 6).

Public namespaces:

- :mod:`client.meshfile`: the mesh file (TOML, shared by all nodes: mesh name, relay map, nodes with
  their public keys, overlay addresses, static endpoints and subnet routes), strictly validated.
- :mod:`client.keyfile`: one node's key file (node and disco private keys, mode 0600).
- :mod:`client.uapi`: a sans-io codec for WireGuard's userspace API (``set``/``get``, ``errno``).
- :mod:`client.engine`: WireGuard engines behind one protocol: wireguard-go (supervised, driven
  over its UAPI socket) and kernel WireGuard (driven with ``wg``); interfaces set up with ``ip``.
- :mod:`client.wgconfig`: mesh file + key file → the interface setup and the engine's UAPI ``set``.
- :mod:`client.daemon`: ``meshnode up``: wireguard-go, natlib's connection (``natlib.conn``) and the
  per-peer loopback proxies between them, a local control socket, the path table.
- :mod:`client.cli`: the ``meshnode`` command (``genkey``, ``check``, ``up``, ``status``, ``ping``,
  ``netcheck``, ``demo``); ``python -m client`` runs it.

Every file error (:class:`~client.meshfile.MeshFileError`, :class:`~client.keyfile.KeyFileError`)
is one line naming the file, the line and the field.

The client imports natlib, never relay. It logs through ``logging.getLogger("client....")``.
"""

__version__ = "0.1.0"
