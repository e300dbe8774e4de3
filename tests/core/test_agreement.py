"""Leaderless agreement: direct state-machine tests, then rings on the simulated network."""

from __future__ import annotations

import dataclasses

import pytest

from ringd.core.agreement import (
    Agreement,
    AgreementState,
    LoadShard,
    PlanDropped,
    PlanUnfit,
    RingReady,
    StopServing,
)
from ringd.core.plan import ModelShape
from ringd.core.ringmeta import Holding, NodeMeta, NodePhase, make_view
from ringd.core.swim_wire import Member, MemberState
from tests.core.simnet import MemberNode, RingNode, SimNet

GiB = 1024**3
SHAPE = ModelShape("tiny", (100 * 2**20,) * 30, embed_bytes=50 * 2**20, head_bytes=50 * 2**20)


def view_of(*members: tuple[str, int], model: str = "tiny"):
    return make_view(
        [
            Member(i, i, ("10.0.0.1", 7000 + k), 0, MemberState.ALIVE)
            for k, (i, _) in enumerate(members)
        ],
        {i: NodeMeta(usable_memory=u, model=model,
                     holdings=(Holding(model, f"id-of-{model}", ((0, 30),), 1),))
         for i, u in members},
    )


# ------------------------------------------------------------------ the state machine
def test_commit_waits_for_every_member_to_report_the_view_and_epoch() -> None:
    v = view_of(("a", GiB), ("b", 2 * GiB), ("c", 3 * GiB))
    a = Agreement("a")
    a.update(0.0, v, {"b": NodeMeta(), "c": NodeMeta(view_hash="f" * 32)}, SHAPE)
    assert a.state is AgreementState.FORMING and a.epoch == 1
    assert (
        a.reason == f"waiting for 2 of 3 nodes to agree on view {v.short()} "
        "(b sees no view, c sees ffffffff)"
    )
    assert a.published() == {
        "view_hash": v.hash,
        "epoch": 1,
        "plan_hash": None,
        "ready_plan_hash": None,
        "phase": NodePhase.JOINING,
    }

    # b proposes a higher epoch for the same view: a adopts it
    peers = {"b": NodeMeta(view_hash=v.hash, epoch=5), "c": NodeMeta(view_hash=v.hash, epoch=1)}
    a.update(0.1, v, peers, SHAPE)
    assert a.epoch == 5 and a.reason == "waiting for c to agree on epoch 5"

    peers["c"] = NodeMeta(view_hash=v.hash, epoch=5)
    a.update(0.2, v, peers, None)
    assert a.reason == "model tiny is unknown on this node: its files are not in the store"
    a.update(0.25, v, peers, None, "fetching the manifest of tiny from b")
    assert a.reason == "fetching the manifest of tiny from b" and a.get_timer() == 0.5
    a.update(0.3, v, peers, SHAPE)
    assert a.reason == f"view {v.short()} is settling" and a.get_timer() == 0.5
    assert a.next_event() is None

    a.handle_timer(0.5)
    (ev,) = a.events()
    assert isinstance(ev, LoadShard) and ev.plan.epoch == 5
    assert (ev.assignment.start, ev.assignment.end) == (0, 5)
    assert a.state is AgreementState.LOADING and a.get_timer() is None
    plan = ev.plan
    assert (
        a.reason == "this node loading layers 0-4; node b has not committed yet; "
        "node c has not committed yet"
    )

    peers = {i: dataclasses.replace(m, plan_hash=plan.hash) for i, m in peers.items()}
    a.update(0.6, v, peers, SHAPE)
    assert (
        a.reason
        == "this node loading layers 0-4; node b loading layers 5-14; node c loading layers 15-29"
    )
    assert not a.loaded("not-this-plan", 0.7)
    assert a.loaded(plan.hash, 0.7)
    assert a.state is AgreementState.WAITING and a.published()["ready_plan_hash"] == plan.hash
    assert a.published()["phase"] is NodePhase.READY

    peers = {i: dataclasses.replace(m, ready_plan_hash=plan.hash) for i, m in peers.items()}
    a.update(0.8, v, peers, SHAPE)
    assert a.events() == [RingReady(plan)]
    assert a.serving_plan == plan and a.reason == "ready" and a.status()["ready"]
    assert a.published()["phase"] is NodePhase.SERVING

    # c restarts and falls back: stop serving, keep the plan (it may come back)
    peers["c"] = dataclasses.replace(peers["c"], ready_plan_hash=None)
    a.update(0.9, v, peers, SHAPE)
    assert a.events() == [StopServing(plan, "node c loading layers 15-29")]
    assert a.serving_plan is None and a.plan == plan

    # the view changes: drop the plan, propose a strictly greater epoch
    v2 = view_of(("a", GiB), ("b", 2 * GiB))
    a.update(1.0, v2, peers, SHAPE)
    (dropped,) = a.events()
    assert isinstance(dropped, PlanDropped) and dropped.plan == plan
    assert dropped.reason == f"node c left the ring (view {v.short()} -> {v2.short()})"
    assert a.epoch == 6 and a.plan is None


def test_a_view_change_while_serving_stops_serving_first() -> None:
    v = view_of(("a", 4 * GiB))
    a = Agreement("a", last_epoch=41)
    a.update(0.0, v, {}, SHAPE)
    a.handle_timer(0.5)
    (load,) = a.events()
    assert load.plan.epoch == 42  # strictly above the persisted epoch
    a.loaded(load.plan.hash, 0.6)
    assert a.events() == [RingReady(load.plan)]
    v2 = view_of(("a", 4 * GiB), ("d", GiB))
    a.update(1.0, v2, {"d": NodeMeta()}, SHAPE)
    stop, dropped = a.events()
    assert isinstance(stop, StopServing) and isinstance(dropped, PlanDropped)
    assert stop.reason == dropped.reason == f"node d joined (view {v.short()} -> {v2.short()})"


def test_an_unfit_view_says_why_until_the_view_changes() -> None:
    v = view_of(("a", 1 * GiB), ("b", 1 * GiB))
    big = ModelShape("tiny", (GiB,) * 4, 0, 0)
    a = Agreement("a")
    a.update(0.0, v, {"b": NodeMeta()}, big)
    peers = {"b": NodeMeta(view_hash=v.hash, epoch=a.epoch)}
    a.update(0.1, v, peers, big)
    a.handle_timer(0.5)
    (ev,) = a.events()
    assert isinstance(ev, PlanUnfit) and ev.view_hash == v.hash
    assert a.state is AgreementState.UNFIT
    assert a.reason == (
        "plan cannot fit: model tiny needs 4.0 GiB (weights 4.0 GiB), the ring has 2.0 GiB "
        "usable on 2 nodes; add >= 2.0 GiB"
    )
    assert a.status()["unfit"]["hint"].startswith("add a node")
    a.update(0.6, v, peers, big)
    assert a.events() == []  # said once
    v2 = view_of(("a", 1 * GiB), ("b", 1 * GiB), ("c", 3 * GiB))
    a.update(1.0, v2, {"b": NodeMeta(), "c": NodeMeta()}, big)
    assert a.epoch == 2
    a.update(1.1, v2, {i: NodeMeta(view_hash=v2.hash, epoch=2) for i in "bc"}, big)
    a.handle_timer(1.5)
    (ev,) = a.events()
    assert isinstance(ev, LoadShard) and ev.plan.epoch == 2


def test_load_failure_is_reported_and_cleared_by_a_view_change() -> None:
    v = view_of(("a", 4 * GiB))
    a = Agreement("a")
    a.update(0.0, v, {}, SHAPE)
    a.handle_timer(0.5)
    (load,) = a.events()
    a.load_failed(load.plan.hash, "model file truncated")
    assert a.state is AgreementState.FAILED
    assert a.reason == "loading failed on this node: model file truncated"
    assert a.published()["plan_hash"] is None
    assert [type(e) for e in a.events()] == [PlanDropped]
    a.update(1.0, view_of(("a", 5 * GiB)), {}, SHAPE)
    assert a.state is AgreementState.FORMING


def test_an_excluded_node_commits_without_loading() -> None:
    v = view_of(("a", 10 * GiB), ("b", 10 * 2**20))
    b = Agreement("b")
    b.update(0.0, v, {"a": NodeMeta()}, SHAPE)
    b.update(0.1, v, {"a": NodeMeta(view_hash=v.hash, epoch=b.epoch)}, SHAPE)
    b.handle_timer(0.5)
    (load,) = b.events()
    assert load.assignment is None and load.plan.excluded[0].node_id == "b"
    assert b.state is AgreementState.WAITING and b.published()["phase"] is NodePhase.READY


# ------------------------------------------------------------------ simulated rings
def ring(sizes: list[int], seed: int = 1, **kw) -> tuple[SimNet, list[RingNode]]:
    net = SimNet(seed=seed, **kw)
    nodes = [
        net.add(RingNode(f"r{i}", 7000 + i, seed=seed * 10 + i, usable=u, shape=SHAPE))
        for i, u in enumerate(sizes)
    ]
    for n in nodes:
        n.m.join([nodes[0].addr], net.now)
    return net, nodes


def serving(nodes: list[RingNode]) -> set[str | None]:
    return {n.a.serving_plan.hash if n.a.serving_plan else None for n in nodes}


def test_three_nodes_converge_on_one_plan_hash_and_epoch() -> None:
    net, nodes = ring([1 * GiB, 2 * GiB, 3 * GiB])
    t = net.run_until_true(lambda: None not in serving(nodes), timeout=5.0)
    assert t < 1.5  # gossip ~ms, settle 0.5 s, load 0.3 s
    (h,) = serving(nodes)
    plans = {n.a.serving_plan for n in nodes}
    assert len(plans) == 1
    plan = plans.pop()
    assert plan.hash == h and plan.epoch >= 1
    assert [(a.node_id, a.start, a.end) for a in plan.order] == [
        ("r0", 0, 5),
        ("r1", 5, 15),
        ("r2", 15, 30),
    ]
    net.run_for(0.5)  # the last "serving" phase reaches everyone
    for n in nodes:
        loads = [ev for _, ev in n.alog if isinstance(ev, LoadShard)]
        assert loads[-1].plan == plan and loads[-1].assignment == plan.assignment(n.m.node_id)
        assert n.a.status()["reason"] == "ready" and n.a.epoch == plan.epoch
        for other in nodes:
            meta = other.meta_of(n.m.node_id)
            assert meta.ready_plan_hash == plan.hash and meta.phase is NodePhase.SERVING
    net.run_for(20.0)  # and it stays that way
    assert serving(nodes) == {h}


def test_a_join_stops_serving_before_the_new_plan() -> None:
    net, nodes = ring([2 * GiB, 2 * GiB, 2 * GiB], seed=2)
    net.run_until_true(lambda: None not in serving(nodes), timeout=5.0)
    (p,) = {n.a.serving_plan for n in nodes}
    d = net.add(RingNode("r3", 7003, seed=99, usable=2 * GiB, shape=SHAPE))
    d.m.join([nodes[1].addr], net.now)
    nodes.append(d)
    net.run_until_true(lambda: None not in serving(nodes) and len(serving(nodes)) == 1, timeout=5.0)
    (q,) = {n.a.serving_plan for n in nodes}
    assert q.epoch > p.epoch and len(q.order) == 4
    for n in nodes[:3]:
        kinds = [(type(ev).__name__, ev.plan.hash) for _, ev in n.alog]
        i_stop = kinds.index(("StopServing", p.hash))
        assert kinds[i_stop + 1] == ("PlanDropped", p.hash)
        assert i_stop < kinds.index(("LoadShard", q.hash))
        stop = n.alog[i_stop][1]
        assert stop.reason.startswith("node r3 joined")


def test_a_crashed_node_is_planned_out() -> None:
    net, nodes = ring([2 * GiB, 2 * GiB, 2 * GiB], seed=3)
    net.run_until_true(lambda: None not in serving(nodes), timeout=5.0)
    net.crash(nodes[2].addr)
    t0 = net.now
    alive = nodes[:2]
    t = net.run_until_true(
        lambda: None not in serving(alive) and all(len(n.a.serving_plan.order) == 2 for n in alive),
        timeout=15.0,
    )
    assert t - t0 < 2 * 1.0 + 4.0 + 1.0  # detection + suspicion + settle and load
    for n in alive:
        stops = [ev for _, ev in n.alog if isinstance(ev, StopServing)]
        assert stops[-1].reason.startswith("node r2 left the ring")


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_never_two_plans_serving_through_joins_leaves_and_crashes(seed: int) -> None:
    net, nodes = ring([1 * GiB, 2 * GiB, 3 * GiB], seed=seed, loss=0.02)
    script = {
        2.0: lambda: add(net, nodes, "r3", 7003, 2 * GiB),
        6.0: lambda: nodes[1].m.leave(net.now),
        12.0: lambda: net.crash(nodes[0].addr),
        20.0: lambda: add(net, nodes, "r4", 7004, 4 * GiB),
    }
    gone = {0: 12.0, 1: 6.0}
    end = 32.0
    while net.now < end:
        due = [t for t in script if t <= net.now]
        for t in due:
            script.pop(t)()
        net.step(min([end, *script]))
        live = [n for i, n in enumerate(nodes) if i not in gone or net.now < gone[i]]
        hashes = serving(live) - {None}
        assert len(hashes) <= 1, f"two plans serving at t={net.now}"
        for n in live:  # a node starts serving only once every plan member has loaded its range
            if n.serving and n.serving[-1][0] == net.now and n.serving[-1][1] is not None:
                by_id = {m.m.node_id: m for m in nodes}
                assert all(
                    n.serving[-1][1] in by_id[a.node_id].loaded for a in n.a.serving_plan.order
                )
    survivors = [nodes[2], nodes[3], nodes[4]]
    (q,) = serving(survivors)
    assert q is not None and {a.node_id for a in survivors[0].a.serving_plan.order} == {
        "r2",
        "r3",
        "r4",
    }
    for n in nodes:
        # a node moves from one plan to another only through "not serving"
        changes = [h for _, h in n.serving]
        for a, b in zip(changes, changes[1:]):
            assert a is None or b is None
        epochs = [ev.plan.epoch for _, ev in n.alog if isinstance(ev, LoadShard)]
        assert epochs == sorted(set(epochs))  # strictly increasing


def test_the_active_model_setting_spreads_and_outlives_its_writer() -> None:
    net, nodes = ring([2 * GiB, 2 * GiB, 2 * GiB], seed=8)
    net.run_until_true(lambda: None not in serving(nodes), timeout=5.0)
    h0 = nodes[0].view.hash
    assert {n.view.model for n in nodes} == {"tiny"}
    nodes[2].use_model("other", net.now)
    net.run_until_true(lambda: all(n.view.model == "other" for n in nodes), 2.0)
    assert len({n.view.hash for n in nodes}) == 1 and nodes[0].view.hash != h0
    assert all(n.a.serving_plan is None for n in nodes)  # a model change is a view change
    unknown = ("no node holds model other: put it on one node (`ringctl model pull` or "
               "`ringctl model import`)")
    net.run_until_true(lambda: all(n.a.reason == unknown for n in nodes), 1.0)
    for n in nodes:  # each node adopted the setting (version 1, written by r2)
        assert (n.meta.model, n.meta.model_version) == ("other", 1)
    net.crash(nodes[2].addr)
    net.run_until_true(lambda: nodes[0].view.node_ids == ("r0", "r1"), 10.0)
    assert nodes[0].view.model == nodes[1].view.model == "other"
    # a later writer wins, whatever its node id
    nodes[0].use_model("tiny", net.now)
    net.run_until_true(lambda: None not in serving(nodes[:2]), timeout=5.0)
    assert (nodes[1].meta.model, nodes[1].meta.model_version) == ("tiny", 2)


def test_a_member_with_unreadable_metadata_is_left_out_of_the_ring(caplog) -> None:
    net, nodes = ring([2 * GiB, 2 * GiB], seed=9)
    bad = net.add(MemberNode("r9", 7009, seed=90, meta=b"\xc1 not a map"))
    bad.m.join([nodes[0].addr], net.now)
    with caplog.at_level("WARNING", logger="ringd.core.ringmeta"):
        net.run_until_true(lambda: None not in serving(nodes), timeout=5.0)
        net.run_for(5.0)
    for n in nodes:
        assert n.state_of("r9") == "alive"  # SWIM knows it
        assert n.view.node_ids == ("r0", "r1") and n.metas.unreadable == ["r9"]
    assert serving(nodes) != {None}
    warnings = [r.getMessage() for r in caplog.records if "r9" in r.getMessage()]
    assert len(warnings) == 2  # once per node, not once per message
    assert "cannot read" in warnings[0] and "not valid msgpack" in warnings[0]


def add(net: SimNet, nodes: list[RingNode], node_id: str, port: int, usable: int) -> None:
    n = net.add(RingNode(node_id, port, seed=port, usable=usable, shape=SHAPE))
    n.m.join([nodes[2].addr], net.now)
    nodes.append(n)


def test_a_ring_too_small_reports_the_shortfall_everywhere() -> None:
    net, nodes = ring([1 * GiB, 1 * GiB], seed=7)
    big = ModelShape("tiny", (GiB,) * 4, 0, 0)
    for n in nodes:
        n.shape = big
    net.run_until_true(lambda: all(n.a.state is AgreementState.UNFIT for n in nodes), timeout=5.0)
    for n in nodes:
        assert [type(ev) for _, ev in n.alog] == [PlanUnfit]
        assert n.a.reason.startswith("plan cannot fit: model tiny needs 4.0 GiB")
    c = net.add(RingNode("r2", 7002, seed=70, usable=3 * GiB, shape=big))
    c.m.join([nodes[0].addr], net.now)
    nodes.append(c)
    net.run_until_true(lambda: None not in serving(nodes), timeout=5.0)
