"""The status contract: what a node says about itself and its ring.

The daemon builds a :class:`Status` (:func:`ring_status`; a single-process node builds one
directly), the HTTP API serves :meth:`Status.to_json` at ``GET /ringd/status``, and
``ringctl status`` renders :meth:`Status.from_json` of it. Pure: no asyncio, sockets or MLX.

``agreement``, ``timeline`` and ``stats`` are diagnostics: free-form JSON objects of the
components' own snapshots (``ringctl status --json`` shows them all).

A member that is dead or has left has no known phase (``phase`` is None): its last gossiped
phase (often "serving") says nothing about it any more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from ringd.core.plan import Plan
from ringd.core.proof import StageLoad, rate_verdict, ring_ceiling
from ringd.core.ringmeta import NodeMeta, NodePhase
from ringd.core.swim_wire import Member, MemberState
from ringd.core.timing import StageTimings
from ringd.errors import RingdError

Json = dict[str, Any]
E = TypeVar("E", bound=Enum)

STATUS_HINT = "ringctl and ringd may be of different versions: install the same version of both"


class MalformedStatus(RingdError):
    """A status (JSON) that does not follow the contract."""


@dataclass(frozen=True)
class NodeStatus:
    """The node that answers."""

    id: str
    name: str = ""
    addr: str | None = None  # host:port of its peer port; None for a single-process node
    http_port: int | None = None
    phase: NodePhase | None = None


@dataclass(frozen=True)
class ModelStatus:
    name: str
    num_layers: int  # 0 while this node does not know the model yet (fetching its manifest)
    total_bytes: int | None = None
    #: The hash of its manifest: which bytes the ring serves.
    model_id: str | None = None


@dataclass(frozen=True)
class AssignmentStatus:
    """``node_id`` holds layers ``[start, end)``, needing ``bytes``."""

    node_id: str
    start: int
    end: int
    bytes: int | None = None


@dataclass(frozen=True)
class ExclusionStatus:
    node_id: str
    reason: str = ""


@dataclass(frozen=True)
class PlanStatus:
    epoch: int
    hash: str | None = None
    assignments: tuple[AssignmentStatus, ...] = ()
    excluded: tuple[ExclusionStatus, ...] = ()


@dataclass(frozen=True)
class PathOptionStatus:
    """One path to a peer as this node measured it: the peer's address, the local interface
    that reaches it and its kind, smoothed round trip (ms), throughput (bytes/s), up."""

    address: str
    interface: str = "?"
    kind: str = "other"
    rtt_ms: float | None = None
    throughput: float | None = None
    up: bool = False


@dataclass(frozen=True)
class PathStatus:
    """The path this node's bulk traffic (and, once the UDP endpoint allows it, its data
    plane) takes to a peer, why, and every path it measured."""

    address: str
    interface: str = "?"
    kind: str = "other"
    rtt_ms: float | None = None
    throughput: float | None = None
    pinned: bool = False
    reason: str = ""
    options: tuple[PathOptionStatus, ...] = ()

    @classmethod
    def read(cls, d: Any, *, where: str = "path") -> "PathStatus | None":
        """From the link prober's dict or the status JSON (:class:`MalformedStatus`-style
        errors name ``where``); None for None."""
        if d is None:
            return None
        o = _Obj(d, where)
        return cls(address=o.get("address", "str"), interface=o.get("interface", "str", "?"),
                   kind=o.get("kind", "str", "other"), rtt_ms=o.get("rtt_ms", "num", None),
                   throughput=o.get("throughput", "num", None),
                   pinned=o.get("pinned", "bool", False), reason=o.get("reason", "str", ""),
                   options=tuple(PathOptionStatus(
                       x.get("address", "str"), x.get("interface", "str", "?"),
                       x.get("kind", "str", "other"), x.get("rtt_ms", "num", None),
                       x.get("throughput", "num", None), x.get("up", "bool", False))
                       for x in o.items("options")))

    def as_json(self) -> Json:
        return {"address": self.address, "interface": self.interface, "kind": self.kind,
                "rtt_ms": self.rtt_ms, "throughput": self.throughput, "pinned": self.pinned,
                "reason": self.reason,
                "options": [{"address": x.address, "interface": x.interface, "kind": x.kind,
                             "rtt_ms": x.rtt_ms, "throughput": x.throughput, "up": x.up}
                            for x in self.options]}


@dataclass(frozen=True)
class MemberStatus:
    id: str
    state: MemberState
    name: str = ""
    addr: str | None = None
    #: None: unknown (always so for another node that is dead or has left).
    phase: NodePhase | None = None
    usable_memory: int | None = None
    total_memory: int | None = None
    #: ``(start, end)`` of the layers the committed plan gives it; None: none.
    layers: tuple[int, int] | None = None
    rtt_ms: float | None = None
    software_version: str | None = None
    http_port: int | None = None
    #: The member is the node that answers (JSON key ``self``).
    is_self: bool = False
    fingerprint: str | None = None
    refusal: str | None = None
    memory_bandwidth: int | None = None
    #: While it fetches weights from peers: (bytes fetched and checked, bytes to fetch).
    fetch: tuple[int, int] | None = None
    #: The channel this node's small frames to it take: "udp", or "tcp" after UDP timeouts.
    channel: str | None = None
    #: Its rolling step timings, as it gossips them (None: none yet, or it is gone).
    timings: StageTimings | None = None
    #: The path this node chose to it, from its link measurements (None: not measured).
    path: PathStatus | None = None


@dataclass(frozen=True)
class CeilingStage:
    node_id: str
    name: str
    shard_bytes: int
    bandwidth: float | None = None  # bytes/s; None when the node did not report it


@dataclass(frozen=True)
class Ceiling:
    """Decode ceilings of the committed plan (tokens/s) and the last measured rate."""

    hop_us: float = 0.0
    stages: tuple[CeilingStage, ...] = ()
    missing_bandwidth: tuple[str, ...] = ()
    single_stream_tps: float | None = None
    #: Streams -> total tokens/s.
    aggregate_tps: Mapping[int, float] = field(default_factory=dict)
    measured_tps: float | None = None
    #: ``rate_verdict`` of the measured rate: "ok", "IMPOSSIBLE" or "unknown".
    verdict: str | None = None


@dataclass(frozen=True)
class Status:
    node: NodeStatus
    ready: bool
    #: Why the node does not serve (None when ready).
    reason: str | None = None
    model: ModelStatus | None = None
    plan: PlanStatus | None = None
    members: tuple[MemberStatus, ...] = ()
    #: The ring's weight fingerprint while it serves.
    fingerprint: str | None = None
    ceiling: Ceiling | None = None
    agreement: Json | None = None
    timeline: Mapping[str, float] = field(default_factory=dict)
    stats: Json = field(default_factory=dict)

    def to_json(self) -> Json:
        """The JSON object ``GET /ringd/status`` serves."""
        return {
            "node": {"id": self.node.id, "name": self.node.name, "addr": self.node.addr,
                     "http_port": self.node.http_port, "phase": _value(self.node.phase)},
            "ready": self.ready,
            "reason": self.reason,
            "model": None if self.model is None else {
                "name": self.model.name, "num_layers": self.model.num_layers,
                "total_bytes": self.model.total_bytes, "model_id": self.model.model_id},
            "plan": None if self.plan is None else {
                "epoch": self.plan.epoch, "hash": self.plan.hash,
                "assignments": [{"node_id": a.node_id, "start": a.start, "end": a.end,
                                 "bytes": a.bytes} for a in self.plan.assignments],
                "excluded": [{"node_id": e.node_id, "reason": e.reason}
                             for e in self.plan.excluded]},
            "members": [_member_json(m) for m in self.members],
            "fingerprint": self.fingerprint,
            "ceiling": None if self.ceiling is None else _ceiling_json(self.ceiling),
            "agreement": self.agreement,
            "timeline": dict(self.timeline),
            "stats": self.stats,
        }

    @classmethod
    def from_json(cls, obj: Any, *, source: str = "the daemon") -> "Status":
        """Read a status; missing optional fields take their defaults.

        :class:`MalformedStatus` (naming ``source`` and the field) when it breaks the contract.
        """
        try:
            return _status(_Obj(obj, "status"))
        except _Bad as e:
            raise MalformedStatus(f"{source} sent a malformed status: {e}",
                                  hint=STATUS_HINT) from None


def _value(e: Enum | None) -> Any:
    return None if e is None else e.value


def _member_json(m: MemberStatus) -> Json:
    return {"id": m.id, "name": m.name, "addr": m.addr, "state": m.state.value,
            "phase": _value(m.phase), "usable_memory": m.usable_memory,
            "total_memory": m.total_memory,
            "layers": None if m.layers is None else list(m.layers), "rtt_ms": m.rtt_ms,
            "software_version": m.software_version, "http_port": m.http_port, "self": m.is_self,
            "fingerprint": m.fingerprint, "refusal": m.refusal,
            "memory_bandwidth": m.memory_bandwidth,
            "fetch": None if m.fetch is None else list(m.fetch), "channel": m.channel,
            "timings": None if m.timings is None else m.timings.as_json(),
            "path": None if m.path is None else m.path.as_json()}


def _ceiling_json(c: Ceiling) -> Json:
    return {"hop_us": c.hop_us, "missing_bandwidth": list(c.missing_bandwidth),
            "stages": [{"node_id": s.node_id, "name": s.name, "shard_bytes": s.shard_bytes,
                        "bandwidth": s.bandwidth} for s in c.stages],
            "single_stream_tps": c.single_stream_tps,
            "aggregate_tps": {str(k): v for k, v in c.aggregate_tps.items()},
            "measured_tps": c.measured_tps, "verdict": c.verdict}


# ------------------------------------------------------------------------ reading JSON
class _Bad(Exception):
    """A field breaks the contract; the message names it."""


_REQUIRED: Any = object()
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "num": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "obj": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "an array"),
}


class _Obj:
    """A JSON object being read, with its path for error messages."""

    def __init__(self, obj: Any, path: str) -> None:
        if not isinstance(obj, dict):
            raise _Bad(f"{path} must be an object, got {_type_name(obj)}")
        self.obj, self.path = obj, path

    def get(self, key: str, kind: str, default: Any = _REQUIRED) -> Any:
        """Field ``key`` of ``kind``; absent or null: ``default`` (an error if required)."""
        v = self.obj.get(key)
        if v is None:
            if default is _REQUIRED:
                raise _Bad(f"{self.path}.{key} is missing")
            return default
        ok, want = _KINDS[kind]
        if not ok(v):
            raise _Bad(f"{self.path}.{key} must be {want}, got {_type_name(v)}")
        return float(v) if kind == "num" else v

    def sub(self, key: str) -> "_Obj | None":
        v = self.obj.get(key)
        return None if v is None else _Obj(v, f"{self.path}.{key}")

    def items(self, key: str) -> list["_Obj"]:
        return [_Obj(v, f"{self.path}.{key}[{i}]")
                for i, v in enumerate(self.get(key, "list", []))]

    def enum(self, key: str, kind: type[E], default: Any = _REQUIRED) -> E | None:
        v = self.get(key, "str", default)
        if v is default:
            return v
        try:
            return kind(v)
        except ValueError:
            raise _Bad(f"{self.path}.{key} must be one of "
                       f"{', '.join(e.value for e in kind)}, got {v!r}") from None


def _type_name(v: Any) -> str:
    return "null" if v is None else "a boolean" if isinstance(v, bool) else type(v).__name__


def _status(o: _Obj) -> Status:
    node = o.sub("node")
    if node is None:
        raise _Bad("status.node is missing")
    model, plan, ceiling = o.sub("model"), o.sub("plan"), o.sub("ceiling")
    agreement = o.get("agreement", "obj", None)
    return Status(
        node=NodeStatus(id=node.get("id", "str"), name=node.get("name", "str", ""),
                        addr=node.get("addr", "str", None),
                        http_port=node.get("http_port", "int", None),
                        phase=node.enum("phase", NodePhase, None)),
        ready=o.get("ready", "bool"),
        reason=o.get("reason", "str", None),
        model=None if model is None else ModelStatus(
            name=model.get("name", "str"), num_layers=model.get("num_layers", "int"),
            total_bytes=model.get("total_bytes", "int", None),
            model_id=model.get("model_id", "str", None)),
        plan=None if plan is None else _plan(plan),
        members=tuple(_member(m) for m in o.items("members")),
        fingerprint=o.get("fingerprint", "str", None),
        ceiling=None if ceiling is None else _ceiling(ceiling),
        agreement=agreement,
        timeline={k: float(v) for k, v in o.get("timeline", "obj", {}).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)},
        stats=o.get("stats", "obj", {}),
    )


def _plan(p: _Obj) -> PlanStatus:
    return PlanStatus(
        epoch=p.get("epoch", "int"), hash=p.get("hash", "str", None),
        assignments=tuple(AssignmentStatus(a.get("node_id", "str"), a.get("start", "int"),
                                           a.get("end", "int"), a.get("bytes", "int", None))
                          for a in p.items("assignments")),
        excluded=tuple(ExclusionStatus(e.get("node_id", "str"), e.get("reason", "str", ""))
                       for e in p.items("excluded")))


def _member(m: _Obj) -> MemberStatus:
    return MemberStatus(
        id=m.get("id", "str"), state=m.enum("state", MemberState),  # type: ignore[arg-type]
        name=m.get("name", "str", ""), addr=m.get("addr", "str", None),
        phase=m.enum("phase", NodePhase, None),
        usable_memory=m.get("usable_memory", "int", None),
        total_memory=m.get("total_memory", "int", None), layers=_layers(m),
        rtt_ms=m.get("rtt_ms", "num", None),
        software_version=m.get("software_version", "str", None),
        http_port=m.get("http_port", "int", None), is_self=m.get("self", "bool", False),
        fingerprint=m.get("fingerprint", "str", None), refusal=m.get("refusal", "str", None),
        memory_bandwidth=m.get("memory_bandwidth", "int", None), fetch=_fetch(m),
        channel=m.get("channel", "str", None),
        timings=StageTimings.read(m.get("timings", "obj", None)),
        path=PathStatus.read(m.get("path", "obj", None), where=f"{m.path}.path"))


def _fetch(m: _Obj) -> tuple[int, int] | None:
    v = m.get("fetch", "list", None)
    if v is None:
        return None
    if not (len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                for x in v)):
        raise _Bad(f"{m.path}.fetch must be [done, total] byte counts, got {v!r}")
    return v[0], v[1]


def _layers(m: _Obj) -> tuple[int, int] | None:
    v = m.get("layers", "list", None)
    if v is None:
        return None
    if not (len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            and 0 <= v[0] < v[1]):
        raise _Bad(f"{m.path}.layers must be [start, end) with 0 <= start < end, got {v!r}")
    return v[0], v[1]


def _ceiling(c: _Obj) -> Ceiling:
    aggregate: dict[int, float] = {}
    for k, v in c.get("aggregate_tps", "obj", {}).items():
        if not (k.isdigit() and isinstance(v, (int, float)) and not isinstance(v, bool)):
            raise _Bad(f"{c.path}.aggregate_tps must map stream counts to numbers, "
                       f"got {k!r}: {v!r}")
        aggregate[int(k)] = float(v)
    missing = c.get("missing_bandwidth", "list", [])
    if not all(isinstance(x, str) for x in missing):
        raise _Bad(f"{c.path}.missing_bandwidth must be an array of names")
    return Ceiling(
        hop_us=c.get("hop_us", "num", 0.0),
        stages=tuple(CeilingStage(s.get("node_id", "str"), s.get("name", "str", ""),
                                  s.get("shard_bytes", "int"), s.get("bandwidth", "num", None))
                     for s in c.items("stages")),
        missing_bandwidth=tuple(missing),
        single_stream_tps=c.get("single_stream_tps", "num", None),
        aggregate_tps=aggregate,
        measured_tps=c.get("measured_tps", "num", None),
        verdict=c.get("verdict", "str", None))


# --------------------------------------------------------------------- building it
def member_status(m: Member, meta: NodeMeta | None, *, layers: tuple[int, int] | None,
                  rtt_s: float | None, is_self: bool) -> MemberStatus:
    """A member as membership knows it, with its metadata as this node reads it (None:
    unreadable); the phase of another node that is dead or has left is unknown (its last
    word is stale)."""
    rtt_ms = round(rtt_s * 1000, 3) if rtt_s is not None else None
    base = MemberStatus(id=m.node_id, state=m.state, name=m.name,
                        addr=f"{m.addr[0]}:{m.addr[1]}", layers=layers, rtt_ms=rtt_ms,
                        is_self=is_self)
    if meta is None:
        return base
    known = is_self or m.state not in (MemberState.DEAD, MemberState.LEFT)
    return dataclasses.replace(
        base, phase=meta.phase if known else None, usable_memory=meta.usable_memory,
        total_memory=meta.total_memory, software_version=meta.software_version,
        http_port=meta.http_port, fingerprint=meta.fingerprint, refusal=meta.refusal,
        memory_bandwidth=meta.memory_bandwidth or None, fetch=meta.fetch if known else None,
        timings=meta.timings if known else None)


def plan_status(plan: Plan) -> PlanStatus:
    return PlanStatus(
        epoch=plan.epoch, hash=plan.hash,
        assignments=tuple(AssignmentStatus(a.node_id, a.start, a.end, a.bytes_needed)
                          for a in plan.order),
        excluded=tuple(ExclusionStatus(e.node_id, e.reason) for e in plan.excluded))


def ceiling_status(plan: Plan, members: Mapping[str, Member], metas: Mapping[str, NodeMeta],
                   shard_bytes: Callable[[int, int], int], hop_s: float,
                   measured_tps: float | None) -> Ceiling:
    """Decode ceilings of ``plan``, and the last measured rate judged against them."""
    stages = []
    for a in plan.order:
        m, meta = members.get(a.node_id), metas.get(a.node_id)
        bandwidth = float(meta.memory_bandwidth) if meta and meta.memory_bandwidth else None
        stages.append(StageLoad(a.node_id, m.name if m else a.node_id[:8],
                                shard_bytes(a.start, a.end), bandwidth))
    c = ring_ceiling(stages, hop_s)
    return Ceiling(
        hop_us=c["hop_us"],
        stages=tuple(CeilingStage(s.node_id, s.name, s.shard_bytes, s.bandwidth)
                     for s in stages),
        missing_bandwidth=tuple(c["missing_bandwidth"]),
        single_stream_tps=c["single_stream_tps"],
        aggregate_tps={int(k): v for k, v in c["aggregate_tps"].items()},
        measured_tps=measured_tps,
        verdict=(rate_verdict(measured_tps, c["single_stream_tps"])
                 if measured_tps is not None else None))


def ring_status(*, node_id: str, node_name: str, addr: tuple[str, int], http_port: int,
                members: Iterable[Member], metas: Mapping[str, NodeMeta], plan: Plan | None,
                rtt: Callable[[str], float | None], model: ModelStatus,
                channel: Callable[[Member], str | None] = lambda m: None,
                path: Callable[[str], Any] = lambda node_id: None,
                shard_bytes: Callable[[int, int], int], serving: bool, reason: str | None,
                fingerprint: str | None, measured_tps: float | None,
                agreement: Json | None = None, timeline: Mapping[str, float] | None = None,
                stats: Json | None = None) -> Status:
    """A ring node's status from membership (``metas``: the members' metadata as this node
    reads it, its own included), the committed plan and the runner's facts.

    ``rtt(node_id)`` is the measured round trip in seconds (None: not measured); the
    ceiling's hop is half the shortest one. ``path(node_id)``: the link prober's chosen path
    to a peer (:meth:`ringd.net.links.LinkProber.path_status`), None if not measured.
    """
    by_id = {m.node_id: m for m in members}
    local = metas.get(node_id)
    rows = []
    for m in sorted(by_id.values(), key=lambda m: m.node_id):
        a = plan.assignment(m.node_id) if plan else None
        row = member_status(m, metas.get(m.node_id),
                            layers=(a.start, a.end) if a else None,
                            rtt_s=rtt(m.node_id) if m.node_id != node_id else None,
                            is_self=m.node_id == node_id)
        if m.node_id != node_id:
            row = dataclasses.replace(row, channel=channel(m),
                                      path=PathStatus.read(path(m.node_id)))
        rows.append(row)
    rtts = [r for i in by_id if i != node_id and (r := rtt(i)) is not None]
    return Status(
        node=NodeStatus(id=node_id, name=node_name, addr=f"{addr[0]}:{addr[1]}",
                        http_port=http_port, phase=local.phase if local else None),
        ready=serving,
        reason=None if serving else reason,
        model=model,
        plan=plan_status(plan) if plan else None,
        members=tuple(rows),
        fingerprint=fingerprint if serving else None,
        ceiling=(ceiling_status(plan, by_id, metas, shard_bytes,
                                min(rtts) / 2 if rtts else 0.0, measured_tps)
                 if plan else None),
        agreement=agreement,
        timeline={k: round(v, 3) for k, v in (timeline or {}).items()},
        stats=stats or {},
    )
