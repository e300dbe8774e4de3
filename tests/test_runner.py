"""The request path's adapter: effects carried out on the event loop, with a stand-in for the
MLX thread's shard and real pipeline decisions."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from types import SimpleNamespace

import pytest

from ringd.config import Settings
from ringd.core import wire
from ringd.core.pipeline import (Compute, Filled, Hidden, Pipeline, PipelineConfig, Sampled,
                                 ServedModel)
from ringd.core.requests import GenerationRequest, SamplingParams
from ringd.core.route import Route, Stage, prefill_chunk_tokens
from ringd.core.schedule import ScheduleConfig, tokens_of
from ringd.core.stream import TCP_MAX_FRAME
from ringd.errors import RequestError
from ringd.runner import Runner, pipeline_config, served_model


class Words:
    """A tokenizer whose token i is the word w<i>."""

    def encode(self, text: str) -> list[int]:
        return [int(w[1:]) for w in text.split()]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(" ".join(m["content"] for m in messages))

    def new_decoder(self):
        return SimpleNamespace(add=lambda t: f" w{t}", flush=lambda: "")


class Shard:
    """Stands in for StageCompute: records jobs and frees; the next token is 1 + the last."""

    def __init__(self, layers: tuple[int, int], last: bool, fail_on: int | None = None,
                 gate: threading.Event | None = None) -> None:
        self.layers = layers
        self.last = last
        self.fail_on = fail_on
        self.gate = gate  # prompt slices wait for it (the test holds one in flight)
        self.slice_running = threading.Event()
        self.jobs: list[Compute] = []
        self.freed: list[str] = []

    def step(self, job: Compute):
        self.jobs.append(job)
        if self.gate is not None and tokens_of(job) > 1:
            self.slice_running.set()
            self.gate.wait(10)
        if job.step == self.fail_on:
            raise RuntimeError("the GPU fell over")
        if not self.last:
            return Hidden(wire.Tensor("float16", (1, 1, 2), bytes(4)))
        if not job.final:
            return Filled()
        return Sampled(100 + job.step)

    def free(self, rid: str) -> None:
        self.freed.append(rid)


@pytest.fixture
def executor():
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        yield ex


def solo(executor, shard: Shard, *, cfg: PipelineConfig = PipelineConfig(), sent=None,
         on_send=None, schedule: ScheduleConfig = ScheduleConfig()) -> Runner:
    def send(node: str, msg: wire.Message) -> None:
        if sent is not None:
            sent.append((node, msg))
        if on_send is not None:
            on_send(msg)

    pipeline = Pipeline("n1", cfg)
    return Runner(pipeline, executor=executor, send=send, schedule=schedule,
                  not_ready_reason=lambda: "node n2 is loading layers 3-5")


MODEL = ServedModel("m", frozenset({0}), prefill_chunk=512)


def serve(runner: Runner, route: Route, shard) -> None:
    runner.serve(route, shard, {}, MODEL, Words())  # type: ignore[arg-type]


async def test_a_one_stage_ring_streams_text_and_frees_the_cache(executor) -> None:
    shard = Shard((0, 6), last=True)
    runner = solo(executor, shard)
    serve(runner, Route(1, (Stage("n1", 0, 6),), 6), shard)
    events = [ev async for ev in runner.generate(GenerationRequest(
        prompt="w5 w6 w7", params=SamplingParams(max_tokens=3)))]
    assert "".join(e.text for e in events[:-1]) == " w100 w101 w102"
    finish = events[-1]
    assert (finish.reason, finish.prompt_tokens, finish.completion_tokens) == ("length", 3, 3)
    await runner.idle.wait()
    await asyncio.get_running_loop().run_in_executor(executor, lambda: None)
    assert len(shard.freed) == 1 and runner.pipeline.active_stages == 0
    assert [j.step for j in shard.jobs] == [0, 1, 2] and shard.jobs[0].new
    assert runner.status()["requests_served"] == 1


async def test_the_client_going_away_cancels_on_every_node(executor) -> None:
    sent: list[tuple[str, wire.Message]] = []
    forwarded = asyncio.Event()
    shard = Shard((0, 3), last=False)
    runner = solo(executor, shard, sent=sent,
                  on_send=lambda m: forwarded.set() if isinstance(m, wire.Activation) else None)
    route = Route(1, (Stage("n1", 0, 3), Stage("n2", 3, 6)), 6)
    serve(runner, route, shard)
    gen = runner.generate(GenerationRequest(prompt="w1 w2", params=SamplingParams(max_tokens=9)))
    first = asyncio.ensure_future(anext(gen))
    await asyncio.wait_for(forwarded.wait(), 10)  # the prefill computed here went on to n2
    rid = sent[0][1].request_id
    runner.receive(wire.Token(rid, 0, 1, 100, 0, 6), "n2")
    assert (await first).text == " w100"
    await gen.aclose()  # the client went away
    cancels = [(n, m.reason) for n, m in sent if isinstance(m, wire.Cancel)]
    assert cancels == [("n2", "cancelled")]
    await asyncio.get_running_loop().run_in_executor(executor, lambda: None)
    assert shard.freed == [rid] and runner.status()["requests_cancelled"] == 1


async def test_a_compute_failure_ends_the_request_with_its_reason(executor) -> None:
    shard = Shard((0, 6), last=True, fail_on=1)
    runner = solo(executor, shard)
    serve(runner, Route(1, (Stage("n1", 0, 6),), 6), shard)
    with pytest.raises(RequestError) as e:
        async for _ in runner.generate(GenerationRequest(prompt="w1", params=SamplingParams())):
            pass
    assert e.value.code == "internal" and "the GPU fell over" in e.value.message
    assert runner.status()["requests_failed"] == 1


async def test_not_ready_says_what_the_ring_waits_for(executor) -> None:
    runner = solo(executor, Shard((0, 6), last=True))
    with pytest.raises(RequestError) as e:
        await anext(runner.generate(GenerationRequest(prompt="w1")))
    assert e.value.code == "not_ready"
    assert e.value.message == "the ring is not ready: node n2 is loading layers 3-5"


async def test_the_timer_times_a_silent_request_out(executor) -> None:
    runner = solo(executor, Shard((0, 3), last=False), cfg=PipelineConfig(request_timeout=0.2),
                  sent=[])
    route = Route(1, (Stage("n1", 0, 3), Stage("n2", 3, 6)), 6)
    serve(runner, route, Shard((0, 3), last=False))
    with pytest.raises(RequestError) as e:
        await asyncio.wait_for(anext(runner.generate(GenerationRequest(prompt="w1"))), 5)
    assert e.value.code == "timeout"


def test_prompts_go_in_chunks_whose_activations_fit_one_frame(caplog) -> None:
    """prefill_chunk = 4096 on a 405B-shaped model (hidden 16384, bfloat16) would make 128 MiB
    activation frames, which every peer refuses: the chunk is lowered, and a warning says so."""
    info = SimpleNamespace(hidden_size=16384, activation_dtype="bfloat16")
    settings = Settings(prefill_chunk=4096, max_context=8192)
    model = served_model(settings, SimpleNamespace(**vars(info), name="m", eos_token_ids=(0,)))
    assert "prompts go in chunks of" in caplog.text
    fit = prefill_chunk_tokens(4096, 16384, 2, TCP_MAX_FRAME)
    assert model.prefill_chunk == fit and fit * 16384 * 2 < TCP_MAX_FRAME < 4096 * 16384 * 2
    p = Pipeline("e", pipeline_config(settings))
    p.serve(Route(3, (Stage("n1", 0, 10), Stage("n2", 10, 20)), 20), None, {}, model, 0.0)
    p.open("r", list(range(5000)), SamplingParams(), 0.0)
    sent = [e.msg for e in p.effects()]
    sizes = [m.tensor.shape[0] for m in sent]
    assert sizes == [fit] * (5000 // fit) + [5000 % fit] and sum(sizes) == 5000
    assert [m.final for m in sent] == [False] * (len(sent) - 1) + [True]


async def test_beyond_max_concurrent_requests_wait_in_order_then_busy(executor) -> None:
    sent: list[tuple[str, wire.Message]] = []
    runner = solo(executor, Shard((0, 3), last=False), sent=sent,
                  cfg=PipelineConfig(max_concurrent=1))
    runner.admission.max_queued = 1
    route = Route(1, (Stage("n1", 0, 3), Stage("n2", 3, 6)), 6)  # n2 never answers
    serve(runner, route, Shard((0, 3), last=False))
    first = runner.generate(GenerationRequest(prompt="w1"))
    held = asyncio.ensure_future(anext(first))
    await asyncio.sleep(0)
    while runner.pipeline.active_entries == 0:
        await asyncio.sleep(0.01)  # tokenizing on a worker thread
    second = runner.generate(GenerationRequest(prompt="w2"))
    waiting = asyncio.ensure_future(anext(second))
    while runner.status()["queued"] == 0:
        await asyncio.sleep(0.01)
    with pytest.raises(RequestError) as e:  # the queue is full
        await anext(runner.generate(GenerationRequest(prompt="w3")))
    assert e.value.code == "busy" and "1 more requests wait (max_queued = 1)" in e.value.message
    assert not waiting.done()
    held.cancel()  # the first ends (its client went away): the second takes its place
    with contextlib.suppress(asyncio.CancelledError):
        await held
    while runner.pipeline.active_entries == 0:
        await asyncio.sleep(0.01)
    assert runner.status()["queued"] == 0 and not waiting.done()
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


async def test_during_a_replan_new_requests_wait_for_the_new_plan(executor) -> None:
    shard = Shard((0, 6), last=True)
    runner = solo(executor, shard)
    route = Route(1, (Stage("n1", 0, 6),), 6)
    serve(runner, route, shard)
    runner.stop_serving("node n2 left the ring", pause=True)
    gen = runner.generate(GenerationRequest(prompt="w1", params=SamplingParams(max_tokens=2)))
    first = asyncio.ensure_future(anext(gen))
    while runner.status()["queued"] == 0:
        await asyncio.sleep(0.01)
    serve(runner, Route(2, (Stage("n1", 0, 6),), 6), shard)
    assert (await first).text == " w100"
    await gen.aclose()
    # not re-planning: the refusal comes at once
    runner.stop_serving("this node is shutting down")
    with pytest.raises(RequestError) as e:
        await anext(runner.generate(GenerationRequest(prompt="w1")))
    assert e.value.code == "not_ready"


WORDS = " ".join(f"w{i}" for i in range(100))


async def test_a_long_prompt_runs_in_slices_between_a_streams_decode_steps(executor) -> None:
    shard = Shard((0, 6), last=True)
    runner = solo(executor, shard, schedule=ScheduleConfig(slice_tokens=8))
    serve(runner, Route(1, (Stage("n1", 0, 6),), 6), shard)
    stream = runner.generate(GenerationRequest(prompt="w1",
                                               params=SamplingParams(max_tokens=10_000)))
    assert (await anext(stream)).text == " w100"
    long = [ev async for ev in runner.generate(GenerationRequest(
        prompt=WORDS, params=SamplingParams(max_tokens=1)))]
    assert (await anext(stream)).text == " w101"  # the stream went on, in order
    await stream.aclose()
    assert long[0].text == " w100" and long[-1].prompt_tokens == 100
    kinds = "".join("P" if tokens_of(j) > 1 else "." for j in shard.jobs)
    # 13 slices of the prompt (100 = 12 * 8 + 4), each after one step of the stream
    assert kinds.count("P") == 13 and "PP" not in kinds, kinds
    prompt_jobs = [j for j in shard.jobs if j.request_id != shard.jobs[0].request_id]
    assert [j.position for j in prompt_jobs] == list(range(0, 100, 8))
    assert [j.final for j in prompt_jobs] == [False] * 12 + [True]


async def test_fifo_runs_the_long_prompt_whole(executor) -> None:
    shard = Shard((0, 6), last=True)
    runner = solo(executor, shard, schedule=ScheduleConfig(mode="fifo", slice_tokens=8))
    serve(runner, Route(1, (Stage("n1", 0, 6),), 6), shard)
    [ev async for ev in runner.generate(GenerationRequest(
        prompt=WORDS, params=SamplingParams(max_tokens=1)))]
    assert [tokens_of(j) for j in shard.jobs] == [100]


async def test_a_prompt_whose_client_left_stops_after_the_slice_that_runs(executor) -> None:
    gate = threading.Event()
    shard = Shard((0, 6), last=True, gate=gate)
    runner = solo(executor, shard, schedule=ScheduleConfig(slice_tokens=8))
    serve(runner, Route(1, (Stage("n1", 0, 6),), 6), shard)

    async def consume() -> None:
        async for _ in runner.generate(GenerationRequest(
                prompt=WORDS, params=SamplingParams(max_tokens=5))):
            pass

    # another stream runs here (alone, a prompt would run unsliced)
    other = runner.generate(GenerationRequest(prompt="w1",
                                              params=SamplingParams(max_tokens=10_000)))
    await anext(other)
    task = asyncio.ensure_future(consume())
    try:
        assert await asyncio.to_thread(shard.slice_running.wait, 10)
        task.cancel()  # the client went away while the first slice computes
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        gate.set()
    await anext(other)  # the MLX thread moved on
    await other.aclose()
    await asyncio.get_running_loop().run_in_executor(executor, lambda: None)
    assert [tokens_of(j) for j in shard.jobs if tokens_of(j) > 1] == [8]  # one of 13 slices
    assert len(shard.freed) == 2 and runner.status()["requests_cancelled"] == 2
