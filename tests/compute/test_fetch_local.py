"""The fetch pieces wired together in one process, as the daemon will wire them over TCP:
holders serve from their files (TensorSource), the transfer core decides who sends what,
the new node checks the manifest and small files in memory, then fills a shard directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx

from ringd.compute.engine import ShardEngine
from ringd.compute.manifest import load_manifest
from ringd.compute.model_info import inspect_model
from ringd.compute.shard_dir import ShardDir, manifest_sink, small_files, small_files_sink
from ringd.compute.tensor_source import TensorSource
from ringd.core.model_manifest import MANIFEST_KEY, ModelManifest
from ringd.core.transfer import (HolderRejected, ItemReceived, Transfer, TransferConfig,
                                 TransferDone)

CFG = TransferConfig(chunk_size=64 << 10, max_in_flight_per_peer=256 << 10,
                     max_in_flight=512 << 10)


def run(t: Transfer, sources: dict[str, TensorSource], sink: object,
        corrupt: dict[str, set[str]] | None = None) -> list[object]:
    """A stand-in adapter: requests answered at once, in order; events handled."""
    now, events = 0.0, []
    while not t.finished:
        reqs = t.requests_to_send(now)
        assert reqs or t.finished, t.stats(now)
        for r in reqs:
            data = sources[r.peer].read(r.key, r.offset, r.length)
            if r.key in (corrupt or {}).get(r.peer, ()):
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            now += 0.001
            if t.chunk_received(r.peer, r.key, r.offset, len(data), now):
                sink.write(r.key, r.offset, data)  # type: ignore[attr-defined]
            while (ev := t.next_event()) is not None:
                events.append(ev)
                if isinstance(ev, ItemReceived):
                    t.item_checked(ev.key, sink.finish(ev.key), now)  # type: ignore[attr-defined]
    return events


def test_a_new_node_fetches_its_layers_from_two_holders_one_of_them_lying(
        tiny_quantized_model_dir: Path, tmp_path: Path) -> None:
    full = tmp_path / "n1"
    shutil.copytree(tiny_quantized_model_dir, full)
    good = TensorSource(full)
    model_id = good.model_id
    # n2 holds layers 0-2 and the end... as a shard directory; it lies about one tensor
    n2 = tmp_path / "n2"
    m = good.manifest.model
    files = {f: (full / f).read_bytes() for f in m.files}
    with ShardDir.create(n2, m, files) as sd:
        names = m.tensors_for(0, 3)
        sd.plan(names)
        for n in names:
            sd.write(n, 0, good.read(n, 0, good.size(n)))
            assert sd.finish(n)
    liar = TensorSource(n2)
    sources = {"n1": good, "n2": liar}
    holdings = {"n1": good.ranges(), "n2": liar.ranges()}
    assert holdings == {"n1": [(0, 6)], "n2": [(0, 3)]}  # what each would gossip

    # 1. the manifest, checked against the model id gossiped
    t = Transfer({MANIFEST_KEY: good.size(MANIFEST_KEY)}, now=0.0, config=CFG)
    t.set_holder("n1", {MANIFEST_KEY}, 0.0)
    ms = manifest_sink(model_id, good.size(MANIFEST_KEY))
    assert isinstance(run(t, sources, ms)[-1], TransferDone)
    model = ModelManifest.from_bytes(ms.data(MANIFEST_KEY), expect_id=model_id)
    # 2. config and tokenizer, checked against the manifest; the directory appears whole
    fs = small_files_sink(model)
    keys = model.item_sizes(model.holdings([]))
    t = Transfer(keys, now=0.0, config=CFG)
    for peer, ranges in holdings.items():
        t.set_holder(peer, model.holdings(ranges), 0.0)
    run(t, sources, fs)
    dest = tmp_path / "n3"
    sd = ShardDir.create(dest, model, small_files(fs, model))
    # 3. the tensors of layers 1-2 from both holders; n2 serves wrong bytes: named, n1 serves
    want = model.tensors_for(1, 3)
    sd.plan(want)
    t = Transfer(model.item_sizes(want), sd.present(), now=0.0, config=CFG)
    for peer, ranges in holdings.items():
        t.set_holder(peer, model.holdings(ranges), 0.0)
    events = run(t, sources, sd, corrupt={"n2": set(want)})
    stats = t.stats(1.0)
    assert isinstance(events[-1], TransferDone) and stats.done_bytes == model.shard_bytes(1, 3)
    rejected = [e for e in events if isinstance(e, HolderRejected)]
    assert [r.peer for r in rejected] == ["n2"] and stats.rejected == ("n2",)
    peers = {p.peer: p for p in stats.peers}
    assert peers["n2"].bytes > 0 and peers["n2"].items_done == 0 and stats.wasted_bytes > 0
    assert peers["n1"].items_done == len(want)
    sd.close()
    on_disk = sum(p.stat().st_size for p in dest.glob("*.safetensors"))
    assert model.shard_bytes(1, 3) <= on_disk < model.shard_bytes(1, 3) + 8192
    assert load_manifest(dest).model_id == model_id and inspect_model(dest).holds(1, 3)
    a, b = ShardEngine.load(full, 1, 3, cpu_split=1), ShardEngine.load(dest, 1, 3, cpu_split=1)
    first = ShardEngine.load(full, 0, 1, cpu_split=1)
    for e in (a, b, first):
        e.new_request("r")
    x = first.forward("r", mx.array([3, 14, 15, 92], dtype=mx.int32))
    assert mx.array_equal(a.forward("r", x), b.forward("r", x))
