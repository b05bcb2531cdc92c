"""natlib.derpmap: Tailscale JSON and headscale YAML relay maps, and the errors for bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natlib.derpmap import DERPMap, DERPMapError, DERPNode, DERPRegion, load_derp_map, parse_derp_map

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

NODE_900A = DERPNode(
    name="900a",
    region_id=900,
    host_name="derp1.example.com",
    ipv4="203.0.113.10",
    ipv6="2001:db8::10",
    stun_port=3478,
    derp_port=443,
    can_port80=True,
)


def test_deploy_json_and_headscale_yaml_are_the_same_map() -> None:
    from_json = load_derp_map(DEPLOY / "derpmap.json")
    from_yaml = load_derp_map(DEPLOY / "headscale" / "derp.yaml")
    assert from_json == from_yaml
    assert from_json.region_ids() == [900]
    region = from_json.regions[900]
    assert (region.region_code, region.region_name) == ("mr", "meshrelay region 900")
    assert [n.name for n in region.nodes] == ["900a", "900b", "900c"]
    assert region.nodes[0] == NODE_900A


def test_all_fields_and_defaults() -> None:
    text = json.dumps(
        {
            "HomeParams": {"RegionScore": {"1": 0.5}},
            "omitDefaultRegions": True,
            "Regions": {
                "1": {
                    "RegionID": 1,
                    "RegionCode": "a",
                    "RegionName": "A",
                    "Latitude": 1.5,
                    "Longitude": -2,
                    "Avoid": True,
                    "NoMeasureNoHome": True,
                    "Nodes": [
                        {"Name": "1a", "HostName": "a.example", "STUNPort": -1, "DERPPort": 8443,
                         "CertName": "sha256-raw:00", "InsecureForTests": True, "STUNOnly": True,
                         "STUNTestIP": "192.0.2.5", "IPv4": "none", "IPv6": "2001:DB8::1"},
                        {"Name": "1b", "RegionID": 1, "HostName": "b.example"},
                    ],
                }
            },
        }
    )  # fmt: skip
    m = parse_derp_map(text)
    assert m.region_score == {1: 0.5} and m.omit_default_regions is True
    region = m.regions[1]
    assert (region.latitude, region.longitude, region.avoid, region.no_measure_no_home) == (
        1.5,
        -2.0,
        True,
        True,
    )
    a, b = region.nodes
    assert a.effective_stun_port is None and a.effective_derp_port == 8443
    assert a.ipv6 == "2001:db8::1"  # normalised
    assert a.stun_address(4) == "192.0.2.5" and a.stun_address(6) is None  # STUNTestIP wins
    assert a.dial_host() == "2001:db8::1"
    assert b == DERPNode(name="1b", region_id=1, host_name="b.example")
    assert b.effective_stun_port == 3478 and b.effective_derp_port == 443
    assert b.stun_address(4) is None and b.dial_host() == "b.example"


def test_keys_match_case_insensitively_like_go() -> None:
    m = parse_derp_map('{"regions": {"7": {"NODES": [{"name": "n", "hostname": "h", "ipV4": "192.0.2.1"}]}}}')
    assert m.regions[7].nodes[0].ipv4 == "192.0.2.1"


def test_policy_file_wrapper_and_unknown_fields() -> None:
    m = parse_derp_map('{"derpMap": {"Regions": {"2": {"Nodes": [], "Future": 1}}}, "acls": []}')
    assert m == DERPMap(regions={2: DERPRegion(region_id=2)})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"Regions": {"1": {"Nodes": [{"Name": "a", "HostName": "h", "STUNPort": 70000}]}}}',
         "<m>: Regions.1.Nodes[0].STUNPort: must be an integer from -1 to 65535, got 70000"),
        ('{"Regions": {"1": {"Nodes": [{"Name": "a", "HostName": "h", "IPv4": "2001:db8::1"}]}}}',
         "<m>: Regions.1.Nodes[0].IPv4: must be an IPv4 address, got '2001:db8::1'"),
        ('{"Regions": {"1": {"Nodes": [{"Name": "", "HostName": "h"}]}}}',
         "<m>: Regions.1.Nodes[0].Name: a node needs a non-empty Name"),
        ('{"Regions": {"1": {"Nodes": [{"Name": "a"}]}}}',
         "<m>: Regions.1.Nodes[0].HostName: a node needs a non-empty HostName"),
        ('{"Regions": {"1": {"RegionID": 2}}}', "<m>: Regions.1.RegionID: is 2 but the region's key is 1"),
        ('{"Regions": {"x": {}}}', "<m>: Regions.x: region keys are region IDs (1 to 2^53-1), got 'x'"),
        ('{"Regions": {"1": {"Nodes": [{"Name": "a", "HostName": "h", "RegionID": 3}]}}}',
         "<m>: Regions.1.Nodes[0].RegionID: is 3 inside region 1"),
        ('{"Regions": {"1": {"Nodes": [{"Name": "a", "HostName": "h"}]}, '
         '"2": {"Nodes": [{"Name": "a", "HostName": "h"}]}}}',
         "<m>: Regions.2: node name 'a' is also used in region 1"),
        ('{"Regions": {"1": {"Nodes": {}}}}', "<m>: Regions.1.Nodes: must be a list of nodes, got {}"),
        ('{"Regions": {"1": {"Avoid": "yes"}}}', "<m>: Regions.1.Avoid: must be true or false, got 'yes'"),
        ('{"Regions": {}, "HomeParams": {"RegionScore": {"1": -1}}}',
         "<m>: HomeParams.RegionScore.1: must be a positive number, got -1"),
        ('{"Regions": {"1": {}}, "regions": {}}', "<m>: regions: duplicate field (also spelled 'Regions')"),
        ("{}", "<m>: Regions: the map has no Regions"),
        ("[]", "<m>:1: must be an object, got []"),  # not "{...": read as YAML, which has lines
        ('{"Regions": ', "<m>:1: invalid JSON: Expecting value (column 13)"),
    ],
)  # fmt: skip
def test_invalid_json_names_the_field(text: str, message: str) -> None:
    with pytest.raises(DERPMapError) as info:
        parse_derp_map(text, source="<m>")
    assert str(info.value) == message


def test_yaml_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "derp.yaml"
    path.write_text(
        "regions:\n"
        "  900:\n"
        "    regionid: 900\n"
        "    nodes:\n"
        "      - name: 900a\n"
        "        hostname: derp1.example.com\n"
        "        ipv4: not-an-ip\n"
    )
    with pytest.raises(DERPMapError) as info:
        load_derp_map(path)
    assert (
        str(info.value) == f"{path}:7: regions[900].nodes[0].ipv4: must be an IPv4 address, got 'not-an-ip'"
    )
    assert (info.value.line, info.value.path) == (7, "regions[900].nodes[0].ipv4")
    path.write_text("regions:\n  1: [unclosed\n")
    with pytest.raises(DERPMapError, match=rf"^{path}:3: invalid YAML: "):
        load_derp_map(path)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DERPMapError, match=r"missing\.json: cannot read: No such file"):
        load_derp_map(tmp_path / "missing.json")
    bad = tmp_path / "map.json"
    bad.write_bytes(b"\xff\xfe{}")
    with pytest.raises(DERPMapError, match=r"map\.json: not UTF-8 text \(byte 0\)"):
        load_derp_map(bad)
    empty = tmp_path / "map.yaml"
    empty.write_text("")
    with pytest.raises(DERPMapError, match=r"map\.yaml: the file is empty"):
        load_derp_map(empty)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_a_map_or_a_derpmap_error(text: str) -> None:
    try:
        parse_derp_map(text)
    except DERPMapError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
        ),
        max_leaves=12,
    )
)
def test_any_json_value_anywhere_is_a_map_or_a_derpmap_error(value: object) -> None:
    for document in (
        {"Regions": {"1": {"Nodes": [value]}}},
        {"Regions": {"1": value}},
        {"Regions": value},
        {"Regions": {}, "HomeParams": value},
        value,
    ):
        try:
            parse_derp_map(json.dumps(document))
        except DERPMapError:
            pass


def test_deep_nesting_and_alias_bombs_are_refused_or_read_quickly() -> None:
    with pytest.raises(DERPMapError, match="nested too deeply"):
        parse_derp_map("[" * 100_000, format="json")
    with pytest.raises(DERPMapError, match="nested too deeply"):
        parse_derp_map("a: " + "[" * 100_000)
    bomb = "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 8)}]\n" for i in range(9)
    )
    with pytest.raises(DERPMapError, match="Regions: the map has no Regions"):
        parse_derp_map(bomb)  # 8**10 leaves by reference: must not be walked one by one
