"""What recording step timings costs a decode step, against the step itself, in one run.

    .venv/bin/python bench/timing_cost.py            # ~1 minute

Per MLX job a node now does, besides the step: the scheduler's bookkeeping (push, pop,
``finished``: queue time, compute time, hand-off time into bounded windows, the running
averages that size prefill slices), the compute-time histogram (``TimedCompute`` ->
``Metrics.observe_compute``, prometheus_client). Every ``TIMINGS_INTERVAL`` seconds it also
summarises the windows (``Runner.timings()``: sorting for p50/p99) and packs them into its
gossip. Measured here with ``timeit`` on the real objects, side by side with a decode step
of the default model on our engine (``ShardEngine``, the kernels every ring node runs), in
this process. Goal: <= 1% of a step.
"""

from __future__ import annotations

import statistics
import sys
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def per_call(fn, n: int) -> float:
    """Best of 5 runs of ``n`` calls, seconds per call."""
    return min(timeit.repeat(fn, number=n, repeat=5)) / n


def main() -> None:
    from ringd.compute.engine import ShardEngine
    from ringd.compute.model_info import inspect_model
    from ringd.compute.store import ensure_default_model
    from ringd.config import Settings
    from ringd.core import wire
    from ringd.core.pipeline import Compute
    from ringd.core.requests import SamplingParams
    from ringd.core.schedule import Scheduler
    from ringd.core.timing import TIMINGS_INTERVAL, StageTimings
    from ringd.net.metrics import Metrics

    model = ensure_default_model(Settings().model_store, progress=print)
    info = inspect_model(model)
    engine = ShardEngine.load(model, 0, info.num_layers)
    ids = list(range(100, 140))
    params = SamplingParams(temperature=0.0, max_tokens=33)
    list(engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=4)))  # warm-up
    steps = []
    for _ in range(3):
        times = []
        for _ in engine.generate(ids, params, ignore_eos=True):
            times.append(time.perf_counter())
        steps.append(statistics.median(b - a for a, b in zip(times, times[1:])))
    step = min(steps)

    hidden = wire.Tensor("float16", (1, 1, info.hidden_size), bytes(2 * info.hidden_size))
    job = Compute("r" * 32, 7, 100, 1, "entry", 10, hidden, False, True, params)
    sched = Scheduler()
    clock = [0.0]

    def one_job() -> None:
        clock[0] += 0.001
        sched.push(job, clock[0])
        j = sched.pop(clock[0])
        sched.finished(j, 0.2, 0.0001, now=clock[0])

    for _ in range(300):  # full windows, as on a node that has run a while
        one_job()
    scheduling = per_call(one_job, 20_000)
    metrics = Metrics(lambda: {})
    observe = per_call(lambda: metrics.observe_compute(0.2, "decode"), 20_000)
    perf = per_call(time.perf_counter, 100_000)  # TimedCompute reads the clock twice

    def summarise() -> None:
        t = StageTimings.read(sched.timings())
        assert t is not None
        t.dump()

    summary = per_call(summarise, 2_000)
    per_step = scheduling + observe + 2 * perf
    # the summary runs once per TIMINGS_INTERVAL, whatever the step rate: at worst per step
    summary_share = summary / max(step, TIMINGS_INTERVAL)
    print(f"decode step of {info.name} on our engine here: {1000 * step:.1f} ms (median of 32 "
          "steps, best of 3 runs)")
    print(f"per MLX job: scheduler bookkeeping {1e6 * scheduling:.2f} µs, compute histogram "
          f"{1e6 * observe:.2f} µs, two clock reads {1e6 * 2 * perf:.2f} µs = "
          f"{1e6 * per_step:.2f} µs = {100 * per_step / step:.4f}% of a step")
    print(f"every {TIMINGS_INTERVAL:g} s: summarising the windows for gossip {1e6 * summary:.1f} µs"
          f" = {100 * summary_share:.4f}% of that interval")
    total = per_step / step + summary_share
    print(f"total {100 * total:.4f}% of a decode step (goal <= 1%: "
          f"{'met' if total <= 0.01 else 'MISSED'}); a step {1000 * step:.0f} ms long here, "
          f"and the cost per step stays the same on a machine whose step is 100x shorter: "
          f"{100 * (per_step / (step / 100) + summary_share):.3f}%")


if __name__ == "__main__":
    main()
