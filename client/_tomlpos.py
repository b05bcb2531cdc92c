"""Find the source line of a value in a TOML document, for error messages.

:mod:`tomllib` returns plain dicts and lists with no positions, so this module scans the source
itself: it follows table headers (``[a.b]``, ``[[a.b]]``, counting array-of-tables elements the way
TOML nests them) and ``key =`` lines, and maps each concrete path such as ``("node", 2, "name")``
to the 1-based line that defines it. A path that is not found falls back to its longest known
prefix (the table's header line), then to line 1. It only needs to be right for documents that
:mod:`tomllib` already accepted, and it never raises.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from typing import Final, TypeAlias

__all__ = ["TomlPath", "TomlPositions", "format_path", "syntax_error_position"]

TomlPath: TypeAlias = tuple[str | int, ...]

_BARE_KEY: Final = r"[A-Za-z0-9_-]+"
_QUOTED_KEY: Final = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_KEY_PART: Final = rf"(?:{_BARE_KEY}|{_QUOTED_KEY})"
_DOTTED_KEY: Final = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_ARRAY_HEADER: Final = re.compile(rf"^\s*\[\[\s*({_DOTTED_KEY})\s*\]\]")
_TABLE_HEADER: Final = re.compile(rf"^\s*\[\s*({_DOTTED_KEY})\s*\]")
_ASSIGNMENT: Final = re.compile(rf"^\s*({_DOTTED_KEY})\s*=")
_KEY_PART_RE: Final = re.compile(_KEY_PART)


def _split_key(dotted: str) -> list[str]:
    parts = []
    for m in _KEY_PART_RE.finditer(dotted):
        part = m.group(0)
        if part[0] in "\"'":
            part = part[1:-1]
        parts.append(part)
    return parts


def _open_brackets(line: str) -> int:
    """Net ``[`` minus ``]`` outside strings and comments (to skip multi-line array bodies)."""
    depth = 0
    quote = ""
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "#":
            break
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        i += 1
    return depth


def format_path(path: Sequence[str | int]) -> str:
    """``("node", 2, "name")`` → ``node[2].name``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class TomlPositions:
    """The line of every table header and key assignment of one TOML source text."""

    def __init__(self, source: str) -> None:
        self._lines: dict[TomlPath, int] = {}
        array_len: dict[TomlPath, int] = {}  # concrete path of an array of tables -> elements so far
        current: TomlPath = ()
        depth = 0  # inside a multi-line array or inline table value
        in_multiline_string = ""
        for lineno, line in enumerate(source.splitlines(), start=1):
            if in_multiline_string:
                if in_multiline_string in line:
                    in_multiline_string = ""
                continue
            if depth > 0:
                depth = max(0, depth + _open_brackets(line))
                continue
            if m := _ARRAY_HEADER.match(line):
                base = self._resolve(_split_key(m.group(1)), array_len)
                index = array_len.get(base, 0)
                array_len[base] = index + 1
                current = (*base, index)
                self._lines.setdefault(base, lineno)
                self._lines[current] = lineno
                continue
            if m := _TABLE_HEADER.match(line):
                current = self._resolve(_split_key(m.group(1)), array_len)
                self._lines.setdefault(current, lineno)
                continue
            if m := _ASSIGNMENT.match(line):
                path = (*current, *_split_key(m.group(1)))
                self._lines.setdefault(path, lineno)
                rest = line[m.end() :]
                for delim in ('"""', "'''"):
                    if rest.count(delim) == 1:
                        in_multiline_string = delim
                depth = max(0, _open_brackets(rest))

    @staticmethod
    def _resolve(keys: Sequence[str], array_len: dict[TomlPath, int]) -> TomlPath:
        # In TOML, [[a.b]] under an earlier [[a]] belongs to the last element of a.
        path: TomlPath = ()
        for i, key in enumerate(keys):
            path = (*path, key)
            n = array_len.get(path)
            if n is not None and i < len(keys) - 1:
                path = (*path, n - 1)
        return path

    def line_of(self, path: Sequence[str | int]) -> int:
        """The line defining ``path``, else that of its longest known prefix, else 1."""
        p = tuple(path)
        while p:
            line = self._lines.get(p)
            if line is not None:
                return line
            p = p[:-1]
        return 1


def syntax_error_position(e: tomllib.TOMLDecodeError, source: str) -> tuple[int, str]:
    """The line of a :mod:`tomllib` syntax error and its message without the position suffix."""
    msg = str(e)
    m = re.search(r"\s*\(at line (\d+), column \d+\)$", msg)
    if m:
        return int(m.group(1)), msg[: m.start()]
    m = re.search(r"\s*\(at end of document\)$", msg)
    if m:
        return max(1, len(source.splitlines())), msg[: m.start()]
    return 1, msg
