"""``ringctl bench`` names the bottleneck: the time per token split over the stages and hops
of a ring, from the timings every member gossips in a status a node builds."""

from __future__ import annotations

import pytest

from ringd.cli.proof import breakdown_lines, ring_breakdown
from tests.statuses import TIMINGS, node_status, plan_of, ring_members


def test_the_ring_of_a_status_split_per_stage_and_hop() -> None:
    members = ring_members()
    plan = plan_of(members)
    st = node_status(members, plan)
    assert st.ceiling is not None and st.ceiling.single_stream_tps is not None
    ms = 200.0
    b = ring_breakdown(st, ms, st.ceiling.single_stream_tps)
    names = {m.id: m.name for m in st.members}
    ring = [names[a.node_id] for a in plan.order]
    assert ring == ["alpha", "beta", "gamma"]
    by = {(p.kind, p.name): p for p in b.parts}
    for a, name in zip(plan.order, ring):
        t = TIMINGS[a.node_id]
        assert by[("compute", name)].ms == t.compute_ms.p50
        assert by[("queued", name)].ms == t.queued_ms.p50
        assert by[("handoff", name)].ms == t.handoff_ms.p50
        stage = next(s for s in st.ceiling.stages if s.node_id == a.node_id)
        assert stage.bandwidth is not None
        assert by[("compute", name)].floor_ms == pytest.approx(
            stage.shard_bytes / stage.bandwidth * 1000)
    hops = [p.name for p in b.parts if p.kind == "hop"]
    assert hops == ["alpha -> beta", "beta -> gamma", "gamma -> alpha"]
    assert by[("hop", "gamma -> alpha")].ms == pytest.approx(TIMINGS["c3"].next_rtt_ms / 2)
    assert b.bottleneck is not None and b.bottleneck.label == "beta compute"
    assert b.efficiency == pytest.approx((1000 / ms) / st.ceiling.single_stream_tps)
    lines = breakdown_lines(b)
    assert lines[0].startswith("efficiency: ") and "% of the ceiling" in lines[0]
    assert any(line.split()[:2] == ["beta", "compute"] for line in lines)
    assert lines[-1].startswith(f"bottleneck: beta compute, {TIMINGS['b2'].compute_ms.p50:.0f} "
                                f"ms of {ms:.0f} ms per token (memory-bound ceiling ")
    assert lines[-1].endswith(": compute-bound here)")


def test_a_stage_without_timings_is_left_out_not_guessed() -> None:
    members = ring_members()
    st = node_status(members, plan_of(members))
    for m in st.members:
        object.__setattr__(m, "timings", None)  # nobody gossiped any yet
    b = ring_breakdown(st, 100.0, None)
    # alpha answers: its own probes give the hop to beta; nothing else is known
    assert [(p.kind, p.name) for p in b.parts] == [("hop", "alpha -> beta")]
    assert b.efficiency is None and b.bottleneck is None
    assert b.unmeasured == ("alpha", "beta", "gamma")
