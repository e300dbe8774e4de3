"""Issue 6 on rings of real daemons: every token went through every layer, or no token at all.

Broken rings are built honestly: real processes, one of them misbehaving through the
test-only fault hook (``RINGD_TEST_FAULT``, read in :mod:`ringd.compute.stage`) or holding a
model copy whose layer file was overwritten. Each must end in a clear error naming the node,
never a token; ``ringctl verify`` passes on a healthy ring (tiny and default model) and
locates the divergence on a ring whose node skips its layers while claiming to run them.

Node ids are written into the state directories first: the ring order follows the ids, so
with memory in the ratio 1:2:3 the six-layer tiny model splits as node1 [0, 1),
node2 [1, 3), node3 [3, 6).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

from ringd.cli.proof import bench, verify
from ringd.cli.ring import status as status_cmd
from ringd.compute.manifest import MANIFEST_FILE, tensor_spans
from ringd.compute.model_info import inspect_model
from ringd.core.proof import parse_fingerprint
from ringd.errors import RequestError
from ringd.localring import LocalRing
from tests.integration.rings import RING_ARGS, need_bytes, stream

SPANS = {"node1": (0, 1), "node2": (1, 3), "node3": (3, 6)}
PROMPT = "What is the capital of France?"


def _ids(base: Path, names: list[str], first: int = 1) -> None:
    for i, name in enumerate(names, first):
        d = base / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "node_id").write_text(f"{i:016x}\n")


def make_ring(model_dir: Path, base: Path, *, fault: str | None = None) -> LocalRing:
    """A started ring of three, memory 1:2:3, fixed node ids; ``fault``: ``RINGD_TEST_FAULT``."""
    unit = int(need_bytes(model_dir) * 1.5 / 6) + 1
    ring = LocalRing(base, [unit, 2 * unit, 3 * unit], model_dir.name, model_dir.parent,
                     extra_args=RING_ARGS, env={"RINGD_TEST_FAULT": fault} if fault else {})
    _ids(base, ["node1", "node2", "node3"])
    ring.start()
    return ring


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def run_cli(cmd: Any, *args: str) -> Any:
    return CliRunner().invoke(cmd, list(args), catch_exceptions=False)


def run_verify(ring: LocalRing, node: int, model_dir: Path, *args: str) -> Any:
    """``ringctl verify`` against ring.nodes[node], the reference from ``model_dir``'s store."""
    return run_cli(verify, "--port", str(ring.nodes[node].http_port),
                   "--store", str(model_dir.parent), *args)


def refused(ring: LocalRing, node: int) -> RequestError:
    """The error a prompt entering at ring.nodes[node] ends with; fails if any token came out."""
    with pytest.raises(RequestError) as e:
        events = stream(ring.nodes[node].client, prompt=PROMPT, max_tokens=8)
        pytest.fail(f"a broken ring produced tokens: {events}")
    return e.value


@pytest.fixture
def stopped_cleanly():
    rings: list[LocalRing] = []
    yield rings.append
    for ring in rings:
        codes = ring.stop()
        assert all(c == 0 for c in codes), f"daemons did not stop cleanly: {codes}"


# ----------------------------------------------------------------------------- healthy
@pytest.fixture
def tiny(tiny_quantized_model_dir: Path) -> Path:
    return tiny_quantized_model_dir


def test_healthy_ring_fingerprint_ceiling_verify_and_bench(tiny: Path, tmp_path: Path,
                                                           stopped_cleanly) -> None:
    ring = make_ring(tiny, tmp_path / "ring")
    stopped_cleanly(ring)
    statuses = ring.wait_ready(90)
    # one ring fingerprint, the same on every node; each member's covers its own layers
    rings = {s["fingerprint"] for s in statuses}
    assert len(rings) == 1 and len(rings.pop() or "") == 32
    for m in statuses[0]["members"]:
        assert parse_fingerprint(m["fingerprint"])[:2] == SPANS[m["name"]]  # type: ignore[index]
        assert m["memory_bandwidth"] > 0
    ceiling = statuses[0]["ceiling"]
    assert ceiling["single_stream_tps"] > 0 and ceiling["missing_bandwidth"] == []
    agg = ceiling["aggregate_tps"]
    assert agg["8"] >= agg["3"] >= ceiling["single_stream_tps"]
    port = str(ring.nodes[0].http_port)
    out = run_cli(status_cmd, "--port", port).output
    assert f"ring fingerprint: {statuses[0]['fingerprint']}" in out and "ceiling:" in out

    with pytest.raises(RequestError, match="steps must be 1..32"):
        ring.nodes[0].client.post_json("/ringd/verify", {"prompt": "x", "steps": 99}, 10.0)
    res = run_verify(ring, 0, tiny, "--steps", "6")
    assert res.exit_code == 0 and "match: max |logit difference| 0 " in res.output, res.output
    assert "node1 layers 0-0, node2 layers 1-2, node3 layers 3-5" in res.output

    res = run_cli(bench, "--port", str(ring.nodes[2].http_port), "--tokens", "24", "--json")
    assert res.exit_code == 0, res.output
    b = json.loads(res.output)
    rate = b["per_stream_tps"][0]
    assert b["verdicts"] == {"fastest stream": "ok"} and 0 < rate < b["ceiling_single_tps"]
    # the bottleneck named, from the timings every node gossips
    split = b["breakdown"]
    assert split["line"].startswith("bottleneck: ") and "per token" in split["line"]
    assert b["efficiency"] == pytest.approx(rate / b["ceiling_single_tps"])
    assert split["ms_per_token"] == pytest.approx(1000 / rate)
    after = ring.nodes[2].client.status()["ceiling"]
    assert after["measured_tps"] == pytest.approx(rate) and after["verdict"] == "ok"
    assert "last measured:" in run_cli(status_cmd, "--port", str(ring.nodes[2].http_port)).output


# ----------------------------------------------------------------------------- broken at run time
def test_a_node_that_skips_its_layers_is_caught_by_the_next(tiny: Path, tmp_path: Path,
                                                            stopped_cleanly) -> None:
    ring = make_ring(tiny, tmp_path / "ring", fault="node2:skip-layers")
    stopped_cleanly(ring)
    ring.wait_ready(90)
    for entry in range(3):
        e = refused(ring, entry)
        assert e.code == "coverage", e
        assert "node3" in e.message and "[0, 1)" in e.message, e.message
        assert "gap, layers [1, 3) (owned by node2" in e.message, e.message
    assert ring.nodes[2].client.status()["stats"]["runner"]["coverage_errors"] == 3
    res = run_verify(ring, 0, tiny)
    assert res.exit_code == 1 and "mismatch: the ring failed the request" in res.output, res.output
    assert "owned by node2" in res.output


def test_verify_locates_a_node_that_claims_layers_it_skipped(tiny: Path, tmp_path: Path,
                                                            stopped_cleanly) -> None:
    # identity layers standing in for loaded ones: the coverage proof cannot see a liar,
    # the logits can
    ring = make_ring(tiny, tmp_path / "ring", fault="node2:identity-layers")
    stopped_cleanly(ring)
    ring.wait_ready(90)
    res = run_verify(ring, 2, tiny)
    assert res.exit_code == 1, res.output
    assert "mismatch: max |logit difference|" in res.output
    assert "divergence starts at step 0 (the first token after the prompt" in res.output
    assert "nodes involved: node1 layers 0-0, node2 layers 1-2, node3 layers 3-5" in res.output


def test_a_node_on_a_stale_plan_fails_the_request(tiny: Path, tmp_path: Path,
                                                  stopped_cleanly) -> None:
    ring = make_ring(tiny, tmp_path / "ring", fault="node2:stale-epoch")
    stopped_cleanly(ring)
    statuses = ring.wait_ready(90)
    epoch = statuses[0]["plan"]["epoch"]
    for entry in (0, 2):
        e = refused(ring, entry)
        assert e.code == "coverage", e
        assert f"sent an activation of plan epoch {epoch} to node node2" in e.message, e.message
        assert f"which serves epoch {epoch - 1}" in e.message
    # node2's own requests carry its stale epoch: the next node's transport drops the
    # activation and tells node2 why at once (before, the request waited out request_timeout)
    e = refused(ring, 1)
    assert e.code == "coverage", e
    assert f"sent an activation of plan epoch {epoch - 1} to node node" in e.message, e.message
    assert e.message.count("node2") == 1 and f"which serves epoch {epoch}" in e.message


# ----------------------------------------------------------------------------- refused at load time
def test_a_node_that_loaded_fewer_layers_refuses_to_serve(tiny: Path, tmp_path: Path,
                                                          stopped_cleanly) -> None:
    ring = make_ring(tiny, tmp_path / "ring", fault="node2:gap")
    stopped_cleanly(ring)
    def reasons() -> list[str] | None:
        sts = ring.statuses()
        got = [s["reason"] or "" if s and not s["ready"] else "" for s in sts]
        return got if all("the shard assigned layers [1, 3) loaded" in r for r in got) else None

    node1, node2, node3 = wait_for("node2 to refuse, and the others to say so", reasons)
    assert node2.startswith("loading failed on this node: the shard assigned layers [1, 3) loaded")
    assert "missing" in node2 and "model.layers.2." in node2
    assert node1.startswith("node node2 refuses to serve: the shard assigned layers [1, 3)")
    for entry in range(3):
        e = refused(ring, entry)
        assert e.code == "not_ready", e
    assert all(not s["ready"] for s in ring.statuses())


def test_a_node_with_a_wrong_layer_file_keeps_the_ring_from_serving(tiny: Path, tmp_path: Path,
                                                                   stopped_cleanly) -> None:
    # node3's copy of the model has layer 3's bytes where layer 4's down projection belongs
    md = tiny
    info = inspect_model(md)
    wrong = tmp_path / "store-b" / md.name
    shutil.copytree(md, wrong, ignore=shutil.ignore_patterns(MANIFEST_FILE))
    a, b = "model.layers.4.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"
    path, src = wrong / info.tensor_index[a].file, wrong / info.tensor_index[b].file
    (a0, a1), (b0, b1) = tensor_spans(path)[a], tensor_spans(src)[b]
    raw = bytearray(path.read_bytes())
    raw[a0:a1] = src.read_bytes()[b0:b1]
    path.write_bytes(bytes(raw))

    unit = int(need_bytes(md) * 1.5 / 6) + 1
    good = LocalRing(tmp_path / "a", [unit, 2 * unit], md.name, md.parent, extra_args=RING_ARGS)
    _ids(good.base, ["node1", "node2"])
    good.start()
    stopped_cleanly(good)
    peers = tuple(f"--peer=127.0.0.1:{n.port}" for n in good.nodes)
    bad = LocalRing(tmp_path / "b", [3 * unit], md.name, wrong.parent,
                    extra_args=RING_ARGS + peers + ("--node-name=node3",))
    _ids(bad.base, ["node1"], first=3)
    (bad.base).mkdir(parents=True, exist_ok=True)
    shutil.copy(good.base / "cluster.key", bad.base / "cluster.key")
    bad.start()
    stopped_cleanly(bad)

    # its model is not the others' model: its manifest (hence its model id) differs, so the
    # ring sees two models under one name and names the nodes holding each, on every node
    def refusals() -> list[str] | None:
        sts = good.statuses() + bad.statuses()
        reasons = [s["reason"] if s and not s["ready"] else "" for s in sts]
        return reasons if all("nodes hold different models named" in r for r in reasons) \
            else None

    for reason in wait_for("every node to refuse", refusals, 90):
        assert "on node1, node2" in reason and "on node3" in reason, reason
        assert "remove the wrong one with `ringctl model rm`" in reason
    for entry in (good, bad):
        assert refused(entry, 0).code == "not_ready"


# ----------------------------------------------------------------------------- the default model
@pytest.mark.slow
def test_verify_passes_on_the_default_model(default_model_dir: Path, tmp_path: Path,
                                            stopped_cleanly) -> None:
    ring = make_ring(default_model_dir, tmp_path / "ring")
    stopped_cleanly(ring)
    statuses = ring.wait_ready(180)
    assert len({s["fingerprint"] for s in statuses}) == 1
    res = run_verify(ring, 1, default_model_dir, "--block-bytes", "40MB")  # 30 layers in blocks
    assert res.exit_code == 0 and "\nmatch: max |logit difference|" in res.output, res.output
    assert res.output.count("reference: layers") > 2, res.output
