"""How long three fresh ``ringd`` daemons on loopback take to form a ready ring.

    .venv/bin/python bench/ring_form.py [--reps 3] [--modes static,mdns,both] [--poll 0.02]

Each repetition starts three real daemons (``ringd.localring.LocalRing``, fresh state
directories, memory budgets 1:2:3 as ``ringctl demo`` uses) on the default model and polls
every node's ``GET /ringd/status`` every ``--poll`` seconds until the ring is ready. Modes,
side by side (interleaved, one repetition of each in turn):

- ``static``: static peers only (``--peer``), no mDNS;
- ``mdns``: mDNS on 127.0.0.1 only, no static peers: discovery is zeroconf's alone;
- ``both``: mDNS and static peers (what ``ringctl demo`` runs).

Milestones, in seconds from spawning the processes (``t0``), as the poller first sees
them (resolution: one poll period):

- ``up``       every daemon answers status (Python start, imports, tokenizer, sockets);
- ``peer``     some daemon sees a live peer (first peer seen);
- ``view``     every daemon has all three members in its view (all peers in view);
- ``commit``   every daemon has committed the plan (agreement);
- ``loaded``   every daemon has loaded its layers;
- ``ready``    every daemon reports the ring ready.

Phases printed (medians over repetitions): first up / first peer (absolute: the first
daemon to answer, the first to see a peer); boot = up (the last daemon); discovery =
view - up; agreement = commit - view; loading = loaded - commit; ready wait = ready -
loaded. Discovery is counted from the moment the last daemon answers: before that there is
no one to discover. Goal: discovery + agreement = commit - up <= 2 s. The daemons' own
``timeline`` (seconds from each daemon's start: ``started``, ``committed``, ``ready``) is
printed as a cross-check that does not depend on the polling.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringd.errors import RingdError
from ringd.localring import LocalNode, LocalRing

MILESTONES = ("up", "peer", "view", "commit", "loaded", "ready")
MODES = {"static": {"mdns": False, "static_peers": True},
         "mdns": {"mdns": True, "static_peers": False},
         "both": {"mdns": True, "static_peers": True}}
GOAL = 2.0


@dataclass
class NodeTrace:
    """When the poller first saw each milestone on one node (bench seconds from spawn)."""

    seen: dict[str, float] = field(default_factory=dict)
    timeline: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def milestones_in(st: dict[str, Any], n: int) -> set[str]:
    """The milestones a status dict shows as reached (a later one implies the earlier ones)."""
    got = {"up"}
    if any(not m.get("self") and m.get("state") == "alive" for m in st.get("members", ())):
        got.add("peer")
    if len((st.get("agreement") or {}).get("view_members") or ()) >= n:
        got.add("view")
    if st.get("plan") is not None or "committed" in (st.get("timeline") or {}):
        got.add("commit")
    if (st.get("stats") or {}).get("compute") is not None:
        got.add("loaded")
    if st.get("ready"):
        got.add("ready")
    last = max(MILESTONES.index(m) for m in got)  # several may pass between two polls
    return set(MILESTONES[: last + 1])


def poll_node(node: LocalNode, n: int, t0: float, period: float, trace: NodeTrace,
              stop: threading.Event, deadline: float) -> None:
    client = node.client
    client.timeout = 2.0
    while not stop.is_set() and time.monotonic() < deadline:
        tick = time.monotonic()
        try:
            st: dict[str, Any] | None = client.status()
        except RingdError:  # not answering yet
            st = None
        now = time.monotonic() - t0
        if st is not None:
            for m in milestones_in(st, n):
                trace.seen.setdefault(m, now)
            trace.timeline = dict(st.get("timeline") or {})
            if st.get("ready"):
                return
        if not node.alive():
            trace.error = f"{node.name} exited"
            return
        stop.wait(max(0.0, period - (time.monotonic() - tick)))


def form_once(mode: str, model: str, store: Path, budgets: list[int], extra: tuple[str, ...],
              period: float, timeout: float) -> list[NodeTrace]:
    """Start a fresh ring in ``mode``, trace it until ready, stop it."""
    with tempfile.TemporaryDirectory(prefix="ringform-") as tmp:
        ring = LocalRing(Path(tmp), budgets, model, store, extra_args=extra, **MODES[mode])
        traces = [NodeTrace() for _ in budgets]
        stop = threading.Event()
        t0 = time.monotonic()
        ring.start()
        try:
            threads = [threading.Thread(target=poll_node, daemon=True,
                                        args=(node, len(budgets), t0, period, tr, stop,
                                              t0 + timeout))
                       for node, tr in zip(ring.nodes, traces)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            missing = [f"{node.name}: {tr.error or f'not ready after {timeout:.0f} s'}"
                       for node, tr in zip(ring.nodes, traces) if "ready" not in tr.seen]
            if missing:
                raise RingdError(f"mode {mode}: the ring did not form: " + "; ".join(missing)
                                 + "\n" + "\n".join(f"--- {n.name}\n{ring.tail(n)}"
                                                     for n in ring.nodes))
        finally:
            stop.set()
            ring.stop()
        return traces


def ring_times(traces: list[NodeTrace]) -> dict[str, float]:
    """Ring-level milestones: ``peer`` and ``up1`` on the first node, the rest on the last."""
    out = {m: max(t.seen[m] for t in traces) for m in MILESTONES}
    out["peer"] = min(t.seen["peer"] for t in traces)
    out["up1"] = min(t.seen["up"] for t in traces)
    return out


def phases(r: dict[str, float]) -> dict[str, float]:
    return {"first up": r["up1"], "first peer": r["peer"], "boot": r["up"],
            "discovery": r["view"] - r["up"], "agreement": r["commit"] - r["view"],
            "loading": r["loaded"] - r["commit"], "ready wait": r["ready"] - r["loaded"],
            "disc+agree": r["commit"] - r["up"], "total": r["ready"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions per mode")
    ap.add_argument("--modes", default="static,mdns,both",
                    help="comma-separated, of: " + ",".join(MODES))
    ap.add_argument("--poll", type=float, default=0.02,
                    help="seconds between status polls of each node")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: choose among {', '.join(MODES)}")

    from ringd.compute.model_info import inspect_model
    from ringd.compute.store import ensure_default_model
    from ringd.config import Settings
    from ringd.units import format_size
    from ringd.core.agreement import AgreementConfig
    from ringd.core.plan import model_shape
    from ringd.localring import DEMO_CONCURRENCY, DEMO_CONTEXT, demo_budgets

    settings = Settings()
    info = inspect_model(ensure_default_model(settings.model_store, progress=print))
    shape = model_shape(info, Settings(max_context=DEMO_CONTEXT, max_concurrent=DEMO_CONCURRENCY))
    budgets = demo_budgets(shape.total_bytes, 3)
    extra = (f"--max-context={DEMO_CONTEXT}", f"--max-concurrent={DEMO_CONCURRENCY}")
    print(f"model {info.name}: {info.num_layers} layers; 3 daemons on 127.0.0.1, budgets "
          + ", ".join(format_size(b) for b in budgets) + f"; polls every {args.poll * 1000:.0f} "
          f"ms; {args.reps} repetitions per mode; probe interval {settings.probe_interval:g} s, "
          f"agreement settle time {AgreementConfig().settle_time:g} s")
    print()

    results: dict[str, list[list[NodeTrace]]] = {m: [] for m in modes}
    print(f"{'mode':6s} rep  " + "  ".join(f"{m:>6s}" for m in MILESTONES)
          + "   (s from spawn; peer: the first daemon, the others: the last)")
    for rep in range(args.reps):
        for mode in modes:
            traces = form_once(mode, settings.model, settings.model_store, budgets, extra,
                               args.poll, args.timeout)
            results[mode].append(traces)
            r = ring_times(traces)
            print(f"{mode:6s} {rep + 1:3d}  " + "  ".join(f"{r[m]:6.2f}" for m in MILESTONES),
                  flush=True)

    print()
    names = list(phases(ring_times(results[modes[0]][0])))
    print("medians (s)  " + "  ".join(f"{n:>10s}" for n in names))
    med: dict[str, dict[str, float]] = {}
    for mode in modes:
        per = [phases(ring_times(t)) for t in results[mode]]
        med[mode] = {n: statistics.median(p[n] for p in per) for n in names}
        print(f"{mode:11s}  " + "  ".join(f"{med[mode][n]:10.2f}" for n in names))

    print()
    print("daemon timelines, medians, each on its own clock (s since its Node object was made): "
          "started / committed / ready; committed - started")
    for mode in modes:
        cells = []
        for i in range(len(budgets)):
            tl = [t[i].timeline for t in results[mode]]
            s, c, r = (statistics.median(x[k] for x in tl)
                       for k in ("started", "committed", "ready"))
            cells.append(f"node{i + 1} {s:5.2f} / {c:5.2f} / {r:5.2f}; {c - s:5.2f}")
        print(f"{mode:6s}  " + "   ".join(cells))

    print()
    for mode in modes:
        m = med[mode]
        print(f"{mode:6s}: discovery + agreement {m['disc+agree']:.2f} s (goal <= {GOAL:.1f} s: "
              f"{'met' if m['disc+agree'] <= GOAL else 'MISSED'}); discovery "
              f"{m['discovery']:.2f} s, agreement {m['agreement']:.2f} s, loading "
              f"{m['loading']:.2f} s, boot {m['boot']:.2f} s, spawn to ready {m['total']:.2f} s")


if __name__ == "__main__":
    main()
