"""meshnode's CLI: genkey and check, their output, and exit status 2 with one-line errors."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import client
from client.cli import main
from client.keyfile import NodeKeys, read_key_file, write_key_file
from client.meshfile import parse_mesh_file

HEADER = textwrap.dedent("""\
    [mesh]
    name = "lab"

    [[relay_map.region]]
    id = 900
    code = "lab"
    [[relay_map.region.node]]
    host = "relay.lab.test"

    """)


def _genkey(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["genkey", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_genkey_writes_a_0600_key_file_and_prints_a_pasteable_snippet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path = tmp_path / "alpha.key"
    status, out, err = _genkey(
        tmp_path, capsys, "-o", str(key_path), "--name", "alpha", "--overlay-v4", "100.64.0.1",
        "--overlay-v6", "fd7a:115c:a1e0::1",
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    keys = read_key_file(key_path)
    node_pub = keys.node_key.public.text()
    disco_pub = keys.disco_key.public.text()
    snippet = out[out.index("[[node]]") :]
    assert out.splitlines()[:3] == [
        f"wrote {key_path} (mode 0600): keep it on this node only",
        f"node key:  {node_pub}",
        f"disco key: {disco_pub}",
    ]
    assert snippet == (
        "[[node]]\n"
        'name = "alpha"\n'
        f'node_key = "{node_pub}"\n'
        f'disco_key = "{disco_pub}"\n'
        'overlay_v4 = "100.64.0.1"\n'
        'overlay_v6 = "fd7a:115c:a1e0::1"\n'
        '# endpoints = ["198.51.100.7:41641"]   # optional static endpoints\n'
    )
    assert "privkey" not in out
    mesh = parse_mesh_file(HEADER + snippet, "mesh.toml")  # pasted as is, it is a valid node
    assert mesh.nodes[0].node_key == keys.node_key.public
    assert mesh.nodes[0].disco_key == keys.disco_key.public


def test_genkey_without_overlay_leaves_the_required_field_to_fill_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _genkey(tmp_path, capsys, "-o", str(tmp_path / "k"), "--name", "beta")
    assert status == 0
    snippet = out[out.index("[[node]]") :]
    assert '# overlay_v4 = "100.64.X.Y"   # required: a free address in 100.64.0.0/10\n' in snippet
    with pytest.raises(ValueError, match=r"mesh\.toml:10: node\[0\]: missing field 'overlay_v4'"):
        parse_mesh_file(HEADER + snippet, "mesh.toml")


def test_genkey_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path = tmp_path / "node.key"
    assert _genkey(tmp_path, capsys, "-o", str(key_path))[0] == 0
    before = key_path.read_bytes()
    status, out, err = _genkey(tmp_path, capsys, "-o", str(key_path))
    assert (status, out) == (2, "")
    assert err == f"meshnode genkey: {key_path}:1: already exists; refusing to overwrite (use --force)\n"
    assert key_path.read_bytes() == before
    status, _, _ = _genkey(tmp_path, capsys, "-o", str(key_path), "--force")
    assert status == 0
    assert key_path.read_bytes() != before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--overlay-v4", "10.0.0.1"], "--overlay-v4: 10.0.0.1 is not a host address in 100.64.0.0/10"),
        (["--overlay-v4", "nope"], "--overlay-v4: 'nope' is not an IPv4 address"),
        (
            ["--overlay-v6", "2001:db8::1"],
            "--overlay-v6: 2001:db8::1 is not in the unique local range fd00::/8",
        ),
        (["--name", "Not A Label"], "--name: 'Not A Label' must be a DNS label (a-z, 0-9, '-', at most 63)"),
    ],
)
def test_genkey_bad_options_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    status, out, err = _genkey(tmp_path, capsys, "-o", str(tmp_path / "k"), *args)
    assert (status, out, err) == (2, "", f"meshnode genkey: {message}\n")
    assert not (tmp_path / "k").exists()


def _mesh_with(tmp_path: Path, *nodes: tuple[str, NodeKeys, str]) -> Path:
    text = HEADER
    for name, keys, v4 in nodes:
        text += textwrap.dedent(f"""\
            [[node]]
            name = "{name}"
            node_key = "{keys.node_key.public.text()}"
            disco_key = "{keys.disco_key.public.text()}"
            overlay_v4 = "{v4}"

            """)
    path = tmp_path / "mesh.toml"
    path.write_text(text)
    return path


def test_check_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine, other = NodeKeys.generate(), NodeKeys.generate()
    write_key_file(tmp_path / "node.key", mine)
    mesh = _mesh_with(tmp_path, ("alpha", mine, "100.64.0.1"), ("beta", other, "100.64.0.2"))
    status = main(["check", "-c", str(mesh), "-k", str(tmp_path / "node.key")])
    out, err = capsys.readouterr()
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f"{mesh}: mesh 'lab', 2 nodes; relay regions: 900 lab (1 relays)",
        f"{tmp_path / 'node.key'}: this node is 'alpha' ({mine.node_key.public.short()})",
        "  overlay   100.64.0.1",
        "peers (1):",
        f"  beta             {other.node_key.public.short()}  100.64.0.2",
        "ok",
    ]


def test_check_errors_are_one_line_naming_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine, other = NodeKeys.generate(), NodeKeys.generate()
    key = tmp_path / "node.key"
    write_key_file(key, mine)

    def check() -> tuple[int, str]:
        status = main(["check", "-c", str(tmp_path / "mesh.toml"), "-k", str(key)])
        out, err = capsys.readouterr()
        assert out == ""
        assert err.count("\n") == 1
        return status, err.rstrip("\n")

    mesh = _mesh_with(tmp_path, ("beta", other, "100.64.0.2"))
    node_pub, disco_pub = mine.node_key.public.text(), mine.disco_key.public.text()
    assert check() == (
        2,
        f"meshnode check: {key}:2: node_key: its public key {node_pub} is not a node of {mesh}",
    )

    wrong_disco = NodeKeys(mine.node_key, other.disco_key)
    _mesh_with(tmp_path, ("alpha", wrong_disco, "100.64.0.1"))
    expected = (
        f"{key}:3: disco_key: its public key {disco_pub} differs from node[0].disco_key (alpha) in {mesh}"
    )
    assert check() == (2, f"meshnode check: {expected}")

    mesh.write_text(mesh.read_text().replace('overlay_v4 = "100.64.0.1"', 'overlay_v4 = "100.64.0.1x"'))
    assert check() == (
        2,
        f"meshnode check: {mesh}:14: node[0].overlay_v4: '100.64.0.1x' is not an IPv4 address",
    )

    _mesh_with(tmp_path, ("alpha", mine, "100.64.0.1"))
    key.chmod(0o644)
    status, err = check()
    assert status == 2
    assert err.startswith(f"meshnode check: {key}:1: permissions 0644 are too open")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "genkey" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["up"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "meshnode up: the following arguments are required: -c/--config, -k/--key\n"
    with pytest.raises(SystemExit) as info:
        main(["frob"])
    assert info.value.code == 2
    assert re.search(r"invalid choice: 'frob' \(choose from ", capsys.readouterr().err)
    with pytest.raises(SystemExit) as info:
        main(["genkey"])
    assert info.value.code == 2
    assert "the following arguments are required: -o/--output" in capsys.readouterr().err


def test_python_dash_m_client_runs_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(client.__file__).resolve().parents[1])}
    key = tmp_path / "n.key"
    done = subprocess.run(
        [sys.executable, "-m", "client", "genkey", "-o", str(key), "--name", "n1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert 'name = "n1"' in done.stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    bad = subprocess.run(
        [sys.executable, "-m", "client", "check", "-c", str(tmp_path / "none.toml"), "-k", str(key)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert (
        bad.stderr == f"meshnode check: {tmp_path / 'none.toml'}:1: cannot read: No such file or directory\n"
    )


def test_the_client_never_imports_relay() -> None:
    # Dependencies point down: client -> natlib, never client -> relay (architecture.md).
    env = {**os.environ, "PYTHONPATH": str(Path(client.__file__).resolve().parents[1])}
    code = (
        "import sys, client, client.cli, client.engine, client.keyfile, client.meshfile, client.uapi\n"
        "print(sorted(m for m in sys.modules if m == 'relay' or m.startswith('relay.')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_up_with_a_bad_mesh_file_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mesh.toml").write_text('[mesh]\nname = "lab"\nbogus = 1\n')
    write_key_file(tmp_path / "n.key", NodeKeys.generate())
    assert main(["up", "-c", str(tmp_path / "mesh.toml"), "-k", str(tmp_path / "n.key")]) == 2
    assert capsys.readouterr().err == f"meshnode up: {tmp_path / 'mesh.toml'}:3: mesh.bogus: unknown field\n"
