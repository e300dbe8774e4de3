"""``ringctl demo``: the main job on one machine -- a local ring answers a prompt."""

from __future__ import annotations

import sys
import time
from typing import Callable

import click

from ringd.cli.common import Command, settings_from
from ringd.cli.ring import render_status
from ringd.config import Settings
from ringd.units import format_size
from ringd.localring import DEMO_CONCURRENCY, DEMO_CONTEXT, LocalRing, demo_budgets
from ringd.status import Status

DEMO_PROMPT = "What is the capital of France? Answer in one sentence."


@click.command(cls=Command)
@click.argument("text", required=False, default=DEMO_PROMPT)
@click.option("--nodes", type=click.IntRange(1, 8), default=3, show_default=True,
              help="Daemons in the local ring.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--store", type=click.Path(file_okay=False), default=None,
              help="Model store directory.")
@click.pass_context
def demo(ctx: click.Context, text: str, nodes: int, max_tokens: int, store: str | None) -> None:
    """Start a local ring of daemons with unequal memory, answer a prompt, stop the ring.

    Everything runs on this machine over loopback: each daemon holds only its layers.
    """
    s = settings_from(ctx, model_store=store)
    run_demo(s, text, nodes=nodes, max_tokens=max_tokens, echo=click.echo)


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
                     extra_args=(f"--max-context={DEMO_CONTEXT}",
                                 f"--max-concurrent={DEMO_CONCURRENCY}"))
    t0 = time.monotonic()
    ring.start()
    try:
        statuses = ring.wait_ready(180, progress=lambda r: echo(f"    ... {r}", err=True))
        echo(f"==> ring ready in {time.monotonic() - t0:.1f} s\n", err=True)
        echo(render_status(Status.from_json(statuses[0], source=ring.nodes[0].name)))
        entry = ring.nodes[-1]
        echo(f"\n==> {prompt}\n    (entering at {entry.name}; tokens pass through every node)\n",
             err=True)
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0.0}
        events = entry.client.stream_generate(body)
        try:
            for ev in events:
                if ev.get("type") == "token" and ev.get("text"):
                    echo(ev["text"], nl=False)
                    sys.stdout.flush()
                elif ev.get("type") == "finish":
                    echo("")
                    echo(f"\n==> {ev.get('completion_tokens')} tokens, time to first token "
                         f"{ev.get('time_to_first_token', 0):.2f} s, "
                         f"{ev.get('tokens_per_second', 0):.1f} tokens/s", err=True)
        finally:
            events.close()
    finally:
        codes = ring.stop()
        clean = sum(1 for c in codes if c == 0)
        echo(f"==> stopped the ring: {clean} of {len(codes)} daemons exited cleanly", err=True)
