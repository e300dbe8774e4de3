"""Where a token's time goes: one node's step timings, and the ring's bottleneck. Pure.

Every node's runner keeps rolling statistics of the steps it takes part in (``Runner.timings()``,
a dict): per step the time it waited in the node's queue, its compute time, and the time to
hand the result to the next hop, each as p50/p99 over a recent window; at an entry also the
time from token to token (``decode_step_ms``) and the prefill cost per prompt token.

- :class:`StageTimings` is that snapshot with named fields, plus the round trip from the node
  to the next stage of the ring (``next_rtt_ms``, measured by membership probes). Each node
  gossips its own in its metadata (:meth:`StageTimings.dump`, a short list of microseconds),
  so every node's status shows every member's, and ``ringctl bench`` reads them from one node.
- :func:`breakdown` splits a measured time per token into what each stage and each hop of the
  ring takes, names the largest part (the bottleneck) and compares a stage's compute with what
  reading its weights once takes at its memory bandwidth (its memory-bound floor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ringd.core.wire import U63, Rule

#: Seconds between two refreshes of the step timings a node gossips.
TIMINGS_INTERVAL = 2.0
#: Compute within this factor of the memory-bound floor counts as memory-bound.
MEMORY_BOUND_FACTOR = 1.5
#: Stage timings fields in the runner's dict that hold ``{"p50", "p99"}``.
QUANTILE_KEYS = ("queued_ms", "compute_ms", "handoff_ms", "decode_step_ms")


def _num(v: Any) -> float | None:
    """A finite, non-negative number, or None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) and v >= 0 else None


@dataclass(frozen=True)
class Quantiles:
    """p50 and p99 of a duration, in milliseconds (None: not measured)."""

    p50: float | None = None
    p99: float | None = None

    @classmethod
    def read(cls, v: Any) -> "Quantiles":
        if not isinstance(v, Mapping):
            return cls()
        return cls(_num(v.get("p50")), _num(v.get("p99")))

    def as_json(self) -> dict[str, float | None]:
        return {"p50": self.p50, "p99": self.p99}


@dataclass(frozen=True)
class StageTimings:
    """One node's rolling step timings (milliseconds) over the last ``window_s`` seconds."""

    window_s: float = 0.0
    steps: int = 0
    queued_ms: Quantiles = Quantiles()
    compute_ms: Quantiles = Quantiles()
    handoff_ms: Quantiles = Quantiles()
    #: At an entry: from one generated token to the next.
    decode_step_ms: Quantiles = Quantiles()
    prefill_ms_per_token: float | None = None
    #: Round trip to the node after it in the ring (the hop its results take).
    next_rtt_ms: float | None = None

    @classmethod
    def read(cls, d: Any, *, next_rtt_ms: float | None = None) -> "StageTimings | None":
        """From ``Runner.timings()`` or the status JSON; anything missing or not a number is
        unknown (None). None when ``d`` is not a mapping."""
        if not isinstance(d, Mapping):
            return None
        steps = d.get("steps")
        rtt = _num(d.get("next_rtt_ms")) if next_rtt_ms is None else _num(next_rtt_ms)
        return cls(window_s=_num(d.get("window_s")) or 0.0,
                   steps=steps if type(steps) is int and steps >= 0 else 0,
                   queued_ms=Quantiles.read(d.get("queued_ms")),
                   compute_ms=Quantiles.read(d.get("compute_ms")),
                   handoff_ms=Quantiles.read(d.get("handoff_ms")),
                   decode_step_ms=Quantiles.read(d.get("decode_step_ms")),
                   prefill_ms_per_token=_num(d.get("prefill_ms_per_token")),
                   next_rtt_ms=rtt)

    def as_json(self) -> dict[str, Any]:
        """The runner's dict shape, plus ``next_rtt_ms``."""
        out: dict[str, Any] = {"window_s": self.window_s, "steps": self.steps}
        for key in QUANTILE_KEYS:
            out[key] = getattr(self, key).as_json()
        out["prefill_ms_per_token"] = self.prefill_ms_per_token
        out["next_rtt_ms"] = self.next_rtt_ms
        return out

    # ------------------------------------------------------------------ gossip
    def dump(self) -> list[int | None]:
        """The gossiped form: :data:`WIRE_LEN` integers (microseconds; the window in
        milliseconds; the step count) or None."""
        def us(v: float | None) -> int | None:
            return None if v is None else min(U63, round(v * 1000))

        q = [us(getattr(getattr(self, k), p)) for k in QUANTILE_KEYS for p in ("p50", "p99")]
        return [min(U63, round(self.window_s * 1000)), min(U63, self.steps), *q,
                us(self.prefill_ms_per_token), us(self.next_rtt_ms)]

    @classmethod
    def load(cls, v: list[int | None]) -> "StageTimings":
        """From :meth:`dump` (checked by :data:`WIRE_RULE` first)."""
        def ms(x: int | None) -> float | None:
            return None if x is None else x / 1000

        qs = [Quantiles(ms(v[2 + 2 * i]), ms(v[3 + 2 * i])) for i in range(len(QUANTILE_KEYS))]
        return cls(window_s=(v[0] or 0) / 1000, steps=v[1] or 0, queued_ms=qs[0],
                   compute_ms=qs[1], handoff_ms=qs[2], decode_step_ms=qs[3],
                   prefill_ms_per_token=ms(v[10]), next_rtt_ms=ms(v[11]))


WIRE_LEN = 12
WIRE_RULE = Rule(lambda v: type(v) is list and len(v) == WIRE_LEN
                 and all(x is None or (type(x) is int and 0 <= x <= U63) for x in v),
                 f"a list of {WIRE_LEN} integers in 0..{U63} or None")


# ----------------------------------------------------------------------------- breakdown
@dataclass(frozen=True)
class StageStep:
    """What one stage of the ring spends per token: its name (a node), its p50 timings
    (None: unknown), the node after it and the round trip to it, and its memory-bound floor
    (shard bytes / memory bandwidth; None: unknown)."""

    name: str
    compute_ms: float | None
    queued_ms: float | None = None
    handoff_ms: float | None = None
    next_name: str | None = None
    next_rtt_ms: float | None = None
    floor_ms: float | None = None


@dataclass(frozen=True)
class Part:
    """One share of a token's time: ``kind`` is ``compute``, ``queued``, ``handoff`` (a node)
    or ``hop`` (a link, half its round trip)."""

    kind: str
    name: str
    ms: float
    share: float  # of the measured time per token
    floor_ms: float | None = None  # compute: the stage's memory-bound floor

    @property
    def label(self) -> str:
        return f"link {self.name}" if self.kind == "hop" else f"{self.name} {self.kind}"


@dataclass(frozen=True)
class Breakdown:
    """A measured time per token split over the ring's stages and hops."""

    ms_per_token: float
    parts: tuple[Part, ...]
    #: What no stage or hop accounts for (the entry's own work, event loops, clock noise).
    other_ms: float
    #: The largest part; None when some stage reports no compute time (see ``unmeasured``).
    bottleneck: Part | None
    #: The ring's single-stream ceiling (tokens/s) and measured / ceiling.
    ceiling_tps: float | None = None
    efficiency: float | None = None
    #: Stages that report no compute time (a node whose runner keeps no step timings).
    unmeasured: tuple[str, ...] = ()

    def line(self) -> str:
        """``bottleneck: n2 compute, 72 ms of 178 ms per token (memory-bound ceiling 31 ms:
        compute-bound here)``."""
        b = self.bottleneck
        if b is None:
            largest = max(self.parts, key=lambda p: p.ms, default=None)
            return (f"bottleneck: unknown, {_ms(self.ms_per_token)} per token: no step "
                    f"timings from {', '.join(self.unmeasured) or 'any stage'}"
                    + (f" (largest part measured: {largest.label}, {_ms(largest.ms)})"
                       if largest is not None else ""))
        head = f"bottleneck: {b.label}, {_ms(b.ms)} of {_ms(self.ms_per_token)} per token"
        if b.kind == "compute":
            if b.floor_ms is None:
                return head + " (memory-bound ceiling unknown: no memory bandwidth reported)"
            bound = ("memory-bound" if b.ms <= b.floor_ms * MEMORY_BOUND_FACTOR
                     else "compute-bound")
            return head + f" (memory-bound ceiling {_ms(b.floor_ms)}: {bound} here)"
        if b.kind == "hop":
            return head + f" (round trip {_ms(2 * b.ms)}: the network)"
        if b.kind == "queued":
            return head + " (steps wait for the node's compute: it runs other requests' steps)"
        return head + " (handing results to the next hop: the transport)"

    def as_json(self) -> dict[str, Any]:
        return {"ms_per_token": self.ms_per_token, "other_ms": self.other_ms,
                "parts": [{"kind": p.kind, "name": p.name, "ms": p.ms, "share": p.share,
                           "floor_ms": p.floor_ms} for p in self.parts],
                "bottleneck": None if self.bottleneck is None else {
                    "kind": self.bottleneck.kind, "name": self.bottleneck.name,
                    "ms": self.bottleneck.ms, "floor_ms": self.bottleneck.floor_ms},
                "ceiling_tps": self.ceiling_tps, "efficiency": self.efficiency,
                "unmeasured": list(self.unmeasured), "line": self.line()}


def _ms(v: float) -> str:
    return f"{v:.0f} ms" if v >= 10 else f"{v:.2g} ms" if v >= 0.1 else f"{v * 1000:.0f} us"


def breakdown(stages: Sequence[StageStep], ms_per_token: float,
              ceiling_tps: float | None = None) -> Breakdown:
    """Split ``ms_per_token`` (one stream's measured time per token) over ``stages`` (in ring
    order, the last one's next being the first): each stage's queue wait, compute and
    hand-off, and each hop as half its round trip (only with more than one stage). Shares
    are of ``ms_per_token``; the bottleneck is the largest part, named only when every stage
    reports its compute time (a hop's round trip alone, measured while the nodes compute,
    would name the network for what the CPUs spent)."""
    if not (ms_per_token > 0 and math.isfinite(ms_per_token)):
        raise ValueError(f"ms_per_token must be a positive number, got {ms_per_token!r}")
    parts: list[Part] = []
    for s in stages:
        for kind in ("queued", "compute", "handoff"):
            v = getattr(s, f"{kind}_ms")
            if v is not None:
                parts.append(Part(kind, s.name, v, v / ms_per_token,
                                  s.floor_ms if kind == "compute" else None))
        if len(stages) > 1 and s.next_rtt_ms is not None and s.next_name is not None:
            hop = s.next_rtt_ms / 2
            parts.append(Part("hop", f"{s.name} -> {s.next_name}", hop, hop / ms_per_token))
    accounted = sum(p.ms for p in parts)
    tps = 1000.0 / ms_per_token
    unmeasured = tuple(s.name for s in stages if s.compute_ms is None)
    return Breakdown(ms_per_token=ms_per_token, parts=tuple(parts),
                     other_ms=ms_per_token - accounted,
                     bottleneck=(max(parts, key=lambda p: p.ms)
                                 if parts and stages and not unmeasured else None),
                     ceiling_tps=ceiling_tps,
                     efficiency=tps / ceiling_tps if ceiling_tps else None,
                     unmeasured=unmeasured)


def slowest(timings: Mapping[str, StageTimings | None], ring: Sequence[str]
            ) -> tuple[tuple[str, float] | None, tuple[str, str, float] | None]:
    """``((node, compute p50 ms), (node, next node, round trip ms))``: the ring's slowest
    stage and slowest link among ``timings`` (by node name), ``ring`` in ring order."""
    stage = max(((n, t.compute_ms.p50) for n in ring if (t := timings.get(n)) is not None
                 and t.compute_ms.p50 is not None), key=lambda x: x[1], default=None)
    links = []
    if len(ring) > 1:
        for i, n in enumerate(ring):
            t = timings.get(n)
            if t is not None and t.next_rtt_ms is not None:
                links.append((n, ring[(i + 1) % len(ring)], t.next_rtt_ms))
    link = max(links, key=lambda x: x[2], default=None)
    return stage, link
