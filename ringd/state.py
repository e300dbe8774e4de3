"""Node identity and boot counter, kept in the state directory.

Files in ``STATE_DIR`` (created with mode 0700):

- ``node_id``: 16 lowercase hex digits, random, written once and never rewritten.
- ``boot_epoch``: a decimal integer, one more on every start.
- ``lock``: held (``flock``) by the running daemon, so two daemons never share an identity.

Every write goes through :func:`atomic_write`: temp file in the same directory, fsync,
rename, fsync of the directory. A crash leaves the old content or the new, never a mix.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ringd.errors import UsageError

log = logging.getLogger(__name__)

NODE_ID_FILE = "node_id"
EPOCH_FILE = "boot_epoch"
PLAN_EPOCH_FILE = "plan_epoch"
LOCK_FILE = "lock"
NODE_ID_RE = re.compile(r"[0-9a-f]{16}")
_MAX_STATE_FILE = 64  # bytes; both files are tiny, anything longer is not ours
_TEMP_ROOTS = ("/tmp", "/var/tmp", "/dev/shm", "/private/tmp", "/private/var/tmp")


class StateError(UsageError):
    """The state directory or a file in it cannot be used."""


def new_node_id() -> str:
    """A fresh random node id (64 bits, 16 hex digits)."""
    return secrets.token_hex(8)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp file, fsync, rename,
    fsync dir)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def is_temp_location(path: Path) -> bool:
    """True when ``path`` lies under a directory the system may clean (``/tmp``, ``$TMPDIR``...)."""
    resolved = Path(os.path.realpath(path))
    roots = {Path(os.path.realpath(r)) for r in (*_TEMP_ROOTS, tempfile.gettempdir())}
    return any(resolved == r or r in resolved.parents for r in roots)


@dataclass
class NodeState:
    """This node's identity for one run. Holds the state-dir lock until :meth:`close`."""

    state_dir: Path
    node_id: str
    epoch: int
    in_temp_dir: bool
    _lock_fd: int | None = field(default=None, repr=False)

    @classmethod
    def open(cls, state_dir: Path) -> "NodeState":
        """Lock ``state_dir``, read or create the node id, and bump the boot epoch.

        Raises :class:`StateError` when the directory is in use by another ringd, or a file
        in it is corrupt (the message names the file).
        """
        state_dir = Path(state_dir)
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StateError(f"cannot create state directory {state_dir}: {e.strerror}",
                             hint="set state_dir (RINGD_STATE_DIR) to a writable "
                                  "directory") from None
        in_temp = is_temp_location(state_dir)
        if in_temp:
            log.warning("state directory %s is in a temporary location: if it is cleaned, "
                        "this node gets a new identity; set state_dir to a permanent directory",
                        state_dir)
        lock_fd = _lock(state_dir)
        try:
            node_id = _read_or_create_node_id(state_dir / NODE_ID_FILE)
            epoch = _read_epoch(state_dir / EPOCH_FILE) + 1
            atomic_write(state_dir / EPOCH_FILE, f"{epoch}\n".encode())
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(lock_fd)
            raise
        log.info("node %s, boot epoch %d, state in %s", node_id, epoch, state_dir)
        return cls(state_dir, node_id, epoch, in_temp, lock_fd)

    @property
    def plan_epoch(self) -> int:
        """The highest plan epoch this node has committed to (0 before the first)."""
        return _read_epoch(self.state_dir / PLAN_EPOCH_FILE)

    def save_plan_epoch(self, epoch: int) -> None:
        """Remember a committed plan epoch, so epochs keep rising across restarts."""
        if epoch > self.plan_epoch:
            atomic_write(self.state_dir / PLAN_EPOCH_FILE, f"{epoch}\n".encode())

    def close(self) -> None:
        """Release the state-dir lock (the process exiting releases it too)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "NodeState":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock(state_dir: Path) -> int:
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise StateError(f"cannot lock {path}: {e.strerror}") from None
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateError(f"state directory {state_dir} is in use by another ringd (pid {holder})",
                         hint="stop that daemon, or give this one its own state_dir "
                              "(RINGD_STATE_DIR); two nodes must never share an identity") from None
    return fd


def _read_small(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_STATE_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None
    if len(raw) > _MAX_STATE_FILE:
        raise _corrupt(path, "too long")
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise _corrupt(path, "not text") from None


def _corrupt(path: Path, why: str) -> StateError:
    return StateError(f"state file {path} is corrupt ({why})",
                      hint=f"restore it from a backup, or delete it to start over "
                           f"(deleting {NODE_ID_FILE} gives this node a new identity)")


def _read_or_create_node_id(path: Path) -> str:
    text = _read_small(path)
    if text is None:
        node_id = new_node_id()
        atomic_write(path, f"{node_id}\n".encode())
        log.info("created node id %s in %s", node_id, path)
        return node_id
    if not NODE_ID_RE.fullmatch(text):
        raise _corrupt(path, f"expected 16 hex digits, found {text[:20]!r}")
    return text


def _read_epoch(path: Path) -> int:
    text = _read_small(path)
    if text is None:
        return 0
    if not text.isdigit() or len(text) > 18:
        raise _corrupt(path, f"expected a decimal counter, found {text[:20]!r}")
    return int(text)
