"""Weights reach the nodes from one place (issue 14), with real daemons on loopback.

Only some nodes start with the model in their store; the others fetch exactly the tensors
of their layers from them (checked against the manifest), and the ring answers as mlx-lm
does in one process. Fixed node ids and budgets make the plans known in advance.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

from click.testing import CliRunner

from ringd.cli import main as ringctl
from ringd.compute.manifest import load_manifest, write_manifest
from ringd.compute.model_info import inspect_model, read_safetensors_header
from ringd.compute.tokenizer import Tokenizer
from ringd.localring import LocalRing
from tests.integration.rings import (RING_ARGS, need_bytes, reference_tokens, stream, token_ids,
                                     without_eos)

PROMPT = "What is the capital of France?"


def ids(base: Path, n: int) -> None:
    """Node ids 1..n in node order, so the plan orders nodes as they are numbered."""
    for i in range(1, n + 1):
        d = base / f"node{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "node_id").write_text(f"{i:016x}\n")


def ring_of(base: Path, model_dir: Path, stores: list[Path], ratios: list[int], *,
            env: dict[str, str] | None = None, model: str | None = None) -> LocalRing:
    for s in stores:
        s.mkdir(parents=True, exist_ok=True)
    unit = int(need_bytes(model_dir) * 1.5 / sum(ratios)) + 1
    ring = LocalRing(base, [unit * r for r in ratios], model or model_dir.name, stores[0],
                     stores=stores, extra_args=RING_ARGS, env=env or {})
    ids(base, len(ratios))
    return ring


def copy_model(model_dir: Path, store: Path, name: str | None = None) -> Path:
    """A whole copy of the model in ``store``, its manifest written (as `model import` does)."""
    dest = store / (name or model_dir.name)
    shutil.copytree(model_dir, dest)
    write_manifest(dest)
    return dest


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def layers_of(status: dict[str, Any]) -> tuple[int, int]:
    me = next(m for m in status["members"] if m["self"])
    return tuple(me["layers"])  # type: ignore[return-value]


def tensors_on_disk(model_dir: Path) -> dict[str, int]:
    """Tensor name -> bytes, of every tensor in the directory's safetensors files."""
    out: dict[str, int] = {}
    for f in model_dir.glob("*.safetensors"):
        out.update((k, e.nbytes) for k, e in read_safetensors_header(f).items())
    return out


def fetched(status: dict[str, Any]) -> dict[str, Any]:
    return status["stats"]["fetch"]


def check_answers(ring: LocalRing, model_dir: Path, max_tokens: int = 16) -> None:
    tok = Tokenizer.load(model_dir)
    want = reference_tokens(model_dir, tok.encode(PROMPT), max_tokens)
    for node in ring.nodes:  # any node can be the entry, the fetching ones included
        events = stream(node.client, prompt=PROMPT, max_tokens=max_tokens, temperature=0.0)
        assert without_eos(token_ids(events), tok.eos_token_ids) == want


# ----------------------------------------------------------------------------- tests
def test_nodes_with_empty_stores_fetch_only_their_layers(tmp_path, tiny_quantized_model_dir):
    stores = [tmp_path / f"store{i}" for i in (1, 2, 3)]
    stores[0].mkdir(parents=True)
    copy_model(tiny_quantized_model_dir, stores[0])
    ring = ring_of(tmp_path / "ring", tiny_quantized_model_dir, stores, [1, 2, 3])
    ring.start()
    try:
        sts = ring.wait_ready(120)
        model = load_manifest(stores[0] / tiny_quantized_model_dir.name).model
        for i in (1, 2):  # node2 and node3 held nothing
            start, end = layers_of(sts[i])
            on_disk = tensors_on_disk(stores[i] / tiny_quantized_model_dir.name)
            want = model.tensors_for(start, end)
            assert sorted(on_disk) == want, (i, start, end)  # exactly its layers' tensors
            assert sum(on_disk.values()) == sum(model.tensors[n].size for n in want)
            assert sum(on_disk.values()) < model.total_bytes
            f = fetched(sts[i])
            assert f["state"] == "done" and f["done_bytes"] == sum(on_disk.values())
            assert f["present_bytes"] == 0 and f["peers"][0]["bytes"] > 0
        check_answers(ring, tiny_quantized_model_dir)
        # status shows which bytes the ring serves
        assert {s["model"]["model_id"] for s in ring.statuses()} == {model.model_id}
    finally:
        assert ring.stop() == [0, 0, 0]


def test_a_node_killed_mid_fetch_resumes_without_fetching_again(tmp_path,
                                                              tiny_quantized_model_dir):
    stores = [tmp_path / "store1", tmp_path / "store2"]
    stores[0].mkdir(parents=True)
    copy_model(tiny_quantized_model_dir, stores[0])
    # node1 serves slowly (a slow disk), so node2 can be killed while it fetches
    ring = ring_of(tmp_path / "ring", tiny_quantized_model_dir, stores, [1, 3],
                   env={"RINGD_TEST_FAULT": "node1:slow-serve"})
    ring.start()
    try:
        node2 = ring.nodes[1]

        def midway() -> bool:
            st = ring.statuses()[1]
            f = st and st["stats"].get("fetch")
            return bool(f and (f.get("fetching") or "").startswith("layers")
                        and 0 < f["done_bytes"] < f["total_bytes"])

        wait_for("node2 to be midway through its fetch", midway)
        assert ring.kill(node2) == -signal.SIGKILL
        ring.start_node(node2)
        sts = ring.wait_ready(120)
        f = fetched(sts[1])
        start, end = layers_of(sts[1])
        model = load_manifest(stores[0] / tiny_quantized_model_dir.name).model
        need = sum(model.tensors[n].size for n in model.tensors_for(start, end))
        # what was checked before the kill counts: only the rest came over again
        assert f["state"] == "done" and f["present_bytes"] > 0
        assert f["total_bytes"] + f["present_bytes"] == need and f["total_bytes"] < need
        check_answers(ring, tiny_quantized_model_dir, max_tokens=8)
    finally:
        ring.stop()


def corrupt(model_dir: Path, names: list[str]) -> None:
    """Flip a byte of each tensor on disk, keeping the files' size and mtime (silent rot)."""
    info = inspect_model(model_dir)
    for name in names:
        entry = info.tensor_index[name]
        path = model_dir / entry.file  # type: ignore[operator]
        st = os.stat(path)
        offset = read_safetensors_header(path)[name].offset
        with open(path, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0xFF]))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_holder_that_serves_wrong_bytes_is_named_and_not_used(tmp_path,
                                                               tiny_quantized_model_dir):
    name = tiny_quantized_model_dir.name
    stores = [tmp_path / f"store{i}" for i in (1, 2, 3)]
    for s in stores[:2]:
        s.mkdir(parents=True)
        copy_model(tiny_quantized_model_dir, s)
    model = load_manifest(stores[0] / name).model
    # node3 (3 of 6 shares) gets the last layers: every tensor of them is wrong on node1
    corrupt(stores[0] / name, model.tensors_for(3, 6))
    ring = ring_of(tmp_path / "ring", tiny_quantized_model_dir, stores, [1, 2, 3])
    ring.start()
    try:
        sts = ring.wait_ready(120)
        assert layers_of(sts[2]) == (3, 6)
        f = fetched(sts[2])
        assert f["state"] == "done" and f["rejected"] == [f"{1:016x}"]
        assert f["wasted_bytes"] > 0
        res = CliRunner().invoke(ringctl, ["status", "--port", str(ring.nodes[2].http_port)])
        assert "not used any more (served wrong bytes): node1 (" in res.output, res.output
        check_answers(ring, tiny_quantized_model_dir, max_tokens=8)
    finally:
        ring.stop()


def test_with_no_good_holder_the_ring_does_not_serve_and_says_why(tmp_path,
                                                                 tiny_quantized_model_dir):
    name = tiny_quantized_model_dir.name
    stores = [tmp_path / "store1", tmp_path / "store2"]
    stores[0].mkdir(parents=True)
    copy_model(tiny_quantized_model_dir, stores[0])
    model = load_manifest(stores[0] / name).model
    bad = model.group_tensors(3)[0]  # node2 (2 of 3 shares) loads layers 2-5
    corrupt(stores[0] / name, [bad])
    ring = ring_of(tmp_path / "ring", tiny_quantized_model_dir, stores, [1, 2])
    ring.start()
    try:
        def refused() -> str | None:
            st = ring.statuses()[0]
            reason = st and st.get("reason") or ""
            return reason if "do not match its manifest" in reason else None

        reason = wait_for("the ring to say why it does not serve", refused)
        assert f"node node1 served bytes of {bad} that do not match" in reason, reason
        assert all(n.alive() for n in ring.nodes)
        assert not any(s and s["ready"] for s in ring.statuses())
    finally:
        assert ring.stop() == [0, 0]


def test_a_node_joining_later_makes_others_fetch_only_the_delta(tmp_path,
                                                              tiny_quantized_model_dir):
    name = tiny_quantized_model_dir.name
    stores = [tmp_path / f"store{i}" for i in (1, 2, 3)]
    stores[0].mkdir(parents=True)
    copy_model(tiny_quantized_model_dir, stores[0])
    ring = ring_of(tmp_path / "ring", tiny_quantized_model_dir, stores, [3, 3, 2])
    ring.start(count=2)  # node3 joins later
    try:
        first = ring.wait_ready(120)
        a1 = layers_of(first[1])
        ring.start_node(ring.nodes[2])
        def three() -> list[dict[str, Any]] | None:
            sts = ring.statuses()
            ok = all(s and s["ready"] and len(s["plan"]["assignments"]) == 3 for s in sts)
            return sts if ok else None  # type: ignore[return-value]

        again = wait_for("the ring of three", three)
        a2 = layers_of(again[1])
        assert a2 != a1
        model = load_manifest(stores[0] / name).model
        held = set(model.tensors_for(*a1))
        delta = [n for n in model.tensors_for(*a2) if n not in held]
        f = fetched(again[1])
        assert f["total_bytes"] == sum(model.tensors[n].size for n in delta)
        assert f["present_bytes"] == sum(model.tensors[n].size
                                         for n in model.tensors_for(*a2) if n in held)
        check_answers(ring, tiny_quantized_model_dir, max_tokens=8)
    finally:
        ring.stop()


def test_model_use_switches_the_ring_to_another_model(tmp_path, tiny_model_dir,
                                                    tiny_quantized_model_dir):
    stores = [tmp_path / f"store{i}" for i in (1, 2, 3)]
    stores[0].mkdir(parents=True)
    copy_model(tiny_quantized_model_dir, stores[0])
    copy_model(tiny_model_dir, stores[0])
    ring = ring_of(tmp_path / "ring", tiny_model_dir, stores, [1, 2, 3],
                   model=tiny_quantized_model_dir.name)
    ring.start()
    try:
        sts = ring.wait_ready(120)
        assert {s["model"]["name"] for s in sts} == {tiny_quantized_model_dir.name}
        port = str(ring.nodes[2].http_port)
        res = CliRunner().invoke(ringctl, ["model", "use", tiny_model_dir.name, "--port", port])
        assert res.exit_code == 0, res.output
        wait_for("every node to serve the new model", lambda: all(
            s and s["ready"] and s["model"]["name"] == tiny_model_dir.name
            for s in ring.statuses()))
        check_answers(ring, tiny_model_dir, max_tokens=8)
        res = CliRunner().invoke(ringctl, ["model", "use", "no-such-model", "--port", port])
        assert res.exit_code != 0 and "no node of the ring holds a model named" in res.output
    finally:
        ring.stop()
