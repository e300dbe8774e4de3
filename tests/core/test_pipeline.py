"""The request path's state machine, driven like tests/core/test_reliable.py drives Endpoint:
scripted messages, a fake clock, and assertions on the effects it emits."""

from __future__ import annotations

import struct
from collections import deque

import pytest

from ringd.core import wire
from ringd.core.pipeline import (Compute, Deliver, EntryState, Filled, Free, Hidden, Pipeline,
                                 PipelineConfig, Sampled, Send, ServedModel,
                                 tokens_tensor)
from ringd.core.requests import SamplingParams
from ringd.core.route import Route, Stage
from ringd.errors import LocalProtocolError, RequestError

EOS = 0
HIDDEN = 4
ROUTE = Route(5, (Stage("a", 0, 2), Stage("b", 2, 4), Stage("c", 4, 6)), 6)
CFG = PipelineConfig(max_concurrent=2, max_context=64, request_timeout=10.0, max_early=3)
MODEL = ServedModel("m", frozenset({EOS}), prefill_chunk=4)


def hidden(n: int) -> wire.Tensor:
    return wire.Tensor("float16", (1, n, HIDDEN), bytes(2 * n * HIDDEN))


def ids_of(t: wire.Tensor) -> list[int]:
    return list(struct.unpack(f"<{t.shape[0]}i", bytes(t.data)))


def pipeline(node: str, route: Route | None = ROUTE, cfg: PipelineConfig = CFG) -> Pipeline:
    p = Pipeline(node, cfg)
    if route is not None:
        st = route.stage_of(node)
        p.serve(route, (st.start, st.end) if st else None, {}, MODEL, 0.0)
    return p


def act(rid: str = "r", position: int = 0, n: int = 1, *, epoch: int = 5, lo: int = 0,
        hi: int = 2, step: int = 0, final: bool = True, entry: str = "a") -> wire.Activation:
    tensor = hidden(n) if hi > 0 else tokens_tensor(list(range(1, n + 1)))
    return wire.Activation(rid, step, position, epoch, lo, hi, entry, SamplingParams(max_tokens=3),
                           final, tensor)


def of(effects: list, kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


class Sim:
    """Pipelines of every node of a route, an in-memory network, and a compute that makes a
    token from the step (token = 10 + step, EOS at ``eos_at``)."""

    def __init__(self, route: Route = ROUTE, eos_at: int | None = None) -> None:
        self.route = route
        self.nodes = {s.node_id: pipeline(s.node_id, route) for s in route.stages}
        self.net: deque[tuple[str, str, wire.Message]] = deque()
        self.jobs: deque[tuple[str, Compute]] = deque()
        self.delivered: dict[str, list] = {}
        self.freed: dict[str, list[str]] = {n: [] for n in self.nodes}
        self.eos_at = eos_at
        self.now = 0.0

    def collect(self, node: str) -> None:
        for e in self.nodes[node].effects():
            if isinstance(e, Send):
                assert e.node_id != node, "a node never sends to itself through the network"
                self.net.append((node, e.node_id, e.msg))
            elif isinstance(e, Compute):
                self.jobs.append((node, e))
            elif isinstance(e, Free):
                self.freed[node].append(e.request_id)
            elif isinstance(e, Deliver):
                self.delivered.setdefault(e.request_id, []).append(e.item)

    def result(self, node: str, job: Compute):
        stage = self.route.stage_of(node)
        if stage.end < self.route.num_layers:
            n = job.tensor.shape[0] if stage.start == 0 else job.tensor.shape[1]
            return Hidden(hidden(n))
        if not job.final:
            return Filled()
        tok = EOS if self.eos_at == job.step else 10 + job.step
        return Sampled(tok)

    def run(self) -> None:
        for node in self.nodes:
            self.collect(node)
        while self.net or self.jobs:
            while self.net:
                src, dst, msg = self.net.popleft()
                self.nodes[dst].receive(msg, src, self.now)
                self.collect(dst)
            if self.jobs:
                node, job = self.jobs.popleft()
                self.nodes[node].computed(job, self.result(node, job), self.now)
                self.collect(node)


# ------------------------------------------------------------------------ whole requests
def test_a_request_crosses_every_stage_and_streams_its_tokens_to_the_entry():
    sim = Sim()
    entry = sim.nodes["c"]
    entry.open("r", list(range(1, 11)), SamplingParams(max_tokens=3), now=0.0)
    sim.run()
    tokens = sim.delivered["r"]
    assert [t.token_id for t in tokens] == [10, 11, 12]
    assert [t.finish_reason for t in tokens] == [None, None, "length"]
    assert all((t.layer_lo, t.layer_hi, t.epoch) == (0, 6, 5) for t in tokens)
    assert entry.entry("r").state is EntryState.FINISHED
    assert all(p.active_stages == 1 for p in sim.nodes.values())
    entry.close("r", 1.0, done=True)
    sim.run()
    assert sim.freed == {"a": ["r"], "b": ["r"], "c": ["r"]}
    assert all(p.active_stages == 0 and p.active_entries == 0 for p in sim.nodes.values())
    assert entry.counters["requests_served"] == 1 and entry.counters["tokens_delivered"] == 3


def test_the_prompt_goes_in_chunks_and_only_the_last_is_sampled():
    sim = Sim()
    sim.nodes["a"].open("r", list(range(1, 11)), SamplingParams(max_tokens=1), now=0.0)
    computed: list[tuple[str, int, bool, bool]] = []
    for node in sim.nodes:
        sim.collect(node)
    while sim.net or sim.jobs:
        while sim.net:
            src, dst, msg = sim.net.popleft()
            sim.nodes[dst].receive(msg, src, 0.0)
            sim.collect(dst)
        if sim.jobs:
            node, job = sim.jobs.popleft()
            computed.append((node, job.position, job.new, job.final))
            sim.nodes[node].computed(job, sim.result(node, job), 0.0)
            sim.collect(node)
    first = [c for c in computed if c[0] == "a"]
    assert first == [("a", 0, True, False), ("a", 4, False, False), ("a", 8, False, True)]
    assert [t.token_id for t in sim.delivered["r"]] == [10]
    assert sim.delivered["r"][0].finish_reason == "length"


def test_eos_ends_the_request_with_stop():
    sim = Sim(eos_at=1)
    sim.nodes["b"].open("r", [1, 2, 3], SamplingParams(max_tokens=10), now=0.0)
    sim.run()
    assert [(t.token_id, t.finish_reason) for t in sim.delivered["r"]] == [(10, None),
                                                                          (EOS, "stop")]


def test_a_one_stage_ring_runs_entirely_inside_one_pipeline():
    route = Route(1, (Stage("solo", 0, 6),), 6)
    sim = Sim(route)
    p = sim.nodes["solo"]
    p.open("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4), now=0.0)
    sim.run()
    assert not sim.net
    assert [t.token_id for t in sim.delivered["r"]] == [10, 11, 12, 13]
    p.close("r", 0.0, done=True)
    sim.run()
    assert sim.freed["solo"] == ["r"]


def test_the_limit_is_lowered_to_the_room_left_in_the_context():
    sim = Sim()
    cfg_room = CFG.max_context - 62
    sim.nodes["a"].open("r", list(range(1, 63)), SamplingParams(max_tokens=50), now=0.0)
    sim.run()
    assert len(sim.delivered["r"]) == cfg_room == 2


# ------------------------------------------------------------------------ admission
def test_admission_refusals():
    p = pipeline("a")
    with pytest.raises(RequestError) as e:
        p.open("r0", list(range(64)), SamplingParams(), 0.0)
    assert e.value.code == "context_length" and "64 tokens" in e.value.message
    with pytest.raises(RequestError) as e:
        p.open("r0", [], SamplingParams(), 0.0)
    assert e.value.code == "bad_request"
    p.open("r1", [1], SamplingParams(), 0.0)
    with pytest.raises(LocalProtocolError):
        p.open("r1", [1], SamplingParams(), 0.0)
    p.open("r2", [1], SamplingParams(), 0.0)
    with pytest.raises(RequestError) as e:
        p.open("r3", [1], SamplingParams(), 0.0)
    assert e.value.code == "busy" and "max_concurrent = 2" in e.value.message
    p.leaving = True
    with pytest.raises(RequestError) as e:
        p.check_admission()
    assert e.value.code == "leaving"
    idle = pipeline("a", route=None)
    with pytest.raises(RequestError) as e:
        idle.open("r", [1], SamplingParams(), 0.0)
    assert e.value.code == "not_ready"


def test_an_entry_only_node_sends_the_prompt_to_the_first_stage():
    route = Route(5, (Stage("a", 0, 3), Stage("b", 3, 6)), 6)
    p = pipeline("e", route)  # "e" has no layers in this plan
    p.open("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=2), now=0.0)
    sends = of(p.effects(), Send)
    assert [(s.node_id, s.msg.position, s.msg.final) for s in sends] == [("a", 0, False),
                                                                        ("a", 4, True)]
    assert all(s.msg.entry == "e" and s.msg.sampling.max_tokens == 2 for s in sends)
    p.receive(wire.Token("r", 0, 5, 42, 0, 6), "b", 1.0)
    (d,) = of(p.effects(), Deliver)
    assert d.item.token_id == 42
    # an activation sent to it by mistake fails that request, naming the node
    p.receive(act("x", entry="a", hi=3), "a", 1.0)
    (err,) = of(p.effects(), Send)
    assert err.node_id == "a" and err.msg.code == "coverage" and "owns no layers" in err.msg.message


# ------------------------------------------------------------------------ stage rules
def test_activations_ahead_of_their_position_wait_for_the_missing_one():
    p = pipeline("b")
    p.receive(act(position=4, n=2), "a", 0.0)  # overtook the first chunk (TCP vs UDP)
    assert p.effects() == [] and p.counters["early_held"] == 1
    p.receive(act(position=0, n=4), "a", 0.0)
    jobs = of(p.effects(), Compute)
    assert [(j.position, j.new) for j in jobs] == [(0, True), (4, False)]
    assert all(j.end == 4 for j in jobs)


def test_too_many_early_activations_fail_the_request():
    p = pipeline("b")
    for i in range(3):
        p.receive(act(position=10 + i), "a", 0.0)
    assert p.effects() == []
    p.receive(act(position=20), "a", 0.0)
    (err,) = of(p.effects(), Send)
    assert (err.node_id, err.msg.code) == ("a", "internal")
    assert "too many out-of-order" in err.msg.message


def test_a_position_that_came_twice_is_computed_once_never_an_error():
    p = pipeline("b")
    p.receive(act(position=0, n=4), "a", 0.0)
    p.effects()
    p.receive(act(position=0, n=4), "a", 0.0)  # the same frame again (UDP, then TCP)
    p.receive(act(position=3, n=1), "a", 0.0)  # behind the next position
    assert p.effects() == [] and p.counters["duplicates"] == 2 and p.active_stages == 1
    p.receive(act(position=4, n=1), "a", 0.0)
    (job,) = of(p.effects(), Compute)
    assert job.position == 4 and not job.new


def test_an_unknown_request_past_position_zero_and_an_ended_one_are_refused():
    p = pipeline("b")
    p.receive(act("gone", position=0, n=1), "a", 0.0)
    p.receive(wire.Cancel("gone", "cancelled"), "a", 0.0)
    assert of(p.effects(), Free) == [Free("gone")]
    p.receive(act("gone", position=0, n=1), "a", 0.0)
    (err,) = of(p.effects(), Send)
    assert err.msg.code == "cancelled" and "already ended" in err.msg.message


def test_capacity_of_stage_requests_is_bounded():
    p = pipeline("b", cfg=PipelineConfig(max_concurrent=1, max_early=3))
    for i in range(p.config.stage_capacity):
        p.receive(act(f"r{i}"), "a", 0.0)
    p.effects()
    p.receive(act("one-too-many"), "a", 0.0)
    (err,) = of(p.effects(), Send)
    assert err.msg.code == "busy"


def test_a_gap_in_coverage_fails_the_request_naming_the_node():
    p = pipeline("c")
    p.receive(act(hi=2), "a", 0.0)  # layers [2, 4) of node b were skipped
    (err,) = of(p.effects(), Send)
    assert err.node_id == "a" and err.msg.code == "coverage"
    assert "gap, layers [2, 4) (owned by b) were not computed" in err.msg.message
    assert p.counters["coverage_errors"] == 1 and p.active_stages == 0


def test_a_node_that_loaded_other_layers_than_its_stage_refuses_to_compute():
    p = Pipeline("b", CFG)
    p.serve(ROUTE, (3, 4), {}, MODEL, 0.0)
    p.receive(act(), "a", 0.0)
    (err,) = of(p.effects(), Send)
    assert err.msg.code == "coverage" and "holds layers [3, 4)" in err.msg.message


def test_the_sampling_node_refuses_a_step_that_skipped_layers():
    p = Pipeline("c", CFG)
    p.serve(ROUTE, (4, 5), {}, MODEL, 0.0)  # ran one layer fewer than its stage
    p.receive(act(hi=4), "b", 0.0)
    (err,) = of(p.effects(), Send)
    assert err.msg.code == "coverage" and "sample after layers [0, 5)" in err.msg.message


def test_a_duplicate_token_starts_the_next_step_only_once():
    p = pipeline("a")
    p.receive(act(hi=0, entry="c", n=3), "c", 0.0)
    (job,) = of(p.effects(), Compute)
    p.computed(job, Hidden(hidden(3)), 0.0)
    p.effects()
    tok = wire.Token("r", 0, 5, 11, 0, 6)
    p.receive(tok, "c", 1.0)
    p.receive(tok, "c", 1.0)
    jobs = of(p.effects(), Compute)
    assert len(jobs) == 1 and jobs[0].step == 1 and jobs[0].position == 3
    assert ids_of(jobs[0].tensor) == [11]


def test_a_result_for_an_ended_request_is_dropped():
    p = pipeline("b")
    p.receive(act(), "a", 0.0)
    (job,) = of(p.effects(), Compute)
    p.receive(wire.Cancel("r", "cancelled"), "a", 0.0)
    p.effects()
    p.computed(job, Hidden(hidden(1)), 0.0)
    assert p.effects() == []


def test_a_compute_failure_tells_the_entry():
    p = pipeline("b")
    p.receive(act(), "a", 0.0)
    (job,) = of(p.effects(), Compute)
    p.compute_failed(job, "out of memory", 0.0)
    effects = p.effects()
    (err,) = of(effects, Send)
    assert err.msg.code == "internal" and "out of memory" in err.msg.message
    assert of(effects, Free) == [Free("r")]


# ------------------------------------------------------------------------ epochs and serving
def test_an_activation_of_an_older_epoch_is_answered_once_per_request():
    p = pipeline("b")
    for step in range(3):  # one request's steps keep coming: one answer
        p.receive(act("r1", epoch=4, step=step, position=step), "a", 0.0)
    p.receive(act("r2", epoch=3), "a", 0.0)
    errs = of(p.effects(), Send)
    assert [(e.node_id, e.msg.request_id, e.msg.code, e.msg.epoch) for e in errs] == [
        ("a", "r1", "coverage", 4), ("a", "r2", "coverage", 3)]
    assert "node a sent an activation of plan epoch 4 to node b, which serves epoch 5" \
        in errs[0].msg.message
    assert p.counters["stale_epoch"] == 4 and p.active_stages == 0
    for i in range(CFG.remembered):  # the memory of answered requests is bounded
        p.receive(act(f"flood-{i}", epoch=4), "a", 0.0)
    p.effects()
    p.receive(act("r1", epoch=4), "a", 0.0)  # forgotten: answered again
    assert of(p.effects(), Send)[0].msg.request_id == "r1"


def test_an_activation_of_a_newer_epoch_waits_for_this_node_to_serve_it():
    """The ring moved to epoch 6 and the entry's first chunk outran the commit to node b."""
    p = pipeline("b")
    p.receive(act("r", epoch=6), "a", 1.0)
    assert p.effects() == [] and p.get_timer() == 1.0 + CFG.hold_timeout
    p.stop_serving("the ring re-plans", pause=True, now=1.5)
    p.serve(Route(6, ROUTE.stages, 6), (2, 4), {}, MODEL, 2.0)
    (job,) = of(p.effects(), Compute)
    assert (job.request_id, job.epoch) == ("r", 6)
    # one this node never comes to serve is answered when its time is up
    p.receive(act("q", epoch=9), "a", 3.0)
    p.handle_timer(3.0 + CFG.hold_timeout)
    (err,) = of(p.effects(), Send)
    assert (err.msg.request_id, err.msg.epoch) == ("q", 9)
    assert "which serves epoch 6" in err.msg.message


def test_a_token_of_another_epoch_never_reaches_the_request():
    p = pipeline("c")
    p.open("r", [1, 2], SamplingParams(), 0.0)
    p.effects()
    p.receive(wire.Token("r", 0, 4, 7, 0, 6), "c", 1.0)  # an old plan's run of it
    assert p.effects() == [] and p.counters["stale_epoch"] == 1
    assert p.entry("r").state is EntryState.PREFILL


def test_a_token_that_did_not_cross_every_layer_is_never_shown():
    p = pipeline("c")
    p.open("r", [1, 2], SamplingParams(), 0.0)
    p.effects()
    p.receive(wire.Token("r", 0, 5, 7, 0, 4), "b", 1.0)
    (d,) = of(p.effects(), Deliver)
    assert isinstance(d.item, RequestError) and d.item.code == "coverage"


def test_an_activation_for_a_node_that_never_serves_is_answered_not_ready():
    p = pipeline("b", route=None)
    p.receive(act(), "a", 0.0)
    assert p.effects() == []  # it may be about to serve that plan: the message waits
    p.handle_timer(CFG.hold_timeout)
    (err,) = of(p.effects(), Send)
    assert err.msg.code == "not_ready" and "is not serving plan epoch 5" in err.msg.message


def test_stop_serving_fails_running_entries_and_frees_every_cache():
    sim = Sim()
    sim.nodes["c"].open("r", [1, 2, 3], SamplingParams(max_tokens=8), now=0.0)
    for node in sim.nodes:
        sim.collect(node)
    while sim.net:  # the prompt reaches every stage, nothing computed yet
        src, dst, msg = sim.net.popleft()
        sim.nodes[dst].receive(msg, src, 0.0)
        sim.collect(dst)
        while sim.jobs:
            node, job = sim.jobs.popleft()
            sim.nodes[node].computed(job, sim.result(node, job), 0.0)
            sim.collect(node)
        if "r" in sim.delivered:
            break
    for node, p in sim.nodes.items():
        p.stop_serving("node b left the ring")
        sim.collect(node)
    errors = [i for i in sim.delivered["r"] if isinstance(i, RequestError)]
    assert len(errors) == 1 and errors[0].code == "not_ready"
    assert "the ring stopped serving: node b left the ring" in errors[0].message
    assert all(p.active_stages == 0 and p.route is None for p in sim.nodes.values())
    assert all(sim.freed[n] == ["r"] for n in sim.nodes)


def test_an_error_from_a_stage_reaches_the_entry_with_its_code():
    p = pipeline("a")
    p.open("r", [1], SamplingParams(), 0.0)
    p.open("q", [1], SamplingParams(), 0.0)
    p.effects()
    p.receive(wire.Error("r", "busy", "node b holds too many", 5), "b", 1.0)
    p.receive(wire.Error("q", "made-up", "?", 5), "b", 1.0)
    d1, d2 = of(p.effects(), Deliver)
    assert (d1.item.code, d2.item.code) == ("busy", "internal")
    assert d1.item.message == "node b: node b holds too many"


# ------------------------------------------------------------------------ time
def test_an_entry_request_times_out_and_says_so():
    p = pipeline("b")
    p.open("r", [1, 2], SamplingParams(), now=100.0)
    p.effects()
    assert p.get_timer() == 110.0
    p.handle_timer(109.9)
    assert of(p.effects(), Deliver) == []
    p.handle_timer(110.0)
    (d,) = of(p.effects(), Deliver)
    assert d.item.code == "timeout" and "request_timeout (10 s)" in d.item.message
    assert p.entry("r").state is EntryState.FAILED
    p.close("r", 111.0, done=False)
    sends = of(p.effects(), Send)
    assert {s.node_id for s in sends} == {"a", "c"} and all(s.msg.reason == "cancelled"
                                                            for s in sends)
    assert p.counters["requests_failed"] == 1


def test_idle_stage_requests_are_freed_after_request_timeout():
    p = pipeline("b")
    p.receive(act("r1"), "a", 0.0)
    p.receive(act("r2"), "a", 4.0)
    p.effects()
    assert p.get_timer() == 10.0
    p.handle_timer(10.0)
    assert of(p.effects(), Free) == [Free("r1")]
    assert p.get_timer() == 14.0
    p.handle_timer(14.0)
    assert of(p.effects(), Free) == [Free("r2")] and p.get_timer() is None


def test_serve_checks_that_layers_match_the_route():
    p = Pipeline("b", CFG)
    with pytest.raises(LocalProtocolError):
        p.serve(ROUTE, None, {}, MODEL, 0.0)
    with pytest.raises(LocalProtocolError):
        Pipeline("x", CFG).serve(ROUTE, (0, 2), {}, MODEL, 0.0)


def test_messages_name_nodes_by_their_names():
    a, b = "a1b2c3d4e5f60718", "0f1e2d3c4b5a6978"
    route = Route(5, (Stage(a, 0, 3), Stage(b, 3, 6)), 6)
    p = Pipeline(b, CFG)
    p.serve(route, (3, 6), {a: "mac-studio-1", b: "mac-mini"}, MODEL, 0.0)
    p.receive(wire.Activation("r", 0, 0, 5, 0, 2, a, SamplingParams(), True, hidden(1)), a, 0.0)
    (err,) = of(p.effects(), Send)
    assert "node mac-mini (0f1e2d3c) owns layers [3, 6) but received an activation from " \
        "node mac-studio-1 (a1b2c3d4)" in err.msg.message


# ------------------------------------------------------------------------ replay
def step_net(sim: Sim, until) -> None:
    """Run the simulated ring until ``until()`` holds (messages first, then jobs)."""
    for node in sim.nodes:
        sim.collect(node)
    while not until():
        if sim.net:
            src, dst, msg = sim.net.popleft()
            if dst in sim.nodes:
                sim.nodes[dst].receive(msg, src, sim.now)
                sim.collect(dst)
        elif sim.jobs:
            node, job = sim.jobs.popleft()
            if node in sim.nodes:
                sim.nodes[node].computed(job, sim.result(node, job), sim.now)
                sim.collect(node)
        else:
            raise AssertionError("the ring went quiet")


def test_a_paused_request_is_replayed_on_the_next_plan_and_goes_on_where_it_was():
    sim = Sim()
    entry = sim.nodes["c"]
    entry.open("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=6), now=0.0)
    step_net(sim, lambda: len(sim.delivered.get("r", [])) == 3)
    # node b is lost: every node stops serving epoch 5; frames still in flight are stale
    for node, p in sim.nodes.items():
        p.stop_serving("node b left the ring", pause=True, now=1.0)
        sim.collect(node)
    assert entry.entry("r").state is EntryState.PAUSED and not of(sim.delivered["r"],
                                                                   RequestError)
    del sim.nodes["b"]
    new = Route(6, (Stage("a", 0, 3), Stage("c", 3, 6)), 6)
    sim.route = new
    sim.nodes["a"].serve(new, (0, 3), {}, MODEL, 2.0)
    sim.nodes["c"].serve(new, (3, 6), {}, MODEL, 2.0)
    replay = [e for e in sim.nodes["c"].effects() if isinstance(e, Send)]
    # the prompt and the three tokens delivered, as one prefill whose sample is token 3
    assert [ids_of(e.msg.tensor) for e in replay] == [[1, 2, 3, 4], [5, 10, 11, 12]]
    assert {(e.node_id, e.msg.epoch, e.msg.step) for e in replay} == {("a", 6, 3)}
    assert replay[-1].msg.final and replay[-1].msg.sampling.max_tokens == 3
    for e in replay:
        sim.net.append(("c", e.node_id, e.msg))
    sim.run()
    tokens = sim.delivered["r"]
    assert [t.token_id for t in tokens] == [10, 11, 12, 13, 14, 15]  # no gap, no duplicate
    assert [t.step for t in tokens] == list(range(6)) and tokens[-1].finish_reason == "length"
    assert entry.counters["requests_replayed"] == 1


def test_old_plans_errors_do_not_end_a_paused_or_replayed_request():
    p = pipeline("a")
    p.open("r", [1, 2], SamplingParams(), 0.0)
    p.effects()
    p.stop_serving("node b left", pause=True, now=1.0)
    assert p.effects() == [Free("r")]  # its cache here goes; the entry request waits
    p.receive(wire.Error("r", "not_ready", "node b is not serving", 5), "b", 1.1)
    assert p.effects() == []  # paused: an error about the run on epoch 5 changes nothing
    p.serve(Route(6, (Stage("a", 0, 6),), 6), (0, 6), {}, MODEL, 2.0)
    p.effects()
    p.receive(wire.Error("r", "coverage", "late news about epoch 5", 5), "b", 2.1)
    assert of(p.effects(), Deliver) == []
    p.receive(wire.Error("r", "internal", "about the run on epoch 6", 6), "a", 2.2)
    (d,) = of(p.effects(), Deliver)
    assert d.item.code == "internal"


def test_paused_requests_fail_when_the_ring_cannot_serve_again():
    p = pipeline("a")
    p.open("r", [1, 2], SamplingParams(), 0.0)
    p.effects()
    p.stop_serving("node b left", pause=True, now=1.0)
    assert p.get_timer() == CFG.request_timeout  # a paused request still has its deadline
    p.fail_paused("the ring cannot hold the model: add 3.4 GiB")
    (d,) = of(p.effects(), Deliver)
    assert d.item.code == "not_ready" and "add 3.4 GiB" in d.item.message


def test_a_paused_request_fails_when_the_ring_switches_models():
    p = pipeline("a")
    p.open("r", [1, 2], SamplingParams(), 0.0)
    p.effects()
    p.stop_serving("the ring's model changed", pause=True, now=1.0)
    p.serve(ROUTE, (0, 2), {}, ServedModel("other", frozenset({EOS})), 2.0)
    (d,) = of(p.effects(), Deliver)
    assert "switched from model m to other" in d.item.message


def test_tokens_that_overtake_each_other_are_delivered_in_order():
    p = pipeline("b")  # an entry that holds no first or last stage
    p.open("r", [1, 2], SamplingParams(max_tokens=9), 0.0)
    p.effects()
    for step in (0, 2, 1, 1, 3):  # token 2 came before 1 (two channels), 1 came twice
        p.receive(wire.Token("r", step, 5, 20 + step, 0, 6), "c", 1.0)
    delivered = [e.item.step for e in of(p.effects(), Deliver)]
    assert delivered == [0, 1, 2, 3] and p.counters["duplicates"] == 1


def test_no_token_for_step_timeout_fails_the_request_naming_its_nodes():
    p = pipeline("a", cfg=PipelineConfig(step_timeout=5.0, request_timeout=100.0))
    p.open("r", [1, 2], SamplingParams(), now=10.0)
    p.effects()
    assert p.get_timer() == 15.0
    p.receive(wire.Token("r", 0, 5, 7, 0, 6), "c", 12.0)
    p.effects()
    assert p.get_timer() == 17.0  # a token moves the deadline on
    p.handle_timer(17.0)
    (d,) = of(p.effects(), Deliver)
    assert d.item.code == "timeout" and "held by nodes a, b, c (plan epoch 5)" in d.item.message


def test_a_long_prompt_that_moves_is_not_taken_for_a_stuck_ring():
    p = pipeline("a", cfg=PipelineConfig(step_timeout=5.0, request_timeout=100.0))
    p.open("r", list(range(1, 13)), SamplingParams(), now=10.0)  # 3 chunks of 4
    p.effects()
    for t, done in ((14.0, 4), (18.0, 8)):  # the last stage computed a chunk (or a slice)
        p.receive(wire.Progress("r", 5, done), "c", t)
    p.receive(wire.Progress("r", 4, 12), "c", 19.0)  # an old plan's: no news
    p.effects()
    assert p.get_timer() == 23.0 and p.entry("r").state is EntryState.PREFILL
    p.handle_timer(23.0)
    (d,) = of(p.effects(), Deliver)
    assert d.item.code == "timeout"
    assert "the ring computed 8 of its 12 prompt positions" in d.item.message


def test_the_last_stage_reports_each_part_of_a_prompt_that_samples_nothing():
    p = pipeline("c")
    p.receive(act(n=4, lo=0, hi=4, final=False), "b", 1.0)
    (job,) = of(p.effects(), Compute)
    p.computed(job, Filled(), 2.0)
    sends = of(p.effects(), Send)
    assert [(s.node_id, s.msg) for s in sends] == [("a", wire.Progress("r", 5, 4))]
