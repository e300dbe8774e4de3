"""A three-node loopback ring against one process holding the whole model, side by side in one run.

    .venv/bin/python bench/ring.py [--tokens 64] [--rounds 4] [--long-prompt 512] [--ttft-rounds 2]
                                   [--concurrency 1,2,4] [--conc-rounds 2]
                                   [--entry first|middle|last] [--cpus LIST]
                                   [--spread]

Starts three real ``ringd`` daemons on 127.0.0.1 (``ringd.localring.LocalRing``, static peers,
budgets 1:2:3 as ``ringctl demo`` uses) on the default model and, in this process, loads the
same model with mlx-lm and with our engine (``ShardEngine``, the kernels every ring node runs).
Everything is greedy on the same prompt token ids. The ring is driven over its HTTP API
(``POST /ringd/generate``) at the ``--entry`` node; times are taken in this process for every
side (wall clock at each token as it arrives).

1. Decode efficiency: ring tokens/s / mlx-lm ``stream_generate`` tokens/s, 64 tokens after a
   short prompt, warm-up first, rounds alternating (mlx-lm, engine, ring). Goal >= 0.97.
   Per side: CPU seconds per decode token; for the ring, each node's compute per step from the
   daemons' ``compute_seconds`` / ``steps_computed`` counters -- what is left of a ring step
   after compute is hops, loop scheduling and the entry's work.
2. Time to first token for a ``--long-prompt``-token prompt: ring / mlx-lm. Goal <= 1.10.
3. Aggregate tokens/s with 1, 2 and 4 concurrent requests on the ring (one thread each,
   streaming): "overall" = all tokens / wall time from the first request sent to the last
   token; "decode window" = tokens that arrived while every request was decoding / that window.
4. Each node's resident memory (RSS and USS, psutil) against the bytes of the layers it
   owns (``compute.loaded_bytes``) and the plan's share (layers + ends + KV for the
   configured context and concurrency), and a no-layers baseline process. Printed, not asserted.

``--stall`` runs another measurement instead (issue 17): a running 200-token stream's
inter-token gaps (p50, p99, max) while another client's 1,000-token prompt prefills, and that
prompt's time to first token, on one node and on the three-node ring, with ``--schedule=fifo``
(each stage runs its MLX jobs whole, in arrival order: the behaviour before decode-first
scheduling) and ``--schedule=decode-first`` side by side, each on a fresh ring. Goals: max
gap <= 3x the stream's p50 gap; the long prompt's time to first token <= 1.25x fifo's.

Other jobs on the machine move wall-clock numbers a lot: every run prints the share of our
CPUs that other processes took ("others", from ``/proc/stat``) and ratios use each side's
best round. ``--cpus LIST`` pins this process before anything starts, so every daemon it
spawns inherits the affinity: the same as running the bench under ``taskset -c LIST``. The
engines size their CPU split from the affinity (``os.sched_getaffinity``), so with one CPU
every side runs the same unsplit kernels. ``--spread`` pins each daemon to one CPU (round
robin, ``taskset -c``): nodes run unsplit, and concurrent requests can keep several nodes
computing at once (pipeline parallelism across requests).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil

from ringd.client import Client
from ringd.localring import LocalNode, LocalRing

DECODE_GOAL = 0.97
TTFT_GOAL = 1.10
TEXT = ("The history of the city begins with a small settlement by the river, where traders "
        "met to exchange grain, salt and cloth. Over the centuries the market grew into a town "
        "with walls, a harbour, a cathedral and a university that drew students from distant "
        "lands. ")
SHORT = "Once upon a time, in a village at the edge of a great forest, there lived"
OTHERS = ("The three most important inventions of the last century were",
          "A recipe for bread starts with flour, water and",
          "In the year 2100, the largest city on Earth will be")
SIDES = ("mlx-lm", "engine", "ring")

BASELINE = """
import sys, psutil, mlx.core as mx
import ringd.daemon, ringd.runner, ringd.net.api, ringd.net.transport, ringd.compute.stage
from ringd.compute.tokenizer import Tokenizer
Tokenizer.load(sys.argv[1]); mx.eval(mx.zeros(16))
m = psutil.Process().memory_full_info()
print(m.rss, m.uss)
"""


# ----------------------------------------------------------------------------- measuring
@dataclass
class Run:
    """One generation timed in this process: token ids and their arrival times."""

    t_start: float
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.t_start

    @property
    def decode_tps(self) -> float:
        n = len(self.times)
        return (n - 1) / (self.times[-1] - self.times[0]) if n > 1 else float("nan")


def timed(tokens: Iterable[int]) -> Run:
    run = Run(time.perf_counter())
    for tok in tokens:
        run.times.append(time.perf_counter())
        run.tokens.append(tok)
    return run


@dataclass(frozen=True)
class Side:
    """One side's decode run: tokens/s, CPU seconds per decode token, others' share."""

    tps: float
    cpu: float
    others: float


class CpuMeter:
    """Who used this bench's CPUs during an interval: our processes (this one and the
    daemons) against everyone (``/proc/stat``, 10 ms ticks)."""

    def __init__(self, pids: list[int]) -> None:
        self.cpus = set(os.sched_getaffinity(0))
        self.procs = [psutil.Process(p) for p in pids]
        self.tick = os.sysconf("SC_CLK_TCK")

    def _read(self) -> tuple[float, float, float]:
        busy = idle = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *vals = line.split()
                if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in self.cpus:
                    v = [int(x) for x in vals[:8]]
                    idle += v[3] + v[4]
                    busy += sum(v) - v[3] - v[4]
        ours = sum(sum(p.cpu_times()[:2]) for p in self.procs)
        return busy / self.tick, idle / self.tick, ours

    def __enter__(self) -> Self:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        self.busy, self.idle, self.ours = (b - a for a, b in zip(self._start, self._read()))

    @property
    def others(self) -> float:
        """Share of our CPUs' time that other processes took."""
        return max(0.0, self.busy - self.ours) / max(1e-9, self.busy + self.idle)

    @property
    def ours_share(self) -> float:
        return self.ours / max(1e-9, self.busy + self.idle)

    @property
    def idle_share(self) -> float:
        return self.idle / max(1e-9, self.busy + self.idle)


@dataclass(frozen=True)
class Snap:
    """Per ring node: (compute seconds, steps computed, CPU seconds), read from status/psutil."""

    nodes: tuple[tuple[float, int, float], ...]

    @classmethod
    def take(cls, nodes: list[LocalNode]) -> Snap:
        out = []
        for n in nodes:
            r = n.client.status()["stats"]["runner"]
            cpu = psutil.Process(n.proc.pid).cpu_times()  # type: ignore[union-attr]
            out.append((r["compute_seconds"], r["steps_computed"], cpu.user + cpu.system))
        return cls(tuple(out))

    def minus(self, other: Snap) -> list[tuple[float, int, float]]:
        return [(a[0] - b[0], a[1] - b[1], a[2] - b[2]) for a, b in zip(self.nodes, other.nodes)]


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


# ----------------------------------------------------------------------------- the sides
def ring_tokens(client: Client, prompt: str, max_tokens: int,
                out: dict[str, Any] | None = None) -> Iterator[int]:
    """Token ids streamed by ``POST /ringd/generate``; the finish event goes into ``out``."""
    events = client.stream_generate({"prompt": prompt, "max_tokens": max_tokens,
                                     "temperature": 0.0})
    try:
        for ev in events:
            if ev.get("type") == "token":
                yield int(ev["token_id"])
            elif ev.get("type") == "finish" and out is not None:
                out.update(ev)
    finally:
        events.close()


def prompt_of_length(tok: Any, n: int) -> tuple[str, list[int]]:
    """A text whose token ids (as the ring's entry encodes it) number ``n`` or just under."""
    words = (TEXT * (n // 20 + 2)).split(" ")
    lo, hi = 1, len(words)
    while lo < hi:  # the longest word prefix with at most n tokens
        mid = (lo + hi + 1) // 2
        if len(tok.encode(" ".join(words[:mid]))) <= n:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo])
    return text, tok.encode(text)


def concurrent_run(client_of: Callable[[], Client], prompts: list[str],
                   max_tokens: int) -> tuple[float, float, int]:
    """All ``prompts`` at once, one thread each: (overall tok/s, decode-window tok/s, tokens)."""
    barrier = threading.Barrier(len(prompts))

    def one(prompt: str) -> Run:
        client = client_of()
        barrier.wait()
        return timed(ring_tokens(client, prompt, max_tokens))

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        runs = list(pool.map(one, prompts))  # re-raises a request's error
    start = min(r.t_start for r in runs)
    end = max(r.times[-1] for r in runs)
    total = sum(len(r.times) for r in runs)
    a = max(r.times[0] for r in runs)  # every request is decoding from here ...
    b = min(r.times[-1] for r in runs)  # ... until the first one ends
    inside = sum(1 for r in runs for t in r.times if a < t <= b)
    window = inside / (b - a) if b > a and inside else float("nan")
    return total / (end - start), window, total


def baseline_memory(model_dir: Path) -> tuple[int, int]:
    """RSS and USS of a process that imports what a daemon imports and loads the tokenizer."""
    out = subprocess.run([sys.executable, "-c", BASELINE, str(model_dir)], capture_output=True,
                         text=True, check=True).stdout.split()
    return int(out[0]), int(out[1])


# ----------------------------------------------------------------------------- the bench
class Bench:
    """The three sides, loaded once; one method per measurement, each printing its part."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, info: Any, tok: Any) -> None:
        import mlx.core as mx
        from mlx_lm import load as mlx_lm_load

        from ringd.compute.engine import ShardEngine

        self.args = args
        self.info = info
        self.tok = tok
        me = psutil.Process()
        rss0 = me.memory_info().rss
        self.ref_model, self.ref_tok = mlx_lm_load(str(model_dir))
        mx.eval(self.ref_model.parameters())
        self.ref_rss = me.memory_info().rss - rss0
        self.engine = ShardEngine.load(model_dir, 0, info.num_layers)
        self.short_ids = tok.encode(SHORT)
        self.nodes: list[LocalNode] = []
        self.spans: list[tuple[int, int]] = []
        self.entry: LocalNode | None = None

    def attach(self, ring: LocalRing, statuses: list[dict[str, Any]]) -> None:
        """Learn the plan: the nodes in ring order and the entry."""
        plan = statuses[0]["plan"]
        by_id = {s["node"]["id"]: node for node, s in zip(ring.nodes, statuses)}
        self.nodes = [by_id[a["node_id"]] for a in plan["assignments"]]
        self.spans = [(a["start"], a["end"]) for a in plan["assignments"]]
        pick = {"first": 0, "middle": len(self.nodes) // 2, "last": -1}[self.args.entry]
        self.entry = self.nodes[pick]
        self.pids = [os.getpid(), *(n.proc.pid for n in self.nodes)]  # type: ignore[union-attr]
        print("plan: " + ", ".join(f"{n.name} layers {a}-{b - 1}"
                                   for n, (a, b) in zip(self.nodes, self.spans))
              + f"; entry {self.entry.name} ({self.args.entry} stage)")

    def client(self) -> Client:
        assert self.entry is not None
        return Client("127.0.0.1", self.entry.http_port, timeout=10.0, stream_timeout=900.0)

    def mlx_lm_tokens(self, ids: list[int], n: int) -> Iterator[int]:
        from mlx_lm import stream_generate

        for r in stream_generate(self.ref_model, self.ref_tok, ids, max_tokens=n):
            yield int(r.token)

    def engine_tokens(self, ids: list[int], n: int) -> Iterator[int]:
        from ringd.core.requests import SamplingParams

        return self.engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=n))

    # ------------------------------------------------------------------- 1. decode
    def decode(self) -> float:
        n_tok, ids, client = self.args.tokens, self.short_ids, self.client()
        print(f"[1] decode: prompt {len(ids)} tokens, {n_tok} tokens, greedy. Each side runs 1 "
              f"token, then {n_tok}; CPU and compute per decode token = the difference / "
              f"{n_tok - 1}. 'others' = share of our CPUs' time other processes took")
        timed(self.mlx_lm_tokens(ids, 8))  # warm-ups
        timed(self.engine_tokens(ids, 8))
        timed(ring_tokens(client, SHORT, 8))
        rounds: list[dict[str, Side]] = []
        per_node: list[list[tuple[float, float]]] = []  # (compute s, CPU s) per token per node
        outputs: dict[str, list[int]] = {}
        for r in range(self.args.rounds):
            got: dict[str, Side] = {}
            for name, run in (("mlx-lm", self.mlx_lm_tokens), ("engine", self.engine_tokens)):
                c0 = time.process_time()
                timed(run(ids, 1))
                c1 = time.process_time()
                with CpuMeter(self.pids) as meter:
                    res = timed(run(ids, n_tok))
                c2 = time.process_time()
                cpu = ((c2 - c1) - (c1 - c0)) / (len(res.tokens) - 1)
                got[name] = Side(res.decode_tps, cpu, meter.others)
                outputs[name] = res.tokens
            s0 = Snap.take(self.nodes)
            c0 = time.process_time()
            timed(ring_tokens(client, SHORT, 1))
            c1 = time.process_time()
            s1 = Snap.take(self.nodes)
            finish: dict[str, Any] = {}
            with CpuMeter(self.pids) as meter:
                res = timed(ring_tokens(client, SHORT, n_tok, finish))
            c2 = time.process_time()
            s2 = Snap.take(self.nodes)
            outputs["ring"] = res.tokens
            d = len(res.tokens) - 1
            one, full = s1.minus(s0), s2.minus(s1)
            nodes = [((f[0] - o[0]) / max(1, f[1] - o[1]), (f[2] - o[2]) / d)
                     for o, f in zip(one, full)]
            client_cpu = ((c2 - c1) - (c1 - c0)) / d
            got["ring"] = Side(res.decode_tps, sum(c for _, c in nodes) + client_cpu, meter.others)
            rounds.append(got)
            per_node.append(nodes)
            print(f"    round {r + 1}: " + "   ".join(
                f"{k} {v.tps:5.2f} tok/s ({1000 * v.cpu:5.1f} CPU-ms/tok, others "
                f"{100 * v.others:2.0f}%)" for k, v in got.items())
                + f"   ring/mlx-lm {got['ring'].tps / got['mlx-lm'].tps:.3f}   [entry says "
                f"{finish.get('tokens_per_second', 0):.2f} tok/s, {len(res.tokens)} tokens]",
                flush=True)
        best = {k: max(rd[k].tps for rd in rounds) for k in SIDES}
        eff = best["ring"] / best["mlx-lm"]
        same = outputs["mlx-lm"] == outputs["engine"] == outputs["ring"]
        print("    best rounds: " + ", ".join(f"{k} {best[k]:.2f} tok/s = {1000 / best[k]:.1f} "
                                              "ms/token" for k in SIDES)
              + "; CPU per token (median): "
              + ", ".join(f"{k} {1000 * median(rd[k].cpu for rd in rounds):.1f} ms" for k in SIDES)
              + f"; same greedy tokens: {same}")
        k = max(range(len(rounds)), key=lambda i: rounds[i]["ring"].tps)
        step = 1 / rounds[k]["ring"].tps
        comp = [c for c, _ in per_node[k]]
        print(f"    ring step in its best round, {1000 * step:.1f} ms: compute (MLX job submitted "
              "-> result on the loop) "
              + " + ".join(f"{n.name}[{a}-{b - 1}] {1000 * c:.1f}"
                           for n, (a, b), c in zip(self.nodes, self.spans, comp))
              + f" = {1000 * sum(comp):.1f} ms; the rest (hops, loop, entry) "
              f"{1000 * (step - sum(comp)):.1f} ms; CPU per token "
              + " + ".join(f"{n.name} {1000 * c:.1f}" for n, (_, c) in zip(self.nodes, per_node[k]))
              + " ms")
        eff_median = median(rd["ring"].tps / rd["mlx-lm"].tps for rd in rounds)
        print(f"    decode efficiency ring / mlx-lm = {eff:.3f} best rounds, {eff_median:.3f} "
              f"median of per-round ratios (goal >= {DECODE_GOAL}); ring / our engine = "
              f"{best['ring'] / best['engine']:.3f}")
        print()
        return eff

    # ------------------------------------------------------------------- 2. TTFT
    def ttft(self) -> float:
        client = self.client()
        long_text, long_ids = prompt_of_length(self.tok, self.args.long_prompt)
        print(f"[2] time to first token, prompt {len(long_ids)} tokens (one prefill chunk on "
              "every side)")
        text64, ids64 = prompt_of_length(self.tok, 64)
        timed(self.mlx_lm_tokens(ids64, 1))  # warm-ups
        timed(self.engine_tokens(ids64, 1))
        timed(ring_tokens(client, text64, 1))
        ttft: dict[str, list[float]] = {k: [] for k in SIDES}
        ratios: list[float] = []
        for r in range(self.args.ttft_rounds):
            meters = []
            for name, run in (("mlx-lm", self.mlx_lm_tokens), ("engine", self.engine_tokens)):
                with CpuMeter(self.pids) as meter:
                    ttft[name].append(timed(run(long_ids, 1)).ttft)
                meters.append(meter)
            s0 = Snap.take(self.nodes)
            finish: dict[str, Any] = {}
            with CpuMeter(self.pids) as meter:
                ttft["ring"].append(timed(ring_tokens(client, long_text, 1, finish)).ttft)
            meters.append(meter)
            nodes = Snap.take(self.nodes).minus(s0)
            ratios.append(ttft["ring"][-1] / ttft["mlx-lm"][-1])
            print(f"    round {r + 1}: " + "   ".join(
                f"{k} {ttft[k][-1]:.2f} s ({m.ours:.1f} CPU-s, others {100 * m.others:2.0f}%)"
                for k, m in zip(SIDES, meters))
                + f"   ring/mlx-lm {ratios[-1]:.3f}   [entry says "
                f"{finish.get('time_to_first_token', 0):.2f} s for {finish.get('prompt_tokens')} "
                "tokens; node compute "
                + " + ".join(f"{n.name} {x[0]:.2f} s" for n, x in zip(self.nodes, nodes)) + "]",
                flush=True)
        ratio = min(ttft["ring"]) / min(ttft["mlx-lm"])
        print(f"    ttft ring / mlx-lm = {ratio:.3f} best rounds, {median(ratios):.3f} median of "
              f"per-round ratios (goal <= {TTFT_GOAL}); ring / our engine = "
              f"{min(ttft['ring']) / min(ttft['engine']):.3f}")
        print()
        return ratio

    # ------------------------------------------------------------------- 3. concurrency
    def concurrency(self, levels: list[int]) -> dict[int, tuple[float, float, int]]:
        assert self.entry is not None
        print(f"[3] concurrent requests on the ring ({self.args.tokens} tokens each, entry "
              f"{self.entry.name}); levels interleaved, {self.args.conc_rounds} round(s), the "
              "best of each level counts")
        prompts = [SHORT, *OTHERS]
        agg: dict[int, tuple[float, float, int]] = {}
        for r in range(self.args.conc_rounds):
            for c in levels:
                with CpuMeter(self.pids) as meter:
                    got = concurrent_run(self.client,
                                         [prompts[i % len(prompts)] for i in range(c)],
                                         self.args.tokens)
                o, w, n = got
                if c not in agg or o > agg[c][0]:
                    agg[c] = got
                print(f"    round {r + 1}, {c} at once: {n} tokens, overall {o:5.2f} tok/s, "
                      f"decode window {w:5.2f} tok/s; of our CPUs' time: ring "
                      f"{100 * meter.ours_share:2.0f}%, others {100 * meter.others:2.0f}%, idle "
                      f"{100 * meter.idle_share:2.0f}%", flush=True)
        base = agg[levels[0]]
        gain = {c: (f", x{o / base[0]:.2f} / x{w / base[1]:.2f} vs {levels[0]}"
                    if c != levels[0] else "") for c, (o, w, _) in agg.items()}
        print("    best: " + ", ".join(f"{c} at once {o:.2f} tok/s overall ({w:.2f} decode window"
                                       f"{gain[c]})" for c, (o, w, _) in agg.items()))
        print()
        return agg

    # ------------------------------------------------------------------- 4. memory
    def memory(self, model_dir: Path, ready_rss: list[int]) -> None:
        from ringd.units import format_size as fs

        base_rss, base_uss = baseline_memory(model_dir)
        print("[4] resident memory per node: right after the ring was ready, and after the runs")
        print(f"    {'node':6s} {'layers':>7s} {'loaded':>10s} {'plan share':>10s} "
              f"{'RSS ready':>10s} {'RSS now':>10s} {'USS now':>10s} {'KV now':>9s} "
              f"{'RSS-loaded':>10s} {'RSS/loaded':>10s} {'RSS/share':>9s}")
        for node, rss_ready in zip(self.nodes, ready_rss):
            st = node.client.status()
            a = next(x for x in st["plan"]["assignments"] if x["node_id"] == st["node"]["id"])
            cs = st["stats"]["compute"]
            loaded = cs["loaded_bytes"]
            mem = psutil.Process(node.proc.pid).memory_full_info()  # type: ignore[union-attr]
            print(f"    {node.name:6s} {a['start']:>3d}-{a['end'] - 1:<3d} {fs(loaded):>10s} "
                  f"{fs(a['bytes']):>10s} {fs(rss_ready):>10s} {fs(mem.rss):>10s} "
                  f"{fs(mem.uss):>10s} {fs(cs['kv_cache_bytes']):>9s} {fs(mem.rss - loaded):>10s} "
                  f"{mem.rss / loaded:10.2f} {mem.rss / a['bytes']:9.2f}")
        print(f"    fixed overhead: a process importing the daemon's modules with the tokenizer "
              f"loaded, no layers: RSS {fs(base_rss)}, USS {fs(base_uss)}")
        print(f"    single process: mlx-lm's whole model added {fs(self.ref_rss)} to this "
              f"process's RSS (model files {fs(self.info.total_bytes)})")


# ----------------------------------------------------------------------------- --stall
STALL_GAP_GOAL = 3.0
STALL_TTFT_GOAL = 1.25


def gaps_stats(times: list[float]) -> tuple[float, float, float]:
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    if not gaps:
        return (float("nan"),) * 3
    return gaps[len(gaps) // 2], gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], gaps[-1]


def stall_case(model_dir: Path, tok: Any, nodes: int, mode: str, args: argparse.Namespace,
               budgets: list[int], extra: tuple[str, ...]) -> dict[str, Any]:
    """One fresh ring: the long prompt alone, then again while a stream runs."""
    long_text, long_ids = prompt_of_length(tok, args.stall_prompt)
    with tempfile.TemporaryDirectory(prefix="ringbench-stall-") as tmp:
        ring = LocalRing(Path(tmp), [sum(budgets)] if nodes == 1 else budgets[:nodes],
                         model_dir.name, model_dir.parent,
                         extra_args=(*extra, f"--schedule={mode}"))
        ring.start(count=nodes)
        try:
            ring.wait_ready(180)
            client = Client("127.0.0.1", ring.nodes[0].http_port, timeout=10.0,
                            stream_timeout=1800.0)
            timed(ring_tokens(client, SHORT, 4))  # warm-up
            alone = timed(ring_tokens(client, long_text, 1)).ttft
            stream: list[float] = []
            started = threading.Event()
            failed: list[BaseException] = []

            def run_stream() -> None:
                try:
                    for _ in ring_tokens(client, SHORT, args.stall_tokens):
                        stream.append(time.perf_counter())
                        if len(stream) == 20:
                            started.set()
                except BaseException as e:  # reported in the row
                    failed.append(e)
                finally:
                    started.set()

            t = threading.Thread(target=run_stream)
            t.start()
            started.wait(600)
            sent = time.perf_counter()
            first = timed(ring_tokens(client, long_text, 1))
            t.join(1800)
            during = [x for x in stream if sent <= x <= first.times[0] + 1e-9]
            p50, p99, worst = gaps_stats(stream)
            schedule = [n.client.status()["stats"]["runner"]["schedule"] for n in ring.nodes]
            return {"nodes": nodes, "mode": mode, "prompt": len(long_ids), "tokens": len(stream),
                    "error": str(failed[0]).splitlines()[0] if failed else None,
                    "p50": p50, "p99": p99, "max": worst, "during": len(during),
                    "ttft": first.times[0] - sent, "alone": alone,
                    "slice": [x["slice_tokens"] for x in schedule]}
        finally:
            ring.stop()


def stall(args: argparse.Namespace, model_dir: Path, tok: Any, budgets: list[int],
          extra: tuple[str, ...]) -> None:
    print(f"[stall] a {args.stall_tokens}-token stream; after its 20th token another client "
          f"sends a {args.stall_prompt}-token prompt (1 token asked); fresh ring per row. "
          "'during' = stream tokens that arrived while that prompt waited for its first token")
    rows = []
    for nodes in (1, 3):
        for mode in ("fifo", "decode-first"):
            r = stall_case(model_dir, tok, nodes, mode, args, budgets, extra)
            rows.append(r)
            print(f"    {nodes} node(s) {mode:12s}: stream gaps p50 {1000 * r['p50']:6.0f} ms, "
                  f"p99 {1000 * r['p99']:6.0f} ms, max {1000 * r['max']:6.0f} ms "
                  f"(max/p50 {r['max'] / r['p50']:5.1f}); {r['during']} tokens during the "
                  f"prefill; long prompt ({r['prompt']} tokens) first token {r['ttft']:6.2f} s, "
                  f"alone {r['alone']:6.2f} s; slice tokens {r['slice']}"
                  + (f"; the stream FAILED after {r['tokens']} tokens: {r['error']}"
                     if r["error"] else ""), flush=True)
    print()
    # under fifo the stream runs undisturbed but for one gap: its p50 is the undisturbed gap
    print("| nodes | schedule | stream p50 | p99 | max | max / p50 | max / undisturbed p50 "
          "| tokens during prefill | long TTFT | TTFT / fifo | TTFT alone |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["nodes"] == r["nodes"] and x["mode"] == "fifo")
        print(f"| {r['nodes']} | {r['mode']} | {1000 * r['p50']:.0f} ms | {1000 * r['p99']:.0f} ms "
              f"| {1000 * r['max']:.0f} ms | {r['max'] / r['p50']:.1f} "
              f"| {r['max'] / base['p50']:.1f} | {r['during']} "
              f"| {r['ttft']:.2f} s | {r['ttft'] / base['ttft']:.2f} | {r['alone']:.2f} s |")
    for r in rows:
        if r["mode"] == "decode-first":
            base = next(x for x in rows if x["nodes"] == r["nodes"] and x["mode"] == "fifo")
            gap, ttft = r["max"] / r["p50"], r["ttft"] / base["ttft"]
            print(f"goals, {r['nodes']} node(s): max gap / p50 {gap:.1f} (<= {STALL_GAP_GOAL}: "
                  f"{'met' if gap <= STALL_GAP_GOAL else 'MISSED'}); TTFT / fifo {ttft:.2f} "
                  f"(<= {STALL_TTFT_GOAL}: {'met' if ttft <= STALL_TTFT_GOAL else 'MISSED'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens per decode run")
    ap.add_argument("--rounds", type=int, default=4, help="decode rounds (mlx-lm, engine, ring)")
    ap.add_argument("--long-prompt", type=int, default=512,
                    help="prompt tokens for the time-to-first-token test")
    ap.add_argument("--ttft-rounds", type=int, default=2)
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--conc-rounds", type=int, default=2, help="rounds of the concurrency levels")
    ap.add_argument("--entry", choices=("first", "middle", "last"), default="first",
                    help="which ring stage's node takes the requests")
    ap.add_argument("--cpus", default=None,
                    help="pin this process, and so every daemon it starts, to these CPUs "
                         "(e.g. 1 or 0,1): the same as running under `taskset -c LIST`")
    ap.add_argument("--spread", action="store_true",
                    help="pin each daemon to one of this process's CPUs, round robin (taskset): "
                         "every node runs unsplit on one core, and concurrent requests can "
                         "keep several nodes busy at once")
    ap.add_argument("--stall", action="store_true",
                    help="instead: stream gaps while another prompt prefills, fifo against "
                         "decode-first scheduling, on one node and on three")
    ap.add_argument("--stall-tokens", type=int, default=200)
    ap.add_argument("--stall-prompt", type=int, default=1000)
    args = ap.parse_args()
    if args.cpus:  # before any thread or child exists: all of them inherit it
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]

    import mlx.core as mx

    from ringd.compute.model_info import inspect_model
    from ringd.compute.store import ensure_default_model
    from ringd.compute.tokenizer import Tokenizer
    from ringd.config import Settings
    from ringd.units import format_size
    from ringd.core.plan import model_shape
    from ringd.localring import demo_budgets

    settings = Settings()
    model_dir = ensure_default_model(settings.model_store, progress=print)
    info = inspect_model(model_dir)
    context = max(2048, args.long_prompt + args.tokens + 64, args.stall_prompt + 64)
    concurrency = max(4, *levels)
    budgets = demo_budgets(model_shape(info, Settings(max_context=context,
                                                      max_concurrent=concurrency)).total_bytes, 3)
    print(f"model {info.name}: {info.num_layers} layers, {format_size(info.total_bytes)}; "
          f"{mx.default_device()} on {platform.machine()}, {os.cpu_count()} CPUs; this process "
          f"and the daemons on CPUs {sorted(os.sched_getaffinity(0))}; daemons: max_context "
          f"{context}, max_concurrent {concurrency}; load average {os.getloadavg()[0]:.1f}")
    if args.stall:
        # step_timeout raised: under fifo the stream's next step waits for the whole prefill,
        # longer than the default 120 s on this CPU (that failure is the point of decode-first;
        # here both runs must finish to be compared)
        stall(args, model_dir, Tokenizer.load(model_dir), budgets,
              (f"--max-context={context}", f"--max-concurrent={concurrency}",
               "--step-timeout=1800", "--request-timeout=3600"))
        return
    bench = Bench(args, model_dir, info, Tokenizer.load(model_dir))

    spread = [str(c) for c in sorted(os.sched_getaffinity(0))] if args.spread else []
    if spread:
        print("daemons pinned round robin to CPUs " + ", ".join(spread) + " (taskset -c): one CPU "
              "per node, while mlx-lm and the engine here have them all, so [1] and [2] are not "
              "like for like in this mode; it is for [3]")
    with tempfile.TemporaryDirectory(prefix="ringbench-") as tmp:
        ring = LocalRing(Path(tmp), budgets, settings.model, settings.model_store, cpus=spread,
                         extra_args=(f"--max-context={context}", f"--max-concurrent={concurrency}",
                                     f"--prefill-chunk={max(512, args.long_prompt)}"))
        t0 = time.monotonic()
        ring.start()
        try:
            statuses = ring.wait_ready(180)
            print(f"ring ready in {time.monotonic() - t0:.1f} s; the engine in this process splits "
                  f"projections over {bench.engine.cpu_split} CPU stream(s), each daemon over as "
                  "many as it has CPUs")
            bench.attach(ring, statuses)
            ready_rss = [psutil.Process(n.proc.pid).memory_info().rss  # type: ignore[union-attr]
                         for n in bench.nodes]
            print()
            eff = bench.decode()
            ratio = bench.ttft()
            agg = bench.concurrency(levels)
            bench.memory(model_dir, ready_rss)
        finally:
            codes = ring.stop()
    print()
    print(f"summary (load average now {os.getloadavg()[0]:.1f})")
    print(f"  decode efficiency  ring / mlx-lm  {eff:6.3f}   goal >= {DECODE_GOAL}  "
          f"{'met' if eff >= DECODE_GOAL else 'MISSED'}")
    print(f"  time to 1st token  ring / mlx-lm  {ratio:6.3f}   goal <= {TTFT_GOAL}  "
          f"{'met' if ratio <= TTFT_GOAL else 'MISSED'}")
    print("  aggregate tok/s    " + "   ".join(f"{c}: {o:.2f} ({w:.2f} decode window)"
                                               for c, (o, w, _) in agg.items()))
    print(f"  daemons stopped, exit codes {codes}")


if __name__ == "__main__":
    main()
