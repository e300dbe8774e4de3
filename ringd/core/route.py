"""Routes and the coverage proof: which node runs which layers of a plan, and the checks
that make a step pass through every layer exactly once.

Pure: no I/O, no clocks, no MLX.

Coverage proof: every activation carries the layer interval ``[lo, hi)`` it has already
passed through and the plan epoch. A node owning ``[start, end)`` accepts it only if
``lo == 0`` and ``hi == start`` and the epoch is its own; it forwards ``[0, end)``. The node
that samples accepts a step only if it passed through ``[0, num_layers)`` exactly once.
Anything else fails the request with a ``coverage`` error naming the nodes involved --
never a token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ringd.errors import LocalProtocolError, RequestError


@dataclass(frozen=True)
class Stage:
    """One node's contiguous block of layers ``[start, end)``."""

    node_id: str
    start: int
    end: int


@dataclass(frozen=True)
class Route:
    """The stages of one committed plan, in ring order, and its epoch."""

    epoch: int
    stages: tuple[Stage, ...]
    num_layers: int

    def __post_init__(self) -> None:
        if not self.stages:
            raise LocalProtocolError("a route needs at least one stage")
        expect = 0
        for s in self.stages:
            if s.start != expect or s.end <= s.start:
                raise LocalProtocolError(f"route stages are not contiguous at {s}")
            expect = s.end
        if expect != self.num_layers:
            raise LocalProtocolError(f"route covers {expect} of {self.num_layers} layers")

    @property
    def first(self) -> Stage:
        return self.stages[0]

    @property
    def last(self) -> Stage:
        return self.stages[-1]

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(s.node_id for s in self.stages)

    def stage_of(self, node_id: str) -> Stage | None:
        for s in self.stages:
            if s.node_id == node_id:
                return s
        return None

    def next_stage(self, node_id: str) -> Stage | None:
        """The stage after ``node_id``'s, or None when ``node_id`` owns the last layer."""
        for i, s in enumerate(self.stages):
            if s.node_id == node_id:
                return self.stages[i + 1] if i + 1 < len(self.stages) else None
        raise LocalProtocolError(f"node {node_id} is not on the route")

    def owner_of(self, layer: int) -> str | None:
        for s in self.stages:
            if s.start <= layer < s.end:
                return s.node_id
        return None


def epoch_error(sender: str, self_id: str, epoch: int, serving: int) -> RequestError:
    """``sender`` routed an activation of plan ``epoch`` to ``self_id``, which serves
    ``serving``."""
    return RequestError(
        "coverage",
        f"node {sender} sent an activation of plan epoch {epoch} to node {self_id}, "
        f"which serves epoch {serving}",
        hint="a node is routing with another plan; the request was stopped before it produced "
             "a token",
    )


def check_activation(route: Route, self_id: str, *, epoch: int, layer_lo: int, layer_hi: int,
                     sender: str) -> Stage:
    """Validate an incoming activation at ``self_id``; return our stage or raise ``coverage``."""
    if epoch != route.epoch:
        raise epoch_error(sender, self_id, epoch, route.epoch)
    stage = route.stage_of(self_id)
    if stage is None:
        raise RequestError("coverage", f"node {sender} sent an activation to node {self_id}, "
                                       f"which owns no layers in plan epoch {route.epoch}")
    if layer_lo != 0 or layer_hi != stage.start:
        raise RequestError("coverage", _interval_problem(route, layer_lo, layer_hi, stage, sender))
    return stage


def check_complete(route: Route, *, layer_lo: int, layer_hi: int, sender: str,
                   self_id: str) -> None:
    """At the sampling node: the step must have passed through ``[0, num_layers)`` exactly."""
    if (layer_lo, layer_hi) != (0, route.num_layers):
        raise RequestError(
            "coverage",
            f"node {self_id} was asked to sample after layers [{layer_lo}, {layer_hi}) "
            f"(from node {sender}); the model has {route.num_layers} layers",
            hint="a node skipped or repeated layers; no token was produced",
        )


def _interval_problem(route: Route, lo: int, hi: int, stage: Stage, sender: str) -> str:
    head = (f"node {stage.node_id} owns layers [{stage.start}, {stage.end}) but received "
            f"an activation from node {sender} that passed through [{lo}, {hi})")
    if lo != 0:
        return head + f": layers [0, {lo}) were skipped at the start"
    if hi < stage.start:
        missing = sorted({route.owner_of(layer) or "?" for layer in range(hi, stage.start)})
        return head + (f": gap, layers [{hi}, {stage.start}) (owned by {', '.join(missing)}) "
                       "were not computed")
    overlap = sorted({route.owner_of(layer) or "?"
                      for layer in range(stage.start, min(hi, stage.end))})
    return head + (f": overlap, layers [{stage.start}, {hi}) would be computed twice "
                   f"(also by {', '.join(overlap)})")


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``[start, end)`` pieces of ``range(n)`` of at most ``size``; used for chunked prefill."""
    if size < 1:
        raise LocalProtocolError("chunk size must be positive")
    for start in range(0, n, size):
        yield start, min(n, start + size)


#: Room left in a frame for the message head around a prefill chunk's hidden states.
FRAME_HEADROOM = 64 * 1024


def prefill_chunk_tokens(configured: int, hidden_size: int, itemsize: int, max_frame: int) -> int:
    """Tokens per prefill chunk: ``configured``, lowered so that one chunk's hidden states
    (``tokens x hidden_size x itemsize`` bytes and a message head) fit in one frame of
    ``max_frame`` bytes, which is all a peer accepts; at least 1."""
    per_token = max(1, hidden_size * itemsize)
    return max(1, min(configured, (max_frame - FRAME_HEADROOM) // per_token))
