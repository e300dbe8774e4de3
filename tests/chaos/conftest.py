"""Rings of real daemons on loopback, a stream through them, and a fault in the middle.

``chaos_ring(n, ...)`` starts ``n`` daemons on the tiny model (node ids 1..n, so the plan is
known in advance: equal budgets, layers in node order) with fast failure detection, and
stops them at teardown; :class:`TimedStream` reads one generation in a thread with the time
of every token.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

from ringd.client import Client
from ringd.localring import LocalRing

TINY = "tiny"
BUDGET = 64 * 2**20
CHAOS_ARGS = ("--max-context=4096", "--max-concurrent=4", "--probe-interval=0.2",
              "--probe-timeout=0.1", "--suspicion-timeout=1.5", "--replan-drain=120")
#: Greedy on the tiny model this prompt never samples EOS: the stream runs its max_tokens.
STORY = {"prompt": "Tell me a story.", "temperature": 0.0}


@pytest.fixture(scope="session")
def chaos_store(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    store = tmp_path_factory.mktemp("chaos-store")
    (store / TINY).symlink_to(tiny_model_dir, target_is_directory=True)
    return store


@pytest.fixture
def chaos_ring(tmp_path: Path, chaos_store: Path,
               request: pytest.FixtureRequest) -> Iterator[Callable[..., LocalRing]]:
    rings: list[LocalRing] = []

    def make(n: int = 3, *, start: int | None = None, env: dict[str, str] | None = None,
             extra_args: tuple[str, ...] = ()) -> LocalRing:
        base = tmp_path / f"ring{len(rings) + 1}"
        ring = LocalRing(base, [BUDGET] * n, TINY, chaos_store,
                         extra_args=(*CHAOS_ARGS, *extra_args), env=dict(env or {}))
        for i in range(1, n + 1):
            d = base / f"node{i}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "node_id").write_text(f"{i:016x}\n")
        rings.append(ring)
        ring.start(count=start)
        return ring

    yield make
    failed = request.node.stash.get(_FAILED, False)
    for ring in rings:
        for node in ring.nodes:  # a stopped node must run again to stop
            if node.alive():
                psutil.Process(node.proc.pid).resume()  # type: ignore[union-attr]
        ring.stop(timeout=15.0)
        if failed:
            for node in ring.nodes:
                sys.stderr.write(f"--- {ring.base.name}/{node.name}\n{ring.tail(node, 30)}\n")


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


class TimedStream(threading.Thread):
    """One generation read in a thread: token ids with their arrival times, how it ended."""

    def __init__(self, client: Client, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.client, self.body = client, body
        self.ids: list[int] = []
        self.times: list[float] = []
        self.finish: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._progress = threading.Condition()

    def run(self) -> None:
        try:
            for ev in self.client.stream_generate(self.body):
                if ev.get("type") == "finish":
                    self.finish = ev
                    continue
                with self._progress:
                    self.ids.append(ev["token_id"])
                    self.times.append(time.monotonic())
                    self._progress.notify_all()
        except BaseException as e:  # recorded for the test to assert on
            self.error = e
        finally:
            with self._progress:
                self._progress.notify_all()

    def wait_for_tokens(self, n: int, timeout: float = 60.0) -> None:
        """Block until ``n`` tokens came (or the stream ended)."""
        with self._progress:
            ok = self._progress.wait_for(
                lambda: len(self.ids) >= n or not self.is_alive(), timeout)
        assert ok and len(self.ids) >= n, (len(self.ids), self.error)

    def pause(self) -> float:
        """The longest gap between two tokens (seconds)."""
        return max((b - a for a, b in zip(self.times, self.times[1:])), default=0.0)

    def gap(self) -> float:
        """The median gap between two tokens (seconds)."""
        gaps = sorted(b - a for a, b in zip(self.times, self.times[1:]))
        return gaps[len(gaps) // 2] if gaps else 0.0


def undisturbed(client: Client, body: dict[str, Any]) -> list[int]:
    """The tokens of ``body`` on a ring nothing happens to."""
    return [e["token_id"] for e in client.stream_generate(body) if e.get("type") == "token"]


def rss_mib(ring: LocalRing) -> dict[str, float]:
    """Resident memory of each live daemon."""
    return {n.name: psutil.Process(n.proc.pid).memory_info().rss / 2**20  # type: ignore
            for n in ring.nodes if n.alive()}
