"""A real browser for the dashboard's tests: Debian's ``chromium`` driven by Playwright, which
uses that binary as it is (it downloads no browser of its own). ``.ci/run`` installs
chromium where it is missing.

Screenshots the tests keep go to ``ARTIFACTS`` (``RINGD_TEST_ARTIFACTS``, default
``build/test-artifacts`` in the checkout).
"""

from __future__ import annotations

import os
import shutil
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

ARTIFACTS = Path(os.environ.get("RINGD_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parent.parent / "build" / "test-artifacts")
#: Flags for a headless browser that talks to nothing but the page it is given.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: A laptop's window.
VIEWPORT = {"width": 1366, "height": 860}


def chromium_path() -> str:
    """The browser binary; fails (it does not skip) when there is none."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError("no chromium on this machine: install Debian's package "
                         "(apt-get install chromium), as .ci/run does")


def _launch_args() -> dict[str, Any]:
    # Playwright gives every launch a fresh profile (a new --user-data-dir) of its own
    return {"executable_path": chromium_path(), "headless": True, "args": FLAGS}


@asynccontextmanager
async def browser_page() -> AsyncIterator[Any]:
    """A fresh page (async API) in a fresh headless chromium, closed afterwards."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(**_launch_args())
        try:
            context = await browser.new_context(viewport=VIEWPORT)
            yield await context.new_page()
        finally:
            await browser.close()


@contextmanager
def browser_page_sync() -> Iterator[Any]:
    """The same for tests that run without an event loop (the sync API)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(**_launch_args())
        try:
            context = browser.new_context(viewport=VIEWPORT)
            yield context.new_page()
        finally:
            browser.close()


def artifact(name: str) -> Path:
    """Where a test keeps a file for people to look at afterwards."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name
