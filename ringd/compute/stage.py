"""This node's part of the ring's compute, called only from the single MLX thread.

The ring runner (``ringd.runner``) decides *what* to compute from the pure pipeline
core; this module does it with the shard engine: wire tensor in, wire tensor or sampled
token out. Keeping MLX here keeps the runner free of MLX imports.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlx.core as mx

from ringd.compute.engine import Sampler, ShardEngine
from ringd.compute.tensors import from_wire, to_wire
from ringd.core.requests import SamplingParams
from ringd.core.wire import Tensor

log = logging.getLogger(__name__)


class StageCompute:
    """One shard plus the per-request samplers of the last shard."""

    def __init__(self, engine: ShardEngine) -> None:
        self.engine = engine
        self._samplers: dict[str, Sampler] = {}
        self._sampled: dict[str, int] = {}

    @classmethod
    def load(cls, model_dir: Path, start: int, end: int) -> "StageCompute":
        stage = cls(ShardEngine.load(model_dir, start, end))
        stage.warm_up()
        return stage

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

    def step(self, rid: str, tensor: Tensor, *, new: bool, final: bool,
             params: SamplingParams) -> Tensor | int | None:
        """Run this shard on ``tensor`` for request ``rid``.

        Returns the hidden states to forward (not the last shard), the sampled token id
        (last shard, ``final`` step), or None (last shard, a prefill chunk before the last).
        """
        eng = self.engine
        if new:
            eng.new_request(rid)
            if eng.is_last:
                self._samplers[rid] = Sampler(params)
        out = eng.forward(rid, from_wire(tensor))
        if not eng.is_last:
            return to_wire(out)
        if not final:
            return None
        return self._samplers[rid].sample(out)

    def free(self, rid: str) -> None:
        self.engine.free_request(rid)
        self._samplers.pop(rid, None)

    def free_all(self) -> None:
        for rid in self.engine.active_requests():
            self.free(rid)

    def active(self) -> int:
        return len(self.engine.active_requests())

    def stats(self) -> dict[str, Any]:
        return {"layers": [self.engine.start, self.engine.end], "loaded_bytes": self.engine.loaded_bytes,
                "kv_cache_bytes": self.engine.cache_bytes(), "requests": self.active()}
