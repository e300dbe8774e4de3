"""This node's part of the ring's compute, called only from the single MLX thread.

The pure pipeline (:mod:`ringd.core.pipeline`) decides *what* to compute and emits a
:class:`ringd.core.pipeline.Compute`; :meth:`StageCompute.step` does it with the shard
engine and returns one typed :data:`ringd.core.pipeline.StepResult`. Keeping MLX here keeps
the runner free of MLX imports.

A broken node for tests (issue 6) is a :class:`ringd.faults.Fault` the composition root
passes in: ``skip-layers`` runs none of its layers and says so (the next node's coverage
check fails); ``identity-layers`` runs none but claims it ran them (only ``ringctl verify``
can tell); ``gap`` loads one layer fewer than assigned (the load check refuses).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlx.core as mx

from ringd.compute.engine import Sampler, ShardEngine
from ringd.compute.tensors import from_wire, to_wire
from ringd.core.pipeline import Compute, Filled, Hidden, Sampled, StepResult
from ringd.faults import Fault

log = logging.getLogger(__name__)

class StageCompute:
    """One shard plus the per-request samplers of the last shard."""

    def __init__(self, engine: ShardEngine, fault: Fault | None = None) -> None:
        self.engine = engine
        self.fault = fault
        self._samplers: dict[str, Sampler] = {}

    @classmethod
    def load(cls, model_dir: Path, start: int, end: int,
             fault: Fault | None = None) -> "StageCompute":
        if fault is Fault.GAP and end - start > 1:
            end -= 1
        engine = ShardEngine.load(model_dir, start, end)
        if fault in (Fault.SKIP_LAYERS, Fault.IDENTITY_LAYERS):
            # identity layers stand in for the loaded ones
            engine._layers, engine._cache_specs = [], []
        stage = cls(engine, fault)
        stage.warm_up()
        return stage

    @property
    def layers(self) -> tuple[int, int]:
        """The layers ``[start, end)`` its steps really run: what the coverage proof carries."""
        if self.fault is Fault.SKIP_LAYERS:
            return self.engine.start, self.engine.start
        return self.engine.start, self.engine.end

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Every tensor the shard read from disk."""
        return self.engine.tensor_names

    def warm_up(self) -> None:
        """Run a short prefill and one decode step on a throwaway cache.

        MLX builds its kernels on first use (seconds on a CPU); doing it here moves that
        cost into loading, so the first user's time to first token is not inflated.
        """
        eng = self.engine
        rid = "\0warm-up"
        eng.new_request(rid)
        try:
            for t in (8, 1):
                if eng.is_first:
                    x = mx.zeros((t,), dtype=mx.int32)
                else:
                    x = mx.zeros((1, t, eng.info.hidden_size), dtype=eng.activation_dtype)
                eng.forward(rid, x)
        finally:
            eng.free_request(rid)

    @property
    def loaded_bytes(self) -> int:
        return self.engine.loaded_bytes

    def step(self, job: Compute) -> StepResult:
        """Run this shard on ``job.tensor`` for request ``job.request_id``: hidden states to
        forward (not the last shard), the sampled token (last shard, ``final`` step; with
        ``want_logits``, its float32 logits too), or nothing to sample (last shard, a
        prefill chunk before the prompt's last)."""
        eng, rid = self.engine, job.request_id
        if job.new:
            eng.new_request(rid)
            if eng.is_last:
                self._samplers[rid] = Sampler(job.sampling)
        # a prefill chunk before the last needs no logits: the last shard skips its head
        out = eng.forward(rid, from_wire(job.tensor), need_logits=job.final or not eng.is_last)
        if not eng.is_last:
            return Hidden(to_wire(out))
        if not job.final:
            return Filled()
        token = self._samplers[rid].sample(out, job.step)
        return Sampled(token, to_wire(out) if job.sampling.want_logits else None)

    def free(self, rid: str) -> None:
        self.engine.free_request(rid)
        self._samplers.pop(rid, None)

    def free_all(self) -> None:
        for rid in self.engine.active_requests():
            self.free(rid)

    def active(self) -> int:
        return len(self.engine.active_requests())

    def stats(self) -> dict[str, Any]:
        return {"layers": [self.engine.start, self.engine.end],
                "loaded_bytes": self.engine.loaded_bytes,
                "kv_cache_bytes": self.engine.cache_bytes(), "requests": self.active()}
