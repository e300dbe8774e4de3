"""The weights manifest: per-tensor hashes, lazy atomic rebuilds, and shard fingerprints."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from ringd.compute import manifest
from ringd.compute.engine import ShardEngine
from ringd.compute.manifest import (
    MANIFEST_FILE,
    expected_tensors,
    hash_file,
    load_manifest,
    tensor_spans,
)
from ringd.compute.model_info import inspect_model
from ringd.core.proof import parse_fingerprint
from ringd.errors import ModelError
from tests.compute.util import write_llama_gguf


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny float model (file times kept), without any manifest."""
    out = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, out, ignore=shutil.ignore_patterns(MANIFEST_FILE))
    return out


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record which files get hashed (the real hashing still runs)."""
    seen: list[str] = []
    real = manifest.hash_file

    def counted(path: Path) -> dict[str, str]:
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(manifest, "hash_file", counted)
    return seen


def test_each_hash_is_blake2b_of_the_tensors_bytes(tiny_model_dir: Path) -> None:
    info = inspect_model(tiny_model_dir)
    fname = info.tensor_index["model.layers.2.mlp.up_proj.weight"].file
    hashes = hash_file(tiny_model_dir / fname)
    loaded = mx.load(str(tiny_model_dir / fname))
    assert set(hashes) == set(loaded)
    for name, arr in loaded.items():  # float32: the array's bytes are the stored bytes
        want = hashlib.blake2b(np.array(arr).tobytes(), digest_size=16).hexdigest()
        assert hashes[name] == want, name
    spans = tensor_spans(tiny_model_dir / fname)
    assert all(e - b == info.tensor_index[n].nbytes
               for n, (b, e) in spans.items() if n in info.tensor_index)


def test_built_on_first_use_atomically_then_reused(model_copy: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted({t.file for t in inspect_model(model_copy).tensor_index.values()})
    seen = _counting(monkeypatch)
    m = load_manifest(model_copy)
    assert sorted(seen) == files and (model_copy / MANIFEST_FILE).is_file()
    assert [p.name for p in model_copy.iterdir() if p.name.startswith(".")] == []  # no temp file
    data = json.loads((model_copy / MANIFEST_FILE).read_text())
    assert data["version"] == 2 and sorted(data["local"]["files"]) == files
    assert data["local"]["kind"] == "full" and data["model_id"] == m.model_id
    assert len(m.tensors) == sum(len(f["tensors"]) for f in data["local"]["files"].values())
    seen.clear()
    manifest._cache.clear()  # as a new process would: read from the file, nothing hashed
    assert load_manifest(model_copy).tensors == m.tensors and seen == []


def test_a_changed_file_is_hashed_again_and_changes_only_its_layers(
        model_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = inspect_model(model_copy)
    before = load_manifest(model_copy)
    fps = {r: before.expected(info, *r) for r in [(0, 2), (2, 4), (4, 6)]}
    # Layer 2's down projection gets layer 3's bytes (a wrong layer file).
    a, b = "model.layers.2.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"
    path, src = model_copy / info.tensor_index[a].file, model_copy / info.tensor_index[b].file
    (a0, a1), (b0, b1) = tensor_spans(path)[a], tensor_spans(src)[b]
    raw = bytearray(path.read_bytes())
    raw[a0:a1] = src.read_bytes()[b0:b1]
    path.write_bytes(bytes(raw))
    seen = _counting(monkeypatch)
    after = load_manifest(model_copy)
    assert seen == [path.name]  # only the changed file
    assert after.tensors[a] == before.tensors[b] != before.tensors[a]
    assert after.model_id != before.model_id  # a full directory whose bytes changed: a new model
    assert {k for k in after.tensors if after.tensors[k] != before.tensors[k]} == {a}
    assert after.expected(info, 0, 2) == fps[(0, 2)] and after.expected(info, 4, 6) == fps[(4, 6)]
    assert after.expected(info, 2, 4) != fps[(2, 4)]


def test_a_damaged_manifest_is_rebuilt(model_copy: Path) -> None:
    good = load_manifest(model_copy).tensors
    manifest._cache.clear()
    (model_copy / MANIFEST_FILE).write_text("{not json")
    assert load_manifest(model_copy).tensors == good
    assert json.loads((model_copy / MANIFEST_FILE).read_text())["version"] == 2


def test_a_truncated_weight_file_is_a_model_error(model_copy: Path) -> None:
    info = inspect_model(model_copy)
    path = model_copy / info.tensor_index["model.layers.0.self_attn.q_proj.weight"].file
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelError, match="needs bytes .* but the file holds|does not fit"):
        hash_file(path)


@pytest.mark.parametrize("which", ["float", "quantized"])
def test_expected_tensors_are_what_the_engine_loads(which: str, tiny_model_dir: Path,
                                                    tiny_quantized_model_dir: Path) -> None:
    model_dir = tiny_model_dir if which == "float" else tiny_quantized_model_dir
    info = inspect_model(model_dir)
    m = load_manifest(model_dir)
    for start, end in [(0, 2), (2, 5), (5, 6), (0, 6)]:
        eng = ShardEngine.load(model_dir, start, end, cpu_split=1)
        assert list(eng.tensor_names) == expected_tensors(info, start, end)
        fp = m.fingerprint(start, end, eng.tensor_names)
        assert fp == m.expected(info, start, end)
        assert parse_fingerprint(fp)[:2] == (start, end)  # type: ignore[index]
    # the tied model's last shard holds the embedding again; the untied one its own head
    assert ("model.embed_tokens.weight" in expected_tensors(info, 5, 6)) == info.tie_word_embeddings
    with pytest.raises(ModelError):
        expected_tensors(info, 3, 7)


def test_import_writes_the_manifest(tiny_model_dir: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from ringd.compute import store

    gguf = write_llama_gguf(tiny_model_dir, tmp_path / "t.gguf")
    messages: list[str] = []
    out = store.import_gguf(gguf, tmp_path / "store", name="t", progress=messages.append)
    assert (out / MANIFEST_FILE).is_file() and any("manifest" in m for m in messages)
    seen = _counting(monkeypatch)
    manifest._cache.clear()
    load_manifest(out)
    assert seen == []  # valid after the rename into the store


def test_model_id_names_the_bytes_not_the_directory(model_copy: Path, tmp_path: Path) -> None:
    """Same tensors split over other files, in a directory of another name: the same id."""
    from tests.conftest import build_tiny_model

    m = load_manifest(model_copy)
    other = build_tiny_model(tmp_path / "elsewhere", quantized=False, max_file_bytes=2_000_000)
    assert {p.name for p in other.glob("*.safetensors")} != {
        p.name for p in model_copy.glob("*.safetensors")}
    assert load_manifest(other).model_id == m.model_id
    assert set(m.model.files) == {"config.json", "tokenizer.json", "tokenizer_config.json"}
    # the config is part of the identity
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (other / "config.json").write_text(json.dumps(cfg))
    assert load_manifest(other).model_id != m.model_id


def test_a_version_1_manifest_is_upgraded_without_hashing_again(
        model_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = load_manifest(model_copy)
    data = json.loads((model_copy / MANIFEST_FILE).read_text())
    (model_copy / MANIFEST_FILE).write_text(json.dumps(
        {"version": 1, "files": data["local"]["files"]}))
    manifest._cache.clear()
    seen = _counting(monkeypatch)
    again = load_manifest(model_copy)
    assert seen == [] and again.model_id == m.model_id
    assert json.loads((model_copy / MANIFEST_FILE).read_text())["version"] == 2


def test_fingerprints_from_the_manifest_alone(model_copy: Path) -> None:
    """A directory holding only the manifest, config and tokenizer plans and checks others."""
    from ringd.compute.manifest_file import KIND_SHARD, ManifestFile, write_manifest_file

    info = inspect_model(model_copy)
    m = load_manifest(model_copy)
    bare = model_copy.parent / "bare"
    bare.mkdir()
    for f in m.model.files:
        shutil.copy2(model_copy / f, bare / f)
    write_manifest_file(bare, ManifestFile(m.model, KIND_SHARD))
    binfo = inspect_model(bare)
    assert binfo.partial and binfo.local_bytes == 0 and not binfo.holds(0, 1)
    for k in ("layer_bytes", "embed_bytes", "norm_bytes", "head_bytes", "total_bytes",
              "kv_bytes_per_token_per_layer", "activation_dtype", "num_layers"):
        assert getattr(binfo, k) == getattr(info, k), k
    bm = load_manifest(bare)
    assert bm.kind == "shard" and bm.model_id == m.model_id
    for r in [(0, 2), (2, 5), (5, 6)]:
        assert bm.expected(None, *r) == m.expected(info, *r)
        assert expected_tensors(binfo, *r) == expected_tensors(info, *r)
    with pytest.raises(ModelError, match="does not hold|has none") as err:
        ShardEngine.load(bare, 0, 2, cpu_split=1)
    assert err.value.hint
