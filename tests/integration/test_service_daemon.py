"""``ringd run`` as a service: real processes, real sockets, the systemd notify protocol.

- run the way ``systemd/ringd.service`` runs it, with a ``NOTIFY_SOCKET`` this test binds:
  ``STATUS=`` while loading, ``READY=1`` once serving, ``WATCHDOG=1`` at the configured
  rate, ``STOPPING=1`` on SIGTERM, exit 0;
- a stalled event loop (injected by the ``RINGD_TEST_STALL_AFTER`` hook) exits non-zero;
- identity across 20 restarts;
- SIGTERM during a generation, to a stage node and to the entry node.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ringd.client import Client
from ringd.errors import RequestError
from ringd.localring import LocalRing, free_port
from ringd.service.watchdog import EXIT_STALLED

from .conftest import BUDGET, NotifySocket, RingFactory, unit_command

pytestmark = pytest.mark.timeout(120)

WATCHDOG_USEC = 400_000


def service_env(tmp_path: Path, store: tuple[Path, str],
                **extra: str) -> tuple[list[str], dict[str, str], int]:
    """The unit's argv and environment for one node alone; returns its HTTP port too."""
    http_port = free_port()
    settings = {
        "RINGD_MODEL_STORE": str(store[0]), "RINGD_MODEL": store[1], "RINGD_NODE_NAME": "svc",
        "RINGD_BIND_HOST": "127.0.0.1", "RINGD_ADVERTISE_HOST": "127.0.0.1",
        "RINGD_PORT": str(free_port()), "RINGD_HTTP_HOST": "127.0.0.1",
        "RINGD_HTTP_PORT": str(http_port), "RINGD_MDNS": "false",
        "RINGD_MEMORY_BUDGET": str(BUDGET), "RINGD_MAX_CONTEXT": "1024",
        "RINGD_MAX_CONCURRENT": "2", "RINGD_LOG_LEVEL": "info", **extra,
    }
    argv, env = unit_command(tmp_path / "state", settings)
    return argv, env, http_port


def spawn(argv: list[str], env: dict[str, str], log: Path, *,
          watchdog_pid: bool = True) -> subprocess.Popen[bytes]:
    """Start like systemd does: ``WATCHDOG_PID`` is the service's own pid (``$$`` before exec)."""
    if watchdog_pid:
        argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *argv]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"ringd did not exit within {timeout} s of SIGTERM") from None


def is_watchdog(n: Any) -> bool:
    return n.get("WATCHDOG") == "1"


# --------------------------------------------------------------------------- 1. the unit's way
def test_notify_ready_after_load_watchdog_stopping(tmp_path: Path, tiny_store: tuple[Path, str],
                                                   notify_socket: NotifySocket) -> None:
    argv, env, http_port = service_env(tmp_path, tiny_store)
    env.update(NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC=str(WATCHDOG_USEC))
    log = tmp_path / "ringd.log"
    proc = spawn(argv, env, log)
    try:
        ready = notify_socket.wait_for(lambda n: n.get("READY") == "1", 60, proc=proc)
        # The moment READY=1 arrives, the node serves: the status API says so.
        st = Client("127.0.0.1", http_port).status()
        assert st["ready"] is True and st["plan"] is not None, st
        assert st["members"][0]["layers"] == [0, st["model"]["num_layers"]]

        notices = notify_socket.snapshot()
        statuses = [n.get("STATUS") for n in notices if n.at <= ready.at and n.get("STATUS")]
        assert statuses[0] == "starting", statuses
        loading = [s for s in statuses if s.startswith("loading layers")]
        layers = st["model"]["num_layers"]
        assert loading == [f"loading layers 0-{layers - 1} of {layers}"], statuses
        assert statuses.index("waiting for peers") < statuses.index(loading[0]), statuses
        model = st["model"]["name"]
        assert ready.get("STATUS") == f"serving {model}: ring of 1 nodes, layers 0-{layers - 1}", \
            ready

        # Watchdog: pings every WATCHDOG_USEC / 2, from the loop, all along.
        window = 2.0
        notify_socket.wait_for(lambda n: is_watchdog(n) and n.at >= ready.at + window, window + 5,
                               proc=proc)
        pings = [n.at for n in notify_socket.snapshot() if is_watchdog(n)]
        in_window = [t for t in pings if ready.at <= t < ready.at + window]
        expected = window / (WATCHDOG_USEC / 2e6)
        assert expected * 0.6 <= len(in_window) <= expected * 1.3, (len(in_window), expected)
        gaps = [(b - a, b) for a, b in zip(pings, pings[1:])]
        # Once ready, systemd kills the service when no ping comes for WATCHDOG_USEC: never that
        # long. Before, the loop pinged too, while MLX imported and the layers loaded.
        assert max(g for g, t in gaps if t > ready.at) < WATCHDOG_USEC / 1e6, gaps
        assert pings[0] < ready.at and max(g for g, t in gaps if t <= ready.at) < 1.0, gaps

        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stopping = notify_socket.wait_for(lambda n: n.get("STOPPING") == "1", 10)
        assert stopping.at >= t_term
        assert proc.wait(15) == 0
        assert not [n for n in notify_socket.snapshot() if n.get("READY") == "1" and n.at > t_term]
    finally:
        stop(proc)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


# --------------------------------------------------------------------------- 2. stalled loop
def test_stalled_loop_exits_nonzero(tmp_path: Path, tiny_store: tuple[Path, str],
                                    notify_socket: NotifySocket) -> None:
    stall_timeout = 1.0
    argv, env, http_port = service_env(tmp_path, tiny_store, RINGD_STALL_TIMEOUT=str(stall_timeout))
    env.update(NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC=str(WATCHDOG_USEC),
               RINGD_TEST_STALL_AFTER="0.5")
    log = tmp_path / "ringd.log"
    proc = spawn(argv, env, log)
    try:
        # The detector is armed from the start and stays quiet while the node starts.
        ready = notify_socket.wait_for(lambda n: n.get("READY") == "1", 60, proc=proc)
        code = proc.wait(0.5 + stall_timeout + 10)
        t_exit = time.monotonic()
    finally:
        stop(proc)
    text = log.read_text()
    assert code == EXIT_STALLED, text[-3000:]
    assert f"(limit {stall_timeout:.1f} s)" in text and "time.sleep" in text, text[-3000:]
    hook = text.index("blocking the event loop (test hook)")
    assert hook < text.index("event loop stalled"), text[-3000:]
    last_ping = max(n.at for n in notify_socket.snapshot() if is_watchdog(n))
    # The stalled loop stopped pinging too: systemd's watchdog would have fired as well.
    assert last_ping > ready.at and t_exit - last_ping > WATCHDOG_USEC / 1e6, (t_exit - last_ping)


# --------------------------------------------------------------------------- 3. identity
BOOT_LINE = re.compile(r"ringd\.state: node ([0-9a-f]{16}), boot epoch (\d+),")


def test_identity_across_20_restarts(tmp_path: Path, tiny_store: tuple[Path, str],
                                     notify_socket: NotifySocket) -> None:
    """Starts 1, 10 and 20 run until serving (id from the HTTP API, plan epoch); the others
    are stopped as soon as the daemon says it is starting (the imports alone take seconds)."""
    argv, env, http_port = service_env(tmp_path, tiny_store)
    env["NOTIFY_SOCKET"] = notify_socket.path
    state_dir = tmp_path / "state" / "ringd"  # the unit's RINGD_STATE_DIR=%S/ringd
    served = {0, 9, 19}
    reported: list[tuple[str, int]] = []  # (node id, boot epoch) as each start logged them
    api_ids: list[str] = []
    plan_epochs: list[int] = []  # the plan_epoch file after each stop
    for i in range(20):
        seen = len(notify_socket.snapshot())
        saved_plan = int((state_dir / "plan_epoch").read_text()) if i else 0
        log = tmp_path / f"ringd-{i}.log"
        proc = spawn(argv, env, log, watchdog_pid=False)
        try:
            if i in served:
                notify_socket.wait_for(lambda n: n.get("READY") == "1", 60, proc=proc, since=seen)
                st = Client("127.0.0.1", http_port).status()
                api_ids.append(st["node"]["id"])
                assert st["plan"]["epoch"] > saved_plan, (st["plan"]["epoch"], saved_plan)
            else:
                notify_socket.wait_for(lambda n: n.get("STATUS") == "starting", 30, proc=proc,
                                       since=seen)
            proc.send_signal(signal.SIGTERM)
            notify_socket.wait_for(lambda n: n.get("STOPPING") == "1", 15, since=seen)
            assert proc.wait(15) == 0, log.read_text()[-3000:]
        finally:
            stop(proc)
        found = BOOT_LINE.findall(log.read_text())
        assert len(found) == 1, log.read_text()[-3000:]
        reported.append((found[0][0], int(found[0][1])))
        plan_epochs.append(int((state_dir / "plan_epoch").read_text()))
    node_id = (state_dir / "node_id").read_text().strip()
    assert {nid for nid, _ in reported} == {node_id}, reported
    assert set(api_ids) == {node_id}, api_ids
    assert [epoch for _, epoch in reported] == list(range(1, 21))
    assert int((state_dir / "boot_epoch").read_text()) == 20
    assert plan_epochs[0] >= 1, plan_epochs
    assert all(b >= a for a, b in zip(plan_epochs, plan_epochs[1:])), plan_epochs


# --------------------------------------------------------------------------- 4. graceful stop
class Stream(threading.Thread):
    """Reads one generation from a node's HTTP API; records tokens and how it ended."""

    def __init__(self, client: Client, body: dict[str, Any], started_after: int = 5) -> None:
        super().__init__(daemon=True)
        self.client, self.body, self.started_after = client, body, started_after
        self.tokens = 0
        self.ids: list[int] = []
        self.started = threading.Event()
        self.finish: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            for ev in self.client.stream_generate(self.body):
                if ev.get("type") == "finish":
                    self.finish = ev
                else:
                    self.tokens += 1
                    self.ids.append(ev["token_id"])
                    if self.tokens >= self.started_after:
                        self.started.set()
        except BaseException as e:  # recorded for the test to assert on
            self.error = e
        finally:
            self.ended_at = time.monotonic()
            self.started.set()


LONG = {"prompt": "Tell me a story.", "max_tokens": 3000, "temperature": 0.0}


def post_json(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """HTTP status and JSON of a request whose answer is one JSON document (or the first line)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.readline() if resp.status == 200 else resp.read())
    finally:
        conn.close()


def log_sizes(ring: LocalRing) -> list[int]:
    return [n.log_path.stat().st_size for n in ring.nodes]


def assert_no_traceback_since(ring: LocalRing, offsets: list[int]) -> None:
    """Nothing crashed on any node from the signal on."""
    for n, offset in zip(ring.nodes, offsets):
        with open(n.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        assert "Traceback" not in text, text[-4000:]


def member_state(st: dict[str, Any], node_id: str) -> str | None:
    return next((m["state"] for m in st["members"] if m["id"] == node_id), None)


def test_sigterm_stage_node_during_generation(local_ring: RingFactory) -> None:
    """A stage node stopped by its service manager leaves the ring; the stream it was part
    of goes on, on the survivors, with exactly the tokens an undisturbed run gives."""
    ring = local_ring(3)
    sts = ring.wait_ready(timeout=60)
    entry = ring.nodes[0]
    ids = [s["node"]["id"] for s in sts]
    order = [a["node_id"] for a in sts[0]["plan"]["assignments"]]
    victim_i = next(i for i, nid in enumerate(ids) if i != 0 and nid in order)
    victim, victim_id = ring.nodes[victim_i], ids[victim_i]
    others = [n for i, n in enumerate(ring.nodes) if i != victim_i]
    body = {**LONG, "max_tokens": 200}
    undisturbed = Stream(entry.client, body)
    undisturbed.run()
    assert undisturbed.finish is not None, undisturbed.error

    stream = Stream(entry.client, body)
    stream.start()
    assert stream.started.wait(30) and stream.error is None and stream.finish is None, stream.error
    offsets = log_sizes(ring)
    t_sig = time.monotonic()
    victim.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

    seen: dict[str, list[str | None]] = {n.name: [] for n in others}
    left_at: dict[str, float] = {}
    while len(left_at) < len(others) and time.monotonic() < t_sig + 3.0:
        for n in others:
            if n.name not in left_at:
                state = member_state(n.client.status(), victim_id)
                seen[n.name].append(state)
                if state == "left":
                    left_at[n.name] = time.monotonic() - t_sig
    assert set(left_at) == {n.name for n in others}, seen
    assert max(left_at.values()) < 1.0, left_at
    assert not {s for states in seen.values() for s in states} & {"suspect", "dead"}, seen

    stream.join(60)
    assert not stream.is_alive(), "the request hangs after a node left"
    assert stream.error is None, stream.error
    assert stream.ids == undisturbed.ids and stream.finish is not None  # replayed, no gap
    assert victim.proc.wait(15) == 0  # type: ignore[union-attr]
    replayed = sum(s["stats"]["runner"]["requests_replayed"] for s in ring.statuses() if s)
    assert replayed == 1
    assert_no_traceback_since(ring, offsets)


def test_sigterm_entry_node_during_generation(local_ring: RingFactory) -> None:
    shutdown_timeout = 4.0
    ring = local_ring(2, extra_args=(f"--shutdown-timeout={shutdown_timeout}",))
    entry_id = ring.wait_ready(timeout=60)[0]["node"]["id"]
    entry = ring.nodes[0]
    long = Stream(entry.client, LONG)  # cannot finish within shutdown_timeout
    long.start()
    assert long.started.wait(30) and long.error is None, long.error
    short = Stream(entry.client, {**LONG, "max_tokens": 12}, started_after=1)
    short.start()
    assert short.started.wait(30) and short.error is None, short.error
    offsets = log_sizes(ring)
    t_sig = time.monotonic()
    entry.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

    # New requests are refused as soon as the signal is handled (one admitted before is
    # tiny and finishes).
    refused: tuple[int, dict[str, Any]] | None = None
    while refused is None and time.monotonic() < t_sig + 2.0:
        status, body = post_json(entry.http_port, "/ringd/generate",
                                 {"prompt": "Hi", "max_tokens": 1})
        if status == 429:
            continue  # the two streams fill max_concurrent until the signal is handled
        if status != 200:
            refused = status, body
    assert refused is not None, "new requests were still accepted 2 s after SIGTERM"
    assert refused[0] == 503 and refused[1]["code"] == "leaving", refused
    assert "shutting down" in refused[1]["message"], refused

    # In-flight requests: the short one finishes; the long one fails, clearly, at the deadline.
    short.join(shutdown_timeout + 5)
    assert short.finish is not None and short.finish["completion_tokens"] == 12, short.error
    long.join(shutdown_timeout + 5)
    assert not long.is_alive(), "the request hangs on a leaving entry node"
    assert long.ended_at is not None and long.ended_at - t_sig < shutdown_timeout + 2.0
    assert isinstance(long.error, RequestError) and long.finish is None, long.error
    assert f"node {entry.name} is shutting down" in long.error.message, long.error
    assert entry.proc.wait(15) == 0  # type: ignore[union-attr]
    assert member_state(ring.nodes[1].client.status(), entry_id) == "left"  # not failed
    assert_no_traceback_since(ring, offsets)
