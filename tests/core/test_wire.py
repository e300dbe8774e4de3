"""Wire format: message round trips, rejections, sealing, replay windows, the TCP stream decoder."""

from __future__ import annotations

import math
import mmap
import os
import struct
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringd.core import wire
from ringd.core.requests import SamplingParams
from ringd.core.wire import (DTYPE_SIZES, MAX_DIM, MAX_RANK, TCP_HEADER, Activation, Cancel, Dropped,
                             Error, Gossip, Handshake, ReplayGuard, ReplayWindow, Sealer,
                             StreamDecoder, Tensor, Token, decode, encode, encode_bytes, new_counters,
                             seal_tcp_frame)
from ringd.errors import LocalProtocolError, RequestError

KEY = bytes(range(32))

# ------------------------------------------------------------------------ strategies
ids = st.text(min_size=1, max_size=40)
u63 = st.integers(0, (1 << 63) - 1)
i31 = st.integers(0, (1 << 31) - 1)


@st.composite
def tensors(draw, max_elems: int = 4096) -> Tensor:
    dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
    rank = draw(st.integers(0, MAX_RANK))
    shape = tuple(draw(st.lists(st.integers(0, 16), min_size=rank, max_size=rank)))
    n = math.prod(shape) * DTYPE_SIZES[dtype]
    return Tensor(dtype, shape, draw(st.binary(min_size=n, max_size=n)))


samplings = st.builds(SamplingParams, temperature=st.floats(0, 10), top_p=st.floats(0.001, 1),
                      top_k=st.integers(0, 1000), seed=st.none() | u63, max_tokens=st.integers(1, 1 << 20),
                      want_logits=st.booleans())
logits = st.integers(0, 64).flatmap(
    lambda n: st.binary(min_size=4 * n, max_size=4 * n).map(lambda b: Tensor("float32", (n,), b)))
messages = st.one_of(
    st.builds(Handshake, ids, st.text(min_size=1, max_size=64), st.integers(0, 1 << 16),
              st.text(min_size=1, max_size=64), st.integers(0, 65535)),
    st.builds(Gossip, st.binary(max_size=3000)),
    st.builds(Activation, ids, u63, u63, u63, i31, i31, ids, samplings, st.booleans(), tensors()),
    st.builds(Token, ids, u63, u63, i31, i31, i31, st.none() | st.sampled_from(["stop", "length"]),
              st.none() | logits),
    st.builds(Cancel, ids, st.text(max_size=200)),
    st.builds(Error, ids, st.text(min_size=1, max_size=64), st.text(max_size=500)),
)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_every_message_round_trips(msg) -> None:
    head, body = encode(msg)
    assert decode(head + bytes(body)) == msg
    assert decode(bytearray(encode_bytes(msg))) == msg
    assert decode(memoryview(encode_bytes(msg))) == msg


@settings(max_examples=150, deadline=None)
@given(tensors())
def test_every_dtype_and_shape_round_trips_without_copying(t: Tensor) -> None:
    msg = Activation("r", 1, 2, 3, 0, 4, "n", SamplingParams(), True, t)
    data = encode_bytes(msg)
    got = decode(data)
    assert got.tensor == t and got.tensor.shape == t.shape and got.tensor.dtype == t.dtype
    assert isinstance(got.tensor.data, memoryview) and got.tensor.data.obj is data  # a view, no copy
    head, body = encode(msg)
    assert body is t.data  # sending doesn't copy either


def test_sampling_travels_without_its_stop_strings() -> None:
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=7, max_tokens=99, stop=("x",))
    t = Tensor("int32", (1,), bytes(4))
    got = decode(encode_bytes(Activation("r", 0, 0, 1, 0, 0, "n", p, True, t))).sampling
    assert got == SamplingParams(0.7, 0.9, 40, 7, 99)  # stop strings are the entry's business
    for bad in (dict(temperature=11.0), dict(top_p=0.0), dict(top_k=-1), dict(seed=-1),
                dict(max_tokens=0), dict(temperature="hot"), dict(seed=True)):
        with pytest.raises(RequestError):
            SamplingParams(**bad)


def test_bad_messages_raise_when_built() -> None:
    t = Tensor("float16", (2,), bytes(4))
    with pytest.raises(LocalProtocolError):
        Activation("", 0, 0, 0, 0, 1, "n", SamplingParams(), True, t)
    with pytest.raises(LocalProtocolError):
        Activation("r", -1, 0, 0, 0, 1, "n", SamplingParams(), True, t)
    with pytest.raises(LocalProtocolError):
        Token("r", 0, 0, 2**31, 0, 1)
    with pytest.raises(LocalProtocolError):  # logits are float32 [vocab] only
        Token("r", 0, 0, 1, 0, 1, None, Tensor("float16", (2,), bytes(4)))
    with pytest.raises(LocalProtocolError):
        Token("r", 0, 0, 1, 0, 1, None, Tensor("float32", (1, 2), bytes(8)))
    with pytest.raises(RequestError):
        SamplingParams(want_logits=1)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        Tensor("float64", (1,), bytes(8))
    with pytest.raises(LocalProtocolError):
        Tensor("float16", (3,), bytes(4))
    with pytest.raises(LocalProtocolError):
        Tensor("int32", (1,) * (MAX_RANK + 1), bytes(4))
    with pytest.raises(LocalProtocolError):
        Gossip(bytes(wire.MAX_GOSSIP + 1))
    with pytest.raises(LocalProtocolError):
        encode("not a message")  # type: ignore[arg-type]


def _raw(mtype: int, meta, body: bytes = b"") -> bytes:
    packed = msgpack.packb(meta)
    return struct.pack("<BI", mtype, len(packed)) + packed + body


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(Dropped) as e:
        decode(data, **kw)
    return e.value.reason


def test_decoder_rejections() -> None:
    good = encode_bytes(Activation("r", 1, 2, 3, 0, 4, "n", SamplingParams(), True, Tensor("float16", (2,), bytes(4))))
    assert _reason(good[:3]) == "truncated"
    assert _reason(good[:10]) == "truncated"
    assert _reason(struct.pack("<BI", 3, wire.MAX_META + 1)) == "oversize"
    assert _reason(_raw(99, [])) == "unknown_type"
    assert _reason(struct.pack("<BI", 4, 3) + b"\xc1\xc1\xc1") == "malformed"  # not msgpack
    assert _reason(_raw(4, {"a": 1})) == "malformed"  # maps are not allowed
    assert _reason(_raw(4, ["r", 1, 2, 3, 0, 4])) == "malformed"  # a field short
    assert _reason(_raw(4, ["r", "1", 2, 3, 0, 4, None])) == "malformed"  # wrong type
    assert _reason(_raw(4, ["r", 1, 2, 3, 0, 4, None], b"x")) == "malformed"  # stray body
    assert _reason(_raw(6, ["r", "c", "x" * (wire.MAX_TEXT + 1)])) == "malformed"  # too long
    assert _reason(_raw(4, list(range(wire.MAX_ARRAY + 1)))) == "malformed"  # array too long
    assert _reason(_raw(2, [], bytes(wire.MAX_GOSSIP + 1))) == "malformed"
    meta = ["r", 1, 2, 3, 0, 4, "n", [0.0, 1.0, 0, None, 5, False], True]
    assert _reason(_raw(3, meta + ["float64", [1]], bytes(8))) == "malformed"  # dtype allowlist
    assert _reason(_raw(3, meta + ["int32", [1] * (MAX_RANK + 1)], bytes(4))) == "malformed"  # rank
    assert _reason(_raw(3, meta + ["int32", [MAX_DIM + 1]], bytes(4))) == "malformed"  # dim
    assert _reason(_raw(3, meta + ["int32", [2]], bytes(4))) == "malformed"  # size mismatch
    assert _reason(_raw(3, meta[:7] + [[99.0, 1.0, 0, None, 5, False], True, "int32", [1]], bytes(4))) == "malformed"
    assert _reason(_raw(3, meta[:7] + [[0.0, 1.0, 0, None, 5], True, "int32", [1]], bytes(4))) == "malformed"
    assert _reason(_raw(3, meta[:7] + [[0.0, 1.0, 0, None, 5, 1], True, "int32", [1]], bytes(4))) == "malformed"
    assert decode(_raw(3, meta + ["int32", [1]], bytes(4))).tensor.shape == (1,)
    # Token logits: float32 [vocab] as the body, sized by the shape before anything is kept
    tok = ["r", 1, 2, 3, 0, 4, None]
    assert decode(_raw(4, tok + ["float32", [2]], bytes(8))).logits == Tensor("float32", (2,), bytes(8))
    assert _reason(_raw(4, tok + ["float32", [3]], bytes(8))) == "malformed"  # size mismatch
    assert _reason(_raw(4, tok + ["int32", [2]], bytes(8))) == "malformed"  # dtype
    assert _reason(_raw(4, tok + ["float32", [1, 2]], bytes(8))) == "malformed"  # rank
    assert _reason(_raw(4, tok + ["float32"], bytes(4))) == "malformed"  # 8 fields
    assert _reason(_raw(4, tok + ["float32", [MAX_DIM + 1]], bytes(4))) == "malformed"


def test_epoch_filter() -> None:
    t = Tensor("int32", (1,), bytes(4))
    act = encode_bytes(Activation("r", 1, 2, 7, 0, 4, "n", SamplingParams(), True, t))
    tok = encode_bytes(Token("r", 1, 7, 5, 0, 4))
    gossip = encode_bytes(Gossip(b"g"))
    assert decode(act, epoch=7).epoch == 7 and decode(tok, epoch=7).epoch == 7
    assert _reason(act, epoch=8) == "stale_epoch"
    assert _reason(tok, epoch=6) == "stale_epoch"
    assert decode(gossip, epoch=8) == Gossip(b"g")
    assert decode(act, epoch=None).epoch == 7


# ------------------------------------------------------------------------ sealing
@pytest.mark.parametrize("encrypt", [True, False])
def test_seal_and_open(encrypt: bool) -> None:
    a = Sealer(KEY, "node-a", 11, encrypt=encrypt)
    b = Sealer(KEY, "node-b", 22)
    plain = b"secret activations " * 20
    unit = bytes(a.seal(wire.CHANNEL_UDP, 5, plain))
    assert len(unit) == len(plain) + a.overhead
    assert (plain in unit) is not encrypt
    sender, got, owned = b.open(wire.CHANNEL_UDP, 11, 5, unit)
    assert (sender, bytes(got), owned) == ("node-a", plain, encrypt)
    for tamper in (0, 3, len(unit) // 2, len(unit) - 1):
        bad = bytearray(unit)
        bad[tamper] ^= 0x40
        with pytest.raises(Dropped) as e:
            b.open(wire.CHANNEL_UDP, 11, 5, bytes(bad))
        assert e.value.reason in ("bad_mac", "malformed")
    for channel, session, pn in ((wire.CHANNEL_TCP, 11, 5), (wire.CHANNEL_UDP, 12, 5), (wire.CHANNEL_UDP, 11, 6)):
        with pytest.raises(Dropped, match="bad_mac"):
            b.open(channel, session, pn, unit)  # the nonce and key bind channel, session and number
    with pytest.raises(Dropped, match="bad_mac"):
        Sealer(bytes(32), "x", 1).open(wire.CHANNEL_UDP, 11, 5, unit)
    with pytest.raises(Dropped, match="truncated"):
        b.open(wire.CHANNEL_UDP, 11, 5, unit[:10])


def test_sealer_misuse_and_cluster_id() -> None:
    with pytest.raises(LocalProtocolError):
        Sealer(b"short", "n", 1)
    with pytest.raises(LocalProtocolError):
        Sealer(KEY, "", 1)
    assert Sealer(KEY, "n", 1).cluster_id == wire.cluster_id(KEY) != wire.cluster_id(bytes(32))
    assert len(wire.cluster_id(KEY)) == 16 and KEY.hex() not in wire.cluster_id(KEY)
    assert wire.new_session(2000, 0) > wire.new_session(1999, 0xFFFF)


def test_replay_window() -> None:
    w = ReplayWindow(size=64)
    for pn in (5, 3, 70, 69, 7):
        assert w.fresh(pn)
        w.mark(pn)
        assert not w.fresh(pn)
    assert not w.fresh(6)  # more than 64 behind the newest (70)
    assert w.fresh(68)
    w.mark(10**18)  # a huge jump doesn't allocate a huge bitmap
    assert w.bits == 1 and not w.fresh(70)


def test_replay_guard_sessions() -> None:
    g = ReplayGuard(session_timeout=30.0)
    assert g.accept(1, "a", 100, 1, now=0.0)
    assert not g.accept(1, "a", 100, 1, now=0.0)
    assert g.accept(2, "a", 100, 1, now=0.0)  # channels have their own windows
    assert not g.fresh(1, "a", 100, 1) and g.fresh(1, "a", 100, 2)
    assert g.accept(1, "a", 200, 1, now=1.0)  # restarted: a newer session
    assert not g.accept(1, "a", 100, 2, now=2.0)  # the old session is a replay now
    assert g.accept(1, "a", 50, 1, now=40.0)  # silent for longer than the timeout: clock moved back
    assert g.accept(1, "b", 100, 1, now=40.0)  # other nodes are independent


def test_replay_guard_nodes_sharing_a_session() -> None:
    """Two nodes that drew the same session number keep separate windows, and the pre-check
    (before authentication) asks the window of the node a unit claims to come from."""
    g = ReplayGuard()
    for pn in range(1, 101):
        assert g.accept(1, "a", 7, pn, now=0.0)
    assert g.fresh(1, "b", 7, 1)  # b's first packet: a saw a pn 1, b never spoke
    for pn in range(1, 151):
        assert g.accept(1, "b", 7, pn, now=0.0)
    assert g.fresh(1, "a", 7, 101)  # a's next packet: b saw a pn 101, a did not
    assert not g.fresh(1, "a", 7, 100) and not g.fresh(1, "b", 7, 100)
    assert not g.accept(1, "b", 7, 100, now=0.0)


# ------------------------------------------------------------------------ TCP frames
def _decoder(key: bytes = KEY, **kw) -> tuple[StreamDecoder, dict]:
    c = new_counters()
    return StreamDecoder(Sealer(key, "rx", 1), ReplayGuard(), c, **kw), c


def _frames(n: int, size: int = 100) -> list[bytes]:
    s = Sealer(KEY, "tx", 42)
    return [bytes(seal_tcp_frame(s, i + 1, encode_bytes(Gossip(bytes([i % 256]) * size)))) for i in range(n)]


def _records(parts: tuple[bytes, ...], *, record: int = 1000, first_seq: int = 100,
             sealer: Sealer | None = None) -> bytes:
    """One message sealed in records (what a TCP connection sends for a large message)."""
    s = sealer or Sealer(KEY, "tx", 42)
    seqs = iter(range(first_seq, first_seq + 10_000))
    chunks = wire.seal_tcp_records(s, lambda: next(seqs), parts, record=record, buffer=bytearray)
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
        got += d.receive_data(b"".join(bytes(seal_tcp_frame(s, i + 1, encode_bytes(Gossip(bytes([i])))))
                                       for i in range(5)))
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
    got = d.receive_data(big[:])
    got = got or d.receive_data(b"")
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
    assert d.receive_data(frames[0]) == [] and c["wrong_cluster"] == 1 and d.failed == "wrong_cluster"
    d, c = _decoder(max_frame=1000)
    huge = TCP_HEADER.pack(2**31, wire.TCP_MAGIC, wire.WIRE_VERSION, Sealer(KEY, "x", 1).cluster_tag, 1, 1)
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
    short = TCP_HEADER.pack(TCP_HEADER.size - 4, wire.TCP_MAGIC, wire.WIRE_VERSION,
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
    assert len(_record_list(_MULTI)) == 5 and len(decode(f.data).payload) == 2000 and sum(c.values()) == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_message_decoder(blob: bytes) -> None:
    for data in (blob, bytes([3]) + blob, struct.pack("<BI", 3, len(blob)) + blob):
        try:
            decode(data, epoch=1)
        except Dropped as e:
            assert e.reason in wire.DROP_REASONS


def test_core_imports_stay_pure() -> None:
    import ringd.core.reliable
    import ringd.core.wire

    for mod in (ringd.core.wire, ringd.core.reliable):
        src = open(mod.__file__).read()
        for banned in ("import asyncio", "import socket", "import mlx", "import time",
                       "ringd.net", "ringd.compute"):
            assert banned not in src, (mod.__name__, banned)


def test_large_frames_decode_into_pooled_buffers_kept_while_referenced() -> None:
    s = Sealer(KEY, "tx", 42)
    pool = wire.BufferPool(min_size=1000)
    d = StreamDecoder(Sealer(KEY, "rx", 1), ReplayGuard(), new_counters(), pool=pool)
    frames = [bytes(seal_tcp_frame(s, i, encode_bytes(Gossip(bytes([i]) * 5000)))) for i in (1, 2, 3)]
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
    assert recs[0][6] == wire.TCP_MORE and recs[1][6] == recs[-2][6] == wire.TCP_MORE | wire.TCP_CONT
    assert recs[-1][6] == wire.TCP_CONT
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
        assert decode(got[0].data).payload == bytes([0]) * 30 and decode(got[2].data).payload == bytes([1]) * 30
        assert bytes(got[1].data) == b"".join(parts) == bytes(ref.data)  # same plaintext as one record
        assert got[1].sender == "tx" and got[1].session == 42
        msg = decode(got[1].data)
        assert msg == decode(b"".join(parts))


def test_records_through_the_buffered_protocol_api_into_a_pooled_buffer() -> None:
    pool = wire.BufferPool(min_size=1000)
    d = StreamDecoder(Sealer(KEY, "rx", 1), ReplayGuard(), new_counters(), pool=pool)
    parts = _big_message(300_000)
    stream = _records(parts, record=64 * 1024) + _records(parts, record=64 * 1024, first_seq=500)
    got = _feed_buffered(d, stream, 40_000)
    assert [bytes(f.data) for f in got] == [b"".join(parts)] * 2
    assert got[0].data.obj in pool._bufs and got[1].data.obj is not got[0].data.obj  # held: not reused
    assert len(d._buf) < 100_000  # the read buffer holds one record, not the message


def test_sealing_records_does_not_join_the_message() -> None:
    s = Sealer(KEY, "tx", 42)
    head, body = _big_message(4 << 20)
    bufs = [bytearray(300_000) for _ in range(2)]
    seqs = iter(range(1, 1000))
    chunks = []
    tracemalloc.start()
    for chunk in wire.seal_tcp_records(s, lambda: next(seqs), (head, memoryview(body)), record=256 << 10,
                                       buffer=lambda n: bufs[len(chunks) % 2]):
        chunks.append(len(chunk))
        del chunk
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(chunks) == 16 and peak < 100_000  # records sealed from slices into reused buffers


@pytest.mark.parametrize("encrypt", [True, False])
def test_records_small_messages_and_clear_mode(encrypt: bool) -> None:
    s = Sealer(KEY, "tx", 42, encrypt=encrypt)
    for parts in ((b"x" * 10,), (b"a" * 100, b"b" * 100), (b"",), (b"h" * 3000, b"b" * 5000, b"t" * 10)):
        stream = _records(parts, record=1000, sealer=s, first_seq=len(b"".join(parts)) * 100 + 1)
        d, c = _decoder()
        [f] = d.receive_data(stream)
        assert bytes(f.data) == b"".join(parts) and sum(c.values()) == 0
        assert (len(_record_list(stream)) == 1) == (len(b"".join(parts)) <= 1000)


def _record(seq: int, flags: int, plain: bytes, *, sealer: Sealer | None = None) -> bytes:
    return bytes(seal_tcp_frame(sealer or Sealer(KEY, "tx", 42), seq, plain, out=None, flags=flags))


def _total(n: int) -> bytes:
    return n.to_bytes(4, "little")


M, C = wire.TCP_MORE, wire.TCP_CONT


@pytest.mark.parametrize("name,stream,reason", [
    ("continuation without a first", lambda: _record(5, C | M, b"x" * 10) + _record(6, C, b"y"), "malformed"),
    ("last without a first", lambda: _record(5, C, b"x" * 10), "malformed"),
    ("total over max_frame", lambda: _record(5, M, _total(1 << 20) + b"x"), "oversize"),
    ("total held by the first record", lambda: _record(5, M, _total(3) + b"abc"), "malformed"),
    ("first record without a total", lambda: _record(5, M, b"ab"), "malformed"),
    ("new message before the last record",
     lambda: _record(5, M, _total(20) + b"x" * 5) + _record(6, 0, b"y" * 15), "malformed"),
    ("more than announced", lambda: _record(5, M, _total(20) + b"x" * 5) + _record(6, C, b"y" * 16), "malformed"),
    ("fewer than announced", lambda: _record(5, M, _total(20) + b"x" * 5) + _record(6, C, b"y" * 14), "malformed"),
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
        assert d.receive_data(b"".join(bad)) == [] and d.failed in ("bad_mac", "malformed"), (i, flip)
    # records swapped (each authentic): the sequence numbers give it away
    d, c = _decoder()
    assert d.receive_data(b"".join([recs[0], recs[2], recs[1], *recs[3:]])) == [] and d.failed == "malformed"
    # a record tampered with mid-message
    bad = bytearray(recs[2])
    bad[-1] ^= 1
    d, c = _decoder()
    assert d.receive_data(b"".join([*recs[:2], bytes(bad), *recs[3:]])) == [] and d.failed == "bad_mac"
    # the whole message again: a replay
    d, c = _decoder()
    assert len(d.receive_data(multi)) == 1
    assert d.receive_data(multi) == [] and d.failed == "replay" and c["replay"] == 1
    # truncated: the last record is cut short, or missing and the stream moves on
    d, c = _decoder()
    assert d.receive_data(multi[:-10]) == [] and d.failed is None and sum(c.values()) == 0  # waits for more
    d, c = _decoder()
    assert d.receive_data(b"".join(recs[:-1]) + _frames(1)[0]) == [] and d.failed == "malformed"
    # a last record alone can't pass for a message (its flags are part of its nonce)
    last = bytearray(recs[-1])
    last[6] = 0
    d, c = _decoder()
    assert d.receive_data(bytes(last)) == [] and c["bad_mac"] == 1 and d.failed is None


def test_sealing_a_message_of_4_gib_raises_when_asked_not_when_consumed() -> None:
    s = Sealer(KEY, "a", wire.new_session(1, 1))
    huge = memoryview(mmap.mmap(-1, 1 << 30))  # 4 x 1 GiB of untouched pages: no memory
    with pytest.raises(LocalProtocolError, match="4 GiB"):
        wire.seal_tcp_records(s, lambda: 1, (huge,) * 4, record=512 << 10, buffer=bytearray)
