"""This node's layers: loading the range a plan gives it, and the proof that every node
loaded the weights the model files say.

:meth:`ShardLoader.load` loads ``[start, end)`` on the MLX thread (freeing the previous
range first), refuses a shard that does not hold exactly the tensors of its range, and
returns the fingerprint to gossip. :meth:`ShardLoader.check_ring` checks every member's
gossiped fingerprint against this node's own model files before the ring serves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ringd.compute.bandwidth import detect_bandwidth
from ringd.compute.manifest import Manifest, expected_tensors, load_manifest
from ringd.compute.model_info import ModelInfo
from ringd.compute.stage import StageCompute
from ringd.config import Settings
from ringd.core.plan import Assignment, Plan
from ringd.core.proof import StageClaim, check_fingerprints, check_loaded
from ringd.errors import ModelError
from ringd.faults import Fault
from ringd.units import format_size

log = logging.getLogger(__name__)


class ShardLoader:
    """Owns this node's :class:`StageCompute` (None while no range is loaded)."""

    def __init__(self, settings: Settings, model_dir: Path, info: ModelInfo,
                 executor: concurrent.futures.Executor, fault: Fault | None = None) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.info = info
        self.executor = executor
        self.fault = fault
        self.compute: StageCompute | None = None
        self.loaded_for: str | None = None  # layout hash of the plan the shard was loaded for
        self.load_seconds: float | None = None
        self.manifest: Manifest | None = None  # per-tensor hashes of the local files, once read
        self.bandwidth: tuple[float, str] | None = None  # bytes/s and where the figure came from

    async def memory_bandwidth(self) -> tuple[float, str]:
        """This machine's memory bandwidth (configured, else published or measured), once."""
        if self.bandwidth is None:
            s = self.settings
            self.bandwidth = ((float(s.memory_bandwidth), "configured") if s.memory_bandwidth
                              else await asyncio.to_thread(detect_bandwidth))
            log.info("memory bandwidth %.1f GB/s (%s)", self.bandwidth[0] / 1e9, self.bandwidth[1])
        return self.bandwidth

    async def load(self, plan: Plan, assignment: Assignment | None,
                   status: Callable[[str], Any] = lambda text: None) -> str | None:
        """Make this node hold ``assignment``'s layers of ``plan`` (None: none); returns the
        fingerprint to gossip (None without layers). Raises RingdError when it cannot."""
        # Per-tensor hashes of the local files: built once, then read (and kept) in memory.
        self.manifest = manifest = await asyncio.to_thread(load_manifest, self.model_dir)
        if assignment is None:
            return None
        start, end = assignment.start, assignment.end
        if self.compute is not None and self.loaded_for == plan.layout_hash:
            log.info("layers %d-%d already loaded", start, end - 1)
        else:
            status(f"loading layers {start}-{end - 1} of {plan.num_layers}")
            log.info("loading layers [%d, %d) of %s", start, end, self.info.name)
            old, self.compute, self.loaded_for = self.compute, None, None
            t0 = time.monotonic()
            loop = asyncio.get_running_loop()
            if old is not None:
                await loop.run_in_executor(self.executor, old.free_all)
                del old
            compute = await loop.run_in_executor(self.executor, StageCompute.load,
                                                 self.model_dir, start, end, self.fault)
            # Refuse to serve unless the shard holds exactly the tensors of its assignment.
            problem = check_loaded(start, end, expected_tensors(self.info, start, end),
                                   compute.tensor_names)
            if problem:
                raise ModelError(problem, hint="the model files or this node's loader are "
                                               "broken; re-copy the model directory")
            self.load_seconds = time.monotonic() - t0
            self.compute, self.loaded_for = compute, plan.layout_hash
            log.info("loaded layers [%d, %d): %s in %.2f s", start, end,
                     format_size(compute.loaded_bytes), self.load_seconds)
        assert self.compute is not None
        fingerprint = manifest.fingerprint(start, end, self.compute.tensor_names)
        log.info("fingerprint of layers [%d, %d): %s", start, end, fingerprint)
        return fingerprint

    def check_ring(self, claims: Sequence[StageClaim], self_id: str) -> list[str]:
        """Problems with the members' fingerprints, checked against this node's own files."""
        manifest = self.manifest
        if manifest is None:
            return ["this node could not read its model files"]
        return check_fingerprints(claims, lambda a, b: manifest.expected(self.info, a, b),
                                  self_id)

    def compute_for(self, plan: Plan, node_id: str) -> StageCompute | None:
        """The loaded shard if it is ``plan``'s range for this node (None: an entry only)."""
        if plan.assignment(node_id) is None or self.loaded_for != plan.layout_hash:
            return None
        return self.compute
