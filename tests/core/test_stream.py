"""The TCP stream: record framing, the stream decoder (any split, rejections, fuzzing),
pooled buffers, and large messages sealed and reassembled in records."""

from __future__ import annotations

import mmap
import os
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringd.core.requests import SamplingParams
from ringd.core.seal import ReplayGuard, Sealer, new_session
from ringd.core.stream import (TCP_CONT, TCP_HEADER, TCP_MAGIC, TCP_MORE, BufferPool, StreamDecoder,
                               seal_tcp_frame, seal_tcp_records)
from ringd.core.wire import (WIRE_VERSION, Activation, Dropped, Gossip, Tensor, decode,
                             encode, encode_bytes, new_counters)
from ringd.errors import LocalProtocolError

KEY = bytes(range(32))


def _decoder(key: bytes = KEY, **kw) -> tuple[StreamDecoder, dict]:
    c = new_counters()
    return StreamDecoder(Sealer(key, "rx", 1), ReplayGuard(), c, **kw), c


def _frames(n: int, size: int = 100) -> list[bytes]:
    s = Sealer(KEY, "tx", 42)
    return [bytes(seal_tcp_frame(s, i + 1, encode_bytes(Gossip(bytes([i % 256]) * size))))
            for i in range(n)]


def _records(parts: tuple[bytes, ...], *, record: int = 1000, first_seq: int = 100,
             sealer: Sealer | None = None) -> bytes:
    """One message sealed in records (what a TCP connection sends for a large message)."""
    s = sealer or Sealer(KEY, "tx", 42)
    seqs = iter(range(first_seq, first_seq + 10_000))
    chunks = seal_tcp_records(s, lambda: next(seqs), parts, record=record, buffer=bytearray)
    return b"".join(bytes(c) for c in chunks)


def _record_list(stream: bytes) -> list[bytes]:
    """Split a stream into its records (headers included)."""
    out, pos = [], 0
    while pos < len(stream):
        n = 4 + int.from_bytes(stream[pos:pos + 4], "little")
        out.append(stream[pos:pos + n])
        pos += n
    return out


def test_stream_decoder_reassembles_any_split() -> None:
    frames = _frames(5, 300)
    stream = b"".join(frames)
    for step in (1, 7, 64, 301, len(stream)):
        d, c = _decoder()
        got = []
        for i in range(0, len(stream), step):
            got += d.receive_data(stream[i:i + step])
        assert [decode(f.data).payload for f in got] == [bytes([i]) * 300 for i in range(5)]
        assert all(f.sender == "tx" for f in got) and sum(c.values()) == 0


def test_tcp_streams_of_nodes_sharing_a_session_are_both_accepted() -> None:
    """Two nodes' connections to one node, same session number: one replay guard, each
    node's sequence numbers checked against its own window."""
    guard, c = ReplayGuard(), new_counters()
    rx = Sealer(KEY, "rx", 1)
    got = []
    for name in ("tx-a", "tx-c"):  # c's sequence numbers are the ones a used
        d = StreamDecoder(rx, guard, c)
        s = Sealer(KEY, name, 42)
        got += d.receive_data(b"".join(
            bytes(seal_tcp_frame(s, i + 1, encode_bytes(Gossip(bytes([i]))))) for i in range(5)))
    assert [(f.sender, decode(f.data).payload) for f in got] == [
        (name, bytes([i])) for name in ("tx-a", "tx-c") for i in range(5)]
    assert sum(c.values()) == 0


def _feed_buffered(d: StreamDecoder, data: bytes, chunk: int) -> list:
    """Feed ``data`` as a BufferedProtocol would: reads of at most ``chunk`` bytes into the
    decoder's own buffer. Returns the frames decoded."""
    got, pos = [], 0
    while pos < len(data):
        buf = d.get_buffer(-1)
        n = min(len(buf), len(data) - pos, chunk)
        buf[:n] = data[pos:pos + n]
        pos += n
        got += d.buffer_updated(n)
    return got


def test_stream_decoder_buffered_protocol_api_and_buffer_reuse() -> None:
    d, c = _decoder()
    big = bytes(seal_tcp_frame(Sealer(KEY, "tx", 42), 1, encode_bytes(Gossip(os.urandom(500_000)))))
    got = _feed_buffered(d, big, 65536)
    assert len(got) == 1 and len(decode(got[0].data).payload) == 500_000
    first = d._buf
    big2 = bytes(seal_tcp_frame(Sealer(KEY, "tx", 42), 2,
                                encode_bytes(Gossip(os.urandom(500_000)))))
    [f2] = d.receive_data(big2)
    assert len(decode(f2.data).payload) == 500_000
    assert d._buf is first  # the same buffer serves the next large frame


def test_stream_decoder_rejections() -> None:
    frames = _frames(3)
    d, c = _decoder()
    assert len(d.receive_data(frames[0] + frames[0] + frames[1])) == 2
    assert c["replay"] == 1
    tampered = bytearray(frames[2])
    tampered[-1] ^= 1
    assert d.receive_data(bytes(tampered)) == [] and c["bad_mac"] == 1
    assert d.failed is None  # a bad frame is skipped, the stream stays in sync
    d, c = _decoder(key=bytes(32))
    assert d.receive_data(frames[0]) == [] and c["wrong_cluster"] == 1
    assert d.failed == "wrong_cluster"
    d, c = _decoder(max_frame=1000)
    huge = TCP_HEADER.pack(2**31, TCP_MAGIC, WIRE_VERSION, Sealer(KEY, "x", 1).cluster_tag, 1, 1)
    tracemalloc.start()
    d.receive_data(huge + bytes(5000))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert d.failed == "oversize" and c["oversize"] == 1 and peak < 200_000
    d, c = _decoder()
    assert d.receive_data(b"GET / HTTP/1.1\r\n\r\n" + bytes(20)) == [] and d.failed == "malformed"
    d, c = _decoder()
    bad_version = bytearray(frames[0])
    bad_version[5] = 99
    assert d.receive_data(bytes(bad_version)) == [] and d.failed == "bad_version"
    d, c = _decoder()
    short = TCP_HEADER.pack(TCP_HEADER.size - 4, TCP_MAGIC, WIRE_VERSION,
                            Sealer(KEY, "x", 1).cluster_tag, 1, 1)
    assert d.receive_data(short) == [] and d.failed == "truncated"


_MULTI = _records(tuple(encode(Gossip(os.urandom(2000)))), record=600)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_stream_decoder(data) -> None:
    frames = [*_frames(3, 50), _MULTI]  # seed corpus: small frames and a message in records
    d, c = _decoder(max_frame=4096)
    stream = bytearray(b"".join(data.draw(st.lists(st.sampled_from(frames), max_size=4))))
    for _ in range(data.draw(st.integers(0, 5))):
        if stream and data.draw(st.booleans()):
            stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
        else:
            stream[data.draw(st.integers(0, len(stream))):0] = data.draw(st.binary(max_size=40))
    chunk = data.draw(st.integers(1, 200))
    for i in range(0, len(stream), chunk):
        for f in d.receive_data(bytes(stream[i:i + chunk])):
            try:
                decode(f.data)
            except Dropped:
                pass
    assert len(d._buf) <= 4096 + TCP_HEADER.size + 64 * 1024
    assert d._asm is None or d._asm.total <= 4096


def test_fuzz_corpus_multi_record_stream_decodes_intact() -> None:
    d, c = _decoder(max_frame=4096)
    [f] = d.receive_data(_MULTI)
    assert len(_record_list(_MULTI)) == 5 and len(decode(f.data).payload) == 2000
    assert sum(c.values()) == 0


def test_large_frames_decode_into_pooled_buffers_kept_while_referenced() -> None:
    s = Sealer(KEY, "tx", 42)
    pool = BufferPool(min_size=1000)
    d = StreamDecoder(Sealer(KEY, "rx", 1), ReplayGuard(), new_counters(), pool=pool)
    frames = [bytes(seal_tcp_frame(s, i, encode_bytes(Gossip(bytes([i]) * 5000))))
              for i in (1, 2, 3)]
    [f1] = d.receive_data(frames[0])
    held = decode(f1.data)  # Gossip copies its payload; keep the frame's view alive instead
    view = f1.data
    del f1, held
    [f2] = d.receive_data(frames[1])
    assert f2.data.obj is not view.obj  # the first buffer is still referenced: not reused
    assert bytes(view[-5:]) == bytes([1]) * 5
    buf2 = f2.data.obj
    del f2, view
    [f3] = d.receive_data(frames[2])
    assert f3.data.obj is buf2 or len(pool._bufs) == 2  # a released buffer comes back
    assert decode(f3.data).payload == bytes([3]) * 5000


# ------------------------------------------------------------------------ messages in records
def _big_message(n: int = 50_000) -> tuple[bytes, bytes]:
    t = Tensor("int32", (n // 4,), os.urandom(n))
    head, body = encode(Activation("req", 3, 7, 1, 0, 8, "a", SamplingParams(), False, t))
    return head, bytes(body)


def test_records_round_trip_in_any_split_between_small_frames() -> None:
    import random

    rng = random.Random(7)
    parts = _big_message()
    multi = _records(parts, record=4096)
    recs = _record_list(multi)
    assert len(recs) == 2 + len(parts[1]) // 4096  # a short first record (the head), then full ones
    assert recs[0][6] == TCP_MORE and recs[1][6] == recs[-2][6] == TCP_MORE | TCP_CONT
    assert recs[-1][6] == TCP_CONT
    single = bytes(seal_tcp_frame(Sealer(KEY, "tx", 42), 99, b"".join(parts)))
    small = _frames(2, 30)  # seqs 1, 2
    stream = small[0] + multi + small[1]
    [ref] = _decoder()[0].receive_data(single)
    for how in ("bytes", "random", "whole"):
        d, c = _decoder()
        got = []
        if how == "bytes":
            for i in range(len(stream)):
                got += d.receive_data(stream[i:i + 1])
        elif how == "random":
            pos = 0
            while pos < len(stream):
                k = rng.randint(1, 9000)
                got += d.receive_data(stream[pos:pos + k])
                pos += k
        else:
            got = d.receive_data(stream)
        assert len(got) == 3 and sum(c.values()) == 0 and d.failed is None, how
        assert decode(got[0].data).payload == bytes([0]) * 30
        assert decode(got[2].data).payload == bytes([1]) * 30
        # the same plaintext as one record
        assert bytes(got[1].data) == b"".join(parts) == bytes(ref.data)
        assert got[1].sender == "tx" and got[1].session == 42
        msg = decode(got[1].data)
        assert msg == decode(b"".join(parts))


def test_records_through_the_buffered_protocol_api_into_a_pooled_buffer() -> None:
    pool = BufferPool(min_size=1000)
    d = StreamDecoder(Sealer(KEY, "rx", 1), ReplayGuard(), new_counters(), pool=pool)
    parts = _big_message(300_000)
    stream = _records(parts, record=64 * 1024) + _records(parts, record=64 * 1024, first_seq=500)
    got = _feed_buffered(d, stream, 40_000)
    assert [bytes(f.data) for f in got] == [b"".join(parts)] * 2
    assert got[0].data.obj in pool._bufs
    assert got[1].data.obj is not got[0].data.obj  # held: not reused
    assert len(d._buf) < 100_000  # the read buffer holds one record, not the message


def test_sealing_records_does_not_join_the_message() -> None:
    s = Sealer(KEY, "tx", 42)
    head, body = _big_message(4 << 20)
    bufs = [bytearray(300_000) for _ in range(2)]
    seqs = iter(range(1, 1000))
    chunks = []
    tracemalloc.start()
    for chunk in seal_tcp_records(s, lambda: next(seqs), (head, memoryview(body)), record=256 << 10,
                                       buffer=lambda n: bufs[len(chunks) % 2]):
        chunks.append(len(chunk))
        del chunk
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(chunks) == 16 and peak < 100_000  # records sealed from slices into reused buffers


@pytest.mark.parametrize("encrypt", [True, False])
def test_records_small_messages_and_clear_mode(encrypt: bool) -> None:
    s = Sealer(KEY, "tx", 42, encrypt=encrypt)
    for parts in ((b"x" * 10,), (b"a" * 100, b"b" * 100), (b"",),
                  (b"h" * 3000, b"b" * 5000, b"t" * 10)):
        stream = _records(parts, record=1000, sealer=s, first_seq=len(b"".join(parts)) * 100 + 1)
        d, c = _decoder()
        [f] = d.receive_data(stream)
        assert bytes(f.data) == b"".join(parts) and sum(c.values()) == 0
        assert (len(_record_list(stream)) == 1) == (len(b"".join(parts)) <= 1000)


def _record(seq: int, flags: int, plain: bytes, *, sealer: Sealer | None = None) -> bytes:
    return bytes(seal_tcp_frame(sealer or Sealer(KEY, "tx", 42), seq, plain, out=None, flags=flags))


def _total(n: int) -> bytes:
    return n.to_bytes(4, "little")


M, C = TCP_MORE, TCP_CONT


@pytest.mark.parametrize("name,stream,reason", [
    ("continuation without a first",
     lambda: _record(5, C | M, b"x" * 10) + _record(6, C, b"y"), "malformed"),
    ("last without a first", lambda: _record(5, C, b"x" * 10), "malformed"),
    ("total over max_frame", lambda: _record(5, M, _total(1 << 20) + b"x"), "oversize"),
    ("total held by the first record", lambda: _record(5, M, _total(3) + b"abc"), "malformed"),
    ("first record without a total", lambda: _record(5, M, b"ab"), "malformed"),
    ("new message before the last record",
     lambda: _record(5, M, _total(20) + b"x" * 5) + _record(6, 0, b"y" * 15), "malformed"),
    ("more than announced",
     lambda: _record(5, M, _total(20) + b"x" * 5) + _record(6, C, b"y" * 16), "malformed"),
    ("fewer than announced",
     lambda: _record(5, M, _total(20) + b"x" * 5) + _record(6, C, b"y" * 14), "malformed"),
    ("overflow in a middle record",
     lambda: _record(5, M, _total(20) + b"x" * 5) + _record(6, C | M, b"y" * 16), "malformed"),
    ("gap in the sequence",
     lambda: _record(5, M, _total(20) + b"x" * 5) + _record(7, C, b"y" * 15), "malformed"),
    ("another session", lambda: _record(5, M, _total(20) + b"x" * 5)
     + _record(6, C, b"y" * 15, sealer=Sealer(KEY, "tx", 43)), "malformed"),
    ("another sender", lambda: _record(5, M, _total(20) + b"x" * 5)
     + _record(6, C, b"y" * 15, sealer=Sealer(KEY, "evil", 42)), "malformed"),
    ("unknown flag", lambda: _record(5, 0x04, b"x"), "malformed"),
])
def test_broken_record_runs_fail_the_stream(name, stream, reason) -> None:
    stream = stream()
    d, c = _decoder(max_frame=1000)
    _decoder()[0].receive_data(stream)  # warm up (imports, key derivation caches)
    tracemalloc.start()
    got = d.receive_data(stream + _frames(1)[0])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == [] and d.failed == reason and c[reason] == 1 and sum(c.values()) == 1, name
    assert d._asm is None and peak < 200_000


def test_tampered_reordered_replayed_and_truncated_records() -> None:
    parts = _big_message(20_000)
    multi = _records(parts, record=4096)
    recs = _record_list(multi)
    # a flag flipped on the way: the flags are bound to the nonce, the tag fails
    for i, flip in ((0, M), (len(recs) - 1, M), (1, C), (len(recs) - 1, C)):
        bad = [bytearray(r) for r in recs]
        bad[i][6] ^= flip
        d, c = _decoder()
        assert d.receive_data(b"".join(bad)) == [], (i, flip)
        assert d.failed in ("bad_mac", "malformed"), (i, flip)
    # records swapped (each authentic): the sequence numbers give it away
    d, c = _decoder()
    assert d.receive_data(b"".join([recs[0], recs[2], recs[1], *recs[3:]])) == []
    assert d.failed == "malformed"
    # a record tampered with mid-message
    bad = bytearray(recs[2])
    bad[-1] ^= 1
    d, c = _decoder()
    assert d.receive_data(b"".join([*recs[:2], bytes(bad), *recs[3:]])) == []
    assert d.failed == "bad_mac"
    # the whole message again: a replay
    d, c = _decoder()
    assert len(d.receive_data(multi)) == 1
    assert d.receive_data(multi) == [] and d.failed == "replay" and c["replay"] == 1
    # truncated: the last record is cut short, or missing and the stream moves on
    d, c = _decoder()
    # waits for more
    assert d.receive_data(multi[:-10]) == [] and d.failed is None and sum(c.values()) == 0
    d, c = _decoder()
    assert d.receive_data(b"".join(recs[:-1]) + _frames(1)[0]) == [] and d.failed == "malformed"
    # a last record alone can't pass for a message (its flags are part of its nonce)
    last = bytearray(recs[-1])
    last[6] = 0
    d, c = _decoder()
    assert d.receive_data(bytes(last)) == [] and c["bad_mac"] == 1 and d.failed is None


def test_sealing_a_message_of_4_gib_raises_when_asked_not_when_consumed() -> None:
    s = Sealer(KEY, "a", new_session(1, 1))
    huge = memoryview(mmap.mmap(-1, 1 << 30))  # 4 x 1 GiB of untouched pages: no memory
    with pytest.raises(LocalProtocolError, match="4 GiB"):
        seal_tcp_records(s, lambda: 1, (huge,) * 4, record=512 << 10, buffer=bytearray)
