"""The request path's adapter: executes what :class:`ringd.core.pipeline.Pipeline` decides.

It feeds the pipeline what arrives (messages, finished MLX jobs, its one timer), carries
out the effects -- a :class:`Send` through the ``send`` callable (the transport, which
owns addresses), a :class:`Compute` on the one MLX thread, a :class:`Free` after it, a
:class:`Deliver` into the waiting request's queue -- and re-arms the timer. As the entry it
is the :class:`ringd.core.requests.Backend` generation side: tokenize, open, stream text
through :class:`ringd.core.textstream.TextStream`, close.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterator

from ringd.admission import AdmissionQueue
from ringd.compute.stage import StageCompute
from ringd.compute.tokenizer import Tokenizer
from ringd.core import wire
from ringd.config import Settings
from ringd.core.pipeline import (Compute, Deliver, EntryRequest, Free, Pipeline, PipelineConfig,
                                 Send, ServedModel, StepResult)
from ringd.core.requests import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from ringd.core.route import Route, prefill_chunk_tokens
from ringd.core.schedule import ScheduleConfig, Scheduler
from ringd.core.stream import TCP_MAX_FRAME
from ringd.core.textstream import TextStream
from ringd.errors import RequestError

log = logging.getLogger(__name__)

SendFn = Callable[[str, wire.Message], None]
RATE_MIN_TOKENS = 16  # shorter requests give too noisy a decode rate to judge against the ceiling


def pipeline_config(settings: Settings) -> PipelineConfig:
    return PipelineConfig(max_concurrent=settings.max_concurrent,
                          max_context=settings.max_context,
                          request_timeout=settings.request_timeout,
                          step_timeout=settings.step_timeout)


def schedule_config(settings: Settings) -> ScheduleConfig:
    return ScheduleConfig(mode=settings.schedule, slice_tokens=settings.prefill_slice)


def served_model(settings: Settings, info: Any) -> ServedModel:
    """What the request path needs of a model (``info``: a ModelInfo).

    Prefill chunks are lowered so that one chunk's hidden states fit one frame (a peer
    refuses larger ones), with one warning.
    """
    item = wire.DTYPE_SIZES[info.activation_dtype]
    chunk = prefill_chunk_tokens(settings.prefill_chunk, info.hidden_size, item,
                                 TCP_MAX_FRAME)
    if chunk < settings.prefill_chunk:
        log.warning("prefill_chunk = %d makes activation frames of %d MiB, above the %d MiB a "
                    "peer accepts: prompts go in chunks of %d tokens", settings.prefill_chunk,
                    settings.prefill_chunk * info.hidden_size * item >> 20,
                    TCP_MAX_FRAME >> 20, chunk)
    return ServedModel(info.name, frozenset(info.eos_token_ids), chunk)


@dataclasses.dataclass
class _Opened:
    entry: EntryRequest
    queue: asyncio.Queue[wire.Token | RequestError]
    done: bool = False


class Runner:
    """One node's request path on the event loop; loop thread only."""

    def __init__(self, pipeline: Pipeline, *, executor: concurrent.futures.Executor,
                 send: SendFn,
                 not_ready_reason: Callable[[], str] = lambda: "the ring is not ready",
                 active_model: Callable[[], str | None] = lambda: None,
                 max_queued: int = 32, queue_timeout: float = 60.0,
                 schedule: ScheduleConfig = ScheduleConfig(),
                 on_busy: Callable[[], None] = lambda: None) -> None:
        self.pipeline = pipeline
        #: This node's MLX jobs wait here; one at a time runs on the MLX thread.
        self.scheduler = Scheduler(schedule)
        self._running: Compute | None = None
        self.on_busy = on_busy  # called when the first request starts or the last one ends
        #: requests waiting for a slot or for a re-plan
        self.admission = AdmissionQueue(max_queued, queue_timeout)
        self.tokenizer: Tokenizer | None = None  # the served model's, while serving
        self.active_model = active_model  # the ring's model setting, while not serving
        self.executor = executor
        self.send = send
        self.not_ready_reason = not_ready_reason
        self.compute: StageCompute | None = None  # this node's loaded layers, if any
        self.idle = asyncio.Event()  # set while no request has this node as its entry
        self.idle.set()
        #: Decode rate of the last request from this entry with at least RATE_MIN_TOKENS tokens.
        self.last_rate: dict[str, float] | None = None
        self._queues: dict[str, asyncio.Queue[wire.Token | RequestError]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._compute_seconds = 0.0

    # ---------------------------------------------------------------- serving control
    def serve(self, route: Route, compute: StageCompute | None, names: dict[str, str],
              model: ServedModel, tokenizer: Tokenizer) -> None:
        """Run requests of ``model`` on ``route`` with this node's shard (None: an entry-only
        node)."""
        self.compute, self.tokenizer = compute, tokenizer
        paused = self.pipeline.paused
        self.pipeline.serve(route, compute.layers if compute is not None else None, names,
                            model, time.monotonic())
        stage = route.stage_of(self.pipeline.node_id)
        log.info("serving plan epoch %d %s%s", route.epoch,
                 f"as layers [{stage.start}, {stage.end})" if stage else "as an entry only",
                 f"; {paused} paused requests replayed" if paused else "")
        self.admission.replanning = False
        self.flush()
        self._wake()

    def stop_serving(self, reason: str, *, code: str = "not_ready", pause: bool = False) -> None:
        """Stop running requests here. ``pause``: the ring re-plans; the requests this node is
        the entry of wait to be replayed, and new ones wait for the new plan (bounded)."""
        self.pipeline.stop_serving(reason, code=code, pause=pause, now=time.monotonic())
        self.admission.replanning = pause
        self.flush()
        if not pause:
            self._wake(everyone=True)

    def fail_paused(self, reason: str) -> None:
        """The ring cannot serve again (too small for the model, ...): paused requests and
        those waiting for the new plan end with ``reason``."""
        self.admission.replanning = False
        self.pipeline.fail_paused(reason)
        self.flush()
        self._wake(everyone=True)

    async def close(self) -> None:
        self.pipeline.leaving = True
        self.stop_serving("this node is shutting down")
        if self._timer is not None:
            self._timer.cancel()
        await asyncio.get_running_loop().run_in_executor(self.executor, lambda: None)

    # ---------------------------------------------------------------- inputs
    def receive(self, msg: wire.Message, sender: str) -> None:
        """A data-plane message from a peer (loop thread)."""
        self.pipeline.receive(msg, sender, time.monotonic())
        self.flush()

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, None
        self.pipeline.handle_timer(time.monotonic())
        self.flush()

    def _computed(self, job: Compute, fut: concurrent.futures.Future[StepResult],
                  started: float, done: float) -> None:
        self._running = None
        self._compute_seconds += done - started
        exc = fut.exception()
        if exc is not None:
            if job.request_id in self._queues or self.pipeline.active_stages:
                log.error("compute failed for request %s: %s", job.request_id[:8], exc,
                          exc_info=exc)
            self.pipeline.compute_failed(job, str(exc), time.monotonic())
        else:
            self.pipeline.computed(job, fut.result(), time.monotonic())
        self.flush()
        # handoff: the result waiting for the loop, the loop turning it into messages and
        # handing them to the transport
        self.scheduler.finished(job, done - started, time.perf_counter() - done,
                                now=time.monotonic())

    # ---------------------------------------------------------------- effects
    def flush(self) -> None:
        """Carry out every pending effect, then re-arm the timer."""
        while effects := self.pipeline.effects():
            for eff in effects:
                kind = type(eff)
                if kind is Send:
                    self.send(eff.node_id, eff.msg)  # type: ignore[union-attr]
                elif kind is Compute:
                    self._queue(eff)  # type: ignore[arg-type]
                elif kind is Free:
                    self.scheduler.drop(eff.request_id)  # type: ignore[union-attr]
                    if self.compute is not None:
                        self.executor.submit(self.compute.free, eff.request_id)
                elif kind is Deliver:
                    self._deliver(eff)  # type: ignore[arg-type]
        self._run_next()
        at = self.pipeline.get_timer()
        if at != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = (None if at is None else asyncio.get_running_loop().call_later(
                max(0.0, at - time.monotonic()), self._on_timer))

    def _queue(self, job: Compute) -> None:
        if self.compute is None:
            self.pipeline.compute_failed(job, "no layers are loaded here", time.monotonic())
        else:
            self.scheduler.push(job, time.monotonic())

    def _run_next(self) -> None:
        """Start the job the scheduler picks when the MLX thread is free: one at a time, so
        that the order is the scheduler's (a running stream's decode step before the next
        slice of a long prompt), not the arrival order."""
        compute = self.compute
        while self._running is None and compute is not None:
            job = self.scheduler.pop(time.monotonic(),
                                     alone=self.pipeline.active_stages <= 1)
            if job is None:
                return
            if not self.pipeline.wants(job):
                continue  # it ended, or the plan changed, while the job waited
            self._running = job
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            fut = self.executor.submit(compute.step, job)
            fut.add_done_callback(lambda f, job=job, started=started: loop.call_soon_threadsafe(
                self._computed, job, f, started, time.perf_counter()))

    def timings(self) -> dict[str, Any]:
        """This node's recent MLX jobs: queueing, compute and handoff times (ms p50/p99),
        decode step and prefill time per token, over the last ``window_s`` seconds."""
        return self.scheduler.timings()

    def _deliver(self, eff: Deliver) -> None:
        queue = self._queues.get(eff.request_id)
        if queue is None:
            return
        item = eff.item
        if isinstance(item, wire.Token) and item.logits is not None:
            g = item.logits  # keep them past the receive buffer's reuse
            item = dataclasses.replace(item, logits=wire.Tensor(g.dtype, g.shape, bytes(g.data)))
        queue.put_nowait(item)

    # ---------------------------------------------------------------- entry role
    def served_models(self) -> list[str]:
        """The model requests run on; while not serving, the one the ring is setting up."""
        model = self.pipeline.model
        name = model.name if model is not None else self.active_model()
        return [name] if name else []

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        return self._generate(request)

    async def _generate(self, request: GenerationRequest
                        ) -> AsyncIterator[TokenEvent | FinishEvent]:
        started = time.monotonic()
        model, tokenizer = await self.admission.admit(self._check_admission)
        ids = await asyncio.to_thread(self._encode, request, tokenizer)
        params = request.params
        if not params.greedy and params.seed is None:
            # the entry draws the seed, so that a replay on another plan draws the same tokens
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        with self._opened(ids, params, model) as opened:
            stream = TextStream(tokenizer.new_decoder(), request.params.stop, model.eos,
                                started)
            while True:
                token = await self._next(opened)
                event, done = stream.feed(token.token_id, token.finish_reason, time.monotonic())
                yield event
                if done:
                    break
            opened.done = True
            if stream.tokens >= RATE_MIN_TOKENS:
                self.last_rate = {"tokens_per_second": stream.tokens_per_second,
                                  "tokens": stream.tokens}
            entry = opened.entry
            yield stream.finish(entry.prompt_tokens, {"request_id": entry.request_id,
                                                      "epoch": entry.route.epoch})

    async def trace(self, prompt: str, steps: int) -> dict[str, Any]:
        """Run ``prompt`` (raw text) greedily for up to ``steps`` tokens with the last stage's
        logits attached to every token, for ``ringctl verify``.

        Returns the prompt's token ids, the tokens, their float32 logits (base64 of the raw
        little-endian bytes), and the route the request took (node ids, names, layers).
        """
        model, tokenizer = await self.admission.admit(self._check_admission)
        ids = await asyncio.to_thread(self._encode, GenerationRequest(prompt=prompt), tokenizer)
        limit = self.pipeline.config.max_context
        if len(ids) + steps > limit:
            raise RequestError("context_length", f"{len(ids)} prompt tokens + {steps} steps "
                               f"exceed max_context ({limit})", hint="ask for fewer steps")
        tokens: list[wire.Token] = []
        sampling = SamplingParams(max_tokens=steps, want_logits=True)
        with self._opened(ids, sampling, model) as opened:
            while not tokens or not tokens[-1].finished:
                tokens.append(await self._next(opened))
            opened.done = True
        missing = [t.step for t in tokens if t.logits is None]
        if missing:
            raise RequestError("internal", f"the last stage sent no logits for steps {missing}",
                               hint="every node must run the same ringd version")
        route, names = opened.entry.route, self.pipeline.names
        return {
            "model": model.name, "epoch": route.epoch, "prompt_ids": ids,
            "tokens": [t.token_id for t in tokens],
            "logits": [base64.b64encode(t.logits.data).decode()
                       for t in tokens if t.logits is not None],
            "stages": [{"node_id": st.node_id, "name": names.get(st.node_id, st.node_id),
                        "start": st.start, "end": st.end} for st in route.stages],
        }

    def _wake(self, *, everyone: bool = False) -> None:
        """Let the first waiters try again: as many as there are free slots (or all)."""
        self.admission.wake(None if everyone else
                            self.pipeline.config.max_concurrent - self.pipeline.active_entries)

    def _check_admission(self) -> tuple[ServedModel, Tokenizer]:
        """Refuse early (before tokenizing) what :meth:`Pipeline.open` would refuse; the
        served model and its tokenizer."""
        try:
            self.pipeline.check_admission()
        except RequestError as e:
            if e.code != "not_ready":
                raise
            raise RequestError("not_ready", f"the ring is not ready: {self.not_ready_reason()}",
                               hint=e.hint) from None
        assert self.pipeline.model is not None and self.tokenizer is not None
        return self.pipeline.model, self.tokenizer

    @contextlib.contextmanager
    def _opened(self, ids: list[int], sampling: SamplingParams,
                model: ServedModel) -> Iterator[_Opened]:
        """A request of ``model`` (its prompt tokenized for it) with this node as its entry,
        ended on every node of its route when it stops, whichever way it stops."""
        rid = uuid.uuid4().hex
        queue: asyncio.Queue[wire.Token | RequestError] = asyncio.Queue()
        self._queues[rid] = queue
        if self.idle.is_set():
            self.idle.clear()
            self.on_busy()
        opened: _Opened | None = None
        try:
            if self.pipeline.model != model:
                raise RequestError("not_ready", "the ring switched to another model while "
                                   "this request started", hint="send it again")
            entry = self.pipeline.open(rid, ids, sampling, time.monotonic())
            opened = _Opened(entry, queue)
            self.flush()
            yield opened
        finally:
            del self._queues[rid]
            self.pipeline.close(rid, time.monotonic(), done=opened is not None and opened.done)
            self.flush()
            if not self._queues:
                self.idle.set()
                self.on_busy()
            self._wake()

    @staticmethod
    async def _next(opened: _Opened) -> wire.Token:
        item = await opened.queue.get()
        if isinstance(item, RequestError):
            raise item
        return item

    def _encode(self, request: GenerationRequest, tokenizer: Tokenizer) -> list[int]:
        if request.messages is not None:
            return list(tokenizer.encode_chat(list(request.messages)))
        return list(tokenizer.encode(request.prompt or ""))

    # ---------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        t = self.scheduler.timings()
        return {**self.pipeline.stats(), "queued": len(self.admission),
                "schedule": {k: t[k] for k in ("mode", "slice_tokens", "queued_jobs", "jobs",
                                               "slices", "dropped")},
                "compute_seconds": round(self._compute_seconds, 3), "last_rate": self.last_rate}
