"""A :class:`ringd.core.requests.Backend` that runs the whole model on this node.

Serves single-node use and is the reference the ring backend mirrors:

- Admission: ``not_ready`` until :meth:`LocalBackend.start` has loaded the model, ``leaving``
  after :meth:`close`, ``busy`` beyond ``max_concurrent``, ``context_length`` when the prompt
  alone fills ``max_context``. Generation stops at EOS, a stop string, ``max_tokens``, or a
  full context (reason ``length``); ``request_timeout`` fails it with ``timeout``.
- Events: one :class:`TokenEvent` per sampled token, the EOS token included (its text is
  whatever was held back, usually empty), so ``completion_tokens`` counts every sampled
  token. Text that could begin a stop string is held back; the stop string is never sent.
- MLX runs on one dedicated thread; each prefill chunk and each decode step is one job,
  so concurrent requests interleave step by step and the event loop never blocks. Closing
  the iterator (client gone) frees the request's KV cache.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dis
import logging
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

import mlx.core as mx

from ringd.compute.engine import Sampler, ShardEngine
from ringd.compute.model_info import ModelInfo, inspect_model
from ringd.compute.tokenizer import Tokenizer
from ringd.config import Settings
from ringd.core.membership import MemberState, NodePhase
from ringd.core.pipeline import StopMatcher, chunks
from ringd.core.requests import FinishEvent, GenerationRequest, TokenEvent
from ringd.errors import RequestError
from ringd.status import (AssignmentStatus, MemberStatus, ModelStatus, NodeStatus, PlanStatus,
                          Status)

log = logging.getLogger(__name__)

T = TypeVar("T")


class MlxThread(concurrent.futures.Executor):
    """One daemon thread that runs submitted calls in order: the process's MLX thread.

    MLX state is per thread (streams; compiled-function caches holding Python objects).
    When such a thread ends, or only wakes, while Python finalizes, those thread-local
    destructors need the GIL and the process dies in std::terminate (exit status 134) -- as
    a pool worker does at interpreter exit. So this thread never ends (process exit reaps
    it), never takes a signal, and at exit it is left parked in its queue wait.
    """

    def __init__(self, name: str = "ringd-mlx") -> None:
        self._jobs: queue.SimpleQueue[
            tuple[
                concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]
            ]
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()
        atexit.register(self._park)

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        signal.pthread_sigmask(
            signal.SIG_BLOCK, signal.valid_signals()
        )  # and MLX's threads made here
        while True:
            future, fn, args, kwargs = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # handed to the caller, like a pool worker does
                future.set_exception(e)
            else:
                future.set_result(result)
            del future, fn, args, kwargs

    def _park(self, timeout: float = 5.0) -> None:
        """At interpreter exit: wait until the thread sits in its queue wait, without the GIL."""
        try:
            self.submit(lambda: None).result(timeout)
        except concurrent.futures.TimeoutError:
            log.warning("the MLX thread is still busy at exit")
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(self._thread.ident or -1)
            if frame is None or (frame.f_code is _WORK_CODE and frame.f_lasti == _WAIT_OFFSET):
                return  # we hold the GIL, so the thread is blocked inside the wait
            time.sleep(0.001)


def _call_offset(func: Callable[..., Any], name: str) -> int:
    """Bytecode offset of the call of method ``name`` in ``func``."""
    seen = False
    for ins in dis.get_instructions(func):
        if ins.argval == name:
            seen = True
        elif seen and ins.opname == "CALL":
            return ins.offset
    raise AssertionError(f"no call of {name} in {func.__qualname__}")


_WORK_CODE = MlxThread._work.__code__
_WAIT_OFFSET = _call_offset(MlxThread._work, "get")


_mlx_thread: MlxThread | None = None


def mlx_executor() -> MlxThread:
    """The process's one MLX thread, started on first use."""
    global _mlx_thread
    if _mlx_thread is None:
        _mlx_thread = MlxThread()
    return _mlx_thread


@dataclass
class _Run:
    """One request's state on the MLX thread."""

    rid: str
    sampler: Sampler | None = None
    decoder: Any = None
    pending: Any = None  # the next token, as an array being evaluated


class LocalBackend:
    """The whole model on this node, behind the Backend protocol."""

    def __init__(
        self,
        model_dir: Path,
        settings: Settings,
        *,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.settings = settings
        self.info: ModelInfo = inspect_model(self.model_dir)
        self._executor = executor or mlx_executor()
        self._engine: ShardEngine | None = None
        self._tokenizer: Tokenizer | None = None
        self._phase = "loading"
        self._admitted: set[str] = set()  # requests counted against max_concurrent
        self._active: set[str] = set()  # requests holding a KV cache (freed on the MLX thread)
        self._idle = asyncio.Event()
        self._idle.set()
        self._outcomes = {"served": 0, "cancelled": 0, "failed": 0}
        self._tokens = 0

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Load the model and tokenizer on the MLX thread."""

        def load() -> tuple[ShardEngine, Tokenizer]:
            return ShardEngine.load(self.model_dir, 0, self.info.num_layers), Tokenizer.load(
                self.model_dir
            )

        self._engine, self._tokenizer = await self._run(load)
        self._phase = "serving"

    async def close(self) -> None:
        """Refuse new requests, wait for running ones to free their caches, drop the model."""
        self._phase = "leaving"
        await self._idle.wait()
        await self._run(self._drop)

    def _drop(self) -> None:
        self._engine = None

    @property
    def active_requests(self) -> int:
        """Requests admitted and not yet freed on the MLX thread."""
        return len(self._active)

    async def wait_idle(self) -> None:
        """Return once no request holds a KV cache."""
        await self._idle.wait()

    # ---------------------------------------------------------------- Backend
    def served_models(self) -> list[str]:
        return [self.info.name]

    def status(self) -> Status:
        ready = self._phase == "serving"
        n = self.info.num_layers
        total = self.info.total_bytes
        s = self.settings
        phase = NodePhase(self._phase)
        return Status(
            node=NodeStatus(id="local", name=s.node_name, http_port=s.http_port, phase=phase),
            ready=ready,
            reason=None if ready else {"loading": "the model is loading",
                                       "leaving": "this node is shutting down"}[self._phase],
            model=ModelStatus(self.info.name, n, total),
            plan=PlanStatus(epoch=0, assignments=(AssignmentStatus("local", 0, n, total),)),
            members=(MemberStatus(id="local", state=MemberState.ALIVE, name=s.node_name,
                                  phase=phase, usable_memory=s.memory_budget, layers=(0, n),
                                  http_port=s.http_port, is_self=True),),
            stats={
                "active_requests": len(self._active),
                "requests_served": self._outcomes["served"],
                "requests_cancelled": self._outcomes["cancelled"],
                "requests_failed": self._outcomes["failed"],
                "tokens_generated": self._tokens,
            },
        )

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        return self._generate(request)

    # ---------------------------------------------------------------- the request
    async def _generate(
        self, request: GenerationRequest
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        if self._phase != "serving":
            raise RequestError(
                "not_ready" if self._phase == "loading" else "leaving",
                "the model is still loading"
                if self._phase == "loading"
                else "this node is shutting down",
                hint="retry in a moment; `ringctl status` shows progress",
            )
        if request.model not in (None, self.info.name):
            raise RequestError(
                "model_not_served",
                f"model {request.model!r} is not served here (served: {self.info.name})",
                hint="leave out model, or name the served one",
            )
        s = self.settings
        if len(self._admitted) >= s.max_concurrent:
            raise RequestError(
                "busy",
                f"{len(self._admitted)} requests are already running on this node "
                f"(max_concurrent = {s.max_concurrent})",
                hint="retry later, or raise max_concurrent",
            )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        deadline = t0 + s.request_timeout
        rid = uuid.uuid4().hex
        self._admitted.add(rid)
        self._active.add(rid)
        self._idle.clear()
        outcome = "failed"
        try:
            params = request.params
            run = _Run(rid)
            ids = await self._run(self._open, request, run)
            room = s.max_context - len(ids)
            if room < 1:
                raise RequestError(
                    "context_length",
                    f"the prompt has {len(ids)} tokens; this node's context "
                    f"holds {s.max_context} (max_context)",
                    hint="shorten the prompt, or raise max_context",
                )
            limit = min(params.max_tokens, room)
            eos = set(self.info.eos_token_ids)
            for start, end in chunks(len(ids), s.prefill_chunk):
                await self._run(self._prefill, run, ids[start:end], end == len(ids))
                _check_deadline(loop, deadline, s.request_timeout)
            stopper = StopMatcher(params.stop)
            t_first = t_last = 0.0
            n = 0
            reason = "length"
            while n < limit:
                tok, text = await self._run(self._step, run, n + 1 < limit, eos)
                t_last = loop.time()
                if n == 0:
                    t_first = t_last
                n += 1
                emit, stopped = stopper.feed(text)
                if not stopped and (tok in eos or n == limit):
                    emit += stopper.flush()
                yield TokenEvent(n - 1, tok, emit)
                if stopped or tok in eos:
                    reason = "stop"
                    break
                _check_deadline(loop, deadline, s.request_timeout)
            self._tokens += n
            outcome = "served"
            yield FinishEvent(
                reason=reason,
                prompt_tokens=len(ids),
                completion_tokens=n,
                time_to_first_token=t_first - t0,
                tokens_per_second=(n - 1) / (t_last - t_first)
                if n > 1 and t_last > t_first
                else 0.0,
            )
        except (GeneratorExit, asyncio.CancelledError):
            if outcome != "served":
                outcome = "cancelled"
            raise
        finally:
            self._outcomes[outcome] += 1
            self._admitted.discard(rid)
            self._release(rid, loop)

    # -------------------------------------------------------- MLX thread jobs
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the MLX thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _release(self, rid: str, loop: asyncio.AbstractEventLoop) -> None:
        """Free the KV cache on the MLX thread (after any step still queued), then forget it."""

        def done(_: concurrent.futures.Future[None]) -> None:
            try:
                loop.call_soon_threadsafe(self._forget, rid)
            except RuntimeError:  # the loop is closed: nobody waits for this request any more
                pass

        self._executor.submit(self._free, rid).add_done_callback(done)

    def _forget(self, rid: str) -> None:
        self._active.discard(rid)
        if not self._active:
            self._idle.set()

    def _free(self, rid: str) -> None:
        if self._engine is not None:
            self._engine.free_request(rid)

    def _open(self, request: GenerationRequest, run: _Run) -> list[int]:
        """Tokenize, make the sampler, and give the request a KV cache."""
        assert self._tokenizer is not None and self._engine is not None
        if request.messages is not None:
            ids = self._tokenizer.encode_chat(list(request.messages))
        else:
            ids = self._tokenizer.encode(request.prompt or "")
        if not ids:
            raise RequestError("bad_request", "the prompt is empty", hint="send some text")
        run.sampler = Sampler(request.params)
        run.decoder = self._tokenizer.new_decoder()
        self._engine.new_request(run.rid)
        return list(ids)

    def _prefill(self, run: _Run, ids: list[int], last: bool) -> None:
        """One prefill chunk; the last one leaves the first token evaluating."""
        assert self._engine is not None
        x = mx.array(ids, dtype=mx.int32)
        if not last:
            self._engine.forward(run.rid, x)
            return
        assert run.sampler is not None
        run.pending = run.sampler.sample_lazy(self._engine.forward(run.rid, x, lazy=True))
        mx.async_eval(run.pending)

    def _step(self, run: _Run, more: bool, eos: set[int]) -> tuple[int, str]:
        """The pending token and its new text; with ``more`` the next step starts first, overlapped.

        The last token's text (EOS, or no ``more``) includes what the decoder held back.
        """
        assert self._engine is not None and run.sampler is not None
        y = run.pending
        if more:
            run.pending = run.sampler.sample_lazy(
                self._engine.forward(run.rid, y.reshape(1), lazy=True)
            )
            mx.async_eval(run.pending)
        tok = int(y.item())
        if tok in eos:
            return tok, run.decoder.flush()
        text = run.decoder.add(tok)
        return tok, text if more else text + run.decoder.flush()


def _check_deadline(loop: asyncio.AbstractEventLoop, deadline: float, timeout: float) -> None:
    if loop.time() > deadline:
        raise RequestError(
            "timeout",
            f"the request ran longer than request_timeout ({timeout:g} s)",
            hint="ask for fewer tokens, or raise request_timeout",
        )
