"""Pure parts of issue 6: fingerprints, their checks, names in errors, ceilings and verdicts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringd.core.ceiling import GB, aggregate_ceiling, decode_ceiling
from ringd.core.proof import (
    StageClaim,
    StageLoad,
    check_fingerprints,
    check_loaded,
    fingerprint_problem,
    name_nodes,
    not_ready_reason,
    parse_fingerprint,
    rate_verdict,
    refusal_text,
    ring_ceiling,
    ring_fingerprint,
    shard_fingerprint,
    tensors_digest,
)
from ringd.core.ringmeta import MAX_REFUSAL, NodeMeta
from ringd.core.swim_wire import Member, MemberState, Ping, decode_payload, to_payload
from ringd.errors import LocalProtocolError

PAIRS = [("model.layers.0.w", "aa" * 16), ("model.layers.1.w", "bb" * 16),
         ("model.embed_tokens.w", "cc" * 16)]


@settings(max_examples=100, deadline=None)
@given(st.permutations(PAIRS))
def test_digest_does_not_depend_on_order(pairs) -> None:
    assert tensors_digest(pairs) == tensors_digest(PAIRS)


def test_digest_covers_names_and_hashes() -> None:
    base = tensors_digest(PAIRS)
    assert len(base) == 32 and set(base) <= set("0123456789abcdef")
    renamed = [("model.layers.9.w", h) if n == "model.layers.0.w" else (n, h) for n, h in PAIRS]
    changed = [(n, "dd" * 16 if n == "model.layers.1.w" else h) for n, h in PAIRS]
    digests = {base, tensors_digest(renamed), tensors_digest(changed), tensors_digest(PAIRS[:2])}
    assert len(digests) == 4
    with pytest.raises(LocalProtocolError):
        tensors_digest([("a\0b", "00")])  # a name that could forge another pair


def test_shard_fingerprint_names_its_layers_and_parses_back() -> None:
    fp = shard_fingerprint(3, 7, PAIRS)
    assert fp.startswith("3-7:") and parse_fingerprint(fp) == (3, 7, tensors_digest(PAIRS))
    assert shard_fingerprint(3, 8, PAIRS) != fp
    for bad in (None, "", "3-7", "3-7:xyz", "a-7:" + "0" * 32, fp + "0"):
        assert parse_fingerprint(bad) is None
    with pytest.raises(LocalProtocolError):
        shard_fingerprint(4, 4, PAIRS)


def test_ring_fingerprint_covers_plan_and_stages_in_order() -> None:
    a, b = shard_fingerprint(0, 2, PAIRS[:1]), shard_fingerprint(2, 4, PAIRS[1:])
    ring = ring_fingerprint("p" * 32, [a, b])
    assert len(ring) == 32
    assert ring != ring_fingerprint("q" * 32, [a, b])  # another plan
    assert ring != ring_fingerprint("p" * 32, [b, a])  # the same stages in another order


def test_check_loaded_names_missing_and_extra_tensors() -> None:
    want = ["model.layers.3.a", "model.layers.3.b", "model.layers.4.a"]
    assert check_loaded(3, 5, want, reversed(want)) is None
    problem = check_loaded(3, 5, want, want[:2] + ["model.layers.5.a"])
    assert problem is not None
    assert "[3, 5)" in problem and "missing 1 (e.g. model.layers.4.a)" in problem
    assert "1 not in the assignment (e.g. model.layers.5.a)" in problem


def _claims(fps: dict[str, str | None]) -> list[StageClaim]:
    spans = {"a": (0, 2), "b": (2, 5), "c": (5, 6)}
    return [StageClaim(i, f"node-{i}", *spans[i], fps[i]) for i in "abc"]


def test_fingerprint_check_against_own_files() -> None:
    def expected(start: int, end: int) -> str:
        return shard_fingerprint(start, end, [(f"t{start}-{end}", "00" * 16)])

    good = {i: expected(s, e) for i, (s, e) in zip("abc", [(0, 2), (2, 5), (5, 6)])}
    assert check_fingerprints(_claims(good), expected, "a") == []
    # another node's files differ: named with its layers, and both digests shown
    other = shard_fingerprint(2, 5, [("t2-5", "11" * 16)])
    problems = check_fingerprints(_claims({**good, "b": other}), expected, "a")
    assert len(problems) == 1 and problems[0].startswith("node node-b (layers 2-4) loaded weights")
    assert other.partition(":")[2][:12] in problems[0]
    assert good["b"].partition(":")[2][:12] in problems[0]
    # loaded another range than assigned; reported nothing at all
    problems = check_fingerprints(_claims({**good, "b": expected(2, 4), "c": None}), expected, "a")
    assert problems == ["node node-b (layers 2-4) loaded layers 2-3 instead",
                        "node node-c (layers 5-5) reports no weights fingerprint"]
    # the local node is checked when it loads, not here
    assert check_fingerprints(_claims({**good, "a": None}), expected, "a") == []
    text = fingerprint_problem(problems)
    assert "node-b" in text and "node-c" in text and "re-copy" in text


def test_refusals_are_short_single_lines_and_lead_the_reason() -> None:
    long = "the ring's weights do not match:\n" + "x" * 500
    text = refusal_text(long)
    assert len(text) == MAX_REFUSAL and text.isprintable() and text.endswith("...")
    assert refusal_text("short") == "short"
    assert not_ready_reason("waiting for node b", []) == "waiting for node b"
    assert not_ready_reason("node b has not committed yet", [("b", "weights differ")]) == (
        "node b refuses to serve: weights differ (here: node b has not committed yet)")


def test_name_nodes() -> None:
    names = {"0123456789abcdef": "studio-1", "fedcba9876543210": "fedcba9876543210"}
    text = "node 0123456789abcdef sent to node fedcba9876543210"
    assert name_nodes(text, names) == "node studio-1 (01234567) sent to node fedcba9876543210"
    assert name_nodes("nothing here", names) == "nothing here"


def test_ring_ceiling_matches_the_ceiling_module() -> None:
    stages = [StageLoad(i, i, int(76 * GB), 800 * GB) for i in "abc"]
    c = ring_ceiling(stages, 50e-6)
    shards = [(76 * GB, 800 * GB)] * 3
    assert c["single_stream_tps"] == pytest.approx(decode_ceiling(shards, [50e-6] * 3))
    assert c["aggregate_tps"]["8"] == pytest.approx(aggregate_ceiling(shards, [50e-6] * 3, 8))
    assert c["hop_us"] == 50.0 and c["missing_bandwidth"] == [] and len(c["stages"]) == 3
    # one stage: no hop at all
    one = ring_ceiling(stages[:1], 1.0)
    assert one["single_stream_tps"] == pytest.approx(800 / 76)
    # a node that did not report its bandwidth: no ceiling, and it is named
    unknown = ring_ceiling([stages[0], StageLoad("d", "node-d", 10, None)], 0.0)
    assert unknown["single_stream_tps"] is None and unknown["missing_bandwidth"] == ["node-d"]


def test_rate_verdict() -> None:
    assert rate_verdict(7.3, 3.5) == "IMPOSSIBLE"  # the published 405B figure
    assert rate_verdict(3.4, 3.5) == "ok"
    assert rate_verdict(3.6, 3.5) == "ok"  # within 5%
    assert rate_verdict(100.0, None) == "unknown"


def test_memory_bandwidth_is_gossiped() -> None:
    meta = NodeMeta(memory_bandwidth=273 * 10**9, fingerprint=shard_fingerprint(0, 4, PAIRS),
                    refusal=refusal_text("weights differ " * 40))
    me = Member("a", "a", ("10.0.0.1", 1), 3, MemberState.ALIVE, meta.encode())
    got = decode_payload(to_payload(Ping(1, me, None)))
    assert isinstance(got, Ping) and NodeMeta.decode(got.source.meta) == meta
