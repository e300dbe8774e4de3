"""The event loop: uvloop whenever it imports, the standard loop otherwise (with one log line)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from typing import Any, Callable, Coroutine, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory for ``asyncio.Runner``: ``uvloop.new_event_loop`` when available."""
    try:
        import uvloop
    except ImportError as e:
        log.info("uvloop is not available (%s); using the standard asyncio event loop", e)
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """Run ``main`` to completion on a fresh loop from :func:`loop_factory`."""
    with asyncio.Runner(loop_factory=loop_factory(), debug=debug) as runner:
        return runner.run(main)


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """``uvloop`` or ``asyncio``, for status output."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


async def import_off_loop(modules: tuple[str, ...], stop: asyncio.Event) -> bool:
    """Import ``modules`` (MLX and friends take seconds) off the loop, so watchdog pings go
    on and the stall detector stays quiet, in a daemon thread so that a stop meanwhile ends
    the process at once. True once imported (an import error is raised here); False when
    ``stop`` was set first."""
    loop = asyncio.get_running_loop()
    imported: asyncio.Future[None] = loop.create_future()

    def work() -> None:
        error: BaseException | None = None
        try:
            for module in modules:
                importlib.import_module(module)
        except BaseException as e:  # raised on the loop
            error = e

        def deliver() -> None:
            if imported.done():
                return
            if error is not None:
                imported.set_exception(error)
            else:
                imported.set_result(None)

        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:
            pass  # the loop is closed: we stopped while importing

    threading.Thread(target=work, name="ringd-import", daemon=True).start()
    stop_wait = asyncio.ensure_future(stop.wait())
    await asyncio.wait((imported, stop_wait), return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
    if not imported.done():
        return False
    imported.result()
    return True
