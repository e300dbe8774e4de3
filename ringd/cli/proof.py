"""``ringctl verify`` and ``ringctl bench``: is the ring right, and is its speed possible?

``verify`` runs a fixed prompt through the ring with the logits of every step attached
(``POST /ringd/verify``), computes the same steps here from the local model files one block
of layers at a time (:mod:`ringd.compute.reference`), and compares: exit 0 on a match, 1 on a
mismatch (or a ring that fails the request). ``bench`` runs greedy tokens through the ring and
judges the measured rate against the ring's ceiling (``Status.ceiling``): exit 1 when a
rate is above it (impossible: layers were not run). Other exit codes: ``ringctl --help``.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import click

from ringd.cli.common import Command, client_from, daemon_options, read_status, settings_from
from ringd.core.proof import IMPOSSIBLE_HINT, StageLoad, rate_verdict, ring_ceiling
from ringd.core.timing import TIMINGS_INTERVAL, Breakdown, StageStep, StageTimings, breakdown
from ringd.errors import ErrorCode, ExitCode, RequestError
from ringd.status import Status

VERIFY_PROMPT = "The capital of France is Paris. The capital of Italy is"
BENCH_PROMPT = "Once upon a time, in a ring of machines that passed numbers to each other,"


def _not_ready(status: Status) -> RequestError:
    return RequestError(ErrorCode.NOT_READY,
                        "the ring is not ready: " + (status.reason or "no reason given"),
                        hint="`ringctl status` shows what the ring is waiting for")


def _stages_text(stages: list[dict[str, Any]]) -> str:
    return ", ".join(f"{s.get('name')} layers {s.get('start')}-{int(s.get('end', 0)) - 1}"
                     for s in stages)


# ----------------------------------------------------------------------------- verify
@click.command(cls=Command)
@click.option("--prompt", default=VERIFY_PROMPT, show_default=True,
              help="Raw prompt (no chat template).")
@click.option("--steps", type=click.IntRange(1, 32), default=8, show_default=True,
              help="Generated tokens whose logits are compared.")
@click.option("--block-bytes", default=None,
              help="Most weight bytes the reference loads at once (e.g. 8GiB). "
                   "Default: half of this machine's usable memory.")
@click.option("--store", type=click.Path(file_okay=False), default=None,
              help="Model store directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@daemon_options
@click.pass_context
def verify(ctx: click.Context, prompt: str, steps: int, block_bytes: str | None, store: str | None,
           as_json: bool, host: str | None, port: int | None) -> None:
    """Check the ring's logits against this machine's own run of the model (exit 0: match)."""
    import numpy as np

    from ringd.compute.memory import usable_memory
    from ringd.compute.reference import compare, reference_logits
    from ringd.compute.store import resolve_model
    from ringd.compute.tokenizer import Tokenizer
    from ringd.units import format_size, parse_size

    s = settings_from(ctx, http_host=host, http_port=port, model_store=store)
    client = client_from(ctx, host, port)
    status = read_status(client)
    if not status.ready or status.model is None:
        raise _not_ready(status)
    model_dir = resolve_model(s.model_store, status.model.name)
    budget = (parse_size(block_bytes, what="--block-bytes") if block_bytes
              else usable_memory(s.memory_reserve)[0] // 2)
    try:
        trace = client.post_json("/ringd/verify", {"prompt": prompt, "steps": steps},
                                 s.request_timeout + 60.0)
    except RequestError as e:
        # The ring refused to produce a token (a coverage error names the nodes): that is a failure.
        out = {"match": False, "ring_error": {"code": e.code, "message": e.message}}
        click.echo(json.dumps(out) if as_json
                   else f"mismatch: the ring failed the request: {e.message}")
        raise SystemExit(int(ExitCode.FAILURE)) from None
    ring = np.stack([np.frombuffer(base64.b64decode(x), dtype="<f4") for x in trace["logits"]])
    tokens, prompt_ids = trace["tokens"], trace["prompt_ids"]
    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    say(f"ring: {_stages_text(trace['stages'])} (plan epoch {trace['epoch']})")
    say(f"reference: {model_dir}, at most {format_size(budget)} of weights at a time")
    ref = reference_logits(model_dir, prompt_ids, tokens, block_bytes=budget, progress=say)
    v = compare(ring, ref, tokens)
    if as_json:
        click.echo(json.dumps({**v.as_dict(), "stages": trace["stages"], "epoch": trace["epoch"],
                               "prompt_tokens": len(prompt_ids)}))
        raise SystemExit(int(ExitCode.OK if v.match else ExitCode.FAILURE))
    head = (f"max |logit difference| {v.max_abs_diff:.4g} (tolerance {v.tolerance:.3g}) "
            f"over {v.steps} steps")
    if v.match:
        click.echo(f"match: {head}")
        raise SystemExit(int(ExitCode.OK))
    k = v.first_divergent_step
    assert k is not None
    tok = Tokenizer.load(model_dir)
    ring_tok, ref_tok = v.ring_tokens[k], v.reference_tokens[k]
    where = "the first token after the prompt" if k == 0 else f"after {k} generated tokens"
    click.echo(f"mismatch: {head}\n"
               f"divergence starts at step {k} ({where}, position {len(prompt_ids) + k}): "
               f"|difference| {v.step_diffs[k]:.4g}; "
               f"the ring chose {ring_tok} {tok.decode([ring_tok])!r}, "
               f"the reference {ref_tok} {tok.decode([ref_tok])!r}\n"
               f"per step: {', '.join(f'{d:.3g}' for d in v.step_diffs)}\n"
               f"nodes involved: {_stages_text(trace['stages'])}")
    raise SystemExit(int(ExitCode.FAILURE))


# ----------------------------------------------------------------------------- bench
#: Longest wait for every stage's gossiped timings to cover the bench's steps (seconds):
#: a node refreshes them every TIMINGS_INTERVAL, and gossip takes a few probe rounds.
TIMINGS_WAIT = 2 * TIMINGS_INTERVAL + 2.0


def _stage_timings(status: Status) -> dict[str, StageTimings | None]:
    ids = [a.node_id for a in status.plan.assignments] if status.plan else []
    by_id = {m.id: m.timings for m in status.members}
    return {i: by_id.get(i) for i in ids}


def fresh_timings(client: Any, before: Status) -> Status:
    """The status once every stage gossips timings other than those of ``before`` (so they
    cover the steps just run), or after TIMINGS_WAIT seconds. No wait when this node's runner
    keeps no step timings."""
    deadline = time.monotonic() + TIMINGS_WAIT
    old = _stage_timings(before)
    while True:
        st = read_status(client)
        if st.stats.get("timings") is None:
            return st
        new = _stage_timings(st)
        if all(t is not None and t != old.get(i) for i, t in new.items()):
            return st
        if time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def ring_breakdown(status: Status, ms_per_token: float,
                   ceiling_tps: float | None) -> Breakdown:
    """Where ``ms_per_token`` went on the ring of ``status``: each stage's p50 timings as it
    gossips them, each hop as half the round trip its sender measured, each stage's
    memory-bound floor from the ceiling (shard bytes / memory bandwidth)."""
    order = list(status.plan.assignments) if status.plan else []
    by_id = {m.id: m for m in status.members}
    floors = {s.node_id: s.shard_bytes / s.bandwidth * 1000 for s in
              (status.ceiling.stages if status.ceiling else ()) if s.bandwidth}
    steps = []
    for i, a in enumerate(order):
        m, nxt = by_id.get(a.node_id), order[(i + 1) % len(order)]
        t = m.timings if m is not None else None
        rtt = t.next_rtt_ms if t is not None else None
        if rtt is None and m is not None and m.is_self:  # this node's own probes
            rtt = getattr(by_id.get(nxt.node_id), "rtt_ms", None)
        steps.append(StageStep(
            name=_name(by_id, a.node_id), next_name=_name(by_id, nxt.node_id),
            compute_ms=t.compute_ms.p50 if t else None,
            queued_ms=t.queued_ms.p50 if t else None,
            handoff_ms=t.handoff_ms.p50 if t else None, next_rtt_ms=rtt,
            floor_ms=floors.get(a.node_id)))
    return breakdown(steps, ms_per_token, ceiling_tps)


def _name(by_id: dict[str, Any], node_id: str) -> str:
    m = by_id.get(node_id)
    return (m.name if m is not None and m.name else node_id[:8])


def breakdown_lines(b: Breakdown) -> list[str]:
    """Efficiency, the share of a token each stage and hop takes, and the bottleneck."""
    lines = []
    if b.efficiency is not None and b.ceiling_tps:
        lines.append(f"efficiency: {100 * b.efficiency:.0f}% of the ceiling "
                     f"({1000 / b.ms_per_token:.1f} of {b.ceiling_tps:.1f} tokens/s)")
    if b.parts:
        lines.append(f"per token ({b.ms_per_token:.1f} ms; p50 of each stage's recent steps):")
        rows = [(p.label, f"{p.ms:.2f} ms", f"{100 * p.share:.0f}%") for p in b.parts]
        rows.append(("other (entry, event loops)", f"{b.other_ms:.2f} ms",
                     f"{100 * b.other_ms / b.ms_per_token:.0f}%"))
        w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
        lines += [f"  {a.ljust(w0)}  {m.rjust(w1)}  {sh.rjust(4)}" for a, m, sh in rows]
    lines.append(b.line())
    return lines


def ceiling_for(status: Status, concurrency: int) -> tuple[float | None, dict[str, Any]]:
    """The ring's ceiling (tokens/s in total) with ``concurrency`` streams, from its status."""
    c = status.ceiling
    if c is None or not c.stages:
        return None, {}
    stages = [StageLoad(s.node_id, s.name, s.shard_bytes, s.bandwidth) for s in c.stages]
    out = ring_ceiling(stages, c.hop_us / 1e6, (concurrency,))
    return out["aggregate_tps"].get(str(concurrency)), out


@click.command(cls=Command)
@click.option("--tokens", type=click.IntRange(16, 4096), default=64, show_default=True,
              help="Greedy tokens per request.")
@click.option("--concurrent", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Requests in flight at once.")
@click.option("--prompt", default=BENCH_PROMPT, show_default=True,
              help="Raw prompt (no chat template).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@daemon_options
@click.pass_context
def bench(ctx: click.Context, tokens: int, concurrent: int, prompt: str, as_json: bool,
          host: str | None, port: int | None) -> None:
    """Measure the ring's decode speed and flag a rate above its ceiling as IMPOSSIBLE (exit 1)."""
    client = client_from(ctx, host, port)
    status = read_status(client)
    if not status.ready:
        raise _not_ready(status)
    single, _ = ceiling_for(status, 1)
    total, info = ceiling_for(status, concurrent)
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "stop": []}
        stamps = []
        try:
            for ev in client.stream_generate(body):
                if ev.get("type") == "token":
                    stamps.append(time.monotonic())
                elif ev.get("type") == "finish":
                    with lock:
                        results.append({**ev, "stamps": stamps})
        except BaseException as e:  # reported below, from the main thread
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    decoded = sum(len(r["stamps"]) - 1 for r in results)
    first = min(r["stamps"][0] for r in results if r["stamps"])
    last = max(r["stamps"][-1] for r in results if r["stamps"])
    aggregate = decoded / (last - first) if last > first else 0.0
    per_stream = [float(r["tokens_per_second"]) for r in results]
    fastest = max(per_stream)
    checks = [("fastest stream", fastest, single)]
    if concurrent > 1:
        checks.append(("all streams", aggregate, total))
    verdicts = {name: rate_verdict(rate, ceil) for name, rate, ceil in checks}
    mean = sum(per_stream) / len(per_stream)
    after = fresh_timings(client, status)
    split = ring_breakdown(after, 1000.0 / mean, single) if mean > 0 else None
    out = {"requests": concurrent, "tokens": [r["completion_tokens"] for r in results],
           "per_stream_tps": per_stream, "aggregate_tps": aggregate,
           "time_to_first_token": [r["time_to_first_token"] for r in results],
           "ceiling_single_tps": single, "ceiling_total_tps": total, "hop_us": info.get("hop_us"),
           "verdicts": verdicts,
           "efficiency": split.efficiency if split else None,
           "breakdown": split.as_json() if split else None}
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(f"{concurrent} request(s) of {tokens} greedy tokens; tokens: "
                   + ", ".join(str(n) for n in out["tokens"]))
        for name, rate, ceil in checks:
            bound = f"{ceil:.1f}" if ceil is not None else "unknown"
            click.echo(f"{name}: {rate:.1f} tokens/s; ceiling {bound} tokens/s: {verdicts[name]}")
        if split is not None:
            click.echo("\n".join(breakdown_lines(split)))
        if "IMPOSSIBLE" in verdicts.values():
            click.echo(f"IMPOSSIBLE: {IMPOSSIBLE_HINT}", err=True)
    raise SystemExit(int(ExitCode.FAILURE if "IMPOSSIBLE" in verdicts.values() else ExitCode.OK))
