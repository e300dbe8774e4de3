"""Proofs that the ring computes the whole model, and honest speed figures (issue 6). Pure.

Weights fingerprints: every tensor of a model directory has a hash in its manifest
(:mod:`ringd.compute.manifest`). A shard's fingerprint is ``"START-END:DIGEST"``, the digest
over the sorted (tensor name, tensor hash) pairs of the tensors the shard loaded. Every node
gossips its own; every node checks the others' against what its own files give for their
assigned ranges (:func:`check_fingerprints`); the ring's fingerprint covers the plan hash and
every stage's fingerprint in ring order.

Ceilings: :func:`ring_ceiling` turns the plan's shards, each node's memory bandwidth and the
per-hop latency into the single-stream and aggregate ceilings of :mod:`ringd.core.ceiling`;
:func:`rate_verdict` flags a measured rate above them as impossible.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ringd.core.ceiling import aggregate_ceiling, decode_ceiling, is_impossible
from ringd.core.ringmeta import MAX_REFUSAL
from ringd.errors import LocalProtocolError

DIGEST_SIZE = 16  # bytes of BLAKE2b: 32 hex digits
_FP_RE = re.compile(r"(\d{1,9})-(\d{1,9}):([0-9a-f]{32})")


# ----------------------------------------------------------------------------- fingerprints
def tensors_digest(pairs: Iterable[tuple[str, str]]) -> str:
    """32 hex digits over (tensor name, tensor hash) pairs, in name order."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"ringd-shard")
    for name, digest in sorted(pairs):
        if "\0" in name or "\n" in name:
            raise LocalProtocolError(f"tensor name {name!r} holds a control character")
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


def shard_fingerprint(start: int, end: int, pairs: Iterable[tuple[str, str]]) -> str:
    """``"START-END:DIGEST"``: the layers a shard holds and the digest of its tensors."""
    if not 0 <= start < end:
        raise LocalProtocolError(f"shard_fingerprint: bad layer range [{start}, {end})")
    return f"{start}-{end}:{tensors_digest(pairs)}"


def parse_fingerprint(text: str | None) -> tuple[int, int, str] | None:
    """``(start, end, digest)`` of a gossiped fingerprint, or None if it is not one."""
    m = _FP_RE.fullmatch(text or "")
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def ring_fingerprint(plan_hash: str, stage_fingerprints: Sequence[str]) -> str:
    """32 hex digits over the plan hash and every stage's fingerprint, in ring order."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"ringd-ring")
    h.update(plan_hash.encode() + b"\n")
    for fp in stage_fingerprints:
        h.update(fp.encode() + b"\n")
    return h.hexdigest()


def check_loaded(start: int, end: int, expected: Collection[str],
                 loaded: Collection[str]) -> str | None:
    """Why the tensors a shard loaded are not those of layers ``[start, end)``, or None."""
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    if not missing and not extra:
        return None
    parts = [f"the shard assigned layers [{start}, {end}) loaded {len(loaded)} tensors, "
             f"the assignment needs {len(expected)}"]
    if missing:
        parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
    if extra:
        parts.append(f"{len(extra)} not in the assignment (e.g. {', '.join(extra[:3])})")
    return "; ".join(parts)


@dataclass(frozen=True)
class StageClaim:
    """One stage of a plan and the fingerprint its node gossips (None: none yet)."""

    node_id: str
    name: str
    start: int
    end: int
    fingerprint: str | None


def check_fingerprints(stages: Sequence[StageClaim], expected: Callable[[int, int], str],
                       self_id: str) -> list[str]:
    """Problems with other nodes' gossiped fingerprints, checked against this node's files.

    ``expected(start, end)`` is the fingerprint this node's own manifest gives for a range.
    The local node's own claim is checked when it loads (:func:`check_loaded`), not here.
    """
    problems = []
    for s in stages:
        if s.node_id == self_id:
            continue
        who = f"node {s.name} (layers {s.start}-{s.end - 1})"
        got = parse_fingerprint(s.fingerprint)
        if got is None:
            problems.append(f"{who} reports no weights fingerprint")
            continue
        start, end, _ = got
        if (start, end) != (s.start, s.end):
            problems.append(f"{who} loaded layers {start}-{end - 1} instead")
            continue
        want = expected(s.start, s.end)
        if s.fingerprint != want:
            problems.append(f"{who} loaded weights with fingerprint {got[2][:12]}, but this node's "
                            f"files give {want.partition(':')[2][:12]} for those layers")
    return problems


def fingerprint_problem(problems: Sequence[str]) -> str:
    """One reason line for the status and the logs."""
    return ("the ring's weights do not match: " + "; ".join(problems)
            + " (the model files differ between nodes: re-copy or re-import the model on the "
              "node(s) named, then restart them)")


def refusal_text(reason: str) -> str:
    """``reason`` as a node gossips it: one printable line of at most MAX_REFUSAL characters."""
    line = "".join(c if c.isprintable() else " " for c in reason).strip() or "refused"
    return line if len(line) <= MAX_REFUSAL else line[:MAX_REFUSAL - 3] + "..."


def not_ready_reason(own: str, refusals: Sequence[tuple[str, str]]) -> str:
    """Why the ring does not serve: the refusals other nodes gossip first, then our own reason."""
    if not refusals:
        return own
    refused = "; ".join(f"node {name} refuses to serve: {r}" for name, r in refusals)
    return f"{refused} (here: {own})"


def name_nodes(text: str, names: Mapping[str, str]) -> str:
    """``text`` with every known node id replaced by ``name (id)``."""
    for node_id, name in names.items():
        if name and name != node_id and node_id in text:
            text = text.replace(node_id, f"{name} ({node_id[:8]})")
    return text


# ----------------------------------------------------------------------------- ceilings
@dataclass(frozen=True)
class StageLoad:
    """What one stage reads per token and how fast it can: for the ceiling."""

    node_id: str
    name: str
    shard_bytes: int
    bandwidth: float | None  # bytes/s; None when the node did not report it


def ring_ceiling(stages: Sequence[StageLoad], hop_s: float,
                 concurrency: Sequence[int] = (1, 3, 8)) -> dict[str, Any]:
    """The ring's decode ceilings in tokens/s, as a status dict.

    One hop per stage per token when the ring has more than one stage (the last hop brings
    the token back to the first). ``single_stream_tps`` is None when some stage's bandwidth
    is unknown (the ``missing`` list names them).
    """
    missing = [s.name for s in stages if not s.bandwidth]
    base: dict[str, Any] = {"hop_us": round(hop_s * 1e6, 1), "missing_bandwidth": missing,
                            "stages": [{"node_id": s.node_id, "name": s.name,
                                        "shard_bytes": s.shard_bytes, "bandwidth": s.bandwidth}
                                       for s in stages]}
    if missing or not stages:
        return {**base, "single_stream_tps": None, "aggregate_tps": {}}
    shards = [(float(s.shard_bytes), float(s.bandwidth or 0)) for s in stages]
    hops = [hop_s] * len(stages) if len(stages) > 1 else []
    return {**base, "single_stream_tps": decode_ceiling(shards, hops),
            "aggregate_tps": {str(k): aggregate_ceiling(shards, hops, k) for k in concurrency}}


def rate_verdict(measured: float, ceiling: float | None) -> str:
    """``"IMPOSSIBLE"`` when ``measured`` tokens/s beats the ceiling, ``"ok"``, or ``"unknown"``."""
    if ceiling is None:
        return "unknown"
    return "IMPOSSIBLE" if is_impossible(measured, ceiling) else "ok"


IMPOSSIBLE_HINT = ("a rate above the ceiling means layers were not run (a shard skipped or "
                   "identity layers): run `ringctl verify`")
