"""What a node reports about itself and the ring (``GET /ringd/status``, ``ringctl status``).

Reads the parts the composition root made -- control plane, request path, shard, transport,
discovery -- and builds one :class:`ringd.status.Status`; changes nothing.
"""

from __future__ import annotations

from typing import Any

from ringd.status import ModelStatus, Status, ring_status


def node_status(d: Any) -> Status:
    """The status of the node of :class:`ringd.daemon.Daemon` ``d``."""
    control, runner = d.control, d.runner
    membership, view = control.membership, control.view
    serving = runner.pipeline.route is not None
    rate = runner.last_rate
    compute = d.loader.compute
    # the model the ring serves or sets up: as this node holds it, or only its name
    local = control.served_model() if serving else None
    if local is None and view is not None and view.model_id:
        local = d.library.by_id(view.model_id)
    if local is not None:
        info = local.info
        model = ModelStatus(info.name, info.num_layers, info.total_bytes, local.model_id)
        shard_bytes = info.shard_bytes
    else:
        name = view.model if view is not None and view.model else d.settings.model
        model = ModelStatus(name, 0, None, view.model_id or None if view else None)
        shard_bytes = _unknown
    return ring_status(
        node_id=d.node_id, node_name=d.settings.node_name, addr=d.addr, http_port=d.http_port,
        members=membership.members(), metas=control.metas(), plan=control.agreement.plan,
        rtt=membership.rtt, model=model, shard_bytes=shard_bytes, serving=serving,
        channel=lambda m: d.transport.channel(m.addr), path=d.links.path_status,
        reason=None if serving else control.not_ready_reason(),
        fingerprint=control.ring_fingerprint,
        measured_tps=rate["tokens_per_second"] if rate else None,
        agreement=control.agreement.status(), timeline=control.timeline,
        stats={"runner": runner.status(), **_timings(runner),
               "membership": membership.stats(),
               "transport": d.transport.stats(), "links": d.links.stats(),
               "discovery": d.discovery.stats().__dict__ if d.discovery else None,
               "compute": compute.stats() if compute else None,
               "fetch": control.provisioner.stats(), "weights_served": d.weights.stats()})


def _unknown(start: int, end: int) -> int:
    return 0


def _timings(runner: Any) -> dict[str, Any]:
    """``{"timings": ...}``: the runner's rolling step timings (``Runner.timings()``, issue
    17), if it has them."""
    read = getattr(runner, "timings", None)
    return {"timings": read()} if callable(read) else {}
