"""The UDP adapter over real loopback sockets (with and without GSO/GRO)."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from typing import Any, Callable, Coroutine

import pytest
import uvloop

from ringd.core.reliable import Endpoint, FrameReceived, PeerUnreachable, ReliableConfig
from ringd.core.wire import ReplayGuard, Sealer, new_session
from ringd.net.udp import UdpChannel

KEY = bytes(range(32))


def on_both_loops(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on uvloop (what ringd uses) and on the standard asyncio loop."""

    def wrapper(*, loop_kind: str, **kwargs: Any) -> None:
        factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(fn(**kwargs))

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(fn).parameters.values()]
    wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*params, inspect.Parameter("loop_kind", inspect.Parameter.KEYWORD_ONLY)])
    wrapper.__name__ = wrapper.__qualname__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])(wrapper)


class Inbox:
    """Collects callbacks' items; ``wait`` blocks until a predicate holds (with a timeout)."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    def put(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()

    async def wait(self, pred: Callable[[list[Any]], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred(self.items):
                self._changed.clear()
                await self._changed.wait()


def channel(name: str, *, key: bytes = KEY, offload: bool = True, **cfg) -> tuple[UdpChannel, Inbox]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    ep = Endpoint(Sealer(key, name, new_session(1000, len(name))), ReplayGuard(), config=ReliableConfig(**cfg))
    inbox = Inbox()
    ch = UdpChannel(sock, ep, inbox.put, offload=offload)
    ch.start()
    return ch, inbox


def addr(ch: UdpChannel) -> tuple[str, int]:
    return ch.sock.getsockname()


@pytest.mark.parametrize("offload", [True, False])
@on_both_loops
async def test_frames_of_every_size_arrive_once_in_order(offload: bool) -> None:
    a, _ = channel("a", offload=offload)
    b, inbox = channel("b", offload=offload)
    try:
        sizes = [0, 1, 1300, 1400, 5000, 32 * 1024, 100_000, 1 << 20]
        sent = {0: [], 1: []}
        for i, n in enumerate(sizes * 3):
            data = os.urandom(n)
            assert a.send_frame(addr(b), data, stream=i % 2)
            sent[i % 2].append(data)
        await inbox.wait(lambda xs: len(xs) == 3 * len(sizes))
        got = {0: [], 1: []}
        for ev in inbox.items:
            assert isinstance(ev, FrameReceived) and ev.sender == "a" and ev.addr == addr(a)
            got[ev.stream].append(bytes(ev.data))
        assert got == sent
        totals = b.endpoint.totals
        if offload and a.gso:
            # GRO hands several segments of a packet over in one read
            assert totals["segments_received"] > b.totals["reads"]
        else:
            assert totals["segments_received"] <= b.totals["reads"]
    finally:
        a.close()
        b.close()


@on_both_loops
async def test_unanswered_peer_is_reported_unreachable() -> None:
    a, inbox = channel("a", initial_rtt=0.005, pto_limit=3)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # bound, never read: datagrams vanish
    try:
        a.send_frame(silent.getsockname(), b"one", stream=0)
        a.send_frame(silent.getsockname(), b"two", stream=3)
        await inbox.wait(lambda xs: len(xs) == 1, timeout=5)
        [ev] = inbox.items
        assert isinstance(ev, PeerUnreachable) and ev.addr == silent.getsockname()
        assert ev.frames == (b"one", b"two")
        assert a.endpoint.totals["probes"] == 2
    finally:
        a.close()
        silent.close()


@on_both_loops
async def test_foreign_and_garbage_datagrams_are_counted_and_dropped() -> None:
    a, _ = channel("a")
    b, inbox = channel("b")
    intruder, _ = channel("x", key=bytes(32))
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        intruder.send_frame(addr(b), b"let me in")
        raw.sendto(b"\xd7", addr(b))
        raw.sendto(os.urandom(600), addr(b))
        raw.sendto(b"\xd7\x01\x00\x01" + bytes(40), addr(b))
        a.send_frame(addr(b), b"legit")  # sent last: once it is delivered the rest was read
        await inbox.wait(lambda xs: len(xs) == 1)
        assert bytes(inbox.items[0].data) == b"legit"
        c = b.endpoint.counters
        assert c["wrong_cluster"] >= 1 and c["truncated"] == 1
        assert c["malformed"] + c["wrong_cluster"] >= 3
    finally:
        for ch in (a, b, intruder):
            ch.close()
        raw.close()
