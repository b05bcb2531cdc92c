"""The node key file: one node's private keys, kept apart from the shared mesh file.

::

    # meshnode key file: the private keys of one node. Keep it secret (mode 0600).
    node_key = "privkey:<64 hex digits>"     # the WireGuard key; its public half is the node key
    disco_key = "privkey:<64 hex digits>"    # the disco key (natlib's path discovery)

The file is TOML with exactly these two fields. :func:`write_key_file` writes it atomically (a
temporary file in the same directory, created with mode 0600, fsynced, then linked or renamed into
place) and never overwrites an existing file unless asked to. :func:`read_key_file` refuses a file
that group or others may access, like ssh does with private keys, and tells how to fix it.

Errors are :class:`KeyFileError`: one line naming the file, the line and the field. Messages never
contain key material.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

from natlib.keys import DiscoPrivateKey, KeyFormatError, NodePrivateKey

from ._errors import FileFieldError
from ._tomlpos import TomlPositions, syntax_error_position

__all__ = [
    "KEY_FILE_MODE",
    "KeyFileError",
    "NodeKeys",
    "format_key_file",
    "key_file_error",
    "parse_key_file",
    "read_key_file",
    "write_key_file",
]

KEY_FILE_MODE: Final = 0o600
#: Permission bits that must be clear on a key file: anything for group or others.
_FORBIDDEN_BITS: Final = 0o077
MAX_KEY_FILE_BYTES: Final = 64 * 1024
_FIELDS: Final = ("node_key", "disco_key")


class KeyFileError(FileFieldError):
    """A key file is unreadable, too open, or invalid. ``str(err)`` is ``FILE:LINE: FIELD: PROBLEM``."""


@dataclass(frozen=True, slots=True)
class NodeKeys:
    """A node's private keys: the WireGuard node key and the disco key."""

    node_key: NodePrivateKey
    disco_key: DiscoPrivateKey

    @classmethod
    def generate(cls) -> Self:
        return cls(NodePrivateKey.generate(), DiscoPrivateKey.generate())


def format_key_file(keys: NodeKeys) -> str:
    """The key file's text for ``keys``."""
    return (
        "# meshnode key file: the private keys of one node. Keep it secret (mode 0600).\n"
        f'node_key = "{keys.node_key.text()}"\n'
        f'disco_key = "{keys.disco_key.text()}"\n'
    )


def read_key_file(path: str | Path) -> NodeKeys:
    """Read ``path``; KeyFileError if it cannot be read, group/other may access it, or it is invalid."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise KeyFileError(path, 1, "", "is a symbolic link; point -k at the key file itself") from None
        raise KeyFileError(path, 1, "", f"cannot read: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise KeyFileError(path, 1, "", "is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_mode & _FORBIDDEN_BITS:
            mode = stat.S_IMODE(st.st_mode)
            raise KeyFileError(
                path,
                1,
                "",
                f"permissions {mode:04o} are too open: group/other may access the private keys; "
                f"run: chmod 600 {path}",
            )
        data = f.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(path, 1, "", f"larger than {MAX_KEY_FILE_BYTES} bytes: not a key file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KeyFileError(path, data[: e.start].count(b"\n") + 1, "", "not UTF-8 text") from None
    return parse_key_file(text, path)


def parse_key_file(text: str, path: str | Path = "<key file>") -> NodeKeys:
    """Validate key file ``text``; ``path`` names it in errors."""
    path = Path(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line, msg = syntax_error_position(e, text)
        raise KeyFileError(path, line, "", f"invalid TOML: {msg}") from None
    positions = TomlPositions(text)
    for key in doc:
        if key not in _FIELDS:
            raise KeyFileError(path, positions.line_of((key,)), key, "unknown field")
    values: list[str] = []
    for field in _FIELDS:
        value = doc.get(field)
        line = positions.line_of((field,))
        if value is None:
            raise KeyFileError(path, line, field, 'missing (expected field = "privkey:<64 hex digits>")')
        if not isinstance(value, str):
            raise KeyFileError(path, line, field, 'must be a string "privkey:<64 hex digits>"')
        values.append(value)
    try:
        node_key = NodePrivateKey.from_text(values[0])
    except KeyFormatError:
        line = positions.line_of(("node_key",))
        raise KeyFileError(path, line, "node_key", 'not a "privkey:<64 hex digits>" key') from None
    try:
        disco_key = DiscoPrivateKey.from_text(values[1])
    except KeyFormatError:
        line = positions.line_of(("disco_key",))
        raise KeyFileError(path, line, "disco_key", 'not a "privkey:<64 hex digits>" key') from None
    if node_key.raw == disco_key.raw:
        line = positions.line_of(("disco_key",))
        raise KeyFileError(path, line, "disco_key", "must differ from node_key")
    return NodeKeys(node_key, disco_key)


def key_file_error(path: str | Path, field: str, problem: str) -> KeyFileError:
    """A KeyFileError about ``field`` of the key file at ``path``, at the line that sets it (for
    problems found later, such as a key that is not in the mesh file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")[:MAX_KEY_FILE_BYTES]
    except OSError:
        text = ""
    return KeyFileError(path, TomlPositions(text).line_of((field,)), field, problem)


def write_key_file(path: str | Path, keys: NodeKeys, *, overwrite: bool = False) -> None:
    """Write ``keys`` to ``path`` atomically with mode 0600.

    Without ``overwrite``, an existing ``path`` is left alone and KeyFileError says so (the check
    and the creation are one atomic ``link``, so a concurrent writer cannot be clobbered). Readers
    never see a partial file: the content is complete and fsynced before it gets its name.
    """
    path = Path(path)
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, KEY_FILE_MODE)
    except OSError as e:
        raise KeyFileError(path, 1, "", f"cannot create a file in {directory}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), KEY_FILE_MODE)  # the umask may have taken bits away, never added any
            f.write(format_key_file(keys).encode())
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeyFileError(
                    path, 1, "", "already exists; refusing to overwrite (use --force)"
                ) from None
            finally:
                os.unlink(tmp)
    except OSError as e:
        raise KeyFileError(path, 1, "", f"cannot write: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the file itself is synced
    finally:
        os.close(dfd)
