"""``ringctl status`` and ``ringctl prompt`` against a real ApiServer on loopback.

Every status is one a node builds: a ring node's through :func:`ringd.status.ring_status`
(what the daemon's status calls) from real core members and plans, or the real
SoloBackend's (a one-stage ring). Every generation goes through the real SoloBackend on the
tiny model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner, Result

from ringd.cli.ring import layer_bar, layers_text, prompt, status
from ringd.compute.engine import generate_local
from ringd.compute.mlx_thread import mlx_executor
from ringd.solo import SoloBackend
from ringd.compute.tokenizer import Tokenizer
from ringd.config import Settings
from ringd.units import format_size
from ringd.core.requests import SamplingParams
from ringd.net.api import ApiServer
from ringd.status import Status
from tests.statuses import TIMINGS, member, node_status, plan_of, ring_members

QUESTION = "What is the capital of France?"
N = 10
HOLD = "Tell me a story."  # greedy on the tiny model it never samples EOS: the request stays open


class StatusOnly:
    """Test double for status rendering only: serves a given status, generates nothing."""

    def __init__(self, st: Status | dict[str, Any]) -> None:
        self.st = st

    def served_models(self) -> list[str]:
        return []

    def generate(self, request: Any) -> Any:
        raise AssertionError("StatusOnly does not generate")

    def status(self) -> Any:
        if isinstance(self.st, Status):
            return self.st
        raw = self.st  # a malformed status, as a broken or foreign daemon might send

        class Raw:
            def to_json(self) -> dict[str, Any]:
                return raw

        return Raw()


async def invoke(cmd: Any, args: list[str], input: str | None = None) -> Result:
    """Run a click command in a thread while the server keeps running on this loop."""
    return await asyncio.to_thread(
        CliRunner().invoke, cmd, args, input=input, env={"RINGD_CONFIG": ""}
    )


def no_traceback(r: Result) -> None:
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception


async def run_status(st: Status | dict[str, Any], *args: str) -> Result:
    server = ApiServer(StatusOnly(st), host="127.0.0.1", port=0)
    port = await server.start()
    try:
        return await invoke(status, ["--port", str(port), *args])
    finally:
        await server.close()


def rows_by_name(out: str, names: set[str]) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        words = line.lstrip("*").split()
        if words and words[0] in names and "127.0.0.1:74" in line:
            rows[words[0]] = line
    return rows


# ------------------------------------------------------------------------------- status
async def test_status_table_of_a_ready_ring() -> None:
    members = ring_members(dead=True)
    plan = plan_of(members)
    st = node_status(members, plan)
    r = await run_status(st)
    no_traceback(r)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert out.splitlines()[0] == "ring: ready"
    assert f"{st.model.name}, 30 layers, {format_size(st.model.total_bytes)}" in out
    assert f"epoch {plan.epoch}, hash {plan.hash[:16]}" in out and "c0ffee1234" in out
    rows = rows_by_name(out, {m.name for m in members})
    assert set(rows) == {"alpha", "beta", "gamma", "delta", "epsilon"}
    assert rows["alpha"].startswith("*") and not rows["beta"].startswith("*")
    names = {m.node_id: m.name for m in members}
    for a in plan.order:  # every stage shows its range, as a bar over the depth and in numbers
        row = rows[names[a.node_id]]
        assert layer_bar((a.start, a.end), plan.num_layers) in row.split()
        assert layers_text((a.start, a.end)) in row
        assert row.lstrip("*").split()[2:4] == ["alive", "serving"]
    assert "0.31 ms" in rows["beta"] and "0.42 ms" in rows["gamma"]
    assert " none " in rows["delta"] and "1.0 MiB  24.0 GiB" in rows["delta"]
    # epsilon died while serving: its last gossiped phase is not shown as current
    assert rows["epsilon"].split()[2:4] == ["dead", "?"] and "serving" not in rows["epsilon"]
    assert f"excluded: delta: {plan.excluded[0].reason}" in out
    assert st.ceiling is not None and st.ceiling.single_stream_tps is not None
    assert f"ceiling: {st.ceiling.single_stream_tps:.1f} tokens/s for one stream" in out
    assert "last measured: 5.0 tokens/s" in out and "IMPOSSIBLE" not in out
    assert "requests_served=4" in out
    assert "Local Network" not in out


async def test_status_names_recent_rate_and_the_slowest_stage_and_link() -> None:
    members = ring_members()
    st = node_status(members, plan_of(members))
    r = await run_status(st)
    line = next(x for x in r.stdout.splitlines() if x.startswith("recent: "))
    step = TIMINGS["a1"].decode_step_ms  # alpha answers: it was the entry
    assert line.startswith(f"recent: {1000 / step.p50:.1f} tokens/s (a token every "
                           f"{step.p50:.0f} ms, p99 {step.p99:.0f} ms)")
    beta = TIMINGS["b2"].compute_ms  # the largest compute of the three stages
    assert f"slowest stage: beta, compute {beta.p50:.0f} ms (p99 {beta.p99:.0f} ms)" in line
    assert "slowest link: gamma -> alpha, 0.9 ms round trip" in line  # gamma wraps to alpha


async def test_status_names_the_path_to_each_peer() -> None:
    members = ring_members()
    r = await run_status(node_status(members, plan_of(members)))
    line = next(x for x in r.stdout.splitlines() if x.startswith("paths: "))
    assert "beta via bridge0 (thunderbolt) 0.08 ms, 2.3 GiB/s (+1 other path)" in line
    assert "gamma via lo (loopback) 0.4 ms, pinned" in line


async def test_status_flags_a_rate_above_the_ceiling() -> None:
    members = ring_members()
    st = node_status(members, plan_of(members), measured_tps=1e6)
    r = await run_status(st)
    assert r.exit_code == 0 and "last measured: 1000000.0 tokens/s -- IMPOSSIBLE" in r.stdout


async def test_status_not_ready_says_why_and_exits_1() -> None:
    members = ring_members()
    st = node_status(members, plan_of(members), serving=False,
                     reason="waiting for beta to load layers 5-14")
    r = await run_status(st)
    no_traceback(r)
    assert r.exit_code == 1
    assert r.stdout.splitlines()[0] == "ring: NOT READY: waiting for beta to load layers 5-14"
    assert "ring fingerprint" not in r.stdout


async def test_status_alone_gives_the_local_network_hint() -> None:
    st = node_status([member("a1", "alpha", 7411, 2**30)], None, serving=False,
                     reason="waiting for peers")
    r = await run_status(st)
    no_traceback(r)
    assert r.exit_code == 1
    assert "Local Network" in r.stdout and "--peer" in r.stdout
    assert "plan: none committed" in r.stdout


@pytest.mark.parametrize("raw, message", [
    ({}, "sent a malformed status: status.node is missing"),
    ({"node": {"id": "a1"}, "ready": True, "members": [{"id": "a1", "state": "ready"}]},
     "status.members[0].state must be one of alive, suspect, dead, left, got 'ready'"),
])
async def test_a_malformed_status_is_a_message_not_a_traceback(raw, message) -> None:
    r = await run_status(raw)
    no_traceback(r)
    assert r.exit_code == 1
    assert message in r.stderr and "hint:" in r.stderr and r.stdout == ""


async def test_status_json_is_the_same_facts() -> None:
    members = ring_members(dead=True)
    st = node_status(members, plan_of(members))
    r = await run_status(st, "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == st.to_json()
    assert Status.from_json(json.loads(r.stdout)) == st


def test_layer_bar_covers_the_depth() -> None:
    assert layer_bar((0, 4), 4, width=8) == "[########]"
    assert layer_bar((1, 2), 4, width=8) == "[..##....]"
    assert layer_bar(None, 4, width=4) == "[....]"
    assert layer_bar((0, 2), None) == ""
    assert layers_text((5, 15)) == "5-14 (10)" and layers_text(None) == "none"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_no_daemon_exits_3_with_a_hint() -> None:
    port = free_port()
    for cmd, args in ((status, []), (prompt, ["hello"])):
        r = await invoke(cmd, ["--port", str(port), *args])
        no_traceback(r)
        assert r.exit_code == 3
        assert f"no ringd running on 127.0.0.1:{port}" in r.stderr and "ringd run" in r.stderr


# ------------------------------------------------------------------------------- prompt
def on_mlx_thread(fn):
    """MLX streams belong to the thread that made them: every MLX call of the process runs there."""
    return mlx_executor().submit(fn).result()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict[str, Any]:
    tok = Tokenizer.load(tiny_model_dir)
    out = {}
    for key, ids in (
        ("chat", tok.encode_chat([{"role": "user", "content": QUESTION}])),
        ("raw", tok.encode(QUESTION)),
    ):
        out[key] = tok.decode(
            on_mlx_thread(
                lambda ids=ids: list(
                    generate_local(tiny_model_dir, ids, SamplingParams(max_tokens=N))
                )
            )
        )
    return out


@pytest.fixture
async def daemon(tiny_model_dir: Path, tmp_path: Path):
    backend = SoloBackend(
        tiny_model_dir,
        Settings(
            state_dir=tmp_path / "s", model_store=tmp_path / "m", max_concurrent=1, max_queued=0,
            node_name="test"
        ),
    )
    await backend.start()
    server = ApiServer(backend, host="127.0.0.1", port=0)
    port = await server.start()
    yield backend, port
    await server.close()
    await backend.close()


async def test_prompt_streams_the_greedy_answer(daemon, reference) -> None:
    _, port = daemon
    r = await invoke(prompt, ["--port", str(port), "--max-tokens", str(N), QUESTION])
    no_traceback(r)
    assert r.exit_code == 0, r.output
    assert r.stdout.rstrip("\n") == reference["chat"].rstrip("\n")
    assert "time to first token" in r.stderr and "tokens/s" in r.stderr


async def test_prompt_raw_from_stdin_and_file(daemon, reference, tmp_path) -> None:
    _, port = daemon
    r = await invoke(prompt, ["--port", str(port), "--max-tokens", str(N), "--raw"], input=QUESTION)
    assert r.exit_code == 0, r.output
    assert r.stdout.rstrip("\n") == reference["raw"].rstrip("\n")
    f = tmp_path / "q.txt"
    f.write_text(QUESTION)
    r = await invoke(
        prompt, ["--port", str(port), "--max-tokens", str(N), "--raw", "--file", str(f)]
    )
    assert r.exit_code == 0 and r.stdout.rstrip("\n") == reference["raw"].rstrip("\n")


async def test_prompt_json_events(daemon, reference) -> None:
    _, port = daemon
    r = await invoke(
        prompt,
        [
            "--port",
            str(port),
            "--max-tokens",
            str(N),
            "--json",
            "--seed",
            "7",
            "--temperature",
            "0.7",
            "--top-k",
            "5",
            "--top-p",
            "0.9",
            "--stop",
            "zzz",
            "--system",
            "Be brief.",
            QUESTION,
        ],
    )
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[-1]["type"] == "finish" and {e["type"] for e in events[:-1]} == {"token"}
    assert events[-1]["completion_tokens"] == len(events) - 1 <= N


@pytest.mark.parametrize(
    "args, input, message",
    [
        (["hello", "--file", "x.txt"], None, "not both"),
        (["--raw", "--system", "s", "hello"], None, "--system needs the chat template"),
        ([], "   \n", "is empty"),
        (["--file", "/nonexistent/prompt.txt"], None, "does not exist"),
        (["--temperature", "hot", "hello"], None, "Invalid value"),
        (["--top-p", "0", "hello"], None, "Invalid value"),
    ],
)
async def test_prompt_bad_arguments_are_messages(daemon, args, input, message) -> None:
    _, port = daemon
    r = await invoke(prompt, ["--port", str(port), *args], input=input)
    no_traceback(r)
    assert r.exit_code == 2 and message in r.stderr


async def test_prompt_busy_is_a_clear_error(daemon) -> None:
    backend, port = daemon
    body = {"prompt": HOLD, "max_tokens": 3000, "temperature": 0}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/ringd/generate", json=body) as held:
            await held.content.readline()  # one token: the only slot is taken
            r = await invoke(prompt, ["--port", str(port), QUESTION])
    no_traceback(r)
    assert r.exit_code == 4  # busy: retry later
    assert "already running" in r.stderr and "hint: retry later" in r.stderr
    await asyncio.wait_for(backend.wait_idle(), 30)


async def test_ctrl_c_cancels_the_request(daemon) -> None:
    backend, port = daemon
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from ringd.cli.ring import prompt; prompt()",
        "--port",
        str(port),
        "--max-tokens",
        "3000",
        "--raw",
        HOLD,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "RINGD_CONFIG": ""},
    )
    try:
        first = await asyncio.wait_for(proc.stdout.read(1), 60)
        assert first, (await proc.stderr.read()).decode()
        assert backend.active_requests == 1
        proc.send_signal(signal.SIGINT)
        rc = await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    err = (await proc.stderr.read()).decode()
    assert rc == 130 and "cancelled" in err and "Traceback" not in err
    await asyncio.wait_for(backend.wait_idle(), 30)
    assert backend.status().stats["runner"]["requests_cancelled"] == 1


async def test_status_of_a_single_process_node(daemon) -> None:
    backend, port = daemon
    r = await invoke(status, ["--port", str(port)])
    no_traceback(r)
    assert r.exit_code == 0, r.output
    st = backend.status()
    n = st.model.num_layers
    row = next(line for line in r.stdout.splitlines() if line.startswith("*"))
    assert row.split()[1:4] == ["test", "-", "alive"] and "serving" in row
    assert layer_bar((0, n), n) in row and layers_text((0, n)) in row
    r = await invoke(status, ["--port", str(port), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == st.to_json()


async def test_ringctl_main_has_status_and_prompt_and_reads_the_port_from_config(tmp_path) -> None:
    from ringd.cli import main

    members = ring_members()
    st = node_status(members, plan_of(members, epoch=7))
    server = ApiServer(StatusOnly(st), host="127.0.0.1", port=0)
    port = await server.start()
    cfg = tmp_path / "ringd.toml"
    cfg.write_text(f"[ringd]\nhttp_port = {port}\n")
    try:
        r = await invoke(main, ["--config", str(cfg), "status", "--json"])
    finally:
        await server.close()
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["epoch"] == 7
