"""The TCP adapter over real loopback connections."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
from collections.abc import AsyncIterator

import pytest

from ringd import PROTOCOL_VERSION
from ringd.core import stream, wire
from ringd.core.requests import SamplingParams
from ringd.core.seal import ReplayGuard, Sealer, new_session
from ringd.core.wire import Activation, Gossip, Handshake, Tensor, decode, encode_bytes
from ringd.errors import LocalProtocolError
from ringd.net import tcp
from ringd.net.tcp import TcpChannel
from tests.net.test_udp import Inbox, on_both_loops

KEY = bytes(range(32))


async def node(name: str, *, key: bytes = KEY, port: int = 0,
               **kw) -> tuple[TcpChannel, Inbox, tuple[str, int]]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    sock.setblocking(False)
    addr = sock.getsockname()
    inbox = Inbox()
    ch = TcpChannel(Sealer(key, name, new_session(1000, len(name))), ReplayGuard(),
                    wire.new_counters(), port=addr[1],
                    on_frame=lambda s, a, d: inbox.put((s, a, bytes(d))), **kw)
    await ch.start(sock)
    return ch, inbox, addr


def gossip(data: bytes) -> bytes:
    return encode_bytes(Gossip(data))


def activation(data: bytes) -> bytes:
    tensor = Tensor("int32", (len(data) // 4,), data)
    return encode_bytes(Activation("r", 1, 0, 1, 0, 2, "a", SamplingParams(), True, tensor))


@contextlib.asynccontextmanager
async def connected(**kw) -> AsyncIterator[tuple[TcpChannel, TcpChannel, Inbox, tuple[str, int]]]:
    """``(a, b, b's inbox, b's address)`` with a connected to b: one frame went through (and
    is no longer in the inbox). ``kw`` go to a's channel; both are closed after."""
    a, _, _ = await node("a", **kw)
    b, inb, ba = await node("b")
    try:
        a.send_frame(ba, gossip(b"hi"))
        await inb.wait(lambda xs: len(xs) == 1)
        inb.items.clear()
        yield a, b, inb, ba
    finally:
        await a.close()
        await b.close()


@on_both_loops
async def test_frames_flow_both_ways_on_one_connection() -> None:
    a, ina, aa = await node("a")
    b, inb, ba = await node("b")
    try:
        big = os.urandom(4 << 20)
        a.send_frame(ba, gossip(b"hello"))
        a.send_frame(ba, activation(big))
        await inb.wait(lambda xs: len(xs) == 2)
        assert decode(inb.items[0][2]).payload == b"hello"
        assert bytes(decode(inb.items[1][2]).tensor.data) == big
        # a's peer port, not its ephemeral one
        assert all(s == "a" and addr == aa for s, addr, _ in inb.items)
        b.send_frame(aa, gossip(b"reply"))  # reuses the connection a opened
        await ina.wait(lambda xs: len(xs) == 1)
        assert ina.items[0][:2] == ("b", ba)
        assert a.totals["connects"] == 1 and b.totals["connects"] == 0
        assert len(a.conns_all) == len(b.conns_all) == 1
    finally:
        await a.close()
        await b.close()


@on_both_loops
async def test_large_frames_go_in_records_between_small_frames_in_order() -> None:
    async with connected() as (a, b, inb, ba):
        sent_before = a.totals["bytes_sent"]
        bigs = [os.urandom(4 << 20) for _ in range(3)]
        expected = []
        for i, big in enumerate(bigs):
            head, body = wire.encode(Activation("r", i, 0, 1, 0, 2, "a", SamplingParams(), True,
                                                Tensor("int32", (len(big) // 4,), big)))
            a.send_frame(ba, head, memoryview(body))
            a.send_frame(ba, gossip(b"small %d" % i))
            expected += [b"".join((head, body)), gossip(b"small %d" % i)]
        a.send_frame(ba, bigs[0])  # one part, no head: a record straddles nothing, still intact
        expected.append(bigs[0])
        await inb.wait(lambda xs: len(xs) == len(expected), timeout=20)
        assert [d for _, _, d in inb.items] == expected
        assert bytes(decode(inb.items[4][2]).tensor.data) == bigs[2]
        # each 4 MiB message went in records (a u32 total in the first one, a header and a tag on
        # each): 3 x (the head alone + n of the body), n for the one without a head, 3 small ones
        n = (4 << 20) // tcp.RECORD
        per_record = stream.TCP_HEADER.size + a.sealer.overhead
        overhead = a.totals["bytes_sent"] - sent_before - sum(len(x) for x in expected)
        assert n >= 4 and overhead == 4 * 4 + (3 * (n + 1) + n + 3) * per_record
        assert (sum(b.counters.values()) == 0
                and b.totals["frames_received"] == 1 + len(expected))  # + connected()'s
        assert all(c.decoder.failed is None for c in b.conns_all)


@on_both_loops
async def test_large_messages_to_two_peers_at_once_arrive_whole() -> None:
    """One sender, two receivers, large messages to both interleaved on the loop (a holder
    serving weights to two fetching nodes): each message's records keep consecutive sequence
    numbers, so neither receiver sees a record from the middle of another message."""
    a, _, _ = await node("a")
    b, inb, ba = await node("b")
    c, inc, ca = await node("c")
    try:
        bigs = [os.urandom((1 << 20) + 16 * i) for i in range(6)]
        for big in bigs:
            a.send_frame(ba, activation(big))
            a.send_frame(ca, activation(big[::-1]))
        await inb.wait(lambda xs: len(xs) == len(bigs), timeout=20)
        await inc.wait(lambda xs: len(xs) == len(bigs), timeout=20)
        assert [bytes(decode(d).tensor.data) for _, _, d in inb.items] == bigs
        assert [bytes(decode(d).tensor.data) for _, _, d in inc.items] == [x[::-1] for x in bigs]
        for ch in (b, c):
            assert sum(ch.counters.values()) == 0
            assert all(conn.decoder.failed is None for conn in ch.conns_all)
    finally:
        for ch in (a, b, c):
            await ch.close()


@on_both_loops
async def test_simultaneous_connects_keep_one_connection() -> None:
    a, ina, aa = await node("a")
    b, inb, ba = await node("b")
    try:
        a.send_frame(ba, gossip(b"from a"))
        b.send_frame(aa, gossip(b"from b"))
        dials = [a._connecting[ba], b._connecting[aa]]
        await inb.wait(lambda xs: len(xs) == 1)
        await ina.wait(lambda xs: len(xs) == 1)
        await asyncio.wait_for(asyncio.gather(*dials), 5)
        # both dialled; the connection opened by the smaller node id ("a") wins on both sides
        assert a.totals["connects"] == b.totals["connects"] == 1
        assert a.conns[ba].initiator == "a" and b.conns[aa].initiator == "a"
        # b's dial, seen from both ends, is closed by b (it may be gone already)
        losers = [c for c in a.conns_all | b.conns_all if c not in (a.conns[ba], b.conns[aa])]
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in losers)), 5)
        assert len(a.conns_all) == len(b.conns_all) == 1
        assert {c.transport.get_extra_info("sockname") for c in a.conns_all} == \
               {c.transport.get_extra_info("peername") for c in b.conns_all}
        for i in range(20):
            a.send_frame(ba, gossip(b"a%d" % i))
            b.send_frame(aa, gossip(b"b%d" % i))
        await inb.wait(lambda xs: len(xs) == 21)
        await ina.wait(lambda xs: len(xs) == 21)
        assert [decode(d).payload for _, _, d in inb.items[1:]] == [b"a%d" % i for i in range(20)]
    finally:
        await a.close()
        await b.close()


@on_both_loops
async def test_reconnects_after_the_peer_restarts() -> None:
    a, _, aa = await node("a")
    b, inb, ba = await node("b")
    try:
        a.send_frame(ba, gossip(b"1"))
        await inb.wait(lambda xs: len(xs) == 1)
        closed = [c.closed for c in a.conns_all]
        await b.close()
        await asyncio.wait_for(asyncio.gather(*closed), 5)
        b, inb, _ = await node("b", port=ba[1])
        a.send_frame(ba, gossip(b"2"))
        await inb.wait(lambda xs: len(xs) == 1)
        assert decode(inb.items[0][2]).payload == b"2" and a.totals["connects"] == 2
    finally:
        await a.close()
        await b.close()


@on_both_loops
async def test_unreachable_peer_drops_queued_frames_after_backoff() -> None:
    a, _, _ = await node("a", connect_attempts=2, connect_timeout=1.0)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    dead = free.getsockname()
    free.close()  # nobody listens there now
    try:
        a.send_frame(dead, gossip(b"x"))
        a.send_frame(dead, gossip(b"y"))
        await asyncio.wait_for(a._connecting[dead], 5)
        assert a.totals["connect_failures"] == 2 and a.totals["dropped_unreachable"] == 2
    finally:
        await a.close()


@on_both_loops
async def test_backpressure_drain_and_pause_reading() -> None:
    async with connected() as (a, b, inb, ba):
        b.pause_reading()
        chunk = activation(os.urandom(1 << 20))
        conn = a.conns[ba]
        sent = 64  # far more than the socket buffers of both ends hold
        for _ in range(sent):
            a.send_frame(ba, chunk)
        drain = asyncio.ensure_future(a.drain(ba))
        done, _ = await asyncio.wait([drain], timeout=0.2)
        assert not done  # the receiver is not reading: the sender must wait
        # ... and what waits is not sealed into the transport's buffer, but queued unsealed
        assert conn.transport.get_write_buffer_size() <= tcp.WRITE_HIGH + 2 * tcp.RECORD
        assert conn.queued_bytes() > 32 * len(chunk)
        assert a.stats()["queued_bytes"] == conn.queued_bytes()
        b.resume_reading()
        await asyncio.wait_for(drain, 10)
        await inb.wait(lambda xs: len(xs) == sent)
        assert all(d == chunk for _, _, d in inb.items)
        assert conn.queued_bytes() == 0


@on_both_loops
async def test_the_queue_for_a_peer_that_does_not_read_is_bounded() -> None:
    async with connected(max_queued=8 << 20) as (a, b, inb, ba):
        b.pause_reading()
        conn = a.conns[ba]
        chunks = [activation(bytes([i]) * (1 << 20)) for i in range(64)]
        for c in chunks:
            a.send_frame(ba, c)
        # all sent in one turn of the loop: none written yet, the queue takes what fits in 8 MiB
        fit = (8 << 20) // len(chunks[0])
        assert conn.queued_bytes() == fit * len(chunks[0])
        dropped = a.counters["overflow"]
        assert dropped == 64 - fit
        b.resume_reading()
        await asyncio.wait_for(a.drain(ba), 10)
        await inb.wait(lambda xs: len(xs) == 64 - dropped)
        got = [d for _, _, d in inb.items]
        # the first ones, whole and in order: the later ones were dropped
        assert got == chunks[:len(got)]


@on_both_loops
async def test_small_frames_wait_in_the_queue_while_the_transport_pushes_back() -> None:
    """Between the transport's pause_writing and resume_writing nothing is written, small
    frames included (they would pile up in its buffer without bound); then all go, in order."""
    async with connected() as (a, _, inb, ba):
        conn = a.conns[ba]
        conn.pause_writing()  # as the transport calls it above its high-water mark
        sent = a.totals["bytes_sent"]
        for i in range(100):
            a.send_frame(ba, gossip(b"small %d" % i))
        assert a.totals["bytes_sent"] == sent and conn.queued_bytes() > 0
        drain = asyncio.ensure_future(a.drain(ba))
        conn.resume_writing()
        await asyncio.wait_for(drain, 10)
        await inb.wait(lambda xs: len(xs) == 100)
        assert [d for _, _, d in inb.items] == [gossip(b"small %d" % i) for i in range(100)]


@on_both_loops
async def test_a_message_that_cannot_be_sealed_fails_its_sender_not_the_connection(
        monkeypatch) -> None:
    async with connected() as (a, _, inb, ba):
        huge = memoryview(mmap.mmap(-1, 64 << 20))  # untouched pages: no memory
        with pytest.raises(LocalProtocolError, match="exceeds the limit"):
            a.send_frame(ba, gossip(b"x"), huge)  # at once, not later in the loop
        real = stream.seal_tcp_records

        def broken(*args, **kw):
            yield from ()
            raise RuntimeError("a sealing bug")

        monkeypatch.setattr(stream, "seal_tcp_records", broken)
        a.send_frame(ba, activation(os.urandom(1 << 20)))
        monkeypatch.setattr(stream, "seal_tcp_records", real)
        a.send_frame(ba, gossip(b"after"))
        await inb.wait(lambda xs: len(xs) == 1)
        assert inb.items[0][2] == gossip(b"after") and a.counters["overflow"] == 1


@on_both_loops
async def test_a_large_message_does_not_hold_the_loop() -> None:
    """A 16 MiB message is sealed record by record across turns of the loop: send_frame
    returns before it is written, a callback scheduled after it runs before it is all
    written, and a small frame sent after it still arrives after it."""
    async with connected() as (a, _, inb, ba):
        big = activation(os.urandom(16 << 20))
        before = a.totals["bytes_sent"]
        a.send_frame(ba, big)
        a.send_frame(ba, gossip(b"after"))
        assert a.totals["bytes_sent"] - before < tcp.RECORD  # nothing sealed yet
        written_when_called = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(
            lambda: written_when_called.set_result(a.totals["bytes_sent"] - before))
        assert await written_when_called <= 2 * tcp.RECORD + 4096
        await inb.wait(lambda xs: len(xs) == 2, timeout=20)
        assert inb.items[0][2] == big and inb.items[1][2] == gossip(b"after")
        assert a.totals["bytes_sent"] - before > len(big)


@on_both_loops
async def test_a_retired_connection_closes_only_after_its_queue_is_written() -> None:
    async with connected() as (a, _, inb, ba):
        conn = a.conns[ba]
        big = activation(os.urandom(8 << 20))
        a.send_frame(ba, big)
        a.send_frame(ba, gossip(b"last"))
        conn.retire()  # e.g. it lost a simultaneous-connect tie: a opened it, a closes it
        assert conn.queued_bytes() > 0 and not conn.transport.is_closing()
        await inb.wait(lambda xs: len(xs) == 2, timeout=20)
        assert inb.items[0][2] == big and inb.items[1][2] == gossip(b"last")
        await asyncio.wait_for(conn.closed, 10)


async def _raw_conn(addr) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*addr)


@on_both_loops
async def test_bad_peers_are_counted_and_disconnected() -> None:
    b, inb, ba = await node("b")
    try:
        # another cluster's key
        x, _, _ = await node("x", key=bytes(32))
        x.send_frame(ba, gossip(b"intrude"))
        dial = x._connecting[ba]
        # an oversize length, then garbage, then a frame that is not a handshake first
        sealer = Sealer(KEY, "y", new_session(1, 1))
        huge = stream.TCP_HEADER.pack(1 << 30, stream.TCP_MAGIC, wire.WIRE_VERSION,
                                      sealer.cluster_tag, 1, 1)
        first_not_handshake = bytes(stream.seal_tcp_frame(sealer, 1, gossip(b"no hello")))
        old = bytes(stream.seal_tcp_frame(Sealer(KEY, "z", new_session(2, 2)), 1, encode_bytes(
            Handshake("z", sealer.cluster_id, PROTOCOL_VERSION + 1, "9.9", 1))))
        for payload in (huge, b"GET / HTTP/1.1\r\n\r\n" + bytes(40), first_not_handshake, old):
            r, w = await _raw_conn(ba)
            w.write(payload)
            assert await asyncio.wait_for(r.read(), 5) is not None  # the node hangs up
            w.close()
        c = b.counters
        assert c["oversize"] == 1 and c["malformed"] == 2 and c["bad_version"] == 1
        await asyncio.wait_for(dial, 5)
        await asyncio.wait_for(asyncio.gather(*(cn.closed for cn in x.conns_all)), 5)  # b hung up
        assert c["wrong_cluster"] == 1 and not inb.items
        await x.close()
    finally:
        await b.close()
