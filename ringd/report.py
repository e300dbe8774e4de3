"""What a node reports about itself and the ring (``GET /ringd/status``, ``ringctl status``).

Reads the parts the composition root made -- control plane, request path, shard, transport,
discovery -- and assembles one status; changes nothing.
"""

from __future__ import annotations

from typing import Any

from ringd.core.plan import Plan
from ringd.core.proof import StageLoad, rate_verdict, ring_ceiling


def node_status(d: Any) -> dict[str, Any]:
    """The status of the node of :class:`ringd.daemon.Daemon` ``d``."""
    control, runner = d.control, d.runner
    agreement, membership = control.agreement, control.membership
    plan = agreement.plan
    serving = runner.pipeline.route is not None
    members = []
    metas = control.metas()
    for m in sorted(membership.members(), key=lambda m: m.node_id):
        a = plan.assignment(m.node_id) if plan else None
        rtt = membership.rtt(m.node_id) if m.node_id != d.node_id else None
        meta = metas.get(m.node_id)  # None: metadata this node cannot read
        members.append({
            "id": m.node_id, "name": m.name, "addr": f"{m.addr[0]}:{m.addr[1]}",
            "state": m.state.value, "phase": meta.phase.value if meta else None,
            "usable_memory": meta.usable_memory if meta else None,
            "total_memory": meta.total_memory if meta else None,
            "layers": [a.start, a.end] if a else None,
            "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None,
            "software_version": meta.software_version if meta else None,
            "http_port": meta.http_port if meta else None,
            "self": m.node_id == d.node_id,
            "fingerprint": meta.fingerprint if meta else None,
            "refusal": meta.refusal if meta else None,
            "memory_bandwidth": (meta.memory_bandwidth or None) if meta else None,
        })
    compute = d.loader.compute
    return {
        "node": {"id": d.node_id, "name": d.settings.node_name,
                 "addr": f"{d.addr[0]}:{d.addr[1]}", "http_port": d.http_port,
                 "phase": control.meta.phase.value},
        "ready": serving,
        "reason": None if serving else control.not_ready_reason(),
        "model": {"name": d.info.name, "num_layers": d.info.num_layers,
                  "total_bytes": d.info.total_bytes},
        "plan": ({"epoch": plan.epoch, "hash": plan.hash,
                  "assignments": [{"node_id": a.node_id, "start": a.start, "end": a.end,
                                   "bytes": a.bytes_needed} for a in plan.order],
                  "excluded": [{"node_id": e.node_id, "reason": e.reason}
                               for e in plan.excluded]}
                 if plan else None),
        "members": members,
        "fingerprint": control.ring_fingerprint if serving else None,
        "ceiling": ceiling(d, plan),
        "agreement": agreement.status(),
        "timeline": {k: round(v, 3) for k, v in control.timeline.items()},
        "stats": {"runner": runner.status(), "membership": membership.stats(),
                  "transport": d.transport.stats(),
                  "discovery": d.discovery.stats().__dict__ if d.discovery else None,
                  "compute": compute.stats() if compute else None},
    }


def ceiling(d: Any, plan: Plan | None) -> dict[str, Any] | None:
    """Decode ceilings of the committed plan, and the last measured rate judged against them."""
    if plan is None:
        return None
    membership = d.control.membership
    members = {m.node_id: m for m in membership.members()}
    metas = d.control.metas()
    stages = []
    for a in plan.order:
        m, meta = members.get(a.node_id), metas.get(a.node_id)
        bandwidth = float(meta.memory_bandwidth) if meta and meta.memory_bandwidth else None
        stages.append(StageLoad(a.node_id, m.name if m else a.node_id[:8],
                                d.info.shard_bytes(a.start, a.end), bandwidth))
    rtts = [r for i in members if i != d.node_id and (r := membership.rtt(i)) is not None]
    out = ring_ceiling(stages, min(rtts) / 2 if rtts else 0.0)
    rate = d.runner.last_rate
    out["measured_tps"] = rate["tokens_per_second"] if rate else None
    out["verdict"] = (rate_verdict(rate["tokens_per_second"], out["single_stream_tps"])
                      if rate else None)
    return out
