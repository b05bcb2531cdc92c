"""client.keyfile: atomic 0600 writes, refusal of open permissions, one-line errors naming file and field."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from client.keyfile import (
    KeyFileError,
    NodeKeys,
    format_key_file,
    key_file_error,
    parse_key_file,
    read_key_file,
    write_key_file,
)
from natlib.keys import DiscoPrivateKey, NodePrivateKey

KEYS = NodeKeys(NodePrivateKey(bytes([7]) * 32), DiscoPrivateKey(bytes([9]) * 32))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_exact_text() -> None:
    assert format_key_file(KEYS) == (
        "# meshnode key file: the private keys of one node. Keep it secret (mode 0600).\n"
        f'node_key = "privkey:{"00" + "07" * 30 + "47"}"\n'
        f'disco_key = "privkey:{"08" + "09" * 30 + "49"}"\n'
    )


def test_write_then_read_round_trip_with_mode_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    old = os.umask(0o000)
    try:
        write_key_file(path, KEYS)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    assert read_key_file(path) == KEYS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]  # no temporary file left


def test_existing_file_is_kept_unless_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    write_key_file(path, KEYS)
    before = path.read_bytes()
    other = NodeKeys.generate()
    with pytest.raises(KeyFileError) as info:
        write_key_file(path, other)
    assert str(info.value) == f"{path}:1: already exists; refusing to overwrite (use --force)"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]
    write_key_file(path, other, overwrite=True)
    assert read_key_file(path) == other
    assert _mode(path) == 0o600


def test_unwritable_directory(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "node.key"
    with pytest.raises(KeyFileError, match=r"missing-dir/node.key:1: cannot create a file in .*missing-dir"):
        write_key_file(path, KEYS)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_group_or_other_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    write_key_file(path, KEYS)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        read_key_file(path)
    assert str(info.value) == (
        f"{path}:1: permissions {mode:04o} are too open: group/other may access the private keys; "
        f"run: chmod 600 {path}"
    )
    assert "privkey" not in str(info.value)


def test_0400_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    write_key_file(path, KEYS)
    path.chmod(0o400)
    assert read_key_file(path) == KEYS


def test_symlink_directory_and_missing_file_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "real.key"
    write_key_file(target, KEYS)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError, match=r"link\.key:1: is a symbolic link"):
        read_key_file(link)
    with pytest.raises(KeyFileError, match=r":1: is not a regular file$"):
        read_key_file(tmp_path)
    with pytest.raises(KeyFileError, match=r"absent\.key:1: cannot read: No such file or directory$"):
        read_key_file(tmp_path / "absent.key")


GOOD_NODE = 'node_key = "privkey:' + "07" * 32 + '"'
GOOD_DISCO = 'disco_key = "privkey:' + "09" * 32 + '"'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"# c\n{GOOD_NODE}\n", 'k:1: disco_key: missing (expected field = "privkey:<64 hex digits>")'),
        (f"{GOOD_DISCO}\n", 'k:1: node_key: missing (expected field = "privkey:<64 hex digits>")'),
        (f'{GOOD_NODE}\n\ndisco_key = "privkey:12"\n', 'k:3: disco_key: not a "privkey:<64 hex digits>" key'),
        (
            f'node_key = "nodekey:{"07" * 32}"\n{GOOD_DISCO}\n',
            'k:1: node_key: not a "privkey:<64 hex digits>" key',
        ),
        (f"{GOOD_NODE}\ndisco_key = 5\n", 'k:2: disco_key: must be a string "privkey:<64 hex digits>"'),
        (f"{GOOD_NODE}\n{GOOD_DISCO}\nextra = 1\n", "k:3: extra: unknown field"),
        (
            f"{GOOD_NODE}\n{GOOD_NODE.replace('node_key', 'disco_key')}\n",
            "k:2: disco_key: must differ from node_key",
        ),
        (f"{GOOD_NODE}\ndisco_key = \n", "k:2: invalid TOML: Invalid value"),
    ],
)
def test_bad_content_names_file_line_and_field(text: str, message: str) -> None:
    with pytest.raises(KeyFileError) as info:
        parse_key_file(text, "k")
    assert str(info.value) == message
    assert "07070707" not in str(info.value)  # no key material in messages


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"# \xff\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=r"node\.key:1: not UTF-8 text$"):
        read_key_file(path)


def test_key_file_error_finds_the_field_line(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    write_key_file(path, KEYS)
    assert str(key_file_error(path, "disco_key", "differs")) == f"{path}:3: disco_key: differs"
    assert str(key_file_error(tmp_path / "gone", "node_key", "x")) == f"{tmp_path / 'gone'}:1: node_key: x"
