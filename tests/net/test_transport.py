"""The Transport: both channels on one port, channel choice, fallback, lossy links."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import msgpack
import pytest

from ringd.config import Settings
from ringd.core import stream, wire
from ringd.core.reliable import ReliableConfig
from ringd.core.requests import SamplingParams
from ringd.core.wire import Activation, FetchReply, FetchRequest, Gossip, Tensor, Token
from ringd.errors import ConfigError
from ringd.net.transport import Transport, stream_of
from tests.net.lossy_proxy import LossyProxy
from tests.net.test_discovery import until
from tests.net.test_udp import Inbox, on_both_loops

KEY = bytes(range(32))
SETTINGS = Settings(bind_host="127.0.0.1", port=0, mdns=False)


async def transport(name: str, *, key: bytes = KEY, settings: Settings = SETTINGS,
                    **kw) -> tuple[Transport, Inbox]:
    inbox = Inbox()
    t = Transport(settings, node_id=name, key=key,
                  on_message=lambda s, a, m: inbox.put((s, a, m)), **kw)
    await t.start()
    return t, inbox


def act(n: int, epoch: int = 1, step: int = 0) -> Activation:
    return Activation("req-1", step, 0, epoch, 0, 4, "a", SamplingParams(), True,
                      Tensor("float16", (1, n // 2), os.urandom(n)))


@on_both_loops
async def test_binds_udp_and_tcp_on_one_port() -> None:
    t, _ = await transport("a")
    try:
        host, port = t.local_addr
        assert host == "127.0.0.1" and port > 0
        assert t.udp.sock.getsockname()[1] == port
        assert t.tcp._server.sockets[0].getsockname()[1] == port
        busy = Transport(Settings(bind_host="127.0.0.1", port=port), node_id="b", key=KEY,
                         on_message=lambda *a: None)
        with pytest.raises(ConfigError, match="cannot bind the peer port"):
            await busy.start()
    finally:
        await t.close()


@on_both_loops
async def test_small_frames_use_udp_large_ones_tcp() -> None:
    a, _ = await transport("a")
    b, inbox = await transport("b", settings=Settings(bind_host="127.0.0.1", port=0,
                                                      tcp_threshold=64 * 1024))
    try:
        small, large = act(32 * 1024), act(1 << 20, step=1)
        a.send(b.local_addr, small)
        b_udp, b_tcp = b.udp.endpoint.totals["frames_received"], b.tcp.totals["frames_received"]
        await inbox.wait(lambda xs: len(xs) == 1)
        a.send(b.local_addr, large)
        await inbox.wait(lambda xs: len(xs) == 2)
        assert [m for _, _, m in inbox.items] == [small, large]
        # same address either way
        assert all(s == "a" and addr == a.local_addr for s, addr, _ in inbox.items)
        assert b.udp.endpoint.totals["frames_received"] == b_udp + 1
        assert b.tcp.totals["frames_received"] == b_tcp + 1
        # b's threshold is lower: its 100 KiB reply goes over TCP, a's over UDP
        reply = act(100 * 1024, step=2)
        b.send(a.local_addr, reply)
        a.send(b.local_addr, reply)
        await inbox.wait(lambda xs: len(xs) == 3)
        assert b.stats()["tcp"]["frames_sent"] >= 1 and a.stats()["udp"]["frames_sent"] == 2
        unreliable = Gossip(b"probe")
        a.send(b.local_addr, unreliable, reliable=False)
        await inbox.wait(lambda xs: len(xs) == 4)
        assert inbox.items[-1][2] == unreliable and a.udp.endpoint.totals["oneshots_sent"] == 1
    finally:
        await a.close()
        await b.close()


@on_both_loops
async def test_bulk_frames_always_take_tcp_and_do_not_hold_up_decode_steps() -> None:
    a, _ = await transport("a")
    b, inbox = await transport("b")
    try:
        mid = "ab" * 16
        tiny = FetchRequest(mid, "model.norm.weight", 0, 1024)  # 60 bytes: UDP unless bulk
        a.send(b.local_addr, tiny, bulk=True)
        await inbox.wait(lambda xs: len(xs) == 1)
        assert inbox.items[0][2] == tiny
        assert b.tcp.totals["frames_received"] == 1  # the handshake is not counted
        assert b.udp.endpoint.totals["frames_received"] == 0
        # 32 MiB of weight chunks queued, then a decode step: the step goes by UDP and
        # arrives while the chunks still cross, one TCP record per turn of the loop
        chunks = [FetchReply(mid, f"t{i}", 0, "ok", os.urandom(4 << 20)) for i in range(8)]
        for c in chunks:
            a.send(b.local_addr, c, bulk=True)
        step = act(32 * 1024, step=7)
        a.send(b.local_addr, step)
        await inbox.wait(lambda xs: len(xs) == 10, timeout=30)
        got = [m for _, _, m in inbox.items[1:]]
        assert [m for m in got if isinstance(m, FetchReply)] == chunks  # in order, whole
        assert got.index(step) < 8  # not behind every chunk
        assert b.udp.endpoint.totals["frames_received"] == 1
        assert b.tcp.totals["frames_received"] == 9
    finally:
        await a.close()
        await b.close()


@on_both_loops
async def test_a_malformed_frame_is_counted_and_never_raises() -> None:
    a, _ = await transport("a")
    b, inbox = await transport("b")
    try:
        # a negative step: counted as malformed, and no exception out of the frame handler
        # (the channels' entry point); the next good frame is delivered
        meta = msgpack.packb(("req-9", -1, 0, 4, 0, 0, "a", (0.0, 1.0, 0, None, 8, False), True,
                              "float16", (1, 2)), use_bin_type=True)
        frame = (bytes([wire.MsgType.ACTIVATION]) + len(meta).to_bytes(4, "little") + meta
                 + bytes(4))
        b._on_frame("a", a.local_addr, frame)
        assert b.stats()["drops"]["malformed"] == 1 and b.delivered == 0
        a.send(b.local_addr, act(1024, epoch=5))
        await inbox.wait(lambda xs: len(xs) == 1)
        assert inbox.items[0][2].epoch == 5
    finally:
        await a.close()
        await b.close()


@on_both_loops
async def test_peer_silent_on_udp_is_moved_to_tcp() -> None:
    changes: list[tuple] = []
    fast = ReliableConfig(initial_rtt=0.005, pto_limit=3)
    a, _ = await transport("a", reliable=fast,
                           on_channel_change=lambda addr, ch: changes.append((addr, ch)),
                           udp_retry=0.3)
    b, inbox = await transport("b")
    try:
        b.udp.pause_reading()  # UDP to b is black-holed; TCP still works
        msgs = [act(1024, step=i) for i in range(3)]
        for m in msgs:
            a.send(b.local_addr, m)
        await inbox.wait(lambda xs: len(xs) == 3, timeout=10)
        assert [m for _, _, m in inbox.items] == msgs  # resent over TCP, in order
        assert changes == [(b.local_addr, "tcp")]
        assert a.stats()["on_tcp"] == [f"{b.local_addr[0]}:{b.local_addr[1]}"]
        a.send(b.local_addr, act(1024, step=3))  # still TCP while the retry time runs
        await inbox.wait(lambda xs: len(xs) == 4)
        assert a.udp.endpoint.totals["frames_sent"] == 3
        while True:  # what b did not read was lost on the way
            try:
                b.udp.sock.recv(65536)
            except BlockingIOError:
                break
        b.udp.resume_reading()
        start = time.monotonic()
        # wait out udp_retry: a deadline, not a synchronisation
        while time.monotonic() - start < 0.3:
            await asyncio.sleep(0.05)
        a.send(b.local_addr, act(1024, step=4))
        await inbox.wait(lambda xs: len(xs) == 5)
        assert changes[-1] == (b.local_addr, "udp") and a.udp.endpoint.totals["frames_sent"] == 4
    finally:
        await a.close()
        await b.close()


@on_both_loops
async def test_frames_resent_over_tcp_are_delivered_once_when_udp_catches_up() -> None:
    """A stopped node (SIGSTOP) leaves frames in its UDP socket buffer; the sender gives up on
    UDP and resends them over TCP; when the node runs again it reads the buffered datagrams
    too. Each message is delivered once, whichever channel brought it first."""
    changes: list[tuple] = []
    fast = ReliableConfig(initial_rtt=0.005, pto_limit=3)
    a, _ = await transport("a", reliable=fast,
                           on_channel_change=lambda addr, ch: changes.append((addr, ch)))
    b, inbox = await transport("b")
    try:
        b.udp.pause_reading()  # the datagrams wait in b's socket buffer
        msgs = [act(1024, step=i) for i in range(3)]
        for m in msgs:
            a.send(b.local_addr, m)
        await inbox.wait(lambda xs: len(xs) == 3, timeout=10)  # resent over TCP
        assert changes == [(b.local_addr, "tcp")]
        b.udp.resume_reading()  # the same three now come out of the UDP buffer
        b.send(a.local_addr, act(1024, step=9))  # b answers over UDP...
        await until(lambda: b.stats()["drops"]["duplicate"] == 3)
        assert [m for _, _, m in inbox.items] == msgs  # each once, in order
        a.send(b.local_addr, act(1024, step=3))
        await inbox.wait(lambda xs: len(xs) == 4)
        assert inbox.items[3][2].step == 3
    finally:
        await a.close()
        await b.close()


@on_both_loops
async def test_a_peer_moved_to_tcp_returns_to_udp_once_it_answers() -> None:
    changes: list[tuple] = []
    fast = ReliableConfig(initial_rtt=0.005, pto_limit=3)
    a, inbox_a = await transport("a", reliable=fast,
                                 on_channel_change=lambda addr, ch: changes.append((addr, ch)))
    b, inbox = await transport("b")
    try:
        b.udp.pause_reading()
        a.send(b.local_addr, act(1024))
        await inbox.wait(lambda xs: len(xs) == 1, timeout=10)
        assert a.channel(b.local_addr) == "tcp"
        b.udp.resume_reading()
        a._tcp_since[b.local_addr] -= 1.0  # it has been on TCP a while (1 s the first time)
        b.send(a.local_addr, act(1024, step=1))  # a hears b over UDP: b answers again
        await inbox_a.wait(lambda xs: len(xs) == 1)
        assert changes == [(b.local_addr, "tcp"), (b.local_addr, "udp")]
        assert a.channel(b.local_addr) == "udp"
        sent = a.udp.endpoint.totals["frames_sent"]
        a.send(b.local_addr, act(1024, step=2))
        await inbox.wait(lambda xs: len(xs) == 2)
        assert a.udp.endpoint.totals["frames_sent"] == sent + 1
    finally:
        await a.close()
        await b.close()


@on_both_loops
async def test_ten_thousand_frames_through_a_lossy_link_arrive_once_in_order() -> None:
    lan = Settings(bind_host="127.0.0.1", port=0, mdns=False,
                   datagram_size=1400)  # an Ethernet's size
    b, inbox = await transport("b", settings=lan)
    proxy = LossyProxy(b.local_addr, seed=7, loss=0.05, dup=0.03, reorder=0.1, max_delay=0.003)
    front = await proxy.start()
    a, _ = await transport("a", settings=lan)
    try:
        n = 10_000
        t0 = time.monotonic()
        for i in range(n):
            size = 3000 if i % 10 == 0 else 64  # some frames span three datagrams
            a.send(front, Gossip(i.to_bytes(4, "little") * (size // 4)))
            if i % 20 == 0:
                await asyncio.sleep(0)  # let the loop run: frames leave in many small packets
        await inbox.wait(lambda xs: len(xs) == n, timeout=60)
        got = [int.from_bytes(m.payload[:4], "little") for _, _, m in inbox.items]
        assert got == list(range(n))
        assert all(s == "a" and addr == proxy.back_addr for s, addr, _ in inbox.items)
        assert (proxy.forward.dropped > 100 and proxy.forward.duplicated > 50
                and proxy.forward.delayed > 100)
        assert a.udp.endpoint.totals["packets_lost"] > 0
        assert b.stats()["drops"]["replay"] > 0  # duplicates were recognised
        assert b.udp.totals["gathered"] > 0  # the proxy sends datagrams one by one: no kernel GRO
        assert time.monotonic() - t0 < 30
    finally:
        proxy.close()
        await a.close()
        await b.close()


@on_both_loops
async def test_bad_input_is_counted_never_delivered() -> None:
    b, inbox = await transport("b")
    a, _ = await transport("a")
    other, _ = await transport("x", key=bytes(32))
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.setblocking(False)  # sent from the loop: it must not wait
    try:
        other.send(b.local_addr, Gossip(b"wrong key"))
        raw.sendto(b"\xd7\x01", b.local_addr)  # truncated
        a.udp.send_frame(b.local_addr, b"\x63\0\0\0\0")  # sealed, but an unknown message type
        a.udp.send_frame(b.local_addr, b"\x02\0\0")  # sealed, truncated message
        r, w = await asyncio.open_connection(*b.local_addr)
        w.write(stream.TCP_HEADER.pack(1 << 30, stream.TCP_MAGIC, wire.WIRE_VERSION,
                                       a.sealer.cluster_tag, 1, 1))  # oversize length
        await asyncio.wait_for(r.read(), 5)  # b sends its handshake, then hangs up (reads to EOF)
        w.close()
        a.send(b.local_addr, Gossip(b"the only good one"))  # sent last on the same path
        await inbox.wait(lambda xs: len(xs) == 1)
        assert inbox.items[0][2] == Gossip(b"the only good one")
        d = b.stats()["drops"]
        assert d["truncated"] == 2 and d["unknown_type"] == 1 and d["oversize"] == 1
        assert d["wrong_cluster"] >= 1
    finally:
        raw.close()
        for t in (a, b, other):
            await t.close()


def test_streams_follow_requests() -> None:
    assert stream_of(Gossip(b"")) == 0
    s = stream_of(Token("req-1", 0, 0, 0, 0, 1))
    assert 1 <= s <= 255 and stream_of(act(16)) == s
