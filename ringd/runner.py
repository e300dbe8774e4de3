"""The ring's request path on one node: the entry role and the stage role.

Entry (any node a prompt reaches): tokenizes, sends the prompt in prefill chunks to the
owner of layer 0, turns the tokens coming back into text, applies stop strings, and ends
the request on every node. Stage (every node on the plan): runs its layers on whatever
activation arrives -- for any request, in arrival order -- and forwards the result; the
owner of the last layer samples and sends the token to the owner of layer 0 (next step)
and to the entry (streaming).

Decisions come from the pure core (:mod:`ringd.core.pipeline`); compute runs on the one
MLX thread through :class:`ringd.compute.stage.StageCompute`; messages leave through the
``send`` callable the daemon gives (which short-cuts to ourselves without a socket).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import concurrent.futures
import dataclasses
import logging
import struct
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from ringd.compute.local_backend import mlx_executor
from ringd.compute.stage import Fault, StageCompute
from ringd.compute.tokenizer import Tokenizer
from ringd.config import Settings
from ringd.core import wire
from ringd.core.pipeline import (RequestTable, Route, StopMatcher, check_activation, check_complete,
                                 chunks, epoch_error, prefill_chunk_tokens)
from ringd.core.proof import name_nodes
from ringd.core.requests import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from ringd.errors import ErrorCode, RequestError

log = logging.getLogger(__name__)

Send = Callable[[str, wire.Message], None]
STALE_TOLD = 1024  # request ids remembered as told of a stale epoch (one Error each)


@dataclass
class _Entry:
    """A request this node is the entry for."""

    rid: str
    route: Route
    prompt_tokens: int = 0
    limit: int = 0
    done: bool = False  # ended normally (its caches are freed with reason "done")
    queue: asyncio.Queue[wire.Token | RequestError] = field(default_factory=asyncio.Queue)


@dataclass
class _Flow:
    """What a stage remembers of a request besides the table record."""

    sampling: wire.Sampling
    produced: int = 0  # tokens sampled (last stage)
    continued: int = -1  # the last step whose token started the next step here (first stage)


class RingRunner:
    """Implements :class:`ringd.core.requests.Backend` over the ring."""

    def __init__(self, settings: Settings, node_id: str, tokenizer: Tokenizer, model_name: str,
                 eos_token_ids: tuple[int, ...], send: Send,
                 not_ready_reason: Callable[[], str] = lambda: "the ring is not ready") -> None:
        self.settings = settings
        self.node_id = node_id
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.eos = frozenset(eos_token_ids)
        self.send = send
        self.not_ready_reason = not_ready_reason
        self.executor = mlx_executor()  # the process's one MLX thread
        self.route: Route | None = None  # set while serving
        self.compute: StageCompute | None = None
        self.names: dict[str, str] = {}  # node id -> name, for error messages
        self.leaving = False
        self.table = RequestTable(capacity=4 * settings.max_concurrent + 8,
                                  idle_timeout=settings.request_timeout)
        self._flows: dict[str, _Flow] = {}
        self._prefill_chunk = settings.prefill_chunk  # lowered by serve() to fit a frame
        # Activations that arrived ahead of their position (a big prefill chunk on TCP
        # overtaken by a small one on UDP): request id -> position -> (message, sender).
        self._early: dict[str, dict[int, tuple[wire.Activation, str]]] = {}
        self._entries: dict[str, _Entry] = {}
        self._stale_told: OrderedDict[str, None] = OrderedDict()  # requests told of their stale epoch
        self.idle = asyncio.Event()  # set while no request has this node as its entry
        self.idle.set()
        self.counters = {"requests_served": 0, "requests_failed": 0, "tokens_generated": 0,
                         "steps_computed": 0, "coverage_errors": 0}
        self._compute_seconds = 0.0
        #: Decode rate of the last request from this entry with at least RATE_MIN_TOKENS tokens.
        self.last_rate: dict[str, float] | None = None

    # ---------------------------------------------------------------- serving control
    def serve(self, route: Route, compute: StageCompute,
              names: dict[str, str] | None = None) -> None:
        """Start serving ``route`` with this node's loaded shard; ``names``: node id -> name."""
        if compute.fault is Fault.STALE_EPOCH:
            route = Route(max(0, route.epoch - 1), route.stages, route.num_layers)  # test hook
        self.route, self.compute = route, compute
        self.names = dict(names or {})
        info = compute.engine.info
        item = wire.DTYPE_SIZES[info.activation_dtype]
        self._prefill_chunk = prefill_chunk_tokens(self.settings.prefill_chunk, info.hidden_size, item,
                                                   wire.TCP_MAX_FRAME)
        if self._prefill_chunk < self.settings.prefill_chunk:
            log.warning("prefill_chunk = %d makes activation frames of %d MiB, above the %d MiB a peer "
                        "accepts: prompts go in chunks of %d tokens", self.settings.prefill_chunk,
                        self.settings.prefill_chunk * info.hidden_size * item >> 20, wire.TCP_MAX_FRAME >> 20,
                        self._prefill_chunk)
        log.info("serving plan epoch %d as layers %s", route.epoch,
                 (lambda s: f"[{s.start}, {s.end})")(route.stage_of(self.node_id)))

    def stop_serving(self, reason: str, *, code: str = "not_ready") -> None:
        """Fail every running request with ``reason`` and free every KV cache here."""
        if self.route is None and not self._entries:
            return
        self.route = None
        err = RequestError(code, f"the ring stopped serving: {reason}",
                           hint="retry once `ringctl status` shows the ring ready again")
        for entry in list(self._entries.values()):
            entry.queue.put_nowait(err)
        now = time.monotonic()
        self.table.clear(now)
        self._flows.clear()
        self._early.clear()
        if self.compute is not None:
            self.executor.submit(self.compute.free_all)

    async def close(self) -> None:
        self.leaving = True
        self.stop_serving("this node is shutting down")
        await self.run_compute(lambda: None)  # let queued frees finish

    async def run_compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---------------------------------------------------------------- Backend
    def served_models(self) -> list[str]:
        return [self.model_name]

    def status(self) -> dict[str, Any]:
        return {"active_entries": len(self._entries), "active_stage_requests": len(self.table.requests),
                **self.counters, "compute_seconds": round(self._compute_seconds, 3),
                "last_rate": self.last_rate}

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        return self._generate(request)

    def _admit(self, model: str | None) -> Route:
        """The route a new request from this entry runs on; RequestError when it cannot start."""
        s = self.settings
        if self.leaving:
            raise RequestError("leaving", "this node is shutting down", hint="send the request to another node")
        route = self.route
        if route is None:
            raise RequestError("not_ready", f"the ring is not ready: {self.not_ready_reason()}",
                               hint="`ringctl status` shows what the ring is waiting for")
        if model not in (None, self.model_name):
            raise RequestError("model_not_served", f"model {model!r} is not served by this ring "
                               f"(served: {self.model_name})", hint="leave out model, or name the served one")
        if len(self._entries) >= s.max_concurrent:
            raise RequestError("busy", f"{len(self._entries)} requests are already running from this node "
                               f"(max_concurrent = {s.max_concurrent})", hint="retry later, or raise max_concurrent")
        return route

    def _send_prompt(self, route: Route, rid: str, ids: list[int], sampling: wire.Sampling) -> None:
        for a, b in chunks(len(ids), self._prefill_chunk):
            self.send(route.first.node_id, wire.Activation(
                rid, 0, a, route.epoch, 0, 0, self.node_id, sampling, b == len(ids), tokens_tensor(ids[a:b])))

    async def _next_token(self, entry: _Entry, deadline: float) -> wire.Token:
        loop = asyncio.get_running_loop()
        try:
            item = await asyncio.wait_for(entry.queue.get(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise RequestError("timeout", f"the request ran longer than request_timeout "
                               f"({self.settings.request_timeout:g} s)",
                               hint="raise request_timeout, or ask for fewer tokens") from None
        if isinstance(item, RequestError):
            raise item
        return item

    @contextlib.contextmanager
    def _entered(self, route: Route) -> Iterator[_Entry]:
        """A request with this node as its entry: counted against max_concurrent while it
        runs, and ended on every node of its route when it stops, whichever way it stops."""
        entry = _Entry(uuid.uuid4().hex, route)
        self._entries[entry.rid] = entry
        self.idle.clear()
        try:
            yield entry
        finally:
            del self._entries[entry.rid]
            if not self._entries:
                self.idle.set()
            if not entry.done:
                self.counters["requests_failed"] += 1
            self._end_everywhere(route, entry.rid, "done" if entry.done else "cancelled")

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        s = self.settings
        route = self._admit(request.model)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with self._entered(route) as entry:
            rid = entry.rid
            ids = await asyncio.to_thread(self._encode, request)
            room = s.max_context - len(ids)
            if room < 1:
                raise RequestError("context_length", f"the prompt has {len(ids)} tokens; the ring's context "
                                   f"holds {s.max_context} (max_context)", hint="shorten the prompt, or raise max_context")
            params = request.params
            entry.prompt_tokens, entry.limit = len(ids), min(params.max_tokens, room)
            sampling = wire.Sampling(params.temperature, params.top_p, params.top_k, params.seed, entry.limit)
            self._send_prompt(route, rid, ids, sampling)
            decoder = self.tokenizer.new_decoder()
            stopper = StopMatcher(params.stop)
            n, reason, t_first, t_last = 0, "length", 0.0, 0.0
            deadline = t0 + s.request_timeout
            while True:
                item = await self._next_token(entry, deadline)
                t_last = loop.time()
                if n == 0:
                    t_first = t_last
                n += 1
                tok = item.token_id
                last = item.finished
                if tok in self.eos:
                    text = decoder.flush()
                else:
                    text = decoder.add(tok) + (decoder.flush() if last else "")
                emit, stopped = stopper.feed(text)
                if last and not stopped:
                    emit += stopper.flush()
                yield TokenEvent(n - 1, tok, emit)
                if stopped or last:
                    reason = "stop" if stopped or item.finish_reason == "stop" else "length"
                    break
            entry.done = True
            self.counters["requests_served"] += 1
            self.counters["tokens_generated"] += n
            rate = (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else 0.0
            if n >= RATE_MIN_TOKENS:
                self.last_rate = {"tokens_per_second": rate, "tokens": n}
            yield FinishEvent(reason=reason, prompt_tokens=entry.prompt_tokens, completion_tokens=n,
                              time_to_first_token=t_first - t0, tokens_per_second=rate,
                              extra={"request_id": rid, "epoch": route.epoch})

    def _encode(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            ids = self.tokenizer.encode_chat(list(request.messages))
        else:
            ids = self.tokenizer.encode(request.prompt or "")
        if not ids:
            raise RequestError("bad_request", "the prompt is empty", hint="send some text")
        return list(ids)

    async def trace(self, prompt: str, steps: int) -> dict[str, Any]:
        """Run ``prompt`` (raw text) greedily for up to ``steps`` tokens with the last stage's
        logits attached to every token, for ``ringctl verify``.

        Returns the prompt's token ids, the tokens, their float32 logits (base64 of the raw
        little-endian bytes), and the route the request took (node ids, names, layers).
        """
        route = self._admit(None)
        ids = await asyncio.to_thread(self._encode, GenerationRequest(prompt=prompt))
        if len(ids) + steps > self.settings.max_context:
            raise RequestError("context_length", f"{len(ids)} prompt tokens + {steps} steps exceed "
                               f"max_context ({self.settings.max_context})",
                               hint="ask for fewer steps")
        loop = asyncio.get_running_loop()
        tokens: list[wire.Token] = []
        with self._entered(route) as entry:
            entry.prompt_tokens, entry.limit = len(ids), steps
            self._send_prompt(route, entry.rid, ids, wire.Sampling(max_tokens=steps, want_logits=True))
            deadline = loop.time() + self.settings.request_timeout
            while not tokens or not tokens[-1].finished:
                tokens.append(await self._next_token(entry, deadline))
            entry.done = True
        missing = [t.step for t in tokens if t.logits is None]
        if missing:
            raise RequestError("internal", f"the last stage sent no logits for steps {missing}",
                               hint="every node must run the same ringd version")
        return {
            "model": self.model_name, "epoch": route.epoch, "prompt_ids": ids,
            "tokens": [t.token_id for t in tokens],
            "logits": [base64.b64encode(t.logits.data).decode()
                       for t in tokens if t.logits is not None],
            "stages": [{"node_id": st.node_id, "name": self.names.get(st.node_id, st.node_id),
                        "start": st.start, "end": st.end} for st in route.stages],
        }

    def _end_everywhere(self, route: Route, rid: str, reason: str) -> None:
        for node in route.node_ids:
            self.send(node, wire.Cancel(rid, reason))

    # ---------------------------------------------------------------- inbound
    def on_message(self, msg: wire.Message, sender: str) -> None:
        """Dispatch a data-plane message (called on the loop thread)."""
        if isinstance(msg, wire.Activation):
            self._on_activation(msg, sender)
        elif isinstance(msg, wire.Token):
            self._on_token(msg, sender)
        elif isinstance(msg, wire.Cancel):
            self._on_cancel(msg)
        elif isinstance(msg, wire.Error):
            self._on_error(msg, sender)

    def on_stale(self, msg: wire.Message, sender: str, serving: int) -> None:
        """An Activation of another plan epoch than ``serving``, dropped by the transport's
        filter: tell its entry why, once per request, so the request fails now and says so
        instead of running into request_timeout."""
        if not isinstance(msg, wire.Activation) or msg.request_id in self._stale_told:
            return
        self._stale_told[msg.request_id] = None
        if len(self._stale_told) > STALE_TOLD:
            self._stale_told.popitem(last=False)
        self._fail(msg.request_id, msg.entry, epoch_error(sender, self.node_id, msg.epoch, serving))

    def _fail(self, rid: str, entry_node: str, err: RequestError) -> None:
        """A stage cannot go on with ``rid``: free it here, tell the entry."""
        if err.code == "coverage":
            self.counters["coverage_errors"] += 1
        message = name_nodes(err.message, self.names)
        if err.hint:
            message += f" (hint: {err.hint})"
        log.warning("request %s failed here: %s", rid[:8], message)
        self._free(rid)
        self.send(entry_node, wire.Error(rid, err.code.value, message[: wire.MAX_TEXT]))

    def _free(self, rid: str) -> None:
        known = self.table.end(rid, time.monotonic())
        self._flows.pop(rid, None)
        self._early.pop(rid, None)
        if known and self.compute is not None:
            compute = self.compute
            self.executor.submit(compute.free, rid)

    def _on_activation(self, msg: wire.Activation, sender: str) -> None:
        rec = self.table.requests.get(msg.request_id)
        expected = rec.next_position if rec is not None else 0
        if msg.position > expected and msg.request_id not in self.table.finished:
            held = self._early.setdefault(msg.request_id, {})
            if len(held) < MAX_EARLY and sum(map(len, self._early.values())) < 8 * MAX_EARLY:
                held[msg.position] = (msg, sender)
                return
            self._early.pop(msg.request_id, None)
            self._fail(msg.request_id, msg.entry, RequestError(
                "internal", f"node {self.node_id}: too many out-of-order activations for one request"))
            return
        self._step(msg, sender)
        nxt = self._early.get(msg.request_id)
        while nxt:
            rec = self.table.requests.get(msg.request_id)
            if rec is None or rec.next_position not in nxt:
                break
            self._step(*nxt.pop(rec.next_position))
        if not nxt:
            self._early.pop(msg.request_id, None)

    def _step(self, msg: wire.Activation, sender: str) -> None:
        route, compute = self.route, self.compute
        if route is None or compute is None:
            self._fail(msg.request_id, msg.entry, RequestError("not_ready", f"node {self.node_id} is not serving"))
            return
        try:
            stage = check_activation(route, self.node_id, epoch=msg.epoch, layer_lo=msg.layer_lo,
                                     layer_hi=msg.layer_hi, sender=sender)
            ran_lo, ran_hi = compute.layers  # the span this step really passes through here
            if ran_lo != stage.start:
                raise RequestError("coverage", f"node {self.node_id} holds layers [{ran_lo}, {ran_hi}) "
                                   f"but plan epoch {route.epoch} routes layers "
                                   f"[{stage.start}, {stage.end}) to it",
                                   hint="the node loaded the wrong layers; no token was produced")
            length = msg.tensor.shape[0] if stage.start == 0 else msg.tensor.shape[1] if len(msg.tensor.shape) == 3 else -1
            if length < 1:
                raise RequestError("internal", f"activation for {msg.request_id[:8]} has shape {msg.tensor.shape}")
            rec, created = self.table.admit(msg.request_id, entry=msg.entry, epoch=msg.epoch,
                                            position=msg.position, length=length, now=time.monotonic())
        except RequestError as e:
            self._fail(msg.request_id, msg.entry, e)
            return
        if created:
            self._flows[msg.request_id] = _Flow(msg.sampling)
        is_last = route.next_stage(self.node_id) is None
        if is_last:
            try:
                check_complete(route, layer_lo=0, layer_hi=ran_hi, sender=sender,
                               self_id=self.node_id)
            except RequestError as e:
                self._fail(msg.request_id, msg.entry, e)
                return
        params = SamplingParams(msg.sampling.temperature, msg.sampling.top_p, msg.sampling.top_k,
                                msg.sampling.seed, msg.sampling.max_tokens)
        started = time.perf_counter()
        fut = self.executor.submit(compute.step, msg.request_id, msg.tensor, new=created, final=msg.final,
                                   params=params, logits=msg.sampling.want_logits)
        loop = asyncio.get_running_loop()
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._after_step, f, msg, route,
                                                                  ran_hi, started))

    def _after_step(self, fut: concurrent.futures.Future, msg: wire.Activation, route: Route, end: int,
                    started: float) -> None:
        self._compute_seconds += time.perf_counter() - started
        rid = msg.request_id
        if rid not in self.table.requests or self.route is not route:
            return  # cancelled or the plan changed while computing
        exc = fut.exception()
        if exc is not None:
            log.error("compute failed for request %s: %s", rid[:8], exc, exc_info=exc)
            self._fail(rid, msg.entry, RequestError("internal", f"node {self.node_id} failed to compute layers: {exc}"))
            return
        self.counters["steps_computed"] += 1
        out = fut.result()
        nxt = route.next_stage(self.node_id)
        if nxt is not None:
            self.send(nxt.node_id, wire.Activation(rid, msg.step, msg.position, msg.epoch, 0, end, msg.entry,
                                                   msg.sampling, msg.final, out))
            return
        if out is None:
            return  # a prefill chunk before the last: the cache is filled, nothing to sample
        out, logits = out if isinstance(out, tuple) else (out, None)
        flow = self._flows[rid]
        flow.produced += 1
        reason = "stop" if out in self.eos else "length" if flow.produced >= msg.sampling.max_tokens else None
        token = wire.Token(rid, msg.step, msg.epoch, int(out), 0, end, reason, logits)
        self.send(msg.entry, token)
        if reason is None and route.first.node_id != msg.entry:
            # the entry, if it is the first stage, goes on by itself
            self.send(route.first.node_id, dataclasses.replace(token, logits=None))

    def _on_token(self, msg: wire.Token, sender: str) -> None:
        entry = self._entries.get(msg.request_id)
        route = self.route
        if entry is not None:
            who = name_nodes(f"node {sender}", self.names)
            if msg.epoch != entry.route.epoch:
                self.counters["coverage_errors"] += 1
                entry.queue.put_nowait(RequestError(
                    "coverage", f"{who} sent a token of plan epoch {msg.epoch} for a request on "
                    f"epoch {entry.route.epoch}; no token is shown",
                    hint="a node is routing with another plan"))
            elif (msg.layer_lo, msg.layer_hi) != (0, entry.route.num_layers):
                self.counters["coverage_errors"] += 1
                entry.queue.put_nowait(RequestError(
                    "coverage", f"{who} sent a token for layers [{msg.layer_lo}, {msg.layer_hi}) "
                    f"of {entry.route.num_layers}; no token is shown"))
            else:
                if msg.logits is not None:  # keep them past the receive buffer's reuse
                    g = msg.logits
                    msg = dataclasses.replace(msg, logits=wire.Tensor(g.dtype, g.shape,
                                                                      bytes(g.data)))
                entry.queue.put_nowait(msg)
        if msg.finished or route is None or route.first.node_id != self.node_id:
            return
        rec = self.table.requests.get(msg.request_id)
        flow = self._flows.get(msg.request_id)
        if rec is None or flow is None:
            return  # ended meanwhile
        if msg.step <= flow.continued:
            return  # a duplicate: each step goes on exactly once
        flow.continued = msg.step
        # The next step starts here, at the owner of layer 0, with the sampled token.
        self._on_activation(wire.Activation(msg.request_id, msg.step + 1, rec.next_position, msg.epoch, 0, 0,
                                            rec.entry, flow.sampling, True, tokens_tensor([msg.token_id])),
                            sender=self.node_id)

    def _on_cancel(self, msg: wire.Cancel) -> None:
        self._free(msg.request_id)

    def _on_error(self, msg: wire.Error, sender: str) -> None:
        entry = self._entries.get(msg.request_id)
        if entry is not None:
            code = ErrorCode.parse(msg.code)
            entry.queue.put_nowait(RequestError(code, name_nodes(f"node {sender}: {msg.message}",
                                                                 self.names)))

    def expire(self, now: float) -> None:
        """Free stage requests idle beyond request_timeout (their entry is gone)."""
        for rid in self.table.expired(now):
            log.info("request %s idle for %.0f s: freeing its cache", rid[:8], self.table.idle_timeout)
            self._free(rid)


MAX_EARLY = 64
RATE_MIN_TOKENS = 16  # shorter requests give too noisy a decode rate to judge against the ceiling


def tokens_tensor(ids: list[int]) -> wire.Tensor:
    """Token ids as the int32 tensor the first shard takes (little-endian, like every tensor body)."""
    return wire.Tensor("int32", (len(ids),), struct.pack(f"<{len(ids)}i", *ids))
