"""The ring's metadata schema: encoding, bounds, the view and the active-model rule."""

from __future__ import annotations

import dataclasses
import logging

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringd.core.ringmeta import (
    Holding,
    MAX_ENCODED,
    MAX_FINGERPRINT,
    MAX_HASH,
    MAX_HOLDINGS,
    MAX_LAYER,
    MAX_MODEL_ID,
    MAX_MODEL_NAME,
    MAX_RANGES,
    MAX_REFUSAL,
    MAX_VERSION,
    MetaDecoder,
    NodeMeta,
    NodePhase,
    active_model,
    adopt_active_model,
    make_view,
    resolve_model,
    set_active_model,
)
from ringd.core.swim_config import MembershipConfig
from ringd.core.swim_wire import Member, MemberState
from ringd.core.paths import KINDS, MAX_ADVERTISED, MAX_IFNAME, Advertised
from ringd.core.timing import WIRE_LEN, StageTimings
from ringd.errors import LocalProtocolError, RemoteProtocolError

printable = st.characters(min_codepoint=32, max_codepoint=0x2FFF).filter(str.isprintable)
names = st.text(printable, min_size=1, max_size=MAX_MODEL_NAME)
hashes = st.none() | st.text("0123456789abcdef", min_size=1, max_size=MAX_HASH)
ranges = st.lists(st.tuples(st.integers(0, MAX_LAYER - 1), st.integers(1, 40)).map(
    lambda t: (t[0], min(MAX_LAYER, t[0] + t[1]))), max_size=MAX_RANGES).map(tuple)
holdings = st.builds(Holding, names, st.text("0123456789abcdef", min_size=1,
                                             max_size=MAX_MODEL_ID), ranges,
                     st.integers(0, 2**63 - 1))
metas = st.builds(
    NodeMeta,
    usable_memory=st.integers(0, 2**63 - 1),
    total_memory=st.integers(0, 2**63 - 1),
    holdings=st.lists(holdings, max_size=MAX_HOLDINGS).map(tuple),
    phase=st.sampled_from(NodePhase),
    fetch=st.none() | st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1)),
    software_version=st.text(printable, max_size=MAX_VERSION),
    http_port=st.integers(0, 65535),
    view_hash=hashes,
    epoch=st.integers(0, 2**63 - 1),
    plan_hash=hashes,
    ready_plan_hash=hashes,
    fingerprint=st.none() | st.text(printable, min_size=1, max_size=MAX_FINGERPRINT),
    model=st.just("") | names,
    model_version=st.integers(0, 2**63 - 1),
    memory_bandwidth=st.integers(0, 2**63 - 1),
    refusal=st.none() | st.text(printable, min_size=1, max_size=MAX_REFUSAL),
    busy=st.booleans(),
    standby=st.booleans(),
    addresses=st.lists(st.builds(Advertised, st.ip_addresses(v=4).map(str),
                                 st.text(printable, min_size=1, max_size=MAX_IFNAME),
                                 st.sampled_from(KINDS)), max_size=MAX_ADVERTISED).map(tuple),
    timings=st.none() | st.lists(st.none() | st.integers(0, 2**63 - 1), min_size=WIRE_LEN,
                                 max_size=WIRE_LEN).map(StageTimings.load),
)
SERVING = NodeMeta(
    usable_memory=12 * 2**30,
    total_memory=32 * 2**30,
    holdings=(Holding("SmolLM2-135M-Instruct", "0123456789abcdef" * 2, ((0, 30),), 71_000),),
    phase=NodePhase.SERVING,
    software_version="0.1.0",
    http_port=7412,
    view_hash="a" * 32,
    epoch=12,
    plan_hash="b" * 32,
    ready_plan_hash="b" * 32,
    fingerprint="0-15:" + "c" * 32,
    model="SmolLM2-135M-Instruct",
    memory_bandwidth=40 * 10**9,
)


# ------------------------------------------------------------------------------ encoding
@settings(max_examples=300, deadline=None)
@given(metas)
def test_round_trip(meta: NodeMeta) -> None:
    data = meta.encode()
    assert NodeMeta.decode(data) == meta
    assert meta.encode() == data  # deterministic: equal metadata, equal bytes


def test_a_map_with_named_keys_that_leaves_defaults_out() -> None:
    assert msgpack.unpackb(NodeMeta().encode()) == {}
    m = NodeMeta(usable_memory=5, phase=NodePhase.READY, view_hash="ab",
                 holdings=(Holding("m", "ab12", ((0, 4), (6, 8)), 900),), fetch=(1, 2))
    assert msgpack.unpackb(m.encode()) == {"mem": 5, "hold": [["m", "ab12", [[0, 4], [6, 8]], 900]],
                                           "phase": "ready", "view": "ab", "fetch": [1, 2]}


def test_unknown_keys_are_ignored_and_missing_keys_default() -> None:
    newer = msgpack.unpackb(SERVING.encode())
    newer |= {"weights": {"layers": [[0, 15]], "blob": b"\x00" * 40}, "zz": None, "n": 1.5}
    assert NodeMeta.decode(msgpack.packb(newer, use_bin_type=True)) == SERVING
    assert NodeMeta.decode(msgpack.packb({"mem": 7, "epoch": 3})) == NodeMeta(
        usable_memory=7, epoch=3
    )
    # an explicit nil for an optional field is its default
    assert NodeMeta.decode(msgpack.packb({"plan": None, "fp": None})) == NodeMeta()


def test_serving_metadata_is_small_and_the_worst_case_fits_the_membership_bound() -> None:
    assert len(SERVING.encode()) < 400  # rides in every probe
    worst = NodeMeta(
        usable_memory=2**63 - 1,
        total_memory=2**63 - 1,
        holdings=(Holding("m" * MAX_MODEL_NAME, "f" * MAX_MODEL_ID,
                          tuple((MAX_LAYER - 2 * i - 2, MAX_LAYER - 2 * i - 1)
                                for i in range(MAX_RANGES)), 2**63 - 1),) * MAX_HOLDINGS,
        phase=NodePhase.FETCHING,
        fetch=(2**63 - 1, 2**63 - 1),
        software_version="v" * MAX_VERSION,
        http_port=65535,
        view_hash="a" * MAX_HASH,
        epoch=2**63 - 1,
        plan_hash="b" * MAX_HASH,
        ready_plan_hash="c" * MAX_HASH,
        fingerprint="f" * MAX_FINGERPRINT,
        model="m" * MAX_MODEL_NAME,
        model_version=2**63 - 1,
        memory_bandwidth=2**63 - 1,
        refusal="\U0001f600" * MAX_REFUSAL,  # 4 bytes a character
        busy=True,
        standby=True,
        timings=StageTimings.load([2**63 - 1] * WIRE_LEN),
        addresses=(Advertised("fe80::1234:5678:9abc:def0:1234", "i" * MAX_IFNAME,
                              "thunderbolt"),) * MAX_ADVERTISED,
    )
    assert len(worst.encode()) <= MembershipConfig().max_meta_bytes


# Each key: a value at the bound (accepted) and values past it or of the wrong type.
BOUNDS = {
    "busy": (True, [1, "yes", None]),
    "sb": (True, [0, "no", None]),
    "mem": (2**63 - 1, [-1, 2**63, True, 1.0, "1", None]),
    "total": (0, [-1, 2**64 - 1, False]),
    "hold": (
        [["m" * MAX_MODEL_NAME, "f" * MAX_MODEL_ID, [[0, 1]] * MAX_RANGES, 2**63 - 1]]
        * MAX_HOLDINGS,
        [[["m", "f", [], 1]] * (MAX_HOLDINGS + 1), [["m" * (MAX_MODEL_NAME + 1), "f", [], 1]],
         [["m", "f" * (MAX_MODEL_ID + 1), [], 1]], [["m", "f", [[0, 1]] * (MAX_RANGES + 1), 1]],
         [["m", "f", [[3, 3]], 1]], [["m", "f", [[4, 2]], 1]], [["m", "f", [[0, 1 << 21]], 1]],
         [["m", "f", [], -1]], [["", "f", [], 1]], [["m", "f", []]], ["m"], "m", None],
    ),
    "fetch": ([2**63 - 1, 0], [[1], [1, 2, 3], [-1, 0], ["1", 2], "x"]),
    "phase": ("leaving", ["asleep", 1, None, "SERVING"]),
    "sw": ("v" * MAX_VERSION, ["v" * (MAX_VERSION + 1), "1\x00", 1, None]),
    "http": (65535, [65536, -1, "80"]),
    "view": ("h" * MAX_HASH, ["h" * (MAX_HASH + 1), "", 1, b"h"]),
    "epoch": (2**63 - 1, [2**63, -1, 1.5]),
    "plan": ("h" * MAX_HASH, ["h" * (MAX_HASH + 1), "", "a\tb"]),
    "ready": ("h" * MAX_HASH, ["h" * (MAX_HASH + 1), ""]),
    "fp": ("f" * MAX_FINGERPRINT, ["f" * (MAX_FINGERPRINT + 1), "", 7]),
    "model": ("m" * MAX_MODEL_NAME, ["m" * (MAX_MODEL_NAME + 1), None, ["m"]]),
    "model_v": (2**63 - 1, [2**63, -1, None]),
    "bw": (2**63 - 1, [2**63, -1, 2.5e10]),
    "refusal": ("r" * MAX_REFUSAL, ["r" * (MAX_REFUSAL + 1), "", "a\nb", 0]),
    "tm": ([2**63 - 1] * WIRE_LEN, [[1, 2, 3], [-1] + [None] * (WIRE_LEN - 1),
                                    [2**63] + [None] * (WIRE_LEN - 1),
                                    [True] + [None] * (WIRE_LEN - 1), [1.5] * WIRE_LEN, "x"]),
    "addrs": ([["10.0.0.1", "e" * MAX_IFNAME, "ethernet"]] * MAX_ADVERTISED,
              [[["10.0.0.1", "en0", "ethernet"]] * (MAX_ADVERTISED + 1),
               [["10.0.0.300", "en0", "ethernet"]], [["10.0.0.1", "", "ethernet"]],
               [["10.0.0.1", "e" * (MAX_IFNAME + 1), "ethernet"]],
               [["10.0.0.1", "en0", "carrier pigeon"]], [["10.0.0.1", "en0"]],
               [["10.0.0.1", "en\n0", "wifi"]], "10.0.0.1", None]),
}
FIELD_OF = {
    "mem": "usable_memory", "total": "total_memory", "hold": "holdings", "phase": "phase",
    "fetch": "fetch",
    "sw": "software_version", "http": "http_port", "view": "view_hash", "epoch": "epoch",
    "plan": "plan_hash", "ready": "ready_plan_hash", "fp": "fingerprint", "model": "model",
    "model_v": "model_version", "bw": "memory_bandwidth", "refusal": "refusal",
    "busy": "busy", "sb": "standby", "tm": "timings", "addrs": "addresses",
}


def test_every_field_has_its_bounds_tested() -> None:
    assert set(FIELD_OF.values()) == {f.name for f in dataclasses.fields(NodeMeta)}
    assert set(BOUNDS) == set(FIELD_OF)


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_each_bound_is_enforced_both_ways(key: str) -> None:
    ok, bad_values = BOUNDS[key]
    got = NodeMeta.decode(msgpack.packb({key: ok}, use_bin_type=True))
    assert msgpack.unpackb(got.encode()).get(key, ok) == ok  # accepted at the bound
    for bad in bad_values:
        with pytest.raises(RemoteProtocolError, match=f"ring metadata: {key}: bad value"):
            NodeMeta.decode(msgpack.packb({key: bad}, use_bin_type=True))
        if bad is None:
            continue  # None is not a value NodeMeta can hold for a non-optional field
        attr = FIELD_OF[key]
        value = bad
        if value == getattr(NodeMeta(), attr):
            continue  # a default is left out, not checked
        with pytest.raises(LocalProtocolError, match=f"NodeMeta.{attr}: bad value"):
            dataclasses.replace(NodeMeta(), **{attr: value}).encode()


def test_specific_garbage_is_a_remote_protocol_error() -> None:
    cases = {
        b"": "not valid msgpack",
        b"\xc1": "not valid msgpack",
        b"\x91" * 5000: "not valid msgpack",
        msgpack.packb({"mem": 1}) + b"\x00": "not valid msgpack",  # trailing bytes
        msgpack.packb({1: 2}): "not valid msgpack",  # map keys must be text
        msgpack.packb([1, 2]): "expected a map",
        msgpack.packb("mem"): "expected a map",
        msgpack.packb({f"k{i}": i for i in range(65)}): "not valid msgpack",  # too many keys
        b"\x80" + b"\x00" * MAX_ENCODED: f"at most {MAX_ENCODED}",
    }
    for data, reason in cases.items():
        with pytest.raises(RemoteProtocolError, match=reason):
            NodeMeta.decode(data)
    with pytest.raises(RemoteProtocolError, match="expected bytes"):
        NodeMeta.decode("mem")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_remote_protocol_error(data: bytes) -> None:
    try:
        NodeMeta.decode(data)
    except RemoteProtocolError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metas, st.data())
def test_mutated_metadata_only_raises_remote_protocol_error(meta: NodeMeta, data) -> None:
    raw = bytearray(meta.encode() or b"\x80")
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        decoded = NodeMeta.decode(bytes(raw))
    except RemoteProtocolError:
        return
    assert NodeMeta.decode(decoded.encode()) == decoded  # whatever passes is valid metadata


# ------------------------------------------------------------------------ reading members
def member(node_id: str, meta: bytes, port: int = 1) -> Member:
    return Member(node_id, f"name-{node_id}", ("10.0.0.1", port), 0, MemberState.ALIVE, meta)


def test_the_decoder_leaves_out_unreadable_metadata_and_says_so_once(caplog) -> None:
    d = MetaDecoder()
    good = NodeMeta(usable_memory=5)
    members = [member("a", good.encode()), member("b", b"\xc1"), member("c", b"")]
    with caplog.at_level(logging.WARNING, logger="ringd.core.ringmeta"):
        for _ in range(3):
            assert d.decode(members) == {"a": good}
    assert d.unreadable == ["b", "c"] and d.rejected == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "node name-b (b)" in lines[0] and "not valid msgpack" in lines[0]
    # new bad bytes from b: said again; c fixed and b gone: nothing left unreadable
    d.decode([member("b", msgpack.packb([1]))])
    assert d.rejected == 3 and "expected a map" in caplog.records[-1].getMessage()
    assert d.decode([member("a", good.encode()), member("c", NodeMeta().encode())]) == {
        "a": good,
        "c": NodeMeta(),
    }
    assert d.unreadable == []


# --------------------------------------------------------------------------------- view
def test_view_hash_is_canonical_and_covers_what_the_plan_needs() -> None:
    a, b, c = member("a", b""), member("b", b""), member("c", b"")
    metas = {i: NodeMeta(usable_memory=u, model="m") for i, u in (("a", 5), ("b", 6), ("c", 7))}

    def h(ms, **changes) -> str:
        return make_view(ms, {**metas, **changes}).hash

    assert h([a, b, c]) == h([c, a, b])
    assert make_view([c, a, b], metas).node_ids == ("a", "b", "c")
    assert h([a, b]) != h([a, b, c])
    assert h([a, b]) != h([a, b], b=NodeMeta(usable_memory=7, model="m"))
    assert h([a, b]) != h([a, member("b", b"", port=2)])
    assert h([a, b]) != h([a, b], b=NodeMeta(usable_memory=6, model="n", model_version=1))
    # what the plan does not depend on stays out of the hash
    assert h([a, b]) == h([a, b], b=NodeMeta(usable_memory=6, model="m", epoch=9,
                                              phase=NodePhase.SERVING, view_hash="ff"))
    assert h([a, b]) == h([a, dataclasses.replace(b, incarnation=4, meta=b"other bytes")])
    view = make_view([a, b], metas)
    assert view.model == "m" and [m.usable_memory for m in view.members] == [5, 6]
    assert view.members[0].name == "name-a" and view.short() == view.hash[:8]


def test_a_member_without_metadata_is_not_in_the_view() -> None:
    a, b = member("a", b""), member("b", b"")
    view = make_view([a, b], {"a": NodeMeta(usable_memory=5, model="m")})
    assert view.node_ids == ("a",) and view.model == "m"
    assert view == make_view([a], {"a": NodeMeta(usable_memory=5, model="m")})
    assert make_view([], {}).node_ids == () and make_view([], {}).model == ""


# ------------------------------------------------------------------------- active model
def test_the_last_writer_wins_by_version_then_node_id() -> None:
    assert active_model({}) == ("", 0)
    metas = {"a": NodeMeta(model="x"), "c": NodeMeta(model="z"), "b": NodeMeta(model="y")}
    assert active_model(metas) == ("z", 0)  # a tie on version: the highest node id
    metas["a"] = NodeMeta(model="x", model_version=3)
    metas["b"] = NodeMeta(model="y", model_version=2)
    assert active_model(metas) == ("x", 3)  # a newer version wins, whatever its node id
    metas["c"] = NodeMeta(model="w", model_version=3)
    assert active_model(metas) == ("w", 3)


def test_adopt_and_set_the_active_model() -> None:
    own = NodeMeta(model="mine", usable_memory=4)
    peers = {"b": NodeMeta(model="theirs", model_version=2), "c": NodeMeta(model="old")}
    adopted = adopt_active_model("a", own, peers)
    assert adopted == dataclasses.replace(own, model="theirs", model_version=2)
    assert adopt_active_model("a", adopted, peers) is adopted  # nothing newer: unchanged
    assert adopt_active_model("z", own, {"b": NodeMeta(model="b")}) is own  # z wins the tie
    claimed = set_active_model(adopted, peers, "next")
    assert (claimed.model, claimed.model_version) == ("next", 3)
    assert active_model({**peers, "a": claimed}) == ("next", 3)
    alone = set_active_model(NodeMeta(model_version=7), {}, "solo")
    assert (alone.model, alone.model_version) == ("solo", 8)


# ------------------------------------------------------------------------- which bytes
def test_the_ring_serves_the_model_id_its_holders_agree_on() -> None:
    a, b, c = member("a", b""), member("b", b""), member("c", b"")
    whole = Holding("m", "1" * 32, ((0, 30),), 900)
    part = Holding("m", "1" * 32, ((10, 20),), 900)
    metas = {"a": NodeMeta(usable_memory=5, model="m", holdings=(whole,)),
             "b": NodeMeta(usable_memory=5, model="m", holdings=(part,)),
             "c": NodeMeta(usable_memory=5, model="m")}  # holds nothing yet: fetches
    view = make_view([a, b, c], metas)
    assert (view.model_id, view.model_problem) == ("1" * 32, None)
    # another model's bytes under the same name on c: no id, and the nodes are named
    metas["c"] = NodeMeta(usable_memory=5, model="m",
                          holdings=(Holding("m", "2" * 32, ((0, 30),), 900),))
    split = make_view([a, b, c], metas)
    assert split.model_id == "" and split.hash != view.hash
    assert split.model_problem == (
        "nodes hold different models named m (111111111111 on name-a, name-b; "
        "222222222222 on name-c): remove the wrong one with `ringctl model rm`")
    gone = make_view([c], {"c": NodeMeta(usable_memory=5, model="x")})
    assert gone.model_id == "" and gone.model_problem.startswith("no node holds model x:")
    assert resolve_model("", {}) == ("", "no model is set for the ring")


def test_a_node_on_standby_is_not_in_the_view() -> None:
    a, b = member("a", b""), member("b", b"")
    held = (Holding("m", "1" * 32, ((0, 30),), 900),)
    metas = {"a": NodeMeta(usable_memory=5, model="m", holdings=held, busy=True),
             "b": NodeMeta(usable_memory=9, model="m", standby=True)}
    view = make_view([a, b], metas)
    assert view.node_ids == ("a",) and view == make_view([a], metas)
    metas["b"] = NodeMeta(usable_memory=9, model="m")
    assert make_view([a, b], metas).node_ids == ("a", "b")
