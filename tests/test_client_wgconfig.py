"""client.wgconfig: from a mesh file and a key file to the interface setup and the exact UAPI bytes."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from client.engine import interface_commands
from client.keyfile import KeyFileError, NodeKeys, write_key_file
from client.meshfile import parse_mesh_file
from client.uapi import Endpoint, encode_set
from client.wgconfig import engine_request, find_self, interface_config
from natlib.keys import DiscoPrivateKey, NodePrivateKey

KEYS = [NodeKeys(NodePrivateKey(bytes([i]) * 32), DiscoPrivateKey(bytes([i + 100]) * 32)) for i in (1, 2, 3)]


def _mesh_text(disco_of_alpha: str | None = None) -> str:
    k = [(keys.node_key.public.text(), keys.disco_key.public.text()) for keys in KEYS]
    return textwrap.dedent(f"""\
        [mesh]
        name = "lab"
        [[relay_map.region]]
        id = 900
        code = "lab"
        [[relay_map.region.node]]
        host = "relay.lab.test"

        [[node]]
        name = "alpha"
        node_key = "{k[0][0]}"
        disco_key = "{disco_of_alpha or k[0][1]}"
        overlay_v4 = "100.64.0.1"
        overlay_v6 = "fd7a:115c:a1e0::1"

        [[node]]
        name = "beta"
        node_key = "{k[1][0]}"
        disco_key = "{k[1][1]}"
        overlay_v4 = "100.64.0.2"
        endpoints = ["198.51.100.7:41641", "198.51.100.8:41641"]
        subnet_routes = ["10.1.0.0/24"]

        [[node]]
        name = "gamma"
        node_key = "{k[2][0]}"
        disco_key = "{k[2][1]}"
        overlay_v4 = "100.64.0.3"
        overlay_v6 = "fd7a:115c:a1e0::3"
        """)


MESH = parse_mesh_file(_mesh_text(), "mesh.toml")


def test_interface_config_for_alpha() -> None:
    alpha = MESH.node_named("alpha")
    assert interface_commands("mesh0", interface_config(MESH, alpha)) == [
        ["ip", "link", "set", "dev", "mesh0", "mtu", "1280"],
        ["ip", "address", "add", "100.64.0.1/32", "dev", "mesh0"],
        ["ip", "address", "add", "fd7a:115c:a1e0::1/128", "dev", "mesh0", "nodad"],
        ["ip", "link", "set", "dev", "mesh0", "up"],
        ["ip", "route", "replace", "100.64.0.2/32", "dev", "mesh0"],
        ["ip", "route", "replace", "10.1.0.0/24", "dev", "mesh0"],
        ["ip", "route", "replace", "100.64.0.3/32", "dev", "mesh0"],
        ["ip", "route", "replace", "fd7a:115c:a1e0::3/128", "dev", "mesh0"],
    ]
    beta = MESH.node_named("beta")
    assert interface_config(MESH, beta, mtu=1360).addresses == (ipaddress.ip_interface("100.64.0.2/32"),)


def test_engine_request_bytes_for_alpha() -> None:
    proxy = Endpoint.parse("127.0.0.1:40003")
    request = engine_request(MESH, KEYS[0], listen_port=41641, endpoints={KEYS[2].node_key.public: proxy})
    beta_hex = KEYS[1].node_key.public.hex()
    gamma_hex = KEYS[2].node_key.public.hex()
    assert encode_set(request).decode() == (
        "set=1\n"
        f"private_key={KEYS[0].node_key.hex()}\n"
        "listen_port=41641\n"
        "replace_peers=true\n"
        f"public_key={beta_hex}\n"
        "endpoint=198.51.100.7:41641\n"  # beta's first static endpoint
        "persistent_keepalive_interval=0\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=100.64.0.2/32\n"
        "allowed_ip=10.1.0.0/24\n"
        f"public_key={gamma_hex}\n"
        "endpoint=127.0.0.1:40003\n"  # the endpoint passed in wins
        "persistent_keepalive_interval=0\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=100.64.0.3/32\n"
        "allowed_ip=fd7a:115c:a1e0::3/128\n"
        "\n"
    )


def test_engine_request_without_endpoints_and_with_keepalive() -> None:
    request = engine_request(MESH, KEYS[1], listen_port=0, persistent_keepalive_interval=25)
    assert [(p.public_key, p.endpoint) for p in request.peers] == [
        (KEYS[0].node_key.public, None),
        (KEYS[2].node_key.public, None),
    ]
    assert {p.persistent_keepalive_interval for p in request.peers} == {25}
    with pytest.raises(KeyError):
        engine_request(MESH, NodeKeys.generate(), listen_port=0)


def test_find_self(tmp_path: Path) -> None:
    key_path = tmp_path / "node.key"
    write_key_file(key_path, KEYS[1])
    assert find_self(MESH, KEYS[1], key_path) is MESH.node_named("beta")

    stranger = NodeKeys.generate()
    with pytest.raises(KeyFileError) as info:
        find_self(MESH, stranger, key_path)
    assert str(info.value) == (
        f"{key_path}:2: node_key: its public key {stranger.node_key.public.text()} is not a node of mesh.toml"
    )

    other_disco = DiscoPrivateKey.generate()
    mesh = parse_mesh_file(_mesh_text(disco_of_alpha=other_disco.public.text()), "mesh.toml")
    with pytest.raises(KeyFileError) as info:
        find_self(mesh, KEYS[0], key_path)
    assert str(info.value) == (
        f"{key_path}:3: disco_key: its public key {KEYS[0].disco_key.public.text()} differs from "
        "node[0].disco_key (alpha) in mesh.toml"
    )
