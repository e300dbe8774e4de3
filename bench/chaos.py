"""A stream through a membership change: how long the client waits, and where the time goes.

    .venv/bin/python bench/chaos.py                 # ~10 minutes on the default model
    .venv/bin/python bench/chaos.py --tokens 100 --cases kill9,sigterm

A three-node loopback ring on the default model (every node holds it; node ids 1-3, equal
budgets, so the plan is known) runs a greedy stream of ``--tokens`` tokens entering at
node 1; after ``--at`` tokens a fault hits node 2 (the middle stage), or a fourth node joins.
For each case, side by side with an undisturbed run of the same stream in the same ring:

- ``pause``: the longest gap between two tokens the client saw, against the ring's normal
  gap (the median of the undisturbed run);
- ``detect``: fault -> the entry stops serving the old plan (from its log);
- ``replan``: stop -> the entry serves the new plan (agreement, loading layers);
- ``replay``: serve -> the first token after the pause (the replay's prefill);
- ``identical``: the stream's tokens equal the undisturbed run's.

Goal: identical in every case; pause <= detect + replan + replay + 1 s.

Cases: ``kill9`` (kill -9 of node 2), ``sigstop10`` (SIGSTOP 10 s, then SIGCONT), ``sigterm``
(node 2 stops gracefully), ``join`` (node 4 starts mid-stream: it waits while the ring is
busy, so the stream should not pause at all).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = ("kill9", "sigstop10", "sigterm", "join")
ARGS = ("--max-context=2048", "--max-concurrent=2", "--probe-interval=0.5",
        "--probe-timeout=0.25")


def wall() -> float:
    return time.time()


def log_times(path: Path, needle: str, after: float) -> list[float]:
    """Wall-clock times of the log lines of ``path`` containing ``needle``, after ``after``."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if needle not in line:
            continue
        stamp = line.split(" ", 1)[0]
        try:
            t = datetime.datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            continue
        if t >= after:
            out.append(t)
    return out


class Reader(threading.Thread):
    def __init__(self, client: Any, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.client, self.body = client, body
        self.ids: list[int] = []
        self.times: list[float] = []  # wall clock, as the daemons' logs
        self.error: BaseException | None = None
        self.got = threading.Condition()

    def run(self) -> None:
        try:
            for ev in self.client.stream_generate(self.body):
                if ev.get("type") == "token":
                    with self.got:
                        self.ids.append(ev["token_id"])
                        self.times.append(wall())
                        self.got.notify_all()
        except BaseException as e:  # reported in the table
            self.error = e
        finally:
            with self.got:
                self.got.notify_all()

    def wait_for(self, n: int) -> None:
        with self.got:
            self.got.wait_for(lambda: len(self.ids) >= n or not self.is_alive(), 600)


def one_case(case: str, model: Path, budgets: list[int], tokens: int, at: int) -> dict[str, Any]:
    from ringd.localring import LocalRing

    with tempfile.TemporaryDirectory(prefix="ringd-chaos-") as tmp:
        base = Path(tmp)
        n = 4 if case == "join" else 3
        ring = LocalRing(base, (budgets + budgets[-1:])[:n], model.name, model.parent,
                         extra_args=ARGS)
        for i in range(1, n + 1):
            (base / f"node{i}").mkdir(parents=True, exist_ok=True)
            (base / f"node{i}" / "node_id").write_text(f"{i:016x}\n")
        ring.start(count=3)
        try:
            ring.wait_ready(300)
            entry = ring.nodes[0]
            body = {"messages": [{"role": "user", "content":
                                  "Write a long story about a ring of machines that share "
                                  "one mind. Use many chapters."}],
                    "max_tokens": tokens, "temperature": 0.0}
            calm = Reader(entry.client, body)
            calm.run()
            gaps = [b - a for a, b in zip(calm.times, calm.times[1:])]
            if calm.error or len(calm.ids) < at + 10:
                raise SystemExit(f"the undisturbed stream gave {len(calm.ids)} tokens "
                                 f"({calm.error or 'it ended early'}): ask for fewer --at")
            reader = Reader(entry.client, body)
            reader.start()
            reader.wait_for(at)
            t_fault = wall()
            victim = ring.nodes[1]
            if case == "kill9":
                ring.kill(victim)
            elif case == "sigterm":
                victim.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            elif case == "sigstop10":
                victim.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
                time.sleep(10.0)  # the fault: ten seconds stopped
                victim.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
            else:
                ring.start_node(ring.nodes[3])
            reader.join(900)
            log = entry.log_path
            stops = log_times(log, "ring stops serving plan epoch", t_fault)
            readies = log_times(log, "ring ready on plan", t_fault)
            pause_i = max(range(1, len(reader.times)),
                          key=lambda i: reader.times[i] - reader.times[i - 1], default=None)
            row: dict[str, Any] = {
                "case": case, "identical": reader.ids == calm.ids and reader.error is None,
                "tokens": len(reader.ids),
                "error": str(reader.error) if reader.error else None,
                "gap_ms": 1000 * statistics.median(gaps) if gaps else math.nan,
                "pause_s": (reader.times[pause_i] - reader.times[pause_i - 1]
                            if pause_i else math.nan),
            }
            if stops and case != "join":
                stop = stops[0]
                ready = next((t for t in readies if t >= stop), math.nan)
                first = next((t for t in reader.times if t > ready), math.nan)
                row |= {"detect_s": stop - t_fault, "replan_s": ready - stop,
                        "replay_s": first - ready}
            return row
        finally:
            for node in ring.nodes:
                if node.alive():
                    try:
                        os.kill(node.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
                    except OSError:
                        pass
            ring.stop(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--at", type=int, default=40, help="tokens before the fault")
    ap.add_argument("--cases", default=",".join(CASES))
    a = ap.parse_args()
    from ringd.compute.model_info import inspect_model
    from ringd.compute.store import ensure_default_model
    from ringd.config import Settings
    from ringd.core.plan import model_shape

    model = ensure_default_model(Settings().model_store, progress=print)
    need = model_shape(inspect_model(model),
                       Settings(max_context=2048, max_concurrent=2)).total_bytes
    budgets = [int(need * 0.75)] * 3  # any two nodes hold the model
    print(f"# {model.name}, three nodes, a {a.tokens}-token greedy stream, the fault after "
          f"{a.at} tokens; load average {os.getloadavg()[0]:.1f}")
    rows = [one_case(c, model, budgets, a.tokens, a.at) for c in a.cases.split(",")]
    print("\n| case | identical | normal gap | pause | detect | re-plan | replay | "
          "pause <= sum + 1 s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        parts = [r.get(k) for k in ("detect_s", "replan_s", "replay_s")]
        bound = sum(parts) + 1.0 if all(isinstance(p, float) for p in parts) else None
        ok = "-" if bound is None else ("yes" if r["pause_s"] <= bound else "NO")
        cells = [f"{r[k]:.2f} s" if isinstance(r.get(k), float) else "-"
                 for k in ("pause_s", "detect_s", "replan_s", "replay_s")]
        print(f"| {r['case']} | {'yes' if r['identical'] else 'NO: ' + str(r['error'])} | "
              f"{r['gap_ms']:.0f} ms | " + " | ".join(cells) + f" | {ok} |")


if __name__ == "__main__":
    main()
