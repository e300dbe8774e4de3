"""Fixtures for tests of real ``ringd`` processes on loopback.

- ``tiny_store``: a model store holding the tiny float Llama under one name.
- ``local_ring``: a factory of :class:`ringd.localring.LocalRing` on that store; every ring
  it made is stopped at teardown (and its logs shown if the test failed).
- :class:`NotifySocket`: the AF_UNIX datagram socket systemd listens on for ``sd_notify``;
  a reader thread timestamps every message as it arrives.
- :func:`unit_command`: the command line and environment of ``systemd/ringd.service``
  (``ExecStart=``, ``Environment=``, ``%S``), plus ``RINGD_*`` variables as the unit's
  environment file would hold them.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest

from ringd.localring import LocalRing

TINY_NAME = "tiny"
# The tiny model needs ~4 MiB of weights; a small context keeps the KV cache (and so the
# budgets) small while leaving room for generations of a few thousand tokens.
RING_ARGS = ("--max-context=4096", "--max-concurrent=2", "--probe-interval=0.2",
             "--probe-timeout=0.1")
BUDGET = 64 * 2**20


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, str]:
    """(store directory, model name) for the tiny float Llama (a symlink in a fresh store)."""
    store = tmp_path_factory.mktemp("store")
    (store / TINY_NAME).symlink_to(tiny_model_dir, target_is_directory=True)
    return store, TINY_NAME


RingFactory = Callable[..., LocalRing]


@pytest.fixture
def local_ring(tmp_path: Path, tiny_store: tuple[Path, str],
               request: pytest.FixtureRequest) -> Iterator[RingFactory]:
    """``local_ring(n, *, budgets=None, extra_args=(), env=None, start=True) -> LocalRing``.

    Rings live under ``tmp_path/ringK``; each is stopped (SIGTERM, then SIGKILL) at teardown.
    """
    rings: list[LocalRing] = []
    store, name = tiny_store

    def make(n: int = 1, *, budgets: list[int] | None = None, extra_args: tuple[str, ...] = (),
             env: Mapping[str, str] | None = None, start: bool = True) -> LocalRing:
        ring = LocalRing(tmp_path / f"ring{len(rings) + 1}", budgets or [BUDGET] * n, name, store,
                         extra_args=(*RING_ARGS, *extra_args), env=dict(env or {}))
        rings.append(ring)
        if start:
            ring.start()
        return ring

    yield make
    for ring in rings:
        ring.stop(timeout=10.0)
    if request.node.stash.get(_FAILED, False):
        for ring in rings:
            for node in ring.nodes:
                tail = ring.tail(node, 40)
                sys.stderr.write(f"--- {ring.base.name}/{node.name} log tail\n{tail}\n")


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


# ------------------------------------------------------------------- sd_notify listener
@dataclass(frozen=True)
class Notice:
    """One sd_notify datagram: when it arrived (monotonic) and its KEY=value fields."""

    at: float
    fields: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str | None:
        return next((v for k, v in self.fields if k == key), None)


class NotifySocket:
    """Listens where ``$NOTIFY_SOCKET`` points, like systemd does for a ``Type=notify`` unit."""

    def __init__(self) -> None:
        # Short path: AF_UNIX addresses are limited to ~108 bytes.
        self._dir = tempfile.mkdtemp(prefix="ringd-notify-")
        self.path = os.path.join(self._dir, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.1)
        self.notices: list[Notice] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            lines = data.decode().splitlines()
            fields = tuple(tuple(line.split("=", 1)) for line in lines if "=" in line)
            with self._cond:
                self.notices.append(Notice(now, fields))  # type: ignore[arg-type]
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[Notice], bool], timeout: float, *,
                 proc: subprocess.Popen[bytes] | None = None, since: int = 0) -> Notice:
        """The first notice from index ``since`` on matching ``pred``; fails after ``timeout`` s
        or as soon as ``proc`` has exited without sending it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((n for n in self.notices[since:] if pred(n)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching sd_notify message within {timeout} s; "
                                         f"got {self.texts()}")
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"ringd exited with {proc.returncode} first; "
                                         f"got {self.texts()}")
                self._cond.wait(min(left, 0.1))

    def snapshot(self) -> list[Notice]:
        with self._cond:
            return list(self.notices)

    def texts(self) -> list[str]:
        return ["\\n".join(f"{k}={v}" for k, v in n.fields) for n in self.snapshot()]

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self._sock.close()
        os.unlink(self.path)
        os.rmdir(self._dir)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    ns = NotifySocket()
    yield ns
    ns.close()


# ------------------------------------------------------------------- the unit's command line
def unit_command(state_root: Path, settings: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """argv and environment of ``ringd.service`` (user scope), ``%S`` = ``state_root``.

    ``ExecStart=`` names this venv's ``ringd``; ``settings`` are the ``RINGD_*`` lines of
    the environment file. The caller adds what systemd itself sets (``NOTIFY_SOCKET`` ...).
    """
    from ringd.service.units import Scope, render_systemd_unit

    exe = str(Path(sys.executable).parent / "ringd")
    unit = render_systemd_unit(Scope.USER, exe)
    argv: list[str] = []
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RINGD_", "NOTIFY_", "WATCHDOG_", "LISTEN_"))}
    for line in unit.splitlines():
        key, _, value = line.partition("=")
        value = value.replace("%S", str(state_root))
        if key == "ExecStart":
            argv = shlex.split(value)
        elif key == "Environment":
            name, _, val = shlex.split(value)[0].partition("=")
            env[name] = val
    assert argv and argv[0] == exe, unit
    env.update(settings)
    return argv, env
