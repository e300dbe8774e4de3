"""The UDP adapter over real loopback sockets (with and without GSO/GRO)."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from ringd.core.packet import MAX_BURST
from ringd.core.reliable import Endpoint, FrameReceived, PeerUnreachable, ReliableConfig
from ringd.core.seal import ReplayGuard, Sealer, new_session
from ringd.core.wire import WIRE_VERSION
from ringd.net.udp import UdpChannel
from tests.net.netns import unavailable_reason

KEY = bytes(range(32))
ROOT = Path(__file__).resolve().parents[2]


def on_both_loops(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on uvloop (what ringd uses) and on the standard asyncio loop."""

    def wrapper(*, loop_kind: str, **kwargs: Any) -> None:
        factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(fn(**kwargs))

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
              for p in inspect.signature(fn).parameters.values()]
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


def channel(name: str, *, key: bytes = KEY, offload: bool = True,
            **cfg) -> tuple[UdpChannel, Inbox]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    ep = Endpoint(Sealer(key, name, new_session(1000, len(name))), ReplayGuard(),
                  config=ReliableConfig(**cfg))
    inbox = Inbox()
    ch = UdpChannel(sock, ep, inbox.put, offload=offload, datagram_size=cfg.get("datagram_size", 0))
    ch.start()
    return ch, inbox


def addr(ch: UdpChannel) -> tuple[str, int]:
    return ch.sock.getsockname()


@pytest.mark.parametrize("offload", [True, False])
@on_both_loops
async def test_frames_of_every_size_arrive_once_in_order(offload: bool) -> None:
    # an Ethernet's size: frames span segments
    a, _ = channel("a", offload=offload, datagram_size=1400)
    b, inbox = channel("b", offload=offload, datagram_size=1400)
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
    raw.setblocking(False)  # sent from the loop: it must not wait
    try:
        intruder.send_frame(addr(b), b"let me in")
        raw.sendto(b"\xd7", addr(b))
        raw.sendto(b"\x00" + os.urandom(599), addr(b))  # not our magic byte (0xD7)
        raw.sendto(bytes([0xD7, WIRE_VERSION, 0, 1]) + bytes(40), addr(b))
        a.send_frame(addr(b), b"legit")  # sent last: once it is delivered the rest was read
        await inbox.wait(lambda xs: len(xs) == 1)
        assert bytes(inbox.items[0].data) == b"legit"
        c = b.endpoint.counters
        assert c["truncated"] == 1
        assert c["malformed"] >= 1 and c["wrong_cluster"] >= 2
        # only the authenticated peer cost a route lookup; forged sources did not
        assert set(b._paths) == {addr(a)}
    finally:
        for ch in (a, b, intruder):
            ch.close()
        raw.close()


@on_both_loops
async def test_without_gro_a_packets_datagrams_are_handed_over_together() -> None:
    """No UDP GRO (macOS, links without it): the adapter gathers each packet's datagrams
    itself. Runs end at a packet's last segment and at another sender, garbage included."""
    a, _ = channel("a", offload=False, datagram_size=1400)
    c, _ = channel("c", offload=False, datagram_size=1400)  # a's session number too (a 1-char name)
    b, inbox = channel("b", offload=False, datagram_size=1400)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.setblocking(False)  # sent from the loop: it must not wait
    b.pause_reading()  # everything below queues up in b's socket, interleaved by sender
    try:
        sent: dict[str, list[bytes]] = {"a": [], "c": []}
        for i in range(3):
            for name, ch in (("a", a), ("c", c)):
                data = os.urandom(20_000 + 1000 * i)  # 15-17 datagrams each
                ch.send_frame(addr(b), data)
                ch.flush()
                sent[name].append(data)
            # as long as a segment, from a third address; not our magic byte (0xD7)
            raw.sendto(b"\x00" + os.urandom(1399), addr(b))
        b.resume_reading()
        await inbox.wait(lambda xs: len(xs) == 6)
        got: dict[str, list[bytes]] = {"a": [], "c": []}
        for ev in inbox.items:
            got[ev.sender].append(bytes(ev.data))
        assert got == sent
        segments = b.endpoint.totals["segments_received"]
        assert segments >= 6 * 15
        assert b.totals["gathered"] == segments  # every packet went over in one piece
        assert b.totals["reads"] >= segments + 3
        assert b.endpoint.counters["malformed"] == 3
    finally:
        for ch in (a, b, c):
            ch.close()
        raw.close()


# --- datagram size per peer, from the path MTU ------------------------------------------

@pytest.mark.parametrize("offload", [True, False])
@on_both_loops
async def test_loopback_datagrams_follow_the_path(offload: bool) -> None:
    """No datagram_size: on loopback (65507 B payloads) the format's maximum is used, on
    both sides, and a 32 KiB frame leaves as one datagram."""
    a, a_inbox = channel("a", offload=offload)
    b, inbox = channel("b", offload=offload)
    try:
        data = os.urandom(32 * 1024)
        a.send_frame(addr(b), data)
        await inbox.wait(lambda xs: len(xs) == 1)
        [ev] = inbox.items
        assert isinstance(ev, FrameReceived) and bytes(ev.data) == data
        assert a.datagram_size(addr(b)) == MAX_BURST == 65000
        # shown in status
        assert a.endpoint.peer_stats()["%s:%d" % addr(b)]["datagram_size"] == 65000
        sent = a.endpoint.totals
        assert sent["frames_sent"] == 1
        assert sent["segments_sent"] == sent["packets_sent"]  # one segment per packet
        assert b.endpoint.totals["segments_received"] == b.endpoint.totals["packets_received"]

        # b learned the path when a's datagram came in, before sending anything itself
        assert b.endpoint.totals["frames_sent"] == 0
        assert b._paths[addr(a)] == 65000
        assert b.endpoint.datagram_size(addr(a)) == 65000
        reply = os.urandom(20_000)  # 15 segments at the 1400 B default
        b.send_frame(addr(a), reply)
        await a_inbox.wait(lambda xs: len(xs) == 1)
        assert bytes(a_inbox.items[0].data) == reply
        assert b.datagram_size(addr(a)) == 65000
        assert b.endpoint.totals["segments_sent"] == b.endpoint.totals["packets_sent"]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("offload", [True, False])
@on_both_loops
async def test_configured_datagram_size_caps_the_path(offload: bool) -> None:
    """datagram_size=1400 on a 64 KB path: 1400 B datagrams, a 32 KiB frame in 24+ segments."""
    a, _ = channel("a", offload=offload, datagram_size=1400)
    b, inbox = channel("b", offload=offload, datagram_size=1400)
    try:
        data = os.urandom(32 * 1024)
        a.send_frame(addr(b), data)
        await inbox.wait(lambda xs: len(xs) == 1)
        assert bytes(inbox.items[0].data) == data
        assert a.datagram_size(addr(b)) == 1400
        assert b.datagram_size(addr(a)) == 1400
        sent = a.endpoint.totals
        assert sent["segments_sent"] >= 24  # 32768 B / (1400 B less the segment header)
        assert sent["segments_sent"] > sent["packets_sent"]
        assert b.endpoint.totals["segments_received"] >= 24
        if offload and a.gso:  # GSO sends a packet's segments at once, GRO reads them so
            assert b.totals["reads"] < b.endpoint.totals["segments_received"]
    finally:
        a.close()
        b.close()


SHRINK_CHILD = r"""
import asyncio, json, logging, os, subprocess, sys

import uvloop

from tests.net.test_udp import addr, channel

records = []
handler = logging.Handler(logging.WARNING)
handler.emit = records.append
logging.getLogger("ringd").addHandler(handler)


async def main() -> dict:
    a, _ = channel("a")  # datagram_size 0: follow the path
    b, inbox = channel("b")
    try:
        out = {"gso": a.gso}
        first = os.urandom(4000)
        a.send_frame(addr(b), first)
        await inbox.wait(lambda xs: len(xs) == 1, timeout=10)
        out["first_intact"] = bytes(inbox.items[0].data) == first
        out["first"] = a.datagram_size(addr(b))
        out["b_first"] = b.datagram_size(addr(a))
        # the kernel's route MTU shrinks after the channel learned it
        subprocess.run(["ip", "link", "set", "lo", "mtu", "1500"], check=True, timeout=10)
        frames = [os.urandom(8192), os.urandom(30_000)]
        if sys.argv[2] == "gso-first":  # the refused send is then one of 4 segments (GSO)
            frames.reverse()
        for f in frames:
            a.send_frame(addr(b), f)
        try:
            await inbox.wait(lambda xs: len(xs) == 3, timeout=10)
            out["timed_out"] = False
        except TimeoutError:
            out["timed_out"] = True
        out["intact"] = [bytes(ev.data) for ev in inbox.items[1:]] == frames
        out["events"] = [type(ev).__name__ for ev in inbox.items]
        out["after"] = a.datagram_size(addr(b))
        out["gso_after"] = a.gso
        out["send_errors"] = a.totals["send_errors"]
        out["packets_lost"] = a.endpoint.totals["packets_lost"]
        out["probes"] = a.endpoint.totals["probes"]
        out["warnings"] = [r.getMessage() for r in records]
        return out
    finally:
        a.close()
        b.close()


subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "9000"], check=True, timeout=10)
factory = uvloop.new_event_loop if sys.argv[1] == "uvloop" else asyncio.new_event_loop
with asyncio.Runner(loop_factory=factory) as runner:
    print(json.dumps(runner.run(main())), flush=True)
"""


@pytest.fixture
def netns():
    """A fresh, empty network namespace (only ``lo``, down); skipped where none can be made."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    name = f"ringd-{os.getpid() % 10000}{secrets.token_hex(2)}-udp"
    proc = subprocess.run(["ip", "netns", "add", name], check=False, capture_output=True,
                          text=True, timeout=10)
    if proc.returncode != 0:
        pytest.skip(f"network namespaces unavailable: ip netns add: {proc.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=10)


@pytest.mark.netns
@pytest.mark.parametrize("order", ["one-segment-first", "gso-first"])
@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_shrinking_route_mtu_is_followed(netns: str, loop_kind: str, order: str) -> None:
    """lo at 9000 B: 8972 B datagrams. The MTU drops to 1500 B under the channel: the next
    send (an 8 KB frame in one datagram, or a 30 KB one in 4 GSO segments) is refused, the
    path is looked up again and the lost data is resent in 1472 B datagrams."""
    argv = ["ip", "netns", "exec", netns, sys.executable, "-c", SHRINK_CHILD, loop_kind, order]
    proc = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{loop_kind} {order}: {out}")
    assert out["first_intact"] and out["first"] == 8972 and out["b_first"] == 8972
    assert not out["timed_out"], out
    assert out["intact"], out
    assert out["events"] == ["FrameReceived"] * 3
    assert out["after"] == 1472
    assert out["send_errors"] >= 1
    assert any("do not fit the path" in w for w in out["warnings"]), out["warnings"]
