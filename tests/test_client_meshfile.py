"""client.meshfile: a valid mesh file's typed form, and one-line errors naming file, line and field."""

from __future__ import annotations

import ipaddress
import json
import textwrap
from pathlib import Path

import pytest

from client._tomlpos import TomlPositions, format_path
from client.meshfile import Endpoint, MeshFileError, load_mesh_file, parse_mesh_file
from natlib.keys import DiscoPublicKey, NodePublicKey

NK = [NodePublicKey(bytes([i]) * 32) for i in (1, 2, 3)]
DK = [DiscoPublicKey(bytes([i]) * 32) for i in (0xA1, 0xA2, 0xA3)]

VALID = textwrap.dedent(f"""\
    # a three-node mesh
    [mesh]
    name = "lab"

    [[relay_map.region]]
    id = 900
    code = "lab"
    [[relay_map.region.node]]
    name = "900a"
    host = "relay.lab.test"
    ipv4 = "198.51.100.10"
    stun_port = -1

    [[relay_map.region]]
    id = 901
    code = "lab2"
    name = "Second lab"
    [[relay_map.region.node]]
    host = "relay2.lab.test"
    ipv6 = "2001:db8::10"
    derp_port = 8443
    insecure_for_tests = true

    [[node]]
    name = "alpha"
    node_key = "{NK[0].text()}"
    disco_key = "{DK[0].text()}"
    overlay_v4 = "100.64.0.1"
    overlay_v6 = "fd7a:115c:a1e0::1"

    [[node]]
    name = "beta"
    node_key = "{NK[1].text()}"
    disco_key = "{DK[1].text()}"
    overlay_v4 = "100.64.0.2"
    endpoints = [
        "198.51.100.7:41641",
        "[2001:db8::7]:41641",
    ]
    subnet_routes = ["10.1.0.0/24", "fd00:1::/64"]

    [[node]]
    name = "gamma"
    node_key = "{NK[2].text()}"
    disco_key = "{DK[2].text()}"
    overlay_v4 = "100.127.255.254"
""")


def _line_of(text: str, needle: str) -> int:
    [n] = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    return n


def _error(text: str, path: str = "mesh.toml") -> MeshFileError:
    with pytest.raises(MeshFileError) as info:
        parse_mesh_file(text, path)
    assert "\n" not in str(info.value)
    return info.value


def test_valid_file_in_full() -> None:
    mesh = parse_mesh_file(VALID, "/etc/meshnode/mesh.toml")
    assert mesh.name == "lab"
    assert mesh.path == Path("/etc/meshnode/mesh.toml")
    r900, r901 = mesh.relay_map.regions
    assert (r900.region_id, r900.code, r900.name) == (900, "lab", "lab")
    [n] = r900.nodes
    assert (n.name, n.host_name, str(n.ipv4), n.ipv6, n.derp_port, n.stun_port) == (
        "900a",
        "relay.lab.test",
        "198.51.100.10",
        None,
        443,
        None,
    )
    [n2] = r901.nodes
    assert (n2.name, str(n2.ipv6), n2.derp_port, n2.stun_port, n2.insecure_for_tests) == (
        "9010",
        "2001:db8::10",
        8443,
        3478,
        True,
    )
    assert mesh.relay_map.region(901) is r901
    alpha, beta, gamma = mesh.nodes
    assert alpha.node_key == NK[0]
    assert alpha.disco_key == DK[0]
    assert alpha.overlay_addresses == (
        ipaddress.IPv4Address("100.64.0.1"),
        ipaddress.IPv6Address("fd7a:115c:a1e0::1"),
    )
    assert [str(n) for n in alpha.allowed_ips] == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
    assert beta.endpoints == (Endpoint.parse("198.51.100.7:41641"), Endpoint.parse("[2001:db8::7]:41641"))
    assert [str(n) for n in beta.allowed_ips] == ["100.64.0.2/32", "10.1.0.0/24", "fd00:1::/64"]
    assert gamma.overlay_v6 is None
    assert mesh.node(NK[2]) is gamma
    assert mesh.node_named("beta") is beta
    assert mesh.peers_of(NK[1]) == (alpha, gamma)
    with pytest.raises(KeyError):
        mesh.node(NodePublicKey(bytes(32)))


def test_load_from_disk_with_derpmap_json(tmp_path: Path) -> None:
    derpmap = {
        "Regions": {
            "902": {
                "RegionID": 902,
                "RegionCode": "x",
                "RegionName": "X",
                "Nodes": [{"Name": "902a", "RegionID": 902, "HostName": "derp.example", "STUNPort": 3479}],
            },
            "900": {
                "RegionID": 900,
                "RegionCode": "lab",
                "Nodes": [{"HostName": "relay.lab.test", "IPv4": "192.0.2.9"}],
            },
        }
    }
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "derp.json").write_text(json.dumps(derpmap, indent=2))
    start = VALID.index("[[relay_map.region]]")
    end = VALID.index("[[node]]")
    text = VALID[:start] + '[relay_map]\nderpmap = "maps/derp.json"\n\n' + VALID[end:]
    (tmp_path / "mesh.toml").write_text(text)
    mesh = load_mesh_file(tmp_path / "mesh.toml")
    assert mesh.relay_map.source == tmp_path / "maps" / "derp.json"
    assert [r.region_id for r in mesh.relay_map.regions] == [900, 902]  # sorted by id
    r900, r902 = mesh.relay_map.regions
    assert (r900.nodes[0].host_name, str(r900.nodes[0].ipv4), r900.nodes[0].derp_port) == (
        "relay.lab.test",
        "192.0.2.9",
        443,
    )
    assert (r902.name, r902.nodes[0].name, r902.nodes[0].stun_port) == ("X", "902a", 3479)


def test_derpmap_errors_name_the_json_file_line_and_field(tmp_path: Path) -> None:
    start = VALID.index("[[relay_map.region]]")
    end = VALID.index("[[node]]")
    (tmp_path / "mesh.toml").write_text(VALID[:start] + '[relay_map]\nderpmap = "d.json"\n\n' + VALID[end:])
    derpmap = {"Regions": {"900": {"RegionID": 900, "Nodes": [{"HostName": 5}]}}}
    (tmp_path / "d.json").write_text(json.dumps(derpmap, indent=2))  # "HostName" is on line 7
    with pytest.raises(MeshFileError) as info:
        load_mesh_file(tmp_path / "mesh.toml")
    assert str(info.value) == f"{tmp_path / 'd.json'}:7: Regions.900.Nodes[0].HostName: must be a string"
    (tmp_path / "d.json").write_text('{"Regions": {"900": {"RegionID": 901, "Nodes": []}}}')
    with pytest.raises(
        MeshFileError, match=r"d\.json:1: Regions\.900\.RegionID: 901 must be positive and match"
    ):
        load_mesh_file(tmp_path / "mesh.toml")
    (tmp_path / "d.json").write_text('{\n"Regions": {,}}')
    with pytest.raises(MeshFileError, match=r"d\.json:2: invalid JSON: Expecting property name"):
        load_mesh_file(tmp_path / "mesh.toml")
    (tmp_path / "d.json").unlink()
    with pytest.raises(MeshFileError) as info:
        load_mesh_file(tmp_path / "mesh.toml")
    line = _line_of((tmp_path / "mesh.toml").read_text(), "derpmap =")
    assert str(info.value) == (
        f"{tmp_path / 'mesh.toml'}:{line}: relay_map.derpmap: cannot read {tmp_path / 'd.json'}: "
        "No such file or directory"
    )


def _replace(old: str, new: str) -> str:
    assert VALID.count(old) == 1, old
    return VALID.replace(old, new)


@pytest.mark.parametrize(
    ("old", "new", "field", "problem"),
    [
        (
            'overlay_v4 = "100.64.0.2"',
            'overlay_v4 = "10.0.0.2"',
            "node[1].overlay_v4",
            "10.0.0.2 is not a host address in 100.64.0.0/10",
        ),
        (
            'overlay_v4 = "100.64.0.2"',
            'overlay_v4 = "100.64.0.0"',
            "node[1].overlay_v4",
            "100.64.0.0 is not a host address in 100.64.0.0/10",
        ),
        (
            'overlay_v4 = "100.64.0.2"',
            'overlay_v4 = "fd7a::2"',
            "node[1].overlay_v4",
            "'fd7a::2' is not an IPv4 address",
        ),
        (
            'overlay_v4 = "100.64.0.2"',
            "overlay_v4 = 1",
            "node[1].overlay_v4",
            "must be a string, not an integer",
        ),
        (
            'overlay_v6 = "fd7a:115c:a1e0::1"',
            'overlay_v6 = "2001:db8::1"',
            "node[0].overlay_v6",
            "2001:db8::1 is not in the unique local range fd00::/8",
        ),
        (
            'overlay_v6 = "fd7a:115c:a1e0::1"',
            'overlay_v6 = "fe80::1%eth0"',
            "node[0].overlay_v6",
            "'fe80::1%eth0': scoped addresses are not allowed",
        ),
        ('name = "beta"', 'name = "alpha"', "node[1].name", "'alpha' already used by node[0]"),
        (
            'name = "beta"',
            'name = "Beta_1"',
            "node[1].name",
            "'Beta_1' must be a DNS label (a-z, 0-9, '-', at most 63)",
        ),
        (
            f'node_key = "{NK[1].text()}"',
            f'node_key = "{NK[0].text()}"',
            "node[1].node_key",
            "same as node[0] (alpha)",
        ),
        (
            f'disco_key = "{DK[2].text()}"',
            f'disco_key = "{DK[0].text()}"',
            "node[2].disco_key",
            "same as node[0] (alpha)",
        ),
        (
            f'node_key = "{NK[1].text()}"',
            f'node_key = "{DK[1].text()}"',
            "node[1].node_key",
            "not a nodekey:<64 hex digits> key: NodePublicKey text must start with 'nodekey:'",
        ),
        (
            f'disco_key = "{DK[1].text()}"',
            'disco_key = "discokey:1234"',
            "node[1].disco_key",
            "not a discokey:<64 hex digits> key: expected 64 hex digits, got 4 characters",
        ),
        ('"198.51.100.7:41641",', '"198.51.100.7",', "node[1].endpoints", "'198.51.100.7' is not ip:port"),
        (
            'subnet_routes = ["10.1.0.0/24", "fd00:1::/64"]',
            'subnet_routes = ["10.1.0.1/24"]',
            "node[1].subnet_routes",
            "'10.1.0.1/24' is not a network prefix (10.1.0.1/24 has host bits set)",
        ),
        (
            'subnet_routes = ["10.1.0.0/24", "fd00:1::/64"]',
            'subnet_routes = ["100.64.0.0/16"]',
            "node[1].subnet_routes",
            "100.64.0.0/16 overlaps node[0] (alpha) overlay_v4 100.64.0.1/32",
        ),
        (
            'subnet_routes = ["10.1.0.0/24", "fd00:1::/64"]',
            'subnet_routes = ["10.1.0.0/24", "10.1.0.128/25"]',
            "node[1].subnet_routes",
            "10.1.0.128/25 overlaps this node's subnet_routes 10.1.0.0/24",
        ),
        (
            'subnet_routes = ["10.1.0.0/24", "fd00:1::/64"]',
            'subnet_routes = "10.1.0.0/24"',
            "node[1].subnet_routes",
            "must be an array of strings, not a string",
        ),
        (
            'subnet_routes = ["10.1.0.0/24", "fd00:1::/64"]',
            "subnet_routes = [1]",
            "node[1].subnet_routes",
            "entry 0 must be a string, not an integer",
        ),
        (
            'subnet_routes = ["10.1.0.0/24", "fd00:1::/64"]',
            'subnet_route = ["10.1.0.0/24"]',
            "node[1].subnet_route",
            "unknown field",
        ),
        (
            'host = "relay.lab.test"',
            'host = "relay lab"',
            "relay_map.region[0].node[0].host",
            "'relay lab' is not a host name",
        ),
        (
            "derp_port = 8443",
            "derp_port = 70000",
            "relay_map.region[1].node[0].derp_port",
            "70000 is not a port (1-65535, or 0 for 443)",
        ),
        (
            "stun_port = -1",
            "stun_port = -2",
            "relay_map.region[0].node[0].stun_port",
            "-2 is not a port (1-65535, 0 for 3478, -1 for none)",
        ),
        (
            "insecure_for_tests = true",
            'insecure_for_tests = "yes"',
            "relay_map.region[1].node[0].insecure_for_tests",
            "must be true or false, not a string",
        ),
        ("id = 901", "id = 900", "relay_map.region[1].id", "region id 900 already used by region[0]"),
        ("id = 901", "id = true", "relay_map.region[1].id", "must be an integer, not a boolean"),
        ('name = "lab"\n', 'name = "lab"\ncolour = "blue"\n', "mesh.colour", "unknown field"),
    ],
)
def test_each_error_names_file_line_and_field(old: str, new: str, field: str, problem: str) -> None:
    text = _replace(old, new)
    # The line is that of the offending key (the replaced one: the last line with that text); an
    # entry of a multi-line array is reported at its key's line.
    needle = {"node[1].endpoints": "endpoints = [", "mesh.colour": "colour"}.get(field, new.splitlines()[0])
    line = [i for i, ln in enumerate(text.splitlines(), start=1) if needle in ln][-1]
    err = _error(text)
    assert (err.path, err.line, err.field, err.problem) == (Path("mesh.toml"), line, field, problem)
    assert str(err) == f"mesh.toml:{line}: {field}: {problem}"


@pytest.mark.parametrize(
    ("old", "new", "line_needle", "message"),
    [
        ('overlay_v4 = "100.64.0.2"\n', "", 'name = "beta"', "node[1]: missing field 'overlay_v4'"),
        ('[mesh]\nname = "lab"\n', "", None, "missing field 'mesh'"),
        (
            'host = "relay2.lab.test"\n',
            "",
            "[[relay_map.region.node]]",
            "relay_map.region[1].node[0]: missing field 'host'",
        ),
    ],
)
def test_missing_fields_point_at_their_table(
    old: str, new: str, line_needle: str | None, message: str
) -> None:
    text = _replace(old, new)
    err = _error(text)
    if line_needle == "[[relay_map.region.node]]":
        # The second region's node header.
        lines = [i for i, ln in enumerate(text.splitlines(), start=1) if ln.strip() == line_needle]
        expected = lines[1]
    elif line_needle is not None:
        expected = _line_of(text, line_needle) - 1  # the [[node]] header just above
    else:
        expected = 1
    assert str(err) == f"mesh.toml:{expected}: {message}"


def test_whole_file_problems() -> None:
    assert str(_error('[mesh]\nname = "x"\n[relay_map\n')) == (
        "mesh.toml:3: invalid TOML: Expected ']' at the end of a table declaration"
    )
    assert str(_error('[mesh]\nname = "x"\n[relay_map]\nderpmap = ')).startswith(
        "mesh.toml:4: invalid TOML: "
    )
    nodes_start = VALID.index("[[node]]")
    assert (
        str(_error(VALID[:nodes_start])) == "mesh.toml:1: no [[node]] entries: a mesh needs at least one node"
    )
    no_relays = '[mesh]\nname = "x"\n[relay_map]\n' + VALID[nodes_start:]
    assert str(_error(no_relays)) == (
        'mesh.toml:3: relay_map: no relays: set derpmap = "FILE.json" or add [[relay_map.region]] entries'
    )
    both = VALID.replace(
        "[[relay_map.region]]\nid = 900", '[relay_map]\nderpmap = "x.json"\n[[relay_map.region]]\nid = 900', 1
    )
    assert str(_error(both)) == (
        f"mesh.toml:{_line_of(both, '[relay_map]') + 2}: relay_map.region: "
        "give either derpmap (a file) or [[relay_map.region]] entries, not both"
    )


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(MeshFileError) as info:
        load_mesh_file(tmp_path / "absent.toml")
    assert str(info.value) == f"{tmp_path / 'absent.toml'}:1: cannot read: No such file or directory"
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[mesh]\nname = "caf\xe9"\n')
    with pytest.raises(MeshFileError) as info:
        load_mesh_file(bad)
    assert str(info.value) == f"{bad}:2: not UTF-8 text"
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (1 << 20) + b"\n")
    with pytest.raises(MeshFileError, match="larger than 1048576 bytes"):
        load_mesh_file(huge)


def test_toml_positions_follow_nested_arrays_of_tables() -> None:
    text = textwrap.dedent("""\
        top = 1
        [a]
        x = [
          1,
          2,
        ]
        "quoted key" = 2
        s = '''
        y = "not a key"
        '''
        [[b]]
        k = 1
        [[b.c]]
        k = 2
        [[b.c]]
        k = 3
        [[b]]
        [[b.c]]
        k = 4
        [d.e]
        f.g = 5
        """)
    pos = TomlPositions(text)
    assert pos.line_of(("top",)) == 1
    assert pos.line_of(("a", "x")) == 3
    assert pos.line_of(("a", "quoted key")) == 7
    assert pos.line_of(("a", "y")) == 2  # inside a multi-line string: not a key, falls back to [a]
    assert pos.line_of(("b", 0, "k")) == 12
    assert pos.line_of(("b", 0, "c", 1, "k")) == 16
    assert pos.line_of(("b", 1)) == 17
    assert pos.line_of(("b", 1, "c", 0, "k")) == 19
    assert pos.line_of(("d", "e", "f", "g")) == 21
    assert pos.line_of(("nowhere", 3)) == 1
    assert format_path(("b", 1, "c", 0, "k")) == "b[1].c[0].k"
