"""The status contract: built from membership and the plan, to JSON and back, and read
strictly enough that a malformed status is a clear error."""

from __future__ import annotations

import json

import pytest

from ringd.core.proof import StageLoad, ring_ceiling
from ringd.core.ringmeta import NodePhase
from ringd.core.swim_wire import MemberState
from ringd.status import MalformedStatus, Status
from tests.statuses import (PATHS, TIMINGS, member, node_status, plan_of, ring_members,
                            shard_bytes)


def test_round_trip_through_json_is_lossless() -> None:
    members = ring_members(dead=True)
    st = node_status(members, plan_of(members))
    wire = json.loads(json.dumps(st.to_json()))
    assert Status.from_json(wire) == st
    assert Status.from_json(wire).to_json() == wire


def test_members_carry_the_plan_and_the_measured_round_trips() -> None:
    members = ring_members()
    plan = plan_of(members)
    st = node_status(members, plan)
    by_id = {m.id: m for m in st.members}
    assert [m.id for m in st.members] == sorted(by_id)
    for a in plan.order:
        assert by_id[a.node_id].layers == (a.start, a.end)
    assert by_id["d4"].layers is None and [e.node_id for e in st.plan.excluded] == ["d4"]
    assert by_id["a1"].is_self and by_id["a1"].rtt_ms is None  # no round trip to itself
    assert by_id["b2"].rtt_ms == pytest.approx(0.314)
    assert st.node.phase is NodePhase.SERVING and st.plan.epoch == plan.epoch


def test_members_carry_their_gossiped_step_timings() -> None:
    members = ring_members(dead=True)
    st = node_status(members, plan_of(members))
    by_id = {m.id: m for m in st.members}
    for node_id in ("a1", "b2", "c3"):
        assert by_id[node_id].timings == TIMINGS[node_id]
    assert by_id["d4"].timings is None  # gossips none
    assert by_id["e5"].timings is None  # dead: its last word is stale
    j = st.to_json()["members"]
    beta = next(m for m in j if m["id"] == "b2")["timings"]
    assert beta["compute_ms"] == {"p50": 95.5, "p99": 95.5 * 1.25}
    assert beta["next_rtt_ms"] == 0.4 and beta["steps"] == 120


def test_members_carry_the_chosen_path_and_every_measured_one() -> None:
    members = ring_members()
    st = node_status(members, plan_of(members))
    by_id = {m.id: m for m in st.members}
    beta = by_id["b2"].path
    assert beta is not None and (beta.interface, beta.kind, beta.rtt_ms) == ("bridge0",
                                                                           "thunderbolt", 0.08)
    assert [(o.interface, o.up) for o in beta.options] == [("bridge0", True), ("en1", True)]
    assert by_id["c3"].path is not None and by_id["c3"].path.pinned
    assert by_id["a1"].path is None and by_id["d4"].path is None  # itself; not measured
    assert st.to_json()["members"][1]["path"] == PATHS["b2"]


def test_a_dead_or_left_member_has_no_known_phase() -> None:
    members = ring_members() + [
        member("e5", "epsilon", 7451, 1, state=MemberState.DEAD),
        member("f6", "phi", 7461, 1, state=MemberState.LEFT),
        member("g7", "gamma-suspect", 7471, 1, state=MemberState.SUSPECT)]
    st = node_status(members, plan_of(ring_members()))
    phases = {m.id: m.phase for m in st.members}
    assert phases["e5"] is None and phases["f6"] is None
    assert phases["g7"] is NodePhase.SERVING  # suspected, not yet declared dead
    assert st.to_json()["members"][4]["phase"] is None


def test_the_local_node_leaving_keeps_its_phase() -> None:
    members = [member("a1", "alpha", 7411, 1, state=MemberState.LEFT,
                      phase=NodePhase.LEAVING)]
    st = node_status(members, None, serving=False, reason="leaving")
    assert st.members[0].phase is NodePhase.LEAVING and st.node.phase is NodePhase.LEAVING


def test_ceiling_is_the_cores_for_the_committed_plan() -> None:
    members = ring_members()
    plan = plan_of(members)
    st = node_status(members, plan, measured_tps=5.0)
    want = ring_ceiling([StageLoad(a.node_id, n, shard_bytes(a.start, a.end), 100e9)
                         for a, n in zip(plan.order, ("alpha", "beta", "gamma"))],
                        min(0.000314, 0.00042, 0.0005) / 2)
    c = st.ceiling
    assert c is not None and c.single_stream_tps == want["single_stream_tps"]
    assert {str(k): v for k, v in c.aggregate_tps.items()} == want["aggregate_tps"]
    assert c.measured_tps == 5.0 and c.verdict == "ok"
    assert node_status(members, None).ceiling is None


def test_not_serving_hides_the_fingerprint_and_gives_the_reason() -> None:
    members = ring_members()
    st = node_status(members, plan_of(members), serving=False, reason="waiting for beta")
    assert not st.ready and st.reason == "waiting for beta" and st.fingerprint is None


def test_missing_optional_fields_take_defaults() -> None:
    st = Status.from_json({"node": {"id": "x"}, "ready": False})
    assert st.node.id == "x" and st.members == () and st.plan is None and st.stats == {}
    assert st.model is None and st.ceiling is None and st.reason is None


@pytest.mark.parametrize("change, where", [
    (lambda j: j.pop("node"), "status.node is missing"),
    (lambda j: j.update(ready="yes"), "status.ready must be true or false, got str"),
    (lambda j: j["members"][1].update(state="ready"),
     "status.members[1].state must be one of alive, suspect, dead, left, got 'ready'"),
    (lambda j: j["members"][0].update(phase="idle"), "status.members[0].phase must be one of"),
    (lambda j: j["members"][0].update(layers=[5, 5]), "status.members[0].layers must be"),
    (lambda j: j["plan"]["assignments"][2].pop("end"),
     "status.plan.assignments[2].end is missing"),
    (lambda j: j["ceiling"]["aggregate_tps"].update(many=1.0), "status.ceiling.aggregate_tps"),
    (lambda j: j.update(members={}), "status.members must be an array, got dict"),
    (lambda j: j["members"][1]["path"].pop("address"), "status.members[1].path.address is "
     "missing"),
    (lambda j: j["members"][1]["path"]["options"][0].update(up="yes"),
     "status.members[1].path.options[0].up must be true or false"),
])
def test_a_malformed_status_is_a_clear_error(change, where) -> None:
    members = ring_members()
    wire = node_status(members, plan_of(members)).to_json()
    change(wire)
    with pytest.raises(MalformedStatus) as e:
        Status.from_json(wire, source="ringd at 127.0.0.1:7412")
    assert str(e.value).startswith("ringd at 127.0.0.1:7412 sent a malformed status: " + where)
    assert e.value.hint


def test_not_an_object_is_malformed() -> None:
    with pytest.raises(MalformedStatus, match="status must be an object, got list"):
        Status.from_json([])

