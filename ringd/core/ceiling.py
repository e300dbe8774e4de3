"""Honest decode-speed ceilings for a pipeline ring (issue 6, item 4).

Decoding one token reads every weight once, so a single stream can never beat

    t_token = sum over nodes (shard bytes / node memory bandwidth) + sum of hop latencies

With ``k`` requests in flight the stages overlap: throughput is at most
``min(k / t_token, 1 / slowest stage)`` where a stage is one node reading its shard.
These are upper bounds (peak bandwidth, no KV-cache reads, no compute): a measured rate
above them means the ring is broken (a shard skipped, layers not run), not fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ringd.errors import LocalProtocolError

#: (bytes a node reads per token, that node's memory bandwidth in bytes/s)
Shard = tuple[float, float]

GB = 1e9
#: Llama-3.1-405B at 4 bits, as published (~228 GB of weights).
LLAMA_405B_4BIT_BYTES = 228 * GB


def _check(shards: Sequence[Shard], hop_latency_s: Sequence[float]) -> None:
    if not shards:
        raise LocalProtocolError("a ceiling needs at least one shard")
    for b, bw in shards:
        if b < 0 or bw <= 0:
            raise LocalProtocolError(
                f"shard ({b} bytes, {bw} B/s): bytes must be >= 0 and bandwidth > 0"
            )
    if any(h < 0 for h in hop_latency_s):
        raise LocalProtocolError("hop latencies cannot be negative")


def token_time(shards: Sequence[Shard], hop_latency_s: Sequence[float]) -> float:
    """Seconds one token needs at least: every shard read once, every hop taken once."""
    _check(shards, hop_latency_s)
    return sum(b / bw for b, bw in shards) + sum(hop_latency_s)


def decode_ceiling(shards: Sequence[Shard], hop_latency_s: Sequence[float]) -> float:
    """Single-stream tokens/s upper bound."""
    t = token_time(shards, hop_latency_s)
    return float("inf") if t == 0 else 1.0 / t


def aggregate_ceiling(
    shards: Sequence[Shard], hop_latency_s: Sequence[float], concurrency: int
) -> float:
    """Tokens/s upper bound summed over ``concurrency`` streams pipelined through the ring."""
    if concurrency < 1:
        raise LocalProtocolError(f"concurrency must be at least 1, got {concurrency}")
    single = decode_ceiling(shards, hop_latency_s)
    slowest = max(b / bw for b, bw in shards)
    return concurrency * single if slowest == 0 else min(concurrency * single, 1.0 / slowest)


def is_impossible(measured: float, ceiling: float, tolerance: float = 0.05) -> bool:
    """True when ``measured`` tokens/s beats ``ceiling`` by more than ``tolerance`` (a fraction)."""
    return measured > ceiling * (1.0 + tolerance)


@dataclass(frozen=True)
class Machine:
    name: str
    memory_bytes: float
    bandwidth: float  # bytes/s


M2_ULTRA = Machine("M2 Ultra Mac Studio", 192 * GB, 800 * GB)
M4_PRO_MINI = Machine("M4 Pro Mac mini", 64 * GB, 273 * GB)
M3_ULTRA = Machine("M3 Ultra Mac Studio", 512 * GB, 819 * GB)


@dataclass(frozen=True)
class Projection:
    setup: str
    nodes: int
    shard_bytes: tuple[float, ...]
    #: concurrency -> tokens/s ceiling
    ceilings: tuple[tuple[int, float], ...]


def project(
    model_bytes: float,
    machines: Sequence[Machine],
    hop_overhead_s: float,
    concurrency: Sequence[int] = (1, 3, 8),
) -> Projection:
    """Ceilings for ``model_bytes`` split over ``machines`` in proportion to their memory,
    one hop per node per token (the last hop carries the token back to the first node)."""
    total_mem = sum(m.memory_bytes for m in machines)
    shards = [(model_bytes * m.memory_bytes / total_mem, m.bandwidth) for m in machines]
    hops = [hop_overhead_s] * len(machines) if len(machines) > 1 else []
    names = sorted({m.name for m in machines})
    setup = " + ".join(f"{sum(m.name == n for m in machines)}x {n}" for n in names)
    return Projection(
        setup=setup,
        nodes=len(machines),
        shard_bytes=tuple(b for b, _ in shards),
        ceilings=tuple((k, aggregate_ceiling(shards, hops, k)) for k in concurrency),
    )


def projection_table(
    hop_overhead_s: float, model_bytes: float = LLAMA_405B_4BIT_BYTES
) -> list[Projection]:
    """The README's projection: Llama-3.1-405B 4-bit on three Apple silicon rings."""
    return [
        project(model_bytes, [M2_ULTRA] * 3, hop_overhead_s),
        project(model_bytes, [M4_PRO_MINI] * 8, hop_overhead_s),
        project(model_bytes, [M3_ULTRA] * 2, hop_overhead_s),
    ]


def render_projection_table(rows: Sequence[Projection], hop_overhead_s: float) -> str:
    """A Markdown table of ceilings in tokens/s."""
    ks = [k for k, _ in rows[0].ceilings]
    head = ["ring", "weights per node"] + [
        "1 stream" if k == 1 else f"{k} concurrent (total)" for k in ks
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per_node = max(r.shard_bytes) / GB
        cells = [r.setup, f"{per_node:.1f} GB"] + [f"{c:.1f} tok/s" for _, c in r.ceilings]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Upper bounds at peak memory bandwidth with {hop_overhead_s * 1e6:.0f} µs per hop "
        "(one hop per node per token); real rings run below them."
    )
    return "\n".join(lines)
