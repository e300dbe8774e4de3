"""Step timings as nodes gossip them, and where a token's time goes (core/timing.py)."""

from __future__ import annotations

import pytest

from ringd.core.ringmeta import NodeMeta
from ringd.core.timing import (WIRE_RULE, Quantiles, StageStep, StageTimings, breakdown,
                               slowest)
from ringd.errors import RemoteProtocolError

#: A dict of the shape Runner.timings() returns.
RUNNER = {"window_s": 30.0, "steps": 412, "queued_ms": {"p50": 0.12, "p99": 3.5},
          "compute_ms": {"p50": 61.25, "p99": 80.0}, "handoff_ms": {"p50": 0.31, "p99": 1.2},
          "decode_step_ms": {"p50": 188.0, "p99": 230.5}, "prefill_ms_per_token": 4.75}


def test_read_takes_the_runners_dict_and_keeps_unknowns_unknown() -> None:
    t = StageTimings.read(RUNNER, next_rtt_ms=0.4)
    assert t is not None
    assert (t.window_s, t.steps) == (30.0, 412)
    assert t.compute_ms == Quantiles(61.25, 80.0) and t.queued_ms == Quantiles(0.12, 3.5)
    assert t.decode_step_ms.p99 == 230.5 and t.prefill_ms_per_token == 4.75
    assert t.next_rtt_ms == 0.4
    empty = StageTimings.read({"steps": 0, "queued_ms": {"p50": None, "p99": None},
                               "compute_ms": {"p50": "fast"}, "prefill_ms_per_token": None,
                               "decode_step_ms": None, "handoff_ms": {"p50": -1.0}})
    assert empty is not None
    assert empty.compute_ms == empty.handoff_ms == empty.queued_ms == Quantiles()
    assert empty.prefill_ms_per_token is None and empty.next_rtt_ms is None
    assert StageTimings.read(None) is None and StageTimings.read([1, 2]) is None


def test_json_has_the_runners_shape_and_reads_back() -> None:
    t = StageTimings.read(RUNNER, next_rtt_ms=0.4)
    assert t is not None
    j = t.as_json()
    assert {k: j[k] for k in RUNNER} == RUNNER
    assert StageTimings.read(j) == t


def test_gossiped_form_round_trips_to_the_microsecond() -> None:
    t = StageTimings.read(RUNNER, next_rtt_ms=0.4)
    assert t is not None
    wire = t.dump()
    assert WIRE_RULE.test(wire) and all(x is None or type(x) is int for x in wire)
    assert StageTimings.load(wire) == t
    unknown = StageTimings(steps=3)
    assert StageTimings.load(unknown.dump()) == unknown


def test_node_meta_carries_timings_and_refuses_bad_ones() -> None:
    t = StageTimings.read(RUNNER, next_rtt_ms=0.4)
    meta = NodeMeta(usable_memory=1 << 30, timings=t)
    assert NodeMeta.decode(meta.encode()).timings == t
    assert NodeMeta.decode(NodeMeta().encode()).timings is None
    import msgpack

    for bad in ([1, 2, 3], [-1] + [None] * 11, ["x"] + [None] * 11, [True] + [None] * 11):
        raw = msgpack.packb({"tm": bad})
        with pytest.raises(RemoteProtocolError, match="tm"):
            NodeMeta.decode(raw)


def ring3(**over: object) -> list[StageStep]:
    base = [StageStep("n1", compute_ms=40.0, queued_ms=0.5, handoff_ms=0.3, next_name="n2",
                      next_rtt_ms=0.4, floor_ms=10.0),
            StageStep("n2", compute_ms=72.0, queued_ms=0.5, handoff_ms=0.3, next_name="n3",
                      next_rtt_ms=0.6, floor_ms=31.0),
            StageStep("n3", compute_ms=60.0, queued_ms=0.5, handoff_ms=0.3, next_name="n1",
                      next_rtt_ms=0.2, floor_ms=55.0)]
    return base


def test_breakdown_shares_and_the_compute_bound_bottleneck() -> None:
    stages = ring3()
    b = breakdown(stages, 178.0, ceiling_tps=20.0)
    by = {(p.kind, p.name): p for p in b.parts}
    assert by[("compute", "n2")].ms == 72.0
    assert by[("compute", "n2")].share == pytest.approx(72.0 / 178.0)
    assert by[("hop", "n1 -> n2")].ms == pytest.approx(0.2)
    assert by[("hop", "n3 -> n1")].ms == pytest.approx(0.1)
    accounted = sum(s.compute_ms + s.queued_ms + s.handoff_ms + s.next_rtt_ms / 2
                    for s in stages)
    assert b.other_ms == pytest.approx(178.0 - accounted)
    assert b.bottleneck is not None and (b.bottleneck.kind, b.bottleneck.name) == ("compute",
                                                                                   "n2")
    assert b.efficiency == pytest.approx((1000 / 178.0) / 20.0)
    assert b.line() == ("bottleneck: n2 compute, 72 ms of 178 ms per token "
                        "(memory-bound ceiling 31 ms: compute-bound here)")


def test_a_stage_near_its_floor_is_memory_bound() -> None:
    stages = ring3()
    stages[1] = StageStep("n2", compute_ms=40.0, floor_ms=31.0, next_name="n3",
                          next_rtt_ms=0.6)
    b = breakdown(stages, 150.0)
    assert b.bottleneck is not None and b.bottleneck.name == "n3"  # 60 ms, floor 55
    assert "memory-bound ceiling 55 ms: memory-bound here" in b.line()
    assert b.efficiency is None


def test_a_slow_link_is_named() -> None:
    stages = [StageStep("a", compute_ms=2.0, next_name="b", next_rtt_ms=30.0),
              StageStep("b", compute_ms=3.0, next_name="a", next_rtt_ms=0.5)]
    b = breakdown(stages, 25.0)
    assert b.bottleneck is not None and b.bottleneck.label == "link a -> b"
    assert b.line() == ("bottleneck: link a -> b, 15 ms of 25 ms per token "
                        "(round trip 30 ms: the network)")
    assert "memory-bound ceiling unknown" in breakdown(
        [StageStep("a", compute_ms=9.0)], 10.0).line()


def test_one_stage_has_no_hop_and_nothing_measured_names_nothing() -> None:
    b = breakdown([StageStep("solo", compute_ms=5.0, next_name="solo", next_rtt_ms=1.0)], 6.0)
    assert [p.kind for p in b.parts] == ["compute"]
    none = breakdown([StageStep("a", compute_ms=None)], 50.0)
    assert none.bottleneck is None and none.other_ms == 50.0
    assert none.line() == "bottleneck: unknown, 50 ms per token: no step timings from a"


def test_a_stage_without_compute_time_names_no_bottleneck() -> None:
    """Round trips measured while the nodes compute would blame the network for the CPUs."""
    stages = [StageStep("a", compute_ms=None, next_name="b", next_rtt_ms=80.0),
              StageStep("b", compute_ms=30.0, next_name="a", next_rtt_ms=5.0)]
    b = breakdown(stages, 160.0)
    assert b.bottleneck is None and b.unmeasured == ("a",)
    assert b.line() == ("bottleneck: unknown, 160 ms per token: no step timings from a "
                        "(largest part measured: link a -> b, 40 ms)")
    assert b.as_json()["unmeasured"] == ["a"]
    with pytest.raises(ValueError):
        breakdown([], 0.0)


def test_slowest_stage_and_link_in_ring_order() -> None:
    t = {"n1": StageTimings(compute_ms=Quantiles(40.0, 50.0), next_rtt_ms=0.4),
         "n2": StageTimings(compute_ms=Quantiles(72.0, 90.0), next_rtt_ms=0.2),
         "n3": StageTimings(compute_ms=Quantiles(None, None), next_rtt_ms=0.9)}
    assert slowest(t, ["n1", "n2", "n3"]) == (("n2", 72.0), ("n3", "n1", 0.9))
    assert slowest(t, ["n2", "n1", "n3"])[1] == ("n3", "n2", 0.9)
    assert slowest({}, ["n1", "n2"]) == (None, None)
    assert slowest(t, ["n1"])[1] is None  # one stage: no link
