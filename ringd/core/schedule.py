"""Which MLX job a node runs next: decode steps before prefill, prefill in slices. Pure.

A stage runs one job at a time on its MLX thread. Run in arrival order, a prefill chunk
(hundreds of tokens: seconds on a big model) holds up every other request's decode step
behind it, and their streams freeze. The :class:`Scheduler` orders the
:class:`ringd.core.pipeline.Compute` jobs instead:

- **Decode first, no starvation.** Among the requests' next jobs (a request's own jobs never
  change order), decode steps go first; once every request with a decode step waiting has
  had one since the last prefill slice, the oldest prefill gets one slice. So a running
  stream waits at most about one slice between its steps, and a prefill still moves one
  slice per round.
- **Slices sized by measurement.** A prefill job is cut (along its tokens) into slices that
  take about ``slice_steps`` decode steps on this node, from the measured decode step time
  and prefill time per token (or ``slice_tokens`` when pinned); each slice is its own job,
  the first one opening the request's cache, the last one carrying the chunk's ``final``.
- **Unsliced when alone.** Slices cost prefill speed (a slice does less work per weight
  read), so a prompt with no other request on the node runs in whole chunks.
- **Cancel within one slice:** :meth:`drop` forgets a request's queued jobs.

``mode = "fifo"`` runs jobs whole in arrival order (the behaviour before; for benches).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from ringd.core import wire
from ringd.core.pipeline import Compute
from ringd.errors import LocalProtocolError

#: Weight of the newest measurement in the running averages.
EMA = 0.2
#: Timings kept for the percentiles of ``timings()``.
WINDOW = 256


@dataclass(frozen=True)
class ScheduleConfig:
    mode: str = "decode-first"  # or "fifo"
    #: Tokens per prefill slice; 0: as many as take ``slice_steps`` decode steps here.
    slice_tokens: int = 0
    slice_steps: float = 1.5
    #: Slice size before anything was measured, and its bounds.
    first_slice: int = 32
    max_slice: int = 512

    def __post_init__(self) -> None:
        if self.mode not in ("decode-first", "fifo"):
            raise LocalProtocolError(f"schedule mode {self.mode!r}: decode-first or fifo")
        if self.slice_tokens < 0 or self.slice_steps <= 0 or not 1 <= self.first_slice:
            raise LocalProtocolError("slice_tokens >= 0, slice_steps > 0, first_slice >= 1")


def tokens_of(job: Compute) -> int:
    """Tokens (positions) a job computes: token ids ``[T]`` or hidden states ``[1, T, H]``."""
    shape = job.tensor.shape
    return shape[0] if len(shape) == 1 else shape[1]


def is_decode(job: Compute) -> bool:
    return job.final and tokens_of(job) == 1


def slice_rows(t: wire.Tensor, a: int, b: int) -> wire.Tensor:
    """Positions ``[a, b)`` of a token-ids ``[T]`` or hidden-states ``[1, T, H]`` tensor, as
    a view (no copy)."""
    seq_dim = 0 if len(t.shape) == 1 else 1
    row = wire.DTYPE_SIZES[t.dtype] * math.prod(t.shape[seq_dim + 1:])
    shape = (b - a,) if seq_dim == 0 else (t.shape[0], b - a, *t.shape[2:])
    return wire.Tensor(t.dtype, shape, memoryview(t.data).cast("B")[a * row:b * row])


def cut(job: Compute, n: int) -> tuple[Compute, Compute | None]:
    """The first ``n`` positions of ``job`` as a job of their own, and the rest (or None)."""
    total = tokens_of(job)
    if n >= total:
        return job, None
    head = dataclasses.replace(job, tensor=slice_rows(job.tensor, 0, n), final=False)
    rest = dataclasses.replace(job, tensor=slice_rows(job.tensor, n, total),
                               position=job.position + n, new=False)
    return head, rest


class Scheduler:
    """The queue of one node's MLX jobs; loop thread only."""

    def __init__(self, config: ScheduleConfig = ScheduleConfig()) -> None:
        self.config = config
        self._queues: OrderedDict[str, deque[tuple[float, Compute]]] = OrderedDict()
        self._round: set[str] = set()  # requests that had a decode step since the last slice
        self.decode_s: float | None = None  # running average of a decode step here
        self.prefill_s_per_token: float | None = None
        self._queued: deque[float] = deque(maxlen=WINDOW)
        self._compute: deque[float] = deque(maxlen=WINDOW)
        self._decode: deque[float] = deque(maxlen=WINDOW)
        self._handoff: deque[float] = deque(maxlen=WINDOW)
        self._ends: deque[float] = deque(maxlen=WINDOW)
        self.counters = {"jobs": 0, "slices": 0, "dropped": 0}

    # ---------------------------------------------------------------- inputs
    def push(self, job: Compute, now: float) -> None:
        self._queues.setdefault(job.request_id, deque()).append((now, job))

    def drop(self, request_id: str) -> int:
        """Forget ``request_id``'s queued jobs (it ended); how many there were."""
        q = self._queues.pop(request_id, None)
        self._round.discard(request_id)
        n = len(q) if q else 0
        self.counters["dropped"] += n
        return n

    def finished(self, job: Compute, seconds: float, handoff: float, now: float) -> None:
        """``job`` took ``seconds`` on the MLX thread, then ``handoff`` seconds until its
        result was on its way (``now``): measurements for the slice size and for status."""
        self._compute.append(seconds)
        self._handoff.append(handoff)
        self._ends.append(now)
        if is_decode(job):
            self._decode.append(seconds)
            self.decode_s = seconds if self.decode_s is None else (
                (1 - EMA) * self.decode_s + EMA * seconds)
        elif tokens_of(job) > 1:
            per = seconds / tokens_of(job)
            self.prefill_s_per_token = per if self.prefill_s_per_token is None else (
                (1 - EMA) * self.prefill_s_per_token + EMA * per)

    # ---------------------------------------------------------------- outputs
    def pop(self, now: float, *, alone: bool = False) -> Compute | None:
        """The next job to run (None: nothing queued). ``alone``: no other request holds
        state on this node, so no decode step can come to wait: a prompt runs unsliced."""
        if not self._queues:
            return None
        if self.config.mode == "fifo":
            rid = min(self._queues, key=lambda r: self._queues[r][0][0])
            return self._take(rid, now, whole=True)
        heads = [(rid, q[0][1]) for rid, q in self._queues.items()]
        decodes = [rid for rid, job in heads if is_decode(job)]
        prefills = [rid for rid, job in heads if not is_decode(job)]
        waiting = [rid for rid in decodes if rid not in self._round]
        if waiting:
            rid = waiting[0]
            self._round.add(rid)
            return self._take(rid, now, whole=True)
        if prefills:
            self._round.clear()
            return self._take(prefills[0], now, whole=alone and len(self._queues) == 1)
        self._round.clear()  # every stream had its step: a new round
        rid = decodes[0]
        self._round.add(rid)
        return self._take(rid, now, whole=True)

    def slice_tokens(self) -> int:
        cfg = self.config
        if cfg.slice_tokens:
            return cfg.slice_tokens
        if self.decode_s is None or not self.prefill_s_per_token:
            return cfg.first_slice
        n = int(cfg.slice_steps * self.decode_s / self.prefill_s_per_token)
        return max(1, min(cfg.max_slice, n))

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def timings(self) -> dict[str, Any]:
        """The last jobs here (at most :data:`WINDOW`, over ``window_s`` seconds): time
        queued, computing and handing the result off (ms: p50 and p99), for status."""
        ends = self._ends
        return {"window_s": round(ends[-1] - ends[0], 3) if ends else 0.0, "steps": len(ends),
                "queued_ms": _pct(self._queued), "compute_ms": _pct(self._compute),
                "handoff_ms": _pct(self._handoff), "decode_step_ms": _pct(self._decode),
                "prefill_ms_per_token": (None if self.prefill_s_per_token is None
                                         else round(1000 * self.prefill_s_per_token, 3)),
                "mode": self.config.mode, "slice_tokens": self.slice_tokens(),
                "queued_jobs": self.queued,
                **self.counters}

    # ---------------------------------------------------------------- internals
    def _take(self, rid: str, now: float, *, whole: bool) -> Compute:
        q = self._queues[rid]
        queued_at, job = q[0]
        if not whole:
            self.counters["slices"] += 1  # prompt jobs run, each at most one slice long
            head, rest = cut(job, self.slice_tokens())
            if rest is not None:
                q[0] = (queued_at, rest)
                self.counters["jobs"] += 1
                self._queued.append(now - queued_at)
                return head
        q.popleft()
        if not q:
            del self._queues[rid]
        self.counters["jobs"] += 1
        self._queued.append(now - queued_at)
        return job


def _pct(values: deque[float]) -> dict[str, float] | None:
    if not values:
        return None
    s = sorted(values)
    return {"p50": round(1000 * s[len(s) // 2], 3),
            "p99": round(1000 * s[min(len(s) - 1, int(len(s) * 0.99))], 3)}
