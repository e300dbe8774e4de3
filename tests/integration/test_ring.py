"""A ring of three real ringd processes on loopback: formation, plan agreement, generation.

Issue 4 (the ring forms itself) and issue 7 (generate across the ring). Every node is a
separate process holding only its layers; outputs are compared with unmodified mlx_lm
running the whole model in this process.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from ringd.client import Client
from ringd.compute.model_info import inspect_model
from ringd.compute.tokenizer import Tokenizer
from ringd.errors import RequestError
from tests.integration.rings import (reference_tokens, ring_for, stream, text, token_ids,
                                     without_eos)

SLICE = 16
PROMPTS = ["What is the capital of France?", "Each node holds a contiguous block", "def add(a, b):"]


@pytest.fixture(scope="module")
def tiny_ring(tiny_quantized_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    # small prefill slices: a prompt of a few hundred tokens runs in many of them
    ring = ring_for(tiny_quantized_model_dir, tmp_path_factory.mktemp("ring"), (1, 2, 3),
                    extra_args=(f"--prefill-slice={SLICE}",))
    ring.start()
    try:
        statuses = ring.wait_ready(90)
        yield ring, statuses
    finally:
        codes = ring.stop()
        assert codes == [0, 0, 0], f"daemons did not stop cleanly: {codes}"


def test_three_nodes_agree_on_one_plan_proportional_to_memory(tiny_ring, tiny_quantized_model_dir):
    ring, statuses = tiny_ring
    info = inspect_model(tiny_quantized_model_dir)
    plans = {json.dumps(s["plan"], sort_keys=True) for s in statuses}
    assert len(plans) == 1, "every node must report the same plan"
    plan = statuses[0]["plan"]
    assert plan["epoch"] >= 1
    spans = {a["node_id"]: (a["start"], a["end"]) for a in plan["assignments"]}
    # contiguous, complete, no overlap
    bounds = sorted(spans.values())
    assert bounds[0][0] == 0 and bounds[-1][1] == info.num_layers
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    # more memory -> at least as many layers; every node loaded exactly its assignment
    by_budget = sorted(zip(ring.nodes, statuses), key=lambda ns: ns[0].budget)
    counts = [spans[s["node"]["id"]][1] - spans[s["node"]["id"]][0] for _, s in by_budget]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] > counts[0]
    for node, s in zip(ring.nodes, statuses):
        start, end = spans[s["node"]["id"]]
        compute = s["stats"]["compute"]
        assert compute["layers"] == [start, end]
        assert compute["loaded_bytes"] == info.shard_bytes(start, end)
        assert {m["name"] for m in s["members"]} == {"node1", "node2", "node3"}
        assert all(m["state"] == "alive" for m in s["members"])


def test_status_cli_reports_ready_with_json_and_exit_code(tiny_ring):
    from click.testing import CliRunner

    from ringd.cli import main

    ring, _ = tiny_ring
    port = str(ring.nodes[1].http_port)
    res = CliRunner().invoke(main, ["status", "--port", port])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].startswith("ring: ready"), res.output
    assert "node1" in res.output and "node3" in res.output
    res = CliRunner().invoke(main, ["status", "--json", "--port", port])
    assert res.exit_code == 0 and json.loads(res.output)["ready"] is True


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_ring_equals_mlx_lm_on_the_tiny_model(tiny_ring, tiny_quantized_model_dir, prompt):
    ring, _ = tiny_ring
    tok = Tokenizer.load(tiny_quantized_model_dir)
    ids = tok.encode(prompt)
    want = reference_tokens(tiny_quantized_model_dir, ids, 24)
    for entry in ring.nodes:  # any node can be the entry
        events = stream(entry.client, prompt=prompt, max_tokens=24, temperature=0.0)
        assert without_eos(token_ids(events), tok.eos_token_ids) == want
        assert events[-1]["type"] == "finish" and events[-1]["prompt_tokens"] == len(ids)


def test_four_concurrent_requests_with_different_sampling(tiny_ring, tiny_quantized_model_dir):
    ring, _ = tiny_ring
    tok = Tokenizer.load(tiny_quantized_model_dir)
    bodies = [
        dict(prompt=PROMPTS[0], max_tokens=20, temperature=0.0),
        dict(prompt=PROMPTS[1], max_tokens=20, temperature=0.9, seed=11),
        dict(prompt=PROMPTS[2], max_tokens=20, temperature=0.0),
        dict(prompt=PROMPTS[0], max_tokens=20, temperature=1.2, top_p=0.9, top_k=40, seed=5),
    ]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = stream(ring.nodes[i % 3].client, **bodies[i])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in (0, 2):
        want = reference_tokens(tiny_quantized_model_dir, tok.encode(bodies[i]["prompt"]), 20)
        assert without_eos(token_ids(results[i]), tok.eos_token_ids) == want
    for i in (1, 3):  # seeded: the same as the same request alone
        alone = stream(ring.nodes[0].client, **bodies[i])
        assert token_ids(alone) == token_ids(results[i])


def test_a_long_prompt_next_to_a_stream_runs_in_slices_and_changes_no_token(
        tiny_ring, tiny_quantized_model_dir):
    ring, _ = tiny_ring
    tok = Tokenizer.load(tiny_quantized_model_dir)
    long_prompt = " ".join(PROMPTS * 12)
    n = len(tok.encode(long_prompt))
    assert 200 < n < 900
    before = [s["stats"]["runner"]["schedule"]["slices"] for s in ring.statuses()]
    # long enough to still run at every stage while the prompt is computed there
    events = ring.nodes[0].client.stream_generate({"prompt": PROMPTS[0], "max_tokens": 300,
                                                   "temperature": 0.0, "stop": []})
    streamed = []
    for ev in events:  # the stream runs; then the long prompt arrives at another entry
        streamed.append(ev)
        if len(streamed) == 3:
            break
    long = stream(ring.nodes[1].client, prompt=long_prompt, max_tokens=8, temperature=0.0)
    streamed += list(events)
    assert without_eos(token_ids(long), tok.eos_token_ids) == reference_tokens(
        tiny_quantized_model_dir, tok.encode(long_prompt), 8)
    assert without_eos(token_ids(streamed), tok.eos_token_ids) == reference_tokens(
        tiny_quantized_model_dir, tok.encode(PROMPTS[0]), 300)
    after = [s["stats"]["runner"]["schedule"] for s in ring.statuses()]
    # every stage ran the prompt in slices of at most SLICE tokens
    assert all(a["slices"] - b >= -(-n // SLICE) for a, b in zip(after, before)), after
    assert all(a["mode"] == "decode-first" and a["slice_tokens"] == SLICE for a in after)


def test_cancel_mid_stream_frees_the_cache_on_every_node(tiny_ring):
    ring, _ = tiny_ring
    events = ring.nodes[0].client.stream_generate({"prompt": PROMPTS[1], "max_tokens": 500,
                                                   "temperature": 0.0, "stop": []})
    got = 0
    for ev in events:
        if ev["type"] == "token":
            got += 1
        if got == 3:
            break
    # mid-stream: the request holds a cache on every node
    busy = [s["stats"]["compute"]["requests"] for s in ring.statuses()]
    events.close()  # the client goes away: the entry cancels the request on the ring
    assert got == 3 and busy == [1, 1, 1]  # a cache on every node
    deadline = time.monotonic() + 10
    while True:
        sts = ring.statuses()
        held = [(s["stats"]["compute"]["requests"], s["stats"]["runner"]["active_stage_requests"],
                 s["stats"]["compute"]["kv_cache_bytes"]) for s in sts]
        if all(h == (0, 0, 0) for h in held):
            break
        assert time.monotonic() < deadline, f"caches not freed: {held}"
        time.sleep(0.05)


def test_openai_client_streaming_and_not(tiny_ring, tiny_quantized_model_dir):
    from openai import OpenAI

    ring, _ = tiny_ring
    node = ring.nodes[2]
    client = OpenAI(base_url=f"http://127.0.0.1:{node.http_port}/v1", api_key="unused")
    models = [m.id for m in client.models.list().data]
    assert models == [tiny_quantized_model_dir.name]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    whole = client.chat.completions.create(model=models[0], messages=messages, max_tokens=16,
                                           temperature=0)
    chunks = client.chat.completions.create(model=models[0], messages=messages, max_tokens=16,
                                            temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 5
    ref = stream(Client("127.0.0.1", node.http_port), messages=messages, max_tokens=16,
                 temperature=0.0)
    assert text(ref) == streamed


def test_a_ring_with_every_frame_over_tcp_gives_the_same_tokens(tiny_quantized_model_dir, tmp_path):
    """``tcp_threshold = 0`` (the README's switch for links where TCP does better) sends every
    activation and token over TCP, through the channel's queue: same greedy tokens."""
    ring = ring_for(tiny_quantized_model_dir, tmp_path / "tcp", (1, 2),
                    extra_args=("--tcp-threshold=0",))
    ring.start()
    try:
        ring.wait_ready(90)
        tok = Tokenizer.load(tiny_quantized_model_dir)
        ids = tok.encode(PROMPTS[0])
        want = reference_tokens(tiny_quantized_model_dir, ids, 16)
        for entry in ring.nodes:
            events = stream(entry.client, prompt=PROMPTS[0], max_tokens=16, temperature=0.0)
            assert without_eos(token_ids(events), tok.eos_token_ids) == want
        for st in ring.statuses():
            transport = st["stats"]["transport"]
            assert transport["udp"]["frames_sent"] == 0  # only membership's one-shot datagrams
            assert transport["tcp"]["frames_sent"] > 16 and transport["tcp"]["queued_bytes"] == 0
    finally:
        assert ring.stop() == [0, 0]


def test_request_while_the_ring_cannot_form_is_refused_with_the_reason(tiny_quantized_model_dir,
                                                                       tmp_path):
    # One node with far too little memory: the plan cannot fit, so the ring never serves.
    ring = ring_for(tiny_quantized_model_dir, tmp_path / "small", (1,), slack=0.3)
    ring.start()
    try:
        client = ring.nodes[0].client
        deadline = time.monotonic() + 30
        while True:
            st = ring.statuses()[0]
            if st is not None and "cannot fit" in (st.get("reason") or ""):
                break
            assert time.monotonic() < deadline, f"no fit error reported: {st}"
            time.sleep(0.05)
        assert st["ready"] is False
        assert "needs" in st["reason"] and "add >=" in st["reason"]
        with pytest.raises(RequestError) as e:
            stream(client, prompt="hello", max_tokens=4)
        assert e.value.code == "not_ready" and "cannot fit" in str(e.value)
    finally:
        assert ring.stop() == [0]


@pytest.mark.slow
def test_greedy_ring_equals_mlx_lm_on_the_default_model(default_model_dir, tmp_path):
    tok = Tokenizer.load(default_model_dir)
    ring = ring_for(default_model_dir, tmp_path / "smol", (1, 2, 3))
    ring.start()
    try:
        ring.wait_ready(120)
        for i, prompt in enumerate(["What is the capital of France?", "Name a primary colour."]):
            messages = [{"role": "user", "content": prompt}]
            ids = tok.encode_chat(messages)
            want = reference_tokens(default_model_dir, ids, 12)
            events = stream(ring.nodes[i % 3].client, messages=messages, max_tokens=12,
                            temperature=0.0)
            assert without_eos(token_ids(events), tok.eos_token_ids) == want
            if i == 0:
                assert "Paris" in text(events)
    finally:
        assert ring.stop() == [0, 0, 0]
