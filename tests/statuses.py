"""Statuses as a ring node builds them: real core members and plans through
:func:`ringd.status.ring_status`, the function the daemon's ``Node.status()`` calls."""

from __future__ import annotations

import random
from typing import Any

from ringd.core.membership import Membership
from ringd.core.plan import ModelShape, Plan, make_plan
from ringd.core.ringmeta import Holding, MetaDecoder, NodeMeta, NodePhase
from ringd.core.swim_wire import Member, MemberState
from ringd.core.timing import StageTimings
from ringd.status import ModelStatus, Status, ring_status

MiB, GiB = 2**20, 2**30
SHAPE = ModelShape("SmolLM2-135M-Instruct", layer_bytes=(8 * MiB,) * 30, embed_bytes=30 * MiB,
                   head_bytes=1 * MiB)
MODEL = ModelStatus(SHAPE.name, SHAPE.num_layers, SHAPE.total_bytes)
#: Round trips (seconds) this node measured to its peers.
RTTS = {"b2": 0.000314, "c3": 0.00042, "d4": 0.0005}
BANDWIDTH = 100 * 10**9  # bytes/s


def timings(compute_ms: float, next_rtt_ms: float | None,
            decode_step_ms: float | None = None) -> StageTimings:
    """Step timings of the shape a runner reports (``Runner.timings()``), as gossiped."""
    t = StageTimings.read({
        "window_s": 30.0, "steps": 120, "queued_ms": {"p50": 0.2, "p99": 1.5},
        "compute_ms": {"p50": compute_ms, "p99": compute_ms * 1.25},
        "handoff_ms": {"p50": 0.3, "p99": 0.9},
        "decode_step_ms": {"p50": decode_step_ms,
                           "p99": None if decode_step_ms is None else decode_step_ms * 1.2},
        "prefill_ms_per_token": None}, next_rtt_ms=next_rtt_ms)
    assert t is not None
    return StageTimings.load(t.dump())  # as a peer reads it


#: What the ring's members gossip: beta's compute is the slowest, gamma's link the slowest.
TIMINGS = {"a1": timings(40.0, 0.3, decode_step_ms=180.0), "b2": timings(95.5, 0.4),
           "c3": timings(41.0, 0.9), "e5": timings(10.0, 0.1)}


def member(node_id: str, name: str, port: int, usable: int, *,
           phase: NodePhase = NodePhase.SERVING, state: MemberState = MemberState.ALIVE,
           bandwidth: int = BANDWIDTH, timings: StageTimings | None = None) -> Member:
    meta = NodeMeta(usable_memory=usable, total_memory=24 * GiB,
                    holdings=(Holding(SHAPE.name, "5" * 32, ((0, SHAPE.num_layers),), 4096),),
                    phase=phase, software_version="0.1.0", http_port=port + 1,
                    memory_bandwidth=bandwidth, timings=timings)
    return Member(node_id, name, ("127.0.0.1", port), 1, state, meta.encode())


def metas_of(members: list[Member]) -> dict[str, NodeMeta]:
    """The members' metadata as a node reads it (the daemon's MetaDecoder)."""
    return MetaDecoder().decode(members)


def ring_members(*, dead: bool = False) -> list[Member]:
    """alpha, beta, gamma (1:2:3 GiB), delta too small for a layer; epsilon dead if asked."""
    t = TIMINGS
    out = [member("a1", "alpha", 7411, 1 * GiB, timings=t["a1"]),
           member("b2", "beta", 7421, 2 * GiB, timings=t["b2"]),
           member("c3", "gamma", 7431, 3 * GiB, timings=t["c3"]),
           member("d4", "delta", 7441, 1 * MiB, phase=NodePhase.READY)]
    if dead:  # its last gossip said "serving"
        out.append(member("e5", "epsilon", 7451, 4 * GiB, state=MemberState.DEAD,
                          timings=t["e5"]))
    return out


def plan_of(members: list[Member], epoch: int = 3) -> Plan:
    live = [m for m in members if m.state in (MemberState.ALIVE, MemberState.SUSPECT)]
    metas = metas_of(live)
    return make_plan([(m.node_id, metas[m.node_id].usable_memory) for m in live], SHAPE,
                     epoch=epoch)


def shard_bytes(start: int, end: int) -> int:
    return sum(SHAPE.layer_bytes[start:end])


#: The link prober's chosen paths from alpha (as :meth:`LinkProber.path_status` gives them).
PATHS = {
    "b2": {"address": "169.254.3.4", "interface": "bridge0", "kind": "thunderbolt",
           "rtt_ms": 0.08, "throughput": 2.5e9, "pinned": False,
           "reason": "lowest round trip of 2 paths",
           "options": [{"address": "169.254.3.4", "interface": "bridge0", "kind": "thunderbolt",
                        "rtt_ms": 0.08, "throughput": 2.5e9, "up": True},
                       {"address": "192.168.1.21", "interface": "en1", "kind": "wifi",
                        "rtt_ms": 3.1, "throughput": None, "up": True}]},
    "c3": {"address": "127.0.0.1", "interface": "lo", "kind": "loopback", "rtt_ms": 0.4,
           "throughput": None, "pinned": True, "reason": "pinned to lo", "options": []},
}


def node_status(members: list[Member], plan: Plan | None, *, serving: bool = True,
                reason: str | None = None, measured_tps: float | None = 5.0,
                node_id: str = "a1") -> Status:
    """What node ``node_id`` (alpha) reports, built as the daemon builds it."""
    me = next(m for m in members if m.node_id == node_id)
    membership = Membership(me.node_id, me.name, me.addr, me.meta, rng=random.Random(1))
    metas = metas_of(members)
    stats: dict[str, Any] = {
        "runner": {"requests_served": 4, "requests_failed": 0, "tokens_generated": 96,
                   "coverage_errors": 0},
        "membership": membership.stats(),
    }
    return ring_status(
        node_id=node_id, node_name=me.name, addr=me.addr,
        http_port=metas[node_id].http_port, members=members, metas=metas, plan=plan,
        rtt=RTTS.get, model=MODEL, shard_bytes=shard_bytes, path=PATHS.get,
        serving=serving, reason=reason, fingerprint="c0ffee1234", measured_tps=measured_tps,
        timeline={"plan_committed": 1.25}, stats=stats)
