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

- The plan epoch is checked once, when a message arrives: a Token of another epoch never
  reaches a request; an Activation of an older epoch is answered (once per request) with an
  Error, one of a newer epoch (the ring moved on and this node has not served it yet) waits
  up to ``hold_timeout`` for this node to serve that epoch.
- **A plan change does not end a request.** When the ring stops serving (a node lost,
  joined or left), the requests this node is the entry of are *paused* (:meth:`stop_serving`
  with ``pause``); when it serves again, each is *replayed* on the new plan: its prompt and
  every token already delivered go through the new stages as a prefill, and decoding goes
  on from the next token -- the caller sees a pause, never a gap or a duplicate. Sampling
  draws each token from a key of the request's seed and the token's step, so a replay
  draws what an undisturbed run would. A paused request fails only when the ring cannot
  serve again (:meth:`fail_paused`), switched models, or its time runs out.
- A stage request is created by its first prefill chunk (position 0) and must receive
  positions in order; an activation ahead of its position (a big chunk on TCP overtaken
  by a small one on UDP) waits, bounded. Anything else fails the request with an
  :class:`Error` to its entry -- never a wrong KV cache.
- The coverage proof (:mod:`ringd.core.route`) is checked at every stage and at the
  sampling node; the entry checks that every token passed through ``[0, num_layers)``.
- Stage requests idle for ``request_timeout`` are freed; an entry request that runs longer
  than ``request_timeout``, or makes no progress (no token, no :class:`wire.Progress` of its
  prompt) for ``step_timeout`` while the ring serves,
  fails with ``timeout`` (naming the nodes holding it). Duplicates (a frame that came by two
  channels) are dropped, never an error; tokens that overtake one another are put back in
  order.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

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
    #: Seconds without a token (while the ring serves) before a request fails.
    step_timeout: float = 120.0
    #: Seconds an activation of a newer plan epoch waits for this node to serve that epoch.
    hold_timeout: float = 10.0
    #: Activations held ahead of their position, per request and in all; and of a newer
    #: epoch, in all.
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
    PREFILL = "prefill"  # prompt sent (or replayed), no token of this plan yet
    DECODE = "decode"  # tokens arriving
    PAUSED = "paused"  # the ring stopped serving: to be replayed on the next plan
    FINISHED = "finished"  # the last token was delivered
    FAILED = "failed"  # an error was delivered


class StageState(Enum):
    ACTIVE = "active"  # a KV cache lives here; positions arrive in order
    ENDED = "ended"  # finished, cancelled, failed or expired; its cache is freed


@dataclass
class EntryRequest:
    request_id: str
    route: Route
    model: str
    prompt_ids: list[int]
    sampling: SamplingParams  # as sent: stop strings left out, max_tokens the limit
    deadline: float  # request_timeout after it opened
    progress: float  # step_timeout after the last token (or the last (re)send)
    state: EntryState = EntryState.PREFILL
    generated: list[int] = field(default_factory=list)  # token ids delivered so far
    early: dict[int, wire.Token] = field(default_factory=dict)  # tokens ahead of their step
    replays: int = 0
    paused_for: str | None = None  # why it is paused
    computed: int = 0  # prompt positions the whole ring computed (Progress), this run

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def limit(self) -> int:
        return self.sampling.max_tokens

    @property
    def tokens(self) -> int:
        return len(self.generated)


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


LIVE = (EntryState.PREFILL, EntryState.DECODE)


class Pipeline:
    """One node's side of every request it takes part in."""

    def __init__(self, node_id: str, config: PipelineConfig = PipelineConfig()) -> None:
        self.node_id = node_id
        self.config = config
        self.route: Route | None = None  # set while the ring serves
        self.model: ServedModel | None = None  # the model served on that route
        self.names: dict[str, str] = {}  # node id -> name, for messages
        self.leaving = False
        self._served_epoch = -1  # the last plan epoch this node served
        self._layers: tuple[int, int] | None = None  # what this node's compute really runs
        self._entries: dict[str, EntryRequest] = {}
        self._stages: dict[str, StageRequest] = {}
        # Activations that arrived ahead of their position: request id -> position -> message.
        self._early: dict[str, dict[int, tuple[wire.Activation, str]]] = {}
        # Activations of a plan epoch this node does not serve yet: (until, message, sender).
        self._held: deque[tuple[float, wire.Activation, str]] = deque()
        self._ended: OrderedDict[str, int] = OrderedDict()  # request id -> epoch it ended in
        self._stale_told: OrderedDict[str, None] = OrderedDict()
        self._effects: deque[Effect] = deque()
        self._local: deque[wire.Message] = deque()
        self.counters = {"requests_served": 0, "requests_failed": 0, "requests_cancelled": 0,
                         "requests_replayed": 0, "tokens_delivered": 0, "steps_computed": 0,
                         "coverage_errors": 0, "stale_epoch": 0, "early_held": 0,
                         "duplicates": 0}

    # ---------------------------------------------------------------- serving control
    def serve(self, route: Route, layers: tuple[int, int] | None, names: dict[str, str],
              model: ServedModel, now: float) -> None:
        """Run requests of ``model`` on ``route``; ``layers``: the span this node's compute
        really runs (None: this node holds no layers of the plan and serves as an entry
        only); ``names``: node id -> name, for messages. Paused requests are replayed on it;
        activations that waited for this epoch go on."""
        if self.route is not None:
            self.stop_serving("the ring moved to another plan", pause=True, now=now)
        if (route.stage_of(self.node_id) is None) != (layers is None):
            raise LocalProtocolError(f"node {self.node_id} has layers {layers} but the route "
                                     f"gives it {route.stage_of(self.node_id)}")
        self.route, self._layers, self.model = route, layers, model
        self._served_epoch = max(self._served_epoch, route.epoch)
        self.names = dict(names)
        for entry in list(self._entries.values()):
            if entry.state is EntryState.PAUSED:
                self._replay(entry, route, model, now)
        held, self._held = self._held, deque()
        for until, msg, sender in held:
            self._dispatch(msg, sender, now)
        self._run_local(now)

    def stop_serving(self, reason: str, *, code: str = "not_ready", pause: bool = False,
                     now: float = 0.0) -> None:
        """Stop running requests; free every cache here. ``pause``: the ring re-plans, so the
        requests this node is the entry of wait to be replayed on the next plan; else they
        fail with ``reason``."""
        self.route, self._layers, self.model = None, None, None
        if pause:
            for entry in self._entries.values():
                if entry.state in LIVE:
                    entry.state, entry.paused_for = EntryState.PAUSED, reason
                    entry.early.clear()
        else:
            self.fail_paused(reason, code=code, live_too=True)
        for rid in list(self._stages):
            self._end_stage(rid)
        self._early.clear()
        self._local.clear()

    def fail_paused(self, reason: str, *, code: str = "not_ready", live_too: bool = False) -> None:
        """Fail the paused requests (the ring cannot serve again: ``reason``)."""
        hint = "retry once `ringctl status` shows the ring ready again"
        for entry in self._entries.values():
            if entry.state is EntryState.PAUSED or (live_too and entry.state in LIVE):
                why = f"{entry.paused_for}; {reason}" if entry.paused_for else reason
                self._fail_entry(entry, RequestError(code, f"the ring stopped serving: {why}",
                                                     hint=hint))

    @property
    def paused(self) -> int:
        return sum(e.state is EntryState.PAUSED for e in self._entries.values())

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
        sent = dataclasses.replace(sampling, max_tokens=min(sampling.max_tokens, room), stop=())
        entry = EntryRequest(request_id, route, model.name, list(prompt_ids), sent,
                             deadline=now + cfg.request_timeout,
                             progress=now + cfg.step_timeout)
        self._entries[request_id] = entry
        self._send_prompt(entry, route, model, prompt_ids, 0, sent)
        self._run_local(now)
        return entry

    def _send_prompt(self, entry: EntryRequest, route: Route, model: ServedModel,
                     ids: list[int], step: int, sampling: SamplingParams) -> None:
        n = len(ids)
        for a, b in chunks(n, model.prefill_chunk):
            self._send(route.first.node_id, wire.Activation(
                entry.request_id, step, a, route.epoch, 0, 0, self.node_id, sampling, b == n,
                tokens_tensor(ids[a:b])))

    def _replay(self, entry: EntryRequest, route: Route, model: ServedModel,
                now: float) -> None:
        """Run a paused request on ``route``: its prompt and every token delivered so far as
        one prefill; the token it samples is the next one (step ``len(generated)``)."""
        if model.name != entry.model:
            self._fail_entry(entry, RequestError(
                "not_ready", f"the ring switched from model {entry.model} to {model.name} "
                "while this request ran", hint="send it again"))
            return
        k = entry.tokens
        entry.route, entry.state, entry.paused_for = route, EntryState.PREFILL, None
        entry.computed = 0
        entry.replays += 1
        entry.progress = now + self.config.step_timeout
        self.counters["requests_replayed"] += 1
        log.info("request %s: replaying its prompt and %d tokens on plan epoch %d",
                 entry.request_id[:8], k, route.epoch)
        rest = dataclasses.replace(entry.sampling, max_tokens=entry.limit - k)
        self._send_prompt(entry, route, model, entry.prompt_ids + entry.generated, k, rest)

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
            self._send(node, wire.Cancel(request_id, reason))
        self._run_local(now)

    def entry(self, request_id: str) -> EntryRequest | None:
        return self._entries.get(request_id)

    def wants(self, job: Compute) -> bool:
        """Whether ``job`` is still worth running: its request goes on here, on its plan."""
        route = self.route
        return (job.request_id in self._stages and route is not None
                and route.epoch == job.epoch)

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
                rec.sampling, job.final, result.tensor))
        elif isinstance(result, Sampled):
            rec.produced += 1
            limit = rec.sampling.max_tokens
            reason = ("stop" if result.token_id in model.eos
                      else "length" if rec.produced >= limit else None)
            token = wire.Token(rid, job.step, job.epoch, result.token_id, 0, job.end, reason,
                               result.logits)
            self._send(job.entry, token)
            if reason is None and route.first.node_id != job.entry:
                # the entry, when it owns layer 0, starts the next step itself
                self._send(route.first.node_id, dataclasses.replace(token, logits=None))
        elif isinstance(result, Filled):
            # a part of the prompt went through every layer: its entry knows the ring works
            shape = job.tensor.shape
            done = job.position + (shape[0] if len(shape) == 1 else shape[1])
            self._send(job.entry, wire.Progress(rid, job.epoch, done))
        else:
            raise LocalProtocolError(f"the last stage produced {type(result).__name__}")
        self._run_local(now)

    def compute_failed(self, job: Compute, message: str, now: float) -> None:
        if job.request_id in self._stages:
            self._fail_stage(job.request_id, job.entry, job.epoch, RequestError(
                "internal", f"node {self.node_id} failed to compute layers: {message}"))
            self._run_local(now)

    def handle_timer(self, now: float) -> None:
        cfg = self.config
        for entry in list(self._entries.values()):
            if entry.state not in (*LIVE, EntryState.PAUSED):
                continue
            if now >= entry.deadline:
                self._fail_entry(entry, RequestError(
                    "timeout", f"the request ran longer than request_timeout "
                    f"({cfg.request_timeout:g} s)" + (f"; it was paused: {entry.paused_for}"
                                                      if entry.paused_for else ""),
                    hint="raise request_timeout, or ask for fewer tokens"))
            elif entry.state in LIVE and now >= entry.progress:
                held = ", ".join(self.names.get(i) or i for i in entry.route.node_ids)
                where = (f"; the ring computed {entry.computed} of its "
                         f"{entry.prompt_tokens + entry.tokens} prompt positions"
                         if entry.state is EntryState.PREFILL else "")
                self._fail_entry(entry, RequestError(
                    "timeout", f"no progress for {cfg.step_timeout:g} s (step_timeout): the "
                    f"request is held by nodes {held} (plan epoch {entry.route.epoch}){where}",
                    hint="see those nodes' logs; raise step_timeout for very slow stages"))
        for rid, rec in list(self._stages.items()):
            if now >= rec.last_seen + cfg.request_timeout:
                log.info("request %s idle for %.0f s: freeing its cache", rid[:8],
                         cfg.request_timeout)
                self._end_stage(rid)
        while self._held and self._held[0][0] <= now:
            _, msg, sender = self._held.popleft()
            self._stale(msg, sender, now)
        self._run_local(now)

    def get_timer(self) -> float | None:
        times = []
        for e in self._entries.values():
            if e.state in LIVE:
                times += [e.deadline, e.progress]
            elif e.state is EntryState.PAUSED:
                times.append(e.deadline)
        times += [r.last_seen + self.config.request_timeout for r in self._stages.values()]
        if self._held:
            times.append(self._held[0][0])
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
                "paused_entries": self.paused, "held_activations": len(self._held),
                **self.counters}

    # ---------------------------------------------------------------- dispatch
    def _dispatch(self, msg: wire.Message, sender: str, now: float) -> None:
        if isinstance(msg, wire.Activation):
            route = self.route
            if route is not None and msg.epoch == route.epoch:
                self._on_activation(msg, sender, now)
            elif msg.epoch > self._served_epoch:
                self._hold(msg, sender, now)
            else:
                self._stale(msg, sender, now)
        elif isinstance(msg, wire.Token):
            route = self.route
            if route is not None and msg.epoch == route.epoch:
                self._on_token(msg, sender, now)
            else:  # an old plan's token (a request replayed since), or a confused node
                self.counters["stale_epoch"] += 1
        elif isinstance(msg, wire.Progress):
            entry = self._entries.get(msg.request_id)
            if (entry is not None and entry.state is EntryState.PREFILL
                    and msg.epoch == entry.route.epoch):
                entry.computed = max(entry.computed, msg.position)
                entry.progress = now + self.config.step_timeout
        elif isinstance(msg, wire.Cancel):
            self._end_stage(msg.request_id)
        elif isinstance(msg, wire.Error):
            entry = self._entries.get(msg.request_id)
            # an error about the request as it runs now, not about an old plan's run of it
            if entry is not None and entry.state in LIVE and msg.epoch == entry.route.epoch:
                self._fail_entry(entry, RequestError(
                    ErrorCode.parse(msg.code), self._named(f"node {sender}: {msg.message}")))

    def _hold(self, msg: wire.Activation, sender: str, now: float) -> None:
        """An activation of a plan epoch this node has not served yet (the ring moved on and
        its commit has not reached this node): it waits, bounded, for this node to serve it."""
        if len(self._held) >= self.config.max_early * 4:
            self._stale(msg, sender, now)
            return
        self.counters["early_held"] += 1
        self._held.append((now + self.config.hold_timeout, msg, sender))

    def _stale(self, msg: wire.Activation, sender: str, now: float) -> None:
        """An activation of another plan epoch than this node serves: tell its entry once."""
        self.counters["stale_epoch"] += 1
        rid = msg.request_id
        if rid in self._stale_told:
            return
        self._remember(self._stale_told, rid, 0)
        if self.route is None:
            err = RequestError("not_ready", f"node {self.node_id} is not serving plan epoch "
                                            f"{msg.epoch}")
        else:
            err = epoch_error(sender, self.node_id, msg.epoch, self.route.epoch)
        self._fail_stage(rid, msg.entry, msg.epoch, err)

    # ---------------------------------------------------------------- stage role
    def _on_activation(self, msg: wire.Activation, sender: str, now: float) -> None:
        rid = msg.request_id
        rec = self._stages.get(rid)
        expected = rec.next_position if rec is not None else 0
        if msg.position > expected and not self._ended_at(rid, msg.epoch):
            held = self._early.setdefault(rid, {})
            cap = self.config.max_early
            if len(held) < cap and sum(map(len, self._early.values())) < 8 * cap:
                held[msg.position] = (msg, sender)
                self.counters["early_held"] += 1
                return
            self._fail_stage(rid, msg.entry, msg.epoch, RequestError(
                "internal", f"node {self.node_id}: too many out-of-order activations "
                "for one request"))
            return
        if rec is not None and msg.position < expected:
            self.counters["duplicates"] += 1  # it came twice: computed once, never an error
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
            self._fail_stage(rid, msg.entry, msg.epoch, e)
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
        if self._ended_at(rid, msg.epoch):
            raise RequestError("cancelled", f"request {rid} already ended on this node")
        if msg.position != 0:
            raise RequestError("internal", f"request {rid} is unknown here at position "
                               f"{msg.position}; its cache was freed (timeout or cancel)")
        capacity = self.config.stage_capacity
        if len(self._stages) >= capacity:
            raise RequestError("busy", f"this node already holds {capacity} requests",
                               hint="retry later, or raise max_concurrent")
        self._ended.pop(rid, None)  # a replay on a newer plan of a request that ended here
        rec = StageRequest(rid, msg.entry, msg.sampling, last_seen=now)
        self._stages[rid] = rec
        return rec, True

    def _ended_at(self, rid: str, epoch: int) -> bool:
        """The request ended here at ``epoch`` or later (a replay on a newer plan has not)."""
        ended = self._ended.get(rid)
        return ended is not None and ended >= epoch

    def _on_token(self, msg: wire.Token, sender: str, now: float) -> None:
        rid = msg.request_id
        entry = self._entries.get(rid)
        if entry is not None and entry.state in LIVE:
            if (msg.layer_lo, msg.layer_hi) != (0, entry.route.num_layers):
                self.counters["coverage_errors"] += 1
                self._fail_entry(entry, RequestError(
                    "coverage", self._named(f"node {sender}") + f" sent a token for layers "
                    f"[{msg.layer_lo}, {msg.layer_hi}) of {entry.route.num_layers}; "
                    "no token is shown"))
            elif msg.step == entry.tokens:
                self._deliver(entry, msg, now)
                while entry.state in LIVE and (nxt := entry.early.pop(entry.tokens, None)):
                    self._deliver(entry, nxt, now)
            elif msg.step > entry.tokens and len(entry.early) < self.config.max_early:
                entry.early[msg.step] = msg  # overtook an earlier one (two channels)
            else:
                self.counters["duplicates"] += 1
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

    def _deliver(self, entry: EntryRequest, msg: wire.Token, now: float) -> None:
        entry.generated.append(msg.token_id)
        entry.progress = now + self.config.step_timeout
        entry.state = EntryState.FINISHED if msg.finished else EntryState.DECODE
        self.counters["tokens_delivered"] += 1
        self._effects.append(Deliver(entry.request_id, msg))

    # ---------------------------------------------------------------- endings
    def _fail_entry(self, entry: EntryRequest, err: RequestError) -> None:
        if entry.state in (EntryState.FINISHED, EntryState.FAILED):
            return
        entry.state = EntryState.FAILED
        self._effects.append(Deliver(entry.request_id, err))

    def _fail_stage(self, rid: str, entry: str, epoch: int, err: RequestError) -> None:
        """This stage cannot go on with ``rid`` (of plan ``epoch``): free it here, tell its
        entry why."""
        if err.code == "coverage":
            self.counters["coverage_errors"] += 1
        message = self._named(err.message)
        if err.hint:
            message += f" (hint: {err.hint})"
        log.warning("request %s failed here: %s", rid[:8], message)
        self._end_stage(rid)
        self._send(entry, wire.Error(rid, err.code.value, message[: wire.MAX_TEXT], epoch))

    def _end_stage(self, rid: str) -> None:
        self._early.pop(rid, None)
        rec = self._stages.pop(rid, None)
        epoch = self.route.epoch if self.route is not None else self._served_epoch
        self._remember(self._ended, rid, epoch)
        if rec is not None:
            rec.state = StageState.ENDED
            self._effects.append(Free(rid))

    # ---------------------------------------------------------------- plumbing
    def _send(self, node_id: str, msg: wire.Message) -> None:
        if node_id == self.node_id:
            self._local.append(msg)
        else:
            self._effects.append(Send(node_id, msg))

    def _run_local(self, now: float) -> None:
        """Handle the messages this node sent itself, in order (a one-stage ring runs
        entirely here)."""
        while self._local:
            self._dispatch(self._local.popleft(), self.node_id, now)

    def _remember(self, seen: OrderedDict[str, Any], rid: str, value: Any) -> None:
        seen[rid] = value
        seen.move_to_end(rid)
        if len(seen) > self.config.remembered:
            seen.popitem(last=False)

    def _named(self, text: str) -> str:
        return name_nodes(text, self.names)
