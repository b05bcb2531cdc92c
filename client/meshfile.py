"""The mesh file: one TOML file, shared by every node, that describes the whole mesh.

::

    [mesh]
    name = "lab"

    [relay_map]
    derpmap = "derpmap.json"        # a Tailscale DERPMap JSON file, relative to this file
    # ...or the regions inline:
    # [[relay_map.region]]
    # id = 900
    # code = "lab"
    # [[relay_map.region.node]]
    # name = "900a"
    # host = "relay.lab.test"
    # ipv4 = "198.51.100.10"        # optional; also ipv6, derp_port (443), insecure_for_tests
    #                               # (false), stun_port (3478; as in a DERPMap, 0 = 3478, -1 = none)

    [[node]]
    name = "alpha"
    node_key = "nodekey:<64 hex digits>"
    disco_key = "discokey:<64 hex digits>"
    overlay_v4 = "100.64.0.1"       # required, in 100.64.0.0/10
    overlay_v6 = "fd7a:115c:a1e0::1"  # optional, in the ULA range fd00::/8
    endpoints = ["198.51.100.7:41641"]   # optional static endpoints
    subnet_routes = ["10.1.0.0/24"]      # optional extra allowed IPs routed to this node

Each node's private keys live in its own key file (:mod:`client.keyfile`), never here.

Validation is strict, because every node must derive the same WireGuard configuration from this
file: unknown fields are errors (they are usually typos), names and keys are unique, and no two
nodes' allowed IPs (overlay addresses plus subnet routes) overlap, so that WireGuard's routing by
allowed IP is unambiguous. Every problem is a :class:`MeshFileError` whose text is one line naming
the file, the line and the field: ``mesh.toml:14: node[1].overlay_v4: 10.0.0.2 is not a host
address in 100.64.0.0/10``. The first problem found is reported. (tomllib gives no positions, so
the line is found by scanning the source: see ``client/_tomlpos.py``.)
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias, TypeVar

from natlib.keys import DiscoPublicKey, KeyFormatError, NodePublicKey

from ._endpoint import Endpoint, EndpointFormatError
from ._errors import FileFieldError
from ._tomlpos import TomlPath, TomlPositions, format_path, syntax_error_position

__all__ = [
    "MAX_MESH_FILE_BYTES",
    "MAX_NODES",
    "MAX_RELAY_REGIONS",
    "OVERLAY_V4_RANGE",
    "OVERLAY_V6_RANGE",
    "Endpoint",
    "MeshFile",
    "MeshFileError",
    "MeshNode",
    "RelayMap",
    "RelayNode",
    "RelayRegion",
    "load_mesh_file",
    "parse_mesh_file",
]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
_Fail: TypeAlias = Callable[[str], "MeshFileError"]
_PublicKeyT = TypeVar("_PublicKeyT", NodePublicKey, DiscoPublicKey)

#: Overlay IPv4 addresses come from the shared address space (RFC 6598), like Tailscale's.
OVERLAY_V4_RANGE: Final = ipaddress.IPv4Network("100.64.0.0/10")
#: Overlay IPv6 addresses come from the locally assigned unique local addresses (RFC 4193).
OVERLAY_V6_RANGE: Final = ipaddress.IPv6Network("fd00::/8")
MAX_MESH_FILE_BYTES: Final = 1 << 20
MAX_DERPMAP_BYTES: Final = 1 << 20
MAX_NODES: Final = 1024
MAX_RELAY_REGIONS: Final = 256
MAX_RELAYS_PER_REGION: Final = 64
MAX_ENDPOINTS_PER_NODE: Final = 16
MAX_ROUTES_PER_NODE: Final = 256
DEFAULT_DERP_PORT: Final = 443
DEFAULT_STUN_PORT: Final = 3478

_LABEL_RE: Final = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_HOST_RE: Final = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


class MeshFileError(FileFieldError):
    """A mesh file (or the DERPMap file it names) is unreadable or invalid.

    ``str(err)`` is one line, ``FILE:LINE: FIELD: PROBLEM``, as for every :class:`FileFieldError`.
    """


@dataclass(frozen=True, slots=True)
class RelayNode:
    """One relay server (a DERPMap node)."""

    name: str
    region_id: int
    host_name: str
    ipv4: ipaddress.IPv4Address | None = None
    ipv6: ipaddress.IPv6Address | None = None
    derp_port: int = DEFAULT_DERP_PORT
    stun_port: int | None = DEFAULT_STUN_PORT  # None: this node runs no STUN server
    insecure_for_tests: bool = False


@dataclass(frozen=True, slots=True)
class RelayRegion:
    region_id: int
    code: str
    name: str
    nodes: tuple[RelayNode, ...]


@dataclass(frozen=True, slots=True)
class RelayMap:
    """The relay regions: inline ones in file order, a DERPMap file's by region id. ``source`` is the
    DERPMap file, if they came from one."""

    regions: tuple[RelayRegion, ...]
    source: Path | None = None

    def region(self, region_id: int) -> RelayRegion:
        for r in self.regions:
            if r.region_id == region_id:
                return r
        raise KeyError(region_id)


@dataclass(frozen=True, slots=True)
class MeshNode:
    """One node of the mesh, as every other node sees it."""

    name: str
    node_key: NodePublicKey
    disco_key: DiscoPublicKey
    overlay_v4: ipaddress.IPv4Address
    overlay_v6: ipaddress.IPv6Address | None = None
    endpoints: tuple[Endpoint, ...] = ()
    subnet_routes: tuple[IPNetwork, ...] = ()

    @property
    def overlay_addresses(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
        return (self.overlay_v4,) if self.overlay_v6 is None else (self.overlay_v4, self.overlay_v6)

    @property
    def allowed_ips(self) -> tuple[IPNetwork, ...]:
        """What WireGuard routes to this node: its overlay addresses (/32, /128) and subnet routes."""
        own: list[IPNetwork] = [ipaddress.ip_network(a) for a in self.overlay_addresses]
        return (*own, *self.subnet_routes)


@dataclass(frozen=True, slots=True)
class MeshFile:
    path: Path
    name: str
    relay_map: RelayMap
    nodes: tuple[MeshNode, ...]

    def node(self, key: NodePublicKey) -> MeshNode:
        """The node with this public key; KeyError if it is not in the mesh."""
        for n in self.nodes:
            if n.node_key == key:
                return n
        raise KeyError(key)

    def node_named(self, name: str) -> MeshNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def peers_of(self, key: NodePublicKey) -> tuple[MeshNode, ...]:
        """Every node except the one with ``key``."""
        return tuple(n for n in self.nodes if n.node_key != key)


def load_mesh_file(path: str | Path) -> MeshFile:
    """Read and validate a mesh file (and the DERPMap file it names); MeshFileError if bad."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MESH_FILE_BYTES + 1)
    except OSError as e:
        raise MeshFileError(path, 1, "", f"cannot read: {e.strerror or e}") from None
    if len(data) > MAX_MESH_FILE_BYTES:
        raise MeshFileError(path, 1, "", f"larger than {MAX_MESH_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MeshFileError(path, line, "", "not UTF-8 text") from None
    return parse_mesh_file(text, path)


def parse_mesh_file(text: str, path: str | Path = "<mesh>") -> MeshFile:
    """Validate mesh file ``text``; ``path`` names it in errors and anchors a relative DERPMap path."""
    path = Path(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_syntax_error(path, e, text) from None
    return _MeshParser(path, text).parse(doc)


def _toml_syntax_error(path: Path, e: tomllib.TOMLDecodeError, text: str) -> MeshFileError:
    line, msg = syntax_error_position(e, text)
    return MeshFileError(path, line, "", f"invalid TOML: {msg}")


class _Table:
    """A TOML table being validated: typed getters that raise MeshFileError at the right line."""

    def __init__(self, parser: _MeshParser, path: TomlPath, data: Mapping[str, Any]) -> None:
        self._parser = parser
        self.path = path
        self._data = data
        self._used: set[str] = set()

    def error(self, key: str | int | None, problem: str) -> MeshFileError:
        return self._parser.error(self.path if key is None else (*self.path, key), problem)

    def fail(self, key: str) -> _Fail:
        """A callable turning a problem text into the MeshFileError for ``key``."""
        return lambda problem: self.error(key, problem)

    def has(self, key: str) -> bool:
        return key in self._data

    def _get(self, key: str, kind: type, what: str, required: bool) -> Any:
        self._used.add(key)
        if key not in self._data:
            if required:
                raise self.error(None, f"missing field {key!r}")
            return None
        value = self._data[key]
        # bool is an int in Python; TOML keeps them apart, and so do we.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.error(key, f"must be {what}, not {_toml_type(value)}")
        return value

    def required_str(self, key: str) -> str:
        value: str = self._get(key, str, "a string", True)
        return value

    def optional_str(self, key: str) -> str | None:
        value: str | None = self._get(key, str, "a string", False)
        return value

    def required_int(self, key: str) -> int:
        value: int = self._get(key, int, "an integer", True)
        return value

    def optional_int(self, key: str) -> int | None:
        value: int | None = self._get(key, int, "an integer", False)
        return value

    def optional_bool(self, key: str) -> bool:
        value: bool | None = self._get(key, bool, "true or false", False)
        return bool(value)

    def str_list(self, key: str, limit: int) -> list[str]:
        value: list[Any] | None = self._get(key, list, "an array of strings", False)
        if value is None:
            return []
        if len(value) > limit:
            raise self.error(key, f"at most {limit} entries")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(key, f"entry {i} must be a string, not {_toml_type(item)}")
        return value

    def required_table(self, key: str) -> _Table:
        value: dict[str, Any] = self._get(key, dict, "a table", True)
        return _Table(self._parser, (*self.path, key), value)

    def tables(self, key: str, limit: int) -> list[_Table]:
        """An array of tables (``[[key]]``); empty if absent."""
        value: list[Any] | None = self._get(key, list, "an array of tables", False)
        if value is None:
            return []
        if len(value) > limit:
            raise self.error(key, f"at most {limit} entries")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(key, f"entry {i} must be a table, not {_toml_type(item)}")
            out.append(_Table(self._parser, (*self.path, key, i), item))
        return out

    def reject_unknown(self) -> None:
        for key in self._data:
            if key not in self._used:
                raise self.error(key, "unknown field")


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__  # dates and times


class _MeshParser:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self._positions = TomlPositions(text)

    def error(self, field: Sequence[str | int], problem: str) -> MeshFileError:
        return MeshFileError(self.path, self._positions.line_of(field), format_path(field), problem)

    def parse(self, doc: dict[str, Any]) -> MeshFile:
        root = _Table(self, (), doc)
        mesh = root.required_table("mesh")
        name = mesh.required_str("name")
        if not _LABEL_RE.match(name):
            raise mesh.error("name", f"{name!r} must be a DNS label (a-z, 0-9, '-', at most 63)")
        mesh.reject_unknown()
        relay_map = self._relay_map(root.required_table("relay_map"))
        node_tables = root.tables("node", MAX_NODES)
        if not node_tables:
            raise root.error(None, "no [[node]] entries: a mesh needs at least one node")
        nodes = [self._node(t) for t in node_tables]
        root.reject_unknown()
        self._check_unique(node_tables, nodes)
        return MeshFile(self.path, name, relay_map, tuple(nodes))

    # --- relay map --------------------------------------------------------------------------------

    def _relay_map(self, t: _Table) -> RelayMap:
        if t.has("derpmap") and t.has("region"):
            raise t.error("region", "give either derpmap (a file) or [[relay_map.region]] entries, not both")
        derpmap = t.optional_str("derpmap")
        if derpmap is not None:
            t.reject_unknown()
            return _load_derpmap(self.path.parent / derpmap, t.fail("derpmap"))
        regions = [self._inline_region(r) for r in t.tables("region", MAX_RELAY_REGIONS)]
        t.reject_unknown()
        if not regions:
            raise t.error(None, 'no relays: set derpmap = "FILE.json" or add [[relay_map.region]] entries')
        seen: dict[int, int] = {}
        for i, region in enumerate(regions):
            if region.region_id in seen:
                raise self.error(
                    (*t.path, "region", i, "id"),
                    f"region id {region.region_id} already used by region[{seen[region.region_id]}]",
                )
            seen[region.region_id] = i
        return RelayMap(tuple(regions))

    def _inline_region(self, t: _Table) -> RelayRegion:
        region_id = t.required_int("id")
        if not 0 < region_id < 1 << 31:
            raise t.error("id", f"{region_id} is not a positive region id")
        code = t.required_str("code")
        name = t.optional_str("name") or code
        nodes = []
        for i, n in enumerate(t.tables("node", MAX_RELAYS_PER_REGION)):
            nodes.append(
                RelayNode(
                    name=n.optional_str("name") or f"{region_id}{i}",
                    region_id=region_id,
                    host_name=_check_host(n.required_str("host"), n.fail("host")),
                    ipv4=_check_v4(n.optional_str("ipv4"), n.fail("ipv4")),
                    ipv6=_check_v6(n.optional_str("ipv6"), n.fail("ipv6")),
                    derp_port=_derp_port(n.optional_int("derp_port"), n.fail("derp_port")),
                    stun_port=_stun_port(n.optional_int("stun_port"), n.fail("stun_port")),
                    insecure_for_tests=n.optional_bool("insecure_for_tests"),
                )
            )
            n.reject_unknown()
        t.reject_unknown()
        if not nodes:
            raise t.error(None, "a region needs at least one [[relay_map.region.node]]")
        return RelayRegion(region_id, code, name, tuple(nodes))

    # --- nodes ------------------------------------------------------------------------------------

    def _node(self, t: _Table) -> MeshNode:
        name = t.required_str("name")
        if not _LABEL_RE.match(name):
            raise t.error("name", f"{name!r} must be a DNS label (a-z, 0-9, '-', at most 63)")
        node_key = self._key(t, "node_key", NodePublicKey)
        disco_key = self._key(t, "disco_key", DiscoPublicKey)
        v4 = _check_v4(t.required_str("overlay_v4"), t.fail("overlay_v4"))
        assert v4 is not None
        if v4 not in OVERLAY_V4_RANGE or v4 in (OVERLAY_V4_RANGE[0], OVERLAY_V4_RANGE[-1]):
            raise t.error("overlay_v4", f"{v4} is not a host address in {OVERLAY_V4_RANGE}")
        v6 = _check_v6(t.optional_str("overlay_v6"), t.fail("overlay_v6"))
        if v6 is not None and v6 not in OVERLAY_V6_RANGE:
            raise t.error("overlay_v6", f"{v6} is not in the unique local range {OVERLAY_V6_RANGE}")
        endpoints = []
        for text in t.str_list("endpoints", MAX_ENDPOINTS_PER_NODE):
            try:
                endpoints.append(Endpoint.parse(text))
            except EndpointFormatError as e:
                raise t.error("endpoints", str(e)) from None
        routes: list[IPNetwork] = []
        for text in t.str_list("subnet_routes", MAX_ROUTES_PER_NODE):
            try:
                routes.append(ipaddress.ip_network(text, strict=True))
            except ValueError as e:
                raise t.error("subnet_routes", f"{text!r} is not a network prefix ({e})") from None
        t.reject_unknown()
        return MeshNode(name, node_key, disco_key, v4, v6, tuple(endpoints), tuple(routes))

    def _key(self, t: _Table, field: str, kind: type[_PublicKeyT]) -> _PublicKeyT:
        text = t.required_str(field)
        try:
            return kind.from_text(text)
        except KeyFormatError as e:
            raise t.error(field, f"not a {kind.PREFIX}<64 hex digits> key: {e}") from None

    def _check_unique(self, tables: Sequence[_Table], nodes: Sequence[MeshNode]) -> None:
        names: dict[str, int] = {}
        node_keys: dict[NodePublicKey, int] = {}
        disco_keys: dict[DiscoPublicKey, int] = {}
        owners: list[tuple[IPNetwork, int, str]] = []
        for i, (t, n) in enumerate(zip(tables, nodes, strict=True)):
            if n.name in names:
                raise t.error("name", f"{n.name!r} already used by node[{names[n.name]}]")
            names[n.name] = i
            if n.node_key in node_keys:
                j = node_keys[n.node_key]
                raise t.error("node_key", f"same as node[{j}] ({nodes[j].name})")
            node_keys[n.node_key] = i
            if n.disco_key in disco_keys:
                j = disco_keys[n.disco_key]
                raise t.error("disco_key", f"same as node[{j}] ({nodes[j].name})")
            disco_keys[n.disco_key] = i
            mine: list[tuple[IPNetwork, str]] = [(ipaddress.IPv4Network(n.overlay_v4), "overlay_v4")]
            if n.overlay_v6 is not None:
                mine.append((ipaddress.IPv6Network(n.overlay_v6), "overlay_v6"))
            mine += [(r, "subnet_routes") for r in n.subnet_routes]
            for net, field in mine:
                for other_net, j, other_field in owners:
                    if _overlaps(net, other_net):
                        whose = "this node's" if j == i else f"node[{j}] ({nodes[j].name})"
                        raise t.error(field, f"{net} overlaps {whose} {other_field} {other_net}")
                owners.append((net, i, field))


def _overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    if isinstance(a, ipaddress.IPv4Network) and isinstance(b, ipaddress.IPv4Network):
        return a.overlaps(b)
    if isinstance(a, ipaddress.IPv6Network) and isinstance(b, ipaddress.IPv6Network):
        return a.overlaps(b)
    return False


# --- shared field checks --------------------------------------------------------------------------


def _check_v4(text: str | None, fail: _Fail) -> ipaddress.IPv4Address | None:
    if text is None:
        return None
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise fail(f"{text!r} is not an IPv4 address") from None


def _check_v6(text: str | None, fail: _Fail) -> ipaddress.IPv6Address | None:
    if text is None:
        return None
    try:
        ip = ipaddress.IPv6Address(text)
    except ValueError:
        raise fail(f"{text!r} is not an IPv6 address") from None
    if ip.scope_id is not None:
        raise fail(f"{text!r}: scoped addresses are not allowed")
    return ip


def _check_host(host: str, fail: _Fail) -> str:
    if not _HOST_RE.match(host):
        raise fail(f"{host!r} is not a host name")
    return host


def _derp_port(port: int | None, fail: _Fail) -> int:
    if port is None or port == 0:
        return DEFAULT_DERP_PORT
    if not 0 < port <= 0xFFFF:
        raise fail(f"{port} is not a port (1-65535, or 0 for {DEFAULT_DERP_PORT})")
    return port


def _stun_port(port: int | None, fail: _Fail) -> int | None:
    # Tailscale's DERPMap convention: 0 means the default port, -1 means no STUN server.
    if port is None or port == 0:
        return DEFAULT_STUN_PORT
    if port == -1:
        return None
    if not 0 < port <= 0xFFFF:
        raise fail(f"{port} is not a port (1-65535, 0 for {DEFAULT_STUN_PORT}, -1 for none)")
    return port


# --- DERPMap JSON ---------------------------------------------------------------------------------


class _JsonLocator:
    """Approximate line numbers for fields of a JSON file: finds each key in order in the text."""

    def __init__(self, text: str) -> None:
        self._text = text

    def line_of(self, path: Sequence[str | int]) -> int:
        pos = 0
        for part in path:
            if isinstance(part, int):
                continue
            found = self._text.find(json.dumps(part), pos)
            if found < 0:
                break
            pos = found
        return self._text.count("\n", 0, pos) + 1


def _load_derpmap(path: Path, unreadable: _Fail) -> RelayMap:
    """Parse a Tailscale DERPMap JSON file. Errors name that file, except that a file that cannot be
    read at all is reported through ``unreadable`` (at the mesh file's ``derpmap`` line)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DERPMAP_BYTES + 1)
    except OSError as e:
        raise unreadable(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_DERPMAP_BYTES:
        raise MeshFileError(path, 1, "", f"larger than {MAX_DERPMAP_BYTES} bytes")
    try:
        text = data.decode("utf-8")
        doc = json.loads(text)
    except UnicodeDecodeError:
        raise MeshFileError(path, 1, "", "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise MeshFileError(path, e.lineno, "", f"invalid JSON: {e.msg}") from None
    locator = _JsonLocator(text)

    def fail(field: Sequence[str | int], problem: str) -> MeshFileError:
        return MeshFileError(path, locator.line_of(field), format_path(field), problem)

    if not isinstance(doc, dict) or not isinstance(doc.get("Regions"), dict):
        raise fail(("Regions",), "a DERPMap is an object with a Regions object")
    regions_doc: dict[str, Any] = doc["Regions"]
    if not regions_doc:
        raise fail(("Regions",), "no regions")
    if len(regions_doc) > MAX_RELAY_REGIONS:
        raise fail(("Regions",), f"at most {MAX_RELAY_REGIONS} regions")
    regions = [_JsonRegion(fail, key).parse(region) for key, region in regions_doc.items()]
    regions.sort(key=lambda r: r.region_id)
    return RelayMap(tuple(regions), source=path)


class _JsonRegion:
    """One ``Regions`` entry of a DERPMap: Tailscale's field names, their defaults, our checks."""

    def __init__(self, fail: Callable[[Sequence[str | int], str], MeshFileError], key: str) -> None:
        self._fail = fail
        self._key = key

    def _field(
        self, obj: Mapping[str, Any], at: tuple[str | int, ...], name: str, kind: type, default: Any
    ) -> Any:
        value = obj.get(name, default)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self._fail((*at, name), f"must be {_JSON_TYPES[kind]}")
        return value

    def _failer(self, at: tuple[str | int, ...], name: str) -> _Fail:
        return lambda problem: self._fail((*at, name), problem)

    def parse(self, region: Any) -> RelayRegion:
        where: tuple[str | int, ...] = ("Regions", self._key)
        if not isinstance(region, dict):
            raise self._fail(where, "must be an object")
        region_id: int = self._field(region, where, "RegionID", int, 0)
        if str(region_id) != self._key or region_id <= 0:
            raise self._fail(
                (*where, "RegionID"), f"{region_id} must be positive and match its key {self._key!r}"
            )
        code: str = self._field(region, where, "RegionCode", str, "")
        name: str = self._field(region, where, "RegionName", str, code)
        nodes_doc: list[Any] = self._field(region, where, "Nodes", list, [])
        if not nodes_doc:
            raise self._fail((*where, "Nodes"), "a region needs at least one node")
        if len(nodes_doc) > MAX_RELAYS_PER_REGION:
            raise self._fail((*where, "Nodes"), f"at most {MAX_RELAYS_PER_REGION} nodes")
        nodes = []
        for i, node in enumerate(nodes_doc):
            at = (*where, "Nodes", i)
            if not isinstance(node, dict):
                raise self._fail(at, "must be an object")
            nodes.append(
                RelayNode(
                    name=self._field(node, at, "Name", str, f"{region_id}{i}"),
                    region_id=region_id,
                    host_name=_check_host(
                        self._field(node, at, "HostName", str, ""), self._failer(at, "HostName")
                    ),
                    ipv4=_check_v4(self._field(node, at, "IPv4", str, "") or None, self._failer(at, "IPv4")),
                    ipv6=_check_v6(self._field(node, at, "IPv6", str, "") or None, self._failer(at, "IPv6")),
                    derp_port=_derp_port(
                        self._field(node, at, "DERPPort", int, 0), self._failer(at, "DERPPort")
                    ),
                    stun_port=_stun_port(
                        self._field(node, at, "STUNPort", int, 0), self._failer(at, "STUNPort")
                    ),
                    insecure_for_tests=self._field(node, at, "InsecureForTests", bool, False),
                )
            )
        return RelayRegion(region_id, code, name, tuple(nodes))


_JSON_TYPES: Final[Mapping[type, str]] = {
    int: "a number",
    str: "a string",
    bool: "true or false",
    list: "an array",
}
