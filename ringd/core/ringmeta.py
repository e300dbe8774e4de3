"""The ring's metadata schema: what each node tells the ring about itself, and the view.

SWIM (:mod:`ringd.core.membership`) gossips every member's metadata as opaque bytes, as
memberlist does; this module gives those bytes their meaning for the ring, next to the
agreement that reads them. Pure: no I/O, no clock.

- :class:`NodeMeta` is one node's metadata with named fields; :meth:`NodeMeta.encode` and
  :meth:`NodeMeta.decode` turn it into and out of the bytes membership carries.
- :func:`make_view` builds the ring's :class:`View` from the live members and their
  metadata: what the plan depends on, with a hash every node compares.
- :func:`active_model` is the ring-wide active model setting (last writer wins by
  ``(model_version, node_id)``); :func:`adopt_active_model` and :func:`set_active_model`
  change a node's own metadata by it.
- :class:`MetaDecoder` is how the ring reads the members: each member's bytes decoded once
  per change; a member whose metadata does not decode has none (it takes no part in the
  view), with one warning, never a crash.

Encoding: a msgpack map from the short keys of :data:`_SCHEMA` to values. Keys a node does
not know are ignored (their values may be any msgpack with string map keys) and missing
keys take the field's default, so fields can be added without breaking older peers; a
field at its default is left out. Keys are short because every probe carries its sender's
record: a serving node's metadata takes ~300 bytes. Every value is type-checked and
bounded both ways, by a rule of the core's one field kit (:class:`ringd.core.wire.Rule`): a
bad local value raises :class:`LocalProtocolError` on encode, a bad peer value
:class:`RemoteProtocolError` on decode.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack

from ringd.core.plan import canonical_hash
from ringd.core.paths import ADVERTISED_RULE, Advertised
from ringd.core.swim_wire import Addr, Member
from ringd.core.timing import WIRE_RULE as TIMINGS_RULE
from ringd.core.timing import StageTimings
from ringd.core.wire import U63, Rule, exactly, integer, list_of, optional, text
from ringd.errors import LocalProtocolError, RemoteProtocolError

log = logging.getLogger(__name__)

# Bounds of each value (checked on encode and decode).
MAX_HOLDINGS = 4
MAX_RANGES = 4
MAX_MODEL_NAME = 128
MAX_MODEL_ID = 32
MAX_LAYER = 1 << 20
MAX_VERSION = 32
MAX_HASH = 64
MAX_FINGERPRINT = 128
MAX_REFUSAL = 240
#: Longest encoding decoded at all (membership's bound is smaller; this one keeps
#: :meth:`NodeMeta.decode` safe on its own).
MAX_ENCODED = 64 * 1024
#: At most this many keys, known or not.
MAX_KEYS = 64


class NodePhase(Enum):
    JOINING = "joining"
    FETCHING = "fetching"  # getting its model's files or its layers' tensors from peers
    LOADING = "loading"
    READY = "ready"
    SERVING = "serving"
    LEAVING = "leaving"


@dataclass(frozen=True)
class Holding:
    """A model in a node's store: its name there, its model id (the hash of its manifest),
    the layer ranges complete on that disk (what the node can serve and load), and the size
    of its canonical manifest (the first thing a node without the model fetches)."""

    name: str
    model_id: str
    ranges: tuple[tuple[int, int], ...] = ()
    manifest_size: int = 0

    def dump(self) -> list[Any]:
        return [self.name, self.model_id, [list(r) for r in self.ranges], self.manifest_size]

    @classmethod
    def load(cls, v: list[Any]) -> "Holding":
        return cls(v[0], v[1], tuple((a, b) for a, b in v[2]), v[3])


def _is_holding(v: Any) -> bool:
    return (type(v) is list and len(v) == 4 and _holding_name.test(v[0])
            and _model_id.test(v[1]) and type(v[2]) is list and len(v[2]) <= MAX_RANGES
            and all(type(r) is list and len(r) == 2 and _layer.test(r[0])
                    and _layer.test(r[1]) and r[0] < r[1] for r in v[2])
            and _u63_rule.test(v[3]))


@dataclass(frozen=True)
class NodeMeta:
    """What a node tells the ring about itself (gossiped as its membership metadata)."""

    usable_memory: int = 0
    total_memory: int = 0
    #: The models in its store (what it can serve to peers).
    holdings: tuple[Holding, ...] = ()
    phase: NodePhase = NodePhase.JOINING
    #: While fetching: bytes fetched and checked, of how many.
    fetch: tuple[int, int] | None = None
    software_version: str = ""
    #: Port of the node's local HTTP API (for status), 0 if none.
    http_port: int = 0
    #: Hash of the view this node currently sees.
    view_hash: str | None = None
    #: Epoch this node proposes for its view; the committed plan's epoch once committed.
    epoch: int = 0
    #: Plan this node committed to, and the plan whose layers it has finished loading.
    plan_hash: str | None = None
    ready_plan_hash: str | None = None
    #: Digest of the weights this node actually loaded (issue 6).
    fingerprint: str | None = None
    #: Ring-wide active model setting: last writer wins by (model_version, node_id).
    model: str = ""
    model_version: int = 0
    #: Memory bandwidth in bytes/s, for the decode ceiling (issue 6); 0 when unknown.
    memory_bandwidth: int = 0
    #: Why this node refuses to serve its committed plan (e.g. weights that differ), if it does.
    refusal: str | None = None
    #: Requests run with this node as their entry (a joining node waits while any does).
    busy: bool = False
    #: A node that joined a busy ring and waits (``replan_drain`` at most) before the ring
    #: re-plans with it: it takes no part in the view meanwhile.
    standby: bool = False
    #: Its runner's rolling step timings and the round trip to the next stage (issue 16).
    timings: StageTimings | None = None
    #: Its addresses, each with the interface it is on and that interface's kind: the paths
    #: peers measure and choose from for the data plane.
    addresses: tuple[Advertised, ...] = ()

    def encode(self) -> bytes:
        """The bytes to hand to ``Membership.update_meta``. A bad value raises
        LocalProtocolError (our misuse)."""
        out: dict[str, Any] = {}
        for f in _SCHEMA:
            value = getattr(self, f.name)
            if value == _DEFAULTS[f.name]:
                continue
            wire = f.dump(value)
            if not f.rule.test(wire):
                raise LocalProtocolError(f"NodeMeta.{f.name}: bad value {value!r:.80}")
            out[f.key] = wire
        return msgpack.packb(out, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> NodeMeta:
        """A peer's metadata bytes; anything malformed raises RemoteProtocolError only."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise _bad("expected bytes")
        if len(data) > MAX_ENCODED:
            raise _bad(f"{len(data)} bytes, at most {MAX_ENCODED} allowed")
        try:
            obj = msgpack.unpackb(
                data,
                raw=False,
                use_list=True,
                strict_map_key=True,
                max_map_len=MAX_KEYS,
            )
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise _bad(f"not valid msgpack ({type(e).__name__})") from None
        if type(obj) is not dict:
            raise _bad("expected a map")
        values: dict[str, Any] = {}
        for f in _SCHEMA:
            if f.key not in obj:
                continue
            wire = obj[f.key]
            if not f.rule.test(wire):
                raise _bad(f"{f.key}: bad value {wire!r:.40}, expected {f.rule.expected}")
            values[f.name] = f.load(wire)
        return cls(**values)


def _same(v: Any) -> Any:
    return v


_PHASES = {p.value: p for p in NodePhase}


@dataclass(frozen=True)
class _Field:
    name: str  # NodeMeta attribute
    key: str  # msgpack map key
    rule: Rule  # what the wire value may be
    load: Callable[[Any], Any] = _same  # wire value -> attribute
    dump: Callable[[Any], Any] = _same  # attribute -> wire value


# Each field's rule (the core's one kit, ringd.core.wire) tests the wire value.
_u63 = _u63_rule = integer(0, U63)
_hash = optional(text(MAX_HASH, min_len=1, printable=True))
_holding_name = text(MAX_MODEL_NAME, min_len=1, printable=True)
_model_id = text(MAX_MODEL_ID, min_len=1, printable=True)
_layer = integer(0, MAX_LAYER)

#: The schema: one row per NodeMeta field. Never reuse a key for another meaning.
_SCHEMA = (
    _Field("usable_memory", "mem", _u63),
    _Field("total_memory", "total", _u63),
    # "models" (a list of names) was retired with protocol 2: never reuse the key.
    _Field(
        "holdings",
        "hold",
        list_of(Rule(_is_holding, "[name, model id, [[start, end], ...], manifest size]"),
                MAX_HOLDINGS),
        load=lambda v: tuple(Holding.load(h) for h in v),
        dump=lambda v: [h.dump() for h in v] if type(v) is tuple else v,
    ),
    _Field(
        "fetch",
        "fetch",
        optional(Rule(lambda v: type(v) is list and len(v) == 2 and all(map(_u63.test, v)),
                      "[done, total]")),
        load=lambda v: None if v is None else (v[0], v[1]),
        dump=lambda v: list(v) if type(v) is tuple else v,
    ),
    _Field(
        "phase",
        "phase",
        Rule(lambda v: type(v) is str and v in _PHASES, f"one of {', '.join(_PHASES)}"),
        load=_PHASES.__getitem__,
        dump=lambda v: v.value if isinstance(v, NodePhase) else v,
    ),
    _Field("software_version", "sw", text(MAX_VERSION, printable=True)),
    _Field("http_port", "http", integer(0, 65535)),
    _Field("view_hash", "view", _hash),
    _Field("epoch", "epoch", _u63),
    _Field("plan_hash", "plan", _hash),
    _Field("ready_plan_hash", "ready", _hash),
    _Field("fingerprint", "fp", optional(text(MAX_FINGERPRINT, min_len=1, printable=True))),
    _Field("model", "model", text(MAX_MODEL_NAME, printable=True)),
    _Field("model_version", "model_v", _u63),
    _Field("memory_bandwidth", "bw", _u63),
    _Field("refusal", "refusal", optional(text(MAX_REFUSAL, min_len=1, printable=True))),
    _Field("busy", "busy", exactly(bool)),
    _Field("standby", "sb", exactly(bool)),
    _Field("timings", "tm", optional(TIMINGS_RULE),
           load=lambda v: None if v is None else StageTimings.load(v),
           dump=lambda v: v.dump() if isinstance(v, StageTimings) else v),
    _Field("addresses", "addrs", ADVERTISED_RULE,
           load=lambda v: tuple(Advertised.load(a) for a in v),
           dump=lambda v: [a.dump() if isinstance(a, Advertised) else a for a in v]
           if type(v) is tuple else v),
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(NodeMeta)}
assert {f.name for f in _SCHEMA} == set(_DEFAULTS), "every NodeMeta field needs a schema row"


def _bad(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"ring metadata: {what}")


# ------------------------------------------------------------------------ reading members
class MetaDecoder:
    """Reads the members' metadata for the ring: each member's bytes are decoded once per
    change. A member whose metadata does not decode has no usable metadata: it is left out
    of what :meth:`decode` returns (so out of the view), with one warning per bad value."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[bytes, NodeMeta | None]] = {}
        #: Distinct unreadable metadata values seen.
        self.rejected = 0

    def decode(self, members: Iterable[Member]) -> dict[str, NodeMeta]:
        """The readable metadata of ``members``, by node id."""
        seen: dict[str, tuple[bytes, NodeMeta | None]] = {}
        out: dict[str, NodeMeta] = {}
        for m in members:
            prev = self._seen.get(m.node_id)
            if prev is not None and prev[0] == m.meta:
                meta = prev[1]
            else:
                try:
                    meta = NodeMeta.decode(m.meta)
                except RemoteProtocolError as e:
                    meta = None
                    self.rejected += 1
                    log.warning(
                        "node %s (%s) gossips metadata this node cannot read, so it takes no "
                        "part in the ring: %s",
                        m.name or m.node_id[:8],
                        m.node_id,
                        e.message,
                    )
            seen[m.node_id] = (m.meta, meta)
            if meta is not None:
                out[m.node_id] = meta
        self._seen = seen
        return out

    @property
    def unreadable(self) -> list[str]:
        """Node ids whose current metadata does not decode."""
        return sorted(i for i, (_, meta) in self._seen.items() if meta is None)


# ------------------------------------------------------------------------- active model
def active_model(metas: Mapping[str, NodeMeta]) -> tuple[str, int]:
    """The ring-wide active model setting ``(model, model_version)`` among ``metas`` (by
    node id): the last writer wins, by ``(model_version, node_id)``. ``("", 0)`` if none."""
    if not metas:
        return "", 0
    winner = max(metas, key=lambda i: (metas[i].model_version, i))
    return metas[winner].model, metas[winner].model_version


def adopt_active_model(node_id: str, own: NodeMeta, metas: Mapping[str, NodeMeta]) -> NodeMeta:
    """``own`` carrying the ring-wide setting among ``metas`` and itself (so the setting
    survives the node that made it)."""
    model, version = active_model({**metas, node_id: own})
    if (model, version) == (own.model, own.model_version):
        return own
    return dataclasses.replace(own, model=model, model_version=version)


def set_active_model(own: NodeMeta, metas: Mapping[str, NodeMeta], model: str) -> NodeMeta:
    """``own`` making ``model`` the ring-wide active model: a newer version than any in
    ``metas`` (pass every known member's, dead ones included) or its own."""
    version = max([own.model_version, *(m.model_version for m in metas.values())]) + 1
    return dataclasses.replace(own, model=model, model_version=version)


# --------------------------------------------------------------------------------- view
@dataclass(frozen=True)
class ViewMember:
    node_id: str
    name: str
    addr: Addr
    usable_memory: int


@dataclass(frozen=True)
class View:
    """The live members with usable metadata sorted by node id, and the ring-wide active
    model: its name and the model id its holders agree on (``""`` when none does, with
    ``model_problem`` saying why). ``hash`` covers what the plan depends on: node ids,
    addresses, usable memory, the model name and its id."""

    members: tuple[ViewMember, ...]
    model: str
    hash: str
    model_id: str = ""
    model_problem: str | None = None

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(m.node_id for m in self.members)

    def short(self) -> str:
        return self.hash[:8]


def make_view(members: Iterable[Member], metas: Mapping[str, NodeMeta]) -> View:
    """The view of ``members`` (``Membership.live_members()``) given their metadata by node
    id (e.g. from :class:`MetaDecoder`). A member without metadata is left out (the ring
    cannot plan with a node whose memory it does not know), and so is one on standby (it
    joined while requests ran, and waits for them)."""
    known = [m for m in members if m.node_id in metas and not metas[m.node_id].standby]
    model, _ = active_model({m.node_id: metas[m.node_id] for m in known})
    vm = tuple(
        sorted(
            (ViewMember(m.node_id, m.name, m.addr, metas[m.node_id].usable_memory) for m in known),
            key=lambda v: v.node_id,
        )
    )
    model_id, problem = resolve_model(model, {m.node_id: metas[m.node_id] for m in known},
                                      {m.node_id: m.name for m in known})
    h = canonical_hash([model, model_id,
                        [[v.node_id, v.addr[0], v.addr[1], v.usable_memory] for v in vm]])
    return View(vm, model, h, model_id, problem)


def resolve_model(name: str, metas: Mapping[str, NodeMeta],
                  names: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """Which bytes the ring serves as model ``name``: ``(model id, None)`` when every member
    holding a model of that name holds the same one; ``("", why)`` when none holds it, or
    when they hold different models under that name (the member ids named)."""
    if not name:
        return "", "no model is set for the ring"
    held: dict[str, list[str]] = {}
    for node_id, meta in sorted(metas.items()):
        for h in meta.holdings:
            if h.name == name:
                held.setdefault(h.model_id, []).append((names or {}).get(node_id) or node_id[:8])
    if len(held) == 1:
        return next(iter(held)), None
    if not held:
        return "", (f"no node holds model {name}: put it on one node "
                    "(`ringctl model pull` or `ringctl model import`)")
    which = "; ".join(f"{mid[:12]} on {', '.join(nodes)}" for mid, nodes in sorted(held.items()))
    return "", (f"nodes hold different models named {name} ({which}): remove the wrong one "
                "with `ringctl model rm`")
