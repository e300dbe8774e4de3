"""Helpers for tests that run real rings of ``ringd`` processes (see ringd.localring)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Iterator

from ringd.client import Client
from ringd.compute.model_info import inspect_model
from ringd.compute.tokenizer import Tokenizer
from ringd.config import Settings
from ringd.core.plan import model_shape
from ringd.localring import LocalRing

RING_CONTEXT = 1024
RING_CONCURRENCY = 4
RING_ARGS = (f"--max-context={RING_CONTEXT}", f"--max-concurrent={RING_CONCURRENCY}")


def need_bytes(model_dir: Path) -> int:
    """What the plan needs for ``model_dir`` with the rings' context and concurrency."""
    settings = Settings(max_context=RING_CONTEXT, max_concurrent=RING_CONCURRENCY)
    return model_shape(inspect_model(model_dir), settings).total_bytes


def ring_for(model_dir: Path, base: Path, ratios: tuple[int, ...], *, slack: float = 1.5,
             **kw: Any) -> LocalRing:
    """A LocalRing on ``model_dir`` (its parent is the store) with budgets in ``ratios``."""
    unit = int(need_bytes(model_dir) * slack / sum(ratios)) + 1
    return LocalRing(base, [unit * r for r in ratios], model_dir.name, model_dir.parent,
                     extra_args=RING_ARGS + tuple(kw.pop("extra_args", ())), **kw)


def stream(client: Client, **body: Any) -> list[dict[str, Any]]:
    """All events of one request through the control API."""
    return list(client.stream_generate(body))


def token_ids(events: list[dict[str, Any]]) -> list[int]:
    return [e["token_id"] for e in events if e.get("type") == "token"]


def text(events: list[dict[str, Any]]) -> str:
    return "".join(e.get("text", "") for e in events if e.get("type") == "token")


def without_eos(ids: list[int], eos: tuple[int, ...]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else ids


def reference_tokens(model_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens from unmodified mlx_lm on one process (EOS not included)."""
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(str(model_dir))
    out = []
    for r in mlx_lm.stream_generate(model, tokenizer, prompt_ids, max_tokens=max_tokens,
                                    sampler=make_sampler(temp=0.0)):
        out.append(r.token)
    eos = set(tokenizer.eos_token_ids)
    return [t for t in out if t not in eos][:max_tokens]


def by_name(statuses: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for s in statuses:
        yield s["node"]["name"], s


def answers_as_mlx_lm(model_dir: Path, prompt: str, result: subprocess.CompletedProcess[str],
                      max_tokens: int) -> bool:
    """``result`` (``ringctl prompt --raw --json --max-tokens N PROMPT``) streamed the greedy
    tokens mlx-lm computes for ``prompt`` in one process."""
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    got = [e["token_id"] for e in events if e["type"] == "token"]
    tok = Tokenizer.load(model_dir)
    return without_eos(got, tok.eos_token_ids) == reference_tokens(
        model_dir, tok.encode(prompt), max_tokens)


def stop_daemons(procs: list[subprocess.Popen[bytes]], timeout: float = 20) -> list[int]:
    """SIGTERM each daemon's process group still running, then their exit codes (a daemon
    that does not stop within ``timeout`` is killed)."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            codes.append(p.wait())
    return codes
