"""``ringctl status`` and ``ringctl prompt`` against a real ApiServer on loopback.

Status rendering uses a backend whose only job is to return a given status dict; every
generation goes through the real LocalBackend on the tiny model.
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

from ringd.cli_ring import layer_bar, prompt, status
from ringd.compute.engine import generate_local
from ringd.compute.local_backend import LocalBackend, mlx_executor
from ringd.compute.tokenizer import Tokenizer
from ringd.config import Settings
from ringd.core.requests import SamplingParams
from ringd.net.api import ApiServer

QUESTION = "What is the capital of France?"
N = 10
HOLD = "Tell me a story."  # greedy on the tiny model it never samples EOS: the request stays open

READY: dict[str, Any] = {
    "node": {
        "id": "a1",
        "name": "alpha",
        "addr": "127.0.0.1:7411",
        "http_port": 7412,
        "phase": "serving",
    },
    "ready": True,
    "reason": None,
    "model": {"name": "SmolLM2-135M-Instruct", "num_layers": 30, "total_bytes": 100 * 2**20},
    "plan": {
        "epoch": 3,
        "hash": "9f86d081884c7d659a2feaa0c55ad015",
        "assignments": [
            {"node_id": "a1", "start": 0, "end": 5, "bytes": 1},
            {"node_id": "b2", "start": 5, "end": 15, "bytes": 1},
            {"node_id": "c3", "start": 15, "end": 30, "bytes": 1},
        ],
        "excluded": [
            {"node_id": "d4", "reason": "too small for one layer (needs 4.1 MiB, has 1.0 MiB)"}
        ],
    },
    "members": [
        {
            "id": "a1",
            "name": "alpha",
            "addr": "127.0.0.1:7411",
            "state": "ready",
            "phase": "serving",
            "usable_memory": 2**30,
            "total_memory": 24 * 2**30,
            "layers": [0, 5],
            "rtt_ms": None,
            "software_version": "0.1.0",
        },
        {
            "id": "b2",
            "name": "beta",
            "addr": "127.0.0.1:7421",
            "state": "ready",
            "phase": "serving",
            "usable_memory": 2 * 2**30,
            "total_memory": 24 * 2**30,
            "layers": [5, 15],
            "rtt_ms": 0.314,
            "software_version": "0.1.0",
        },
        {
            "id": "c3",
            "name": "gamma",
            "addr": "127.0.0.1:7431",
            "state": "ready",
            "phase": "serving",
            "usable_memory": 3 * 2**30,
            "total_memory": 24 * 2**30,
            "layers": [15, 30],
            "rtt_ms": 0.42,
            "software_version": "0.1.0",
        },
        {
            "id": "d4",
            "name": "delta",
            "addr": "127.0.0.1:7441",
            "state": "ready",
            "phase": "idle",
            "usable_memory": 2**20,
            "total_memory": 24 * 2**30,
            "layers": None,
            "rtt_ms": 0.5,
            "software_version": "0.1.0",
        },
    ],
    "fingerprint": "c0ffee1234",
    "ceiling": {"single_stream_tps": 9.87},
    "stats": {"requests_served": 4},
}


class StatusOnly:
    """Test double for status rendering only: returns a fixed status dict, serves nothing."""

    def __init__(self, st: dict[str, Any]) -> None:
        self.st = st

    def served_models(self) -> list[str]:
        return []

    def generate(self, request: Any) -> Any:
        raise AssertionError("StatusOnly does not generate")

    def status(self) -> Any:
        st = self.st

        class Raw:  # the status JSON as given (the CLI reads it as a dict until the next commit)
            def to_json(self) -> dict[str, Any]:
                return st

        return Raw()


async def invoke(cmd: Any, args: list[str], input: str | None = None) -> Result:
    """Run a click command in a thread while the server keeps running on this loop."""
    return await asyncio.to_thread(
        CliRunner().invoke, cmd, args, input=input, env={"RINGD_CONFIG": ""}
    )


def no_traceback(r: Result) -> None:
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception


async def run_status(st: dict[str, Any], *args: str) -> Result:
    server = ApiServer(StatusOnly(st), host="127.0.0.1", port=0)
    port = await server.start()
    try:
        return await invoke(status, ["--port", str(port), *args])
    finally:
        await server.close()


# ------------------------------------------------------------------------------- status
async def test_status_table_of_a_ready_ring() -> None:
    r = await run_status(READY)
    no_traceback(r)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert out.splitlines()[0] == "ring: ready"
    assert "SmolLM2-135M-Instruct, 30 layers, 100.0 MiB" in out
    assert "epoch 3, hash 9f86d081884c7d65" in out and "c0ffee1234" in out
    rows = {
        line.split()[1] if line.startswith("*") else line.split()[0]: line
        for line in out.splitlines()
        if "127.0.0.1:74" in line and not line.startswith("this node")
    }
    assert set(rows) == {"alpha", "beta", "gamma", "delta"}
    assert rows["alpha"].startswith("*")
    assert "[####....................]" in rows["alpha"] and "0-4 (5)" in rows["alpha"]
    assert (
        "[....########............]" in rows["beta"]
        and "5-14 (10)" in rows["beta"]
        and "0.31 ms" in rows["beta"]
    )
    assert "[............############]" in rows["gamma"] and "15-29 (15)" in rows["gamma"]
    assert "none" in rows["delta"] and "1.0 MiB" in rows["delta"] and "24.0 GiB" in rows["delta"]
    assert "excluded: delta: too small for one layer" in out
    assert "9.9 tokens/s" in out and "requests_served=4" in out
    assert "Local Network" not in out


async def test_status_not_ready_says_why_and_exits_1() -> None:
    st = {**READY, "ready": False, "reason": "waiting for beta to load layers 5-14"}
    r = await run_status(st)
    no_traceback(r)
    assert r.exit_code == 1
    assert r.stdout.splitlines()[0] == "ring: NOT READY: waiting for beta to load layers 5-14"


async def test_status_alone_gives_the_local_network_hint() -> None:
    st = {
        "node": {"id": "a1", "name": "alpha"},
        "ready": False,
        "reason": "no peers: the model needs 2 nodes",
        "members": [READY["members"][0]],
    }
    r = await run_status(st)
    no_traceback(r)
    assert r.exit_code == 1
    assert "Local Network" in r.stdout and "--peer" in r.stdout and "model: none" in r.stdout


async def test_status_tolerates_an_empty_dict() -> None:
    r = await run_status({})
    no_traceback(r)
    assert r.exit_code == 1 and "no reason given" in r.stdout


async def test_status_json_is_the_same_facts() -> None:
    r = await run_status(READY, "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == READY


def test_layer_bar_covers_the_depth() -> None:
    assert layer_bar([0, 4], 4, width=8) == "[########]"
    assert layer_bar([1, 2], 4, width=8) == "[..##....]"
    assert layer_bar(None, 4, width=4) == "[....]"
    assert layer_bar([0, 2], None) == ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_no_daemon_exits_2_with_a_hint() -> None:
    port = free_port()
    for cmd, args in ((status, []), (prompt, ["hello"])):
        r = await invoke(cmd, ["--port", str(port), *args])
        no_traceback(r)
        assert r.exit_code == 2
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
    backend = LocalBackend(
        tiny_model_dir,
        Settings(
            state_dir=tmp_path / "s", model_store=tmp_path / "m", max_concurrent=1, node_name="test"
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
    assert r.exit_code in (1, 2) and message in r.stderr


async def test_prompt_busy_is_a_clear_error(daemon) -> None:
    backend, port = daemon
    body = {"prompt": HOLD, "max_tokens": 3000, "temperature": 0}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/ringd/generate", json=body) as held:
            await held.content.readline()  # one token: the only slot is taken
            r = await invoke(prompt, ["--port", str(port), QUESTION])
    no_traceback(r)
    assert r.exit_code == 1
    assert "already running" in r.stderr and "hint: retry later" in r.stderr
    await asyncio.wait_for(backend.wait_idle(), 30)


async def test_ctrl_c_cancels_the_request(daemon) -> None:
    backend, port = daemon
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from ringd.cli_ring import prompt; prompt()",
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
    assert backend.status().stats["requests_cancelled"] == 1


async def test_ringctl_main_has_status_and_prompt_and_reads_the_port_from_config(tmp_path) -> None:
    from ringd.cli import main

    server = ApiServer(StatusOnly(READY), host="127.0.0.1", port=0)
    port = await server.start()
    cfg = tmp_path / "ringd.toml"
    cfg.write_text(f"[ringd]\nhttp_port = {port}\n")
    try:
        r = await invoke(main, ["--config", str(cfg), "status", "--json"])
    finally:
        await server.close()
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["epoch"] == 3
