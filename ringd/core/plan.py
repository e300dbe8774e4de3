"""The layer plan: (view members, model shape, epoch) -> ring order and contiguous layer ranges.

A pure function every node evaluates for itself; the same inputs give the same plan (and
the same hash) on every node, whatever order the members arrive in.

Rules:

- Order is the stable key: members sorted by ``node_id``. The first node also holds the
  embedding, the last node the final norm and head.
- A node that cannot hold even the largest layer plus the extras of its position is
  excluded, with the reason recorded in :attr:`Plan.excluded` (never silently dropped).
  So is the smallest node when the ring has more nodes than the model has layers.
- Layer counts follow each node's *effective* memory (usable minus its extras) with
  largest-remainder rounding, so every count is within one layer of its exact share
  (a node whose share is under one layer still gets one).
- If that split overfills a node although some contiguous split fits, the layers are
  packed instead to minimise the fullest node's fill ratio (``Plan.packed``). If nothing
  fits, :class:`ringd.errors.PlanError` says so with the numbers.

Sizes are shown with :func:`ringd.units.format_size` (binary units, GiB) everywhere.

Hashes: :attr:`Plan.layout_hash` identifies the model and the ranges; :attr:`Plan.hash`
also covers the epoch, so every commit is distinct. The epoch is an input: the
agreement (``ringd.core.agreement``) settles it through gossip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from ringd.errors import LocalProtocolError, PlanError
from ringd.units import format_size

#: Shown with every "does not fit" error.
FIT_HINT = (
    "add a node, or raise a node's memory budget (--memory-budget); on macOS MLX can wire "
    "only the Metal working set (about 70-75% of RAM), raise it with "
    "`sudo sysctl iogpu.wired_limit_mb=N`"
)

_RATIO_BITS = 20  # fill-ratio resolution of the packing search: 1 / 2**20


@dataclass(frozen=True)
class ModelShape:
    """What a model needs in memory, per part, in bytes."""

    name: str
    layer_bytes: tuple[int, ...]
    #: Token embedding, held by the first node.
    embed_bytes: int
    #: Final norm and output head, held by the last node (tied embeddings: the embedding again).
    head_bytes: int
    #: KV cache per layer for the configured context x concurrency.
    kv_bytes_per_layer: int = 0

    def __post_init__(self) -> None:
        if not self.layer_bytes:
            raise LocalProtocolError(f"model {self.name!r}: a model needs at least one layer")
        if min(self.layer_bytes) <= 0:
            raise LocalProtocolError(f"model {self.name!r}: every layer must have a positive size")
        if min(self.embed_bytes, self.head_bytes, self.kv_bytes_per_layer) < 0:
            raise LocalProtocolError(f"model {self.name!r}: sizes cannot be negative")

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embed_bytes + self.head_bytes

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_layer * self.num_layers

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def layer_cost(self, i: int) -> int:
        return self.layer_bytes[i] + self.kv_bytes_per_layer


@dataclass(frozen=True)
class Assignment:
    """Node ``node_id`` owns layers ``[start, end)``; ``bytes_needed`` includes its extras."""

    node_id: str
    start: int
    end: int
    bytes_needed: int
    usable: int

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def fill(self) -> float:
        return self.bytes_needed / self.usable if self.usable else float("inf")

    def describe(self) -> str:
        return f"layers {self.start}-{self.end - 1}"


@dataclass(frozen=True)
class Exclusion:
    """A member of the view that holds no layers, and why."""

    node_id: str
    reason: str


@dataclass(frozen=True)
class Plan:
    model: str
    epoch: int
    num_layers: int
    order: tuple[Assignment, ...]
    excluded: tuple[Exclusion, ...]
    #: True when the proportional split overfilled a node and layers were packed instead.
    packed: bool
    layout_hash: str
    hash: str

    @property
    def first(self) -> Assignment:
        return self.order[0]

    @property
    def last(self) -> Assignment:
        return self.order[-1]

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(a.node_id for a in self.order)

    def assignment(self, node_id: str) -> Assignment | None:
        for a in self.order:
            if a.node_id == node_id:
                return a
        return None

    def owner_of(self, layer: int) -> Assignment:
        if not 0 <= layer < self.num_layers:
            raise LocalProtocolError(
                f"layer {layer} is outside the model's 0-{self.num_layers - 1}"
            )
        for a in self.order:
            if a.start <= layer < a.end:
                return a
        raise AssertionError("a plan covers every layer")  # pragma: no cover

    def next_after(self, node_id: str) -> str:
        """The node after ``node_id`` around the ring (the last node wraps to the first)."""
        ids = self.node_ids
        if node_id not in ids:
            raise LocalProtocolError(f"node {node_id} holds no layers in plan {self.hash[:12]}")
        return ids[(ids.index(node_id) + 1) % len(ids)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "epoch": self.epoch,
            "num_layers": self.num_layers,
            "hash": self.hash,
            "layout_hash": self.layout_hash,
            "packed": self.packed,
            "order": [
                {
                    "node_id": a.node_id,
                    "start": a.start,
                    "end": a.end,
                    "bytes_needed": a.bytes_needed,
                    "usable": a.usable,
                }
                for a in self.order
            ],
            "excluded": [{"node_id": e.node_id, "reason": e.reason} for e in self.excluded],
        }


def model_shape(info: Any, settings: Any) -> ModelShape:
    """What the plan needs to know of a model (``info``: a
    :class:`ringd.compute.model_info.ModelInfo`): bytes per layer, the ends, and the KV cache
    per layer for ``settings.max_context`` tokens of ``settings.max_concurrent`` requests."""
    kv = info.kv_bytes_per_token_per_layer * settings.max_context * settings.max_concurrent
    return ModelShape(info.name, tuple(info.layer_bytes), info.embed_bytes,
                      info.head_bytes + info.norm_bytes, kv)


def render_bar(start: int, end: int, num_layers: int, width: int = 32) -> str:
    """``[###.......]``: ``#`` over the cells of layers ``[start, end)`` of ``num_layers``."""
    if width < 1 or num_layers < 1 or not 0 <= start <= end <= num_layers:
        raise LocalProtocolError(
            f"render_bar: bad range [{start}, {end}) of {num_layers} in width {width}"
        )
    lo = start * width // num_layers
    hi = -(-end * width // num_layers)  # ceil: a non-empty range always shows
    if end > start and hi == lo:
        hi = lo + 1
    return "[" + "." * lo + "#" * (hi - lo) + "." * (width - hi) + "]"


def canonical_hash(obj: Any) -> str:
    """32 hex digits of sha256 over the msgpack encoding of ``obj`` (lists, ints, str only)."""
    return hashlib.sha256(msgpack.packb(obj, use_bin_type=True)).hexdigest()[:32]


def _size_up(n: int) -> str:
    """Like :func:`format_size`, but rounded up, so adding the amount shown is always enough."""
    for unit, scale in (("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3), ("TiB", 1024**4)):
        if n < scale:
            break
        shown = f"{-(-n * 10 // scale) / 10:.1f} {unit}"
        if n < 1024 * scale or unit == "TiB":
            return shown
    return f"{n} B"


def make_plan(members: Iterable[tuple[str, int]], shape: ModelShape, *, epoch: int = 0) -> Plan:
    """Split ``shape`` over ``members``: ``(node_id, usable_bytes)`` pairs. PlanError: no fit."""
    usable: dict[str, int] = {}
    for node_id, mem in members:
        if node_id in usable:
            raise LocalProtocolError(f"make_plan: node {node_id} is listed twice")
        if mem < 0:
            raise LocalProtocolError(f"make_plan: node {node_id} has negative usable memory")
        usable[node_id] = mem
    if not usable:
        raise PlanError(f"model {shape.name}: the ring has no nodes", hint=FIT_HINT)

    num_layers = shape.num_layers
    costs = [shape.layer_cost(i) for i in range(num_layers)]
    largest = max(costs)
    excluded: list[Exclusion] = []
    included = sorted(usable)

    # More nodes than layers: the nodes with the least memory sit out.
    if len(included) > num_layers:
        by_size = sorted(included, key=lambda n: (usable[n], n))
        for n in by_size[: len(included) - num_layers]:
            included.remove(n)
            excluded.append(
                Exclusion(
                    n,
                    f"the model has only {num_layers} layers and this node offers the least memory "
                    f"({format_size(usable[n])})",
                )
            )

    # A node that cannot hold one layer plus its position's extras sits out; repeat, since
    # removing a node changes who is first and last.
    while included:
        for pos, n in enumerate(included):
            extras, what = _extras(pos, len(included), shape)
            need = largest + extras
            if usable[n] < need:
                included.pop(pos)
                excluded.append(
                    Exclusion(
                        n,
                        f"usable {format_size(usable[n])} < {format_size(need)} "
                        "needed for one layer"
                        f" ({format_size(largest)}){what}",
                    )
                )
                break
        else:
            break
    excluded.sort(key=lambda e: e.node_id)

    if not included:
        raise PlanError(
            f"model {shape.name}: no node can hold even one layer "
            f"({format_size(largest)} with its KV cache)" + _excluded_note(excluded),
            hint=FIT_HINT,
        )

    have = sum(usable[n] for n in included)
    need = shape.total_bytes
    if need > have:
        kv = f" + KV cache {format_size(shape.kv_bytes)}" if shape.kv_bytes else ""
        raise PlanError(
            f"model {shape.name} needs {format_size(need)} "
            f"(weights {format_size(shape.weight_bytes)}{kv}), "
            f"the ring has {format_size(have)} usable on {len(included)} "
            f"node{'s' if len(included) != 1 else ''}; "
            f"add >= {_size_up(need - have)}" + _excluded_note(excluded),
            hint=FIT_HINT,
        )

    extras = [_extras(pos, len(included), shape)[0] for pos in range(len(included))]
    caps = [usable[n] for n in included]
    counts = proportional_counts([c - e for c, e in zip(caps, extras)], num_layers)
    bounds = _bounds(counts)
    packed = not _fits(bounds, costs, extras, caps)
    if packed:
        packed_bounds = _pack(costs, extras, caps)
        if packed_bounds is None:
            raise PlanError(
                f"model {shape.name} ({num_layers} layers, {format_size(need)}) fits the ring's "
                f"{format_size(have)} in total, but no contiguous split does: largest layer "
                f"{format_size(largest)}, embedding {format_size(shape.embed_bytes)} on "
                f"{included[0]}, head {format_size(shape.head_bytes)} on {included[-1]}"
                + _excluded_note(excluded),
                hint=FIT_HINT,
            )
        bounds = packed_bounds

    order = []
    for pos, n in enumerate(included):
        s, e = bounds[pos], bounds[pos + 1]
        order.append(Assignment(n, s, e, sum(costs[s:e]) + extras[pos], usable[n]))
    layout = [shape.name, num_layers, [[a.node_id, a.start, a.end] for a in order]]
    layout_hash = canonical_hash(layout)
    return Plan(
        model=shape.name,
        epoch=epoch,
        num_layers=num_layers,
        order=tuple(order),
        excluded=tuple(excluded),
        packed=packed,
        layout_hash=layout_hash,
        hash=canonical_hash([layout_hash, epoch]),
    )


def proportional_counts(weights: Sequence[int], total: int) -> list[int]:
    """Split ``total`` items in proportion to positive integer ``weights``: largest remainder
    (ties to the earlier position), then every share at least 1 (needs ``total >= len(weights)``):
    a share under one item gets one, taken from the share furthest above its exact value
    (ties: the later position).

    When every exact share ``total * w / sum(weights)`` is at least 1, every result is within
    one item of it.
    """
    n = len(weights)
    if n == 0 or total < n or min(weights) <= 0:
        raise LocalProtocolError(f"proportional_counts: {n} positive weights for {total} items")
    wsum = sum(weights)
    counts = [total * w // wsum for w in weights]
    rema = [total * w % wsum for w in weights]
    for i in sorted(range(n), key=lambda i: (-rema[i], i))[: total - sum(counts)]:
        counts[i] += 1
    # Raise empty shares to one, each time taking from the node furthest above its share.
    for j in range(n):
        if counts[j] == 0:
            donors = [k for k in range(n) if counts[k] >= 2]
            k = max(donors, key=lambda k: (counts[k] * wsum - total * weights[k], k))
            counts[k] -= 1
            counts[j] = 1
    return counts


def _extras(pos: int, n: int, shape: ModelShape) -> tuple[int, str]:
    extra, parts = 0, []
    if pos == 0:
        extra += shape.embed_bytes
        parts.append(f"embedding {format_size(shape.embed_bytes)}")
    if pos == n - 1:
        extra += shape.head_bytes
        parts.append(f"head {format_size(shape.head_bytes)}")
    return extra, (" + " + " + ".join(parts)) if parts else ""


def _excluded_note(excluded: Sequence[Exclusion]) -> str:
    if not excluded:
        return ""
    return " (not counted: " + "; ".join(f"{e.node_id}: {e.reason}" for e in excluded) + ")"


def _bounds(counts: Sequence[int]) -> list[int]:
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return bounds


def _fits(
    bounds: Sequence[int], costs: Sequence[int], extras: Sequence[int], caps: Sequence[int]
) -> bool:
    return all(
        sum(costs[bounds[j] : bounds[j + 1]]) + extras[j] <= caps[j] for j in range(len(caps))
    )


def _pack(costs: Sequence[int], extras: Sequence[int], caps: Sequence[int]) -> list[int] | None:
    """Contiguous split, each node >= 1 layer, minimising the fullest node's fill ratio
    (integer search on ratio steps of 2**-20). None when no split fits at all."""
    full = 1 << _RATIO_BITS
    best = _split_within([c - e for c, e in zip(caps, extras)], costs)
    if best is None:
        return None
    lo, hi = 0, full  # hi: a ratio known to fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        found = _split_within([(c * mid >> _RATIO_BITS) - e for c, e in zip(caps, extras)], costs)
        if found is None:
            lo = mid
        else:
            hi, best = mid, found
    return best


def _split_within(budgets: Sequence[int], costs: Sequence[int]) -> list[int] | None:
    """Bounds of a contiguous split where node j's layers cost at most ``budgets[j]`` and
    every node gets at least one layer; None if there is none. O(nodes x layers)."""
    n, num = len(budgets), len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # reach[j][e]: nodes 0..j can cover layers [0, e) exactly.
    reach: list[list[bool]] = []
    prev = [True] + [False] * num
    for j in range(n):
        cur = [False] * (num + 1)
        budget = budgets[j]
        if budget >= 0:
            seen = [0]
            for flag in prev:
                seen.append(seen[-1] + flag)
            lo = 0
            for e in range(1, num + 1):
                while lo < e and prefix[e] - prefix[lo] > budget:
                    lo += 1
                # some reachable start s in [lo, e-1]
                cur[e] = lo <= e - 1 and seen[e] - seen[lo] > 0
        reach.append(cur)
        prev = cur
    if not prev[num]:
        return None
    bounds = [num]
    e = num
    for j in range(n - 1, -1, -1):
        before = reach[j - 1] if j else [True] + [False] * num
        # the earliest start: later nodes take as much as their budget allows
        s = next(s for s in range(e) if before[s] and prefix[e] - prefix[s] <= budgets[j])
        bounds.append(s)
        e = s
    bounds.reverse()
    return bounds
