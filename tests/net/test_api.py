"""The HTTP API with the official ``openai`` client, against a real ApiServer on loopback
backed by SoloBackend (a one-stage ring in process) running the tiny model; references from
the engine's generate_local."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from ringd.compute.engine import generate_local
from ringd.compute.mlx_thread import mlx_executor
from ringd.solo import SoloBackend
from ringd.compute.tokenizer import Tokenizer
from ringd.config import Settings
from ringd.core.requests import SamplingParams
from ringd.errors import UsageError
from ringd.net.api import ApiServer

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
RAW = "The quick brown fox"
N = 12
# Greedy on the tiny model this prompt never samples EOS (its output cycles): the stream stays.
HOLD = [{"role": "user", "content": "Tell me a story."}]


def on_mlx_thread(fn):
    """MLX streams belong to the thread that made them: every MLX call of the process runs there."""
    return mlx_executor().submit(fn).result()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict[str, object]:
    """Greedy token ids and text from the engine alone, for the chat and the raw prompt."""
    tok = Tokenizer.load(tiny_model_dir)
    out: dict[str, object] = {"tok": tok}
    for key, ids in (("chat", tok.encode_chat(CHAT)), ("raw", tok.encode(RAW))):
        gen = on_mlx_thread(
            lambda ids=ids: list(generate_local(tiny_model_dir, ids, SamplingParams(max_tokens=N)))
        )
        out[key] = {
            "prompt_tokens": len(ids),
            "ids": gen,
            "text": tok.decode(gen),
            "eos": len(gen) < N,
        }
    return out


def settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(
        state_dir=tmp_path / "state", model_store=tmp_path / "models", node_name="test", **kw
    )


async def serve(model_dir: Path, tmp_path: Path, *, api_key: str | None = None, **kw: object):
    backend = SoloBackend(model_dir, settings(tmp_path, **kw))
    await backend.start()
    server = ApiServer(backend, host="127.0.0.1", port=0, api_key=api_key)
    port = await server.start()
    return backend, server, port


@pytest.fixture
async def api(tiny_model_dir: Path, tmp_path: Path):
    backend, server, port = await serve(tiny_model_dir, tmp_path, max_concurrent=2,
                                        max_queued=0)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
    )
    yield backend, client, port
    await client.close()
    await server.close()
    await backend.close()


def completion_count(ref: dict) -> int:
    """Tokens the API reports: every sampled token, EOS included."""
    return len(ref["ids"]) + (1 if ref["eos"] else 0)


async def test_models_lists_the_served_model(api, tiny_model_dir: Path) -> None:
    backend, client, _ = api
    models = await client.models.list()
    assert [m.id for m in models.data] == backend.served_models() == [tiny_model_dir.name]


async def test_chat_greedy_equals_engine_streaming_and_not(api, reference) -> None:
    _, client, _ = api
    ref = reference["chat"]
    r = await client.chat.completions.create(
        model=openai.NOT_GIVEN, messages=CHAT, max_tokens=N, temperature=0
    )
    assert r.choices[0].message.content == ref["text"]
    assert r.choices[0].finish_reason == ("stop" if ref["eos"] else "length")
    assert r.usage.prompt_tokens == ref["prompt_tokens"]
    assert r.usage.completion_tokens == completion_count(ref)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = await client.chat.completions.create(
        messages=CHAT,
        max_tokens=N,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        model="",
    )
    parts, reasons, usage = [], [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(parts) == ref["text"]
    assert [x for x in reasons if x] == [r.choices[0].finish_reason]
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens


async def test_completions_greedy_equals_engine_streaming_and_not(
    api, reference, tiny_model_dir
) -> None:
    _, client, _ = api
    ref = reference["raw"]
    r = await client.completions.create(
        model=tiny_model_dir.name, prompt=RAW, max_tokens=N, temperature=0
    )
    assert r.choices[0].text == ref["text"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        ref["prompt_tokens"],
        completion_count(ref),
    )
    stream = await client.completions.create(
        model=tiny_model_dir.name, prompt=RAW, max_tokens=N, temperature=0, stream=True
    )
    assert "".join([c.choices[0].text async for c in stream]) == ref["text"]


async def test_stop_sequence_cuts_the_text_before_it(api, reference, tiny_model_dir) -> None:
    _, client, _ = api
    text = reference["raw"]["text"]
    assert len(text) >= 6, f"the tiny model's reference text is too short to test stop: {text!r}"
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    want = text[: text.index(stop)]
    r = await client.completions.create(
        model=tiny_model_dir.name, prompt=RAW, max_tokens=N, temperature=0, stop=[stop, "\x00never"]
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    assert r.usage.completion_tokens < completion_count(reference["raw"])
    stream = await client.completions.create(
        model=tiny_model_dir.name, prompt=RAW, max_tokens=N, temperature=0, stop=stop, stream=True
    )
    assert "".join([c.choices[0].text async for c in stream]) == want


async def test_seeded_sampling_repeats(api) -> None:
    _, client, _ = api
    kw = dict(
        messages=CHAT, max_tokens=8, temperature=0.9, top_p=0.9, seed=1234, model=openai.NOT_GIVEN
    )
    a = await client.chat.completions.create(**kw, extra_body={"top_k": 20})
    b = await client.chat.completions.create(**kw, extra_body={"top_k": 20})
    assert a.choices[0].message.content == b.choices[0].message.content
    kw["seed"] = 1235  # another seed draws other tokens: the seed is really used
    c = await client.chat.completions.create(**kw, extra_body={"top_k": 20})
    assert c.choices[0].message.content != a.choices[0].message.content


async def test_unknown_model_is_404_listing_the_served_one(api, tiny_model_dir) -> None:
    _, client, _ = api
    with pytest.raises(openai.NotFoundError) as e:
        await client.chat.completions.create(model="gpt-4", messages=CHAT)
    assert e.value.body["code"] == "model_not_served"
    assert tiny_model_dir.name in e.value.body["message"] and "gpt-4" in e.value.body["message"]


@pytest.mark.parametrize(
    "body, field",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"messages": "hi"}).encode(), "messages"),
        (
            json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
            "messages[0].role",
        ),
        (json.dumps({"messages": CHAT, "max_tokens": "5"}).encode(), "max_tokens"),
        (json.dumps({"messages": CHAT, "temperature": -1}).encode(), "temperature"),
        (json.dumps({"messages": CHAT, "stop": 3}).encode(), "stop"),
        (json.dumps({"messages": CHAT, "n": 2}).encode(), "n"),
        (json.dumps({"messages": CHAT, "stream": "yes"}).encode(), "stream"),
    ],
)
async def test_bad_requests_are_400_naming_the_field(api, body: bytes, field: str | None) -> None:
    _, _, port = api
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=body) as r:
            assert r.status == 400
            err = (await r.json())["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "bad_request"
    assert err["param"] == field
    if field:
        assert field in err["message"]
    else:
        assert "JSON" in err["message"]


async def test_oversized_body_and_unknown_route(api) -> None:
    _, _, port = api
    async with aiohttp.ClientSession() as s:
        big = json.dumps({"prompt": "x" * (3 * 1024 * 1024)})
        async with s.post(f"http://127.0.0.1:{port}/v1/completions", data=big) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"
        async with s.get(f"http://127.0.0.1:{port}/v1/nothing") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "not_found"


async def test_prompt_longer_than_the_context_is_refused(tiny_model_dir, tmp_path) -> None:
    backend, server, port = await serve(tiny_model_dir, tmp_path, max_context=8)
    try:
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
        )
        with pytest.raises(openai.BadRequestError) as e:
            await client.completions.create(
                model=tiny_model_dir.name, prompt="word " * 20, max_tokens=4
            )
        assert e.value.body["code"] == "context_length" and "max_context" in e.value.body["message"]
        await client.close()
    finally:
        await server.close()
        await backend.close()


async def test_api_key_is_required_on_every_route(tiny_model_dir, tmp_path) -> None:
    backend, server, port = await serve(tiny_model_dir, tmp_path, api_key="s3cret")
    base = f"http://127.0.0.1:{port}"
    try:
        wrong = openai.AsyncOpenAI(base_url=base + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            await wrong.models.list()
        assert e.value.body["code"] == "invalid_api_key"
        right = openai.AsyncOpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        r = await right.completions.create(
            model=tiny_model_dir.name, prompt=RAW, max_tokens=2, temperature=0
        )
        assert r.usage.completion_tokens >= 1
        async with aiohttp.ClientSession() as s:
            for path in ("/healthz", "/ringd/status", "/v1/models"):
                async with s.get(base + path) as resp:
                    assert resp.status == 401, path
            async with s.get(
                base + "/ringd/status", headers={"Authorization": "Bearer s3cret"}
            ) as resp:
                assert resp.status == 200 and (await resp.json())["ready"] is True
        await wrong.close()
        await right.close()
    finally:
        await server.close()
        await backend.close()


def test_beyond_loopback_needs_a_key() -> None:
    class Nothing:
        def served_models(self):
            return []

        def generate(self, request):
            raise AssertionError

        def status(self):
            return {}

    with pytest.raises(UsageError) as e:
        ApiServer(Nothing(), host="0.0.0.0", port=0)
    assert "api_key" in str(e.value)
    ApiServer(Nothing(), host="0.0.0.0", port=0, api_key="k")  # allowed with a key (not started)
    ApiServer(Nothing(), host="::1", port=0)


async def _first_sse_chunk(resp: aiohttp.ClientResponse) -> dict:
    async for line in resp.content:
        if line.startswith(b"data: ") and b'"content":"' in line and b'"content":""' not in line:
            return json.loads(line[6:])
    raise AssertionError("stream ended before a token")


async def test_busy_beyond_max_concurrent_then_disconnect_frees(api) -> None:
    backend, client, port = api
    body = {"messages": HOLD, "max_tokens": 3000, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as s:
        r1 = await s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
        r2 = await s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
        await _first_sse_chunk(r1)
        await _first_sse_chunk(r2)
        assert backend.active_requests == 2
        with pytest.raises(openai.RateLimitError) as e:
            await client.chat.completions.create(
                messages=CHAT, model=openai.NOT_GIVEN, max_tokens=2
            )
        assert e.value.body["code"] == "busy" and "max_concurrent" in e.value.body["message"]
        r1.close()  # the client goes away mid-stream
        r2.close()
    await asyncio.wait_for(backend.wait_idle(), 30)
    st = backend.status().stats["runner"]
    assert st["active_entries"] == st["active_stage_requests"] == 0
    assert st["requests_cancelled"] == 2
    assert backend.runner.compute.engine.active_requests() == []  # no KV cache left behind
    r = await client.chat.completions.create(messages=CHAT, model=openai.NOT_GIVEN, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


async def test_control_generate_streams_ndjson_events(api, reference) -> None:
    _, _, port = api
    ref = reference["raw"]
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{port}/ringd/generate", json={"prompt": RAW, "max_tokens": N}
        ) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
            events = [json.loads(line) async for line in r.content if line.strip()]
        async with s.post(
            f"http://127.0.0.1:{port}/ringd/generate", json={"prompt": RAW, "model": "other"}
        ) as r:
            assert r.status == 404
            err = await r.json()
        async with s.get(f"http://127.0.0.1:{port}/ringd/status") as r:
            st = await r.json()
        async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert (await r.json()) == {"status": "ok"}
    tokens, finish = events[:-1], events[-1]
    assert [e["type"] for e in tokens] == ["token"] * len(tokens)
    assert [e["index"] for e in tokens] == list(range(len(tokens)))
    ids = [e["token_id"] for e in tokens]
    assert ids[: len(ref["ids"])] == ref["ids"]
    assert "".join(e["text"] for e in tokens) == ref["text"]
    assert finish["type"] == "finish" and finish["completion_tokens"] == len(tokens)
    assert finish["prompt_tokens"] == ref["prompt_tokens"] and finish["time_to_first_token"] > 0
    assert err["type"] == "error" and err["code"] == "model_not_served"
    assert st["ready"] is True and st["model"]["num_layers"] >= 1


async def test_not_ready_until_loaded_and_back_to_back_requests_fit_one_slot(
    tiny_model_dir, tmp_path
) -> None:
    backend = SoloBackend(tiny_model_dir, settings(tmp_path, max_concurrent=1))
    server = ApiServer(backend, host="127.0.0.1", port=0)
    port = await server.start()
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.InternalServerError) as e:
            await client.completions.create(model=tiny_model_dir.name, prompt=RAW, max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "not_ready"
        await backend.start()
        for _ in range(4):  # a finished request's slot is free at once, before its cache is freed
            r = await client.completions.create(model=tiny_model_dir.name, prompt=RAW, max_tokens=2)
            assert r.usage.completion_tokens >= 1
    finally:
        await client.close()
        await server.close()
        await backend.close()


EXIT_SCRIPT = """
import asyncio, sys
from pathlib import Path
from ringd.solo import SoloBackend
from ringd.config import Settings
from ringd.core.requests import GenerationRequest, SamplingParams

async def main():
    backend = SoloBackend(Path(sys.argv[1]), Settings(state_dir=Path(sys.argv[2])))
    await backend.start()
    request = GenerationRequest(prompt="hello", params=SamplingParams(max_tokens=3))
    async for ev in backend.generate(request):
        pass
    await backend.close()

asyncio.run(main())  # and exit at once: the MLX thread has just signalled the loop
"""


async def test_a_process_that_served_requests_exits_cleanly(tiny_model_dir, tmp_path) -> None:
    """MLX's thread-local compile caches must not be torn down while Python finalizes (exit 134)."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            EXIT_SCRIPT,
            str(tiny_model_dir),
            str(tmp_path / f"s{i}"),
            stderr=asyncio.subprocess.PIPE,
        )
        for i in range(2)
    ]
    results = [(await p.wait(), (await p.stderr.read()).decode()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results


async def test_shutdown_route_calls_back_only_when_offered() -> None:
    class Nothing:
        def served_models(self):
            return []

        def generate(self, request):
            raise AssertionError

        def status(self):
            return {"ready": False}

    asked = asyncio.Event()
    with_cb = ApiServer(Nothing(), host="127.0.0.1", port=0, on_shutdown=asked.set)
    without = ApiServer(Nothing(), host="127.0.0.1", port=0)
    p1, p2 = await with_cb.start(), await without.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{p2}/ringd/shutdown") as r:
                assert r.status == 404 and (await r.json())["type"] == "error"
            async with s.post(f"http://127.0.0.1:{p1}/ringd/shutdown") as r:
                assert r.status == 202
            async with s.post(f"http://127.0.0.1:{p1}/v1/completions", json={"prompt": "x"}) as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "not_ready"
    finally:
        await with_cb.close()
        await without.close()
    assert asked.is_set()


async def test_a_web_page_cannot_use_the_local_api(api) -> None:
    """DNS rebinding (another site's name pointed at 127.0.0.1) and cross-site POSTs, which a
    browser sends without a preflight, are refused; programs and the dashboard are not."""
    _, _, port = api
    url = f"http://127.0.0.1:{port}"
    body = json.dumps({"prompt": "x", "max_tokens": 1})
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/ringd/status", headers={"Host": f"evil.example:{port}"}) as r:
            assert r.status == 403
            err = (await r.json())
            assert err["code"] == "forbidden" and "loopback" in err["message"]
        async with s.post(f"{url}/v1/completions", data=body,
                          headers={"Origin": "http://evil.example",
                                   "Content-Type": "text/plain"}) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
        for headers in ({}, {"Origin": url}, {"Host": f"localhost:{port}"}):
            async with s.post(f"{url}/v1/completions", data=body, headers=headers) as r:
                assert r.status == 200, headers
