"""This node's part of the ring's compute, called only from the single MLX thread.

The ring runner (``ringd.runner``) decides *what* to compute from the pure pipeline
core; this module does it with the shard engine: wire tensor in, wire tensor or sampled
token out. Keeping MLX here keeps the runner free of MLX imports.

Test hook (the one place it is read): ``RINGD_TEST_FAULT="NAME:MODE[,NAME:MODE...]"`` makes
the node named NAME a broken node, so tests can show the ring refuses to serve wrong output
(issue 6). Modes (:class:`Fault`): ``skip-layers`` runs none of its layers and says so (the
next node's coverage check fails); ``identity-layers`` runs none but claims it ran them
(only ``ringctl verify`` can tell); ``stale-epoch`` routes with the previous plan epoch;
``gap`` loads one layer fewer than assigned (the load check refuses).
"""

from __future__ import annotations

import logging
import os
from enum import Enum
from pathlib import Path
from typing import Any

import mlx.core as mx

from ringd.compute.engine import Sampler, ShardEngine
from ringd.compute.tensors import from_wire, to_wire
from ringd.core.requests import SamplingParams
from ringd.core.wire import Tensor
from ringd.errors import UsageError

log = logging.getLogger(__name__)

FAULT_ENV = "RINGD_TEST_FAULT"


class Fault(Enum):
    """How a node misbehaves under the ``RINGD_TEST_FAULT`` test hook."""

    SKIP_LAYERS = "skip-layers"
    IDENTITY_LAYERS = "identity-layers"
    STALE_EPOCH = "stale-epoch"
    GAP = "gap"


def injected_fault(node_name: str) -> Fault | None:
    """The fault ``RINGD_TEST_FAULT`` gives node ``node_name`` (None: it behaves)."""
    for item in os.environ.get(FAULT_ENV, "").split(","):
        name, _, mode = item.strip().partition(":")
        if name and name == node_name:
            try:
                fault = Fault(mode)
            except ValueError:
                raise UsageError(f"{FAULT_ENV}: unknown mode {mode!r} for node {name}",
                                 hint="modes: " + ", ".join(f.value for f in Fault)) from None
            log.warning("%s: this node plays the %s fault (test hook)", FAULT_ENV, fault.value)
            return fault
    return None


class StageCompute:
    """One shard plus the per-request samplers of the last shard."""

    def __init__(self, engine: ShardEngine, fault: Fault | None = None) -> None:
        self.engine = engine
        self.fault = fault
        self._samplers: dict[str, Sampler] = {}
        self._sampled: dict[str, int] = {}

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

    def step(self, rid: str, tensor: Tensor, *, new: bool, final: bool, params: SamplingParams,
             logits: bool = False) -> Tensor | int | tuple[int, Tensor] | None:
        """Run this shard on ``tensor`` for request ``rid``.

        Returns the hidden states to forward (not the last shard), the sampled token id
        (last shard, ``final`` step; with ``logits``, ``(token id, float32 logits)``), or
        None (last shard, a prefill chunk before the last).
        """
        eng = self.engine
        if new:
            eng.new_request(rid)
            if eng.is_last:
                self._samplers[rid] = Sampler(params)
        # a prefill chunk before the last needs no logits: the last shard skips its head
        out = eng.forward(rid, from_wire(tensor), need_logits=final or not eng.is_last)
        if not eng.is_last:
            return to_wire(out)
        if not final:
            return None
        token = self._samplers[rid].sample(out)
        return (token, to_wire(out)) if logits else token

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
