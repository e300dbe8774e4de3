"""The cluster key file: created atomically with mode 0600, refused when exposed or malformed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ringd.errors import ConfigError, UsageError
from ringd.keys import KEY_SIZE, cluster_id, generate_key_file, load_key, load_or_create_key


def test_generate_writes_a_private_file_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "cluster.key"
    key = generate_key_file(path)
    assert len(key) == KEY_SIZE and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key.hex() + "\n"
    assert load_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["cluster.key"]  # no temp file left
    with pytest.raises(UsageError, match="already exists"):
        generate_key_file(path)
    assert generate_key_file(path, overwrite=True) != key
    assert cluster_id(key) != cluster_id(load_key(path))


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    key, created = load_or_create_key(path)
    assert created and load_or_create_key(path) == (key, False)


def test_raw_32_byte_files_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "raw.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, bytes(range(32)))
    os.close(fd)
    assert load_key(path) == bytes(range(32))


@pytest.mark.parametrize("content, mode, match", [
    (b"ab" * 32 + b"\n", 0o644, "can be read by other users"),
    (b"ab" * 32 + b"\n", 0o640, "can be read by other users"),
    (b"ab" * 31, 0o600, "must hold a 32-byte key"),
    (b"zz" * 32, 0o600, "must hold a 32-byte key"),
    (b"", 0o600, "must hold a 32-byte key"),
])
def test_exposed_or_malformed_keys_are_refused(tmp_path: Path, content: bytes, mode: int,
                                               match: str) -> None:
    path = tmp_path / "cluster.key"
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=match) as e:
        load_key(path)
    assert e.value.hint  # says what to do


def test_missing_and_symlinked_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_key(tmp_path / "nope.key")
    assert "ringctl keygen" in e.value.hint
    real = tmp_path / "real.key"
    generate_key_file(real)
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="cannot open"):
        load_key(link)
