"""The process's one MLX thread: every MLX call of a node runs on it, in submission order.

MLX state is per thread (streams; compiled-function caches holding Python objects), and a
node's requests must not compute concurrently on one shard. The event loop submits jobs
and gets results back through futures (``loop.run_in_executor`` or a done callback with
``call_soon_threadsafe``); it never blocks on compute.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dis
import logging
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class MlxThread(concurrent.futures.Executor):
    """One daemon thread that runs submitted calls in order: the process's MLX thread.

    MLX state is per thread (streams; compiled-function caches holding Python objects).
    When such a thread ends, or only wakes, while Python finalizes, those thread-local
    destructors need the GIL and the process dies in std::terminate (exit status 134) -- as
    a pool worker does at interpreter exit. So this thread never ends (process exit reaps
    it), never takes a signal, and at exit it is left parked in its queue wait.
    """

    def __init__(self, name: str = "ringd-mlx") -> None:
        self._jobs: queue.SimpleQueue[
            tuple[
                concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]
            ]
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()
        atexit.register(self._park)

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        signal.pthread_sigmask(
            signal.SIG_BLOCK, signal.valid_signals()
        )  # and MLX's threads made here
        while True:
            future, fn, args, kwargs = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # handed to the caller, like a pool worker does
                future.set_exception(e)
            else:
                future.set_result(result)
            del future, fn, args, kwargs

    def _park(self, timeout: float = 5.0) -> None:
        """At interpreter exit: wait until the thread sits in its queue wait, without the GIL."""
        try:
            self.submit(lambda: None).result(timeout)
        except concurrent.futures.TimeoutError:
            log.warning("the MLX thread is still busy at exit")
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(self._thread.ident or -1)
            if frame is None or (frame.f_code is _WORK_CODE and frame.f_lasti == _WAIT_OFFSET):
                return  # we hold the GIL, so the thread is blocked inside the wait
            time.sleep(0.001)


def _call_offset(func: Callable[..., Any], name: str) -> int:
    """Bytecode offset of the call of method ``name`` in ``func``."""
    seen = False
    for ins in dis.get_instructions(func):
        if ins.argval == name:
            seen = True
        elif seen and ins.opname == "CALL":
            return ins.offset
    raise AssertionError(f"no call of {name} in {func.__qualname__}")


_WORK_CODE = MlxThread._work.__code__
_WAIT_OFFSET = _call_offset(MlxThread._work, "get")


_mlx_thread: MlxThread | None = None


def mlx_executor() -> MlxThread:
    """The process's one MLX thread, started on first use."""
    global _mlx_thread
    if _mlx_thread is None:
        _mlx_thread = MlxThread()
    return _mlx_thread
