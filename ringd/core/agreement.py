"""Leaderless plan agreement, as a sans-I/O state machine.

Every node computes the plan itself from the view and the model's shape
(:func:`ringd.core.plan.make_plan`); agreement only decides *when* to commit and *which
epoch* the plan carries. Each node publishes, in its gossiped metadata
(:meth:`Agreement.published` -> its :class:`ringd.core.ringmeta.NodeMeta`, encoded into
``Membership.update_meta``), the view hash it sees, the epoch it proposes for that view,
the plan it committed to and the plan whose layers it has loaded.

Rules:

1. When the local view changes, the committed plan (if any) is dropped first
   (:class:`StopServing` if the ring was serving, then :class:`PlanDropped`), and the node
   proposes ``epoch = 1 + the highest epoch it has ever seen`` (its own persisted last
   epoch included) for the new view.
2. For one view, the round's epoch is the highest epoch any member proposes for that
   view hash: a node adopts a higher proposal, dropping a plan committed at a lower one.
   Proposals only grow, so all members converge on one epoch; every commit on a node has
   an epoch strictly greater than the one before.
3. A node commits when every member of its view reports the same view hash and epoch, and
   the view has been stable for ``settle_time`` (so a burst of joins loads once). It then
   emits :class:`LoadShard` with its range (None when the plan excludes it).
4. The daemon calls :meth:`Agreement.loaded` when its range is loaded; the node then
   publishes ``ready_plan_hash``. The ring is serving when every view member reports the
   plan as committed and every plan member reports it as loaded; :class:`RingReady`.
   A node serves at most its one committed plan; a plan it dropped never comes back.

Without a quorum, two sides of a network partition each form their own ring; data frames
carry the epoch, so frames across the heal are refused.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

from ringd.core.plan import Assignment, ModelShape, Plan, make_plan
from ringd.core.ringmeta import NodeMeta, NodePhase, View
from ringd.errors import PlanError

log = logging.getLogger(__name__)


class AgreementState(Enum):
    FORMING = "forming"  # waiting for the view (and epoch) to be agreed, or settling
    UNFIT = "unfit"  # the agreed view cannot hold the model
    LOADING = "loading"  # committed; loading the local range
    FAILED = "failed"  # loading the local range failed; waits for a view change
    WAITING = "waiting"  # local part ready (or holds no layers); waiting for the others
    SERVING = "serving"  # the whole ring is ready on the committed plan


@dataclass(frozen=True)
class AgreementConfig:
    #: A view must be unchanged this long before a node commits a plan for it.
    settle_time: float = 0.5


# ----------------------------------------------------------------------------- events
@dataclass(frozen=True)
class LoadShard:
    """Load ``assignment``'s layer range for ``plan`` (None: this node holds no layers)."""

    plan: Plan
    assignment: Assignment | None


@dataclass(frozen=True)
class StopServing:
    """Stop routing requests on ``plan`` now; fail those in flight with ``reason``."""

    plan: Plan
    reason: str


@dataclass(frozen=True)
class PlanDropped:
    """``plan`` is abandoned for good: cancel its loading, its layers may be freed."""

    plan: Plan
    reason: str


@dataclass(frozen=True)
class RingReady:
    """Every member is ready on ``plan``: requests may run."""

    plan: Plan


@dataclass(frozen=True)
class PlanUnfit:
    """The agreed view cannot hold the model; ``error`` has the numbers and a hint."""

    view_hash: str
    error: PlanError


Event = Union[LoadShard, StopServing, PlanDropped, RingReady, PlanUnfit]

_PHASE = {
    AgreementState.FORMING: NodePhase.JOINING,
    AgreementState.UNFIT: NodePhase.JOINING,
    AgreementState.FAILED: NodePhase.JOINING,
    AgreementState.LOADING: NodePhase.LOADING,
    AgreementState.WAITING: NodePhase.READY,
    AgreementState.SERVING: NodePhase.SERVING,
}


class Agreement:
    """One node's side of the agreement. Feed it with :meth:`update` after every
    membership change, publish :meth:`published` into the node's metadata, drain events."""

    def __init__(
        self, node_id: str, *, config: AgreementConfig = AgreementConfig(), last_epoch: int = 0
    ) -> None:
        self.node_id = node_id
        self.config = config
        self._max_epoch = last_epoch
        self._epoch = last_epoch
        self._view: View | None = None
        self._view_since = 0.0
        self._settled = False
        self._metas: dict[str, NodeMeta] = {}
        self._shape: ModelShape | None = None
        self._missing: str | None = None
        self._state = AgreementState.FORMING
        self._reason = "no view yet"
        self._plan: Plan | None = None
        self._ready_hash: str | None = None
        self._unfit: PlanError | None = None
        self._failure: str | None = None
        self._events: deque[Event] = deque()

    # ---------------------------------------------------------------------- inputs
    def update(
        self, now: float, view: View, metas: Mapping[str, NodeMeta], shape: ModelShape | None,
        missing: str | None = None,
    ) -> None:
        """Feed the current view, the members' metadata (by node id) and the shape of
        ``view.model`` as this node knows it (None if it does not; ``missing`` then says
        why, e.g. its manifest is being fetched)."""
        self._metas = {i: metas[i] for i in view.node_ids if i != self.node_id and i in metas}
        self._see_epochs(meta.epoch for meta in metas.values())
        self._shape = shape
        self._missing = missing
        if self._view is None or view.hash != self._view.hash:
            self._drop(_describe_change(self._view, view))
            self._view = view
            self._view_since = now
            self._settled = False
            self._propose(self._max_epoch + 1)
        else:
            self._view = view  # same hash; names may have changed
        self._evaluate(now)

    def loaded(self, plan_hash: str, now: float) -> bool:
        """The local range of ``plan_hash`` is loaded. False if that plan is no longer current."""
        if (
            self._plan is None
            or self._plan.hash != plan_hash
            or self._state is not AgreementState.LOADING
        ):
            return False
        self._ready_hash = plan_hash
        self._state = AgreementState.WAITING
        self._evaluate(now)
        return True

    def load_failed(self, plan_hash: str, message: str) -> None:
        """Loading the local range of ``plan_hash`` failed: say so until the view changes."""
        if self._plan is None or self._plan.hash != plan_hash:
            return
        self._drop(f"loading failed on this node: {message}")
        self._state = AgreementState.FAILED
        self._failure = message
        self._reason = f"loading failed on this node: {message}"

    def handle_timer(self, now: float) -> None:
        if self._view is not None:
            self._evaluate(now)

    def get_timer(self) -> float | None:
        if self._view is not None and self._state is AgreementState.FORMING and not self._settled:
            return self._view_since + self.config.settle_time
        return None

    # ---------------------------------------------------------------------- outputs
    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[Event]:
        out = list(self._events)
        self._events.clear()
        return out

    @property
    def state(self) -> AgreementState:
        return self._state

    @property
    def epoch(self) -> int:
        """The epoch proposed for the current view (the committed plan's, once committed)."""
        return self._epoch

    @property
    def plan(self) -> Plan | None:
        """The committed plan (loading, waiting or serving), if any."""
        return self._plan

    @property
    def serving_plan(self) -> Plan | None:
        """The plan requests run on, only while the ring is serving."""
        return self._plan if self._state is AgreementState.SERVING else None

    @property
    def reason(self) -> str:
        """Why the ring is not serving (or ``"ready"``)."""
        return self._reason

    def published(self) -> dict[str, Any]:
        """Metadata fields to gossip: ``dataclasses.replace(meta, **agreement.published())``."""
        committed = self._plan is not None
        return {
            "view_hash": self._view.hash if self._view else None,
            "epoch": self._epoch,
            "plan_hash": self._plan.hash if committed else None,
            "ready_plan_hash": self._ready_hash if committed else None,
            "phase": _PHASE[self._state],
        }

    def status(self) -> dict[str, Any]:
        view = self._view
        return {
            "state": self._state.value,
            "ready": self._state is AgreementState.SERVING,
            "reason": self._reason,
            "view_hash": view.hash if view else None,
            "view_members": list(view.node_ids) if view else [],
            "model": view.model if view else None,
            "epoch": self._epoch,
            "plan": self._plan.as_dict() if self._plan else None,
            "ready_plan_hash": self._ready_hash,
            "unfit": (
                {"message": self._unfit.message, "hint": self._unfit.hint}
                if self._unfit and self._state is AgreementState.UNFIT
                else None
            ),
            "peers": {
                i: {
                    "view_hash": m.view_hash,
                    "epoch": m.epoch,
                    "plan_hash": m.plan_hash,
                    "ready_plan_hash": m.ready_plan_hash,
                    "phase": m.phase.value,
                }
                for i, m in sorted(self._metas.items())
            },
        }

    # ---------------------------------------------------------------------- internals
    def _see_epochs(self, epochs: Any) -> None:
        self._max_epoch = max(self._max_epoch, *epochs, self._epoch)

    def _propose(self, epoch: int) -> None:
        self._epoch = epoch
        self._max_epoch = max(self._max_epoch, epoch)
        self._state = AgreementState.FORMING
        self._unfit = None
        self._failure = None

    def _drop(self, reason: str) -> None:
        plan = self._plan
        if plan is None:
            return
        if self._state is AgreementState.SERVING:
            self._events.append(StopServing(plan, reason))
        self._events.append(PlanDropped(plan, reason))
        log.info("dropping plan %s (epoch %d): %s", plan.hash[:8], plan.epoch, reason)
        self._plan = None
        self._ready_hash = None

    def _who(self, node_id: str) -> str:
        assert self._view is not None
        for m in self._view.members:
            if m.node_id == node_id and m.name:
                return m.name
        return node_id[:8]

    def _evaluate(self, now: float) -> None:
        view = self._view
        assert view is not None
        if now >= self._view_since + self.config.settle_time:
            self._settled = True
        # Rule 2: a higher epoch proposed for this same view wins.
        higher = max((m.epoch for m in self._metas.values() if m.view_hash == view.hash), default=0)
        if higher > self._epoch:
            self._drop(f"the ring moved to epoch {higher}")
            self._propose(higher)
        if self._state is AgreementState.FAILED:
            return
        if self._state in (AgreementState.FORMING, AgreementState.UNFIT):
            self._try_commit(now)
        if self._plan is not None:
            self._check_ready()

    def _try_commit(self, now: float) -> None:
        view = self._view
        assert view is not None
        n = len(view.members)
        other_view = sorted(i for i, m in self._metas.items() if m.view_hash != view.hash)
        missing = sorted(set(view.node_ids) - {self.node_id} - set(self._metas))
        if other_view or missing:
            lagging = [
                f"{self._who(i)} sees {(self._metas[i].view_hash or 'no view')[:8]}"
                for i in other_view
            ] + [f"{self._who(i)} unknown" for i in missing]
            agreed = n - len(other_view) - len(missing)
            self._set_forming(
                f"waiting for {n - agreed} of {n} nodes to agree on view {view.short()} "
                f"({', '.join(lagging)})"
            )
            return
        behind = sorted(i for i, m in self._metas.items() if m.epoch != self._epoch)
        if behind:
            self._set_forming(
                f"waiting for {', '.join(self._who(i) for i in behind)} "
                f"to agree on epoch {self._epoch}"
            )
            return
        if view.model_problem:
            self._set_forming(view.model_problem)
            return
        if self._shape is None or self._shape.name != view.model:
            self._set_forming(
                self._missing
                or f"model {view.model or '(none)'} is unknown on this node: "
                "its files are not in the store"
            )
            return
        if now < self._view_since + self.config.settle_time:
            self._set_forming(f"view {view.short()} is settling")
            return
        try:
            plan = make_plan(
                ((m.node_id, m.usable_memory) for m in view.members), self._shape, epoch=self._epoch
            )
        except PlanError as e:
            if (
                self._state is not AgreementState.UNFIT
                or self._unfit is None
                or self._unfit.message != e.message
            ):
                self._events.append(PlanUnfit(view.hash, e))
            self._state = AgreementState.UNFIT
            self._unfit = e
            self._reason = f"plan cannot fit: {e.message}"
            return
        self._plan = plan
        self._ready_hash = None
        self._unfit = None
        a = plan.assignment(self.node_id)
        self._state = AgreementState.LOADING if a is not None else AgreementState.WAITING
        self._events.append(LoadShard(plan, a))
        log.info(
            "committed plan %s epoch %d for view %s: %s",
            plan.hash[:8],
            plan.epoch,
            view.short(),
            a.describe() if a else "no layers here",
        )

    def _set_forming(self, reason: str) -> None:
        self._state = AgreementState.FORMING
        self._reason = reason

    def _check_ready(self) -> None:
        plan, view = self._plan, self._view
        assert plan is not None and view is not None
        blockers = []
        for node_id in view.node_ids:
            a = plan.assignment(node_id)
            if node_id == self.node_id:
                if a is not None and self._ready_hash != plan.hash:
                    blockers.append(f"this node loading {a.describe()}")
                continue
            meta = self._metas[node_id]
            if meta.plan_hash != plan.hash:
                what = (
                    "has not committed yet"
                    if meta.plan_hash is None
                    else f"committed plan {meta.plan_hash[:8]}, not {plan.hash[:8]} "
                    "(different model files?)"
                )
                blockers.append(f"node {self._who(node_id)} {what}")
            elif a is not None and meta.ready_plan_hash != plan.hash:
                blockers.append(f"node {self._who(node_id)} loading {a.describe()}")
        if not blockers:
            self._reason = "ready"
            if self._state is AgreementState.WAITING:
                self._state = AgreementState.SERVING
                self._events.append(RingReady(plan))
                log.info("ring ready on plan %s epoch %d", plan.hash[:8], plan.epoch)
            return
        self._reason = "; ".join(blockers)
        if self._state is AgreementState.SERVING:
            self._state = AgreementState.WAITING
            self._events.append(StopServing(plan, self._reason))


def _describe_change(old: View | None, new: View) -> str:
    """ "node c left the ring; node d joined" for a view change."""
    if old is None:
        return f"the ring changed (view {new.short()})"
    names = {m.node_id: m.name or m.node_id[:8] for m in (*old.members, *new.members)}
    gone = sorted(set(old.node_ids) - set(new.node_ids))
    came = sorted(set(new.node_ids) - set(old.node_ids))
    parts = [f"node {names[i]} left the ring" for i in gone] + [
        f"node {names[i]} joined" for i in came
    ]
    if old.model != new.model:
        parts.append(f"the active model changed from {old.model} to {new.model}")
    if not parts:
        parts.append("a node's address or memory changed")
    return "; ".join(parts) + f" (view {old.short()} -> {new.short()})"
