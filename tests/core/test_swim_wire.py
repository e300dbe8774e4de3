"""SWIM's wire: messages round-trip, and junk only ever raises RemoteProtocolError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringd.core.swim_wire import (
    MAX_META,
    Ack,
    Broadcast,
    Member,
    MemberState,
    Ping,
    PingReq,
    Sync,
    Update,
    decode_payload,
    to_payload,
)
from ringd.errors import RemoteProtocolError

ids = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=16)
metas = st.binary(max_size=80)


def members(states=st.sampled_from(MemberState)):
    return st.builds(
        Member,
        node_id=ids,
        name=ids,
        addr=st.tuples(st.just("192.168.1.5"), st.integers(1, 65535)),
        incarnation=st.integers(0, 2**40),
        state=states,
        meta=metas,
        protocol_version=st.integers(0, 5),
    )


sources = members(st.sampled_from([MemberState.ALIVE, MemberState.LEFT]))
updates = st.lists(st.builds(Update, member=members(), origin=ids), max_size=4).map(tuple)
seqs = st.integers(0, 2**32 - 1)
messages = st.one_of(
    st.builds(Ping, seq=seqs, source=sources, target_id=st.none() | ids, updates=updates),
    st.builds(Ack, seq=seqs, source=sources, updates=updates),
    st.builds(
        PingReq,
        seq=seqs,
        source=sources,
        target_id=ids,
        target_addr=st.tuples(st.just("10.1.1.1"), st.integers(1, 65535)),
        updates=updates,
    ),
    st.builds(Broadcast, source=sources, updates=updates),
    st.builds(
        Sync,
        source=sources,
        members=st.lists(members(), max_size=4).map(tuple),
        reply=st.booleans(),
    ),
)


@settings(max_examples=150, deadline=None)
@given(messages)
def test_messages_round_trip(msg) -> None:
    assert decode_payload(to_payload(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_remote_protocol_error(data: bytes) -> None:
    try:
        decode_payload(data)
    except RemoteProtocolError:
        pass


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=300)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5), st.lists(plain, max_size=7))
def test_well_formed_msgpack_of_the_wrong_shape_is_rejected(tag: int, body: list) -> None:
    try:
        decode_payload(msgpack.packb([tag, *body], use_bin_type=True))
    except RemoteProtocolError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.data())
def test_mutated_valid_payloads_only_raise_remote_protocol_error(msg, data) -> None:
    raw = bytearray(to_payload(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    try:
        decoded = decode_payload(bytes(raw[:cut]))
    except RemoteProtocolError:
        return
    assert decode_payload(to_payload(decoded)) == decoded  # whatever passes is a valid message


def test_specific_junk_is_rejected_with_a_reason() -> None:
    good = Member("a", "a", ("10.0.0.1", 1), 0, MemberState.ALIVE, b"meta")
    ping = msgpack.unpackb(to_payload(Ping(1, good, None)))
    src = ping[2]
    cases = {
        b"": "not valid msgpack",
        msgpack.packb({"a": 1}): "not valid msgpack",
        msgpack.packb([9]): "unknown message type",
        msgpack.packb([True, *ping[1:]]): "unknown message type",
        msgpack.packb([1, -1, *ping[2:]]): "ping.seq",
        msgpack.packb([1, 1, ping[2], "x" * 65, []]): "ping.target_id",
        msgpack.packb([*ping[:4], [[ping[2], "a"]] * 65]): "at most 64",
        msgpack.packb([1, 1, [*src[:5], 1, *src[6:]], None, []]): "cannot describe itself as",
        msgpack.packb([1, 1, [*src[:3], 0, *src[4:]], None, []]): "source.addr.port",
        msgpack.packb([1, 1, src[:7], None, []]): "source: expected 8 fields",
        msgpack.packb([1, 1, [*src[:6], -1, src[7]], None, []]): "source.protocol_version",
        msgpack.packb([1, 1, [*src[:7], "meta"], None, []]): "source.meta: expected bytes",
        msgpack.packb(
            [1, 1, [*src[:7], b"m" * (MAX_META + 1)], None, []], use_bin_type=True
        ): f"source.meta: expected bytes, at most {MAX_META}",
        msgpack.packb([1, 1, ping[2], None, [], "extra"]): "ping: expected 5",
        b"\x91" * 5000: "not valid msgpack",
    }
    for payload, reason in cases.items():
        with pytest.raises(RemoteProtocolError, match=reason):
            decode_payload(payload)
