"""Every request one node takes part in, as one sans-I/O state machine (h11/aioquic shape).

A node plays two roles, often both for one request:

- **entry** (the node a prompt reached): :meth:`Pipeline.open` admits the request and sends
  its prompt in prefill chunks to the owner of layer 0; the tokens coming back are handed
  to the caller (:class:`Deliver`); :meth:`Pipeline.close` ends it on every node.
- **stage** (a node of the plan): runs its layers on each activation, in position order
  (:class:`Compute`), forwards the hidden states to the next stage; the owner of the last
  layer samples and sends the token to the entry and to the owner of layer 0 (the next step
  starts there).

Inputs: :meth:`open`, :meth:`close`, :meth:`receive` (a message from a peer or from this
node), :meth:`computed` / :meth:`compute_failed` (a :class:`Compute` came back),
:meth:`serve` / :meth:`stop_serving` (the ring's plan), :meth:`handle_timer`. Every input
takes ``now``. Outputs: :meth:`effects` -- :class:`Send`, :class:`Compute`, :class:`Free`,
:class:`Deliver` -- and :meth:`get_timer`. Messages this node sends to itself are handled
inside, without an effect.

Rules, all in this file:

- The plan epoch is checked once, when a message arrives: an Activation or Token of
  another epoch (or while not serving) never reaches a request.
- A stage request is created by its first prefill chunk (position 0) and must receive
  positions in order; an activation ahead of its position (a big chunk on TCP overtaken
  by a small one on UDP) waits, bounded. Anything else fails the request with an
  :class:`Error` to its entry -- never a wrong KV cache.
- The coverage proof (:mod:`ringd.core.route`) is checked at every stage and at the
  sampling node; the entry checks that every token passed through ``[0, num_layers)``.
- Stage requests idle for ``request_timeout`` are freed; an entry request gets no token
  for ``request_timeout`` after it opened -> ``timeout``.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import Enum
from typing import Union

from ringd.core import wire
from ringd.core.proof import name_nodes
from ringd.core.requests import SamplingParams
from ringd.core.route import (Route, check_activation, check_complete, chunks, epoch_error)
from ringd.errors import ErrorCode, LocalProtocolError, RequestError

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class PipelineConfig:
    #: Requests in flight with this node as their entry.
    max_concurrent: int = 8
    #: Longest context (prompt + generated tokens) per request.
    max_context: int = 4096
    #: Seconds an entry request may wait for its tokens; seconds a stage request may idle.
    request_timeout: float = 300.0
    #: Activations held ahead of their position, per request and in all.
    max_early: int = 64
    #: Request ids remembered as ended, and as told of a stale epoch.
    remembered: int = 1024

    @property
    def stage_capacity(self) -> int:
        """Requests whose KV caches may live on this node (entries on every node share it)."""
        return 4 * self.max_concurrent + 8


@dataclass(frozen=True)
class ServedModel:
    """What the request path needs to know of the model the ring serves."""

    name: str
    eos: frozenset[int]
    #: Tokens per prefill chunk (already lowered to fit one frame).
    prefill_chunk: int = 512


# ------------------------------------------------------------------------------ states
class EntryState(Enum):
    PREFILL = "prefill"  # prompt sent, no token yet
    DECODE = "decode"  # tokens arriving
    FINISHED = "finished"  # the last token was delivered
    FAILED = "failed"  # an error was delivered


class StageState(Enum):
    ACTIVE = "active"  # a KV cache lives here; positions arrive in order
    ENDED = "ended"  # finished, cancelled, failed or expired; its cache is freed


@dataclass
class EntryRequest:
    request_id: str
    route: Route
    prompt_tokens: int
    limit: int
    deadline: float
    state: EntryState = EntryState.PREFILL
    tokens: int = 0


@dataclass
class StageRequest:
    request_id: str
    entry: str
    sampling: SamplingParams
    last_seen: float
    state: StageState = StageState.ACTIVE
    next_position: int = 0
    steps: int = 0
    produced: int = 0  # tokens sampled here (last stage)
    continued: int = -1  # the last step whose token started the next step here (first stage)


# ------------------------------------------------------------------------------ effects
@dataclass(frozen=True)
class Send:
    """Send ``msg`` to node ``node_id`` (never this node)."""

    node_id: str
    msg: wire.Message


@dataclass(frozen=True)
class Compute:
    """Run this node's layers on ``tensor`` for a request; hand the result to
    :meth:`Pipeline.computed` (or the exception's text to :meth:`Pipeline.compute_failed`).

    ``new``: the request's first step here (make its KV cache, and its sampler on the
    last stage); ``final``: the prompt's last chunk or a decode step (the last stage
    samples). ``end``: the layer after the last one this node runs (coverage).
    """

    request_id: str
    step: int
    position: int
    epoch: int
    entry: str
    end: int
    tensor: wire.Tensor
    new: bool
    final: bool
    sampling: SamplingParams


@dataclass(frozen=True)
class Free:
    """Free the request's KV cache (and sampler) on the compute thread."""

    request_id: str


@dataclass(frozen=True)
class Deliver:
    """For the caller of :meth:`Pipeline.open`: the next token, or the error that ends it."""

    request_id: str
    item: wire.Token | RequestError


Effect = Union[Send, Compute, Free, Deliver]


# ------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class Hidden:
    """Hidden states to forward to the next stage."""

    tensor: wire.Tensor


@dataclass(frozen=True)
class Sampled:
    """The last stage's token, with its float32 logits when asked for."""

    token_id: int
    logits: wire.Tensor | None = None


@dataclass(frozen=True)
class Filled:
    """The last stage ran a prefill chunk before the prompt's last: nothing to sample."""


StepResult = Union[Hidden, Sampled, Filled]


def tokens_tensor(ids: list[int]) -> wire.Tensor:
    """Token ids as the int32 tensor the first shard takes (little-endian, like every body)."""
    return wire.Tensor("int32", (len(ids),), struct.pack(f"<{len(ids)}i", *ids))


class Pipeline:
    """One node's side of every request it takes part in."""

    def __init__(self, node_id: str, config: PipelineConfig = PipelineConfig()) -> None:
        self.node_id = node_id
        self.config = config
        self.route: Route | None = None  # set while the ring serves
        self.model: ServedModel | None = None  # the model served on that route
        self.names: dict[str, str] = {}  # node id -> name, for messages
        self.leaving = False
        self._layers: tuple[int, int] | None = None  # what this node's compute really runs
        self._entries: dict[str, EntryRequest] = {}
        self._stages: dict[str, StageRequest] = {}
        # Activations that arrived ahead of their position: request id -> position -> message.
        self._early: dict[str, dict[int, tuple[wire.Activation, str]]] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._stale_told: OrderedDict[str, None] = OrderedDict()
        self._effects: deque[Effect] = deque()
        self._local: deque[wire.Message] = deque()
        self.counters = {"requests_served": 0, "requests_failed": 0, "requests_cancelled": 0,
                         "tokens_delivered": 0,
                         "steps_computed": 0, "coverage_errors": 0, "stale_epoch": 0,
                         "early_held": 0}

    # ---------------------------------------------------------------- serving control
    def serve(self, route: Route, layers: tuple[int, int] | None, names: dict[str, str],
              model: ServedModel) -> None:
        """Run requests of ``model`` on ``route``; ``layers``: the span this node's compute
        really runs (None: this node holds no layers of the plan and serves as an entry
        only); ``names``: node id -> name, for messages."""
        if self._stages or self._entries:
            self.stop_serving("the ring moved to another plan")
        if (route.stage_of(self.node_id) is None) != (layers is None):
            raise LocalProtocolError(f"node {self.node_id} has layers {layers} but the route "
                                     f"gives it {route.stage_of(self.node_id)}")
        self.route, self._layers, self.model = route, layers, model
        self.names = dict(names)

    def stop_serving(self, reason: str, *, code: str = "not_ready") -> None:
        """Fail every request this node is the entry of with ``reason``; free every cache."""
        self.route, self._layers, self.model = None, None, None
        err = RequestError(code, f"the ring stopped serving: {reason}",
                           hint="retry once `ringctl status` shows the ring ready again")
        for entry in self._entries.values():
            self._fail_entry(entry, err)
        for rid in list(self._stages):
            self._end_stage(rid)
        self._early.clear()
        self._local.clear()

    # ---------------------------------------------------------------- entry role
    def open(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
             now: float) -> EntryRequest:
        """Admit a request with this node as its entry and send its prompt.

        Raises :class:`RequestError` (``leaving``, ``not_ready``, ``busy``,
        ``context_length``, ``bad_request``) when it cannot start.
        """
        cfg = self.config
        self.check_admission()
        route, model = self.route, self.model
        assert route is not None and model is not None
        if request_id in self._entries or request_id in self._ended:
            raise LocalProtocolError(f"request id {request_id} is already used")
        if not prompt_ids:
            raise RequestError("bad_request", "the prompt is empty", hint="send some text")
        room = cfg.max_context - len(prompt_ids)
        if room < 1:
            raise RequestError("context_length", f"the prompt has {len(prompt_ids)} tokens; the "
                               f"ring's context holds {cfg.max_context} (max_context)",
                               hint="shorten the prompt, or raise max_context")
        limit = min(sampling.max_tokens, room)
        entry = EntryRequest(request_id, route, len(prompt_ids), limit,
                             deadline=now + cfg.request_timeout)
        self._entries[request_id] = entry
        wire_sampling = dataclasses.replace(sampling, max_tokens=limit, stop=())
        n = len(prompt_ids)
        for a, b in chunks(n, model.prefill_chunk):
            self._send(route.first.node_id, wire.Activation(
                request_id, 0, a, route.epoch, 0, 0, self.node_id, wire_sampling, b == n,
                tokens_tensor(prompt_ids[a:b])), now)
        self._run_local(now)
        return entry

    def check_admission(self) -> None:
        """Raise the :class:`RequestError` that :meth:`open` would raise for any prompt
        (``leaving``, ``not_ready``, ``busy``), so a caller can refuse before tokenizing."""
        if self.leaving:
            raise RequestError("leaving", "this node is shutting down",
                               hint="send the request to another node")
        if self.route is None:
            raise RequestError("not_ready", "the ring is not ready",
                               hint="`ringctl status` shows what the ring is waiting for")
        n = self.config.max_concurrent
        if len(self._entries) >= n:
            raise RequestError("busy", f"{len(self._entries)} requests are already running from "
                               f"this node (max_concurrent = {n})",
                               hint="retry later, or raise max_concurrent")

    def close(self, request_id: str, now: float, *, done: bool) -> None:
        """The caller is done with an entry request: ``done`` when it got its answer (the
        last token, or a stop string), else it failed or the client went away. Forgets it
        and ends it on every node of its route."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        outcome = ("served" if done else "failed" if entry.state is EntryState.FAILED
                   else "cancelled")
        self.counters[f"requests_{outcome}"] += 1
        reason = "done" if done else "cancelled"
        for node in entry.route.node_ids:
            self._send(node, wire.Cancel(request_id, reason), now)
        self._run_local(now)

    def entry(self, request_id: str) -> EntryRequest | None:
        return self._entries.get(request_id)

    # ---------------------------------------------------------------- inputs
    def receive(self, msg: wire.Message, sender: str, now: float) -> None:
        """A data-plane message from node ``sender`` (Activation, Token, Cancel, Error)."""
        self._dispatch(msg, sender, now)
        self._run_local(now)

    def computed(self, job: Compute, result: StepResult, now: float) -> None:
        rec = self._stages.get(job.request_id)
        route, model = self.route, self.model
        if rec is None or route is None or model is None or route.epoch != job.epoch:
            return  # ended, or the plan changed while it ran
        self.counters["steps_computed"] += 1
        rid = job.request_id
        nxt = route.next_stage(self.node_id)
        if nxt is not None:
            if not isinstance(result, Hidden):
                raise LocalProtocolError(f"a middle stage produced {type(result).__name__}")
            self._send(nxt.node_id, wire.Activation(
                rid, job.step, job.position, job.epoch, 0, job.end, job.entry,
                rec.sampling, job.final, result.tensor), now)
        elif isinstance(result, Sampled):
            rec.produced += 1
            limit = rec.sampling.max_tokens
            reason = ("stop" if result.token_id in model.eos
                      else "length" if rec.produced >= limit else None)
            token = wire.Token(rid, job.step, job.epoch, result.token_id, 0, job.end, reason,
                               result.logits)
            self._send(job.entry, token, now)
            if reason is None and route.first.node_id != job.entry:
                # the entry, when it owns layer 0, starts the next step itself
                self._send(route.first.node_id, dataclasses.replace(token, logits=None), now)
        elif not isinstance(result, Filled):
            raise LocalProtocolError(f"the last stage produced {type(result).__name__}")
        self._run_local(now)

    def compute_failed(self, job: Compute, message: str, now: float) -> None:
        if job.request_id in self._stages:
            self._fail_stage(job.request_id, job.entry, RequestError(
                "internal", f"node {self.node_id} failed to compute layers: {message}"), now)
            self._run_local(now)

    def handle_timer(self, now: float) -> None:
        timeout = self.config.request_timeout
        for entry in list(self._entries.values()):
            if entry.state in (EntryState.PREFILL, EntryState.DECODE) and now >= entry.deadline:
                self._fail_entry(entry, RequestError(
                    "timeout", f"the request ran longer than request_timeout ({timeout:g} s)",
                    hint="raise request_timeout, or ask for fewer tokens"))
        for rid, rec in list(self._stages.items()):
            if now >= rec.last_seen + timeout:
                log.info("request %s idle for %.0f s: freeing its cache", rid[:8], timeout)
                self._end_stage(rid)

    def get_timer(self) -> float | None:
        live = (EntryState.PREFILL, EntryState.DECODE)
        times = [e.deadline for e in self._entries.values() if e.state in live]
        times += [r.last_seen + self.config.request_timeout for r in self._stages.values()]
        return min(times) if times else None

    # ---------------------------------------------------------------- outputs
    def effects(self) -> list[Effect]:
        out = list(self._effects)
        self._effects.clear()
        return out

    @property
    def active_entries(self) -> int:
        return len(self._entries)

    @property
    def active_stages(self) -> int:
        return len(self._stages)

    def stats(self) -> dict[str, int]:
        return {"active_entries": len(self._entries), "active_stage_requests": len(self._stages),
                **self.counters}

    # ---------------------------------------------------------------- dispatch
    def _dispatch(self, msg: wire.Message, sender: str, now: float) -> None:
        if isinstance(msg, (wire.Activation, wire.Token)):
            route = self.route
            if route is None or msg.epoch != route.epoch:
                self._stale(msg, sender, now)
            elif isinstance(msg, wire.Activation):
                self._on_activation(msg, sender, now)
            else:
                self._on_token(msg, sender, now)
        elif isinstance(msg, wire.Cancel):
            self._end_stage(msg.request_id)
        elif isinstance(msg, wire.Error):
            entry = self._entries.get(msg.request_id)
            if entry is not None:
                self._fail_entry(entry, RequestError(
                    ErrorCode.parse(msg.code), self._named(f"node {sender}: {msg.message}")))

    def _stale(self, msg: wire.Activation | wire.Token, sender: str, now: float) -> None:
        """A message of another plan epoch, or one that arrived while not serving."""
        self.counters["stale_epoch"] += 1
        rid = msg.request_id
        if isinstance(msg, wire.Token):
            entry = self._entries.get(rid)
            if entry is not None and entry.state in (EntryState.PREFILL, EntryState.DECODE):
                self.counters["coverage_errors"] += 1
                self._fail_entry(entry, RequestError(
                    "coverage", self._named(f"node {sender}") + f" sent a token of plan epoch "
                    f"{msg.epoch} for a request on epoch {entry.route.epoch}; no token is shown",
                    hint="a node is routing with another plan"))
            return
        if rid in self._stale_told:
            return
        self._remember(self._stale_told, rid)
        if self.route is None:
            err = RequestError("not_ready", f"node {self.node_id} is not serving")
        else:
            err = epoch_error(sender, self.node_id, msg.epoch, self.route.epoch)
        self._fail_stage(rid, msg.entry, err, now)

    # ---------------------------------------------------------------- stage role
    def _on_activation(self, msg: wire.Activation, sender: str, now: float) -> None:
        rid = msg.request_id
        rec = self._stages.get(rid)
        expected = rec.next_position if rec is not None else 0
        if msg.position > expected and rid not in self._ended:
            held = self._early.setdefault(rid, {})
            cap = self.config.max_early
            if len(held) < cap and sum(map(len, self._early.values())) < 8 * cap:
                held[msg.position] = (msg, sender)
                self.counters["early_held"] += 1
                return
            self._fail_stage(rid, msg.entry, RequestError(
                "internal", f"node {self.node_id}: too many out-of-order activations "
                "for one request"), now)
            return
        self._step(msg, sender, now)
        held = self._early.get(rid)
        while held and (rec := self._stages.get(rid)) is not None and rec.next_position in held:
            self._step(*held.pop(rec.next_position), now)
        if not held:
            self._early.pop(rid, None)

    def _step(self, msg: wire.Activation, sender: str, now: float) -> None:
        route, layers = self.route, self._layers
        rid = msg.request_id
        assert route is not None  # _dispatch checked the epoch against the route
        try:
            if layers is None:
                raise RequestError("coverage", f"node {sender} sent an activation to node "
                                   f"{self.node_id}, which owns no layers in plan epoch "
                                   f"{route.epoch}")
            stage = check_activation(route, self.node_id, epoch=msg.epoch, layer_lo=msg.layer_lo,
                                     layer_hi=msg.layer_hi, sender=sender)
            ran_lo, ran_hi = layers
            if ran_lo != stage.start:
                raise RequestError(
                    "coverage", f"node {self.node_id} holds layers [{ran_lo}, {ran_hi}) but "
                    f"plan epoch {route.epoch} routes layers [{stage.start}, {stage.end}) to it",
                    hint="the node loaded the wrong layers; no token was produced")
            shape = msg.tensor.shape
            length = shape[0] if stage.start == 0 else shape[1] if len(shape) == 3 else -1
            if length < 1:
                raise RequestError("internal", f"activation for {rid[:8]} has shape {shape}")
            rec, new = self._admit(msg, now)
            rec.next_position = msg.position + length
            rec.last_seen = now
            rec.steps += 1
            if route.next_stage(self.node_id) is None:
                check_complete(route, layer_lo=0, layer_hi=ran_hi, sender=sender,
                               self_id=self.node_id)
        except RequestError as e:
            self._fail_stage(rid, msg.entry, e, now)
            return
        self._effects.append(Compute(rid, msg.step, msg.position, msg.epoch, msg.entry, ran_hi,
                                     msg.tensor, new, msg.final, rec.sampling))

    def _admit(self, msg: wire.Activation, now: float) -> tuple[StageRequest, bool]:
        rid = msg.request_id
        rec = self._stages.get(rid)
        if rec is not None:
            if msg.position != rec.next_position:
                raise RequestError("internal", f"request {rid}: expected position "
                                   f"{rec.next_position}, got {msg.position}")
            return rec, False
        if rid in self._ended:
            raise RequestError("cancelled", f"request {rid} already ended on this node")
        if msg.position != 0:
            raise RequestError("internal", f"request {rid} is unknown here at position "
                               f"{msg.position}; its cache was freed (timeout or cancel)")
        capacity = self.config.stage_capacity
        if len(self._stages) >= capacity:
            raise RequestError("busy", f"this node already holds {capacity} requests",
                               hint="retry later, or raise max_concurrent")
        rec = StageRequest(rid, msg.entry, msg.sampling, last_seen=now)
        self._stages[rid] = rec
        return rec, True

    def _on_token(self, msg: wire.Token, sender: str, now: float) -> None:
        rid = msg.request_id
        entry = self._entries.get(rid)
        if entry is not None and entry.state in (EntryState.PREFILL, EntryState.DECODE):
            if (msg.layer_lo, msg.layer_hi) != (0, entry.route.num_layers):
                self.counters["coverage_errors"] += 1
                self._fail_entry(entry, RequestError(
                    "coverage", self._named(f"node {sender}") + f" sent a token for layers "
                    f"[{msg.layer_lo}, {msg.layer_hi}) of {entry.route.num_layers}; "
                    "no token is shown"))
            elif msg.step == entry.tokens:
                entry.tokens += 1
                entry.state = EntryState.FINISHED if msg.finished else EntryState.DECODE
                self.counters["tokens_delivered"] += 1
                self._effects.append(Deliver(rid, msg))
        route = self.route
        if msg.finished or route is None or route.first.node_id != self.node_id:
            return
        rec = self._stages.get(rid)
        if rec is None or msg.step <= rec.continued:
            return  # ended meanwhile, or a duplicate: each step goes on exactly once
        rec.continued = msg.step
        # The next step starts here, at the owner of layer 0, with the sampled token.
        self._on_activation(wire.Activation(
            rid, msg.step + 1, rec.next_position, msg.epoch, 0, 0, rec.entry,
            rec.sampling, True, tokens_tensor([msg.token_id])), self.node_id, now)

    # ---------------------------------------------------------------- endings
    def _fail_entry(self, entry: EntryRequest, err: RequestError) -> None:
        if entry.state in (EntryState.FINISHED, EntryState.FAILED):
            return
        entry.state = EntryState.FAILED
        self._effects.append(Deliver(entry.request_id, err))

    def _fail_stage(self, rid: str, entry: str, err: RequestError, now: float) -> None:
        """This stage cannot go on with ``rid``: free it here, tell its entry why."""
        if err.code == "coverage":
            self.counters["coverage_errors"] += 1
        message = self._named(err.message)
        if err.hint:
            message += f" (hint: {err.hint})"
        log.warning("request %s failed here: %s", rid[:8], message)
        self._end_stage(rid)
        self._send(entry, wire.Error(rid, err.code.value, message[: wire.MAX_TEXT]), now)

    def _end_stage(self, rid: str) -> None:
        self._early.pop(rid, None)
        rec = self._stages.pop(rid, None)
        self._remember(self._ended, rid)
        if rec is not None:
            rec.state = StageState.ENDED
            self._effects.append(Free(rid))

    # ---------------------------------------------------------------- plumbing
    def _send(self, node_id: str, msg: wire.Message, now: float) -> None:
        if node_id == self.node_id:
            self._local.append(msg)
        else:
            self._effects.append(Send(node_id, msg))

    def _run_local(self, now: float) -> None:
        """Handle the messages this node sent itself, in order (a one-stage ring runs
        entirely here)."""
        while self._local:
            self._dispatch(self._local.popleft(), self.node_id, now)

    def _remember(self, seen: OrderedDict[str, None], rid: str) -> None:
        seen[rid] = None
        seen.move_to_end(rid)
        if len(seen) > self.config.remembered:
            seen.popitem(last=False)

    def _named(self, text: str) -> str:
        return name_nodes(text, self.names)
