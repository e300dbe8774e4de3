"""Single-node engine speed against mlx-lm's own generator, side by side in one run.

    .venv/bin/python bench/engine.py [--model DIR] [--prompt-tokens 128] [--tokens 32] [--rounds 3]

Both run the same model directory, the same prompt token ids, greedy, for the same number
of tokens (EOS ignored). "ringd" is the engine as the daemon loads it (on the CPU device
the large projections are split by rows over one MLX stream per core); "ringd-1" is the
same engine with that split turned off, i.e. the same kernels mlx-lm runs.
Prefill tokens/s = prompt tokens / time to the first token;
decode tokens/s = (tokens - 1) / time from the first token to the last. Rounds alternate
(mlx-lm, ours, mlx-lm, ours, ...); the best and the median round of each are reported,
with the load average, since other processes on the machine skew single runs.
Prints ratios ours / mlx-lm (goal: >= 1.0).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx


def timed(stream: Iterable[int], prompt_tokens: int) -> tuple[float, float, list[int]]:
    t0 = time.perf_counter()
    t_first = 0.0
    tokens: list[int] = []
    for tok in stream:
        if not tokens:
            t_first = time.perf_counter()
        tokens.append(tok)
    t_end = time.perf_counter()
    prefill = prompt_tokens / (t_first - t0)
    decode = (len(tokens) - 1) / (t_end - t_first) if len(tokens) > 1 else float("nan")
    return prefill, decode, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None,
                    help="model directory (default: the default model)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate_step

    from ringd.compute.engine import ShardEngine
    from ringd.compute.model_info import inspect_model
    from ringd.compute.store import ensure_default_model
    from ringd.compute.tokenizer import Tokenizer
    from ringd.config import Settings
    from ringd.core.requests import SamplingParams

    model_dir = args.model or ensure_default_model(Settings().model_store, progress=print)
    info = inspect_model(model_dir)
    tok = Tokenizer.load(model_dir)
    text = ("The history of the city begins with a small settlement by the river, where traders "
            "met to exchange grain, salt and cloth. ") * 64
    prompt = tok.encode(text)[: args.prompt_tokens]
    n = len(prompt)

    model, _ = mlx_lm_load(str(model_dir))
    engine = ShardEngine.load(model_dir, 0, info.num_layers)
    unsplit = ShardEngine.load(model_dir, 0, info.num_layers, cpu_split=1)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens)

    def theirs() -> Iterable[int]:
        for y, _ in generate_step(mx.array(prompt), model, max_tokens=args.tokens):
            yield int(y)

    runners: dict[str, Callable[[], Iterable[int]]] = {
        "mlx-lm": theirs,
        "ringd": lambda: engine.generate(prompt, params, ignore_eos=True),
        "ringd-1": lambda: unsplit.generate(prompt, params, ignore_eos=True),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    outputs: dict[str, list[int]] = {}
    load_before = os.getloadavg()[0]
    for run in runners.values():  # warm up (first-call allocations)
        timed(run(), n)
    for r in range(args.rounds):
        for name, run in runners.items():
            pre, dec, toks = timed(run(), n)
            outputs[name] = toks
            results[name].append((pre, dec))
            print(f"round {r + 1} {name:7s} prefill {pre:7.1f} tok/s   decode {dec:6.2f} tok/s")

    print()
    print(f"model {model_dir.name}: {info.num_layers} layers, {info.total_bytes / 2**20:.0f} MiB; "
          f"{mx.default_device()} on {platform.machine()} ({os.cpu_count()} CPUs); "
          f"prompt {n} tokens, {args.tokens} generated")
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          "(other processes competing for the CPU make every number below noisy)")
    print(f"ringd: projections split over {engine.cpu_split} CPU streams; "
          "ringd-1: the same engine without the split")
    for how, pick in (("best", max), ("median", statistics.median)):
        tp = pick(p for p, _ in results["mlx-lm"])
        td = pick(d for _, d in results["mlx-lm"])
        for name in ("ringd", "ringd-1"):
            op = pick(p for p, _ in results[name])
            od = pick(d for _, d in results[name])
            print(f"{how:6s} {name:7s} prefill {op:6.1f} tok/s (mlx-lm {tp:6.1f}, "
                  f"ratio {op / tp:4.2f})   decode {od:5.2f} tok/s (mlx-lm {td:5.2f}, "
                  f"ratio {od / td:4.2f})")
    same = outputs["mlx-lm"] == outputs["ringd"] == outputs["ringd-1"]
    print(f"same greedy tokens: {same}")


if __name__ == "__main__":
    main()
