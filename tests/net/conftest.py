"""Every test of the network adapters runs with the loop guard: a blocking call made on a
running event loop's thread fails the test (tests/loopguard.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _loop_never_blocks(no_blocking_in_loop: object) -> None:
    """Applies ``no_blocking_in_loop`` (tests/conftest.py) to every test in tests/net/."""
