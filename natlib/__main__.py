"""``python -m natlib``: natlib's command line.

::

    python -m natlib netcheck --derp-map FILE [--json] [--trio] [-v]

``netcheck`` measures the network against the relay map in FILE (Tailscale DERPMap JSON or
headscale YAML) and prints a readable report, or the report as JSON with ``--json``. Exit
status: 0 after a report, 2 for a bad command line or relay map (one line on stderr naming the
file, and the line and field where known).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import anyio

from .derpmap import DERPMap, DERPMapError, load_derp_map
from .netcheck import Report, netcheck

__all__ = ["main"]

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m natlib", description="natlib command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    nc = sub.add_parser("netcheck", help="measure UDP, NAT behaviour and relay latencies")
    nc.add_argument(
        "--derp-map", required=True, metavar="FILE", help="relay map: DERPMap JSON or headscale YAML"
    )
    nc.add_argument("--json", action="store_true", help="print the report as JSON")
    nc.add_argument("--trio", action="store_true", help="run under trio instead of asyncio")
    nc.add_argument("-v", "--verbose", action="store_true", help="log probe details to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    try:
        derp_map = load_derp_map(args.derp_map)
    except DERPMapError as e:
        print(f"netcheck: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not derp_map.regions:
        print(f"netcheck: {args.derp_map}: the relay map has no regions", file=sys.stderr)
        return EXIT_USAGE

    async def run(m: DERPMap) -> Report:
        return await netcheck(m)

    report = anyio.run(run, derp_map, backend="trio" if args.trio else "asyncio")
    print(report.to_json() if args.json else report.format_text(derp_map))
    return 0


if __name__ == "__main__":
    sys.exit(main())
