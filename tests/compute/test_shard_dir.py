"""Serving tensors from a holder's files, and shard directories filled with checked tensors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from ringd.compute import shard_dir as sdm
from ringd.compute.engine import ShardEngine
from ringd.compute.manifest import load_manifest
from ringd.compute.model_info import inspect_model
from ringd.compute.shard_dir import (PARTIAL, ShardDir, manifest_sink, small_files,
                                     small_files_sink)
from ringd.compute.tensor_source import MAX_CHUNK, NotHeld, TensorSource
from ringd.core.model_manifest import MANIFEST_KEY, ModelManifest, blake2b_hex, file_key
from ringd.errors import LocalProtocolError, ModelError, RemoteProtocolError

CHUNK = 4093  # odd on purpose: chunks never line up with tensor boundaries


@pytest.fixture(params=["float", "quantized"])
def full_dir(request: pytest.FixtureRequest, tiny_model_dir: Path,
             tiny_quantized_model_dir: Path, tmp_path: Path) -> Path:
    src = tiny_model_dir if request.param == "float" else tiny_quantized_model_dir
    out = tmp_path / "full"
    shutil.copytree(src, out)
    return out


@pytest.fixture
def source(full_dir: Path) -> TensorSource:
    with TensorSource(full_dir) as s:
        yield s  # type: ignore[misc]


def fetch_small(src: TensorSource) -> tuple[ModelManifest, dict[str, bytes]]:
    """What a new node does first: the manifest (checked against the id), then the files."""
    ms = manifest_sink(src.model_id, src.size(MANIFEST_KEY))
    ms.write(MANIFEST_KEY, 0, src.read(MANIFEST_KEY, 0, src.size(MANIFEST_KEY)))
    assert ms.finish(MANIFEST_KEY)
    model = ModelManifest.from_bytes(ms.data(MANIFEST_KEY), expect_id=src.model_id)
    fs = small_files_sink(model)
    for name in model.files:
        key = file_key(name)
        for off in range(0, src.size(key), CHUNK):
            fs.write(key, off, src.read(key, off, min(CHUNK, src.size(key) - off)))
        assert fs.finish(key)
    return model, small_files(fs, model)


def fill(src: TensorSource, sd: ShardDir, names: list[str]) -> int:
    """Copy tensors chunk by chunk, as peers would send them; returns the bytes moved."""
    moved = 0
    for name in names:
        size = src.size(name)
        for off in range(0, size, CHUNK):
            data = src.read(name, off, min(CHUNK, size - off))
            sd.write(name, off, data)
            moved += len(data)
        assert sd.finish(name), name
    return moved


def new_shard(src: TensorSource, dest: Path) -> ShardDir:
    model, files = fetch_small(src)
    return ShardDir.create(dest, model, files)


# ----------------------------------------------------------------------------- serving
def test_the_source_serves_every_item_in_chunks_without_mlx(source: TensorSource) -> None:
    model = source.manifest.model
    assert source.keys() == set(model.tensors) | {file_key(f) for f in model.files} | {
        MANIFEST_KEY}
    for name, spec in model.tensors.items():
        data = b"".join(source.read(name, o, min(CHUNK, spec.size - o))
                        for o in range(0, spec.size, CHUNK))
        assert len(data) == spec.size and blake2b_hex(data) == spec.hash, name
    for name in model.files:
        key = file_key(name)
        assert source.read(key, 0, source.size(key)) == (source.path / name).read_bytes()
    assert source.ranges() == [(0, model.num_layers)]
    code = ("import sys; from ringd.compute.tensor_source import TensorSource; "
            f"s = TensorSource(__import__('pathlib').Path({str(source.path)!r})); "
            "s.read('model.norm.weight', 0, 8); "
            "assert not any(m == 'mlx' or m.startswith('mlx.') for m in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("key, offset, length", [
    ("../config.json", 0, 10), ("file:../../etc/passwd", 0, 10), ("file:/etc/passwd", 0, 1),
    ("model.layers.99.mlp.up_proj.weight", 0, 8), ("model.norm.weight", -1, 8),
    ("model.norm.weight", 0, 0), ("model.norm.weight", 0, 10**9), ("model.norm.weight", 500, 64),
    ("manifest", 0, MAX_CHUNK + 1),
])
def test_bad_requests_are_the_peers_fault(source: TensorSource, key: str, offset: int,
                                          length: int) -> None:
    with pytest.raises(RemoteProtocolError):
        source.read(key, offset, length)


def test_a_file_changed_since_its_hashes_is_not_served(source: TensorSource) -> None:
    name = source.manifest.model.tensors_for(1, 2)[0]
    f = source.path / str(inspect_model(source.path).tensor_index[name].file)
    source.read(name, 0, 8)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ModelError, match="changed since"):
        source.read(name, 0, 8)


# ----------------------------------------------------------------------------- shard dirs
def test_layers_2_to_4_from_a_shard_dir_compute_what_the_full_dir_computes(
        source: TensorSource, tmp_path: Path) -> None:
    full = source.path
    with new_shard(source, tmp_path / "store" / "part") as sd:
        model = sd.model
        names = model.tensors_for(2, 4)
        assert sd.plan(names) == model.shard_bytes(2, 4)
        assert fill(source, sd, names) == model.shard_bytes(2, 4)
        assert sd.ranges() == [(2, 4)] and sd.missing(names) == []
    part = tmp_path / "store" / "part"
    weights = sorted(p.name for p in part.glob("*.safetensors"))
    assert weights == ["model-layer-00002.safetensors", "model-layer-00003.safetensors"]
    on_disk = sum((part / w).stat().st_size for w in weights)
    assert model.shard_bytes(2, 4) <= on_disk <= model.shard_bytes(2, 4) + 2 * 4096
    index = json.loads((part / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == names
    assert [p.name for p in (part / PARTIAL).iterdir() if p.suffix == ".safetensors"] == []

    info = inspect_model(part)
    assert info.partial and info.holds(2, 4) and not info.holds(1, 3)
    assert info.complete_ranges() == [(2, 4)] and info.local_bytes == model.shard_bytes(2, 4)
    a = ShardEngine.load(full, 2, 4, cpu_split=1)
    b = ShardEngine.load(part, 2, 4, cpu_split=1)
    assert a.tensor_names == b.tensor_names
    m = load_manifest(part)
    assert m.kind == "shard" and m.model_id == source.model_id
    assert m.fingerprint(2, 4, b.tensor_names) == load_manifest(full).expected(None, 2, 4)
    first = ShardEngine.load(full, 0, 2, cpu_split=1)
    for e in (a, b, first):
        e.new_request("r")
    x = first.forward("r", mx.array([5, 17, 42, 99, 100, 3], dtype=mx.int32))
    for _ in range(3):
        ya, yb = a.forward("r", x), b.forward("r", x)
        assert mx.array_equal(ya, yb)
        x = ya[:, -1:, :] * 0.5
    with pytest.raises(ModelError, match="does not hold layers 0-1") as err:
        ShardEngine.load(part, 0, 2, cpu_split=1)
    assert "2-3" in err.value.message and err.value.hint
    # and the shard directory serves what it holds, to the next node
    with TensorSource(part) as again:
        assert again.ranges() == [(2, 4)] and again.model_id == source.model_id
        t = names[0]
        assert again.read(t, 0, 16) == source.read(t, 0, 16)
        with pytest.raises(NotHeld):
            again.read(model.tensors_for(0, 1)[0], 0, 8)


def test_a_replan_fetches_only_the_delta_and_prune_drops_the_rest(source: TensorSource,
                                                                  tmp_path: Path) -> None:
    dest = tmp_path / "part"
    with new_shard(source, dest) as sd:
        model = sd.model
        n = model.num_layers
        sd.plan(model.tensors_for(2, 4))
        fill(source, sd, model.tensors_for(2, 4))
    with ShardDir.open(dest, model) as sd:
        want = model.tensors_for(3, n)
        delta = sd.missing(want)
        assert set(delta) == set(want) - set(model.tensors_for(3, 4))
        assert sd.plan(want) == sum(model.tensors[t].size for t in delta)
        assert fill(source, sd, delta) == sum(model.tensors[t].size for t in delta)
        assert sd.ranges() == [(2, n)]  # kept layer 2: it can serve it
        freed = sd.prune(want)
        assert freed >= model.shard_bytes(2, 3) and sd.ranges() == [(3, n)]
    assert not (dest / "model-layer-00002.safetensors").exists()
    assert ShardEngine.load(dest, 3, n, cpu_split=1).tensor_names == tuple(want)


def test_wrong_bytes_never_count(source: TensorSource, tmp_path: Path) -> None:
    with new_shard(source, tmp_path / "part") as sd:
        name = sd.model.tensors_for(1, 2)[0]
        sd.plan([name])
        size = sd.model.tensors[name].size
        good = source.read(name, 0, size)
        sd.write(name, 0, bytes(b ^ 0xFF for b in good[:8]) + good[8:])
        assert not sd.finish(name) and sd.missing([name]) == [name]
        sd.write(name, 0, good)  # the next holder's bytes overwrite them
        assert sd.finish(name) and sd.missing([name]) == []
        with pytest.raises(LocalProtocolError):
            sd.write(name, size - 1, b"xx")
        with pytest.raises(LocalProtocolError, match="not planned"):
            sd.write(sd.model.tensors_for(4, 5)[0], 0, b"x")


_KILLER = """
import os, signal, sys
from pathlib import Path
from ringd.compute.shard_dir import ShardDir
from ringd.compute.tensor_source import TensorSource
src, dest, stop = TensorSource(Path(sys.argv[1])), Path(sys.argv[2]), int(sys.argv[3])
sd = ShardDir.open(dest)
names = sd.model.tensors_for(0, sd.model.num_layers)
sd.plan(names)
done = 0
for name in names:
    size = src.size(name)
    for off in range(0, size, 4093):
        sd.write(name, off, src.read(name, off, min(4093, size - off)))
        if done == stop and off >= size // 2:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-tensor
    sd.finish(name)
    done += 1
"""


def test_a_fetch_killed_midway_resumes_without_refetching_checked_tensors(
        source: TensorSource, tmp_path: Path) -> None:
    dest = tmp_path / "part"
    new_shard(source, dest).close()
    model = source.manifest.model
    names = model.tensors_for(0, model.num_layers)
    stop = next(i for i in range(len(names) // 2, len(names))  # a tensor of several chunks
                if model.tensors[names[i]].size > 3 * CHUNK)
    r = subprocess.run([sys.executable, "-c", _KILLER, str(source.path), str(dest), str(stop)],
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                       capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert inspect_model(dest).partial  # still a valid directory, loadable for what it holds
    with ShardDir.open(dest, model) as sd:
        have = sd.present()
        assert have == set(names[:stop])  # every checked tensor kept, the cut one not
        todo = sd.missing(names)
        sd.plan(names)
        moved = fill(source, sd, todo)
        assert moved == model.total_bytes - sum(model.tensors[t].size for t in have)
        assert sd.ranges() == [(0, model.num_layers)]
    assert load_manifest(dest).model_id == source.model_id
    ShardEngine.load(dest, 0, model.num_layers, cpu_split=1)


def test_a_group_renamed_in_but_not_indexed_is_adopted(source: TensorSource,
                                                       tmp_path: Path) -> None:
    dest = tmp_path / "part"
    with new_shard(source, dest) as sd:
        names = sd.model.tensors_for(1, 2)
        sd.plan(names)
        fill(source, sd, names)
    index = dest / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {}
    index.write_text(json.dumps(data))  # as if killed between the rename and the index
    with ShardDir.open(dest) as sd:
        assert sd.ranges() == [(1, 2)] and sd.missing(names) == []
    assert inspect_model(dest).holds(1, 2)


def test_the_index_names_a_published_group_once_saved_and_never_before(
        source: TensorSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdm, "SAVE_EVERY", 3600.0)  # only the end of the filling saves
    dest = tmp_path / "part"
    index = dest / "model.safetensors.index.json"

    def indexed() -> set[str]:
        return set(json.loads(index.read_text())["weight_map"])

    with new_shard(source, dest) as sd:
        one, two = sd.model.tensors_for(1, 2), sd.model.tensors_for(2, 3)
        sd.plan(one + two)
        fill(source, sd, one)
        assert (dest / "model-layer-00001.safetensors").exists()  # published
        assert sd.ranges() == [(1, 2)] and sd.missing(one) == []  # and counted
        assert indexed() == set()  # not yet named: a crash now means adopting it on open
        fill(source, sd, two)  # the last group being filled: saved at once
        assert indexed() == set(one + two)
        three = sd.model.tensors_for(3, 4)
        sd.plan(three + sd.model.tensors_for(4, 5))
        fill(source, sd, three)
        assert indexed() == set(one + two)
    assert indexed() == set(one + two + three)  # close saves what was published
    monkeypatch.setattr(sdm, "SAVE_EVERY", 0.0)
    with ShardDir.open(dest, sd.model) as sd:
        assert sd.ranges() == [(1, 4)]
        four = sd.model.tensors_for(4, 5)
        sd.plan(four + sd.model.tensors_for(5, 6))
        fill(source, sd, four)
        assert indexed() == set(one + two + three + four)  # due: saved with the group
    assert load_manifest(dest).model_id == source.model_id
    assert inspect_model(dest).holds(1, 5)


def test_a_changed_shard_dir_is_refused_not_served(source: TensorSource, tmp_path: Path) -> None:
    dest = tmp_path / "part"
    with new_shard(source, dest) as sd:
        names = sd.model.tensors_for(2, 3)
        sd.plan(names)
        fill(source, sd, names)
    f = dest / "model-layer-00002.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x40
    f.write_bytes(bytes(raw))
    for fn in (lambda: load_manifest(dest), lambda: TensorSource(dest),
               lambda: ShardDir.open(dest)):
        with pytest.raises(ModelError, match="do not match the model's manifest") as err:
            fn()
        assert str(f) in err.value.message and "ringctl model rm" in (err.value.hint or "")


def test_create_checks_the_small_files_and_the_model(source: TensorSource,
                                                     tmp_path: Path) -> None:
    model, files = fetch_small(source)
    bad = dict(files, **{"config.json": files["config.json"] + b" "})
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(ModelError, match="config.json"):
        ShardDir.create(store / "x", model, bad)
    assert list(store.iterdir()) == []
    ShardDir.create(store / "x", model, files).close()
    other = ModelManifest.build(model.num_layers, [
        (t.name, t.dtype, t.shape, t.size, blake2b_hex(t.name.encode()))
        for t in model.tensors.values()], [(f.name, f.size, f.hash) for f in model.files.values()])
    with pytest.raises(ModelError, match="another model"):
        ShardDir.create(store / "x", other, files)
    with pytest.raises(ModelError, match="whole model"):
        ShardDir.open(source.path)
    with ShardDir.open(store / "x"):
        with pytest.raises(ModelError, match="another process"):
            ShardDir.open(store / "x")


def test_disk_full_is_a_clear_error_and_the_store_stays_valid(
        source: TensorSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "part"
    sd = new_shard(source, dest)
    model = sd.model
    first = model.tensors_for(0, 1)
    sd.plan(first)
    fill(source, sd, first)
    real = shutil.disk_usage(dest)
    monkeypatch.setattr(sdm.shutil, "disk_usage",
                        lambda p: real._replace(free=sdm.SPACE_MARGIN + 1000))
    with pytest.raises(ModelError, match="not enough space") as err:
        sd.plan(model.tensors_for(1, 3))
    assert str(dest) in err.value.message and "needed" in err.value.message
    monkeypatch.undo()
    sd.plan(model.tensors_for(1, 3))

    def full(*a: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sdm.os, "pwrite", full)
    name = model.tensors_for(1, 2)[0]
    with pytest.raises(ModelError, match="no space left") as err:
        sd.write(name, 0, source.read(name, 0, 64))
    assert str(dest) in err.value.message and "still needed" in err.value.message
    monkeypatch.undo()
    sd.close()
    info = inspect_model(dest)  # still a valid directory holding what it held
    assert info.holds(0, 1) and not info.holds(1, 2)
    assert load_manifest(dest).model_id == source.model_id


def test_a_read_only_store_is_a_clear_error(source: TensorSource, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model, files = fetch_small(source)

    def ro(*a: object, **k: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", ro)
    with pytest.raises(ModelError, match="cannot write .*Read-only") as err:
        ShardDir.create(tmp_path / "store" / "x", model, files)
    assert str(tmp_path / "store" / "x") in err.value.message and err.value.hint
    monkeypatch.undo()
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_remove_model_takes_a_shard_dir_out_of_the_store(source: TensorSource,
                                                         tmp_path: Path) -> None:
    from ringd.compute import store

    root = tmp_path / "store"
    sd = new_shard(source, root / "part")
    assert [m.name for m in store.list_models(root)] == ["part"]
    assert store.list_models(root)[0].partial
    with pytest.raises(ModelError, match="being filled"):
        store.remove_model(root, "part")
    sd.close()
    store.remove_model(root, "part")
    assert store.list_models(root) == [] and sorted(p.name for p in root.iterdir()) == [".lock"]
    with pytest.raises(ModelError, match="not in the store"):
        store.remove_model(root, "part")
