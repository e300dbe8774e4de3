"""The cluster key file: 32 random bytes shared by every node of a ring, never on a command line.

The file holds the key as 64 hex digits and a newline (a file of exactly 32 raw bytes is
read too). It is created atomically with mode 0600 and refused when group or others can
read it. :func:`cluster_id` names the key publicly (a keyed-hash digest): safe to advertise
in mDNS records and status output.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ringd.core.seal import KEY_SIZE, cluster_id
from ringd.errors import ConfigError, UsageError

__all__ = ["KEY_SIZE", "cluster_id", "generate_key_file", "load_key", "load_or_create_key"]

_COPY_HINT = "copy the same key file (mode 0600) to every node of the ring"


def generate_key_file(path: Path, *, overwrite: bool = False) -> bytes:
    """Write a new random key to ``path`` (mode 0600, atomically); return it.

    Refuses to replace an existing file unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"cluster key file {path} already exists",
                         hint="every node of a ring needs the same key; pass --force to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ConfigError(f"cannot create the directory for the cluster key {path}: "
                          f"{e.strerror or e}") from None
    key = os.urandom(KEY_SIZE)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if another process created the file meanwhile
            os.unlink(tmp)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except FileExistsError:
        raise UsageError(f"cluster key file {path} already exists",
                         hint="every node of a ring needs the same key; "
                              "pass --force to replace it") from None
    except OSError as e:
        raise ConfigError(f"cannot write the cluster key {path}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return key


def load_key(path: Path) -> bytes:
    """Read the key at ``path``; ConfigError if it is missing, exposed or malformed."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ConfigError(f"cluster key file {path} does not exist",
                          hint=f"create one with `ringctl keygen`, or {_COPY_HINT}") from None
    except OSError as e:
        raise ConfigError(f"cannot open the cluster key {path}: {e.strerror or e}",
                          hint="it must be a regular file (not a symlink) readable by this "
                               "user") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"cluster key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"cluster key file {path} can be read by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o})",
                hint=f"run `chmod 600 {path}`")
        data = os.read(fd, 4 * KEY_SIZE + 1)
    finally:
        os.close(fd)
    return _parse(data, path)


def load_or_create_key(path: Path) -> tuple[bytes, bool]:
    """The key at ``path``, creating it first if the file does not exist. ``(key, created)``."""
    if not Path(path).exists():
        try:
            return generate_key_file(path), True
        except UsageError as e:
            if not isinstance(e, ConfigError):  # another process created it first
                return load_key(path), False
            raise
    return load_key(path), False


def _parse(data: bytes, path: Path) -> bytes:
    if len(data) == KEY_SIZE:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise ConfigError(f"cluster key file {path} must hold a {KEY_SIZE}-byte key "
                      f"({2 * KEY_SIZE} hex digits), found {len(data)} bytes",
                      hint=f"create a new one with `ringctl keygen --force` and {_COPY_HINT}")
