"""The reference ``ringctl verify`` compares the ring with: the model run on this machine
from its local files, one block of layers at a time.

Teacher-forced: the prompt followed by the tokens the ring generated goes through every
layer; each block of layers is loaded (:class:`ringd.compute.engine.ShardEngine`), run on
the whole sequence, and freed before the next, so a model that fits no single machine is
checked with the memory of one block (``block_bytes``). The last block runs the prompt, then
the generated tokens one at a time, so it yields the logits at every position the ring
sampled from.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from ringd.compute.engine import ShardEngine
from ringd.compute.model_info import ModelInfo, inspect_model
from ringd.errors import UsageError

log = logging.getLogger(__name__)

#: Logits may differ by this fraction of the reference's largest |logit| and still match:
#: the ring decodes step by step with KV caches, the reference runs whole sequences, so a
#: backend may sum in another order. (On the CPU backend the two agree bit for bit.)
RELATIVE_TOLERANCE = 0.01


def plan_blocks(info: ModelInfo, block_bytes: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` blocks, each holding at most ``block_bytes`` of weights
    (but at least one layer)."""
    blocks = []
    start = 0
    while start < info.num_layers:
        end = start + 1
        while end < info.num_layers and info.shard_bytes(start, end + 1) <= block_bytes:
            end += 1
        blocks.append((start, end))
        start = end
    return blocks


def reference_logits(model_dir: Path, prompt_ids: Sequence[int], generated: Sequence[int], *,
                     block_bytes: int, progress: Callable[[str], None] | None = None) -> np.ndarray:
    """float32 logits ``[steps, vocab]``: step 0 after the prompt, step k after ``generated[:k]``.

    ``steps = len(generated)``; the last generated token is never fed in (nothing follows it).
    """
    if not prompt_ids or not generated:
        raise UsageError("the reference needs a prompt and at least one generated token")
    info = inspect_model(Path(model_dir))
    ids = mx.array(list(prompt_ids) + list(generated[:-1]), dtype=mx.int32)
    p, steps = len(prompt_ids), len(generated)
    h: mx.array | None = None
    out: list[mx.array] = []
    for start, end in plan_blocks(info, block_bytes):
        if progress is not None:
            progress(f"reference: layers {start}-{end - 1} of {info.num_layers}")
        eng = ShardEngine.load(Path(model_dir), start, end)
        x = ids if start == 0 else h
        assert x is not None
        eng.new_request("reference")
        if not eng.is_last:
            h = eng.forward("reference", x)
        else:
            def part(a: int, b: int) -> mx.array:
                return x[a:b] if start == 0 else x[:, a:b]

            out.append(eng.forward("reference", part(0, p)))
            for t in range(p, p + steps - 1):
                out.append(eng.forward("reference", part(t, t + 1)))
        del eng
        gc.collect()
        mx.clear_cache()
    logits = np.array(mx.stack(out).astype(mx.float32))
    return logits


@dataclass(frozen=True)
class Verdict:
    """The ring's logits against the reference's, step by step."""

    match: bool
    steps: int
    max_abs_diff: float
    tolerance: float
    step_diffs: tuple[float, ...]
    #: First step whose logits differ beyond the tolerance (None: all match).
    first_divergent_step: int | None
    ring_tokens: tuple[int, ...]
    reference_tokens: tuple[int, ...]  # the reference's greedy choice at each step

    def as_dict(self) -> dict[str, object]:
        return {"match": self.match, "steps": self.steps, "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance, "step_diffs": list(self.step_diffs),
                "first_divergent_step": self.first_divergent_step,
                "ring_tokens": list(self.ring_tokens),
                "reference_tokens": list(self.reference_tokens)}


def compare(ring: np.ndarray, reference: np.ndarray, ring_tokens: Sequence[int], *,
            relative_tolerance: float = RELATIVE_TOLERANCE) -> Verdict:
    """Step-by-step comparison of ``[steps, vocab]`` logits."""
    if ring.shape != reference.shape:
        raise UsageError(f"the ring sent logits of shape {ring.shape}, "
                         f"the reference has {reference.shape}",
                         hint="the ring and this machine hold different models")
    tol = relative_tolerance * max(1.0, float(np.abs(reference).max()))
    diffs = np.abs(ring.astype(np.float64) - reference.astype(np.float64)).max(axis=1)
    ref_tokens = tuple(int(t) for t in reference.argmax(axis=1))
    bad = [i for i, d in enumerate(diffs) if not d <= tol]  # NaN counts as divergent
    return Verdict(match=not bad, steps=len(diffs), max_abs_diff=float(diffs.max()), tolerance=tol,
                   step_diffs=tuple(float(d) for d in diffs),
                   first_divergent_step=bad[0] if bad else None,
                   ring_tokens=tuple(ring_tokens), reference_tokens=ref_tokens)
