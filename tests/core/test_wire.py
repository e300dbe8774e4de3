"""Wire format: message round trips, rejections and the field rules."""

from __future__ import annotations

import math
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringd.core import wire
from ringd.core.requests import SamplingParams
from ringd.core.wire import (DTYPE_SIZES, MAX_DIM, MAX_FETCH, MAX_KEY, MAX_PROBE, MAX_RANK,
                             Activation,
                             Cancel, Dropped, Error, FetchReply, FetchRequest, Gossip, Handshake,
                             LinkEcho, LinkProbe, MsgType, Progress, Tensor, Token, decode,
                             encode, encode_bytes)
from ringd.errors import LocalProtocolError, RemoteProtocolError, RequestError

# ------------------------------------------------------------------------ strategies
ids = st.text(min_size=1, max_size=40)
printable = st.text(min_size=1, max_size=40).filter(str.isprintable)
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
                      top_k=st.integers(0, 1000), seed=st.none() | u63,
                      max_tokens=st.integers(1, 1 << 20), want_logits=st.booleans())
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
    st.builds(Progress, ids, u63, u63),
    st.builds(Error, ids, st.text(min_size=1, max_size=64), st.text(max_size=500)),
    st.builds(FetchRequest, printable, printable, u63, st.integers(1, MAX_FETCH)),
    st.builds(FetchReply, printable, printable, u63,
              st.sampled_from(["not_held", "bad_request", "busy"])),
    st.builds(FetchReply, printable, printable, u63, st.just("ok"),
              st.binary(min_size=1, max_size=5000)),
    st.builds(LinkProbe, u63, st.binary(max_size=5000)),
    st.builds(LinkEcho, u63, st.integers(0, MAX_PROBE)),
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
    assert isinstance(got.tensor.data, memoryview)
    assert got.tensor.data.obj is data  # a view, no copy
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
    good = encode_bytes(Activation("r", 1, 2, 3, 0, 4, "n", SamplingParams(), True,
                                   Tensor("float16", (2,), bytes(4))))
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
    def sampled(sampling: list) -> bytes:
        return _raw(3, meta[:7] + [sampling, True, "int32", [1]], bytes(4))

    assert _reason(sampled([99.0, 1.0, 0, None, 5, False])) == "malformed"
    assert _reason(sampled([0.0, 1.0, 0, None, 5])) == "malformed"
    assert _reason(sampled([0.0, 1.0, 0, None, 5, 1])) == "malformed"
    assert decode(_raw(3, meta + ["int32", [1]], bytes(4))).tensor.shape == (1,)
    # Token logits: float32 [vocab] as the body, sized by the shape before anything is kept
    tok = ["r", 1, 2, 3, 0, 4, None]
    got = decode(_raw(4, tok + ["float32", [2]], bytes(8)))
    assert got.logits == Tensor("float32", (2,), bytes(8))
    assert _reason(_raw(4, tok + ["float32", [3]], bytes(8))) == "malformed"  # size mismatch
    assert _reason(_raw(4, tok + ["int32", [2]], bytes(8))) == "malformed"  # dtype
    assert _reason(_raw(4, tok + ["float32", [1, 2]], bytes(8))) == "malformed"  # rank
    assert _reason(_raw(4, tok + ["float32"], bytes(4))) == "malformed"  # 8 fields
    assert _reason(_raw(4, tok + ["float32", [MAX_DIM + 1]], bytes(4))) == "malformed"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_message_decoder(blob: bytes) -> None:
    for data in (blob, bytes([3]) + blob, struct.pack("<BI", 3, len(blob)) + blob):
        try:
            decode(data)
        except Dropped as e:
            assert e.reason in wire.DROP_REASONS


# ------------------------------------------------------------------------ field rules
def test_rules_accept_their_range_and_say_what_they_expect() -> None:
    r = wire.integer(1, 9)
    assert [r.test(v) for v in (1, 9, 0, 10, True, 1.0, "1")] == [True, True] + [False] * 5
    assert r.expected == "an integer in 1..9"
    n = wire.number(0.0, 1.0)
    assert [n.test(v) for v in (0, 0.5, 1, 1.5, False, None)] == [True] * 3 + [False] * 3
    t = wire.text(3, min_len=1)
    # plain text may hold control characters; printable text may not
    assert [t.test(v) for v in ("a", "abc", "", "abcd", b"a", "\n")] == [True, True, False, False,
                                                                         False, True]
    p = wire.text(3, printable=True)
    assert [p.test(v) for v in ("", "abc", "\n", "abcd")] == [True, True, False, False]
    assert p.expected == "printable text of 0..3 characters"
    o = wire.optional(r)
    assert [o.test(v) for v in (None, 5, 0)] == [True, True, False]
    assert o.expected == "None or an integer in 1..9"
    assert [wire.exactly(bool).test(v) for v in (True, 1, None)] == [True, False, False]
    ls = wire.list_of(r, 2)
    verdicts = [ls.test(v) for v in ([], [1, 9], [1, 2, 3], [0], (1,), None)]
    assert verdicts == [True, True, False, False, False, False]
    assert ls.expected == "a list of at most 2 items, each an integer in 1..9"


def test_check_names_the_bad_field_of_a_built_message() -> None:
    with pytest.raises(LocalProtocolError, match=r"Cancel\.request_id: bad value ''"):
        Cancel("", "why")
    with pytest.raises(LocalProtocolError, match=r"Handshake\.port: bad value 70000"):
        Handshake("n", "c", 1, "v", 70000)


def test_field_reader_raises_the_decoders_own_error_with_what_was_expected() -> None:
    read = wire.FieldReader(lambda what: RemoteProtocolError(f"payload: {what}"))
    assert read.integer(5, "x", 0, 9) == 5 and read.text("ok", "y", 4) == "ok"
    assert read.opt_text(None, "z", 4) is None and read.items([1, 2], "l", 2) == [1, 2]
    cases = [
        (lambda: read.integer(10, "seq", 0, 9), "payload: seq: expected an integer in 0..9"),
        (lambda: read.integer(True, "seq"), f"seq: expected an integer in 0..{wire.U63}"),
        (lambda: read.text("a\x00", "name", 8), "name: expected printable text of 0..8 characters"),
        (lambda: read.opt_text("", "hash", 8), "hash: expected printable text of 1..8 characters"),
        (lambda: read.items((1,), "l"), "l: expected a list"),
        (lambda: read.items([1], "l", 2), "l: expected 2 fields, got 1"),
        (lambda: read.items([1, 2, 3], "l", max_len=2), "l: 3 items, at most 2 allowed"),
        (lambda: read.take(3, wire.exactly(str), "s"), "s: expected a str"),
    ]
    for call, message in cases:
        with pytest.raises(RemoteProtocolError) as e:
            call()
        assert message in str(e.value)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(-3, 12), st.booleans(), st.none(), st.floats(0, 10),
                 st.text(max_size=6), st.binary(max_size=3)), st.integers(0, 5), st.integers(0, 5))
def test_field_reader_fast_paths_agree_with_the_rules(value, lo, span) -> None:
    """FieldReader.integer/text test inline what their rules test: they must agree."""
    read = wire.FieldReader(RemoteProtocolError)

    def accepts(call) -> bool:
        try:
            call()
        except RemoteProtocolError:
            return False
        return True

    assert accepts(lambda: read.integer(value, "v", lo, lo + span)) == wire.integer(
        lo, lo + span).test(value)
    assert accepts(lambda: read.text(value, "v", lo + span, lo)) == wire.text(
        lo + span, min_len=lo, printable=True).test(value)


# ------------------------------------------------------------------------ weight transfer
def test_fetch_reply_data_is_the_body_and_never_copied() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    msg = FetchReply("ab" * 16, "model.layers.3.mlp.up_proj.weight", 2 << 20, "ok", data)
    head, body = encode(msg)
    assert body is data  # sending doesn't copy
    assert len(head) < 100  # the metadata is small; the bytes are not msgpack-encoded
    whole = encode_bytes(msg)
    got = decode(whole)
    assert got == msg and isinstance(got.data, memoryview) and got.data.obj is whole
    req = FetchRequest("ab" * 16, "file:config.json", 0, MAX_FETCH)
    assert decode(encode_bytes(req)) == req


def test_fetch_messages_refuse_bad_fields_when_built() -> None:
    mid = "ab" * 16
    bad_requests = [("", "k", 0, 1), (mid, "", 0, 1), (mid, "k" * (MAX_KEY + 1), 0, 1),
                    (mid, "k", -1, 1), (mid, "k", 0, 0), (mid, "k", 0, MAX_FETCH + 1),
                    (mid, "k\n", 0, 1), (mid, "k", True, 1), (mid, "k", 0, 1.0),
                    ("x" * 65, "k", 0, 1)]
    for args in bad_requests:
        with pytest.raises(LocalProtocolError):
            FetchRequest(*args)
    bad_replies = [(mid, "k", 0, "ok", b""), (mid, "k", 0, "ok", bytes(MAX_FETCH + 1)),
                   (mid, "k", 0, "busy", b"x"), (mid, "k", 0, "maybe", b""),
                   (mid, "k", 0, "ok", "text"), (mid, "k", -5, "not_held", b"")]
    for args in bad_replies:
        with pytest.raises(LocalProtocolError):
            FetchReply(*args)


def test_hostile_fetch_messages_are_dropped_as_malformed() -> None:
    mid = "ab" * 16
    req, rep = int(MsgType.FETCH_REQUEST), int(MsgType.FETCH_REPLY)
    assert decode(_raw(req, [mid, "../../etc/passwd", 0, 1])).key == "../../etc/passwd"  # a
    # key is only ever looked up in a manifest (the holder answers bad_request), never opened
    assert _reason(_raw(req, [mid, "k", 0, 1], b"x")) == "malformed"  # a body on a request
    assert _reason(_raw(req, [mid, "k", 0, MAX_FETCH + 1])) == "malformed"  # huge length
    assert _reason(_raw(req, [mid, "k", 0, 0])) == "malformed"
    assert _reason(_raw(req, [mid, "k", -1, 1])) == "malformed"
    assert _reason(_raw(req, [mid, "k", 1 << 63, 1])) == "malformed"  # msgpack uint64
    assert _reason(_raw(req, [mid, "k" * (MAX_KEY + 1), 0, 1])) == "malformed"
    assert _reason(_raw(req, [mid, "k", 0])) == "malformed"  # a field short
    assert _reason(_raw(req, [mid, b"k", 0, 1])) == "malformed"  # bytes, not text
    assert _reason(_raw(rep, [mid, "k", 0, "ok"])) == "malformed"  # ok without data
    assert _reason(_raw(rep, [mid, "k", 0, "busy"], b"xx")) == "malformed"  # data with busy
    assert _reason(_raw(rep, [mid, "k", 0, "sure"], b"xx")) == "malformed"
    assert _reason(_raw(rep, [mid, "k", 0, "ok"], bytes(MAX_FETCH + 1))) == "malformed"
    assert _reason(_raw(rep, [mid, "k", 0, "ok", 5], b"x")) == "malformed"  # extra field
    got = decode(_raw(rep, [mid, "k", 7, "ok"], b"xyz"))
    assert (got.offset, got.status, bytes(got.data)) == (7, "ok", b"xyz")


def test_hostile_link_probes_are_dropped_as_malformed() -> None:
    probe, echo = int(MsgType.LINK_PROBE), int(MsgType.LINK_ECHO)
    got = decode(_raw(probe, [7], b"filler"))
    assert isinstance(got, LinkProbe) and (got.nonce, bytes(got.data)) == (7, b"filler")
    assert _reason(_raw(probe, [7], bytes(MAX_PROBE + 1))) == "malformed"  # too much filler
    assert _reason(_raw(probe, [-1])) == "malformed"
    assert _reason(_raw(probe, [1, 2])) == "malformed"
    assert _reason(_raw(echo, [7, MAX_PROBE + 1])) == "malformed"  # claims more than a probe
    assert _reason(_raw(echo, [7, 1], b"x")) == "malformed"  # an echo carries nothing back
    assert decode(_raw(echo, [7, 3])) == LinkEcho(7, 3)
    with pytest.raises(LocalProtocolError):
        LinkProbe(1, bytes(MAX_PROBE + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_fetch_decoders(blob: bytes) -> None:
    for mtype in (MsgType.FETCH_REQUEST, MsgType.FETCH_REPLY, MsgType.LINK_PROBE,
                  MsgType.LINK_ECHO):
        for data in (bytes([mtype]) + blob, struct.pack("<BI", mtype, len(blob)) + blob):
            try:
                decode(data)
            except Dropped as e:
                assert e.reason in wire.DROP_REASONS
