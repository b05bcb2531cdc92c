"""``meshnode``: the mesh client's command line.

Subcommands (only those that work today are registered):

``meshnode genkey -o node.key [--force] [--name NAME] [--overlay-v4 ADDR] [--overlay-v6 ADDR]``
    Write a new key file (mode 0600; an existing file is kept unless ``--force``), print the public
    keys and the ``[[node]]`` snippet to paste into the mesh file.
``meshnode check -c mesh.toml -k node.key``
    Validate both files together (the key file's node must be in the mesh, with the same disco key)
    and print a summary of the mesh as this node sees it.

Exit status: 0 on success; 2 for a bad command line, a bad mesh file or a bad key file, with a
one-line message naming the file, the line and the field (``mesh.toml:14: node[1].overlay_v4: ...``);
1 for other failures.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ._errors import FileFieldError
from .keyfile import KeyFileError, NodeKeys, read_key_file, write_key_file
from .meshfile import OVERLAY_V4_RANGE, OVERLAY_V6_RANGE, MeshFileError, load_mesh_file
from .wgconfig import find_self

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILURE", "main", "node_snippet"]

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
PROG = "meshnode"


class _UsageError(Exception):
    """A bad command-line value: printed as ``meshnode SUBCOMMAND: OPTION: PROBLEM``, exit 2."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's own format, but one line and our exit code.
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message}\n")


def _default_name() -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")[:63]
    return label.strip("-") or "node"


def _overlay_v4(text: str) -> ipaddress.IPv4Address:
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise _UsageError(f"--overlay-v4: {text!r} is not an IPv4 address") from None
    if address not in OVERLAY_V4_RANGE or address in (OVERLAY_V4_RANGE[0], OVERLAY_V4_RANGE[-1]):
        raise _UsageError(f"--overlay-v4: {address} is not a host address in {OVERLAY_V4_RANGE}")
    return address


def _overlay_v6(text: str) -> ipaddress.IPv6Address:
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise _UsageError(f"--overlay-v6: {text!r} is not an IPv6 address") from None
    if address not in OVERLAY_V6_RANGE:
        raise _UsageError(f"--overlay-v6: {address} is not in the unique local range {OVERLAY_V6_RANGE}")
    return address


def node_snippet(
    keys: NodeKeys,
    name: str,
    overlay_v4: ipaddress.IPv4Address | None = None,
    overlay_v6: ipaddress.IPv6Address | None = None,
) -> str:
    """The ``[[node]]`` table for the mesh file. Fields still to choose are commented out."""
    lines = [
        "[[node]]",
        f'name = "{name}"',
        f'node_key = "{keys.node_key.public.text()}"',
        f'disco_key = "{keys.disco_key.public.text()}"',
    ]
    if overlay_v4 is not None:
        lines.append(f'overlay_v4 = "{overlay_v4}"')
    else:
        lines.append(f'# overlay_v4 = "100.64.X.Y"   # required: a free address in {OVERLAY_V4_RANGE}')
    if overlay_v6 is not None:
        lines.append(f'overlay_v6 = "{overlay_v6}"')
    else:
        lines.append(f'# overlay_v6 = "fd7a:115c:a1e0::X"   # optional, in {OVERLAY_V6_RANGE}')
    lines.append('# endpoints = ["198.51.100.7:41641"]   # optional static endpoints')
    return "\n".join(lines) + "\n"


def _genkey(args: argparse.Namespace) -> int:
    name = args.name if args.name is not None else _default_name()
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", name):
        raise _UsageError(f"--name: {name!r} must be a DNS label (a-z, 0-9, '-', at most 63)")
    v4 = _overlay_v4(args.overlay_v4) if args.overlay_v4 is not None else None
    v6 = _overlay_v6(args.overlay_v6) if args.overlay_v6 is not None else None
    keys = NodeKeys.generate()
    write_key_file(args.output, keys, overwrite=args.force)
    print(f"wrote {args.output} (mode 0600): keep it on this node only")
    print(f"node key:  {keys.node_key.public.text()}")
    print(f"disco key: {keys.disco_key.public.text()}")
    print()
    print("# add this node to the mesh file shared by all nodes:")
    print(node_snippet(keys, name, v4, v6), end="")
    return 0


def _check(args: argparse.Namespace) -> int:
    mesh = load_mesh_file(args.config)
    keys = read_key_file(args.key)
    me = find_self(mesh, keys, args.key)
    regions = ", ".join(f"{r.region_id} {r.code} ({len(r.nodes)} relays)" for r in mesh.relay_map.regions)
    source = f" from {mesh.relay_map.source}" if mesh.relay_map.source else ""
    print(f"{mesh.path}: mesh {mesh.name!r}, {len(mesh.nodes)} nodes; relay regions{source}: {regions}")
    print(f"{args.key}: this node is {me.name!r} ({me.node_key.short()})")
    print(f"  overlay   {'  '.join(str(a) for a in me.overlay_addresses)}")
    peers = mesh.peers_of(me.node_key)
    print(f"peers ({len(peers)}):")
    for peer in peers:
        extra = ""
        if peer.endpoints:
            extra += "  endpoints " + ",".join(str(e) for e in peer.endpoints)
        if peer.subnet_routes:
            extra += "  routes " + ",".join(str(r) for r in peer.subnet_routes)
        addresses = " ".join(str(a) for a in peer.overlay_addresses)
        print(f"  {peer.name:<16} {peer.node_key.short()}  {addresses}{extra}")
    print("ok")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog=PROG, description="A thin WireGuard mesh client on natlib.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    genkey = sub.add_parser("genkey", help="write a new node key file and print its [[node]] snippet")
    genkey.add_argument("-o", "--output", required=True, type=Path, help="the key file to write (mode 0600)")
    genkey.add_argument("--force", action="store_true", help="overwrite an existing key file")
    genkey.add_argument("--name", help="the node's name in the snippet (default: this host's name)")
    genkey.add_argument(
        "--overlay-v4", metavar="ADDR", help=f"the node's overlay IPv4 address ({OVERLAY_V4_RANGE})"
    )
    genkey.add_argument(
        "--overlay-v6", metavar="ADDR", help=f"the node's overlay IPv6 address ({OVERLAY_V6_RANGE})"
    )
    genkey.set_defaults(run=_genkey)
    check = sub.add_parser("check", help="validate a mesh file and this node's key file together")
    check.add_argument("-c", "--config", required=True, type=Path, help="the mesh file (TOML)")
    check.add_argument("-k", "--key", required=True, type=Path, help="this node's key file")
    check.set_defaults(run=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``meshnode`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        status: int = args.run(args)
    except (MeshFileError, KeyFileError, FileFieldError) as e:
        print(f"{PROG} {args.command}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _UsageError as e:
        print(f"{PROG} {args.command}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"{PROG} {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return status
