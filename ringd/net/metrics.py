"""Prometheus metrics of one node, served at ``GET /metrics`` in the text exposition format.

Two sources:

- what this process observes as it happens, kept in ``prometheus_client`` metrics: the HTTP
  API's requests and the errors it answers by code (:meth:`Metrics.api_request`,
  :meth:`Metrics.api_error`), and histograms of this node's compute time per step and of
  the round trips its link probes measure (:meth:`Metrics.observe_compute`,
  :meth:`Metrics.observe_link`);
- what the node's :class:`ringd.status.Status` says at scrape time, read by a collector:
  ring readiness, plan epoch, members by state, the request path's counters (requests by
  outcome, tokens, steps), frames dropped by cause, every member's step timings (p50/p99 as
  summary quantiles, as each node gossips them) and the round trips to the peers.

Every metric is named ``ringd_*``; a status missing a part (a single-process node has no
transport) leaves that part's metrics out.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from ringd.core.timing import QUANTILE_KEYS
from ringd.status import Status

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Compute time of one step on one node: from a fraction of a millisecond (a small shard on
#: a GPU) to seconds (a big prefill chunk on a CPU).
COMPUTE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
#: Round trips of a link: from tens of microseconds (loopback, Thunderbolt) to Wi-Fi's worst.
LINK_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25)
#: Request path counters (``stats.runner``) exported as ``ringd_requests_total{outcome}``.
OUTCOMES = ("served", "failed", "cancelled", "replayed")


class Metrics:
    """One node's metrics registry (its own, not the process-wide default one)."""

    def __init__(self, status: Callable[[], Status]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._api_requests = Counter(
            "ringd_api_requests", "HTTP API requests answered, by route and HTTP status.",
            ["route", "status"], registry=self.registry)
        self._api_errors = Counter(
            "ringd_api_errors", "Errors the HTTP API answered (or ended a stream with), by "
            "error code.", ["code"], registry=self.registry)
        self._compute = Histogram(
            "ringd_stage_compute_seconds", "Compute time of one step of this node's layers "
            "(on its compute thread).", ["kind"], buckets=COMPUTE_BUCKETS,
            registry=self.registry)
        self._link = Histogram(
            "ringd_link_rtt_seconds", "Round trips measured by this node's link probes, by "
            "peer and interface.", ["peer", "interface"], buckets=LINK_BUCKETS,
            registry=self.registry)
        self.registry.register(_StatusCollector(status))

    # ------------------------------------------------------------------ observations
    def api_request(self, route: str, status: int) -> None:
        self._api_requests.labels(route, str(status)).inc()

    def api_error(self, code: str) -> None:
        self._api_errors.labels(code).inc()

    def observe_compute(self, seconds: float, kind: str = "decode") -> None:
        """One step of this node's layers took ``seconds`` (``kind``: decode or prefill).
        Thread-safe: called from the compute thread."""
        self._compute.labels(kind).observe(seconds)

    def observe_link(self, peer: str, interface: str, seconds: float) -> None:
        self._link.labels(peer, interface).observe(seconds)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class _StatusCollector(Collector):
    """Reads the node's status at each scrape."""

    def __init__(self, status: Callable[[], Status]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        try:
            st = self._status()
        except Exception:  # a scrape must not take the API down; the log says why
            log.exception("metrics: could not read the node's status")
            return
        yield from _ring(st)
        yield from _runner(st.stats.get("runner"))
        yield from _drops(st.stats.get("transport"))
        yield from _timings(st)


def _ring(st: Status) -> Iterator[Metric]:
    yield GaugeMetricFamily("ringd_ring_ready", "1 while the ring serves, else 0.",
                            value=1.0 if st.ready else 0.0)
    if st.plan is not None:
        yield GaugeMetricFamily("ringd_plan_epoch", "Epoch of the plan this node committed to.",
                                value=float(st.plan.epoch))
        yield GaugeMetricFamily("ringd_plan_stages", "Nodes holding layers in the plan.",
                                value=float(len(st.plan.assignments)))
    members = GaugeMetricFamily("ringd_members", "Members this node knows, by state.",
                                labels=["state"])
    counts: dict[str, int] = {}
    for m in st.members:
        counts[m.state.value] = counts.get(m.state.value, 0) + 1
    for state, n in sorted(counts.items()):
        members.add_metric([state], float(n))
    yield members
    if st.ceiling is not None and st.ceiling.single_stream_tps is not None:
        yield GaugeMetricFamily("ringd_ceiling_tokens_per_second", "The ring's decode ceiling "
                                "for one stream.", value=st.ceiling.single_stream_tps)
    if st.ceiling is not None and st.ceiling.measured_tps is not None:
        yield GaugeMetricFamily("ringd_measured_tokens_per_second", "Decode rate of the last "
                                "request long enough to judge, entered here.",
                                value=st.ceiling.measured_tps)
    rtt = GaugeMetricFamily("ringd_peer_rtt_seconds", "Smoothed round trip of membership "
                            "probes to each peer.", labels=["peer"])
    for m in st.members:
        if m.rtt_ms is not None and not m.is_self:
            rtt.add_metric([m.name or m.id], m.rtt_ms / 1000)
    yield rtt


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _runner(r: Any) -> Iterator[Metric]:
    if not isinstance(r, dict):
        return
    requests = CounterMetricFamily("ringd_requests", "Requests entered at this node, by how "
                                   "they ended.", labels=["outcome"])
    for outcome in OUTCOMES:
        n = _int(r.get(f"requests_{outcome}"))
        if n is not None:
            requests.add_metric([outcome], float(n))
    yield requests
    for key, name, doc in (
            ("tokens_delivered", "ringd_tokens", "Tokens streamed to requests entered here."),
            ("steps_computed", "ringd_steps_computed", "Steps this node's layers computed."),
            ("coverage_errors", "ringd_coverage_errors", "Activations refused by the coverage "
             "proof.")):
        n = _int(r.get(key))
        if n is not None:
            yield CounterMetricFamily(name, doc, value=float(n))
    for key, name, doc in (
            ("active_entries", "ringd_requests_running", "Requests entered here, running."),
            ("queued", "ringd_requests_queued", "Requests waiting for a place on the ring."),
            ("active_stage_requests", "ringd_stage_requests", "Requests this node's layers "
             "take part in.")):
        n = _int(r.get(key))
        if n is not None:
            yield GaugeMetricFamily(name, doc, value=float(n))


def _drops(t: Any) -> Iterator[Metric]:
    drops = t.get("drops") if isinstance(t, dict) else None
    if not isinstance(drops, dict):
        return
    fam = CounterMetricFamily("ringd_frames_dropped", "Peer frames dropped, by cause.",
                              labels=["cause"])
    for cause, n in sorted(drops.items()):
        if _int(n) is not None:
            fam.add_metric([str(cause)], float(n))
    yield fam


def _timings(st: Status) -> Iterator[Metric]:
    """Every member's gossiped step timings as summary quantiles (seconds), by node."""
    fam = Metric("ringd_step_seconds", "Recent step timings each node reports (p50 and p99 "
                 "over its window): queued, compute, handoff, decode_step.", "summary")
    hop = GaugeMetricFamily("ringd_hop_rtt_seconds", "Round trip from each stage to the next "
                            "one in the ring, as the stage measures it.", labels=["node"])
    for m in st.members:
        t = m.timings
        if t is None:
            continue
        node = m.name or m.id
        for key in QUANTILE_KEYS:
            q = getattr(t, key)
            for quantile, v in (("0.5", q.p50), ("0.99", q.p99)):
                if v is not None:
                    fam.add_sample("ringd_step_seconds",
                                   {"node": node, "kind": key[:-3], "quantile": quantile},
                                   v / 1000)
        if t.next_rtt_ms is not None:
            hop.add_metric([node], t.next_rtt_ms / 1000)
    yield fam
    yield hop
