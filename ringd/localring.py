"""A ring of real ``ringd`` processes on this machine (loopback): for ``ringctl demo``,
the integration tests and the benches.

Every node is a separate ``python -m ringd run`` process with its own state directory,
peer port and HTTP port; they share one cluster key and find each other through static
peers, mDNS confined to 127.0.0.1, or both (``static_peers``, ``mdns``).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ringd.client import Client
from ringd.errors import RingdError

#: Context and concurrency of the daemons of ``ringctl demo`` and the benches' local rings.
DEMO_CONTEXT = 2048
DEMO_CONCURRENCY = 4

#: Ports handed to local daemons come from below every common ephemeral range (Linux
#: 32768-60999, macOS and Windows 49152-65535). A port the kernel picked with ``bind(0)`` is
#: ephemeral: between this check and the daemon's bind, any outgoing connection on the
#: machine may be given it ("address already in use", seen in the suite); below the range
#: only another explicit bind can take it.
LOCAL_PORTS = range(20000, 32768)
#: Ports this process has handed out: a port is free when checked, not when its daemon
#: binds it, so two calls (two nodes of a ring) must not return the same one.
_handed: set[int] = set()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP on 127.0.0.1 right now, outside the ephemeral range,
    and not handed out before by this process (until half the range has been)."""
    rng = random.Random()
    if len(_handed) > len(LOCAL_PORTS) // 2:
        _handed.clear()
    for _ in range(200):
        port = rng.choice(LOCAL_PORTS)
        if port in _handed:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                t.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed.add(port)
        return port
    raise RingdError("could not find a free port on 127.0.0.1")


def demo_budgets(need: int, nodes: int) -> list[int]:
    """Memory budgets in the ratio 1:2:3:... whose sum is 1.5x what the model needs."""
    weights = list(range(1, nodes + 1))
    unit = math.ceil(need * 1.5 / sum(weights))
    return [unit * w for w in weights]


@dataclass
class LocalNode:
    name: str
    state_dir: Path
    port: int
    http_port: int
    budget: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client(self) -> Client:
        return Client("127.0.0.1", self.http_port, timeout=5.0)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class LocalRing:
    """``budgets`` in bytes, one per node; ``base`` holds state dirs, the key and logs."""

    base: Path
    budgets: Sequence[int]
    model: str
    model_store: Path
    mdns: bool = False
    #: Give every node the others as static peers (off: mDNS alone must find them).
    static_peers: bool = True
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    #: Per node, a CPU list to pin it to with ``taskset -c`` (Linux), e.g. ``("0", "1", "0")``;
    #: empty: every node inherits this process's affinity.
    cpus: Sequence[str] = ()
    #: Per node, its own model store (e.g. empty ones that fetch from the first node);
    #: empty: every node uses ``model_store``.
    stores: Sequence[Path] = ()
    nodes: list[LocalNode] = field(default_factory=list)

    def start(self, count: int | None = None) -> None:
        """Start the ring's daemons (only the first ``count``: start the others later with
        :meth:`start_node`)."""
        from ringd.keys import load_or_create_key

        self.base.mkdir(parents=True, exist_ok=True)
        key = self.base / "cluster.key"
        load_or_create_key(key)
        self.nodes = []
        for i, budget in enumerate(self.budgets, 1):
            d = self.base / f"node{i}"
            d.mkdir(exist_ok=True)
            self.nodes.append(LocalNode(f"node{i}", d, free_port(), free_port(), budget,
                                        d / "ringd.log"))
        for node in self.nodes[:count]:
            self.start_node(node)

    def store_of(self, node: LocalNode) -> Path:
        i = self.nodes.index(node)
        return Path(self.stores[i]) if i < len(self.stores) else self.model_store

    def start_node(self, node: LocalNode, *, extra_args: Sequence[str] = ()) -> None:
        """Start (or start again) the daemon of ``node``, with the others as its peers."""
        i = self.nodes.index(node)
        peers = ([f"--peer=127.0.0.1:{n.port}" for n in self.nodes if n is not node]
                 if self.static_peers else [])
        args = [sys.executable, "-m", "ringd", "run", f"--state-dir={node.state_dir}",
                f"--cluster-key-file={self.base / 'cluster.key'}",
                f"--model-store={self.store_of(node)}", f"--model={self.model}",
                f"--node-name={node.name}", "--bind-host=127.0.0.1",
                "--advertise-host=127.0.0.1", f"--port={node.port}", "--http-host=127.0.0.1",
                f"--http-port={node.http_port}", f"--memory-budget={node.budget}", *peers,
                *self.extra_args, *extra_args]
        args += ["--mdns", "--mdns-interface=127.0.0.1"] if self.mdns else ["--no-mdns"]
        if self.cpus:
            args = ["taskset", "-c", self.cpus[i % len(self.cpus)], *args]
        env = {**os.environ, "RINGD_LOG_LEVEL": os.environ.get("RINGD_LOG_LEVEL", "info"),
               **self.env}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("RINGD_CONFIG", None)
        log = open(node.log_path, "ab")
        node.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()

    def kill(self, node: LocalNode, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to ``node``'s daemon; for SIGKILL and SIGTERM, wait for it to end and
        return its exit code."""
        assert node.proc is not None
        node.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            return node.proc.wait(30)
        return 0

    def statuses(self) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = []
        for node in self.nodes:
            try:
                out.append(node.client.status())
            except RingdError:
                out.append(None)
        return out

    def wait_ready(self, timeout: float = 120.0, *, progress: Any = None) -> list[dict[str, Any]]:
        """Poll every node's status until all are ready on one plan; raise with the logs' tail
        if not."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            started = [n for n in self.nodes if n.proc is not None]
            dead = [n for n in started if not n.alive()]
            if dead:
                raise RingdError(f"{dead[0].name} exited with code {dead[0].proc.returncode}"  # type: ignore[union-attr]
                                 f":\n{self.tail(dead[0])}")
            sts = [s for n, s in zip(self.nodes, self.statuses()) if n.proc is not None]
            if all(s is not None and s.get("ready") for s in sts):
                hashes = {s["plan"]["hash"] for s in sts if s and s.get("plan")}
                if len(hashes) == 1:
                    return sts  # type: ignore[return-value]
            reason = next((s.get("reason") for s in sts if s and not s.get("ready")),
                          None) or "starting"
            if progress is not None and reason != last:
                progress(reason)
                last = reason
            if time.monotonic() > deadline:
                raise RingdError(f"the local ring was not ready after {timeout:.0f} s: {reason}\n"
                                 + "\n".join(f"--- {n.name}\n{self.tail(n)}" for n in self.nodes))
            time.sleep(0.1)

    def tail(self, node: LocalNode, lines: int = 15) -> str:
        try:
            return "\n".join(node.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> list[int | None]:
        """SIGTERM every node, wait, SIGKILL what is left; returns the exit codes."""
        for node in self.nodes:
            if node.alive():
                node.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for node in self.nodes:
            if node.proc is None:
                codes.append(None)
                continue
            try:
                codes.append(node.proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait()
                codes.append(None)
        return codes

    def __enter__(self) -> "LocalRing":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def describe(statuses: list[dict[str, Any]]) -> str:
    return json.dumps([{"node": s["node"]["name"], "plan": s["plan"]["hash"][:12]}
                       for s in statuses])
