"""The dashboard and ``/metrics`` of a real ApiServer on loopback: the files it serves, the
access rule (only the static files go without the API key), the Prometheus exposition, and
the page itself in a real browser (Debian's chromium through Playwright) -- a ring drawn from
a status a node builds, the API key asked once per tab, a chat streamed from the API.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ringd.config import Settings
from ringd.net.api import DASHBOARD_FILES, ApiServer
from ringd.solo import SoloBackend
from ringd.status import Status
from tests.browser import artifact, browser_page
from tests.statuses import TIMINGS, node_status, plan_of, ring_members

KEY = "s3cret-key"


class StatusOnly:
    """Serves the status it holds (which a test may change); generates nothing."""

    def __init__(self, st: Status) -> None:
        self.st = st

    def served_models(self) -> list[str]:
        return []

    def generate(self, request: Any) -> Any:
        raise AssertionError("StatusOnly does not generate")

    def status(self) -> Status:
        return self.st


def ring_status(**over: Any) -> Status:
    members = ring_members(dead=True)
    st = node_status(members, plan_of(members))
    stats = {**st.stats, "transport": {"drops": {"bad_mac": 3, "replay": 0, "overflow": 2}}}
    return dataclasses.replace(st, stats=stats, **over)


@pytest.fixture
async def served():
    """(backend, base url) of an ApiServer with an API key on loopback."""
    backend = StatusOnly(ring_status())
    server = ApiServer(backend, host="127.0.0.1", port=0, api_key=KEY)
    port = await server.start()
    yield backend, f"http://127.0.0.1:{port}"
    await server.close()


async def get(url: str, key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


# ------------------------------------------------------------------------------- serving
async def test_the_page_and_its_files_are_served_with_a_strict_policy(served) -> None:
    _, base = served
    status, headers, body = await get(base + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<script src="/dashboard/app.js"' in body
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    for name, kind in DASHBOARD_FILES.items():
        status, headers, body = await get(f"{base}/dashboard/{name}")
        pkg = Path(__file__).resolve().parents[2] / "ringd" / "net" / "dashboard" / name
        assert status == 200 and headers["Content-Type"].startswith(kind)
        assert body == pkg.read_bytes()
    # nothing but the page's own files: no path outside the folder, no other name
    for path in ("/dashboard/../api.py", "/dashboard/nope.js", "/dashboard/%2e%2e%2fapi.py"):
        status, _, body = await get(base + path)
        assert status in (401, 404) and b"def " not in body  # refused, never the file


async def test_only_the_static_files_go_without_the_key(served) -> None:
    _, base = served
    for path in ("/ringd/status", "/metrics", "/v1/models", "/healthz"):
        status, _, body = await get(base + path)
        assert status == 401, path
        assert json.loads(body)  # an error object, no data
        assert (await get(base + path, "wrong"))[0] == 401
        assert (await get(base + path, KEY))[0] == 200
    assert (await get(base + "/"))[0] == 200


async def test_metrics_expose_the_ring_requests_errors_drops_and_timings(served) -> None:
    backend, base = served
    async with aiohttp.ClientSession() as s:  # two refused requests, counted by code
        for _ in range(2):
            async with s.post(base + "/v1/chat/completions", data=b"[1]",
                              headers={"Authorization": f"Bearer {KEY}"}) as r:
                assert r.status == 400
    status, headers, body = await get(base + "/metrics", KEY)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}

    samples = [s for f in fams.values() for s in f.samples]

    def value(name: str, **labels: str) -> float:
        return next(s.value for s in samples
                    if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    st = backend.st
    assert value("ringd_ring_ready") == 1.0
    assert value("ringd_plan_epoch") == st.plan.epoch
    assert value("ringd_plan_stages") == len(st.plan.assignments)
    assert value("ringd_members", state="dead") == 1.0
    assert value("ringd_members", state="alive") == 4.0
    runner = st.stats["runner"]
    assert value("ringd_requests_total", outcome="served") == runner["requests_served"]
    assert value("ringd_frames_dropped_total", cause="bad_mac") == 3.0
    assert value("ringd_frames_dropped_total", cause="overflow") == 2.0
    assert value("ringd_api_errors_total", code="bad_request") == 2.0
    assert value("ringd_api_requests_total", route="/v1/chat/completions", status="400") == 2.0
    beta = TIMINGS["b2"]
    assert value("ringd_step_seconds", node="beta", kind="compute",
                 quantile="0.5") == pytest.approx(beta.compute_ms.p50 / 1000)
    assert value("ringd_step_seconds", node="beta", kind="compute",
                 quantile="0.99") == pytest.approx(beta.compute_ms.p99 / 1000)
    assert fams["ringd_step_seconds"].type == "summary"
    assert value("ringd_hop_rtt_seconds", node="gamma") == pytest.approx(
        TIMINGS["c3"].next_rtt_ms / 1000)
    assert value("ringd_peer_rtt_seconds", peer="beta") == pytest.approx(0.000314)
    assert fams["ringd_stage_compute_seconds"].type == "histogram"
    assert fams["ringd_link_rtt_seconds"].type == "histogram"


async def test_metrics_histograms_count_what_is_observed() -> None:
    server = ApiServer(StatusOnly(ring_status()), host="127.0.0.1", port=0)
    for s in (0.004, 0.004, 0.2):
        server.metrics.observe_compute(s)
    server.metrics.observe_link("beta", "eth0", 0.0003)
    fams = {f.name: f for f in text_string_to_metric_families(server.metrics.render().decode())}
    samples = {(s.name, s.labels.get("le")): s.value
               for s in fams["ringd_stage_compute_seconds"].samples}
    assert samples[("ringd_stage_compute_seconds_bucket", "0.005")] == 2.0
    assert samples[("ringd_stage_compute_seconds_bucket", "+Inf")] == 3.0
    assert samples[("ringd_stage_compute_seconds_sum", None)] == pytest.approx(0.208)
    link = {(s.name, s.labels.get("le")): s.value for s in fams["ringd_link_rtt_seconds"].samples}
    assert link[("ringd_link_rtt_seconds_count", None)] == 1.0


# ------------------------------------------------------------------------------- browser
async def test_the_page_draws_the_ring_and_follows_its_status() -> None:
    backend = StatusOnly(ring_status())
    server = ApiServer(backend, host="127.0.0.1", port=0)  # loopback: no key
    port = await server.start()
    st = backend.st
    names = {m.id: m.name for m in st.members}
    ring = [names[a.node_id] for a in st.plan.assignments]
    try:
        async with browser_page() as page:
            await page.goto(f"http://127.0.0.1:{port}/")
            await page.wait_for_selector("#ring g.node")
            assert await page.text_content("#ring-state") == "ring ready"
            drawn = await page.eval_on_selector_all(
                "#ring-nodes g.node", "gs => gs.map(g => g.dataset.node)")
            assert drawn == ring  # in ring order around the circle
            for a in st.plan.assignments:
                g = page.locator(f'#ring g.node[data-node="{names[a.node_id]}"]')
                text = await g.text_content()
                assert f"layers {a.start}-{a.end - 1} ({a.end - a.start})" in text
                assert "serving" in text
            links = await page.eval_on_selector_all(
                "#ring-links g.link", "gs => gs.map(g => [g.dataset.from, g.dataset.to, "
                "g.querySelector('text').textContent])")
            assert [(a, b) for a, b, _ in links] == list(zip(ring, ring[1:] + ring[:1]))
            assert links[2][2] == "0.9 ms"  # gamma -> alpha, as gamma gossips it
            slow = await page.get_attribute("#ring g.node.slowest", "data-node")
            assert slow == "beta"
            assert "slowest stage: beta" in await page.text_content("#slowest")
            assert st.fingerprint and st.fingerprint[:16] == await page.text_content(
                "#fingerprint")
            rows = await page.eval_on_selector_all(
                "#nodes tbody tr", "rs => rs.map(r => [r.dataset.node, r.textContent])")
            by = dict(rows)
            assert set(by) == {"alpha", "beta", "gamma", "delta", "epsilon"}
            assert "outside the plan" in by["delta"] and "dead" in by["epsilon"]
            assert "bridge0 (thunderbolt)" in by["beta"] and "pinned" in by["gamma"]
            # sizes: no horizontal scroll at a laptop's width
            assert await page.evaluate(
                "document.documentElement.scrollWidth <= window.innerWidth")
            assert await page.evaluate("(w => w.scrollWidth <= w.clientWidth)"
                                       "(document.querySelector('.table-wrap'))")
            await page.screenshot(path=str(artifact("dashboard-unit.png")), full_page=True)

            # the ring stops serving: the page says why at its next poll
            backend.st = dataclasses.replace(st, ready=False, fingerprint=None,
                                             reason="node gamma is gone: re-planning")
            await page.wait_for_selector("#ring-state[data-kind=notready]")
            assert "node gamma is gone: re-planning" in await page.text_content("#reason")
    finally:
        await server.close()


async def test_the_page_asks_for_the_key_once_per_tab(served) -> None:
    backend, base = served
    async with browser_page() as page:
        await page.goto(base + "/")
        await page.wait_for_selector("#key-dialog[open]")
        await page.fill("#key-input", "not-it")
        await page.click("#key-submit")
        await page.wait_for_selector("#key-dialog[open]")
        await page.wait_for_function(
            "() => document.querySelector('#key-error').textContent.includes('wrong API key')")
        await page.fill("#key-input", KEY)
        await page.click("#key-submit")
        await page.wait_for_selector("#ring g.node")
        assert not await page.is_visible("#key-dialog")
        assert await page.evaluate("sessionStorage.getItem('ringd.api_key')") == KEY
        await page.reload()  # the tab keeps it: no question again
        await page.wait_for_selector("#ring g.node")
        assert not await page.is_visible("#key-dialog")
        assert await page.evaluate("localStorage.length") == 0  # never beyond the tab
        other = await page.context.new_page()  # another tab asks again
        await other.goto(base + "/")
        await other.wait_for_selector("#key-dialog[open]")


async def test_chat_streams_what_the_api_answers(tiny_model_dir: Path, tmp_path: Path) -> None:
    backend = SoloBackend(tiny_model_dir, Settings(state_dir=tmp_path / "s",
                                                   model_store=tmp_path / "m", node_name="solo"))
    await backend.start()
    server = ApiServer(backend, host="127.0.0.1", port=0, api_key=KEY)
    port = await server.start()
    base = f"http://127.0.0.1:{port}"
    question = "What is the capital of France?"
    try:
        async with aiohttp.ClientSession() as s:  # the same request, not streamed
            async with s.post(base + "/v1/chat/completions", headers={
                    "Authorization": f"Bearer {KEY}"}, json={
                    "messages": [{"role": "user", "content": question}], "temperature": 0,
                    "max_tokens": 24}) as r:
                want = (await r.json())["choices"][0]["message"]["content"]
        assert want
        async with browser_page() as page:
            await page.goto(base + "/")
            await page.fill("#key-input", KEY)
            await page.click("#key-submit")
            await page.wait_for_selector("#ring g.node")
            await page.fill("#chat-max-tokens", "24")
            await page.fill("#chat-input", question)
            await page.press("#chat-input", "Enter")
            done = await page.wait_for_selector(".msg.assistant[data-state=done]")
            assert await done.eval_on_selector(".text", "e => e.textContent") == want
            assert int(await done.get_attribute("data-chunks") or 0) > 1  # streamed
            assert "tokens" in await done.eval_on_selector(".meta", "e => e.textContent")
            # the conversation goes on: the next request carries the answer as history
            await page.fill("#chat-input", "And of Italy?")
            await page.press("#chat-input", "Enter")
            await page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-state=done]")
    finally:
        await server.close()
        await backend.close()
