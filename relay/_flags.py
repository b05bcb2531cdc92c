"""Command-line parsing with Go's ``flag`` syntax, so derper's command lines work verbatim.

Accepted forms: ``-name``, ``--name``, ``-name=value``, ``--name=value`` and, for non-boolean
flags, ``-name value``. Boolean flags are true when named alone and take only ``=true``/``=false``
(and the other spellings of Go's ``strconv.ParseBool``). ``--`` ends the flags. ``-h``, ``-help``
and ``--help`` print the usage. Errors raise :class:`FlagError`, whose message matches Go's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Flag",
    "FlagError",
    "FlagSet",
    "HelpRequested",
    "format_go_duration",
    "parse_go_bool",
    "parse_go_duration",
]


class FlagError(ValueError):
    """A bad command line; the message is what to print before the usage."""


class HelpRequested(Exception):
    """``-h`` or ``-help`` was given."""


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_go_bool(text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"parse error: {text!r} is not a boolean")


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Parse a Go duration such as ``2s``, ``1m30s``, ``500ms`` or ``0`` into seconds."""
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r} (units: ns, us, ms, s, m, h)")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def format_go_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    if seconds >= 60 and seconds % 60 == 0:
        m = int(seconds // 60)
        return f"{m // 60}h{m % 60}m0s" if m >= 60 else f"{m}m0s"
    if seconds >= 1:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"


@dataclass
class Flag:
    name: str
    default: Any
    help: str
    parse: Callable[[str], Any]
    is_bool: bool = False
    show_default: str | None = None
    hidden: bool = False  # accepted but left out of the usage (internal flags)


class FlagSet:
    """A set of Go-style flags. :meth:`parse` returns ``{name: value}`` with defaults filled in."""

    def __init__(self, program: str) -> None:
        self.program = program
        self.flags: dict[str, Flag] = {}

    def add_bool(self, name: str, default: bool, help: str, *, hidden: bool = False) -> None:
        self.flags[name] = Flag(name, default, help, parse_go_bool, is_bool=True, hidden=hidden)

    def add_string(self, name: str, default: str, help: str) -> None:
        self.flags[name] = Flag(name, default, help, str)

    def add_int(self, name: str, default: int, help: str, *, show_default: str | None = None) -> None:
        def parse(v: str) -> int:
            try:
                return int(v, 0)
            except ValueError:
                raise ValueError("parse error") from None

        self.flags[name] = Flag(name, default, help, parse, show_default=show_default)

    def add_float(self, name: str, default: float, help: str) -> None:
        def parse(v: str) -> float:
            try:
                return float(v)
            except ValueError:
                raise ValueError("parse error") from None

        shown = "+Inf" if default == math.inf else None
        self.flags[name] = Flag(name, default, help, parse, show_default=shown)

    def add_duration(self, name: str, default: float, help: str) -> None:
        self.flags[name] = Flag(
            name, default, help, parse_go_duration, show_default=format_go_duration(default)
        )

    def parse(self, argv: Sequence[str]) -> tuple[dict[str, Any], set[str]]:
        """Parse ``argv`` (without the program name); return the values and the names set."""
        values = {name: f.default for name, f in self.flags.items()}
        given: set[str] = set()
        i = 0
        while i < len(argv):
            arg = argv[i]
            i += 1
            if arg == "--":
                if i < len(argv):
                    raise FlagError(f"unexpected argument: {argv[i]}")
                break
            if not arg.startswith("-") or arg == "-":
                raise FlagError(f"unexpected argument: {arg} (meshrelay takes only flags)")
            body = arg[2:] if arg.startswith("--") else arg[1:]
            if not body or body[0] in "-=":
                raise FlagError(f"bad flag syntax: {arg}")
            name, eq, value = body.partition("=")
            if name in ("h", "help") and name not in self.flags:
                raise HelpRequested
            flag = self.flags.get(name)
            if flag is None:
                raise FlagError(f"flag provided but not defined: -{name}")
            if flag.is_bool:
                if not eq:
                    value = "true"
            elif not eq:
                if i >= len(argv):
                    raise FlagError(f"flag needs an argument: -{name}")
                value = argv[i]
                i += 1
            try:
                values[name] = flag.parse(value)
            except ValueError as e:
                raise FlagError(f'invalid value "{value}" for flag -{name}: {e}') from None
            given.add(name)
        return values, given

    def usage(self) -> str:
        lines = [f"Usage of {self.program}:"]
        for name in sorted(self.flags):
            f = self.flags[name]
            if f.hidden:
                continue
            kind = (
                ""
                if f.is_bool
                else (
                    " duration"
                    if f.parse is parse_go_duration
                    else " int"
                    if isinstance(f.default, int)
                    else " float"
                    if isinstance(f.default, float)
                    else " string"
                )
            )
            lines.append(f"  -{name}{kind}")
            default = (
                f.show_default
                if f.show_default is not None
                else (
                    repr(f.default).replace("'", '"')
                    if isinstance(f.default, str)
                    else str(f.default).lower()
                    if isinstance(f.default, bool)
                    else str(f.default)
                )
            )
            show = not (f.is_bool and f.default is False) and default not in ('""',)
            lines.append(f"    \t{f.help}" + (f" (default {default})" if show else ""))
        return "\n".join(lines) + "\n"
