"""This node's layers: loading the range a plan gives it, and the proof that every node
loaded the weights the model's manifest says.

:meth:`ShardLoader.load` loads ``[start, end)`` of a model in the store on the MLX thread
(freeing the previous range first), refuses a shard that does not hold exactly the tensors
of its range, and returns the fingerprint to gossip. :meth:`ShardLoader.check_ring` checks
every member's gossiped fingerprint against the manifest before the ring serves -- the
manifest alone is enough, so a node holding only some layers checks all of them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any, Callable, Sequence

from ringd.compute.bandwidth import detect_bandwidth
from ringd.compute.manifest import expected_tensors
from ringd.compute.stage import StageCompute
from ringd.config import Settings
from ringd.core.plan import Assignment, Plan
from ringd.core.proof import StageClaim, check_fingerprints, check_loaded
from ringd.core.schedule import tokens_of
from ringd.errors import ModelError
from ringd.faults import Fault
from ringd.models import LocalModel
from ringd.units import format_size

log = logging.getLogger(__name__)


class TimedCompute:
    """A :class:`StageCompute` whose every step's duration goes to ``observe(seconds, kind)``
    (kind: "decode" for one token, "prefill" for a chunk), on the compute thread; everything
    else is the shard's own."""

    def __init__(self, compute: StageCompute, observe: Callable[[float, str], None]) -> None:
        self._compute = compute
        self._observe = observe

    def step(self, job: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._compute.step(job)
        finally:
            # token ids [T] at the first stage, hidden states [1, T, H] after it
            kind = "decode" if tokens_of(job) == 1 else "prefill"
            self._observe(time.perf_counter() - started, kind)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compute, name)


class ShardLoader:
    """Owns this node's :class:`StageCompute` (None while no range is loaded).

    ``observe(seconds, kind)``: told the duration of every step the shard takes (metrics)."""

    def __init__(self, settings: Settings, executor: concurrent.futures.Executor,
                 fault: Fault | None = None,
                 observe: Callable[[float, str], None] | None = None) -> None:
        self.observe = observe
        self.settings = settings
        self.executor = executor
        self.fault = fault
        self.compute: StageCompute | None = None
        #: (model id, layout hash of the plan) the shard was loaded for.
        self.loaded_for: tuple[str, str] | None = None
        self.load_seconds: float | None = None
        self.bandwidth: tuple[float, str] | None = None  # bytes/s and where the figure came from

    async def memory_bandwidth(self) -> tuple[float, str]:
        """This machine's memory bandwidth (configured, else published or measured), once."""
        if self.bandwidth is None:
            s = self.settings
            self.bandwidth = ((float(s.memory_bandwidth), "configured") if s.memory_bandwidth
                              else await asyncio.to_thread(detect_bandwidth))
            log.info("memory bandwidth %.1f GB/s (%s)", self.bandwidth[0] / 1e9,
                     self.bandwidth[1])
        return self.bandwidth

    async def load(self, plan: Plan, assignment: Assignment | None, model: LocalModel,
                   status: Callable[[str], Any] = lambda text: None) -> str | None:
        """Make this node hold ``assignment``'s layers of ``plan`` from ``model`` (None: no
        layers; any shard loaded before is freed); returns the fingerprint to gossip (None
        without layers). Raises RingdError when it cannot."""
        key = (model.model_id, plan.layout_hash)
        if assignment is None:
            await self.unload()
            return None
        start, end = assignment.start, assignment.end
        if self.compute is not None and self.loaded_for == key:
            log.info("layers %d-%d already loaded", start, end - 1)
        else:
            status(f"loading layers {start}-{end - 1} of {plan.num_layers}")
            log.info("loading layers [%d, %d) of %s", start, end, model.name)
            await self.unload()
            t0 = time.monotonic()
            loop = asyncio.get_running_loop()
            compute = await loop.run_in_executor(self.executor, StageCompute.load,
                                                 model.path, start, end, self.fault)
            # Refuse to serve unless the shard holds exactly the tensors of its assignment.
            problem = check_loaded(start, end, expected_tensors(model.info, start, end),
                                   compute.tensor_names)
            if problem:
                raise ModelError(problem, hint="the model files or this node's loader are "
                                               "broken; remove the model and let it be fetched")
            self.load_seconds = time.monotonic() - t0
            self.compute, self.loaded_for = compute, key
            log.info("loaded layers [%d, %d): %s in %.2f s", start, end,
                     format_size(compute.loaded_bytes), self.load_seconds)
        assert self.compute is not None
        fingerprint = model.manifest.fingerprint(start, end, self.compute.tensor_names)
        log.info("fingerprint of layers [%d, %d): %s", start, end, fingerprint)
        return fingerprint

    async def unload(self) -> None:
        """Free the loaded shard, if any (its KV caches with it)."""
        old, self.compute, self.loaded_for = self.compute, None, None
        if old is not None:
            await asyncio.get_running_loop().run_in_executor(self.executor, old.free_all)

    @staticmethod
    def check_ring(claims: Sequence[StageClaim], self_id: str, model: LocalModel) -> list[str]:
        """Problems with the members' fingerprints, checked against ``model``'s manifest."""
        manifest = model.manifest
        return check_fingerprints(claims, manifest.expected_fingerprint, self_id)

    def compute_for(self, plan: Plan, node_id: str,
                    model: LocalModel) -> StageCompute | TimedCompute | None:
        """The loaded shard if it is ``plan``'s range of ``model`` for this node (None: an
        entry only)."""
        if plan.assignment(node_id) is None:
            return None
        if self.loaded_for != (model.model_id, plan.layout_hash):
            raise ModelError(f"the loaded layers are not those plan {plan.hash[:8]} gives "
                             "this node", hint="a bug in ringd: see its log")
        if self.compute is not None and self.observe is not None:
            return TimedCompute(self.compute, self.observe)
        return self.compute
