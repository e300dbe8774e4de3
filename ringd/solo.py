"""One node holding the whole model: a ring of one stage, in this process.

The same :class:`ringd.core.pipeline.Pipeline`, :class:`ringd.runner.Runner` and text stream
as a ring of daemons, with a route of one stage on this node: every message it sends goes
to itself, so nothing touches a socket. Used where a whole model fits one process (tests of
the HTTP API and the CLI, tools); there is no second generation loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator

from ringd.compute.mlx_thread import mlx_executor
from ringd.compute.model_info import ModelInfo, inspect_model
from ringd.compute.stage import StageCompute
from ringd.compute.tokenizer import Tokenizer
from ringd.config import Settings
from ringd.core import wire
from ringd.core.pipeline import Pipeline
from ringd.core.requests import FinishEvent, GenerationRequest, TokenEvent
from ringd.core.membership import MemberState
from ringd.core.ringmeta import NodePhase
from ringd.core.route import Route, Stage
from ringd.errors import LocalProtocolError, RequestError
from ringd.runner import Runner, pipeline_config, schedule_config, served_model
from ringd.status import (AssignmentStatus, MemberStatus, ModelStatus, NodeStatus, PlanStatus,
                          Status)

NODE_ID = "local"


class SoloBackend:
    """The whole model on this node, behind the Backend protocol."""

    def __init__(self, model_dir: Path, settings: Settings) -> None:
        self.model_dir = Path(model_dir)
        self.settings = settings
        self.info: ModelInfo = inspect_model(self.model_dir)
        self.runner: Runner | None = None
        self._phase = "loading"

    async def start(self) -> None:
        """Load the model and the tokenizer, then serve."""
        info, executor = self.info, mlx_executor()
        loop = asyncio.get_running_loop()
        compute = await loop.run_in_executor(executor, StageCompute.load, self.model_dir, 0,
                                             info.num_layers)
        tokenizer = await asyncio.to_thread(Tokenizer.load, self.model_dir)
        pipeline = Pipeline(NODE_ID, pipeline_config(self.settings))
        s = self.settings
        self.runner = Runner(pipeline, executor=executor, send=_nowhere,
                             not_ready_reason=lambda: "the model is loading",
                             max_queued=s.max_queued, queue_timeout=s.queue_timeout,
                             schedule=schedule_config(s))
        route = Route(0, (Stage(NODE_ID, 0, info.num_layers),), info.num_layers)
        self.runner.serve(route, compute, {NODE_ID: self.settings.node_name},
                          served_model(self.settings, info), tokenizer)
        self._phase = "serving"

    async def close(self) -> None:
        """Refuse new requests, wait for running ones to end, free every cache."""
        self._phase = "leaving"
        if self.runner is not None:
            self.runner.pipeline.leaving = True
            await self.runner.idle.wait()
            await self.runner.close()

    @property
    def active_requests(self) -> int:
        """Requests holding a KV cache here."""
        return self.runner.pipeline.active_stages if self.runner else 0

    async def wait_idle(self) -> None:
        """Return once no request runs and every KV cache has been freed."""
        if self.runner is not None:
            await self.runner.idle.wait()
            await asyncio.get_running_loop().run_in_executor(self.runner.executor, lambda: None)

    # ---------------------------------------------------------------- Backend
    def served_models(self) -> list[str]:
        return [self.info.name]

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        if self.runner is None:
            return _refuse(RequestError("not_ready", "the model is still loading",
                                        hint="retry in a moment; `ringctl status` shows progress"))
        return self.runner.generate(request)

    async def trace(self, prompt: str, steps: int) -> dict[str, Any]:
        if self.runner is None:
            raise RequestError("not_ready", "the model is still loading")
        return await self.runner.trace(prompt, steps)

    def status(self) -> Status:
        info, s = self.info, self.settings
        ready = self._phase == "serving"
        n, total = info.num_layers, info.total_bytes
        phase = NodePhase(self._phase)
        return Status(
            node=NodeStatus(id=NODE_ID, name=s.node_name, http_port=s.http_port, phase=phase),
            ready=ready,
            reason=None if ready else {"loading": "the model is loading",
                                       "leaving": "this node is shutting down"}[self._phase],
            model=ModelStatus(info.name, n, total),
            plan=PlanStatus(epoch=0, assignments=(AssignmentStatus(NODE_ID, 0, n, total),)),
            members=(MemberStatus(id=NODE_ID, state=MemberState.ALIVE, name=s.node_name,
                                  phase=phase, usable_memory=s.memory_budget, layers=(0, n),
                                  http_port=s.http_port, is_self=True),),
            stats={"runner": self.runner.status() if self.runner else None})

def _nowhere(node_id: str, msg: wire.Message) -> None:
    raise LocalProtocolError(f"a one-stage ring sent {type(msg).__name__} to node {node_id}")


async def _refuse(error: RequestError) -> AsyncIterator[TokenEvent | FinishEvent]:
    raise error
    yield  # pragma: no cover  (makes this an async generator)
