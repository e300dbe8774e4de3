"""``ringctl demo``: the main job on one machine -- a local ring answers a prompt."""

from __future__ import annotations

import math
import sys
import time
from typing import Callable

from ringd.cli_ring import render_status
from ringd.config import Settings
from ringd.localring import LocalRing
from ringd.units import format_size

DEMO_CONTEXT = 2048
DEMO_CONCURRENCY = 4


def demo_budgets(need: int, nodes: int) -> list[int]:
    """Memory budgets in the ratio 1:2:3:... whose sum is 1.5x what the model needs."""
    weights = list(range(1, nodes + 1))
    unit = math.ceil(need * 1.5 / sum(weights))
    return [unit * w for w in weights]


def run_demo(settings: Settings, prompt: str, *, nodes: int, max_tokens: int,
             echo: Callable[..., None]) -> None:
    from ringd.compute.model_info import inspect_model
    from ringd.compute.store import ensure_default_model, resolve_model
    from ringd.config import DEFAULT_MODEL
    from ringd.core.plan import model_shape

    store = settings.model_store
    if settings.model == DEFAULT_MODEL:
        ensure_default_model(store, progress=lambda m: echo(m, err=True))
    info = inspect_model(resolve_model(store, settings.model))
    shape = model_shape(info, Settings(max_context=DEMO_CONTEXT, max_concurrent=DEMO_CONCURRENCY))
    budgets = demo_budgets(shape.total_bytes, nodes)
    echo(f"==> starting {nodes} ringd daemons on 127.0.0.1 for {info.name} "
         f"({info.num_layers} layers, needs {format_size(shape.total_bytes)}); memory budgets "
         + ", ".join(format_size(b) for b in budgets), err=True)
    ring = LocalRing(settings.state_dir / "demo", budgets, settings.model, store, mdns=True,
                     extra_args=(f"--max-context={DEMO_CONTEXT}", f"--max-concurrent={DEMO_CONCURRENCY}"))
    t0 = time.monotonic()
    ring.start()
    try:
        statuses = ring.wait_ready(180, progress=lambda r: echo(f"    ... {r}", err=True))
        echo(f"==> ring ready in {time.monotonic() - t0:.1f} s\n", err=True)
        echo(render_status(statuses[0]))
        entry = ring.nodes[-1]
        echo(f"\n==> {prompt}\n    (entering at {entry.name}; tokens pass through every node)\n", err=True)
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.0}
        events = entry.client.stream_generate(body)
        try:
            for ev in events:
                if ev.get("type") == "token" and ev.get("text"):
                    echo(ev["text"], nl=False)
                    sys.stdout.flush()
                elif ev.get("type") == "finish":
                    echo("")
                    echo(f"\n==> {ev.get('completion_tokens')} tokens, time to first token "
                         f"{ev.get('time_to_first_token', 0):.2f} s, {ev.get('tokens_per_second', 0):.1f} tokens/s",
                         err=True)
        finally:
            events.close()
    finally:
        codes = ring.stop()
        clean = sum(1 for c in codes if c == 0)
        echo(f"==> stopped the ring: {clean} of {len(codes)} daemons exited cleanly", err=True)
