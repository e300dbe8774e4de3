"""The dashboard of a real three-node ring in a real browser (Debian's chromium through
Playwright): every node drawn with its layers, a chat answer streamed identical to
``ringctl prompt``'s, the page following a node that leaves. Keeps a screenshot
(``build/test-artifacts/dashboard.png``; ``docs/dashboard.png`` is one)."""

from __future__ import annotations

import signal
from pathlib import Path

from click.testing import CliRunner

from ringd.cli.ring import layers_text, prompt
from tests.browser import artifact, browser_page_sync
from tests.integration.rings import ring_for

QUESTION = "What is the capital of France?"


def test_dashboard_of_a_real_ring(tiny_quantized_model_dir: Path, tmp_path: Path) -> None:
    # memory 1:2:3, three times what the model needs: two nodes still hold it
    ring = ring_for(tiny_quantized_model_dir, tmp_path / "ring", (1, 2, 3), slack=3.0)
    ring.start()
    try:
        statuses = ring.wait_ready(90)
        entry = ring.nodes[0]
        st = statuses[0]
        names = {m["id"]: m["name"] for m in st["members"]}
        stages = [(names[a["node_id"]], (a["start"], a["end"])) for a in st["plan"]["assignments"]]
        assert len(stages) == 3

        # the answer ringctl prompt gives (greedy, its default max tokens)
        r = CliRunner().invoke(prompt, ["--port", str(entry.http_port), QUESTION],
                               env={"RINGD_CONFIG": ""})
        assert r.exit_code == 0, r.output
        want = r.stdout

        with browser_page_sync() as page:
            page.goto(f"http://127.0.0.1:{entry.http_port}/")
            page.wait_for_selector("#ring-state[data-kind=ready]")
            drawn = page.eval_on_selector_all("#ring-nodes g.node",
                                              "gs => gs.map(g => g.dataset.node)")
            assert drawn == [name for name, _ in stages]  # every node, in ring order
            for name, layers in stages:
                text = page.text_content(f'#ring g.node[data-node="{name}"]') or ""
                assert f"layers {layers_text(layers)}" in text and "serving" in text
            assert page.eval_on_selector_all("#ring-links g.link", "gs => gs.length") == 3

            page.fill("#chat-input", QUESTION)
            page.press("#chat-input", "Enter")
            done = page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120_000)
            assert done is not None
            got = done.eval_on_selector(".text", "e => e.textContent")
            assert int(done.get_attribute("data-chunks") or 0) > 1  # it streamed
            # ringctl prompt ends what it prints with a newline
            assert got + ("" if got.endswith("\n") else "\n") == want
            page.wait_for_function(  # the links' round trips are measured by now
                "() => [...document.querySelectorAll('#ring-links text')]"
                ".every(t => t.textContent.endsWith(' ms') && !t.textContent.startsWith('?'))")
            page.screenshot(path=str(artifact("dashboard.png")))

            # a node leaves: the page shows it gone and the ring re-formed without it
            leaving = ring.nodes[2]
            assert ring.kill(leaving, signal.SIGTERM) == 0
            page.wait_for_selector(f'#nodes tr[data-node="{leaving.name}"][data-state=left]',
                                   timeout=60_000)
            page.wait_for_function(
                "() => document.querySelectorAll('#ring-nodes g.node').length === 2 && "
                "document.querySelector('#ring-state').dataset.kind === 'ready'",
                timeout=90_000)
            left = page.eval_on_selector_all("#ring-nodes g.node",
                                             "gs => gs.map(g => g.dataset.node)")
            assert leaving.name not in left
            page.screenshot(path=str(artifact("dashboard-after-leave.png")))
    finally:
        codes = ring.stop()
    assert codes[:2] == [0, 0], codes
