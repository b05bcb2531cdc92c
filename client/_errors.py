"""The error type shared by the client's file formats: one line naming the file, line and field."""

from __future__ import annotations

from pathlib import Path

__all__ = ["FileFieldError"]


class FileFieldError(ValueError):
    """A configuration file is unreadable or invalid.

    ``str(err)`` is one line: ``FILE:LINE: FIELD: PROBLEM`` (``LINE`` is 1-based; ``FIELD`` is a
    path like ``node[2].overlay_v4``, and is left out for whole-file problems such as a syntax error
    or wrong permissions). The CLI prints it as is and exits with status 2.
    """

    def __init__(self, path: Path | str, line: int, field: str, problem: str) -> None:
        self.path = Path(path)
        self.line = line
        self.field = field
        self.problem = problem
        where = f"{self.path}:{line}"
        text = f"{where}: {field}: {problem}" if field else f"{where}: {problem}"
        super().__init__(text.replace("\n", " "))
