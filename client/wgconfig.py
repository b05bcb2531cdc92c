"""From the mesh file and a key file to the engine's configuration.

Pure functions: every node derives its WireGuard setup from the shared mesh file and its own keys.

* :func:`find_self` finds the key file's node in the mesh (and checks that the disco keys agree).
* :func:`interface_config` gives the interface its overlay addresses (``/32`` and ``/128``) and routes
  every peer's allowed IPs (overlay addresses plus subnet routes) into it.
* :func:`engine_request` is the UAPI ``set`` that installs the private key, the listen port and all
  peers, replacing whatever the engine had. A peer's endpoint is the one passed in ``endpoints``
  (``meshnode up`` will pass each peer's loopback proxy socket there, natlib carrying the datagrams),
  else the peer's first static endpoint from the mesh file, else none (WireGuard then waits for the
  peer to reach it first).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path

from natlib.keys import NodePublicKey

from ._endpoint import Endpoint
from .engine import DEFAULT_MTU, InterfaceConfig
from .keyfile import NodeKeys, key_file_error
from .meshfile import MeshFile, MeshNode
from .uapi import PeerConfig, SetRequest

__all__ = ["engine_request", "find_self", "interface_config"]


def find_self(mesh: MeshFile, keys: NodeKeys, key_path: str | Path) -> MeshNode:
    """The mesh node whose node key is ``keys``' public key.

    KeyFileError (naming ``key_path``, the line and the field) if no node has that key, or if that
    node's disco key is not the public half of ``keys.disco_key``.
    """
    public = keys.node_key.public
    for i, node in enumerate(mesh.nodes):
        if node.node_key != public:
            continue
        if node.disco_key != keys.disco_key.public:
            raise key_file_error(
                key_path,
                "disco_key",
                f"its public key {keys.disco_key.public.text()} differs from node[{i}].disco_key "
                f"({node.name}) in {mesh.path}",
            )
        return node
    raise key_file_error(key_path, "node_key", f"its public key {public.text()} is not a node of {mesh.path}")


def interface_config(mesh: MeshFile, me: MeshNode, *, mtu: int = DEFAULT_MTU) -> InterfaceConfig:
    """``me``'s overlay addresses on the interface, and every peer's allowed IPs routed into it."""
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = [
        ipaddress.IPv4Interface(me.overlay_v4)
    ]
    if me.overlay_v6 is not None:
        addresses.append(ipaddress.IPv6Interface(me.overlay_v6))
    routes = tuple(net for peer in mesh.peers_of(me.node_key) for net in peer.allowed_ips)
    return InterfaceConfig(addresses=tuple(addresses), mtu=mtu, routes=routes)


def engine_request(
    mesh: MeshFile,
    keys: NodeKeys,
    *,
    listen_port: int,
    endpoints: Mapping[NodePublicKey, Endpoint] | None = None,
    persistent_keepalive_interval: int = 0,
) -> SetRequest:
    """The full engine configuration for the node of ``keys`` (``replace_peers``: idempotent)."""
    me_key = keys.node_key.public
    mesh.node(me_key)  # KeyError if this node is not in the mesh; find_self explains it better
    endpoints = endpoints or {}
    peers = []
    for peer in mesh.peers_of(me_key):
        endpoint = endpoints.get(peer.node_key) or (peer.endpoints[0] if peer.endpoints else None)
        peers.append(
            PeerConfig(
                peer.node_key,
                endpoint=endpoint,
                persistent_keepalive_interval=persistent_keepalive_interval,
                replace_allowed_ips=True,
                allowed_ips=peer.allowed_ips,
            )
        )
    return SetRequest(
        private_key=keys.node_key, listen_port=listen_port, replace_peers=True, peers=tuple(peers)
    )
