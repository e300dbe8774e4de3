"""Which MLX job runs next: decode steps before prefill slices, without starving the prefill."""

from __future__ import annotations

import struct

import pytest

from ringd.core import wire
from ringd.core.pipeline import Compute
from ringd.core.requests import SamplingParams
from ringd.core.schedule import ScheduleConfig, Scheduler, cut, is_decode, tokens_of
from ringd.errors import LocalProtocolError


def ids_tensor(ids: list[int]) -> wire.Tensor:
    return wire.Tensor("int32", (len(ids),), struct.pack(f"<{len(ids)}i", *ids))


def hidden_tensor(n: int, width: int = 3) -> wire.Tensor:
    values = [float(i) for i in range(n * width)]
    return wire.Tensor("float32", (1, n, width), struct.pack(f"<{len(values)}f", *values))


def job(rid: str, n: int, *, position: int = 0, step: int = 0, new: bool = True,
        final: bool = True, hidden: bool = False) -> Compute:
    tensor = hidden_tensor(n) if hidden else ids_tensor(list(range(position, position + n)))
    return Compute(rid, step, position, 1, "entry", 4, tensor, new, final, SamplingParams())


def decode(rid: str, step: int, position: int) -> Compute:
    return job(rid, 1, position=position, step=step, new=False)


def drain(s: Scheduler, now: float = 0.0) -> list[Compute]:
    out = []
    while (j := s.pop(now)) is not None:
        out.append(j)
    return out


def test_a_waiting_decode_step_goes_before_the_next_slice_of_a_long_prompt() -> None:
    s = Scheduler(ScheduleConfig(slice_tokens=100))
    s.push(job("long", 1000), 0.0)  # arrived first
    s.push(decode("stream", 7, 50), 0.1)
    assert s.pop(0.2).request_id == "stream"
    first = s.pop(0.2)
    assert (first.request_id, tokens_of(first), first.position) == ("long", 100, 0)
    # the stream's next step arrives while the slice runs: it goes before the next slice
    s.push(decode("stream", 8, 51), 0.3)
    assert s.pop(0.4).request_id == "stream"
    assert (s.pop(0.4).position, s.queued) == (100, 1)


def test_a_long_prompt_still_moves_one_slice_per_round_of_decode_steps() -> None:
    s = Scheduler(ScheduleConfig(slice_tokens=100))
    s.push(job("long", 1000), 0.0)
    streams = {"a": 10, "b": 20, "c": 30}
    for rid, pos in streams.items():
        s.push(decode(rid, 0, pos), 0.0)
    order = []
    while s.queued:
        j = s.pop(1.0)
        order.append(j.request_id)
        if j.request_id in streams:  # each stream's next step is ready as soon as it ran
            streams[j.request_id] += 1
            s.push(decode(j.request_id, 0, streams[j.request_id]), 1.0)
        if order.count("long") == 10:
            break
    # one slice after every round in which each stream had one step
    rounds = "".join("L" if r == "long" else "." for r in order)
    assert rounds == "...L" * 10


def test_slices_of_one_prompt_cover_it_in_order_and_only_the_last_one_is_final() -> None:
    s = Scheduler(ScheduleConfig(slice_tokens=64))
    whole = job("p", 200, position=30, step=0, new=True, final=True, hidden=True)
    s.push(whole, 0.0)
    parts = drain(s)
    assert [tokens_of(p) for p in parts] == [64, 64, 64, 8]
    assert [p.position for p in parts] == [30, 94, 158, 222]
    assert [p.new for p in parts] == [True, False, False, False]
    assert [p.final for p in parts] == [False, False, False, True]
    assert b"".join(bytes(p.tensor.data) for p in parts) == bytes(whole.tensor.data)
    assert all(p.tensor.shape == (1, tokens_of(p), 3) for p in parts)


def test_a_prompt_alone_on_the_node_runs_unsliced() -> None:
    s = Scheduler(ScheduleConfig(slice_tokens=10))
    s.push(job("p", 100), 0.0)
    assert tokens_of(s.pop(0.0, alone=True)) == 100
    s.push(job("p", 100), 0.0)
    s.push(decode("q", 1, 5), 0.0)  # another request queued here: slices again
    assert [tokens_of(j) for j in drain(s)][:2] == [1, 10]


def test_token_id_prompts_are_cut_along_their_only_axis() -> None:
    head, rest = cut(job("p", 10), 4)
    assert head.tensor.shape == (4,) and rest is not None and rest.tensor.shape == (6,)
    assert struct.unpack("<6i", bytes(rest.tensor.data)) == tuple(range(4, 10))
    assert cut(job("p", 10), 10) == (job("p", 10), None)


def test_a_requests_own_jobs_never_change_order() -> None:
    s = Scheduler(ScheduleConfig(slice_tokens=8))
    s.push(job("r", 20, final=False), 0.0)  # a first chunk
    s.push(job("r", 20, position=20, new=False), 0.0)  # the last chunk
    s.push(decode("other", 3, 9), 0.0)
    positions = [j.position for j in drain(s) if j.request_id == "r"]
    assert positions == sorted(positions) == [0, 8, 16, 20, 28, 36]


def test_a_dropped_request_runs_no_more_slices() -> None:
    s = Scheduler(ScheduleConfig(slice_tokens=10))
    s.push(job("gone", 100), 0.0)
    s.push(job("stays", 5), 0.0)
    assert s.pop(0.0).request_id == "gone"
    assert s.drop("gone") == 1  # its rest, whatever its size, is one queued job
    assert [j.request_id for j in drain(s)] == ["stays"]
    assert s.timings()["dropped"] == 1


def test_the_slice_takes_about_one_and_a_half_decode_steps_here() -> None:
    s = Scheduler(ScheduleConfig())
    assert s.slice_tokens() == ScheduleConfig().first_slice  # nothing measured yet
    s.finished(decode("a", 1, 5), 0.100, 0.001, now=1.0)
    s.finished(job("b", 100), 1.0, 0.001, now=2.0)  # 10 ms per prompt token
    assert s.slice_tokens() == 15
    # a faster prefill per token: bigger slices, within the bound
    s2 = Scheduler(ScheduleConfig(max_slice=256))
    s2.finished(decode("a", 1, 5), 0.1, 0.0, now=0.0)
    s2.finished(job("b", 1000), 0.01, 0.0, now=0.0)
    assert s2.slice_tokens() == 256


def test_fifo_runs_whole_jobs_in_arrival_order() -> None:
    s = Scheduler(ScheduleConfig(mode="fifo", slice_tokens=10))
    s.push(job("long", 1000), 0.0)
    s.push(decode("stream", 1, 5), 1.0)
    got = drain(s, 2.0)
    assert [(j.request_id, tokens_of(j)) for j in got] == [("long", 1000), ("stream", 1)]
    assert is_decode(got[1]) and not is_decode(got[0])


def test_timings_report_percentiles_over_the_window() -> None:
    s = Scheduler(ScheduleConfig())
    assert s.timings()["queued_ms"] is None and s.timings()["steps"] == 0
    for i in range(10):
        s.push(decode("a", i, i), float(i))
        j = s.pop(float(i) + 0.5)
        s.finished(j, 0.2, 0.001, now=float(i) + 0.7)
    t = s.timings()
    assert t["steps"] == 10 and t["window_s"] == pytest.approx(9.0)
    assert t["queued_ms"] == {"p50": 500.0, "p99": 500.0}
    assert t["decode_step_ms"]["p50"] == 200.0 and t["handoff_ms"]["p99"] == 1.0


@pytest.mark.parametrize("bad", [dict(mode="lifo"), dict(slice_tokens=-1),
                                 dict(slice_steps=0), dict(first_slice=0)])
def test_bad_settings_are_refused(bad) -> None:
    with pytest.raises(LocalProtocolError):
        ScheduleConfig(**bad)
